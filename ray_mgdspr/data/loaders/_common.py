"""Helpers shared by the real-data loaders: column checks and the ``items`` table of a real catalogue."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa


def check_columns(path: Path, have: Iterable[str], needed: Iterable[str]) -> None:
    """Raise ``ValueError`` naming the file and every missing column."""
    have = list(have)
    missing = [c for c in needed if c not in have]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(map(repr, missing))} (found {have})")


def real_items_table(
    item_ids: Sequence[int] | np.ndarray,
    titles: Sequence[str],
    title_words: Sequence[list[str]],
    external_ids: Sequence[str],
    *,
    leaf_id: Sequence[Any] | None = None,
    cate1_id: Sequence[Any] | None = None,
    brand_id: Sequence[Any] | None = None,
    shop_id: Sequence[Any] | None = None,
    attr_value_ids: Sequence[list[int]] | None = None,
) -> pa.Table:
    """The ``items`` table of a real catalogue.

    Columns a source does not have are null (ids) or empty (attribute lists); ``price``, ``quality``,
    ``popularity`` and ``discount`` are simulator ground truth and always null for real data.
    """
    n = len(item_ids)

    def ids(values: Sequence[Any] | None) -> pa.Array:
        return pa.nulls(n, pa.int32()) if values is None else pa.array(values, pa.int32())

    return pa.table(
        {
            "item_id": pa.array(item_ids, pa.int64()),
            "title": pa.array(list(titles), pa.string()),
            "title_words": pa.array(list(title_words), pa.list_(pa.string())),
            "leaf_id": ids(leaf_id),
            "cate1_id": ids(cate1_id),
            "brand_id": ids(brand_id),
            "shop_id": ids(shop_id),
            "price": pa.nulls(n, pa.float32()),
            "attr_value_ids": pa.array(
                [[] for _ in range(n)] if attr_value_ids is None else list(attr_value_ids), pa.list_(pa.int32())
            ),
            "quality": pa.nulls(n, pa.float32()),
            "popularity": pa.nulls(n, pa.float32()),
            "discount": pa.nulls(n, pa.bool_()),
            "external_id": pa.array(list(external_ids), pa.string()),
        }
    )
