"""JDsearch (JD.com personalised product search) sample -> a world with users' search logs and history.

Input: ``sessions.parquet`` and ``products.parquet`` of ``shared/data/jdsearch_sample`` (the authors'
public sample, parsed to Parquet; see that folder's README). JD anonymised all text into integer term ids,
so words are written ``t<id>`` and texts are those words joined by spaces.

Mapping:

* ``items``: one per product; item_id = wid, external_id = str(wid), title_words = name term ids,
  title = the words joined by spaces, leaf_id = the deepest non-missing of cate_id_1..4, cate1_id =
  cate_id_1, brand_id, shop_id (``-1`` / empty ids become null).
* ``categories``: one row per leaf: leaf_name / cate1_name ``cate<id>``, terms = the leaf level's name term
  ids, attribute_slots [].
* ``brands``: name = brand-name terms joined (``brand<id>`` when empty), cate1_ids = first-level
  categories of its items. ``shops``: name ``shop<id>``, brand_ids = brands of its items.
* ``search_events``: one per user (the test search): event_id = session_id = user_id = user_row, on day
  ``test_day`` at ``test_time`` UTC; impressed = candidate_wids in shown order, clicked = label >= 1,
  bought = label == 3; intents unknown (null / []).
* ``behaviours``: the user's history (CLICK->click, CART->cart, ORD->buy, FLW->collect; source ``search``
  when the history entry has a query, else ``browse``). Timestamps are rebuilt from ``history_time_deltas``
  counted backwards from the test search; the unit of the deltas is not documented and is taken as
  seconds (option ``delta_seconds``). Each behaviour goes into the day file of its timestamp. Behaviours
  on products missing from ``products.parquet`` are dropped (count in the manifest notes).
* ``query_history``: a row per run of consecutive history entries with the same non-empty query (at the
  first entry's time), plus each user's test query at the test search's time.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ray_mgdspr.data import schema
from ray_mgdspr.data.loaders._common import real_items_table
from ray_mgdspr.data.world import WorldManifest, WorldWriter

log = logging.getLogger(__name__)

SESSIONS_FILE = "sessions.parquet"
PRODUCTS_FILE = "products.parquet"

SESSION_COLUMNS = (
    "user_row",
    "query_terms",
    "candidate_wids",
    "candidate_labels",
    "history_query_terms",
    "history_wids",
    "history_types",
    "history_time_deltas",
)
PRODUCT_COLUMNS = (
    "wid",
    "name_terms",
    "brand_id",
    "brand_name_terms",
    "cate_id_1",
    "cate_id_2",
    "cate_id_3",
    "cate_id_4",
    "cate_name_1_terms",
    "cate_name_2_terms",
    "cate_name_3_terms",
    "cate_name_4_terms",
    "shop_id",
)
ACTIONS = {"CLICK": "click", "CART": "cart", "ORD": "buy", "FLW": "collect"}
LABELS = (0, 1, 2, 3)
"""Candidate labels: 0 none, 1 click, 2 add to cart, 3 purchase."""

DEFAULT_BASE_DATE = dt.date(2020, 12, 1)
INT32_MAX = 2**31 - 1
SOURCE = (
    "JDsearch public sample (https://github.com/rucliujn/JDsearch @0cdbfb403c2b2abb195cac50bb0c8dc49ee0f143: "
    "user_behavior_data_sample.txt, product_meta_data_sample.txt)"
)
LICENCE = (
    "CC BY-NC-SA 4.0 (JDsearch data: attribution, non-commercial use only, share-alike; derived data "
    "carries the same licence)"
)


def load_jdsearch(
    src: str | Path,
    out: str | Path,
    overwrite: bool = False,
    *,
    base_date: dt.date = DEFAULT_BASE_DATE,
    test_day: int = 8,
    test_time: dt.time = dt.time(12, 0),
    delta_seconds: float = 1.0,
) -> WorldManifest:
    """Load the JDsearch sample directory ``src`` into world ``out``.

    ``test_day`` / ``test_time``: when every user's test search is placed (the sample has no dates);
    ``delta_seconds``: seconds per unit of ``history_time_deltas`` (undocumented by the source; 1 = seconds).
    """
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(
            f"{src}: not a directory (expected {SESSIONS_FILE} and {PRODUCTS_FILE} in it)"
        )
    if test_day < 1:
        raise ValueError(f"jdsearch: test_day must be >= 1 (got {test_day})")
    if delta_seconds <= 0:
        raise ValueError(f"jdsearch: delta_seconds must be > 0 (got {delta_seconds})")
    sessions_path, products_path = src / SESSIONS_FILE, src / PRODUCTS_FILE
    for p in (sessions_path, products_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"{p}: missing (a JDsearch sample directory holds {SESSIONS_FILE} and {PRODUCTS_FILE})"
            )
    manifest = WorldManifest(
        synthetic=False,
        source=SOURCE,
        lang="en",
        base_date=base_date,
        licence=LICENCE,
        test_days=[test_day],
        train_days=list(range(1, test_day)),
        config={
            "loader": "jdsearch",
            "src": str(src),
            "test_day": test_day,
            "test_time": test_time.isoformat(),
            "delta_seconds": delta_seconds,
        },
    )
    with WorldWriter(out, overwrite=overwrite) as w:
        products = _read(products_path, PRODUCT_COLUMNS)
        catalogue = _catalogue(products_path, products)
        for spec, table in catalogue.tables:
            w.write(spec, table)
        sessions = _read(sessions_path, SESSION_COLUMNS)
        test_ts = int(
            dt.datetime.combine(manifest.day_start(test_day).date(), test_time, tzinfo=dt.UTC).timestamp()
        )
        logs = _logs(sessions_path, sessions, catalogue.wids, manifest, test_day, test_ts, delta_seconds)
        w.write(schema.SEARCH_EVENTS, _typed(logs.events, schema.SEARCH_EVENTS), day=test_day)
        for day, rows in sorted(logs.behaviours.items()):
            w.write(schema.BEHAVIOURS, _sorted_rows(rows, schema.BEHAVIOURS), day=day)
        for day, rows in sorted(logs.queries.items()):
            w.write(schema.QUERY_HISTORY, _sorted_rows(rows, schema.QUERY_HISTORY), day=day)
        days = sorted({*logs.behaviours, *logs.queries})
        if days and days[0] <= 0:
            manifest.history_days = list(range(days[0], 1))
        manifest.notes = (
            "Real JD.com sample (3 users), anonymised: words are JD term ids written t<id>, texts are those "
            "words joined by spaces (hence lang en: whitespace segmentation). The sample has no dates: "
            f"base_date is arbitrary and every user's test search is placed on day {test_day} at "
            f"{test_time.isoformat()} UTC. ASSUMPTION: history_time_deltas are in seconds "
            f"(x{delta_seconds}; the unit is not documented), counted backwards from the test search; each "
            "behaviour is put in the day file of its timestamp, so history spans warm-up days <= 0 and also "
            f"train days 1..{test_day - 1} (no search events there) and the test day. "
            f"Dropped {logs.dropped_behaviours} history behaviours whose wid is missing from {PRODUCTS_FILE} "
            f"and {logs.dropped_impressions} shown candidates missing from it. clicked = label >= 1 "
            "(click, cart, purchase), bought = label == 3; FLW (follow) -> collect. query_history: one row "
            "per run of consecutive history entries with the same non-empty query, plus each test query. "
            "Missing ids (-1 / empty) are null; intents are unknown (null / [])."
        )
        w.commit(manifest)
    log.info("jdsearch: %s", manifest.tables)
    return manifest


# --------------------------------------------------------------------------------------------------
# catalogue


class _Catalogue:
    def __init__(self, tables: list[tuple[schema.TableSpec, pa.Table]], wids: set[int]) -> None:
        self.tables, self.wids = tables, wids


def _catalogue(path: Path, p: dict[str, list[Any]]) -> _Catalogue:
    n = len(p["wid"])
    wids = _ints(path, "wid", p["wid"], int64=True)
    if any(w is None for w in wids):
        raise ValueError(f"{path}: column 'wid' row {wids.index(None)}: missing product id")
    seen: set[int] = set()
    for i, wid in enumerate(wids):
        if wid in seen:
            raise ValueError(f"{path}: column 'wid' row {i}: duplicate product id {wid}")
        seen.add(wid)
    cate = [_ints(path, f"cate_id_{k}", p[f"cate_id_{k}"]) for k in (1, 2, 3, 4)]
    brand = _ints(path, "brand_id", p["brand_id"])
    shop = _ints(path, "shop_id", p["shop_id"])
    leaf: list[int | None] = []
    leaves: dict[int, dict[str, Any]] = {}
    brand_names: dict[int, str] = {}
    brand_cate1: dict[int, set[int]] = defaultdict(set)
    shop_brands: dict[int, set[int]] = defaultdict(set)
    for i in range(n):
        level = next((k for k in (3, 2, 1, 0) if cate[k][i] is not None), None)
        leaf_id = None if level is None else cate[level][i]
        leaf.append(leaf_id)
        c1 = cate[0][i]
        if leaf_id is not None:
            row = {
                "cate1_id": schema.NO_ID if c1 is None else c1,
                "terms": _words(p[f"cate_name_{level + 1}_terms"][i]),
            }
            if leaf_id not in leaves:
                leaves[leaf_id] = row
            elif leaves[leaf_id]["cate1_id"] != row["cate1_id"]:
                log.warning(
                    "jdsearch: %s row %d: leaf %d under first-level %s and %s; keeping the first",
                    path,
                    i,
                    leaf_id,
                    leaves[leaf_id]["cate1_id"],
                    row["cate1_id"],
                )
        if brand[i] is not None:
            if brand[i] not in brand_names:
                words = _words(p["brand_name_terms"][i])
                brand_names[brand[i]] = " ".join(words) if words else f"brand{brand[i]}"
            if c1 is not None:
                brand_cate1[brand[i]].add(c1)
        if shop[i] is not None:
            shop_brands.setdefault(shop[i], set())
            if brand[i] is not None:
                shop_brands[shop[i]].add(brand[i])

    title_words = [_words(t) for t in p["name_terms"]]
    leaf_ids = sorted(leaves)
    brand_ids = sorted(brand_names)
    shop_ids = sorted(shop_brands)
    tables = [
        (
            schema.CATEGORIES,
            pa.table(
                {
                    "leaf_id": pa.array(leaf_ids, pa.int32()),
                    "leaf_name": [f"cate{c}" for c in leaf_ids],
                    "cate1_id": pa.array([leaves[c]["cate1_id"] for c in leaf_ids], pa.int32()),
                    "cate1_name": [
                        f"cate{leaves[c]['cate1_id']}" if leaves[c]["cate1_id"] != schema.NO_ID else ""
                        for c in leaf_ids
                    ],
                    "terms": [leaves[c]["terms"] for c in leaf_ids],
                    "attribute_slots": pa.array([[] for _ in leaf_ids], pa.list_(pa.string())),
                }
            ),
        ),
        (
            schema.BRANDS,
            pa.table(
                {
                    "brand_id": pa.array(brand_ids, pa.int32()),
                    "name": [brand_names[b] for b in brand_ids],
                    "cate1_ids": pa.array([sorted(brand_cate1[b]) for b in brand_ids], pa.list_(pa.int32())),
                    "popularity": pa.nulls(len(brand_ids), pa.float32()),
                }
            ),
        ),
        (
            schema.SHOPS,
            pa.table(
                {
                    "shop_id": pa.array(shop_ids, pa.int32()),
                    "name": [f"shop{s}" for s in shop_ids],
                    "brand_ids": pa.array([sorted(shop_brands[s]) for s in shop_ids], pa.list_(pa.int32())),
                }
            ),
        ),
        (
            schema.ITEMS,
            real_items_table(
                wids,
                [" ".join(t) for t in title_words],
                title_words,
                [str(w) for w in wids],
                leaf_id=leaf,
                cate1_id=cate[0],
                brand_id=brand,
                shop_id=shop,
            ).sort_by("item_id"),
        ),
    ]
    return _Catalogue(tables, set(wids))


# --------------------------------------------------------------------------------------------------
# search logs and history


class _Logs:
    def __init__(self) -> None:
        self.events: dict[str, list[Any]] = {n: [] for n in schema.SEARCH_EVENTS.schema.names}
        self.behaviours: dict[int, list[dict[str, Any]]] = defaultdict(list)
        self.queries: dict[int, list[dict[str, Any]]] = defaultdict(list)
        self.dropped_behaviours = 0
        self.dropped_impressions = 0


def _logs(
    path: Path,
    s: dict[str, list[Any]],
    wids: set[int],
    manifest: WorldManifest,
    test_day: int,
    test_ts: int,
    delta_seconds: float,
) -> _Logs:
    out = _Logs()
    day1 = int(manifest.day_start(1).timestamp())
    users = _ints(path, "user_row", s["user_row"], int64=True)
    for r, user in enumerate(users):
        if user is None:
            raise ValueError(f"{path}: column 'user_row' row {r}: missing user id")
        cands = [int(c) for c in s["candidate_wids"][r] or []]
        labels = [float(x) for x in s["candidate_labels"][r] or []]
        if len(labels) != len(cands):
            raise ValueError(
                f"{path}: row {r}: candidate_labels has {len(labels)} entries, candidate_wids {len(cands)}"
            )
        bad = [x for x in labels if x not in LABELS]
        if bad:
            raise ValueError(
                f"{path}: column 'candidate_labels' row {r}: unknown label {bad[0]!r} "
                f"(expected {list(LABELS)})"
            )
        kept = [(c, x) for c, x in zip(cands, labels, strict=True) if c in wids]
        out.dropped_impressions += len(cands) - len(kept)
        query_words = _words(s["query_terms"][r])
        ev = out.events
        for name, value in (
            ("event_id", user),
            ("user_id", user),
            ("session_id", user),
            ("ts", test_ts),
            ("day", test_day),
            ("query", " ".join(query_words)),
            ("query_words", query_words),
            ("intent_leaf_id", None),
            ("intent_brand_id", None),
            ("intent_attr_value_ids", []),
            ("is_followup", False),
            ("impressed_item_ids", [c for c, _ in kept]),
            ("clicked_item_ids", [c for c, x in kept if x >= 1]),
            ("bought_item_ids", [c for c, x in kept if x == 3]),
            ("collected_item_ids", []),
        ):
            ev[name].append(value)
        out.queries[test_day].append(
            {
                "user_id": user,
                "ts": test_ts,
                "day": test_day,
                "query": " ".join(query_words),
                "query_words": query_words,
            }
        )
        _history(path, s, r, user, wids, test_ts, day1, delta_seconds, out)
    return out


def _history(
    path: Path,
    s: dict[str, list[Any]],
    r: int,
    user: int,
    wids: set[int],
    test_ts: int,
    day1: int,
    delta_seconds: float,
    out: _Logs,
) -> None:
    h_wids = [int(x) for x in s["history_wids"][r] or []]
    h_types = list(s["history_types"][r] or [])
    h_queries = list(s["history_query_terms"][r] or [])
    deltas = np.asarray(s["history_time_deltas"][r] or [], dtype=np.float64)
    n = len(h_wids)
    for col, got, want in (
        ("history_types", len(h_types), n),
        ("history_query_terms", len(h_queries), n),
        ("history_time_deltas", len(deltas), n + 1),
    ):
        if got != want:
            raise ValueError(
                f"{path}: column {col!r} row {r}: {got} entries, expected {want} (history_wids has {n})"
            )
    if (deltas < 0).any():
        raise ValueError(
            f"{path}: column 'history_time_deltas' row {r}: negative delta {deltas[deltas < 0][0]:g}"
        )
    # entry i happened sum(deltas[i+1:]) units before the test search (deltas[n] leads to the test search)
    before = np.cumsum(deltas[::-1])[::-1][1:] * delta_seconds
    ts = (test_ts - np.round(before)).astype(np.int64)
    days = (ts - day1) // 86_400 + 1
    prev_query: list[str] | None = None
    for i in range(n):
        kind = h_types[i]
        if kind not in ACTIONS:
            raise ValueError(
                f"{path}: column 'history_types' row {r}: unknown type {kind!r} (expected {list(ACTIONS)})"
            )
        words = _words(h_queries[i])
        day = int(days[i])
        if words and words != prev_query:
            out.queries[day].append(
                {
                    "user_id": user,
                    "ts": int(ts[i]),
                    "day": day,
                    "query": " ".join(words),
                    "query_words": words,
                }
            )
        prev_query = words
        if h_wids[i] not in wids:
            out.dropped_behaviours += 1
            continue
        out.behaviours[day].append(
            {
                "user_id": user,
                "item_id": h_wids[i],
                "action": ACTIONS[kind],
                "source": "search" if words else "browse",
                "ts": int(ts[i]),
                "day": day,
                "event_id": None,
            }
        )


# --------------------------------------------------------------------------------------------------
# helpers


def _read(path: Path, columns: Sequence[str]) -> dict[str, list[Any]]:
    have = pq.ParquetFile(path).schema_arrow.names
    missing = [c for c in columns if c not in have]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(map(repr, missing))} (found {have})")
    return pq.read_table(path, columns=list(columns)).to_pydict()


def _ints(path: Path, column: str, values: Iterable[Any], int64: bool = False) -> list[int | None]:
    """Ids as ints; None, '', '-1' and -1 become None. Errors name the file, column, row and value."""
    out: list[int | None] = []
    for i, v in enumerate(values):
        if v is None or (isinstance(v, str) and v.strip() in ("", "-1")):
            out.append(None)
            continue
        try:
            x = int(v.strip()) if isinstance(v, str) else int(v)
        except (TypeError, ValueError):
            raise ValueError(f"{path}: column {column!r} row {i}: {v!r} is not an integer id") from None
        if x == schema.NO_ID:
            out.append(None)
            continue
        if x < 0 or (not int64 and x > INT32_MAX):
            raise ValueError(
                f"{path}: column {column!r} row {i}: id {x} is out of range "
                f"(0..{INT32_MAX if not int64 else 2**63 - 1})"
            )
        out.append(x)
    return out


def _words(terms: Iterable[Any] | None) -> list[str]:
    return [f"t{int(t)}" for t in (terms or [])]


def _sorted_rows(rows: list[dict[str, Any]], spec: schema.TableSpec) -> pa.Table:
    rows = sorted(rows, key=lambda x: (x["ts"], x["user_id"]))
    return _typed({n: [row[n] for row in rows] for n in spec.schema.names}, spec)


def _typed(cols: dict[str, list[Any]], spec: schema.TableSpec) -> pa.Table:
    """Columns typed as ``spec`` declares; timestamps come in whole seconds (cast to the schema's unit)."""
    out = {}
    for n in spec.schema.names:
        typ = spec.schema.field(n).type
        if pa.types.is_timestamp(typ):
            out[n] = pa.array(cols[n], pa.timestamp("s", tz="UTC")).cast(typ)
        else:
            out[n] = pa.array(cols[n], typ)
    return pa.table(out)
