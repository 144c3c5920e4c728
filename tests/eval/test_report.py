"""Findings and tables from hand-made run records; the eval config; the report command end to end (SYNTHETIC)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from ray_mgdspr.config import ConfigError
from ray_mgdspr.eval.cli import eval_command
from ray_mgdspr.eval.config import load_eval_config
from ray_mgdspr.eval.report import aggregate, findings, main_table


def _record(variant: str, seed: int, recall: float, p_good: float, curve: list[float] | None = None) -> dict:
    r = {"lang": "en", "variant": variant, "seed": seed,
         "metrics": {"recall@100": recall, "recall@10": recall / 2, "p_good@10": p_good, "p_exact@10": p_good / 2,
                     "pass@10": 10 * p_good}}
    if curve:
        r["curve"] = [{"step": 10 * (i + 1), "recall@100": v, "recall@10": v / 2} for i, v in enumerate(curve)]
    return r


def test_findings_follow_the_numbers() -> None:
    records = [
        *(_record("mgdspr", s, 0.60 + 0.01 * s, 0.50, [0.3, 0.5, 0.6]) for s in range(3)),
        *(_record("dnn_hinge", s, 0.50 + 0.01 * s, 0.40) for s in range(3)),
        *(_record("no_mgs", s, 0.65, 0.55) for s in range(3)),  # the full model loses to -mgs: not matched
        *(_record("no_trm", s, 0.55, 0.55) for s in range(3)),  # recall up, P_good down: partly
        *(_record("tau1", s, 0.61, 0.30) for s in range(3)),  # recall a little down, P_good much up: matched
        *(_record("no_imix", s, 0.59, 0.60) for s in range(3)),  # P_good down with I_mix: not matched
        *(_record("mgdspr_hinge", s, 0.0, 0.0, [0.1, 0.3, 0.7]) for s in range(3)),  # faster, not higher: partly
    ]
    summary = aggregate(records)
    assert summary["en", "mgdspr"]["mean"]["recall@100"] == pytest.approx(0.61)
    assert summary["en", "mgdspr"]["std"]["recall@100"] == pytest.approx(0.01)
    statuses = [f.status for f in findings(summary, "en", [10, 100], 10)]
    assert statuses == ["matched", "not matched", "partly matched", "matched", "not matched", "partly matched",
                        "not run", "not run"]  # the sweeps: only τ = 1 and no sweep runs
    table = main_table(summary, "en", ["mgdspr", "dnn_hinge", "bm25"], [10, 100], 10)
    assert "| MGDSPR (full) | 0.305 ± 0.005 | 0.610 ± 0.010 | 0.500 ± 0.000 |" in table
    assert "BM25" not in table  # not run, not shown


def test_eval_section_is_split_off_and_checked(tmp_path: Path) -> None:
    cfg_file = tmp_path / "e.yaml"
    cfg_file.write_text("model: {d: 16, heads: 2}\neval: {seeds: 4, langs: [zh]}\n")
    project, ev = load_eval_config(cfg_file)
    assert (project.model.d, ev.seeds, ev.langs) == (16, 4, ["zh"])
    cfg_file.write_text("eval: {seedz: 4}\n")
    with pytest.raises(ConfigError, match=r"e.yaml: eval.seedz: unknown key"):
        load_eval_config(cfg_file)
    cfg_file.write_text("eval: {ks: [50, 100], focus_k: 10}\n")
    with pytest.raises(ConfigError, match=r"focus_k \(10\) must be one of ks"):
        load_eval_config(cfg_file)


@pytest.fixture
def own_ray() -> object:
    """`mgdspr eval` starts a local Ray in this process and leaves it running (as a CLI may); stop it after the
    test, so that later modules start their own Ray with their own settings."""
    import ray

    running = ray.is_initialized()
    yield
    if not running and ray.is_initialized():
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.usefixtures("own_ray")
def test_report_command_end_to_end(tmp_path: Path) -> None:
    """`mgdspr eval --quick` on a tiny simulated world: Ray tasks, every variant, tables, plots, JSON."""
    app = typer.Typer()
    app.command("eval")(eval_command)
    app.command("other")(lambda: None)  # two commands: typer keeps the subcommand name
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["eval", "--quick", "--lang", "en", "--seeds", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    md = (out / "report.md").read_text()
    raw = json.loads((out / "report.json").read_text())
    assert "SYNTHETIC" in md and md.count("**SYNTHETIC data** —") >= 3  # main table, sweeps, ANN: each labelled
    for label in ("BM25 (titles)", "MiniLM zero-shot", "DNN two-tower + hinge", "MGDSPR (full)", "-mgs", "-trm",
                  "τ = 1", "no I_mix", "no personalisation", "oracle: user-aware propensity × exposure",
                  "oracle: user-agnostic propensity × exposure", "oracle: ground-truth grade only"):
        assert f"| {label} |" in md
    assert "**Personalisation headroom**" in md and "of the headroom" in md
    # the click-noise sweep: the main world is level 1, the other level its own world with the three variants
    assert "## Click noise and the paper's relevance claims" in md and "| 300 |" in md
    noisy = {(r["variant"], r["seed"]) for r in raw["records"] if r["lang"] == "en-noise300"}
    assert {("mgdspr", 1), ("tau1", 1), ("no_imix", 1), ("bm25", 0), ("oracle_aware", 0)} <= noisy
    assert any(f["lang"] == "en-noise300" for f in raw["findings"])
    assert raw["noise"][1]["irrelevant_click_share"] > raw["noise"][0]["irrelevant_click_share"]
    assert {f["status"] for f in raw["findings"]} <= {"matched", "matched (within seed noise)", "partly matched",
                                                      "not matched"}
    assert {p.name for p in out.glob("*.png")} == {"convergence-en.png", "sweeps-en.png"}
    runs = [(r["variant"], r["seed"]) for r in raw["records"]]
    assert ("mgdspr", 1) in runs and ("mgdspr_hinge", 1) in runs and ("alpha=0.8-1", 0) in runs
    assert ("bm25", 1) not in runs  # deterministic baselines run once

    again = CliRunner().invoke(app, ["eval", "--from-json", str(out / "report.json"), "--out", str(tmp_path / "re")])
    assert again.exit_code == 0, again.output
    assert (tmp_path / "re" / "report.md").read_text() == md
