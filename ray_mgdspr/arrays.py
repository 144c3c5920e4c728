"""Small numpy helpers shared by the data, model, index, serving and evaluation code."""

from __future__ import annotations

import numpy as np


def sorted_lookup(keys: np.ndarray, values: np.ndarray, sorter: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(rows, found): where each of ``values`` stands in ``keys`` (ascending, or put in order by ``sorter`` as for
    ``np.searchsorted``) and whether it is there; a value that is not has some valid row (0 for empty ``keys``).

    >>> sorted_lookup(np.array([9, 2, 5]), np.array([5, 7]), sorter=np.array([1, 2, 0]))
    (array([2, 0]), array([ True, False]))
    """
    if not len(keys):
        return np.zeros(len(values), np.int64), np.zeros(len(values), bool)
    pos = np.minimum(np.searchsorted(keys, values, sorter=sorter), len(keys) - 1)
    rows = pos if sorter is None else sorter[pos]
    return rows, keys[rows] == values
