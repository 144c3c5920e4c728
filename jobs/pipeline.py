"""`ray job submit` entrypoint of the daily pipeline: the same code path as `mgdspr pipeline`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/pipeline.py --config /shared/mgdspr.yaml --endpoint http://SERVE:8000

Stages: logs (``--simulate``, or the world at train.world) -> validate -> train (resumes a run of the same name)
-> embed -> index build + verify -> Serve config -> promote on ``--endpoint`` (POST /v1/admin/promote with the
bearer token in $MGDSPR_SERVE_TOKEN; pass it with ``--runtime-env-json '{"env_vars": {"MGDSPR_SERVE_TOKEN":
"..."}}'``). Without ``--endpoint`` the index root's CURRENT moves to the new version instead: an endpoint that
watches CURRENT (serve.watch_current_s) picks it up, and a fresh ``serve deploy <out>/serve.yaml`` serves it.

runtime_env: as `jobs/train.py` (the package importable on every node). Paths in the config must be absolute
and on storage every node reaches; relative ones are resolved against the job's temporary working directory
(and a warning says so).

Entrypoint resources: the driver only sequences stages and holds no model, so submit it with
``--entrypoint-num-cpus 0`` (the default): on a head with ``num-cpus: 0`` it still runs, and every CPU/GPU stays
free for the stages, which ask for their own resources from the config (train.resources_per_worker,
embed.cpus_per_actor/gpus_per_actor, index.build_cpus/build_resources).

Exit codes (the job's status): 0 ok; 1 a stage failed (see the log); 2 bad input (config, world, arguments:
nothing was built); 3 the new version is built and verified but the endpoint refused or could not be reached
(the old version keeps serving). ``<out>/pipeline.json`` records every stage, its seconds and its artifacts.
"""

from __future__ import annotations

import typer

from ray_mgdspr.cli import pipeline

if __name__ == "__main__":
    typer.run(pipeline)
