"""Write a simulated world: catalogue, users, and day files of behaviours, searches and queries.

The world streams to disk day by day and, within a day, chunk of users by chunk of users
(``users_per_chunk``), so memory is bounded by the catalogue plus one chunk, whatever the number of
days or users. It is written into a temporary directory and renamed into place when complete.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ray_mgdspr.config import SimulateConfig
from ray_mgdspr.data import schema
from ray_mgdspr.data.simulator.activity import DaySimulator
from ray_mgdspr.data.simulator.catalogue import Catalogue
from ray_mgdspr.data.simulator.lexicon import load_lexicon
from ray_mgdspr.data.simulator.users import Users
from ray_mgdspr.data.world import SYNTHETIC_LABEL, WorldManifest, WorldWriter

log = logging.getLogger(__name__)

ITEM_CHUNK_ROWS = 100_000
Progress = Callable[[str, int, int], None]
"""Called as ``progress(what, done, total)`` while the world is written."""


def simulation_days(cfg: SimulateConfig) -> tuple[list[int], list[int], list[int]]:
    """(history, train, test) day numbers: warm-up days <= 0, then train, then test."""
    history = list(range(1 - cfg.warmup_days, 1))
    train = list(range(1, cfg.train_days + 1))
    test = list(range(cfg.train_days + 1, cfg.train_days + cfg.test_days + 1))
    return history, train, test


def simulate(cfg: SimulateConfig, out: str | Path, overwrite: bool = False,
             progress: Progress | None = None) -> WorldManifest:
    """Simulate a world described by ``cfg`` into directory ``out`` and return its manifest."""
    history, train, test = simulation_days(cfg)
    days = history + train + test
    lex = load_lexicon(cfg.lang)
    cat = Catalogue.build(cfg, lex)
    users = Users.build(cfg, cat)
    sim = DaySimulator(cfg, cat, users)
    chunks = [np.arange(lo, min(lo + cfg.users_per_chunk, cfg.n_users)) for lo in range(0, cfg.n_users,
                                                                                          cfg.users_per_chunk)]
    manifest = WorldManifest(synthetic=True, source="ray_mgdspr simulator", lang=cfg.lang, seed=cfg.seed,
                             base_date=cfg.base_date, history_days=history, train_days=train, test_days=test,
                             config=cfg.model_dump(mode="json"), notes=SYNTHETIC_LABEL)
    stats: Counter = Counter()
    with WorldWriter(out, overwrite=overwrite) as w:
        for spec, table in ((schema.CATEGORIES, cat.category_table()), (schema.ATTRIBUTES, cat.attribute_table()),
                            (schema.BRANDS, cat.brand_table()), (schema.SHOPS, cat.shop_table())):
            w.write(spec, table)
        with w.day_writer(schema.ITEMS) as dw:
            for i, chunk in enumerate(cat.item_tables(ITEM_CHUNK_ROWS, cfg.title_synonym_rate)):
                dw.write(chunk)
                _tell(progress, "catalogue", min((i + 1) * ITEM_CHUNK_ROWS, cat.n_items), cat.n_items)
        rng = np.random.default_rng([cfg.seed, 5])
        for d, day in enumerate(days):
            users.advance_day(cfg, cat, day, rng)
            day_start = int(manifest.day_start(day).timestamp())
            with (w.day_writer(schema.BEHAVIOURS, day) as beh, w.day_writer(schema.QUERY_HISTORY, day) as qh,
                  w.day_writer(schema.SEARCH_EVENTS, day) if day >= 1 else _NoWriter() as ev):
                for c, who in enumerate(chunks):
                    result = sim.run(day, c, who, day_start, id_base=(d * len(chunks) + c) << 32)
                    beh.write(result.behaviours)
                    qh.write(result.query_history)
                    ev.write(result.search_events)
                    stats.update(result.stats)
            _tell(progress, "days", d + 1, len(days))
        w.write(schema.USERS, users.table())  # the state of the last simulated day: the test day's ground truth
        manifest.stats = summarise(stats)
        w.commit(manifest)
    return manifest


def summarise(c: Counter) -> dict[str, float]:
    """Counts plus the rates that show the signals: click-through by relevance grade, click noise, ..."""
    def ratio(a: float, b: float) -> float:
        return round(a / b, 4) if b else 0.0

    out: dict[str, float] = {k: int(v) for k, v in sorted(c.items())}
    for g in (0, 1, 2):
        out[f"ctr_grade{g}"] = ratio(c[f"clicks_grade{g}"], c[f"impressions_grade{g}"])
    out["irrelevant_click_share"] = ratio(c["clicks_grade0"], c["clicks"])
    out["buy_per_click"] = ratio(c["buys"], c["clicks"])
    out["followup_share"] = ratio(c["followups"], c["searches"])
    out["typo_word_share"] = ratio(c["typo_words"], c["query_words"])
    out["truncated_word_share"] = ratio(c["truncated_words"], c["query_words"])
    return out


def _tell(progress: Progress | None, what: str, done: int, total: int) -> None:
    if progress is not None:
        progress(what, done, total)
    else:
        log.debug("%s %d/%d", what, done, total)


class _NoWriter:
    """Stands in for the search-event writer on warm-up days, which log no search events."""

    def __enter__(self) -> _NoWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def write(self, table: object) -> None:
        pass
