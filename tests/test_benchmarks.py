"""The benchmarks' own measuring parts, small and fast, so they do not rot between benchmark runs (a change to the
shard metadata once broke every index build of ``bench_index.py`` unnoticed)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import psutil
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_featurizer_memory  # noqa: E402
import bench_index  # noqa: E402
import deep_search  # noqa: E402
import idle_serve  # noqa: E402
import load_gc  # noqa: E402
import proctree  # noqa: E402
import record  # noqa: E402


def test_peak_memory_sees_a_childs_allocation_under_its_phase() -> None:
    """A child that holds 200 MiB, then exits: the sampler's phase of that time has the child's peak; the tree's
    sum holds it too, and a phase begun after the child exited does not (peaks are per phase, not carried over)."""
    code = textwrap.dedent("""
        import sys, time
        block = bytearray(200 * 2**20)  # zero-filled: every page touched
        print("held", flush=True)
        sys.stdin.readline()
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    sampler = proctree.PeakMemory(child.pid, interval=0.05, driver="child")
    sampler.start()
    try:
        sampler.phase = "holding"
        assert child.stdout.readline().strip() == "held"
        sampler.sample()
    finally:
        child.communicate("\n", timeout=30)
    # only now: set while the child still held its block, the sampler's thread could sample it under "after"
    sampler.phase = "after"
    sampler.sample()
    peaks = sampler.stop()
    assert peaks["holding"]["largest_mib"]["child"] >= 200
    assert peaks["holding"]["total_mib"] >= 200
    assert peaks["holding"]["processes"]["child"] == 1
    assert peaks.get("after", {}).get("largest_mib", {}).get("child", 0) < 200



def test_idle_memory_counts_each_childs_own_pages_by_label() -> None:
    """``idle_serve.memory_by_label``: two children of one label that each hold 100 MiB of their own are summed
    under it, resident and unique."""
    code = textwrap.dedent("""
        import sys
        block = bytearray(100 * 2**20)  # zero-filled: every page touched, and this process's own
        print("held", flush=True)
        sys.stdin.readline()
    """)
    script = Path(__file__).parent / "holder.py"  # a name only: proctree labels a Python process by its script
    children = [subprocess.Popen([sys.executable, "-c", code, str(script)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for child in children:
            assert child.stdout.readline().strip() == "held"
        labels = {proctree.label(psutil.Process(c.pid)) for c in children}
        assert len(labels) == 1
        memory = idle_serve.memory_by_label()[labels.pop()]
    finally:
        for child in children:
            child.communicate("\n", timeout=30)
    assert memory["n"] == 2
    assert memory["uss"] >= 200 and memory["rss"] >= memory["uss"]

def test_per_shard_build_and_search_run_at_a_tiny_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``bench_index``'s children build a version the way the project does and search it; recall of Flat is 1."""
    monkeypatch.setattr(bench_index, "DIM", 16)
    monkeypatch.setattr(bench_index, "SHARDS", 1)
    monkeypatch.setattr(bench_index, "N_QUERIES", 20)
    data = bench_index.write_data(str(tmp_path), 2_000)
    assert np.load(f"{data}/queries.npy").shape == (20, 16)
    root = tmp_path / "root"
    built = bench_index.child_build(data, 2_000, bench_index.FLAT, str(root))
    assert built["n"] == 2_000 and built["index_bytes"] > 2_000 * 16 * 4
    searched = bench_index.child_search(data, 2_000, bench_index.FLAT, str(root), [{}], "", 5, 1)
    assert searched["settings"][0]["flat_vs_numpy_recall_20q"] == 1.0
    assert searched["settings"][0]["single_p99_ms"] > 0


def test_featurizer_memory_counts_a_mapped_files_pages(tmp_path: Path) -> None:
    """``bench_featurizer_memory.memory``: the PSS of this process's mappings of files under a directory (all
    touched pages of a 16 MiB ``.npy`` mapped read-only), beside the process's own totals."""
    np.save(tmp_path / "a.npy", np.ones(2 * 2**20, np.int64))
    before = bench_featurizer_memory.memory(os.getpid(), tmp_path)
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    assert int(mapped.sum()) == 2 * 2**20  # every page touched
    after = bench_featurizer_memory.memory(os.getpid(), tmp_path)
    assert before["saved_pss"] == 0 and 15.5 <= after["saved_pss"] <= 16.5
    assert after["rss"] >= after["pss"] >= after["uss"] > 0 and after["peak_rss"] >= after["rss"]


def test_serve_settings_of_the_command_line_are_checked_against_the_serve_section() -> None:
    """``--ab`` (profile_core) and ``--serve-set`` (bench_scale): FIELD=VALUE pairs, values as YAML, refused with
    the field named when the serve section has no such field or the value does not fit it."""
    assert record.serve_settings(["early_fallback=0", "fallback=none", "query_tower=module"]) == \
        {"early_fallback": 0, "fallback": "none", "query_tower": "module"}
    assert record.serve_settings(None) == {} and record.settings_label({"early_fallback": 0}) == "early_fallback=0"
    for bad, named in (("early_falback=0", "early_falback"), ("early_fallback=-1", "early_fallback"),
                       ("early_fallback", "FIELD=VALUE")):
        with pytest.raises(SystemExit, match=named):
            record.serve_settings([bad])


def test_load_gc_records_the_collections_while_on_by_generation() -> None:
    pauses = load_gc.Pauses()
    try:
        gc.collect()
        pauses.on = True
        gc.collect(1)
        gc.collect(2)
        pauses.on = False
        gc.collect()
    finally:
        pauses.close()
    summary = pauses.summary()
    assert [summary[g]["count"] for g in ("gen0", "gen1", "gen2")] == [0, 1, 1]
    assert summary["gen2"]["max_ms"] > 0 and summary["gen2"]["total_s"] * 1000 >= summary["gen2"]["max_ms"]


def test_deep_search_compares_hits_with_ties_in_id_order() -> None:
    """The heap's hits are put in score-then-id order before comparing; a different hit or score is a difference."""
    heap = (np.array([[0.9, 0.5, 0.5, -np.inf]], np.float32), np.array([[7, 9, 3, -1]]))
    shipped = (np.array([[0.9, 0.5, 0.5, -np.inf]], np.float32), np.array([[7, 3, 9, -1]]))
    assert deep_search.same_hits(heap, shipped)
    assert not deep_search.same_hits(heap, (shipped[0], np.array([[7, 3, 8, -1]])))
    assert not deep_search.same_hits(heap, (np.array([[0.9, 0.5, 0.4, -np.inf]], np.float32), shipped[1]))
