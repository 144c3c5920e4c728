"""Arrow schemas of every table the project reads or writes, and the layout of a "world" directory.

A world is one directory of Parquet tables plus a ``manifest.json``; the simulator writes one and the
real-data loaders write one, and everything downstream (validation, featurizer, training, evaluation)
reads only what is declared here.

Layout::

    WORLD/
      manifest.json              what produced it, synthetic or not, days, row counts
      categories.parquet         two-level category tree (first-level -> leaf) and leaf terms
      attributes.parquet         attribute values (colour=red, material=cotton, ...) and their terms
      brands.parquet             brands and the first-level categories they sell in
      shops.parquet              shops and the brands they sell
      items.parquet              the catalogue: titles, category, brand, shop, price, attributes
      users.parquet              the simulator's latent user preferences (synthetic worlds only)
      queries.parquet            standalone queries (real query sets: WANDS, ESCI)
      judgements.parquet         graded (query, item) relevance judgements (real sets: ESCI)
      search_events/day-XX.parquet   one row per search: query, intent, result page, clicks, buys
      behaviours/day-XX.parquet      one row per action (click/cart/buy/collect), search or browsing
      query_history/day-XX.parquet   every query a user issued, with time (history-query attention)

Day numbering follows the paper's split: days <= 0 are warm-up (history only), days 1..7 train,
day 8 test. A table that is partitioned by day is a directory of ``day-XX.parquet`` files
(``day-m05`` for day -5) so that Ray Data can read exactly the training or the test days.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

FORMAT_VERSION = 1
MANIFEST = "manifest.json"

ACTIONS = ("click", "cart", "buy", "collect")
"""Behaviour actions. ``cart`` only comes from real logs (JDsearch); the simulator emits the other three,
which are the paper's click / buy / collect (add to favourites)."""

SOURCES = ("search", "browse")
TIMESTAMP = pa.timestamp("ms", tz="UTC")
"""Parquet has no seconds unit; the simulator writes whole seconds in milliseconds."""
NO_ID = -1
"""Stands for "none" in an int id column where the schema forbids nulls (e.g. a query without brand)."""


def _f(name: str, typ: pa.DataType, doc: str, nullable: bool = False) -> pa.Field:
    return pa.field(name, typ, nullable=nullable, metadata={"doc": doc})


@dataclass(frozen=True)
class Reference:
    """``column`` of this table holds ids that must exist in ``table.target_column``."""

    column: str
    table: str
    target_column: str


@dataclass(frozen=True)
class TableSpec:
    name: str
    schema: pa.Schema
    doc: str
    key: str | None = None
    references: tuple[Reference, ...] = ()
    partitioned_by_day: bool = False
    required: bool = True
    synthetic_only: bool = False
    enums: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def path_name(self) -> str:
        return self.name if self.partitioned_by_day else f"{self.name}.parquet"

    def field_doc(self, column: str) -> str:
        meta = self.schema.field(column).metadata or {}
        return meta.get(b"doc", b"").decode()


CATEGORIES = TableSpec(
    "categories",
    pa.schema(
        [
            _f("leaf_id", pa.int32(), "leaf category id"),
            _f("leaf_name", pa.string(), "readable leaf name (its head term)"),
            _f("cate1_id", pa.int32(), "first-level category id"),
            _f("cate1_name", pa.string(), "readable first-level category name"),
            _f("terms", pa.list_(pa.string()), "head term first, then synonyms used in titles and queries"),
            _f("attribute_slots", pa.list_(pa.string()), "attribute slots its items carry (colour, ...)"),
        ]
    ),
    "Two-level category tree, one row per leaf.",
    key="leaf_id",
)

ATTRIBUTES = TableSpec(
    "attributes",
    pa.schema(
        [
            _f("attr_value_id", pa.int32(), "attribute value id"),
            _f("slot", pa.string(), "attribute slot: colour, material, style, ..."),
            _f("term", pa.string(), "the value's term as it appears in titles and queries"),
        ]
    ),
    "Attribute values that items carry and queries state.",
    key="attr_value_id",
)

BRANDS = TableSpec(
    "brands",
    pa.schema(
        [
            _f("brand_id", pa.int32(), "brand id"),
            _f("name", pa.string(), "brand name as written in titles"),
            _f("cate1_ids", pa.list_(pa.int32()), "first-level categories the brand sells in"),
            _f("popularity", pa.float32(), "relative popularity (Zipf weight)", nullable=True),
        ]
    ),
    "Brands.",
    key="brand_id",
)

SHOPS = TableSpec(
    "shops",
    pa.schema(
        [
            _f("shop_id", pa.int32(), "shop id"),
            _f("name", pa.string(), "shop name"),
            _f("brand_ids", pa.list_(pa.int32()), "brands the shop sells"),
        ]
    ),
    "Shops.",
    key="shop_id",
)

