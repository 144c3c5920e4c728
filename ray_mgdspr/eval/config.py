"""What an evaluation run measures: variants, seeds, training length, cut-offs, sweeps (``eval:`` of a config file).

The world, the featurizer, the model sizes and the optimiser come from the project config (``--config`` or
``--preset``, the ``eval`` preset by default); this section says which experiments to run on them. It is read
from the same YAML file as the project config: ``load_eval_config`` splits the ``eval:`` section off before the
project config is validated. Unknown keys and wrong types are errors naming the file and the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from ray_mgdspr.config import ConfigError, ProjectConfig, StrictModel, _format_error, load_preset, parse_config

MAIN_VARIANTS = ("oracle_aware", "oracle_agnostic", "oracle_grade", "bm25", "minilm", "dnn_hinge", "mgdspr", "no_mgs",
                 "no_trm", "tau1", "no_imix", "no_personalise", "no_popularity", "no_logq",
                 "item_ids")
"""Rows of the main table (one table: baselines, the full model, ablations)."""


class EvalConfig(StrictModel):
    """Experiments of ``mgdspr eval``. Defaults: the full report in about half an hour on a 2-core laptop."""

    langs: list[Literal["en", "zh"]] = Field(["en", "zh"], min_length=1, description="worlds to simulate and evaluate")
    seeds: int = Field(3, ge=1, description="seeds 0..n-1 per trained variant (mean and spread)")
    steps: int = Field(2000, ge=1, description="training steps per run (fit_local, batch from train.batch_size); "
                       "with the cosine schedule the eval preset's Recall@50 gains under 1 point over the last "
                       "quarter of 2,000 (docs/evaluation.md)")
    curve_every: int = Field(250, ge=1, description="steps between learning-curve points")
    ks: list[int] = Field([50, 100, 1000], min_length=1, description="K of Recall@K")
    focus_k: int = Field(50, ge=1, description="K of P_good and of the relevance-filter pass count in the tables")
    max_events: int | None = Field(2000, ge=1, description="held-out test-day searches evaluated (seeded sample)")
    variants: list[str] = Field(list(MAIN_VARIANTS), min_length=1, description="rows of the main table")
    sweep_langs: list[Literal["en", "zh"]] = Field(["en"], description="worlds that also get the curves and sweeps")
    sweep_seeds: int = Field(1, ge=1, description="seeds per sweep point")
    tau_sweep: list[float] = Field([0.5, 1.0, 2.0, 4.0, 8.0], description="τ values of the τ sweep")
    alpha_sweep: list[tuple[float, float]] = Field(
        [(0.0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 1.0)], description="[a, b] ranges of the α sweep")
    ann_factories: list[str] = Field(["HNSW32", "IVF64,Flat"],
                                     description="ANN indexes whose recall loss is measured (besides index.factory)")
    noise_levels: list[float] = Field(
        [1.0, 12.0, 300.0], description="simulate.choice.click_noise of the click-noise worlds (language "
        "noise_lang): on the eval preset 1, 12 and 300 put ~5 %, ~20 % and ~38 % of clicks on irrelevant items "
        "(docs/simulator.md); [] skips the sweep. A level equal to the project's own is its main world")
    noise_variants: list[str] = Field(["oracle_aware", "bm25", "mgdspr", "tau1", "no_imix"],
                                      description="runs per click-noise world (seeds as the main table)")
    noise_lang: Literal["en", "zh"] = Field("en", description="language of the click-noise worlds")
    task_cpus: float = Field(1.0, gt=0, description="CPUs per Ray task (one run each); fractional on a laptop")
    event_seed: int = Field(0, description="seed of the held-out event sample")

    @field_validator("variants", "noise_variants")
    @classmethod
    def _known(cls, variants: list[str]) -> list[str]:
        unknown = [v for v in variants if v not in MAIN_VARIANTS]
        if unknown:
            raise ValueError(f"unknown variants {unknown}; choose from {list(MAIN_VARIANTS)}")
        return variants

    @field_validator("alpha_sweep")
    @classmethod
    def _ranges(cls, ranges: list[tuple[float, float]]) -> list[tuple[float, float]]:
        for a, b in ranges:
            if not 0 <= a <= b <= 1:
                raise ValueError(f"alpha range [{a}, {b}] must satisfy 0 <= a <= b <= 1")
        return ranges

    @model_validator(mode="after")
    def _focus_in_ks(self) -> EvalConfig:
        if self.focus_k not in self.ks:
            raise ValueError(f"focus_k ({self.focus_k}) must be one of ks {self.ks}")
        return self


QUICK = {"seeds": 2, "steps": 20, "curve_every": 10, "ks": [10, 50, 100], "focus_k": 10, "max_events": 150,
         "tau_sweep": [1.0, 2.0, 4.0], "alpha_sweep": [(0.2, 0.4), (0.4, 0.6), (0.8, 1.0)],
         "ann_factories": ["IVF16,Flat"], "noise_levels": [1.0, 300.0]}
"""``--quick``: every code path at toy scale (tests, smoke runs); the numbers mean nothing."""


def load_eval_config(source: str | Path | None = None) -> tuple[ProjectConfig, EvalConfig]:
    """The project config and the ``eval:`` section of ``source`` (a YAML file or ``preset:NAME``).

    Default: the ``eval`` preset and the defaults of :class:`EvalConfig`. Presets hold no ``eval:`` section.
    """
    if source is None or str(source).startswith("preset:"):
        name = "eval" if source is None else str(source).removeprefix("preset:")
        return load_preset(name), EvalConfig()
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data: Any = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of stage sections, got {type(data).__name__}")
    section = data.pop("eval", None) or {}
    project = parse_config(data, str(path))
    try:
        return project, EvalConfig.model_validate(section)
    except ValidationError as e:
        raise ConfigError(_format_error(str(path), e).replace(f"{path}: ", f"{path}: eval.")) from None
