"""`ray job submit` entrypoint: embed the catalogue with a model bundle and build its index version.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/build_index.py --bundle runs/train/mgdspr/bundle --config my.yaml

Runs `mgdspr embed --overwrite` then `mgdspr index build` (the same functions) on the job's cluster (the runtime_env
needs are those of
`jobs/train.py`). Paths must be reachable from every node. Entrypoint resources: none (the embedding actors
and shard tasks ask for theirs: embed.cpus_per_actor/gpus_per_actor, index.build_cpus/build_resources).

Exit codes: 0 the version is built (and CURRENT points at it); 2 bad input (bundle, embeddings, config: named
in the message); 1 a stage failed (traceback in the log). A failed build leaves no partial version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ray_mgdspr.cli import embed, index_build
from ray_mgdspr.cli_support import AddressOpt, ConfigOpt, PresetOpt, project_config
from ray_mgdspr.model.bundle import read_bundle_manifest


def build_index_job(
    bundle: Annotated[Path, typer.Option(help="model bundle whose item tower embeds the catalogue")],
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    world: Annotated[str | None, typer.Option(help="world whose catalogue to embed (default: train.world)")] = None,
    address: AddressOpt = None,
) -> None:
    """Embed the catalogue with BUNDLE's item tower, then build, verify and make current its index version."""
    embed(bundle, config=config, preset=preset, world=world, overwrite=True, address=address)  # exits on bad input
    embeddings = Path(project_config(config, preset).embed.out) / read_bundle_manifest(bundle).version
    index_build(embeddings, config=config, preset=preset, world=world, current=True, address=address)


if __name__ == "__main__":
    typer.run(build_index_job)