ITEMS = TableSpec(
    "items",
    pa.schema(
        [
            _f("item_id", pa.int64(), "item id, unique"),
            _f("title", pa.string(), "title as shown (zh: no spaces)"),
            _f("title_words", pa.list_(pa.string()), "the title's true segmentation into words"),
            _f("leaf_id", pa.int32(), "leaf category", nullable=True),
            _f("cate1_id", pa.int32(), "first-level category", nullable=True),
            _f("brand_id", pa.int32(), "brand", nullable=True),
            _f("shop_id", pa.int32(), "shop", nullable=True),
            _f("price", pa.float32(), "price in yuan", nullable=True),
            _f("attr_value_ids", pa.list_(pa.int32()), "one attribute value per slot of the leaf"),
            _f("quality", pa.float32(), "latent quality, N(0,1) (synthetic only)", nullable=True),
            _f("popularity", pa.float32(), "latent popularity weight (synthetic only)", nullable=True),
            _f("discount", pa.bool_(), "on discount: attractive in result pages (synthetic)", nullable=True),
            _f("external_id", pa.string(), "id in the source data set (real data: ASIN, JD wid)", nullable=True),
        ]
    ),
    "The catalogue, one row per item.",
    key="item_id",
    references=(
        Reference("leaf_id", "categories", "leaf_id"),
        Reference("brand_id", "brands", "brand_id"),
        Reference("shop_id", "shops", "shop_id"),
        Reference("attr_value_ids", "attributes", "attr_value_id"),
    ),
)

USERS = TableSpec(
    "users",
    pa.schema(
        [
            _f("user_id", pa.int64(), "user id"),
            _f("activity", pa.float32(), "relative activity (Zipf): sessions and browsing scale with it"),
            _f("cate1_pref", pa.list_(pa.float32()), "long-term preference over first-level categories"),
            _f("price_pref", pa.float32(), "preferred log-price offset from the leaf median (z units)"),
            _f("taste_attr_value_ids", pa.list_(pa.int32()), "preferred attribute value per slot"),
            _f("fav_brand_ids", pa.list_(pa.int32()), "favourite brands on the last simulated day (the test day; "
               "they drift day by day before it)"),
            _f("fav_shop_ids", pa.list_(pa.int32()), "favourite shops"),
        ]
    ),
    "The simulator's latent user preferences on the test day: ground truth for the oracle rankings, tests and "
    "analysis, never a model input.",
    key="user_id",
    required=False,
    synthetic_only=True,
)

QUERIES = TableSpec(
    "queries",
    pa.schema(
        [
            _f("query_id", pa.int64(), "query id"),
            _f("query", pa.string(), "query text"),
            _f("query_words", pa.list_(pa.string()), "segmented query words"),
            _f("query_class", pa.string(), "product class or category the query belongs to", nullable=True),
            _f("split", pa.string(), "train | test (query-disjoint when the source defines it)", nullable=True),
        ]
    ),
    "Standalone query sets from real data.",
    key="query_id",
    required=False,
)

JUDGEMENTS = TableSpec(
    "judgements",
    pa.schema(
        [
            _f("query_id", pa.int64(), "query id"),
            _f("item_id", pa.int64(), "judged item"),
            _f("label", pa.string(), "the source's label (ESCI: E, S, C, I)"),
            _f("grade", pa.int8(), "graded relevance, 0 = irrelevant; higher is better"),
            _f("gain", pa.float32(), "gain used by nDCG-style metrics"),
        ]
    ),
    "Graded human relevance judgements of (query, item) pairs.",
    references=(Reference("query_id", "queries", "query_id"), Reference("item_id", "items", "item_id")),
    required=False,
)

SEARCH_EVENTS = TableSpec(
    "search_events",
    pa.schema(
        [
            _f("event_id", pa.int64(), "search event id, unique"),
            _f("user_id", pa.int64(), "who searched"),
            _f("session_id", pa.int64(), "search session (follow-up queries share it)"),
            _f("ts", TIMESTAMP, "when"),
            _f("day", pa.int16(), "day number: 1..7 train, 8 test"),
            _f("query", pa.string(), "query text as typed"),
            _f("query_words", pa.list_(pa.string()), "the query's segmentation as typed"),
            _f("intent_leaf_id", pa.int32(), "intended leaf category (synthetic ground truth)", nullable=True),
            _f("intent_brand_id", pa.int32(), "intended brand, -1 for none (synthetic)", nullable=True),
            _f("intent_attr_value_ids", pa.list_(pa.int32()), "attribute values the intent states"),
            _f("is_followup", pa.bool_(), "refines the session's previous query (ambiguous alone)"),
            _f("impressed_item_ids", pa.list_(pa.int64()), "the result page, in shown order"),
            _f("clicked_item_ids", pa.list_(pa.int64()), "clicked items (training positives)"),
            _f("bought_item_ids", pa.list_(pa.int64()), "bought items (also positives)"),
            _f("collected_item_ids", pa.list_(pa.int64()), "items added to favourites"),
        ]
    ),
    "Search logs, one row per search. Positives for training and Recall@K are clicked + bought items.",
    key="event_id",
    references=(
        Reference("intent_leaf_id", "categories", "leaf_id"),
        Reference("intent_attr_value_ids", "attributes", "attr_value_id"),
        Reference("impressed_item_ids", "items", "item_id"),
        Reference("clicked_item_ids", "items", "item_id"),
        Reference("bought_item_ids", "items", "item_id"),
        Reference("collected_item_ids", "items", "item_id"),
    ),
    partitioned_by_day=True,
)

