"""A day of catalogue churn (SYNTHETIC): some items leave, some change title or price, new ones arrive. What a
daily delta update (``index/update.py``) is tested and benchmarked with."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def daily_churn(items: pa.Table, share: float = 0.01, seed: int = 0) -> pa.Table:
    """The catalogue ``items`` after a day in which ``share`` of it changed, in equal parts: removed items, items
    whose price moved (x0.8-1.25), items whose title gained a word, and new items (copies of existing ones under
    new ids, with their own title word and price).

    Args:
        items: rows of the ``items`` table (any subset of its columns, with ``item_id``, ``title``,
            ``title_words`` and ``price``).

    Example:
        >>> items = pa.table({"item_id": np.arange(300), "title": ["a b"] * 300, "title_words": [["a", "b"]] * 300,
        ...                   "price": np.ones(300, np.float32)})
        >>> after = daily_churn(items, share=0.04, seed=1)
        >>> after.num_rows, len(np.setdiff1d(after["item_id"], items["item_id"]))
        (300, 3)
    """
    rng = np.random.default_rng(seed)
    n = items.num_rows
    part = max(1, round(n * share / 4))
    picked = rng.choice(n, size=3 * part, replace=False)
    removed, repriced, retitled = picked[:part], picked[part:2 * part], picked[2 * part:]
    price = items["price"].to_numpy(zero_copy_only=False).astype(np.float64)
    price[repriced] = np.round(price[repriced] * rng.uniform(0.8, 1.25, part), 2)
    words = items["title_words"].to_pylist()
    titles = items["title"].to_pylist()
    for i in retitled:
        words[i] = [*(words[i] or []), "new"]
        titles[i] = f"{titles[i]} new"
    out = _with(items, price=price, title_words=words, title=titles)
    keep = np.ones(n, bool)
    keep[removed] = False
    out = out.filter(pa.array(keep))

    sources = rng.choice(np.flatnonzero(keep), size=part, replace=False)
    first_new = int(pc.max(items["item_id"]).as_py()) + 1
    fresh = out.take(pa.array(np.searchsorted(np.flatnonzero(keep), sources)))
    fresh_price = fresh["price"].to_numpy(zero_copy_only=False).astype(np.float64) * rng.uniform(0.9, 1.1, part)
    fresh = _with(fresh, item_id=np.arange(first_new, first_new + part, dtype=np.int64),
                  title_words=[[*(w or []), "2026"] for w in fresh["title_words"].to_pylist()],
                  title=[f"{t} 2026" for t in fresh["title"].to_pylist()], price=np.round(fresh_price, 2))
    return pa.concat_tables([out, fresh])


def _with(table: pa.Table, **columns: object) -> pa.Table:
    for name, values in columns.items():
        i = table.schema.get_field_index(name)
        table = table.set_column(i, table.schema.field(i), pa.array(values, table.schema.field(i).type))
    return table
