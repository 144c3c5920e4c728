"""Featurizer: search events + the user's history -> fixed-size int64 arrays for the two towers (spec §1, §2, §8).

This docstring is the contract between the data pipeline and the model.

Rows
----
:meth:`Featurizer.examples` gives training examples, one row per (search event, positive item), where the
positives of an event are ``clicked_item_ids ∪ bought_item_ids`` (deduplicated, clicked order first, then
bought items not clicked); events without positives are dropped (:func:`explode_positives` does this for any
table of search events, e.g. a Ray Data batch). Columns: ``event_id`` int64, ``user_id`` int64,
``ts`` int64 (epoch ms), ``query`` string, ``query_words`` list<string>, ``item_id`` int64. Rows are in file order
(day by day, events in the order the day file holds them), so the table is the same on every call.
:meth:`Featurizer.events` gives one row per search event with at least one positive, with the same columns
except ``target_item_ids`` list<int64> (all its positives) instead of ``item_id`` (evaluation).

Features of a batch (``Featurizer.__call__``)
---------------------------------------------
Every array is int64 with the batch size ``B`` first; the lengths come from :class:`FeatureConfig`. Token ids
are vocabulary ids with ``PAD = 0``. Raw entity ids (item, shop, leaf, cate1, brand) are the tables' own ids
with ``-1`` for padding and for missing (null) values; the model hashes them into buckets itself. ::

    key                    shape                               content
    user_id, ts            [B]                                 passed through (ts in epoch ms)
    event_id               [B]                                 passed through; -1 when the input has none
    query_chars            [B, query_chars_kept]                Tokenizer.chars(query), left-aligned, truncated
    query_bigrams          [B, query_bigrams_kept]              Tokenizer.bigrams(query), likewise
    query_words            [B, query_words_kept]                the row's query_words (the log's segmentation),
                                                               Tokenizer.words(query) when there is no such column
    his_query_words        [B, his_queries, query_words_kept]   words of the user's latest his_queries queries of
                                                               query_history with ts < row ts, most recent first,
                                                               then all-PAD rows
    rt_item, rt_shop, rt_leaf, rt_cate1, rt_brand, rt_price
                           [B, realtime_len]                   R^u: the latest realtime_len clicks with
                                                               ts < row ts, of any age
    st_item, st_shop, st_leaf, st_cate1, st_brand, st_price
                           [B, short_len]                      S^u: the latest short_len clicks older than R^u's
                                                               with ts >= row ts - short_days
    lt_item, lt_shop, lt_leaf, lt_brand, lt_price
                           [B, 3, long_len]                    L^u: axis 1 is the action (click, buy, collect);
                                                               per action the latest long_len behaviours with
                                                               row ts - long_days <= ts < row ts - short_days
    item_id                [B]                                 the positive item (only when the input has item_id)
    item_title             [B, title_words_kept]                its title words (only when the input has item_id)
    item_shop, item_leaf, item_cate1, item_brand, item_price
                           [B]                                 its side information (only when the input has
                                                               item_id)
    item_impressions, item_clicks
                           [B]                                 log2 levels of how often the training days showed
                                                               and clicked it (:class:`ItemPopularity`; a row
                                                               with an event_id leaves its own search out)

All behaviour sequences (R^u, S^u and each action of L^u) are in **chronological order, oldest first, and
right-padded with -1**; a user without history gets all -1 sequences and all-PAD history queries. Side information
(shop, leaf, cate1, brand, price) of a behaviour or an item comes from the ``items`` table by item id (-1 when null
or the item is unknown); ``price`` is the item's price level, the decile of its price among the items of its leaf
category in the items table the featurizer loaded (:class:`PriceLevels`). Every window ends strictly before the
row's ts, so an event's own clicks and query never leak into its features; ties in ts keep the day files' order.
``short_days``/``long_days`` are rounded to whole milliseconds. L^u's click window is defined by time alone, so a
user with few clicks can have one click in both R^u (which has no age limit) and L^u. ``cart`` behaviours (real
logs only) are not used anywhere. Words (query, history, title) are lower-cased (Arrow ``utf8_lower``) before
encoding, as the vocabulary counts them lower-cased. :meth:`Featurizer.items` gives the item-tower features
(``item_id``, ``item_title``, ``item_<side>``) of any ids.

How
---
At construction the featurizer loads the items table, every click/buy/collect behaviour and every query of
``query_history`` of the chosen days into per-action numpy arrays sorted by a combined (user rank, ts) key.
For a batch, each window boundary is one ``np.searchsorted`` on that key and the windows are gathered with
index arithmetic; nothing loops over rows except the tokenizer: characters and bigrams come from
``Tokenizer.chars``/``bigrams`` per query (exactly the vocabulary's rules, Unicode whitespace included).
Measured on one core, batch 256 of ``examples()`` rows, demo world (2,000 items, 500 users, 30 warm-up days):
about 60,000 examples/s (4.2 ms per batch) in en and in zh; the per-query tokenizer calls take 1.1 ms (26 %) in
en and 0.55 ms (13 %) in zh, all query features together (tokenizer plus vectorised encoding) 2 ms.
The object holds only numpy arrays, the vocabulary and a tokenizer, so it pickles for Ray Data ``map_batches``.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ray_mgdspr.arrays import sorted_lookup
from ray_mgdspr.artifacts import atomic_dir
from ray_mgdspr.config import FeatureConfig
from ray_mgdspr.data import schema
from ray_mgdspr.data.vocab import PAD, Kind, Vocabulary
from ray_mgdspr.data.world import read_manifest, read_table, table_files

log = logging.getLogger(__name__)

DAY_MS = 86_400_000
LONG_ACTIONS = ("click", "buy", "collect")
"""Order of axis 1 of the ``lt_*`` arrays."""
ID_SIDE = ("shop", "leaf", "cate1", "brand")
"""Side information that is an id: the items table's ``<name>_id`` columns."""
SIDE = (*ID_SIDE, "price")
"""Side information of an item (a behaviour's or the item tower's), looked up in the items table: the ``ID_SIDE``
ids and ``price``, the item's price level (:class:`PriceLevels`)."""
LONG_SIDE = ("shop", "leaf", "brand", "price")
"""Side information of the L^u behaviours (L_shop, L_leaf, L_brand of spec §2.2, and the price level)."""
PRICE_LEVELS = 10
"""Number of price levels: deciles of price within the item's leaf category (:class:`PriceLevels`)."""
POPULARITY_LEVELS = 16
"""Number of log2 levels of an item's impression and click counts (:class:`ItemPopularity`)."""
MISSING = -1
"""Padding and missing value of raw entity ids."""
EVENT_COLUMNS = ["event_id", "user_id", "ts", "query", "query_words"]
POSITIVE_COLUMNS = ["clicked_item_ids", "bought_item_ids"]
EXPLODE_COLUMNS = [*EVENT_COLUMNS, *POSITIVE_COLUMNS]
"""Columns of ``search_events`` that :func:`explode_positives` reads."""