BEHAVIOURS = TableSpec(
    "behaviours",
    pa.schema(
        [
            _f("user_id", pa.int64(), "who acted"),
            _f("item_id", pa.int64(), "on which item"),
            _f("action", pa.string(), "click | cart | buy | collect"),
            _f("source", pa.string(), "search | browse"),
            _f("ts", TIMESTAMP, "when"),
            _f("day", pa.int16(), "day number (<= 0: warm-up history)"),
            _f("event_id", pa.int64(), "search event that led to it (null when browsing or warm-up)", True),
        ]
    ),
    "User behaviours, one row per action; a day file promises no global order (sort by user_id, ts).",
    references=(Reference("item_id", "items", "item_id"),),
    partitioned_by_day=True,
    enums={"action": ACTIONS, "source": SOURCES},
)

QUERY_HISTORY = TableSpec(
    "query_history",
    pa.schema(
        [
            _f("user_id", pa.int64(), "who searched"),
            _f("ts", TIMESTAMP, "when"),
            _f("day", pa.int16(), "day number (<= 0: warm-up history)"),
            _f("query", pa.string(), "query text as typed"),
            _f("query_words", pa.list_(pa.string()), "the query's segmentation as typed"),
        ]
    ),
    "Every query each user issued (warm-up days included), for the history-query attention q_his.",
    partitioned_by_day=True,
)

TABLES: dict[str, TableSpec] = {
    t.name: t
    for t in (
        CATEGORIES,
        ATTRIBUTES,
        BRANDS,
        SHOPS,
        ITEMS,
        USERS,
        QUERIES,
        JUDGEMENTS,
        SEARCH_EVENTS,
        BEHAVIOURS,
        QUERY_HISTORY,
    )
}


def day_file_name(day: int) -> str:
    """``day-03.parquet`` for day 3, ``day-m05.parquet`` for warm-up day -5 (sorts within each sign)."""
    return f"day-{day:02d}.parquet" if day >= 0 else f"day-m{-day:02d}.parquet"


def parse_day_file_name(name: str) -> int:
    """Inverse of :func:`day_file_name`; raises ``ValueError`` naming the file if it does not fit."""
    stem = name.removesuffix(".parquet")
    if not stem.startswith("day-") or stem == name:
        raise ValueError(f"{name!r} is not a day file (expected day-NN.parquet or day-mNN.parquet)")
    digits = stem[4:]
    sign = -1 if digits.startswith("m") else 1
    digits = digits.removeprefix("m")
    if not digits.isdigit():
        raise ValueError(f"{name!r} is not a day file (expected day-NN.parquet or day-mNN.parquet)")
    return sign * int(digits)


def describe_tables() -> str:
    """Markdown description of every table (the README's data section is generated from this)."""
    lines = []
    for spec in TABLES.values():
        where = f"`{spec.path_name()}/day-XX.parquet`" if spec.partitioned_by_day else f"`{spec.path_name()}`"
        lines += [f"### `{spec.name}` ({where})", "", spec.doc, "", "| column | type | null | meaning |"]
        lines.append("|---|---|---|---|")
        for f in spec.schema:
            lines.append(f"| `{f.name}` | `{f.type}` | {'yes' if f.nullable else 'no'} | {spec.field_doc(f.name)} |")
        lines.append("")
    return "\n".join(lines)


def epoch_ms(ts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Epoch milliseconds of a timestamp column (any unit) or an integer column (already epoch ms).

    >>> import datetime as dt
    >>> epoch_ms(pa.array([dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)], TIMESTAMP)).tolist()
    [1577836800000]
    """
    if pa.types.is_timestamp(ts.type):
        ts = ts.cast(pa.timestamp("ms", tz=ts.type.tz)).cast(pa.int64())
    return np.asarray(ts.to_numpy(zero_copy_only=False), np.int64)


def with_epoch_ms(table: pa.Table, column: str = "ts") -> pa.Table:
    """``table`` with its timestamp ``column`` as int64 epoch milliseconds (``epoch_ms``)."""
    return table.set_column(table.schema.get_field_index(column), column, pa.array(epoch_ms(table[column]), pa.int64()))
