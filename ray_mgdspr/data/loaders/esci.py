"""Amazon ESCI (Shopping Queries Dataset) -> a world of queries, items and graded judgements.

Two inputs are accepted and told apart by the files present in ``src``:

``subset``
    ``judgments.parquet`` of ``shared/data/esci_judgments_subset`` (150 US queries, 6,678 judgements, no
    product text). Its ``query_id`` is the subset's own id (rank of the query text), not ESCI's. The subset
    has no split, so one is assigned deterministically and query-disjointly: a query is ``test`` when the
    first 8 bytes of ``sha1(query text, UTF-8)`` read as a big-endian integer, divided by 2**64, fall below
    ``test_share`` (default 0.2); otherwise ``train``. Items have empty titles. Gains come from the file.

``official``
    The unchanged official files: ``shopping_queries_dataset_examples.parquet`` and optionally
    ``shopping_queries_dataset_products.parquet`` beside it. Rows are filtered to ``locale`` (default
    ``us``) and to ``version`` (``large``: ``large_version == 1``; ``small``: ``small_version == 1``); the
    official query-disjoint ``split`` column is kept. With the products file, items get titles (tokenized),
    a ``brands`` table (ids dense in sorted name order) and colour ``attributes`` (slot ``colour``, term =
    lower-cased ``product_color``). The 1.1 GB products file is streamed in record batches with column
    projection and filtered by locale and by the judged ASINs batch by batch.

In both cases ``items`` has one row per distinct judged ASIN, ``item_id`` dense in sorted ASIN order and
``external_id`` = ASIN; ``judgements`` grade E=3, S=2, C=1, I=0.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ray_mgdspr.data import schema
from ray_mgdspr.data.loaders._common import check_columns, real_items_table
from ray_mgdspr.data.tokenize import Tokenizer
from ray_mgdspr.data.world import WorldManifest, WorldWriter

log = logging.getLogger(__name__)

SUBSET_FILE = "judgments.parquet"
EXAMPLES_FILE = "shopping_queries_dataset_examples.parquet"
PRODUCTS_FILE = "shopping_queries_dataset_products.parquet"

SUBSET_COLUMNS = ("query_id", "query", "product_id", "esci_label", "gain")
EXAMPLE_COLUMNS = ("query_id", "query", "product_id", "product_locale", "esci_label", "split")
PRODUCT_COLUMNS = ("product_id", "product_title", "product_brand", "product_color", "product_locale")
VERSION_COLUMNS = {"large": "large_version", "small": "small_version"}
LOCALES = ("us", "es", "jp")

GRADES = {"E": 3, "S": 2, "C": 1, "I": 0}
OFFICIAL_GAINS = {"E": 1.0, "S": 0.1, "C": 0.01, "I": 0.0}
"""The ESCI paper's nDCG gains (the subset file carries the same values in its ``gain`` column)."""
SPLITS = ("train", "test")

DEFAULT_BASE_DATE = dt.date(2020, 12, 1)
PRODUCT_BATCH_ROWS = 65_536

SOURCE = "Amazon ESCI Shopping Queries Dataset (https://github.com/amazon-science/esci-data)"
LICENCE = "Apache-2.0 (Amazon ESCI; Copyright Amazon.com, Inc. or its affiliates. All Rights Reserved.)"
SUBSET_SOURCE = (
    f"{SOURCE}; 150-query US judgement subset cut by opensearch-project/opensearch-devops "
    "@0d469b6ff934c607e3442fcd1d7f400597fb4202 (esci_us_judgments.json)"
)

InputKind = Literal["subset", "official"]


def detect_esci(src: str | Path) -> tuple[InputKind, Path]:
    """Which ESCI input ``src`` holds: ``("official", examples file)`` or ``("subset", judgments file)``."""
    src = Path(src)
    if src.is_file():
        return ("official" if src.name == EXAMPLES_FILE else "subset"), src
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such file or directory (expected an ESCI directory or file)")
    if (src / EXAMPLES_FILE).is_file():
        return "official", src / EXAMPLES_FILE
    if (src / SUBSET_FILE).is_file():
        return "subset", src / SUBSET_FILE
    raise ValueError(
        f"{src}: contains neither {EXAMPLES_FILE} (official ESCI) nor {SUBSET_FILE} (judgement subset)"
    )


