"""Real-data loaders: the public fixtures in shared/data, plus small official-format fixtures.

The real files are read from ``shared/data`` (``$MGDSPR_SHARED_DATA`` or the first of ``<repo>/shared/data``
and ``<repo>/../shared/data`` that exists). Expected counts come from the READMEs of those folders.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_mgdspr.data import schema
from ray_mgdspr.data.loaders import LOADERS, detect_esci, load, load_esci, load_jdsearch, load_wands
from ray_mgdspr.data.loaders.esci import hash_split
from ray_mgdspr.data.validate import validate_world
from ray_mgdspr.data.world import read_manifest, read_table, table_files


def _shared_data() -> Path | None:
    env = os.environ.get("MGDSPR_SHARED_DATA")
    repo = Path(__file__).resolve().parents[2]
    candidates = [repo / "tests" / "fixtures" / "real_data", repo.parent / "shared" / "data"]
    for p in ([Path(env)] if env else []) + candidates:
        if (p / "esci_judgments_subset").is_dir():
            return p
    return None


DATA = _shared_data()
needs_data = pytest.mark.skipif(DATA is None, reason="shared/data (real public fixtures) not found")
ESCI = DATA / "esci_judgments_subset" if DATA else Path()
WANDS = DATA / "wands_queries" if DATA else Path()
JD = DATA / "jdsearch_sample" if DATA else Path()


def assert_world_fits_schemas(world: Path) -> None:
    """manifest.json says real data; every table file has exactly its spec's schema; the validator agrees."""
    manifest = json.loads((world / schema.MANIFEST).read_text())
    assert manifest["synthetic"] is False
    assert read_manifest(world).synthetic is False
    for name, spec in schema.TABLES.items():
        files = table_files(world, spec)
        assert (name in manifest["tables"]) == bool(files), name
        for f in files:
            got = pq.read_schema(f)
            assert [(x.name, x.type, x.nullable) for x in got] == [
                (x.name, x.type, x.nullable) for x in spec.schema
            ], f
        if files:
            table = read_table(world, name)
            assert table.schema.equals(spec.schema)
            assert table.num_rows == manifest["tables"][name]
    report = validate_world(world)
    assert report.ok, [str(p) for p in report.problems]


def no_leftovers(out: Path) -> bool:
    """Neither the world nor a temporary sibling of it exists."""
    return not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_loaders_registry() -> None:
    assert set(LOADERS) == {"esci", "wands", "jdsearch"}
    with pytest.raises(ValueError, match="unknown data set 'nope'"):
        load("nope", ".", "out")


# --------------------------------------------------------------------------------------------------
# ESCI


@needs_data
def test_esci_subset(tmp_path: Path) -> None:
    out = tmp_path / "esci"
    manifest = load_esci(ESCI, out)
    assert detect_esci(ESCI) == ("subset", ESCI / "judgments.parquet")
    assert manifest.tables == {"queries": 150, "judgements": 6678, "items": 6597}
    assert "Apache-2.0" in manifest.licence
    assert_world_fits_schemas(out)

    queries = read_table(out, "queries").to_pandas()
    assert queries["query_id"].tolist() == list(range(150))
    assert queries["query_class"].isna().all()
    assert set(queries["split"]) == {"train", "test"}
    assert queries["split"].tolist() == [hash_split(q, 0.2) for q in queries["query"]]
    assert 10 <= (queries["split"] == "test").sum() <= 50
    assert all(len(w) > 0 for w in queries["query_words"])

    items = read_table(out, "items").to_pandas()
    assert items["item_id"].tolist() == list(range(6597))
    assert items["external_id"].tolist() == sorted(items["external_id"])
    assert (items["title"] == "").all() and items["title_words"].map(len).eq(0).all()
    assert items["brand_id"].isna().all() and items["leaf_id"].isna().all()

    j = read_table(out, "judgements").to_pandas()
    assert Counter(j["label"]) == {"E": 3389, "S": 1898, "C": 305, "I": 1086}
    assert dict(zip(j["label"], j["grade"], strict=True)) == {"E": 3, "S": 2, "C": 1, "I": 0}
    assert {k: round(float(v), 4) for k, v in zip(j["label"], j["gain"], strict=True)} == {
        "E": 1.0,
        "S": 0.1,
        "C": 0.01,
        "I": 0.0,
    }
    # the judged ASIN of each row survives the id mapping
    src = pq.read_table(ESCI / "judgments.parquet").to_pandas()
    asin = dict(zip(items["item_id"], items["external_id"], strict=True))
    assert [asin[i] for i in j["item_id"]] == src["product_id"].tolist()
    assert j.groupby("query_id")["label"].apply(lambda s: (s == "E").any()).all()


