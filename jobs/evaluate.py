"""`ray job submit` entrypoint for the evaluation report: the same code path as `mgdspr eval`.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/evaluate.py --out /shared/eval

Inside a job, Ray connects to the job's cluster by itself (RAY_ADDRESS is set by the job supervisor); each run
(world, variant, seed) is one Ray task of `eval.task_cpus` CPUs, so a bigger cluster runs more at once. The
runtime_env is the one `jobs/train.py` describes; `--out` and `--work` must be on storage the driver can write
(worlds are simulated by the driver and shipped to the tasks through the object store).

Entrypoint resources: none (the runs ask for `eval.task_cpus` each). Exit codes: 0 the report is written; 2 bad
input (config, options); 1 a run failed (traceback in the log; finished runs are kept in the journal and reused
by the next submission).

Every option of `mgdspr eval` is accepted (`--config`, `--preset`, `--lang`, `--seeds`, `--steps`, `--quick`, ...).
"""

from __future__ import annotations

import typer

from ray_mgdspr.eval.cli import eval_command

if __name__ == "__main__":
    typer.run(eval_command)