HISTORY_COLUMNS = {"behaviours": ["user_id", "item_id", "action", "ts"],
                   "query_history": ["user_id", "ts", "query_words"]}
"""Columns of the history tables the featurizer reads (also what a behaviour store returns)."""

Batch = Mapping[str, Any] | pa.Table | pa.RecordBatch


@dataclass
class _Timeline:
    """Rows of one user-ordered log: ``keys`` sorted ascending, payload arrays with one trailing padding row."""

    keys: np.ndarray
    payload: dict[str, np.ndarray]

    @property
    def pad_row(self) -> int:
        return len(self.keys)


class Featurizer:
    """Turns search events and serving requests into the model's feature arrays (see the module docstring).

    Args:
        world: a world directory.
        vocab: the vocabulary of words, characters and bigrams.
        config: lengths and windows of the features.
        history_days: days of ``behaviours`` and ``query_history`` to load (default: all days of the world).
        context: the price levels' edges and the items' popularity counts (a model bundle's,
            ``bundle.item_context``); default: the edges cut from this world's catalogue and the counts of its
            training days, as training does.
            Loading days after a row's ts is harmless: every window ends strictly before the row's ts.

    Raises:
        ValueError: the world has no manifest, or it lacks the items, behaviours or query_history table.
    """

    def __init__(self, world: str | Path, vocab: Vocabulary, config: FeatureConfig,
                 history_days: Iterable[int] | None = None, context: ItemContext | None = None) -> None:
        self.world = Path(world)
        self.vocab = vocab
        self.config = config
        self._context = context  # None: this world's (training); a bundle's own otherwise
        self._tokenizer = vocab.tokenizer()
        try:
            manifest = read_manifest(self.world)
        except FileNotFoundError as e:
            raise ValueError(f"world {self.world}: not a world directory ({e})") from None
        days = sorted(set(manifest.all_days if history_days is None else history_days))
        self._load_items()
        self._set_history(_read(self.world, "behaviours", days, HISTORY_COLUMNS["behaviours"]),
                          _read(self.world, "query_history", days, HISTORY_COLUMNS["query_history"]))
        log.info("featurizer %s: %d items, %d users, %s behaviours, %d history queries over %d days",
                 self.world, len(self._item_ids), len(self._users),
                 {a: len(t.keys) for a, t in self._actions.items()}, len(self._queries.keys), len(days))

    def with_history(self, behaviours: pa.Table, query_history: pa.Table) -> Featurizer:
        """A featurizer over the same catalogue and vocabulary but other histories (cheap: no catalogue reload).

        Serving builds one per request batch from the requesting users' rows of the behaviour store; the
        features equal those of a featurizer that loaded the same rows from the world.

        Args:
            behaviours: rows with the :data:`HISTORY_COLUMNS` of ``behaviours`` (ts as timestamp or epoch ms),
                in the order they happened (ties in ts keep this order).
            query_history: rows with the :data:`HISTORY_COLUMNS` of ``query_history``, likewise.
        """
        out = copy.copy(self)
        out._set_history(behaviours, query_history)
        return out

    def for_users(self, user_ids: Iterable[int], history_days: Iterable[int] | None = None) -> Featurizer:
        """The same featurizer with only ``user_ids``' histories, read from the world (filtered as read): the
        features of a few users' rows without holding every user's (held-out evaluation samples).

        Args:
            user_ids: the users whose rows will be featurized.
            history_days: days of history to read (default: all days of the world).
        """
        days = sorted(set(read_manifest(self.world).all_days if history_days is None else history_days))
        keep = pc.field("user_id").isin(pa.array(np.unique(np.asarray(list(user_ids), np.int64))))
        return self.with_history(*(_read(self.world, name, days, HISTORY_COLUMNS[name], filters=keep)
                                   for name in ("behaviours", "query_history")))

    def _set_history(self, behaviours: pa.Table, history: pa.Table) -> None:
        """Index the behaviours and history queries by (user, ts) for the window lookups."""
        vocab, config = self.vocab, self.config
        b_user, b_ts = _int64(behaviours["user_id"]), schema.epoch_ms(behaviours["ts"])
        q_user, q_ts = _int64(history["user_id"]), schema.epoch_ms(history["ts"])
        self._users = np.unique(np.concatenate([b_user, q_user]))
        all_ts = np.concatenate([b_ts, q_ts])
        self._ts0 = int(all_ts.min()) if len(all_ts) else 0
        self._span = (int(all_ts.max()) - self._ts0 + 2) if len(all_ts) else 2
        if len(self._users) * self._span >= 2**62:
            raise ValueError(f"world {self.world}: {len(self._users)} users over {self._span} ms overflow the keys")
        action = np.asarray(behaviours["action"].to_numpy(zero_copy_only=False))
        item = _int64(behaviours["item_id"])
        self._actions = {a: self._behaviour_timeline(b_user, b_ts, item, action == a) for a in LONG_ACTIONS}
        words = _pad_csr(*vocab.encode("words", _lower(history["query_words"])), config.query_words_kept)
        self._queries = self._timeline(q_user, q_ts, {"words": _with_pad_row(words.astype(np.int32), PAD)})

    # ---------------------------------------------------------------------------------- sharing

    def save(self, directory: str | Path) -> Path:
        """Write the featurizer's arrays (catalogue, popularity, every user's histories) as ``.npy`` files and
        the rest as ``featurizer.json`` into ``directory``, whole or not at all (``artifacts.atomic_dir``): what
        :meth:`load` maps back. The vocabulary is not saved; load with the one this featurizer was built with.

        Returns:
            ``directory``.
        """
        arrays = {"items.ids": self._item_ids, "items.titles": self._titles, "users": self._users,
                  **{f"items.{s}": a for s, a in self._side.items()},
                  "popularity.item_ids": self.popularity.item_ids,
                  **{f"popularity.{k}": a for k, a in self.popularity.counts.items()},
                  "queries.keys": self._queries.keys, "queries.words": self._queries.payload["words"]}
        for action, tl in self._actions.items():
            arrays |= {f"actions.{action}.keys": tl.keys, **{f"actions.{action}.{k}": a for k, a in tl.payload.items()}}
        with atomic_dir(directory) as tmp:
            for name, array in arrays.items():
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
            meta = {"world": str(self.world), "config": self.config.model_dump(mode="json"), "ts0": self._ts0,
                    "span": self._span, "actions": list(self._actions), "sides": list(self._side),
                    "arrays": list(arrays)}
            (tmp / "featurizer.json").write_text(json.dumps(meta, indent=1))
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path, vocab: Vocabulary, mmap: bool = True) -> Featurizer:
        """A featurizer from :meth:`save`'s files, equal to the one saved.

        With ``mmap`` (the default) the arrays are read-only memory maps of the files: the processes of a node
        that load the same directory share one copy of them in the OS page cache, so the history memory of a
        node does not grow with its featurizer actors (``data.share_history``), and loading reads nothing
        until a batch touches it.

        Args:
            directory: a directory :meth:`save` wrote.
            vocab: the vocabulary the saved featurizer was built with.
            mmap: map the files (True) or read them into memory.

        Raises:
            ValueError: ``directory`` is not a saved featurizer (names the missing file).
        """
        directory = Path(directory)
        try:
            meta = json.loads((directory / "featurizer.json").read_text())
            arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
                      for name in meta["arrays"]}
        except FileNotFoundError as e:
            raise ValueError(f"{directory}: not a saved featurizer ({e.filename} is missing)") from None
        out = cls.__new__(cls)
        out.world, out.vocab = Path(meta["world"]), vocab
        out.config = FeatureConfig.model_validate(meta["config"])
        out._context, out._tokenizer = None, vocab.tokenizer()
        out._ts0, out._span = int(meta["ts0"]), int(meta["span"])
        out._item_ids, out._titles, out._users = arrays["items.ids"], arrays["items.titles"], arrays["users"]
        out._side = {s: arrays[f"items.{s}"] for s in meta["sides"]}
        out.popularity = ItemPopularity(arrays["popularity.item_ids"],
                                        *(arrays[f"popularity.{k}"] for k in ItemPopularity.COLUMNS))
        out._queries = _Timeline(arrays["queries.keys"], {"words": arrays["queries.words"]})
        out._actions = {a: _Timeline(arrays[f"actions.{a}.keys"],
                                     {k: arrays[f"actions.{a}.{k}"] for k in ("item", "row")}) for a in meta["actions"]}
        return out

    # ------------------------------------------------------------------------------------------ rows

    def examples(self, days: Iterable[int]) -> pa.Table:
        """Training examples of ``days``: one row per (search event, positive item).

        Args:
            days: day numbers of ``search_events`` (e.g. the manifest's ``train_days``).

        Returns:
            columns ``event_id``, ``user_id``, ``ts`` (int64 epoch ms), ``query``, ``query_words``, ``item_id``.
        """
        return explode_positives(self._read_events(days))

    def events(self, days: Iterable[int]) -> pa.Table:
        """Evaluation events of ``days``: one row per search event with at least one positive.

        Args:
            days: day numbers of ``search_events`` (e.g. the manifest's ``test_days``).

        Returns:
            columns ``event_id``, ``user_id``, ``ts`` (int64 epoch ms), ``query``, ``query_words``,
            ``target_item_ids`` (list<int64>: clicked ∪ bought).
        """
        events = self._read_events(days)
        parent, items = _positive_pairs(events)
        rows, counts = np.unique(parent, return_counts=True)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        targets = pa.ListArray.from_arrays(pa.array(offsets), pa.array(items, pa.int64()))
        return _event_columns(events.take(pa.array(rows))).append_column("target_item_ids", targets)

    def _read_events(self, days: Iterable[int]) -> pa.Table:
        """The :data:`EXPLODE_COLUMNS` of the search events of ``days``, in file order."""
        return _read(self.world, "search_events", sorted(set(days)), EXPLODE_COLUMNS)

    # ------------------------------------------------------------------------------------ features

    def __call__(self, batch: Batch) -> dict[str, np.ndarray]:
        """Features of a batch of rows (see the module docstring for keys, shapes and padding).

        Args:
            batch: rows of :meth:`examples` or :meth:`events`, or a serving request, as a ``pa.Table`` or
                a Ray Data numpy batch (dict of arrays). Needs ``user_id``, ``ts`` (epoch ms or a timestamp)
                and ``query``; ``query_words``, ``event_id`` and ``item_id`` are optional.

        Returns:
            dict of int64 arrays, each with the batch size as first dimension.
        """
        if isinstance(batch, pa.RecordBatch):
            batch = pa.Table.from_batches([batch])
        user, ts = _int64(_column(batch, "user_id")), _int64(_column(batch, "ts"))
        event = _column(batch, "event_id", required=False)
        out = {"user_id": user, "ts": ts,
               "event_id": np.full(len(user), MISSING, np.int64) if event is None else _int64(event)}
        out.update(self._query_features(batch))
        out.update(self._history_features(user, ts))
        item = _column(batch, "item_id", required=False)
        if item is not None:  # a row with an event and an item is a training example: its own search is left out
            out.update(self.items(_int64(item), own=out["event_id"] >= 0))
        return out

    def items(self, item_ids: np.ndarray, own: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Item-tower features of any item ids.

        Args:
            item_ids: [B] raw item ids; ids not in the items table get an all-PAD title and -1 side information.
            own: [B] bool, rows that are a training example's own (search, positive item): their popularity
                leaves that search out (:class:`ItemPopularity`).

        Returns:
            ``item_id`` [B], ``item_title`` [B, title_words_kept] (word ids, PAD 0), the side information
            ``item_shop``, ``item_leaf``, ``item_cate1``, ``item_brand``, ``item_price`` [B] (-1 when missing) and
            the popularity levels ``item_impressions``, ``item_clicks`` [B] (0 when never shown or clicked).
        """
        item_ids = np.asarray(item_ids, np.int64)
        rows = self._item_rows(item_ids)
        out = {"item_id": item_ids, "item_title": self._titles[rows].astype(np.int64)}
        out.update({f"item_{s}": self._side[s][rows] for s in SIDE})
        out.update(self.popularity.levels(item_ids, own))
        return out

    def _query_features(self, batch: Batch) -> dict[str, np.ndarray]:
        """``query_chars`` / ``query_bigrams`` / ``query_words`` of the batch's queries."""
        c, tok = self.config, self._tokenizer
        queries = _strings(_column(batch, "query"))
        words = _column(batch, "query_words", required=False)
        words = _lower(_list_array(words)) if words is not None else [tok.words(q) for q in queries]
        return {"query_chars": self._encode("chars", [tok.chars(q) for q in queries], c.query_chars_kept),
                "query_bigrams": self._encode("bigrams", [tok.bigrams(q) for q in queries], c.query_bigrams_kept),
                "query_words": self._encode("words", words, c.query_words_kept)}

    def _encode(self, kind: Kind, column: pa.Array | list[list[str]], width: int) -> np.ndarray:
        return _pad_csr(*self.vocab.encode(kind, column), width)

    def _history_features(self, user: np.ndarray, ts: np.ndarray) -> dict[str, np.ndarray]:
        """History queries and the R^u / S^u / L^u sequences of each (user, ts)."""
        c = self.config
        rank = self._ranks(user)
        short_ms, long_ms = round(c.short_days * DAY_MS), round(c.long_days * DAY_MS)
        out = {"his_query_words": self._his_queries(rank, ts)}
        clicks = self._actions["click"]
        end = self._position(clicks, rank, ts)
        rt_lo = np.maximum(self._position(clicks, rank, None), end - c.realtime_len)
        st_lo = np.minimum(np.maximum(self._position(clicks, rank, ts - short_ms), rt_lo - c.short_len), rt_lo)
        for prefix, lo, hi, width in (("rt", rt_lo, end, c.realtime_len), ("st", st_lo, rt_lo, c.short_len)):
            out.update(self._gather(clicks, lo, hi, width, prefix, ("item", *SIDE)))
        long_parts = []
        for action in LONG_ACTIONS:
            tl = self._actions[action]
            hi = self._position(tl, rank, ts - short_ms)
            lo = np.maximum(self._position(tl, rank, ts - long_ms), hi - c.long_len)
            long_parts.append(self._gather(tl, lo, hi, c.long_len, "lt", ("item", *LONG_SIDE)))
        out.update({k: np.stack([p[k] for p in long_parts], axis=1) for k in long_parts[0]})
        return out

    def _his_queries(self, rank: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """[B, his_queries, query_words_kept]: the latest earlier queries, most recent first."""
        tl, k = self._queries, self.config.his_queries
        end = self._position(tl, rank, ts)
        lo = np.maximum(self._position(tl, rank, None), end - k)
        idx = end[:, None] - 1 - np.arange(k)
        idx = np.where(idx >= lo[:, None], idx, tl.pad_row)
        return tl.payload["words"][idx].astype(np.int64)

    def _gather(self, tl: _Timeline, lo: np.ndarray, hi: np.ndarray, width: int, prefix: str,
                fields: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Rows [lo, hi) of ``tl`` (hi - lo <= width) as [B, width] arrays, oldest first, right-padded with -1."""
        offset = np.arange(width)
        idx = np.where(offset < (hi - lo)[:, None], lo[:, None] + offset, tl.pad_row)
        rows = tl.payload["row"][idx]
        out = {f"{prefix}_item": tl.payload["item"][idx]}
        out.update({f"{prefix}_{f}": self._side[f][rows] for f in fields if f != "item"})
        return out

    def _position(self, tl: _Timeline, rank: np.ndarray, ts: np.ndarray | None) -> np.ndarray:
        """[B] index of the user's first row with ts >= ``ts`` (None: the user's first row); 0 for unknown users."""
        offset = np.zeros_like(rank) if ts is None else np.clip(ts - self._ts0, 0, self._span - 1)
        pos = np.searchsorted(tl.keys, np.maximum(rank, 0) * self._span + offset, side="left")
        return np.where(rank >= 0, pos, 0)

    def _ranks(self, user: np.ndarray) -> np.ndarray:
        """[B] rank of each user among the users with history; -1 for a user without any."""
        if not len(self._users):
            return np.full(len(user), -1, np.int64)
        rank, known = sorted_lookup(self._users, user)
        return np.where(known, rank, -1)

    # ---------------------------------------------------------------------------------- loading

    def _load_items(self) -> None:
        """Sorted item ids, their title word ids and side information, each with a trailing padding row."""
        items = _read(self.world, "items", None, ITEM_COLUMNS)
        items = items.take(pa.array(np.argsort(items["item_id"].to_numpy(), kind="stable")))
        context = self._context or ItemContext(PriceLevels(_fill(items["leaf_id"]), _prices(items["price"])),
                                               ItemPopularity.of_world(self.world))
        self.popularity = context.popularity
        f = item_features(items, self.vocab, self.config.title_words_kept, context)
        self._item_ids = f["item_id"]
        self._titles = _with_pad_row(f["item_title"].astype(np.int32), PAD)
        self._side = {s: _with_pad_row(f[f"item_{s}"], MISSING) for s in SIDE}

    def _item_rows(self, item_ids: np.ndarray) -> np.ndarray:
        """Row of each id in the sorted items arrays; the padding row for unknown ids."""
        rows, found = sorted_lookup(self._item_ids, item_ids)
        return np.where(found, rows, len(self._item_ids))

    def _behaviour_timeline(self, user: np.ndarray, ts: np.ndarray, item: np.ndarray, mask: np.ndarray) -> _Timeline:
        """The behaviours selected by ``mask``: item ids and their rows in the items arrays, by (user, ts)."""
        rows = self._item_rows(item[mask])
        payload = {"item": _with_pad_row(item[mask], MISSING), "row": _with_pad_row(rows, len(self._item_ids))}
        return self._timeline(user[mask], ts[mask], payload)

    def _timeline(self, user: np.ndarray, ts: np.ndarray, payload: dict[str, np.ndarray]) -> _Timeline:
        """Sort rows by (user, ts), ties in file order; ``payload`` arrays carry one padding row at the end."""
        keys = np.searchsorted(self._users, user) * self._span + (ts - self._ts0)
        order = np.argsort(keys, kind="stable")
        sorted_payload = {k: np.concatenate([v[:-1][order], v[-1:]]) for k, v in payload.items()}
        return _Timeline(keys[order], sorted_payload)


# ------------------------------------------------------------------------------------------- helpers


class PriceLevels:
    """Price level of any (leaf, price): how many of the leaf's decile edges lie below the price (0 cheapest ...
    ``levels - 1`` dearest), with the edges cut from a catalogue; -1 for a missing price or leaf, or a leaf the
    catalogue has no priced item of. Small and picklable: Ray Data's embedding actors get the driver's.

    Args:
        leaf: (N,) leaf ids of the catalogue (-1 missing); price: (N,) prices (NaN missing).

    Example:
        >>> levels = PriceLevels(np.array([0, 0, 0, 0, 1]), np.array([1.0, 5.0, 7.0, 9.0, 3.0]), levels=4)
        >>> levels(np.array([0, 0, 0, 0, 1, 2, 0]), np.array([1.0, 5.0, 7.0, 9.0, 3.0, 3.0, np.nan])).tolist()
        [0, 1, 2, 3, 0, -1, -1]
    """

    def __init__(self, leaf: np.ndarray, price: np.ndarray, levels: int = PRICE_LEVELS) -> None:
        ok = (leaf >= 0) & np.isfinite(price)
        lf, pr = leaf[ok], price[ok]
        order = np.lexsort((pr, lf))
        lf, pr = lf[order], pr[order]
        self.leaves, start, count = np.unique(lf, return_index=True, return_counts=True)
        # edge j: the dearest price of the leaf's j-th 1/levels by rank (G, levels - 1); one-item leaves: its price
        self.edges = pr[start[:, None] + np.maximum((np.arange(1, levels) * count[:, None]) // levels - 1, 0)]

    def __call__(self, leaf: np.ndarray, price: np.ndarray) -> np.ndarray:
        """(N,) int64 levels of items with these leaf ids and prices."""
        if not len(self.leaves):
            return np.full(len(leaf), MISSING, np.int64)
        g, found = sorted_lookup(self.leaves, leaf)
        known = (leaf >= 0) & np.isfinite(price) & found
        return np.where(known, (self.edges[g] < price[:, None]).sum(1), MISSING).astype(np.int64)

    @classmethod
    def of_world(cls, world: str | Path) -> PriceLevels:
        """The edges of a world's catalogue (its ``items`` table)."""
        items = _read(Path(world), "items", None, ["leaf_id", "price"])
        return cls(_fill(items["leaf_id"]), _prices(items["price"]))

    def to_json(self) -> str:
        """The edges as JSON (floats written exactly: ``from_json`` gives equal edges).

        >>> levels = PriceLevels(np.array([3, 3, 7]), np.array([1.5, 2.25, 9.0]), levels=2)
        >>> again = PriceLevels.from_json(levels.to_json())
        >>> again(np.array([3, 3, 7]), np.array([1.5, 2.25, 9.0])).tolist()
        [0, 1, 0]
        """
        return json.dumps({"levels": self.edges.shape[1] + 1,
                           "leaves": self.leaves.tolist(), "edges": self.edges.tolist()})

    @classmethod
    def from_json(cls, text: str) -> PriceLevels:
        data = json.loads(text)
        out = cls.__new__(cls)
        out.leaves = np.asarray(data["leaves"], np.int64)
        out.edges = np.asarray(data["edges"], np.float64).reshape(len(out.leaves), data["levels"] - 1)
        return out


class ItemPopularity:
    """How often each item was shown and clicked in search logs, as log2 levels: the exposure and click counts a
    production item tower reads from its feature store (not in the paper; ``ModelConfig.item_popularity``).

    ``levels(ids)`` gives ``item_impressions`` and ``item_clicks``, each ``min(floor(log2(1 + count)), LEVELS - 1)``
    (0 = never shown/clicked, also for ids the logs never saw). ``own`` marks rows that are a training example's
    own (event, positive item): their counts leave that event out (one impression and one click less, floored at
    0), so training sees "shown and clicked in other searches", as evaluation and serving do, and a model cannot
    learn that an item was clicked from the click it is trained on. Small, picklable: Ray Data's actors get the
    driver's.

    Args:
        item_ids: (N,) distinct item ids; impressions, clicks: (N,) their counts.

    Example:
        >>> pop = ItemPopularity(np.array([7, 3]), np.array([1, 40]), np.array([0, 3]))
        >>> {k: v.tolist() for k, v in pop.levels(np.array([3, 7, 5])).items()}
        {'item_impressions': [5, 1, 0], 'item_clicks': [2, 0, 0]}
        >>> pop.levels(np.array([3]), own=np.array([True]))["item_clicks"].tolist()  # 2 clicks in other searches
        [1]
    """

    COLUMNS = ("impressions", "clicks")

    def __init__(self, item_ids: np.ndarray, impressions: np.ndarray, clicks: np.ndarray) -> None:
        order = np.argsort(item_ids, kind="stable")
        self.item_ids = np.asarray(item_ids, np.int64)[order]
        self.counts = {"impressions": np.asarray(impressions, np.int64)[order],
                       "clicks": np.asarray(clicks, np.int64)[order]}

    def count(self, name: str, item_ids: np.ndarray) -> np.ndarray:
        """(B,) int64 ``impressions`` or ``clicks`` of ``item_ids`` (0 for ids the logs never saw)."""
        item_ids = np.asarray(item_ids, np.int64)
        if not len(self.item_ids):
            return np.zeros(len(item_ids), np.int64)
        rows, found = sorted_lookup(self.item_ids, item_ids)
        return np.where(found, self.counts[name][rows], 0)

    def levels(self, item_ids: np.ndarray, own: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """``item_impressions``, ``item_clicks``: (B,) int64 levels of ``item_ids`` (see the class docstring)."""
        out = {}
        for name in self.COLUMNS:
            c = self.count(name, item_ids)
            if own is not None:
                c = np.maximum(c - own.astype(np.int64), 0)
            out[f"item_{name}"] = np.minimum(np.log2(1 + c).astype(np.int64), POPULARITY_LEVELS - 1)
        return out

    @classmethod
    def of_world(cls, world: str | Path, days: Iterable[int] | None = None) -> ItemPopularity:
        """Counts over the ``search_events`` of ``days`` (default: the manifest's ``train_days``), a day at a time;
        empty when the world logs no searches on those days (or is a bare catalogue, without a manifest)."""
        world = Path(world)
        if days is None:
            days = read_manifest(world).train_days if (world / schema.MANIFEST).is_file() else []
        days = sorted(set(days))
        parts = []
        if days and table_files(world, schema.TABLES["search_events"]):
            for day in days:
                t = read_table(world, "search_events", days=[day], columns=["impressed_item_ids", "clicked_item_ids"])
                for name, column in zip(cls.COLUMNS, t.column_names, strict=True):
                    counts = pc.value_counts(pc.list_flatten(t[column].combine_chunks()))
                    parts.append(pa.table({"item_id": counts.field("values").cast(pa.int64()),
                                           name: counts.field("counts")}))
        if not parts:
            return cls.empty()
        merged = pa.concat_tables(parts, promote_options="default")
        # one thread: Acero's multi-threaded group_by failed once with "ArrowIndexError: thread index 11 is out of
        # range [0, 11)" in a long test process that had run Ray Data (pyarrow 26); the sums are small
        total = merged.group_by("item_id", use_threads=False).aggregate([(c, "sum") for c in cls.COLUMNS])
        return cls(total["item_id"].to_numpy(),
                   *(total[f"{c}_sum"].fill_null(0).to_numpy().astype(np.int64) for c in cls.COLUMNS))

    @classmethod
    def empty(cls) -> ItemPopularity:
        """No counts: every item at level 0."""
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))

    def to_parquet(self, path: str | Path) -> None:
        """The counts as a Parquet file (``item_id``, ``impressions``, ``clicks``)."""
        pq.write_table(pa.table({"item_id": self.item_ids, **self.counts}), path)

    @classmethod
    def from_parquet(cls, path: str | Path) -> ItemPopularity:
        t = pq.read_table(path)
        return cls(*(t[c].to_numpy() for c in ("item_id", *cls.COLUMNS)))


