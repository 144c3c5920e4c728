"""Data-parallel negative pool: positives gathered from every worker (real gloo process group, 2 processes)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ray_mgdspr.train.loop import shared_positives


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)
        pos = torch.randn(3, 4, requires_grad=True)
        ids = rank * 10 + torch.arange(3)
        pool, pool_ids = shared_positives(pos, ids, gather=True)
        (pool * (1 + torch.arange(pool.size(0))[:, None])).sum().backward()  # row r of the pool weighs r + 1
        local, local_ids = shared_positives(pos.detach(), ids, gather=False)
        Path(out, f"{rank}.json").write_text(json.dumps({
            "pool_ids": pool_ids.tolist(), "pool_rows": pool.shape[0], "own_rows_match": torch.equal(
                pool[rank * 3 : rank * 3 + 3], pos), "grad": pos.grad.tolist(), "local_rows": local.shape[0],
            "local_ids": local_ids.tolist()}))
    finally:
        dist.destroy_process_group()


def test_positives_of_every_worker_join_the_pool_and_gradients_flow_back(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        r = json.loads((tmp_path / f"{rank}.json").read_text())
        assert r["pool_ids"] == [0, 1, 2, 10, 11, 12] and r["pool_rows"] == 6 and r["own_rows_match"]
        assert r["local_rows"] == 3 and r["local_ids"] == [rank * 10 + i for i in range(3)]
        # Each worker's loss weighs pool row r by r + 1; both workers' gradients reach the owner of the row.
        expect = [[2.0 * (rank * 3 + i + 1)] * 4 for i in range(3)]
        assert r["grad"] == expect