@needs_data
def test_esci_subset_split_is_deterministic_and_configurable(tmp_path: Path) -> None:
    a = load_esci(ESCI / "judgments.parquet", tmp_path / "a")
    load_esci(ESCI, tmp_path / "b")
    sa, sb = (read_table(tmp_path / x, "queries")["split"].to_pylist() for x in "ab")
    assert sa == sb and a.config["test_share"] == 0.2
    load_esci(ESCI, tmp_path / "c", test_share=0.0)
    assert set(read_table(tmp_path / "c", "queries")["split"].to_pylist()) == {"train"}


# Official-format ESCI. FORMAT FIXTURES: tiny Parquet files written here with the official column names and
# types of shopping_queries_dataset_{examples,products}.parquet. The ASINs and queries are taken from the
# real subset, but titles, brands, colours and the es/jp rows are MADE UP to exercise the mapping.


def _official_fixture(folder: Path, with_products: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [  # query_id, query, product_id, locale, label, small, split
        (11, "%100 silicone not clear", "B0000AYC09", "us", "E", 1, "train"),
        (11, "%100 silicone not clear", "B000BQRMDO", "us", "S", 1, "train"),
        (11, "%100 silicone not clear", "B07ZZZZZZ1", "us", "I", 0, "train"),
        (42, "red kettle", "B000BQRMDO", "us", "C", 1, "test"),
        (42, "red kettle", "B08KETTLE1", "us", "E", 0, "test"),
        (77, "tetera roja", "B0000AYC09", "es", "E", 1, "train"),
        (78, "やかん", "B09JPJPJP1", "jp", "S", 1, "test"),
    ]
    examples = pa.table(
        {
            "example_id": pa.array(range(len(rows)), pa.int64()),
            "query": [r[1] for r in rows],
            "query_id": pa.array([r[0] for r in rows], pa.int64()),
            "product_id": [r[2] for r in rows],
            "product_locale": [r[3] for r in rows],
            "esci_label": [r[4] for r in rows],
            "small_version": pa.array([r[5] for r in rows], pa.int64()),
            "large_version": pa.array([1] * len(rows), pa.int64()),
            "split": [r[6] for r in rows],
        }
    )
    path = folder / "shopping_queries_dataset_examples.parquet"
    pq.write_table(examples, path)
    if with_products:
        products = pa.table(
            {
                "product_id": [
                    "B0000AYC09",
                    "B000BQRMDO",
                    "B07ZZZZZZ1",
                    "B08KETTLE1",
                    "B0000AYC09",
                    "B09JPJPJP1",
                    "B0UNJUDGED",
                ],
                "product_title": [
                    "Clear Silicone Sealant 100%",
                    "Kitchen Caulk, White",
                    "Garden Hose",
                    "Electric Kettle Red 1.7L",
                    "Sellador de silicona",
                    "電気ケトル",
                    "Unjudged thing",
                ],
                "product_description": [None] * 7,
                "product_bullet_point": [None] * 7,
                "product_brand": ["GE", "DAP", None, "Zebra ", "GE", "象印", "Acme"],
                "product_color": ["Clear", "WHITE", "", "Red", "Transparente", "赤", "Blue"],
                "product_locale": ["us", "us", "us", "us", "es", "jp", "us"],
            }
        )
        pq.write_table(products, folder / "shopping_queries_dataset_products.parquet")
    return path


def test_esci_official_format_fixture(tmp_path: Path) -> None:
    src = tmp_path / "esci_full"
    examples = _official_fixture(src)
    assert detect_esci(src) == ("official", examples)
    out = tmp_path / "world"
    manifest = load_esci(src, out)
    assert manifest.tables == {"queries": 2, "items": 4, "judgements": 5, "brands": 3, "attributes": 3}
    assert_world_fits_schemas(out)

    q = read_table(out, "queries").to_pandas()
    assert q["query_id"].tolist() == [11, 42]  # es / jp queries filtered out
    assert q["split"].tolist() == ["train", "test"]  # the official split is kept

    items = read_table(out, "items").to_pandas().set_index("external_id")
    assert items.index.tolist() == ["B0000AYC09", "B000BQRMDO", "B07ZZZZZZ1", "B08KETTLE1"]
    assert items["item_id"].tolist() == [0, 1, 2, 3]
    assert items.loc["B0000AYC09", "title"] == "Clear Silicone Sealant 100%"  # the us title, not the es one
    assert len(items.loc["B08KETTLE1", "title_words"]) >= 3

    brands = read_table(out, "brands").to_pandas()
    assert brands["name"].tolist() == ["DAP", "GE", "Zebra"]  # sorted, stripped; unjudged Acme left out
    assert brands["brand_id"].tolist() == [0, 1, 2]
    by_brand = dict(zip(brands["name"], brands["brand_id"], strict=True))
    assert items.loc["B0000AYC09", "brand_id"] == by_brand["GE"]
    assert items.loc["B08KETTLE1", "brand_id"] == by_brand["Zebra"]
    assert items["brand_id"].isna().tolist() == [False, False, True, False]

    attrs = read_table(out, "attributes").to_pandas()
    assert attrs["term"].tolist() == ["clear", "red", "white"] and set(attrs["slot"]) == {"colour"}
    colour = dict(zip(attrs["attr_value_id"], attrs["term"], strict=True))
    assert [[colour[a] for a in ids] for ids in items["attr_value_ids"]] == [
        ["clear"],
        ["white"],
        [],
        ["red"],
    ]

    j = read_table(out, "judgements").to_pandas()
    assert j["label"].tolist() == ["E", "S", "I", "C", "E"]
    assert j["grade"].tolist() == [3, 2, 0, 1, 3]
    assert [round(float(g), 4) for g in j["gain"]] == [1.0, 0.1, 0.0, 0.01, 1.0]


def test_esci_official_small_version_and_no_products(tmp_path: Path) -> None:
    src = tmp_path / "esci_full"
    _official_fixture(src, with_products=False)
    manifest = load_esci(src, tmp_path / "small", version="small")
    assert manifest.tables == {"queries": 2, "items": 2, "judgements": 3}
    assert "absent" in manifest.notes
    assert_world_fits_schemas(tmp_path / "small")
    items = read_table(tmp_path / "small", "items")
    assert items["external_id"].to_pylist() == ["B0000AYC09", "B000BQRMDO"]
    assert items["title"].to_pylist() == ["", ""]
    es = load_esci(src, tmp_path / "es", locale="es")
    assert es.tables["queries"] == 1 and read_table(tmp_path / "es", "queries")["query"].to_pylist() == [
        "tetera roja"
    ]


# --------------------------------------------------------------------------------------------------
# WANDS


@needs_data
def test_wands_queries(tmp_path: Path) -> None:
    out = tmp_path / "wands"
    manifest = load_wands(WANDS, out)
    assert manifest.tables == {"queries": 480}
    assert "MIT" in manifest.licence and "product.csv and label.csv are missing" in manifest.notes
    assert_world_fits_schemas(out)
    q = read_table(out, "queries").to_pandas()
    assert q["split"].isna().all()
    assert q["query_class"].isna().sum() == 6 and q["query_class"].nunique() == 188
    assert q.loc[q["query_id"] == 0, "query"].item() == "salon chair"
    assert all(len(w) > 0 for w in q["query_words"])


# WANDS products and labels. FORMAT FIXTURES: tiny tab-separated files in the official WANDS layout
# (product.csv with its 'category hierarchy' header, label.csv); the product rows are MADE UP.


def _wands_fixture(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "query.csv").write_text(
        "query_id\tquery\tquery_class\n0\tsalon chair\tMassage Chairs\n1\tsmart coffee table\t\n"
    )
    header = (
        "product_id\tproduct_name\tproduct_class\tcategory hierarchy\tproduct_description\t"
        "product_features\trating_count\taverage_rating\treview_count\n"
    )
    rows = [
        "0\tsolid wood platform bed\tBeds\tFurniture / Bedroom Furniture / Beds\tgood sleep\tcolor:brown"
        "\t15\t4.5\t15",
        "1\tspa salon chair\tMassage Chairs\tFurniture / Living Room Furniture / Massage Chairs\t\t\t\t\t",
        "2\tlift top coffee table\tCoffee Tables\tFurniture / Living Room Furniture / Coffee Tables"
        "\tx\ty\t1\t5\t1",
        "3\tmystery thing\t\t\t\t\t\t\t",
    ]
    (folder / "product.csv").write_text(header + "\n".join(rows) + "\n")
    (folder / "label.csv").write_text(
        "id\tquery_id\tproduct_id\tlabel\n0\t0\t1\tExact\n1\t0\t0\tIrrelevant\n"
        "2\t1\t2\tExact\n3\t1\t0\tPartial\n4\t1\t99\tExact\n5\t7\t0\tPartial\n"
    )


def test_wands_with_products_and_labels(tmp_path: Path) -> None:
    src = tmp_path / "wands_full"
    _wands_fixture(src)
    out = tmp_path / "world"
    manifest = load_wands(src, out)
    assert manifest.tables == {"queries": 2, "items": 4, "categories": 3, "judgements": 4}
    assert "2 judgements with an unknown query or product were dropped" in manifest.notes
    assert_world_fits_schemas(out)
    assert read_table(out, "queries")["query_class"].to_pylist() == ["Massage Chairs", None]
    items = read_table(out, "items").to_pandas()
    assert items["item_id"].tolist() == [0, 1, 2, 3] and items["external_id"].tolist() == ["0", "1", "2", "3"]
    assert items["leaf_id"].isna().tolist() == [False, False, False, True]
    cats = read_table(out, "categories").to_pandas()
    assert cats["leaf_name"].tolist() == ["Beds", "Coffee Tables", "Massage Chairs"]
    assert set(cats["cate1_name"]) == {"Furniture"} and cats["terms"].map(list).tolist()[0] == ["beds"]
    j = read_table(out, "judgements").to_pandas()
    assert j["label"].tolist() == ["Exact", "Irrelevant", "Exact", "Partial"]
    assert j["grade"].tolist() == [2, 0, 2, 1]
    assert j["gain"].tolist() == [1.0, 0.0, 1.0, 0.5]


# --------------------------------------------------------------------------------------------------
# JDsearch


@needs_data
def test_jdsearch(tmp_path: Path) -> None:
    out = tmp_path / "jd"
    manifest = load_jdsearch(JD, out)
    assert manifest.tables["search_events"] == 3 and manifest.tables["items"] == 409
    assert "CC BY-NC-SA 4.0" in manifest.licence
    assert "seconds" in manifest.notes and "Dropped 15 history behaviours" in manifest.notes
    assert manifest.test_days == [8] and manifest.train_days == list(range(1, 8))
    assert manifest.history_days and max(manifest.history_days) == 0
    assert_world_fits_schemas(out)

    ev = read_table(out, "search_events").to_pandas()
    assert ev["impressed_item_ids"].map(len).tolist() == [90, 89, 83]
    positives = [
        len(set(c) | set(b)) for c, b in zip(ev["clicked_item_ids"], ev["bought_item_ids"], strict=True)
    ]
    assert positives == [1, 2, 2]
    assert (ev["day"] == 8).all() and ev["user_id"].tolist() == [0, 1, 2]
    assert ev["query_words"].map(lambda w: all(t.startswith("t") for t in w)).all()
    assert ev["intent_leaf_id"].isna().all()

    sessions = pq.read_table(JD / "sessions.parquet").to_pandas()
    assert ev["impressed_item_ids"].map(list).tolist() == sessions["candidate_wids"].map(list).tolist()

    items = read_table(out, "items").to_pandas()
    assert items["item_id"].is_unique and (items["external_id"] == items["item_id"].astype(str)).all()
    assert items["leaf_id"].notna().all() and items["shop_id"].isna().sum() == 1  # one product has shop -1
    first = items.iloc[0]
    assert first["title"] == " ".join(first["title_words"])

    beh = read_table(out, "behaviours").to_pandas()
    assert len(beh) == 230 - 15  # 230 history positions, 15 on products outside products.parquet
    assert set(beh["action"]) <= set(schema.ACTIONS) and set(beh["source"]) == {"search", "browse"}
    assert (beh["ts"] < ev["ts"].iloc[0]).all() and beh["event_id"].isna().all()
    history = Counter(t for ts in sessions["history_types"] for t in ts)
    assert Counter(beh["action"])["buy"] <= history["ORD"]
    qh = read_table(out, "query_history").to_pandas()
    assert len(qh) > 3 and (qh["day"] <= 8).all()
    # user 2 (2 history clicks, 27 s apart, the last 49,660 s = 13.8 h before the test search at 12:00)
    u2 = beh[beh["user_id"] == 2].sort_values("ts")
    assert (u2["ts"].diff().dt.total_seconds().dropna() == 27).all()
    assert (ev["ts"].iloc[2] - u2["ts"].iloc[-1]).total_seconds() == 49_660


@needs_data
def test_jdsearch_every_reference_resolves(tmp_path: Path) -> None:
    out = tmp_path / "jd"
    load_jdsearch(JD, out)
    items = read_table(out, "items").to_pandas()
    brands = read_table(out, "brands").to_pandas()
    shops = read_table(out, "shops").to_pandas()
    assert set(items["brand_id"].dropna()) == set(brands["brand_id"])
    assert set(items["shop_id"].dropna()) == set(shops["shop_id"])
    assert set(items["leaf_id"]) == set(read_table(out, "categories")["leaf_id"].to_pylist())
    assert all(len(c) >= 1 for c in brands["cate1_ids"])


# --------------------------------------------------------------------------------------------------
# bad input: ValueError naming the file and the column, nothing left behind


def _drop_column(src: Path, dst: Path, column: str) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pq.read_table(src).drop_columns([column]), dst)
    return dst


