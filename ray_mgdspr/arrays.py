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


def keep_temporaries_on_the_heap(mmap_threshold: int = 16 << 20, trim_threshold: int = 128 << 20) -> bool:
    """Have glibc's malloc serve large numpy temporaries (0.1-1 MB gathers, some 50 MB per feature batch of 1,024
    rows) from a heap it keeps, instead of a fresh ``mmap`` each, or a heap it trims after every batch: either way
    the pages fault in again on every batch.

    glibc raises both thresholds by itself after the process frees a large mmapped block, so a process that built
    big arrays and freed its intermediates runs fast, while one that memory-maps ready arrays (a featurizer actor
    with ``data.share_history``) keeps the 128 KiB defaults: measured on the small preset's featurizer, 34k
    against 63k examples/s on the same arrays, 53-60k with this (``benchmarks/bench_featurizer_memory.py``).
    Sets ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` (``mallopt(3)``; as ``MALLOC_MMAP_THRESHOLD_`` and
    ``MALLOC_TRIM_THRESHOLD_`` in the environment would) for this whole process: the heap then keeps up to
    ``trim_threshold`` bytes of freed memory. Call it in a process that does such work.

    Returns:
        whether it applied (False where the C library is not glibc).
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(libc.mallopt(m_mmap_threshold, mmap_threshold)) and bool(libc.mallopt(m_trim_threshold,
                                                                                       trim_threshold))
