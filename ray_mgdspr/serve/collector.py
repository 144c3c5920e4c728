"""Python's cyclic garbage collector, paused while a version loads.

Loading a version builds millions of Python objects, most of them short-lived (the catalogue's rows on their way
into numpy and Arrow, the filter's and the featurizer's tables). CPython runs a full collection whenever the
objects moved to its oldest generation since the last one exceed a quarter of those it held then, so a heap that
grows from nothing is collected again and again, each time over everything alive: loading the `large` preset's
version (1M items) ran 24 full collections, 13.2 s of its 69.3 s, the longest 1.2 s
(``benchmarks/results/load-gc-bm25s.md``; ``docs/serving.md``, "Loading a version without stalling the one served
beside it"). Each holds the GIL: in an ingress replica that stages a new version beside the one it serves
(``serve.placement: inline``), every request in flight waits for it.

``collector_paused()`` turns the automatic collections off while any load in the process is under way (loads
nest and run on several threads: a replica staging one version while another finishes), and back on when the
last one ends, unless they were off before. Objects a load made stay tracked; the collections that follow
see each of them once or twice, not 24 times. Explicit ``gc.collect()`` calls still run. Cyclic garbage made
meanwhile, by the load or by requests served beside it, waits for the collector's return: ~1 minute of it.

Ray-free.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_loads = 0  # loads under way in this process
_resume = False  # whether the collector was on when the first of them started


@contextmanager
def collector_paused() -> Iterator[None]:
    """Automatic garbage collection off for the ``with`` block (or the decorated function), back as it was when
    the last such block in the process ends."""
    global _loads, _resume
    with _lock:
        if _loads == 0:
            _resume = gc.isenabled()
            gc.disable()
        _loads += 1
    try:
        yield
    finally:
        with _lock:
            _loads -= 1
            if _loads == 0 and _resume:
                gc.enable()