def _bad_esci(d: Path) -> tuple[Path, str]:
    return _drop_column(ESCI / "judgments.parquet", d / "judgments.parquet", "esci_label"), "esci_label"


def _bad_wands(d: Path) -> tuple[Path, str]:
    return _drop_column(WANDS / "queries.parquet", d / "queries.parquet", "query"), "query"


def _bad_jdsearch(d: Path) -> tuple[Path, str]:
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(pq.read_table(JD / "products.parquet"), d / "products.parquet")
    return _drop_column(JD / "sessions.parquet", d / "sessions.parquet", "history_types"), "history_types"


@needs_data
@pytest.mark.parametrize(
    ("loader", "make_bad"), [("esci", _bad_esci), ("wands", _bad_wands), ("jdsearch", _bad_jdsearch)]
)
def test_missing_column_raises_and_leaves_nothing(
    tmp_path: Path, loader: str, make_bad: Callable[[Path], tuple[Path, str]]
) -> None:
    bad_dir = tmp_path / "bad"
    bad_file, column = make_bad(bad_dir)
    out = tmp_path / "out"
    with pytest.raises(ValueError) as e:
        LOADERS[loader](bad_dir, out)
    msg = str(e.value)
    assert str(bad_file) in msg and repr(column) in msg
    assert no_leftovers(out)


