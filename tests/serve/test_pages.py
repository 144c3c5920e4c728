"""Pages with the relevance filter on: the deeper embedding search and the lexical fallback leave (almost) no page
short of the exactly relevant items the catalogue has (synthetic world_en; Ray-free)."""

from __future__ import annotations

import gc
import threading
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from helpers import reference_matches
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_mgdspr.config import ProjectConfig, ServeConfig
from ray_mgdspr.data.world import read_table
from ray_mgdspr.serve.engine import Hits, Retriever, assemble, merge_hits, relaxed_terms
from ray_mgdspr.serve.pages import held_out_searches, page_report
from ray_mgdspr.serve.relevance import ItemMatcher, RelevanceFilter, matches
from ray_mgdspr.serve.schemas import RetrieveRequest
from ray_mgdspr.serve.store import SqliteStore


@pytest.fixture(scope="module")
def retriever(deployment: Any) -> Retriever:
    cfg = ServeConfig(index_root=str(deployment.index_root), world=str(deployment.world),
                      store=str(deployment.store)).resolved(ProjectConfig())
    return Retriever.open(cfg, "v1", SqliteStore(deployment.store, deployment.features))


@pytest.fixture(scope="module")
def queries(deployment: Any) -> list[list[str]]:
    searches = held_out_searches(deployment.world, 300)
    words = [w for w in read_table(deployment.world, "search_events", days=[1], columns=["query_words"])
             ["query_words"].to_pylist()[:100]]
    return [w or [] for w in words] + [q.split() for q in searches["query"].to_pylist()]


def test_item_matcher_equals_the_reference_verdicts(deployment: Any, queries: list[list[str]]) -> None:
    relevance = RelevanceFilter.from_world(deployment.world)
    matcher = ItemMatcher(relevance.items)
    rows = np.random.default_rng(0).choice(relevance.items.num_rows, 300, replace=False)
    checked = 0
    for words in queries:
        terms = relevance.key_terms(words)
        want = reference_matches(terms, relevance.items.take(pa.array(rows)))
        np.testing.assert_array_equal(matcher(terms, rows), want, err_msg=str(words))
        checked += bool(terms) and 0 < want.sum() < len(rows)
    assert checked > 20  # queries whose terms keep some items and not others


def test_passing_bound_counts_the_items_that_can_pass(deployment: Any, queries: list[list[str]]) -> None:
    """``passing_bound``: never below the items that pass (what starting the fallback early relies on); exactly
    their number when no phrase is left to check in the titles; and no title is read for it."""
    relevance = RelevanceFilter.from_world(deployment.world)
    every = np.arange(relevance.items.num_rows)
    exact = looser = 0
    for words in queries:
        terms = relevance.key_terms(words)
        matcher = ItemMatcher(relevance.items)  # fresh: no verdict completed by an earlier query
        unread = [None if v.unchecked is None else int(v.unchecked.sum()) for v in map(matcher.verdicts, terms)]
        bound = matcher.passing_bound(terms)
        # no title was read for it: every phrase's unchecked items are still unchecked
        assert [None if v.unchecked is None else int(v.unchecked.sum()) for v in map(matcher.verdicts, terms)] \
            == unread
        passing = int(reference_matches(terms, relevance.items).sum())
        assert bound >= passing, words
        if all(matcher.verdicts(t).unchecked is None for t in terms):
            assert bound == passing, words
            exact += 1
        else:
            looser += bound > passing
            assert int(matcher(terms, every).sum()) == passing <= matcher.passing_bound(terms)  # kept: still a bound
    assert exact > 100 and ItemMatcher(relevance.items).passing_bound(()) == relevance.items.num_rows
    print(f"{exact} queries with an exact bound, {looser} with a looser one before titles are read (SYNTHETIC)")


def test_shard_prefixes_give_the_full_depth_answer(retriever: Retriever, queries: list[list[str]]) -> None:
    """Shards return only their hits down to their k-th passing one: merged, the page is what the full top-depth
    lists give, items and filter counts alike."""
    enc = retriever.encoder.encode([" ".join(w) for w in queries[:60]], [None] * 60, [4_000_000_000_000] * 60)
    shorter = 0
    for e in enc:
        for k in (5, 50):
            full = [s.search(e.embedding[None, :], 9600, [e.terms])[0] for s in retriever.shards]
            part = [s.search(e.embedding[None, :], 9600, [e.terms], need=[k])[0] for s in retriever.shards]
            want, got = (assemble({"embedding": merge_hits(p, 9600)}, k, True) for p in (full, part))
            assert got.items == want.items and got.filtered == want.filtered
            shorter += sum(len(p.item_ids) for p in part) < sum(len(f.item_ids) for f in full)
    assert shorter > 10  # the prefixes did cut something


