"""P_good, filter pass counts, top-K overlap against brute-force references; graded judgements on real ESCI data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ray_mgdspr.data.loaders import load_esci
from ray_mgdspr.data.world import read_table
from ray_mgdspr.metrics import (
    judged_grades,
    judgement_maps,
    p_good_at_k,
    pass_count_at_k,
    recall_at_k,
    relevant_items,
    topk_overlap,
)

REPO = Path(__file__).resolve().parents[2]
ESCI = next((p / "esci_judgments_subset" for p in (REPO / "tests" / "fixtures" / "real_data",
                                                   REPO.parent / "shared" / "data")
             if (p / "esci_judgments_subset").is_dir()), None)


def _p_good_reference(grades: np.ndarray, k: int, min_grade: int) -> float:
    return float(np.mean([sum(g >= min_grade for g in row[:k]) / k for row in grades.tolist()]))


def _overlap_reference(ref: np.ndarray, approx: np.ndarray, k: int) -> float:
    return float(np.mean([len({i for i in a[:k] if i >= 0} & {i for i in r[:k] if i >= 0}) / k
                          for r, a in zip(ref.tolist(), approx.tolist(), strict=True)]))


@pytest.mark.parametrize("k", [1, 4, 10])
@pytest.mark.parametrize("min_grade", [1, 2])
def test_p_good_matches_brute_force(k: int, min_grade: int) -> None:
    grades = np.random.default_rng(k).integers(-1, 3, size=(30, 10))
    assert p_good_at_k(grades, k, min_grade) == pytest.approx(_p_good_reference(grades, k, min_grade))


@pytest.mark.parametrize("k", [1, 3, 8])
def test_pass_count_and_overlap_match_brute_force(k: int) -> None:
    rng = np.random.default_rng(k)
    passes = rng.random((25, 8)) < 0.4
    assert pass_count_at_k(passes, k) == pytest.approx(np.mean([row[:k].sum() for row in passes]))
    ref = np.stack([rng.permutation(20)[:8] for _ in range(25)])
    approx = np.stack([rng.permutation(20)[:8] for _ in range(25)])
    approx[:, -2:] = -1  # an index that ran dry
    ref[0, -1] = -1  # pads never count as shared
    assert topk_overlap(ref, approx, k) == pytest.approx(_overlap_reference(ref, approx, k))
    assert topk_overlap(ref, ref, k) == pytest.approx(1.0 - (k == 8) / 25 / 8)


def test_hand_made_cases_and_errors() -> None:
    grades = np.array([[2, 1, 0, -1], [0, 0, 2, 2]])
    assert p_good_at_k(grades, 2) == 0.5  # 2 of 4 slots in the top-2 have grade >= 1
    assert p_good_at_k(grades, 4, min_grade=2) == 0.375
    with pytest.raises(ValueError, match=r"k=5 outside 1\.\.4"):
        p_good_at_k(grades, 5)
    with pytest.raises(ValueError, match=r"expected a \(queries, K\) array"):
        pass_count_at_k(np.zeros(3, bool), 1)


@pytest.mark.skipif(ESCI is None, reason="ESCI judgement subset (tests/fixtures/real_data) not found")
def test_metrics_on_real_esci_judgements(tmp_path: Path) -> None:
    """Real graded judgements (E=3, S=2, C=1, I=0): the ideal ranking of each query's judged items is perfect,
    the reversed one is not, and both agree with a reference computed straight from the judgement rows."""
    load_esci(ESCI, tmp_path / "esci")
    j = read_table(tmp_path / "esci", "judgements").to_pandas()
    assert set(j["label"]) == {"E", "S", "C", "I"}
    judged = judgement_maps(j["query_id"].to_numpy(), j["item_id"].to_numpy(), j["grade"].to_numpy())
    queries = sorted(judged)
    k = 40  # every query has 40 or more judged items
    ideal = np.array([sorted(judged[q], key=lambda i: (-judged[q][i], i))[:k] for q in queries])
    reverse = np.array([sorted(judged[q], key=lambda i: (judged[q][i], i))[:k] for q in queries])
    exact = relevant_items(judged, queries, min_grade=3)
    n_exact = np.array([len(t) for t in exact])
    assert len(queries) == 150 and (n_exact >= 1).all()

    for ranking in (ideal, reverse):
        grades = judged_grades(judged, queries, ranking)
        ref_grades = np.array([[judged[q][i] for i in row] for q, row in zip(queries, ranking.tolist(), strict=True)])
        np.testing.assert_array_equal(grades, ref_grades)
        ref_recall = np.mean([len(set(row[:10]) & set(t.tolist())) / len(t)
                              for row, t in zip(ranking.tolist(), exact, strict=True)])
        assert recall_at_k(ranking, exact, 10) == pytest.approx(ref_recall)
        assert p_good_at_k(grades, 10, min_grade=3) == pytest.approx(_p_good_reference(ref_grades, 10, 3))

    ideal_grades = judged_grades(judged, queries, ideal)
    assert p_good_at_k(ideal_grades, 1, min_grade=3) == 1.0  # every query has an E item
    expected = np.mean(np.minimum(n_exact, 10) / 10)  # ideal: as many E items as exist, up to K
    assert p_good_at_k(ideal_grades, 10, min_grade=3) == pytest.approx(expected)
    assert recall_at_k(ideal, exact, k) == pytest.approx(np.mean(np.minimum(n_exact, k) / n_exact))
    assert recall_at_k(reverse, exact, 10) < recall_at_k(ideal, exact, 10)
    unjudged = judged_grades(judged, queries[:1], np.array([[-1, 10**9]]))
    assert unjudged.tolist() == [[-1, -1]]  # pads and unjudged items are not relevant