def load_esci(
    src: str | Path,
    out: str | Path,
    overwrite: bool = False,
    *,
    locale: str = "us",
    version: Literal["large", "small"] = "large",
    test_share: float = 0.2,
    base_date: dt.date = DEFAULT_BASE_DATE,
) -> WorldManifest:
    """Load ESCI from ``src`` (directory or file, subset or official format) into world ``out``.

    ``locale`` and ``version`` apply to the official files only, ``test_share`` to the subset only
    (the official files carry their own split).
    """
    kind, path = detect_esci(src)
    if not 0.0 <= test_share <= 1.0:
        raise ValueError(f"esci: test_share must be within [0, 1] (got {test_share!r})")
    if version not in VERSION_COLUMNS:
        raise ValueError(f"esci: version must be one of {list(VERSION_COLUMNS)} (got {version!r})")
    if locale not in LOCALES:
        raise ValueError(f"esci: locale must be one of {list(LOCALES)} (got {locale!r})")
    if kind == "official" and locale == "jp":
        log.warning("esci: locale jp is segmented with the English tokenizer; Japanese titles split poorly")
    with WorldWriter(out, overwrite=overwrite) as w:
        if kind == "subset":
            manifest = _load_subset(path, w, test_share, base_date)
        else:
            manifest = _load_official(path, w, locale, version, base_date)
        w.commit(manifest)
    log.info("esci (%s): %s", kind, manifest.tables)
    return manifest


# --------------------------------------------------------------------------------------------------
# the two inputs


def _load_subset(path: Path, w: WorldWriter, test_share: float, base_date: dt.date) -> WorldManifest:
    df = _read_parquet(path, SUBSET_COLUMNS).to_pandas()
    _no_nulls(path, df, SUBSET_COLUMNS)
    _check_labels(path, df["esci_label"])
    tok = Tokenizer("en")
    queries = _distinct_queries(path, df, None)
    queries["split"] = [hash_split(q, test_share) for q in queries["query"]]
    asins = np.sort(df["product_id"].unique())
    w.write(schema.QUERIES, _queries_table(queries, tok))
    w.write(schema.ITEMS, _items_table(asins, titles=None, brand_ids=None, attr_ids=None, tok=tok))
    w.write(schema.JUDGEMENTS, _judgements_table(df, asins, gains=df["gain"].to_numpy()))
    n_test = int((queries["split"] == "test").sum())
    notes = (
        "ESCI judgement subset: no product text, so items have empty titles and no brand/colour. query_id is "
        "the subset's own id (rank of the query text), not ESCI's query_id. The subset has no split: "
        "a query is test when sha1(query text) (first 8 bytes, big-endian, / 2**64) < "
        f"test_share={test_share} "
        f"({n_test} test / {len(queries) - n_test} train queries, query-disjoint). Gains from the file "
        "(E=1.0, S=0.1, C=0.01, I=0.0); grade E=3, S=2, C=1, I=0."
    )
    return WorldManifest(
        synthetic=False,
        source=SUBSET_SOURCE,
        lang="en",
        base_date=base_date,
        licence=LICENCE,
        notes=notes,
        config={"loader": "esci", "input": "subset", "file": str(path), "test_share": test_share},
    )


