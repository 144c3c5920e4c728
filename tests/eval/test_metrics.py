"""Recall@K against a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest

from ray_mgdspr.metrics import recall_at_k


def _reference(topk: np.ndarray, targets: list[np.ndarray], k: int) -> float:
    pairs = zip(topk, targets, strict=True)
    return float(np.mean([len(set(t.tolist()) & set(row[:k].tolist())) / len(t) for row, t in pairs]))


@pytest.mark.parametrize("k", [1, 5, 20])
def test_recall_matches_brute_force(k: int) -> None:
    rng = np.random.default_rng(0)
    topk = np.stack([rng.permutation(100)[:20] for _ in range(50)])
    targets = [rng.choice(100, size=rng.integers(1, 6), replace=False) for _ in range(50)]
    assert recall_at_k(topk, targets, k) == pytest.approx(_reference(topk, targets, k))


def test_recall_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="2 result lists but 1 target sets"):
        recall_at_k(np.zeros((2, 3), np.int64), [np.array([1])])
    with pytest.raises(ValueError, match="event 1 has no targets"):
        recall_at_k(np.zeros((2, 3), np.int64), [np.array([1]), np.array([], np.int64)])