def test_a_batch_of_requests_gets_each_request_s_own_answer(retriever: Retriever, queries: list[list[str]]) -> None:
    """``answer_batch`` (one forward pass, one search per shard for the whole batch, at each request's own depth and
    passing prefix) answers every request as ``request`` answers it alone: pages, scores, counts, fallbacks."""
    mix = [{}, {"filter": False}, {"channels": ["lexical"]}, {"channels": ["embedding", "lexical"]}]
    requests = [RetrieveRequest(query=" ".join(words) or "dress", user_id=[None, 3, 17, 999_999][n % 4],
                                k=[5, 50, 20][n % 3], ts=4_000_000_000_000, **mix[n % len(mix)])
                for n, words in enumerate(queries[:48])]
    batch = retriever.answer_batch([(r, r.k) for r in requests])
    fallbacks = 0
    for req, (got, embedding) in zip(requests, batch, strict=True):
        want = retriever.request(req)
        assert [(i["item_id"], i["channels"]) for i in got["data"]] == \
            [(i["item_id"], i["channels"]) for i in want["data"]], req
        for channel in req.channels:
            np.testing.assert_allclose([i["scores"].get(channel, 0) for i in got["data"]],
                                       [i["scores"].get(channel, 0) for i in want["data"]], rtol=1e-5, atol=1e-6)
        fields = ("version", "count", "filtered", "fallback", "fallback_added", "relaxed_to", "key_terms")
        assert {f: got[f] for f in fields} == {f: want[f] for f in fields}
        assert set(got["latency_ms"]) == set(want["latency_ms"])
        assert embedding.shape == (retriever.release.index.dim,)
        fallbacks += got["fallback"] is not None
    assert fallbacks > 0  # some pages of the batch took the lexical fallback