def _load_official(
    path: Path, w: WorldWriter, locale: str, version: str, base_date: dt.date
) -> WorldManifest:
    version_col = VERSION_COLUMNS[version]
    columns = (*EXAMPLE_COLUMNS, version_col)
    check_columns(path, pq.ParquetFile(path).schema_arrow.names, columns)
    table = pq.read_table(path, columns=list(columns), filters=[("product_locale", "==", locale)])
    keep = pc.equal(pc.cast(table.column(version_col), pa.int8()), 1).fill_null(False)
    df = table.filter(keep).to_pandas()
    log.info("esci: %s: %d examples with locale %s, version %s", path.name, len(df), locale, version)
    if df.empty:
        raise ValueError(f"{path}: no rows with product_locale == {locale!r} and {version_col} == 1")
    _no_nulls(path, df, EXAMPLE_COLUMNS)
    _check_labels(path, df["esci_label"])
    bad = sorted(set(df["split"].unique()) - set(SPLITS))
    if bad:
        raise ValueError(f"{path}: column 'split' has unknown value(s) {bad[:5]}; expected {list(SPLITS)}")
    tok = Tokenizer("en")
    queries = _distinct_queries(path, df, "split")
    asins = np.sort(df["product_id"].unique())

    products_path = path.with_name(PRODUCTS_FILE)
    titles = brand_ids = attr_ids = None
    n_missing = None
    if products_path.is_file():
        products = _read_products(products_path, locale, asins)
        n_missing = len(asins) - int(products["product_title"].notna().sum())
        titles = products["product_title"].fillna("").astype(str).to_numpy()
        brand_names = _clean(products["product_brand"])
        colours = _clean(products["product_color"], lower=True)
        brand_ids, brand_vocab = _dense(brand_names)
        attr_ids, colour_vocab = _dense(colours)
        w.write(
            schema.BRANDS,
            {
                "brand_id": np.arange(len(brand_vocab), dtype=np.int32),
                "name": brand_vocab,
                "cate1_ids": [[] for _ in brand_vocab],
                "popularity": pa.nulls(len(brand_vocab), pa.float32()),
            },
        )
        w.write(
            schema.ATTRIBUTES,
            {
                "attr_value_id": np.arange(len(colour_vocab), dtype=np.int32),
                "slot": ["colour"] * len(colour_vocab),
                "term": colour_vocab,
            },
        )
    else:
        log.warning("esci: %s not found; items get empty titles and no brand/colour", products_path)

    w.write(schema.QUERIES, _queries_table(queries, tok))
    w.write(schema.ITEMS, _items_table(asins, titles=titles, brand_ids=brand_ids, attr_ids=attr_ids, tok=tok))
    gains = df["esci_label"].map(OFFICIAL_GAINS).to_numpy()
    w.write(schema.JUDGEMENTS, _judgements_table(df, asins, gains=gains))

    if n_missing is None:
        text = f"{PRODUCTS_FILE} was absent: items have empty titles and no brand/colour."
    else:
        text = (
            f"titles, brands and colours from {PRODUCTS_FILE} (locale {locale}); "
            f"{n_missing} judged products had no product row and have empty titles."
        )
    notes = (
        f"Official ESCI files, locale {locale}, {version} version ({version_col} == 1); the official "
        f"query-disjoint split column is kept. {text} Gains E=1.0, S=0.1, C=0.01, I=0.0 (ESCI paper); "
        "grade E=3, S=2, C=1, I=0. item_id is dense in sorted ASIN order; external_id is the ASIN."
    )
    return WorldManifest(
        synthetic=False,
        source=f"{SOURCE}; official files",
        lang="en",
        base_date=base_date,
        licence=LICENCE,
        notes=notes,
        config={
            "loader": "esci",
            "input": "official",
            "file": str(path),
            "locale": locale,
            "version": version,
            "products_file": products_path.is_file(),
        },
    )


def _read_products(path: Path, locale: str, asins: np.ndarray) -> pd.DataFrame:
    """The products of ``locale`` whose ASIN is judged, one row per ASIN in ``asins`` order (NaN if none)."""
    pf = pq.ParquetFile(path)
    check_columns(path, pf.schema_arrow.names, PRODUCT_COLUMNS)
    wanted = pa.array(asins, pa.string())
    parts = []
    for batch in pf.iter_batches(batch_size=PRODUCT_BATCH_ROWS, columns=list(PRODUCT_COLUMNS)):
        ids = batch.column("product_id")
        mask = pc.and_(
            pc.equal(batch.column("product_locale"), locale), pc.is_in(ids, value_set=wanted.cast(ids.type))
        )
        parts.append(pa.Table.from_batches([batch]).filter(mask.fill_null(False)))
    found = pa.concat_tables(parts).to_pandas() if parts else pd.DataFrame(columns=list(PRODUCT_COLUMNS))
    dups = int(found["product_id"].duplicated().sum())
    if dups:
        log.warning(
            "esci: %s: %d duplicate product rows for locale %s; keeping the first", path, dups, locale
        )
    found = found.drop_duplicates("product_id").set_index("product_id")
    log.info("esci: %s: %d of %d judged products found", path.name, len(found), len(asins))
    return found.reindex(asins)