def test_official_missing_column_and_bad_label(tmp_path: Path) -> None:
    src = tmp_path / "esci_full"
    path = _official_fixture(src)
    pq.write_table(pq.read_table(path).drop_columns(["split"]), path)
    out = tmp_path / "out"
    with pytest.raises(
        ValueError, match=r"shopping_queries_dataset_examples\.parquet: missing column.*'split'"
    ):
        load_esci(src, out)
    assert no_leftovers(out)

    _official_fixture(src)
    products = src / "shopping_queries_dataset_products.parquet"
    pq.write_table(pq.read_table(products).drop_columns(["product_brand"]), products)
    with pytest.raises(
        ValueError, match=r"shopping_queries_dataset_products\.parquet: missing column.*'product_brand'"
    ):
        load_esci(src, out)
    assert no_leftovers(out)

    path = _official_fixture(src)
    t = pq.read_table(path)
    labels = t["esci_label"].to_pylist()
    labels[1] = "X"
    pq.write_table(t.set_column(t.schema.get_field_index("esci_label"), "esci_label", pa.array(labels)), path)
    with pytest.raises(
        ValueError, match=r"examples\.parquet: column 'esci_label' has unknown value\(s\) \['X'\]"
    ):
        load_esci(src, out)
    assert no_leftovers(out)


