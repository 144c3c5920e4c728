"""The evaluation report: aggregation over seeds, the paper's findings checked, Markdown tables, PNG plots, JSON.

Every table carries the label of its data (SYNTHETIC, with the world's scale); numbers are mean ± sample
standard deviation over seeds (BM25 and MiniLM are deterministic: one run). ``demo_table`` is the short table
the README's demo prints (demo model vs BM25 on the demo world).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ray_mgdspr.data.world import SYNTHETIC_LABEL
from ray_mgdspr.eval.runs import LABELS

Summary = dict[tuple[str, str], dict[str, Any]]


def aggregate(records: list[dict[str, Any]]) -> Summary:
    """(lang, variant) -> {"n", "seeds", "mean": {metric: m}, "std": {metric: s}, "curve": mean curve}."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[r["lang"], r["variant"]].append(r)
    out: Summary = {}
    for key, runs in groups.items():
        metrics = sorted({m for r in runs for m in r["metrics"]})
        values = {m: np.array([r["metrics"][m] for r in runs], float) for m in metrics}
        out[key] = {
            "n": len(runs), "seeds": sorted(r["seed"] for r in runs),
            "mean": {m: float(v.mean()) for m, v in values.items()},
            "std": {m: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for m, v in values.items()},
            "curve": _mean_curve([r["curve"] for r in runs if r.get("curve")]),
            "ann": _mean_ann([r["ann"] for r in runs if r.get("ann")]),
        }
    return out