# --------------------------------------------------------------------------------------------------
# helpers


def hash_split(query: str, test_share: float) -> str:
    """Deterministic query-disjoint split: ``test`` when sha1(query) maps below ``test_share``."""
    h = int.from_bytes(hashlib.sha1(query.encode("utf-8")).digest()[:8], "big") / 2.0**64
    return "test" if h < test_share else "train"


def _read_parquet(path: Path, columns: Iterable[str]) -> pa.Table:
    columns = list(columns)
    check_columns(path, pq.ParquetFile(path).schema_arrow.names, columns)
    return pq.read_table(path, columns=columns)


def _no_nulls(path: Path, df: pd.DataFrame, columns: Iterable[str]) -> None:
    for c in columns:
        n = int(df[c].isna().sum())
        if n:
            raise ValueError(
                f"{path}: column {c!r} has {n} null value(s) (row {int(np.flatnonzero(df[c].isna())[0])})"
            )


def _check_labels(path: Path, labels: pd.Series) -> None:
    bad = sorted(set(labels.unique()) - set(GRADES))
    if bad:
        raise ValueError(f"{path}: column 'esci_label' has unknown value(s) {bad[:5]}; expected E, S, C, I")


def _distinct_queries(path: Path, df: pd.DataFrame, split_col: str | None) -> pd.DataFrame:
    cols = ["query_id", "query"] + ([split_col] if split_col else [])
    q = df[cols].drop_duplicates()
    dup = q["query_id"].duplicated(keep=False)
    if dup.any():
        qid = q.loc[dup, "query_id"].iloc[0]
        rows = q[q["query_id"] == qid].to_dict("records")
        raise ValueError(f"{path}: query_id {qid} has conflicting query text or split: {rows[:3]}")
    q = q.sort_values("query_id").reset_index(drop=True)
    if split_col and split_col != "split":
        q = q.rename(columns={split_col: "split"})
    return q


def _queries_table(q: pd.DataFrame, tok: Tokenizer) -> pa.Table:
    texts = q["query"].astype(str).tolist()
    return pa.table(
        {
            "query_id": q["query_id"].to_numpy(np.int64),
            "query": texts,
            "query_words": [tok.words(t) for t in texts],
            "query_class": pa.nulls(len(q), pa.string()),
            "split": q["split"].tolist(),
        }
    )


def _clean(values: pd.Series, lower: bool = False) -> list[str | None]:
    """Stripped strings (lower-cased if asked); empty and missing become None."""
    out: list[str | None] = []
    for v in values.tolist():
        v = v.strip() if isinstance(v, str) else ""
        out.append((v.lower() if lower else v) or None)
    return out


def _dense(values: list[str | None]) -> tuple[list[int | None], list[str]]:
    """Dense int ids in sorted value order; None stays None. Returns (ids per row, vocabulary)."""
    vocab = sorted({v for v in values if v is not None})
    index = {v: i for i, v in enumerate(vocab)}
    return [None if v is None else index[v] for v in values], vocab


def _items_table(
    asins: np.ndarray,
    *,
    titles: np.ndarray | None,
    brand_ids: list[int | None] | None,
    attr_ids: list[int | None] | None,
    tok: Tokenizer,
) -> pa.Table:
    titles_list = [""] * len(asins) if titles is None else [str(t) for t in titles]
    return real_items_table(
        np.arange(len(asins), dtype=np.int64),
        titles_list,
        [tok.words(t) if t else [] for t in titles_list],
        asins.astype(str).tolist(),
        brand_id=brand_ids,
        attr_value_ids=None if attr_ids is None else [[] if a is None else [a] for a in attr_ids],
    )


def _judgements_table(df: pd.DataFrame, asins: np.ndarray, gains: np.ndarray) -> pa.Table:
    labels = df["esci_label"].astype(str)
    return pa.table(
        {
            "query_id": df["query_id"].to_numpy(np.int64),
            "item_id": np.searchsorted(asins, df["product_id"].to_numpy()).astype(np.int64),
            "label": labels.tolist(),
            "grade": labels.map(GRADES).to_numpy(np.int8),
            "gain": np.asarray(gains, dtype=np.float32),
        }
    )