def test_wands_bad_product_file(tmp_path: Path) -> None:
    src = tmp_path / "wands_full"
    _wands_fixture(src)
    text = (src / "product.csv").read_text().replace("product_name", "name", 1)
    (src / "product.csv").write_text(text)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"product\.csv: missing column.*'product_name'"):
        load_wands(src, out)
    assert no_leftovers(out)
    _wands_fixture(src)
    (src / "label.csv").write_text("id\tquery_id\tproduct_id\tlabel\n0\t0\t1\tExcellent\n")
    with pytest.raises(
        ValueError, match=r"label\.csv: column 'label' has unknown value\(s\) \['Excellent'\]"
    ):
        load_wands(src, out)
    assert no_leftovers(out)


@needs_data
def test_jdsearch_bad_values(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pq.read_table(JD / "products.parquet"), bad / "products.parquet")
    t = pq.read_table(JD / "sessions.parquet")
    types = t["history_types"].to_pylist()
    types[2][0] = "LIKE"
    t = t.set_column(t.schema.get_field_index("history_types"), "history_types", pa.array(types))
    pq.write_table(t, bad / "sessions.parquet")
    out = tmp_path / "out"
    with pytest.raises(
        ValueError, match=r"sessions\.parquet: column 'history_types' row 2: unknown type 'LIKE'"
    ):
        load_jdsearch(bad, out)
    assert no_leftovers(out)


@needs_data
def test_failed_overwrite_keeps_the_old_world_and_existing_out_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "world"
    load_wands(WANDS, out)
    with pytest.raises(FileExistsError):
        load_wands(WANDS, out)
    bad = tmp_path / "bad"
    _drop_column(WANDS / "queries.parquet", bad / "queries.parquet", "query_id")
    with pytest.raises(ValueError, match="query_id"):
        load_wands(bad, out, overwrite=True)
    assert read_manifest(out).tables == {"queries": 480}  # untouched
    assert not list(tmp_path.glob(".world.tmp-*"))
    load_esci(ESCI, out, overwrite=True)
    assert read_manifest(out).tables["judgements"] == 6678
