"""WANDS (Wayfair ANnotation DataSet) -> a world of queries, and items + judgements when available.

``src`` is a directory (or the queries file itself) holding the query table, either the project's
``queries.parquet`` (``shared/data/wands_queries``) or the official tab-separated ``query.csv``
(query_id, query, query_class). Only the 480 queries are public here, so by default the world has just a
``queries`` table (split null: WANDS defines none).

When the official ``product.csv`` and ``label.csv`` (tab-separated) lie beside the query file they are
loaded too:

* ``items``: item_id = WANDS product_id, title = product_name (tokenized), external_id = str(product_id);
  category from ``category hierarchy`` (``/``-separated path): leaf = the whole path, first level = its
  first component.
* ``categories``: one row per distinct path; ids dense in sorted order (leaf by path, first level by
  name); leaf_name = last component, terms = [lower-cased leaf_name].
* ``judgements``: label Exact/Partial/Irrelevant, grade 2/1/0, gain 1.0/0.5/0.0. Judgements whose query
  or product is unknown are dropped and counted in the manifest notes.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ray_mgdspr.data import schema
from ray_mgdspr.data.loaders._common import check_columns, real_items_table
from ray_mgdspr.data.tokenize import Tokenizer
from ray_mgdspr.data.world import WorldManifest, WorldWriter

log = logging.getLogger(__name__)

QUERIES_FILE = "queries.parquet"
QUERY_CSV = "query.csv"
PRODUCT_CSV = "product.csv"
LABEL_CSV = "label.csv"

QUERY_COLUMNS = ("query_id", "query", "query_class")
PRODUCT_COLUMNS = ("product_id", "product_name", "product_class", "category_hierarchy")
LABEL_COLUMNS = ("id", "query_id", "product_id", "label")

GRADES = {"Exact": 2, "Partial": 1, "Irrelevant": 0}
GAINS = {"Exact": 1.0, "Partial": 0.5, "Irrelevant": 0.0}

DEFAULT_BASE_DATE = dt.date(2020, 12, 1)
SOURCE = "WANDS, Wayfair ANnotation DataSet (https://github.com/wayfair/WANDS @3b74dcf)"
LICENCE = "MIT (Copyright (c) 2021 ecir2022)"


def load_wands(
    src: str | Path,
    out: str | Path,
    overwrite: bool = False,
    *,
    base_date: dt.date = DEFAULT_BASE_DATE,
) -> WorldManifest:
    """Load WANDS from ``src`` (directory or query file) into world ``out``."""
    query_path = _find_queries(Path(src))
    folder = query_path.parent
    product_path, label_path = folder / PRODUCT_CSV, folder / LABEL_CSV
    with WorldWriter(out, overwrite=overwrite) as w:
        queries = _read_queries(query_path)
        tok = Tokenizer("en")
        w.write(
            schema.QUERIES,
            {
                "query_id": queries["query_id"].to_numpy(np.int64),
                "query": queries["query"].tolist(),
                "query_words": [tok.words(q) for q in queries["query"]],
                "query_class": pa.array(queries["query_class"].tolist(), pa.string()),
                "split": pa.nulls(len(queries), pa.string()),
            },
        )
        notes = [
            f"{len(queries)} WANDS queries from {query_path.name}; WANDS defines no split (split is null)."
        ]
        has_products, has_labels = product_path.is_file(), label_path.is_file()
        if has_products and has_labels:
            notes.append(
                _load_products_and_labels(w, product_path, label_path, set(queries["query_id"]), tok)
            )
        else:
            present = [p.name for p, ok in ((product_path, has_products), (label_path, has_labels)) if ok]
            if present:
                log.warning(
                    "wands: only %s present in %s; %s and %s are needed together, skipping",
                    present,
                    folder,
                    PRODUCT_CSV,
                    LABEL_CSV,
                )
            notes.append(
                f"{PRODUCT_CSV} and {LABEL_CSV} are missing (not in {folder}): queries only, "
                "no items or judgements."
            )
        manifest = WorldManifest(
            synthetic=False,
            source=SOURCE,
            lang="en",
            base_date=base_date,
            licence=LICENCE,
            notes=" ".join(notes),
            config={"loader": "wands", "file": str(query_path), "products": has_products and has_labels},
        )
        w.commit(manifest)
    log.info("wands: %s", manifest.tables)
    return manifest


def _find_queries(src: Path) -> Path:
    if src.is_file():
        return src
    if not src.is_dir():
        raise FileNotFoundError(
            f"{src}: no such file or directory (expected a WANDS directory or query file)"
        )
    for name in (QUERIES_FILE, QUERY_CSV):
        if (src / name).is_file():
            return src / name
    raise ValueError(f"{src}: contains neither {QUERIES_FILE} nor {QUERY_CSV}")


def _read_tsv(path: Path, needed: Iterable[str], dtypes: dict[str, str]) -> pd.DataFrame:
    """An official WANDS tab-separated file; column names with spaces are read with underscores."""
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable tab-separated file: {e}") from e
    df.columns = [c.strip().replace(" ", "_") for c in df.columns]
    check_columns(path, df.columns, needed)
    for c, kind in dtypes.items():
        if kind == "int":
            df[c] = _to_int(path, c, df[c])
    return df


def _read_queries(path: Path) -> pd.DataFrame:
    if path.suffix == ".parquet":
        check_columns(path, pq.ParquetFile(path).schema_arrow.names, QUERY_COLUMNS)
        df = pq.read_table(path, columns=list(QUERY_COLUMNS)).to_pandas()
        if not pd.api.types.is_integer_dtype(df["query_id"]):
            df["query_id"] = _to_int(path, "query_id", df["query_id"])
    else:
        df = _read_tsv(path, QUERY_COLUMNS, {"query_id": "int"})
    if df["query"].isna().any():
        raise ValueError(
            f"{path}: column 'query' has a null at row {int(np.flatnonzero(df['query'].isna())[0])}"
        )
    dup = df["query_id"].duplicated()
    if dup.any():
        raise ValueError(
            f"{path}: column 'query_id' has duplicate value {int(df.loc[dup, 'query_id'].iloc[0])}"
        )
    df["query_class"] = pd.Series(
        [v.strip() or None if isinstance(v, str) else None for v in df["query_class"].tolist()], dtype=object
    )
    df["query"] = df["query"].astype(str)
    return df.sort_values("query_id").reset_index(drop=True)


def _load_products_and_labels(
    w: WorldWriter, product_path: Path, label_path: Path, query_ids: set[int], tok: Tokenizer
) -> str:
    products = _read_tsv(product_path, PRODUCT_COLUMNS, {"product_id": "int"})
    dup = products["product_id"].duplicated()
    if dup.any():
        raise ValueError(
            f"{product_path}: column 'product_id' has duplicate value "
            f"{int(products.loc[dup, 'product_id'].iloc[0])}"
        )
    products = products.sort_values("product_id").reset_index(drop=True)
    paths = [tuple(p.strip() for p in h.split("/") if p.strip()) for h in products["category_hierarchy"]]
    leaf_vocab = sorted({p for p in paths if p})
    cate1_vocab = sorted({p[0] for p in leaf_vocab})
    leaf_index = {p: i for i, p in enumerate(leaf_vocab)}
    cate1_index = {c: i for i, c in enumerate(cate1_vocab)}
    w.write(
        schema.CATEGORIES,
        {
            "leaf_id": np.arange(len(leaf_vocab), dtype=np.int32),
            "leaf_name": [p[-1] for p in leaf_vocab],
            "cate1_id": np.array([cate1_index[p[0]] for p in leaf_vocab], dtype=np.int32),
            "cate1_name": [p[0] for p in leaf_vocab],
            "terms": [[p[-1].lower()] for p in leaf_vocab],
            "attribute_slots": [[] for _ in leaf_vocab],
        },
    )
    titles = products["product_name"].astype(str).tolist()
    w.write(
        schema.ITEMS,
        real_items_table(
            products["product_id"].to_numpy(np.int64),
            titles,
            [tok.words(t) if t else [] for t in titles],
            products["product_id"].astype(str).tolist(),
            leaf_id=[leaf_index[p] if p else None for p in paths],
            cate1_id=[cate1_index[p[0]] if p else None for p in paths],
        ),
    )

    labels = _read_tsv(label_path, LABEL_COLUMNS, {"query_id": "int", "product_id": "int"})
    bad = sorted(set(labels["label"]) - set(GRADES))
    if bad:
        raise ValueError(
            f"{label_path}: column 'label' has unknown value(s) {bad[:5]}; expected {list(GRADES)}"
        )
    known = labels["query_id"].isin(query_ids) & labels["product_id"].isin(set(products["product_id"]))
    dropped = int((~known).sum())
    if dropped:
        log.warning("wands: dropping %d judgements with an unknown query or product", dropped)
    labels = labels[known]
    w.write(
        schema.JUDGEMENTS,
        {
            "query_id": labels["query_id"].to_numpy(np.int64),
            "item_id": labels["product_id"].to_numpy(np.int64),
            "label": labels["label"].tolist(),
            "grade": labels["label"].map(GRADES).to_numpy(np.int8),
            "gain": labels["label"].map(GAINS).to_numpy(np.float32),
        },
    )
    return (
        f"{len(products)} products from {PRODUCT_CSV} (category from the 'category hierarchy' path: leaf = whole path, "
        f"first level = first component; {len(leaf_vocab)} leaves) and {len(labels)} judgements from "
        f"{LABEL_CSV} (grade Exact=2, Partial=1, Irrelevant=0; gain 1.0/0.5/0.0); {dropped} judgements with "
        "an unknown query or product were dropped. Product features, description and ratings are not loaded."
    )


def _to_int(path: Path, column: str, values: pd.Series) -> pd.Series:
    parsed = pd.to_numeric(values.astype(str).str.strip(), errors="coerce")
    bad = parsed.isna() | (parsed != parsed.round())
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise ValueError(f"{path}: column {column!r} row {row}: {values.iloc[row]!r} is not an integer id")
    return parsed.astype(np.int64)
