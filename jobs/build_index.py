"""`ray job submit` entrypoint: embed the catalogue with a model bundle and build its index version.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/build_index.py --bundle runs/train/mgdspr/bundle --config my.yaml

Runs `mgdspr embed` then `mgdspr index build` on the job's cluster (the runtime_env needs are those of
`jobs/train.py`). Paths must be reachable from every node. Entrypoint resources: none (the embedding actors
and shard tasks ask for theirs: embed.cpus_per_actor/gpus_per_actor, index.build_cpus/build_resources).

Exit codes: 0 the version is built (and CURRENT points at it); 2 bad input (bundle, embeddings, config: named
in the message); 1 a stage failed (traceback in the log). A failed build leaves no partial version.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ray_mgdspr.cli import main


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--config", default=None)
    ap.add_argument("--world", default=None)
    return ap.parse_args()


if __name__ == "__main__":
    a = _args()
    common = [*(["--config", a.config] if a.config else []), *(["--world", a.world] if a.world else [])]
    from ray_mgdspr.config import load_config, load_preset
    from ray_mgdspr.model.bundle import read_bundle_manifest

    cfg = load_config(a.config) if a.config else load_preset("demo")
    version = read_bundle_manifest(a.bundle).version
    for argv in (["embed", "--bundle", a.bundle, "--overwrite", *common],
                 ["index", "build", "--embeddings", str(Path(cfg.embed.out) / version), *common]):
        sys.argv = [sys.argv[0], *argv]
        try:
            main()
        except SystemExit as e:
            if e.code:
                raise
