"""The held-out searches of a world and everything needed to score any retrieved list of them (Ray-free).

An :class:`EvalSet` holds a seeded sample of the test-day searches that have a click or a buy (their targets
for Recall@K), each search's logged intent (leaf, brand, stated attribute values: the simulator's ground
truth for P_good), the relevance filter (pass counts) and the whole catalogue (exact search). ``score`` turns
one (E, K) result list into every metric of the report.

Definitions (spec §6.1, §9.10):

* ``recall@K``: |top-K ∩ T| / |T| averaged over searches, T = the items the user clicked or bought.
* ``p_good@K``: share of the top-K whose ground-truth grade is >= 1 (the item is of the intended leaf
  category; ``data/simulator/relevance.py``), ``p_exact@K`` the share with grade 2 (leaf, and the brand and
  every attribute value the query states).
* ``pass@K``: mean number of the top-K that pass the relevance filter (``serve/relevance.py``, the boolean
  key-term match applied after retrieval): the offline stand-in for the paper's Num_prank.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from ray_mgdspr.arrays import sorted_lookup
from ray_mgdspr.config import FeatureConfig
from ray_mgdspr.data.features import Featurizer
from ray_mgdspr.data.simulator.relevance import RelevanceJudge
from ray_mgdspr.data.vocab import Vocabulary
from ray_mgdspr.data.world import WorldManifest, read_manifest, read_table
from ray_mgdspr.metrics import p_good_at_k, pass_count_at_k, recall_at_k
from ray_mgdspr.model.retrieval import CatalogueFeatures, targets_of
from ray_mgdspr.serve.relevance import RelevanceFilter

INTENT_COLUMNS = ["intent_leaf_id", "intent_brand_id", "intent_attr_value_ids"]


@dataclass
class EvalSet:
    """Held-out searches of one world, their ground truth, the catalogue and the relevance filter.

    Attributes:
        events: E rows of ``Featurizer.events`` (query, query_words, target_item_ids, ...) plus the intent
            columns of ``search_events``.
        features: the featurized events (the model's input), computed once.
        targets: E arrays of clicked or bought item ids.
        items: the catalogue (``item_id``, ``title``, ``title_words``) in catalogue order.
    """

    world: Path
    manifest: WorldManifest
    featurizer: Featurizer
    events: pa.Table
    features: dict[str, np.ndarray]
    targets: list[np.ndarray]
    catalogue: CatalogueFeatures
    items: pa.Table
    judge: RelevanceJudge
    relevance: RelevanceFilter

    @classmethod
    def load(cls, world: str | Path, vocab: Vocabulary, features: FeatureConfig, max_events: int | None = None,
             seed: int = 0) -> EvalSet:
        """The test-day searches of ``world`` with a positive; at most ``max_events`` of them, a seeded sample."""
        world = Path(world)
        manifest = read_manifest(world)
        if not manifest.synthetic:
            raise ValueError(f"world {world}: P_good needs the simulator's ground truth; {manifest.label} has none "
                             "(score real judgements with metrics.judged_grades)")
        featurizer = Featurizer(world, vocab, features)
        events = featurizer.events(manifest.test_days)
        if events.num_rows == 0:
            raise ValueError(f"world {world}: no test-day searches with a click or buy on days {manifest.test_days}")
        if max_events is not None and events.num_rows > max_events:
            rows = np.sort(np.random.default_rng(seed).choice(events.num_rows, max_events, replace=False))
            events = events.take(pa.array(rows))
        events = _with_intents(world, manifest.test_days, events)
        items = read_table(world, "items", columns=["item_id", "title", "title_words"])
        return cls(world, manifest, featurizer, events, featurizer(events), targets_of(events),
                   CatalogueFeatures.from_featurizer(featurizer, items["item_id"].to_numpy()), items,
                   RelevanceJudge.from_world(world), RelevanceFilter.from_world(world))

    def __len__(self) -> int:
        return self.events.num_rows

    @property
    def query_words(self) -> list[list[str]]:
        return [w or [] for w in self.events["query_words"].to_pylist()]

    def grades(self, topk: np.ndarray) -> np.ndarray:
        """(E, K) ground-truth grades (2 exact, 1 partial, 0 irrelevant; pads 0) of retrieved ids (E, K)."""
        e = self.events
        return self.judge.grades(e["intent_leaf_id"], e["intent_brand_id"], e["intent_attr_value_ids"], topk)

    def score(self, topk: np.ndarray, ks: list[int], pass_ks: list[int] = ()) -> dict[str, float]:
        """Every metric of one result list.

        Args:
            topk: (E, K') retrieved item ids best first, K' >= max(ks); -1 pads (a lexical channel may run dry).
            ks: cut-offs of recall@K, p_good@K, p_exact@K.
            pass_ks: cut-offs of pass@K (the filter is the slow part: keep them small).

        Returns:
            ``{"recall@50": ..., "p_good@50": ..., "p_exact@50": ..., "pass@50": ...}``.
        """
        if topk.shape[0] != len(self):
            raise ValueError(f"{topk.shape[0]} result lists for {len(self)} searches")
        grades = self.grades(topk[:, :max(ks)])
        out: dict[str, float] = {}
        for k in ks:
            out[f"recall@{k}"] = recall_at_k(topk, self.targets, k)
            out[f"p_good@{k}"] = p_good_at_k(grades, k, min_grade=1)
            out[f"p_exact@{k}"] = p_good_at_k(grades, k, min_grade=2)
        if pass_ks:
            passes = self.relevance.pass_mask(self.query_words, topk[:, :max(pass_ks)])
            out.update({f"pass@{k}": pass_count_at_k(passes, k) for k in pass_ks})
        return out

    def scale(self) -> dict[str, int]:
        """Size of the world and of the evaluation, for the labels of every table."""
        t = self.manifest.tables
        return {"items": len(self.catalogue), "users": t.get("users", 0), "search_events": t.get("search_events", 0),
                "behaviours": t.get("behaviours", 0), "eval_searches": len(self)}


def _with_intents(world: Path, days: list[int], events: pa.Table) -> pa.Table:
    """``events`` with the intent columns of their ``search_events`` rows (same order)."""
    logged = read_table(world, "search_events", days=days, columns=["event_id", *INTENT_COLUMNS])
    ids = logged["event_id"].to_numpy()
    order = np.argsort(ids)
    wanted = events["event_id"].to_numpy()
    pos, found = sorted_lookup(ids, wanted, sorter=order)
    if not found.all():
        raise ValueError(f"world {world}: some evaluation events are missing from search_events")
    for c in INTENT_COLUMNS:
        events = events.append_column(c, logged[c].take(pa.array(pos)))
    return events
