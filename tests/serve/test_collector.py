"""``serve/collector.py``: automatic garbage collection paused while loads run, and restored as it was (Ray-free)."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest

from ray_mgdspr.serve.collector import collector_paused


@pytest.fixture(autouse=True)
def collector_restored() -> Iterator[None]:
    was = gc.isenabled()
    yield
    (gc.enable if was else gc.disable)()


def test_the_collector_is_off_while_any_load_runs_and_on_after_the_last() -> None:
    gc.enable()
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    states: dict[str, bool] = {}

    def second_load() -> None:  # a replica staging one version while another finishes loading
        with collector_paused():
            second_in.set()
            first_out.wait(5)
            states["after the first ended"] = gc.isenabled()

    with collector_paused():
        states["during"] = gc.isenabled()
        first_in.set()
        loader = threading.Thread(target=second_load)
        loader.start()
        second_in.wait(5)
    first_out.set()
    loader.join(5)
    assert states == {"during": False, "after the first ended": False}
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off_and_errors_still_restore_it() -> None:
    gc.disable()
    with collector_paused():
        pass
    assert not gc.isenabled()

    gc.enable()

    @collector_paused()
    def load() -> None:
        raise OSError("a shard file is missing")

    with pytest.raises(OSError):
        load()
    assert gc.isenabled()