def _mean_curve(curves: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    if not curves:
        return []
    n = min(len(c) for c in curves)
    out = []
    for i in range(n):
        point = {"step": curves[0][i]["step"]}
        for key in curves[0][i]:
            if key != "step":
                v = np.array([c[i][key] for c in curves], float)
                point[key], point[f"{key}_std"] = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
        out.append(point)
    return out


def _mean_ann(per_run: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    if not per_run:
        return []
    out = []
    for i, row in enumerate(per_run[0]):
        merged = {k: v for k, v in row.items() if not isinstance(v, float)}
        for k, v in row.items():
            if isinstance(v, float):
                merged[k] = float(np.mean([r[i][k] for r in per_run]))
        out.append(merged)
    return out


# --------------------------------------------------------------------------------------------------
# findings


@dataclass
class Finding:
    """One claim of the paper, checked on one world."""

    claim: str
    paper: str
    lang: str
    status: str  # matched | partly matched | not matched | not run
    measured: str


@dataclass
class _Cmp:
    """mean of a minus mean of b, and whether the gap exceeds twice its standard error over seeds."""

    a: float
    b: float
    sa: float
    sb: float
    na: int
    nb: int

    @property
    def diff(self) -> float:
        return self.a - self.b

    @property
    def clear(self) -> bool:
        se = math.sqrt(self.sa**2 / self.na + self.sb**2 / self.nb)
        return abs(self.diff) > 2 * se

    def text(self, metric: str) -> str:
        rel = f", {self.diff / self.b:+.1%}" if self.b else ""
        noise = "" if self.clear else ", within seed noise"
        return f"{metric} {self.a:.3f} vs {self.b:.3f} ({self.diff:+.3f}{rel}{noise})"


def _cmp(summary: Summary, lang: str, a: str, b: str, metric: str) -> _Cmp | None:
    if (lang, a) not in summary or (lang, b) not in summary:
        return None
    x, y = summary[lang, a], summary[lang, b]
    return _Cmp(x["mean"][metric], y["mean"][metric], x["std"][metric], y["std"][metric], x["n"], y["n"])


def findings(summary: Summary, lang: str, ks: list[int], focus_k: int, curves: bool = True) -> list[Finding]:
    """The paper's findings (spec §6.3) checked on world ``lang`` (``curves``: also convergence and sweeps)."""
    rk, pg = f"recall@{max(ks)}", f"p_good@{focus_k}"
    out = [_both_up(summary, lang, "mgdspr", "dnn_hinge", rk, pg, "MGDSPR beats the DNN + hinge baseline on "
                    "Recall@K and P_good", "Recall@1000 +2.5 %, P_good +13.3 % (vs α-DNN)")]
    for part, name in (("mgs", "no_mgs"), ("trm", "no_trm")):
        out.append(_both_up(summary, lang, "mgdspr", name, rk, pg, f"{part} raises both recall and relevance",
                            "Recall and P_good both up"))
    for part, name, paper in (("τ = 2 (vs τ = 1)", "tau1", "Recall slightly down, P_good up a lot"),
                              ("I_mix", "no_imix", "Recall slightly down, P_good up a lot")):
        out.append(_trade(summary, lang, name, rk, pg, f"{part} trades a little recall for much more relevance", paper))
    if curves:
        out += [_convergence(summary, lang, rk), _sweep(summary, lang, "tau", rk, pg),
                _sweep(summary, lang, "alpha", rk, pg)]
    return out


def _status(directions: list[bool], clear: list[bool]) -> str:
    """matched (every stated direction holds), partly matched (some do), not matched (none); a match whose gaps
    are not all beyond seed noise says so."""
    if all(directions):
        return "matched" if all(clear) else "matched (within seed noise)"
    return "partly matched" if any(directions) else "not matched"


def _both_up(summary: Summary, lang: str, a: str, b: str, rk: str, pg: str, claim: str, paper: str) -> Finding:
    r, p = _cmp(summary, lang, a, b, rk), _cmp(summary, lang, a, b, pg)
    if r is None or p is None:
        return Finding(claim, paper, lang, "not run", f"{a} or {b} not run")
    status = _status([r.diff > 0, p.diff > 0], [r.clear, p.clear])
    return Finding(claim, paper, lang, status, f"{LABELS[a]} vs {LABELS[b]}: {r.text(rk)}; {p.text(pg)}")


def _trade(summary: Summary, lang: str, ablated: str, rk: str, pg: str, claim: str, paper: str) -> Finding:
    r, p = _cmp(summary, lang, "mgdspr", ablated, rk), _cmp(summary, lang, "mgdspr", ablated, pg)
    if r is None or p is None:
        return Finding(claim, paper, lang, "not run", f"mgdspr or {ablated} not run")
    # "much more relevance" is the claim's core; "a little recall" holds when recall falls less than P_good rises
    small_cost = r.diff >= 0 or abs(r.diff / max(r.b, 1e-9)) < abs(p.diff / max(p.b, 1e-9))
    # the claim's core is the relevance gain: without it nothing of the claim holds
    status = _status([True, small_cost], [p.clear]) if p.diff > 0 else "not matched"
    return Finding(claim, paper, lang, status, f"full vs {LABELS[ablated]}: {r.text(rk)}; {p.text(pg)}")


def _convergence(summary: Summary, lang: str, rk: str) -> Finding:
    claim, paper = "Softmax loss converges faster and higher than hinge loss", "faster, clearly higher Recall@1000"
    soft, hinge = summary.get((lang, "mgdspr"), {}).get("curve"), summary.get((lang, "mgdspr_hinge"), {}).get("curve")
    if not soft or not hinge:
        return Finding(claim, paper, lang, "not run", "mgdspr or mgdspr_hinge curve missing")
    n = min(len(soft), len(hinge))
    s, h = np.array([p[rk] for p in soft[:n]]), np.array([p[rk] for p in hinge[:n]])
    first, final = s[0] - h[0], s[-1] - h[-1]
    half = max(1, n // 2)
    early = s[:half].mean() - h[:half].mean()
    faster, higher = early > 0, final > 0
    status = "matched" if faster and higher else "partly matched" if faster or higher else "not matched"
    return Finding(claim, paper, lang, status,
                   f"MGDSPR softmax vs hinge, {rk}: at step {soft[0]['step']} {s[0]:.3f} vs {h[0]:.3f} ({first:+.3f}); "
                   f"mean over the first half of training {early:+.3f}; at step {soft[n - 1]['step']} "
                   f"{s[-1]:.3f} vs {h[-1]:.3f} ({final:+.3f})")


def sweep_points(summary: Summary, lang: str, which: str) -> list[tuple[float, str, str]]:
    """(x, variant, label) of a sweep, in x order: τ values, or α-range midpoints."""
    points = []
    for (lg, v), _ in summary.items():
        if lg != lang:
            continue
        if which == "tau" and v.startswith("tau="):
            points.append((float(v[4:]), v, f"τ={v[4:]}"))
        if which == "alpha" and v.startswith("alpha="):
            a, b = (float(x) for x in v[6:].split("-"))
            points.append(((a + b) / 2, v, f"[{a:g},{b:g}]"))
    base = summary.get((lang, "mgdspr"), {})
    if base:
        cfg = base.get("config", {})
        if which == "tau" and "tau" in cfg:
            points.append((cfg["tau"], "mgdspr", f"τ={cfg['tau']:g} (full)"))
        if which == "alpha" and "alpha" in cfg:
            a, b = cfg["alpha"]
            points.append(((a + b) / 2, "mgdspr", f"[{a:g},{b:g}] (full)"))
    if which == "tau" and (lang, "tau1") in summary:
        points.append((1.0, "tau1", "τ=1"))
    return sorted(set(points))


def _sweep(summary: Summary, lang: str, which: str, rk: str, pg: str) -> Finding:
    name = "τ" if which == "tau" else "the α range [a, b]"
    claim = f"Raising {name} trades recall for P_good (a monotone trade-off curve)"
    paper = "raising τ / moving [a, b] toward 1: Recall down, P_good up; τ = 2, [0.4, 0.6] the compromise"
    pts = sweep_points(summary, lang, which)
    if len(pts) < 3:
        return Finding(claim, paper, lang, "not run", f"{len(pts)} sweep points")
    xs = np.array([p[0] for p in pts])
    rec = np.array([summary[lang, p[1]]["mean"][rk] for p in pts])
    good = np.array([summary[lang, p[1]]["mean"][pg] for p in pts])
    rho_r, rho_p = _spearman(xs, rec), _spearman(xs, good)
    status = ("matched" if rho_r < 0 and rho_p > 0 else "partly matched" if rho_r < 0 or rho_p > 0
              else "not matched")
    cells = ", ".join(f"{p[2]}: {r:.3f}/{g:.3f}" for p, r, g in zip(pts, rec, good, strict=True))
    return Finding(claim, paper, lang, status, f"Spearman ρ(x, {rk}) = {rho_r:+.2f}, ρ(x, {pg}) = {rho_p:+.2f}; "
                                               f"{rk}/{pg} per point: {cells}")


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    if rx.std() == 0 or ry.std() == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


# --------------------------------------------------------------------------------------------------
# Markdown


def scale_label(lang: str, scale: dict[str, int], synthetic: bool = True) -> str:
    """The caption every table carries: what data, how big."""
    what = SYNTHETIC_LABEL if synthetic else "real data"
    return (f"**{'SYNTHETIC' if synthetic else 'REAL'} data** — {what}, world `{lang}`: {scale['items']:,} items, "
            f"{scale['users']:,} users, {scale['search_events']:,} search events, {scale['behaviours']:,} "
            f"behaviours; metrics over {scale['eval_searches']:,} held-out test-day searches.")


def _cell(entry: dict[str, Any], metric: str, digits: int = 3) -> str:
    if metric not in entry["mean"]:
        return "–"
    m, s = entry["mean"][metric], entry["std"][metric]
    return f"{m:.{digits}f} ± {s:.{digits}f}" if entry["n"] > 1 else f"{m:.{digits}f}"


def _took(seconds: float, reused: int) -> str:
    took = f" in {seconds / 60:.1f} min" if seconds else ""
    if reused:
        took += (f" (that invocation reused {reused} finished runs of the same spec, world and inputs from the "
                 "work directory's journal, `runs.jsonl`; its time excludes them)")
    return took


def main_table(summary: Summary, lang: str, variants: list[str], ks: list[int], focus_k: int) -> str:
    cols = [f"recall@{k}" for k in ks] + [f"p_good@{focus_k}", f"p_exact@{focus_k}", f"pass@{focus_k}"]
    head = ([f"Recall@{k}" for k in ks] + [f"P_good@{focus_k}", f"P_exact@{focus_k}",
                                           f"passes filter (of {focus_k})"])
    lines = ["| variant | " + " | ".join(head) + " | runs |", "|---|" + "---:|" * (len(cols) + 1)]
    for v in variants:
        if (lang, v) in summary:
            e = summary[lang, v]
            cells = [_cell(e, c, 1 if c.startswith("pass@") else 3) for c in cols]
            lines.append(f"| {LABELS.get(v, v)} | " + " | ".join(cells) + f" | {e['n']} |")
    return "\n".join(lines)


def personalisation_headroom(metric: dict[str, dict[str, float]], k: int) -> dict[str, float] | None:
    """The world's personalisation headroom at K (user-aware minus user-agnostic oracle Recall@K) and the model's
    share of it ((full - no personalisation) / headroom), from mean metrics per variant; None without the rows."""
    key = f"recall@{k}"
    if not {"oracle_aware", "oracle_agnostic"} <= metric.keys():
        return None
    out = {"headroom": metric["oracle_aware"][key] - metric["oracle_agnostic"][key]}
    if {"mgdspr", "no_personalise"} <= metric.keys():
        out["captured"] = metric["mgdspr"][key] - metric["no_personalise"][key]
        out["share"] = out["captured"] / out["headroom"] if out["headroom"] > 0 else float("nan")
    if "mgdspr" in metric:
        out["below_aware"] = metric["oracle_aware"][key] - metric["mgdspr"][key]
    return out


def headroom_line(summary: Summary, lang: str, k: int) -> str:
    means = {v: e["mean"] for (lg, v), e in summary.items() if lg == lang}
    h = personalisation_headroom(means, k)
    if h is None:
        return ""
    text = (f"**Personalisation headroom** (Recall@{k}, user-aware − user-agnostic oracle): {h['headroom']:+.3f}; "
            "what knowing the user can add at all in this world.")
    if "captured" in h:
        text += (f" MGDSPR captures {h['captured']:+.3f} of it (full − no personalisation), "
                 f"{h['share']:.0%} of the headroom.")
    if "below_aware" in h:
        text += f" Full MGDSPR is {h['below_aware']:.3f} Recall@{k} below the user-aware oracle."
    return text


def sweep_table(summary: Summary, lang: str, which: str, ks: list[int], focus_k: int) -> str:
    rk, pg = f"recall@{max(ks)}", f"p_good@{focus_k}"
    lines = [f"| {'τ' if which == 'tau' else '[a, b]'} | Recall@{max(ks)} | Recall@{min(ks)} | P_good@{focus_k} "
             f"| runs |", "|---|---:|---:|---:|---:|"]
    for _, v, label in sweep_points(summary, lang, which):
        e = summary[lang, v]
        lines.append(f"| {label} | {_cell(e, rk)} | {_cell(e, f'recall@{min(ks)}')} | {_cell(e, pg)} | {e['n']} |")
    return "\n".join(lines)


def ann_table(summary: Summary, lang: str, ks: list[int]) -> str:
    rows = summary.get((lang, "mgdspr"), {}).get("ann", [])
    lines = ["| index (shards) | " + " | ".join(f"Recall@{k} lost" for k in ks) + " | "
             + " | ".join(f"top-{k} overlap" for k in ks) + " |", "|---|" + "---:|" * (2 * len(ks))]
    for r in rows:
        lost = " | ".join(f"{r[f'recall_lost@{k}']:+.4f}" for k in ks)
        overlap = " | ".join(f"{r[f'overlap@{k}']:.3f}" for k in ks)
        params = f"nprobe {r['nprobe']}" if "IVF" in r["factory"] else f"efSearch {r['ef_search']}" \
            if "HNSW" in r["factory"] else "exact"
        lines.append(f"| `{r['factory']}` ({r['shards']}; {params}) | {lost} | {overlap} |")
    return "\n".join(lines)


def noise_findings(summary: Summary, key: str, ks: list[int], focus_k: int) -> list[Finding]:
    """The two relevance claims (τ and I_mix trade a little recall for much more relevance) on one click-noise world."""
    rk, pg = f"recall@{max(ks)}", f"p_good@{focus_k}"
    return [_trade(summary, key, name, rk, pg, f"{part} trades a little recall for much more relevance",
                   "Recall slightly down, P_good up a lot")
            for part, name in (("τ = 2 (vs τ = 1)", "tau1"), ("I_mix", "no_imix"))]


def noise_section(report: dict[str, Any], summary: Summary, ks: list[int], focus_k: int) -> list[str]:
    """The paper's relevance claims as a function of click noise: one row per click-noise world."""
    rk, pg = f"recall@{max(ks)}", f"p_good@{focus_k}"
    variants = [v for v in ("mgdspr", "tau1", "no_imix") if v in report["eval"]["noise_variants"]]
    head = [f"{LABELS[v]} {m}" for m in (f"Recall@{max(ks)}", f"P_good@{focus_k}") for v in variants]
    lines = ["| click_noise | clicks on irrelevant items | " + " | ".join(head) + " | τ and I_mix |",
             "|---:|---:|" + "---:|" * len(head) + "---|"]
    for row in report["noise"]:
        key = row["world"]
        cells = [_cell(summary[key, v], m) if (key, v) in summary else "not run" for m in (rk, pg) for v in variants]
        verdict = "; ".join(f"{f.claim.split(' trades')[0]}: **{f.status}**"
                            for f in noise_findings(summary, key, ks, focus_k))
        lines.append(f"| {row['click_noise']:g} | {row['irrelevant_click_share']:.1%} | " + " | ".join(cells)
                     + f" | {verdict} |")
    lang = report["eval"]["noise_lang"]
    return [f"## Click noise and the paper's relevance claims: world `{lang}`", "",
            f"SYNTHETIC: the `{lang}` world simulated again at each `simulate.choice.click_noise` level (same seed, "
            "same catalogue and users; only the odds of a click on an irrelevant item change). Mean ± std over "
            f"{report['eval']['seeds']} seeds per trained variant. The paper's claim: τ = 2 and I_mix trade a little "
            "recall for much more relevance (status rule as for the findings below; rows per level are in the "
            "findings table under the world's name).", "", "\n".join(lines), ""]


def findings_table(found: list[Finding]) -> str:
    lines = ["| paper finding | paper | world | status | measured |", "|---|---|---|---|---|"]
    for f in found:
        lines.append(f"| {f.claim} | {f.paper} | {f.lang} | **{f.status}** | {f.measured} |")
    return "\n".join(lines)


def render(report: dict[str, Any], summary: Summary) -> str:
    """The Markdown of a report (``report["plots"]`` names the PNGs beside it)."""
    ev, worlds = report["eval"], report["worlds"]
    ks, focus_k = sorted(ev["ks"]), ev["focus_k"]
    md = [
        "# MGDSPR evaluation: baselines, ablations, the paper's findings",
        "",
        *([f"> **PARTIAL REPORT: {report['runs']} of {report['planned']} planned runs finished.** Missing runs "
           "leave rows, seeds or findings out (a finding without its runs says *not run*); rerun the same command "
           "to finish (finished runs are reused from the work directory's journal).", ""]
          if report.get("planned", report["runs"]) > report["runs"] else []),
        f"> **All numbers below come from SYNTHETIC data** ({SYNTHETIC_LABEL}). They check the paper's claims "
        "on a simulated world built to carry the signals each component exists for; they are not Taobao numbers.",
        "",
        f"Produced by `{report['command']}`{_took(report['seconds'], report.get('reused', 0))} "
        f"({report['runs']} runs as Ray "
        f"tasks of {ev['task_cpus']:g} CPU on {report['machine']}). Trained runs: {ev['steps']:,} steps of batch "
        f"{report['config']['train']['batch_size']} (`train.loop.fit_local`), model d = "
        f"{report['config']['model']['d']}; seeds {ev['seeds']} (sweeps {ev['sweep_seeds']}). Recall@K is an "
        "exact search over the whole catalogue; P_good@K is the share of the top-K of the intended leaf category "
        "(simulator ground truth, grade ≥ 1), P_exact@K the share that also has the brand and every attribute "
        "value the query states (grade 2); *passes filter* is the mean number of the top-K the relevance filter "
        "(query key terms, boolean match) keeps: the offline stand-in for Num_prank. Mean ± sample std over "
        "seeds; BM25 and MiniLM are deterministic (one run). Raw numbers: `report.json`.",
        "",
    ]
    main_worlds = {lang: w for lang, w in worlds.items() if "noise_of" not in w}
    for lang, w in main_worlds.items():
        scale = w["scale"]
        md += [f"## Main table: world `{lang}`", "", scale_label(lang, scale),
               f"K = {max(ks)} is {max(ks) / scale['items']:.0%} of this catalogue (the paper: 1,000 of ~100M).", "",
               main_table(summary, lang, ev["variants"], ks, focus_k), ""]
        if (line := headroom_line(summary, lang, min(ks))):
            md += [line, ""]
        if lang == "zh":
            md += ["MiniLM (all-MiniLM-L6-v2) was trained on English text; on the zh world it is out of its "
                   "language, which is why it is listed but not a fair baseline there.", ""]
    md += ["## The paper's findings", "", findings_table(report["findings_objects"]), "",
           "Status rule: *matched* when every direction the paper states holds in the means over seeds and each "
           "gap exceeds twice its standard error; *matched (within seed noise)* when the directions hold but a "
           "gap does not; *partly matched* when some directions hold; *not matched* when none does. \"A little "
           "recall\" holds when recall falls by a smaller relative amount than P_good rises. Sweeps: Spearman "
           "rank correlation of the swept value with Recall and with P_good (1 seed per point unless stated).",
           ""]
    if report.get("noise"):
        md += noise_section(report, summary, ks, focus_k)
    for lang in main_worlds:
        if lang not in ev["sweep_langs"]:
            continue
        scale = worlds[lang]["scale"]
        md += [f"## Curves and sweeps: world `{lang}`", "", scale_label(lang, scale), ""]
        if f"convergence-{lang}.png" in report["plots"]:
            md += [f"![convergence]({f'convergence-{lang}.png'})", ""]
        md += [f"τ sweep (full model otherwise; {ev['sweep_seeds']} seed(s) per point):", "",
               sweep_table(summary, lang, "tau", ks, focus_k), "",
               "α-range sweep:", "", sweep_table(summary, lang, "alpha", ks, focus_k), ""]
        if f"sweeps-{lang}.png" in report["plots"]:
            md += [f"![sweeps]({f'sweeps-{lang}.png'})", ""]
    for lang, w in main_worlds.items():
        if summary.get((lang, "mgdspr"), {}).get("ann"):
            md += [f"## Recall lost by the ANN index: world `{lang}`", "", scale_label(lang, w["scale"]),
                   "Full MGDSPR, its vectors built into real index versions (`index.shards`, searched with "
                   "`IndexReader`) and compared with the exact search (mean over seeds); negative = the index found "
                   "more targets by chance.", "", ann_table(summary, lang, ks), ""]
    return "\n".join(md)


# --------------------------------------------------------------------------------------------------
# plots


def plot_convergence(summary: Summary, lang: str, ks: list[int], path: Path) -> bool:
    """Recall@K per step: MGDSPR softmax vs hinge (and the DNN + hinge), mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [(v, summary.get((lang, v), {}).get("curve")) for v in ("mgdspr", "mgdspr_hinge", "dnn_hinge")]
    series = [(v, c) for v, c in series if c]
    if not series:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, k in zip(axes, (max(ks), min(ks)), strict=True):
        for v, curve in series:
            steps = np.array([p["step"] for p in curve])
            m, s = np.array([p[f"recall@{k}"] for p in curve]), np.array([p[f"recall@{k}_std"] for p in curve])
            ax.plot(steps, m, marker="o", label=LABELS[v])
            ax.fill_between(steps, m - s, m + s, alpha=0.2)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"Recall@{k} (exact search)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"Convergence, softmax vs hinge loss — SYNTHETIC data, world {lang}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_sweeps(summary: Summary, lang: str, ks: list[int], focus_k: int, path: Path) -> bool:
    """Recall@K against P_good@K along the τ sweep and the α-range sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rk, pg = f"recall@{max(ks)}", f"p_good@{focus_k}"
    sweeps = [(w, sweep_points(summary, lang, w)) for w in ("tau", "alpha")]
    if not any(len(p) >= 2 for _, p in sweeps):
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (which, pts) in zip(axes, sweeps, strict=True):
        if not pts:
            ax.set_visible(False)
            continue
        xs = [summary[lang, v]["mean"][pg] for _, v, _ in pts]
        ys = [summary[lang, v]["mean"][rk] for _, v, _ in pts]
        ax.plot(xs, ys, marker="o")
        for x, y, (_, _, label) in zip(xs, ys, pts, strict=True):
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(f"P_good@{focus_k}")
        ax.set_ylabel(f"Recall@{max(ks)}")
        ax.set_title("τ sweep" if which == "tau" else "α-range sweep")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Recall vs relevance trade-off — SYNTHETIC data, world {lang}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(out: Path, report: dict[str, Any], records: list[dict[str, Any]]) -> Path:
    """Write ``report.md``, ``report.json`` and the PNGs into ``out``; returns the Markdown's path."""
    out.mkdir(parents=True, exist_ok=True)
    summary = aggregate(records)
    for (_, v), entry in summary.items():
        if v == "mgdspr":
            entry["config"] = {"tau": report["config"]["loss"]["tau"],
                               "alpha": [report["config"]["loss"]["alpha_low"], report["config"]["loss"]["alpha_high"]]}
    ev = report["eval"]
    ks = sorted(ev["ks"])
    main_worlds = [lang for lang, w in report["worlds"].items() if "noise_of" not in w]
    found = [f for lang in main_worlds
             for f in findings(summary, lang, ks, ev["focus_k"], curves=lang in ev["sweep_langs"])]
    found += [f for row in report.get("noise", []) if row["world"] not in main_worlds
              for f in noise_findings(summary, row["world"], ks, ev["focus_k"])]
    plots = []
    for lang in main_worlds:
        if plot_convergence(summary, lang, ks, out / f"convergence-{lang}.png"):
            plots.append(f"convergence-{lang}.png")
        if plot_sweeps(summary, lang, ks, ev["focus_k"], out / f"sweeps-{lang}.png"):
            plots.append(f"sweeps-{lang}.png")
    report = {**report, "plots": plots, "runs": len(records), "findings_objects": found,
              "reused": sum(bool(r.get("reused")) for r in records)}
    (out / "report.md").write_text(render(report, summary) + "\n")
    raw = {k: v for k, v in report.items() if k != "findings_objects"}
    raw["findings"] = [f.__dict__ for f in found]
    raw["summary"] = [{"lang": lang, "variant": v, **e} for (lang, v), e in sorted(summary.items())]
    raw["records"] = records
    (out / "report.json").write_text(json.dumps(raw, indent=1, ensure_ascii=False, default=str) + "\n")
    return out / "report.md"


# --------------------------------------------------------------------------------------------------
# the README demo


def demo_table(world: Path, bundle: Path, index_path: Path, k: int = 50, max_events: int = 500) -> str:
    """A short Markdown table of the demo model (answered from the served index, and by exact search) against
    BM25 on the held-out searches of ``world``: Recall@K, P_good@K, P_exact@K and the relevance-filter pass count.

    Args:
        world: the (simulated) world the model was trained on.
        bundle: the model bundle.
        index_path: an index version directory built from the bundle (``<index root>/<version>``).
        k: the cut-off; max_events: held-out searches scored (a seeded sample).
    """
    from ray_mgdspr.data.simulator.oracle import ORACLES, Oracle
    from ray_mgdspr.eval.baselines import bm25_topk
    from ray_mgdspr.eval.evalset import EvalSet
    from ray_mgdspr.eval.runs import ORACLE_LABELS, retrieve_exact
    from ray_mgdspr.index.search import IndexReader
    from ray_mgdspr.model.bundle import load_bundle
    from ray_mgdspr.model.retrieval import query_vectors

    model, vocab, manifest = load_bundle(bundle)
    data = EvalSet.load(world, vocab, manifest.features, max_events)
    k = min(k, len(data.catalogue))
    served = IndexReader(index_path, "faiss-cpu").search(query_vectors(model, data.features).numpy(), k)[1]
    oracle = Oracle.from_world(world)
    rows = [(ORACLE_LABELS[m], oracle.topk(data.events, m, k)) for m in ORACLES]
    rows += [(f"{manifest.model.kind.upper()} demo model, served index", served),
             (f"{manifest.model.kind.upper()} demo model, exact search", retrieve_exact(model, data, k)[0]),
             ("BM25 over titles", bm25_topk(data.items["item_id"].to_numpy(), data.items["title_words"],
                                            data.query_words, k))]
    lines = [scale_label(data.manifest.lang, data.scale(), data.manifest.synthetic), "",
             f"| retrieval | Recall@{k} | P_good@{k} | P_exact@{k} | passes filter (of {k}) |",
             "|---|---:|---:|---:|---:|"]
    for name, topk in rows:
        m = data.score(topk, [k], [k])
        lines.append(f"| {name} | {m[f'recall@{k}']:.3f} | {m[f'p_good@{k}']:.3f} | {m[f'p_exact@{k}']:.3f} "
                     f"| {m[f'pass@{k}']:.1f} |")
    return "\n".join(lines)


REPORT_KEYS = ("command", "seconds", "label", "machine", "config", "eval", "worlds")
OPTIONAL_KEYS = ("noise",)


def rerender(report_json: Path, out: Path) -> Path:
    """Write the report again from the runs recorded in an earlier ``report.json`` (no training, no search), or a
    partial report from the ``report-meta.json`` and the journal ``runs.jsonl`` of a work directory."""
    raw = json.loads(Path(report_json).read_text())
    missing = [k for k in REPORT_KEYS if k not in raw]
    if missing:
        raise ValueError(f"{report_json}: not a report.json or report-meta.json of mgdspr eval (missing {missing})")
    records = raw.get("records")
    if records is None:
        journal = Path(report_json).with_name("runs.jsonl")
        if not journal.is_file():
            raise FileNotFoundError(f"{journal}: no journal of finished runs beside {report_json}")
        records = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
    meta = {k: raw[k] for k in (*REPORT_KEYS, *OPTIONAL_KEYS, "planned") if k in raw}
    return write_report(Path(out), meta, records)
