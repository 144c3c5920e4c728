"""`ray job submit` entrypoint for MGDSPR training: the same code path as `mgdspr train`.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/train.py --config my.yaml

Inside a job, Ray connects to the job's cluster by itself (RAY_ADDRESS is set by the job supervisor).
The runtime_env it needs: the `ray_mgdspr` package importable on every node. Either install it in the
cluster's image (`pip install ray-mgdspr` or `pip install -e .` as in `make venv`), or ship the source with
`--working-dir .` (this repository's root: `ray_mgdspr/` is then on the workers' path) and its
dependencies with `--runtime-env-json '{"pip": ["torch==2.13.0", "faiss-cpu", "jieba", "pydantic", "typer",
"rich", "pyyaml"]}'`. The world and storage paths in the config must be reachable from every node (a
shared file system, or URIs for the search events).

Entrypoint resources: none (the default `--entrypoint-num-cpus 0`): the driver only plans and checks, and the
DDP workers, readers and featurizers ask for their own resources from the config (train.resources_per_worker,
data.*_cpus), so it runs on a head with `num-cpus: 0`.

Exit codes: 0 the bundle is written; 2 bad input (config, world, too few examples: the message names the file
and field; nothing was trained); 1 training failed (more worker failures than train.max_failures, a bug: the
traceback is in the job's log, and a resubmit with the same run name resumes from the last checkpoint).

Every option of `mgdspr train` is accepted (`--config`, `--preset`, `--world`, `--run-name`, `--epochs`).
"""

from __future__ import annotations

import typer

from ray_mgdspr.cli import train

if __name__ == "__main__":
    typer.run(train)