def test_shards_searched_on_threads_give_the_same_pages(retriever: Retriever, queries: list[list[str]],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``serve.search_threads``: each shard of a batch (and of a single request) is searched on a thread of the
    pool, and the pages equal those of one shard after another, in shard order."""
    requests = [RetrieveRequest(query=" ".join(words) or "dress", user_id=[None, 3][n % 2], k=[5, 50][n % 2],
                                ts=4_000_000_000_000) for n, words in enumerate(queries[:24])]

    def pages(threads: int) -> tuple[list[Any], set[str]]:
        ran_on: set[str] = set()
        ann = type(retriever.shards[0]).ann

        def recorded(shard: Any, *args: Any, **kwargs: Any) -> Any:
            ran_on.add(threading.current_thread().name)
            return ann(shard, *args, **kwargs)

        retriever.cfg = retriever.cfg.model_copy(update={"search_threads": threads})
        with monkeypatch.context() as m:
            m.setattr(type(retriever.shards[0]), "ann", recorded)
            bodies = [body for body, _ in retriever.answer_batch([(r, r.k) for r in requests])]
            bodies += [retriever.request(r) for r in requests[:6]]
        return [(b["data"], b["filtered"], b["fallback"]) for b in bodies], ran_on

    assert len(retriever.shards) >= 2
    one, one_ran_on = pages(1)
    try:
        many, many_ran_on = pages(len(retriever.shards))
    finally:
        retriever.cfg = retriever.cfg.model_copy(update={"search_threads": 1})
    assert many == one
    assert one_ran_on == {threading.current_thread().name}
    assert len(many_ran_on) >= 2 and all(name.startswith("shard-search") for name in many_ran_on)


def test_short_pages_at_most_one_percent_with_the_fallback(retriever: Retriever, deployment: Any) -> None:
    stats = {(s.k, s.mode): s for s in page_report(retriever, deployment.world, ks=(5, 10, 50), max_searches=300)}
    for k in (5, 10, 50):
        assert stats[k, "filter on"].short_rate <= 0.01, stats[k, "filter on"]
        assert stats[k, "filter off"].short_rate == 0 and stats[k, "filter off"].mean_count == k
    # what the endpoint did before (k x filter_fetch candidates, no fallback) left many pages short
    assert stats[5, "filter on, old depth, no fallback"].short_rate > 0.05
    assert stats[5, "filter on, old depth + fallback"].short_rate < stats[5, "filter on, old depth, no fallback"] \
        .short_rate
    assert stats[5, "filter on"].p_good > stats[5, "filter off"].p_good
    assert stats[5, "filter on"].fallback_rate == 0  # world_en's 1,500 items lie within the depth: never needed
    assert stats[5, "filter on"].relaxed_rate > 0  # but its small leaves often hold fewer than k exact items
    assert stats[5, "filter on"].empty_rate < stats[5, "filter on, old depth, no fallback"].empty_rate


def test_lexical_fallback_fills_a_page_no_embedding_hit_passes(retriever: Retriever, deployment: Any) -> None:
    relevance = RelevanceFilter.from_world(deployment.world)
    searches = held_out_searches(deployment.world, 300)
    enc = retriever.encoder.encode(searches["query"].to_pylist(), searches["user_id"].to_pylist(),
                                   searches["ts"].to_pylist())
    saved = retriever.cfg
    shallow = saved.model_copy(update={"filter_depth": 5})  # a shallow embedding search: none of its hits may pass
    try:
        found = 0
        for e in enc:
            retriever.cfg = shallow.model_copy(update={"fallback": "none"})
            dry = retriever.answer(e, 5)
            if dry["count"] or not e.terms:
                continue
            retriever.cfg = shallow.model_copy(update={"fallback": "lexical"})
            r = retriever.answer(e, 5)
            if not r["count"]:
                continue  # BM25 found nothing that passes either
            found += 1
            assert r["fallback"] == "lexical" and r["fallback_added"] == r["count"] <= 5
            assert all(i["channels"] == ["lexical"] and set(i["scores"]) == {"lexical"} for i in r["data"])
            ids = np.array([[i["item_id"] for i in r["data"]]])
            if r["relaxed_to"] is None:
                assert relevance.pass_mask([e.words], ids).all()  # never padded with items that fail the filter
            assert "fallback" in r["latency_ms"] and dry["fallback"] is None
    finally:
        retriever.cfg = saved
    assert found >= 3


def test_an_early_fallback_gives_the_pages_of_a_late_one(retriever: Retriever, deployment: Any) -> None:
    """``serve.early_fallback``: the lexical fallback started beside the embedding search (on its own thread,
    before anyone knows the page is short) fills exactly the pages the fallback run after the search fills, alone
    and in a batch; and with a limit no query's key terms meet, it never starts early."""
    searches = held_out_searches(deployment.world, 300)
    requests = [RetrieveRequest(query=q, user_id=u, ts=t, k=5) for q, u, t in
                zip(searches["query"].to_pylist(), searches["user_id"].to_pylist(), searches["ts"].to_pylist(),
                    strict=True)]
    lexical, searched = retriever.lexical, []
    plain_search = lexical.search

    def recorded(words: list[list[str]], k: int, terms: list[tuple]) -> list[Hits]:
        searched.append((threading.current_thread().name.startswith("early-fallback"), tuple(words[0]), terms[0]))
        return plain_search(words, k, terms)

    def pages(early: float) -> list[tuple]:
        # a shallow embedding search: many pages short, so the fallback runs
        retriever.cfg = saved.model_copy(update={"filter_depth": 5, "early_fallback": early})
        fields = ("data", "count", "filtered", "fallback", "fallback_added", "relaxed_to")
        alone = [retriever.request(r) for r in requests]
        batch = [body for body, _ in retriever.answer_batch([(r, 5) for r in requests])]
        # (a batch's embedding scores may differ from a lone request's in the last bits: its own pages are compared)
        return [tuple(str(a[f]) for f in fields) for a in alone + batch]

    saved = retriever.cfg
    lexical.search = recorded
    try:
        late = pages(0)
        assert not any(early for early, *_ in searched)
        searched.clear()
        assert pages(1e9) == late  # every query with key terms starts its fallback early
        strict = {(w, t) for early, w, t in searched if early}
        main = [(w, t) for early, w, t in searched if not early]
        short = sum(p[3] == "lexical" for p in late[:len(requests)])
        assert short >= 10 and len(strict) >= 10
        assert not set(main) & strict  # a page the early fallback served never searched BM25 again
        searched.clear()
        assert pages(1e-9) == late  # a limit below one item: only terms nothing can pass start early
        assert all(sum(s.passing_bound(t) for s in retriever.shards) == 0 for early, _, t in searched if early)
    finally:
        retriever.cfg = saved
        lexical.search = plain_search
    print(f"{short} of {len(requests)} pages filled by the fallback, early and late alike (SYNTHETIC)")


def test_relaxed_fill_keeps_the_product_type_when_too_few_items_have_every_key_term(retriever: Retriever,
                                                                                      deployment: Any) -> None:
    """A page still short after the strict filter and the lexical fallback is filled with BM25 hits of the query's
    product type (its category terms), after every strictly passing item; never with another product type."""
    relevance = RelevanceFilter.from_world(deployment.world)
    items = relevance.items
    searches = held_out_searches(deployment.world, 300)
    enc = retriever.encoder.encode(searches["query"].to_pylist(), searches["user_id"].to_pylist(),
                                   searches["ts"].to_pylist())
    relaxed_pages = 0
    for e in enc:
        r = retriever.answer(e, 10)
        if not r["data"]:
            assert relaxed_terms(e.terms) is None or r["relaxed_to"] is not None  # relaxing was tried
            continue
        ids = np.array([i["item_id"] for i in r["data"]])
        strict = relevance.pass_mask([e.words], ids[None, :])[0]
        if r["relaxed_to"] is None:
            assert strict.all()
            continue
        relaxed_pages += 1
        category = relaxed_terms(e.terms)
        assert r["relaxed_to"] == [t.text for t in category] and "relaxed" in r["latency_ms"]
        first_fail = int(np.argmin(strict)) if not strict.all() else len(strict)
        assert strict[:first_fail].all()
        rest = items.take(np.searchsorted(items["item_id"].to_numpy(), ids[first_fail:]))
        assert matches(category, rest).all()  # the product type is kept
    print(f"{relaxed_pages} of {len(enc)} pages relaxed to the product type (SYNTHETIC)")
    assert relaxed_pages >= 3


def plain_assemble(channels: dict[str, Hits], k: int, apply_filter: bool) -> tuple[list[dict], int]:
    """``assemble`` written as a loop over the hits: each channel's first k (passing) hits, embedding first, an item
    of both channels listed once; ``filtered`` counts the failing hits met before each channel's k-th kept one."""
    items: dict[int, dict] = {}
    filtered = 0
    for channel in ("embedding", "lexical"):
        hits, kept = channels.get(channel), 0
        for item, score, ok, title in ([] if hits is None else
                                       zip(hits.item_ids, hits.scores, hits.passes, hits.titles, strict=True)):
            if kept == k:
                break
            if apply_filter and not ok:
                filtered += 1
                continue
            kept += 1
            entry = items.setdefault(int(item), {"item_id": int(item), "title": title, "channels": [], "scores": {}})
            if channel not in entry["channels"]:
                entry["channels"].append(channel)
                entry["scores"][channel] = float(score)
    return list(items.values()), filtered


_HITS = st.lists(st.tuples(st.integers(0, 15), st.floats(-2, 2, width=32), st.booleans()), max_size=25)


@settings(max_examples=300, deadline=None)
@given(embedding=st.none() | _HITS, lexical=st.none() | _HITS, k=st.integers(1, 12), apply_filter=st.booleans())
def test_assemble_equals_the_plain_loop(embedding: list | None, lexical: list | None, k: int,
                                        apply_filter: bool) -> None:
    channels = {name: Hits(np.array([h[0] for h in hits], np.int64), np.array([h[1] for h in hits], np.float32),
                           np.array([h[2] for h in hits], bool), [f"t{h[0]}" for h in hits])
                for name, hits in (("embedding", embedding), ("lexical", lexical)) if hits is not None}
    got = assemble(channels, k, apply_filter)
    assert (got.items, got.filtered) == plain_assemble(channels, k, apply_filter)


def test_no_automatic_collection_runs_while_a_version_loads(deployment: Any) -> None:
    """Loading runs without the collector (``serve/collector.py``): at most the one young collection that follows,
    where CPython without the pause ran hundreds, and full ones over the whole growing heap."""
    cfg = ServeConfig(index_root=str(deployment.index_root), world=str(deployment.world),
                      store=str(deployment.store)).resolved(ProjectConfig())
    collections: list[int] = []

    def seen(phase: str, info: dict) -> None:
        if phase == "start":
            collections.append(info["generation"])

    assert gc.isenabled()
    gc.collect()  # counts at zero: the collection that follows the load is then a young one, whatever ran before
    gc.callbacks.append(seen)
    try:
        Retriever.open(cfg, "v2", SqliteStore(deployment.store, deployment.features))  # 3 shards
    finally:
        gc.callbacks.remove(seen)
    assert collections in ([], [0]), collections
    assert gc.isenabled()
