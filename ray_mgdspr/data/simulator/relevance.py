"""Ground-truth relevance of (query intent, item): the simulator's stand-in for the paper's relevance model.

Graded like the judgements of real data sets:

* 2 (exact): the item's leaf is the intent's leaf, it is of the brand the query names (if any) and
  it has every attribute value the query states;
* 1 (partial): right leaf, but a stated brand or attribute value differs;
* 0 (irrelevant): any other leaf.

An intent is ``(leaf, brand or -1, stated attribute values)``; ``search_events`` stores it for every
logged query, so P_good can be computed on any retrieved list, not only on logged items::

    judge = RelevanceJudge.from_world("runs/demo/world")
    grades = judge.grades(events["intent_leaf_id"], events["intent_brand_id"],
                          events["intent_attr_value_ids"], retrieved_item_ids)   # (Q, K) int8
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from ray_mgdspr.data.world import read_table

EXACT, PARTIAL, IRRELEVANT = 2, 1, 0


def grade_items(
    item_leaf: np.ndarray,
    item_brand: np.ndarray,
    item_slot_value: np.ndarray,
    intent_leaf: np.ndarray,
    intent_brand: np.ndarray,
    intent_slot_value: np.ndarray,
    items: np.ndarray,
) -> np.ndarray:
    """Grades of ``items`` (Q, K) for Q intents.

    Args:
        item_leaf, item_brand: (M,) per item.
        item_slot_value: (M, S) the item's attribute value id per slot, -1 where it has none.
        intent_leaf, intent_brand: (Q,); brand -1 when the query names none.
        intent_slot_value: (Q, S) the value the query states per slot, -1 where it states none.
        items: (Q, K) item ids (row positions in the arrays above); -1 entries grade 0.
    Returns:
        (Q, K) int8 grades: 2 exact, 1 partial, 0 irrelevant.
    """
    valid = items >= 0
    it = np.where(valid, items, 0)
    leaf_ok = (item_leaf[it] == intent_leaf[:, None]) & valid
    brand_ok = (intent_brand[:, None] < 0) | (item_brand[it] == intent_brand[:, None])
    need = intent_slot_value[:, None, :]  # (Q, 1, S)
    attrs_ok = ((need < 0) | (item_slot_value[it] == need)).all(axis=-1)
    return np.where(leaf_ok & brand_ok & attrs_ok, EXACT, np.where(leaf_ok, PARTIAL, IRRELEVANT)).astype(np.int8)


class RelevanceJudge:
    """Grades retrieved items against logged intents, from a world's ``items`` and ``attributes`` tables."""

    def __init__(self, item_ids: np.ndarray, leaf: np.ndarray, brand: np.ndarray,
                 attr_value_ids: Sequence[Sequence[int]], value_slot: np.ndarray) -> None:
        n_slots = int(value_slot.max()) + 1 if len(value_slot) else 0
        self.value_slot = value_slot
        self.n_slots = n_slots
        self._row = {int(i): r for r, i in enumerate(item_ids)} if not _is_dense(item_ids) else None
        self.leaf = np.asarray(leaf, dtype=np.int64)
        self.brand = np.asarray(brand, dtype=np.int64)
        self.slot_value = self.dense_values(attr_value_ids)

    @classmethod
    def from_world(cls, world: str | Path) -> RelevanceJudge:
        items = read_table(world, "items", columns=["item_id", "leaf_id", "brand_id", "attr_value_ids"])
        attrs = read_table(world, "attributes")
        slots = attrs["slot"].to_pylist()
        slot_index = {s: i for i, s in enumerate(dict.fromkeys(slots))}
        value_slot = np.full(int(pa.compute.max(attrs["attr_value_id"]).as_py() or 0) + 1, -1, dtype=np.int64)
        value_slot[attrs["attr_value_id"].to_numpy()] = [slot_index[s] for s in slots]
        return cls(
            items["item_id"].to_numpy(),
            items["leaf_id"].fill_null(-1).to_numpy(),
            items["brand_id"].fill_null(-1).to_numpy(),
            items["attr_value_ids"].to_pylist(),
            value_slot,
        )

    def dense_values(self, value_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """Lists of attribute value ids -> (N, S) value per slot, -1 where none."""
        out = np.full((len(value_lists), self.n_slots), -1, dtype=np.int64)
        for r, values in enumerate(value_lists):
            for v in values or ():
                out[r, self.value_slot[v]] = v
        return out

    def rows(self, item_ids: np.ndarray) -> np.ndarray:
        item_ids = np.asarray(item_ids, dtype=np.int64)
        if self._row is None:
            return np.where((item_ids >= 0) & (item_ids < len(self.leaf)), item_ids, -1)
        return np.vectorize(lambda i: self._row.get(int(i), -1), otypes=[np.int64])(item_ids)

    def grades(self, intent_leaf: Sequence[int], intent_brand: Sequence[int | None],
               intent_attr_value_ids: Sequence[Sequence[int]], item_ids: np.ndarray) -> np.ndarray:
        """(Q, K) grades of retrieved ``item_ids`` for Q logged intents; unknown ids grade 0."""
        brand = np.array([-1 if b is None else b for b in _to_list(intent_brand)], dtype=np.int64)
        return grade_items(
            self.leaf, self.brand, self.slot_value,
            np.asarray(_to_list(intent_leaf), dtype=np.int64), brand,
            self.dense_values(_to_list(intent_attr_value_ids)), self.rows(item_ids),
        )


def _is_dense(ids: np.ndarray) -> bool:
    return len(ids) == 0 or bool((ids == np.arange(len(ids))).all())


def _to_list(x: object) -> list:
    return x.to_pylist() if hasattr(x, "to_pylist") else list(x)  # type: ignore[union-attr]
