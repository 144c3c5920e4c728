"""`ray job submit` entrypoint of the daily catalogue delta: the same code path as `mgdspr index update`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/update_index.py --bundle /shared/runs/train/mgdspr/bundle --config /shared/mgdspr.yaml \\
            --world /shared/catalogue-today --endpoint http://SERVE:8000

Compares today's catalogue (the world's items table) with the serving index version (CURRENT, or --base), embeds
only the added and changed items with the base's model in the driver, writes them as a delta segment beside each
touched shard's base files (a shard whose changes reach index.compact_at, or every one with --compact, is
rewritten in full), and commits a new version (CURRENT moves, or --no-current); with --endpoint it is promoted
there like any version (verified, loaded beside the serving one, switched without dropping requests; token in
$MGDSPR_SERVE_TOKEN).
Paths must be reachable from the driver's node. Entrypoint resources: one CPU for the embedding
(`--entrypoint-num-cpus 1`): a 1% delta of a 1M-item catalogue is ~10k items.

Exit codes: 0 the version is written (and promoted when asked); 2 bad input (bundle not the base's model, a base
that predates deltas, an HNSW factory that cannot remove vectors, an existing version id: the message says which);
1 the promotion failed (the version is written; promote it later with `mgdspr serve promote`).
"""

from __future__ import annotations

import typer

from ray_mgdspr.cli import index_update

if __name__ == "__main__":
    typer.run(index_update)