@dataclass(frozen=True)
class ItemContext:
    """What item features read besides the item's own row: the price levels' edges and the popularity counts.
    Training takes both from its world (``of_world``); a model bundle keeps them, and embedding, serving and delta
    updates read the bundle's (``bundle.item_context``), so an item's features do not move with later data."""

    prices: PriceLevels
    popularity: ItemPopularity

    @classmethod
    def of_world(cls, world: str | Path) -> ItemContext:
        """The edges of the world's catalogue and the counts of its training days."""
        return cls(PriceLevels.of_world(world), ItemPopularity.of_world(world))


ITEM_COLUMNS = ["item_id", "title_words", "price", *(f"{s}_id" for s in ID_SIDE)]
"""Columns of the ``items`` table that item features are made from."""


def item_features(items: pa.Table, vocab: Vocabulary, title_words_kept: int,
                  context: ItemContext) -> dict[str, np.ndarray]:
    """Item-tower features of rows of the ``items`` table (``ITEM_COLUMNS``), in row order: ``item_id``,
    ``item_title`` (word ids, PAD 0), ``item_<side>`` (-1 when missing) and the popularity levels, as
    ``Featurizer.items`` returns."""
    out = {"item_id": items["item_id"].to_numpy().astype(np.int64),
           "item_title": encode_words(vocab, items["title_words"], title_words_kept).astype(np.int64)}
    out.update({f"item_{s}": _fill(items[f"{s}_id"]) for s in ID_SIDE})
    out["item_price"] = context.prices(out["item_leaf"], _prices(items["price"]))
    out.update(context.popularity.levels(out["item_id"]))
    return out


def _prices(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return column.to_numpy(zero_copy_only=False).astype(np.float64)  # nulls -> NaN


def explode_positives(events: pa.Table) -> pa.Table:
    """One row per (search event, positive item): the rows of :meth:`Featurizer.examples` (module docstring).

    Args:
        events: rows of ``search_events`` with at least the :data:`EXPLODE_COLUMNS` (others are dropped).

    Returns:
        columns ``event_id``, ``user_id``, ``ts`` (int64 epoch ms), ``query``, ``query_words``, ``item_id``;
        positives are clicked ∪ bought, deduplicated per event, clicked order first; events in input order.
    """
    parent, items = _positive_pairs(events)
    return _event_columns(events.take(pa.array(parent))).append_column("item_id", pa.array(items, pa.int64()))


def _positive_pairs(events: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Deduplicated positives of each event as (event row, item id) pairs, in row order, clicked first."""
    parts = [events[c].combine_chunks() for c in POSITIVE_COLUMNS]
    parent = np.concatenate([pc.list_parent_indices(p).to_numpy() for p in parts]).astype(np.int64)
    items = np.concatenate([pc.list_flatten(p).to_numpy() for p in parts]).astype(np.int64)
    by_pair = np.lexsort((np.arange(len(items)), items, parent))
    first = np.ones(len(by_pair), bool)
    first[1:] = (parent[by_pair][1:] != parent[by_pair][:-1]) | (items[by_pair][1:] != items[by_pair][:-1])
    kept = np.sort(by_pair[first])
    kept = kept[np.argsort(parent[kept], kind="stable")]
    return parent[kept], items[kept]


def _read(world: Path, name: str, days: list[int] | None, columns: list[str], **kwargs: Any) -> pa.Table:
    """A table of the world (``kwargs``: ``pq.read_table``'s, e.g. ``filters``); a ``ValueError`` naming the world
    and the table when it is absent."""
    if not table_files(world, schema.TABLES[name]):
        raise ValueError(f"world {world}: table {name!r} is missing")
    return read_table(world, name, days=days, columns=columns, **kwargs)


def _event_columns(events: pa.Table) -> pa.Table:
    """The event columns of examples/events, with ``ts`` as int64 epoch ms."""
    return schema.with_epoch_ms(events.select(EVENT_COLUMNS))


def _fill(column: pa.ChunkedArray) -> np.ndarray:
    """int64 numpy copy of an id column, nulls -> -1."""
    return column.fill_null(MISSING).to_numpy().astype(np.int64)


def _with_pad_row(values: np.ndarray, pad: int) -> np.ndarray:
    """``values`` with one more row filled with ``pad`` at the end (the target of padded gathers)."""
    return np.concatenate([values, np.full((1, *values.shape[1:]), pad, values.dtype)])


def encode_words(vocab: Vocabulary, column: pa.Array | pa.ChunkedArray, width: int) -> np.ndarray:
    """Word ids [rows, width] of a ``list<string>`` column (titles, queries), lower-cased as the vocabulary
    counts words, left-aligned, truncated, PAD 0."""
    return _pad_csr(*vocab.encode("words", _lower(column)), width)


def _pad_csr(ids: np.ndarray, offsets: np.ndarray, width: int) -> np.ndarray:
    """CSR rows (flat ids, offsets of len rows + 1) -> [rows, width] int64, left-aligned, truncated, PAD 0.

    Example:
        >>> _pad_csr(np.array([5, 6, 7]), np.array([0, 2, 2, 3]), 1).tolist()
        [[5], [0], [7]]
    """
    lengths = np.minimum(np.diff(offsets), width)
    offset = np.arange(width)
    valid = offset < lengths[:, None]
    out = np.full((len(lengths), width), PAD, np.int64)
    out[valid] = ids[(offsets[:-1, None] + offset)[valid]]
    return out


def _lower(column: pa.Array | pa.ChunkedArray) -> pa.ListArray:
    """A ``list<string>`` column with every string lower-cased (nulls become empty lists)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pc.utf8_lower(pc.list_flatten(column)))


def _column(batch: Batch, name: str, required: bool = True) -> Any:
    """A column of a table or a numpy batch; None when absent and not required."""
    present = name in batch.column_names if isinstance(batch, pa.Table) else name in batch
    if not present:
        if required:
            raise ValueError(f"featurizer batch has no column {name!r}")
        return None
    return batch[name]


def _int64(column: Any) -> np.ndarray:
    """[B] int64 of an Arrow or numpy column; timestamps become epoch ms."""
    if isinstance(column, pa.Array | pa.ChunkedArray):
        return schema.epoch_ms(column)
    column = np.asarray(column)
    if np.issubdtype(column.dtype, np.datetime64):
        return column.astype("datetime64[ms]").astype(np.int64)
    return column.astype(np.int64)


def _strings(column: Any) -> list[str]:
    """Python strings of an Arrow or numpy string column (null -> "")."""
    values = column.to_pylist() if isinstance(column, pa.Array | pa.ChunkedArray) else np.asarray(column).tolist()
    return [v or "" for v in values]


def _list_array(column: Any) -> pa.Array | pa.ChunkedArray:
    """An Arrow ``list<string>`` of an Arrow column or of a numpy column (object array of lists or a 2-D array)."""
    if isinstance(column, pa.Array | pa.ChunkedArray):
        return column
    column = np.asarray(column, dtype=object)
    return pa.array(list(column) if column.ndim == 2 else column, pa.list_(pa.string()))
