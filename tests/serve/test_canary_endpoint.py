"""The recall canary over real Serve and HTTP: with every request sampled (``canary_share: 1``) and IVF shards
served at ``nprobe: 1``, the deliberately degraded version's running recall drops below the exact (Flat) version's
1.0, in ``GET /v1/version`` / ``mgdspr serve status`` and in the gauge Ray exports (real Ray, Serve, Faiss)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from helpers import free_port, running_endpoint, wait_for
from typer.testing import CliRunner

from ray_mgdspr.config import IndexConfig
from ray_mgdspr.data.features import Featurizer
from ray_mgdspr.data.world import read_table
from ray_mgdspr.index.manifest import read_manifest
from ray_mgdspr.index.shards import METADATA_SCHEMA, build_index_version, split_by_shard
from ray_mgdspr.model.bundle import load_bundle, read_bundle_manifest
from ray_mgdspr.model.retrieval import CatalogueFeatures, item_vectors
from ray_mgdspr.serve.cli import serve_app

pytestmark = pytest.mark.slow
TOKEN = "canary-token-321"
K = 50
EXPORT: dict[str, int] = {}


def index_versions(deployment: Any, root: Path) -> Path:
    """Two index versions of the v1 model's catalogue: ``flat`` (exact) and ``ivf`` (IVF16 per shard of ~750
    items; served at nprobe 1 it sees a 16th of each shard)."""
    bundle = Path(read_manifest(deployment.index_root / "v1").bundle)
    model, vocab, manifest = load_bundle(bundle, towers=("item",))
    items = read_table(deployment.world, "items", columns=METADATA_SCHEMA.names)
    featurizer = Featurizer(deployment.world, vocab, manifest.features)
    catalogue = CatalogueFeatures.from_featurizer(featurizer, items["item_id"].to_numpy())
    with torch.inference_mode():
        vectors = item_vectors(model, catalogue).numpy()
    checksum = read_bundle_manifest(bundle).files["item_tower.pt"]
    parts = split_by_shard(vectors, catalogue.item_id, items, 2)
    for version, factory in (("flat", "Flat"), ("ivf", "IVF16,Flat")):
        build_index_version(root, version, parts, IndexConfig(shards=2, factory=factory), manifest.version,
                            checksum, vectors.shape[1], bundle=str(bundle.resolve()))
    return root


@pytest.fixture(scope="module")
def server(deployment: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    tmp = tmp_path_factory.mktemp("canary-endpoint")
    shutil.copy(deployment.store, tmp / "behaviours.sqlite")
    overrides = {"port": free_port(), "index_root": str(index_versions(deployment, tmp / "index")),
                 "world": str(deployment.world), "store": str(tmp / "behaviours.sqlite"), "version": "flat",
                 "watch_current_s": 0, "token": TOKEN, "drain_s": 0.5, "nprobe": 1, "canary_share": 1.0,
                 "canary_k": K, "canary_window": 100}
    EXPORT["port"] = free_port()
    with running_endpoint(overrides, metrics_export_port=EXPORT["port"]) as endpoint:
        yield endpoint


def _exported(name: str, **labels: str) -> list[float]:
    """Every value Ray exports of ``name`` with these labels (one per replica)."""
    try:
        text = httpx.get(f"http://127.0.0.1:{EXPORT['port']}/metrics", timeout=10).text
    except httpx.HTTPError:
        return []
    return [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items())]


def _status(base: str) -> dict:
    r = CliRunner().invoke(serve_app, ["status", "--url", base])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def _ask(client: httpx.Client, n: int) -> None:
    queries = ["red dress", "running shoes", "kitchen knife", "phone case", "dress", "shoes", "bag", "tea"]
    for i in range(n):
        r = client.post("/v1/retrieve", json={"query": queries[i % len(queries)], "user_id": i, "k": 10})
        assert r.status_code == 200, r.text


def test_degraded_ivf_version_shows_a_recall_drop_against_the_exact_version(server: tuple[str, Any]) -> None:
    base, _ = server
    n = 24
    with httpx.Client(base_url=base, timeout=120) as client:
        _ask(client, n)
        wait_for(lambda: _status(base)["canary"].get("flat", {}).get("samples", 0) >= n, 60,
                 "the flat version's canary samples")
        flat = _status(base)["canary"]["flat"]
        assert flat["recall"] == 1.0 and flat["reference"] == "exact" and flat["k"] == K
        r = client.post("/v1/admin/promote", json={"version": "ivf"}, headers={"authorization": f"Bearer {TOKEN}"},
                        timeout=300)
        assert r.status_code == 200 and r.json()["version"] == "ivf", r.text
        _ask(client, n)
    wait_for(lambda: _status(base)["canary"].get("ivf", {}).get("samples", 0) >= n, 60,
             "the ivf version's canary samples")
    status = _status(base)
    ivf = status["canary"]["ivf"]
    print(f"recall canary @{K}: flat {flat['recall']} ({flat['samples']} samples), ivf at nprobe 1 {ivf['recall']} "
          f"({ivf['samples']} samples, reference {ivf['reference']})")
    assert status["version"] == "ivf" and ivf["reference"] == "all-lists"
    assert ivf["recall"] < 0.9  # the drop (measured ~0.4 on this catalogue), and flat stays listed at 1.0
    assert status["canary"]["flat"]["recall"] == 1.0

    # this ingress replica's gauge, and Ray's export of every replica's gauge and sample counter, per version
    local = httpx.get(f"{base}/metrics", timeout=30).text
    assert 'mgdspr_canary_recall{version="ivf"}' in local
    wait_for(lambda: len(_exported("ray_mgdspr_canary_recall", version="ivf")) > 0
             and sum(_exported("ray_mgdspr_canary_samples_total", version="ivf", outcome="ok")) >= n, 120,
             "Ray's export of the canary series")
    ivf_gauge = _exported("ray_mgdspr_canary_recall", version="ivf")
    flat_gauge = _exported("ray_mgdspr_canary_recall", version="flat")
    assert flat_gauge and min(flat_gauge) == 1.0
    assert ivf_gauge and max(ivf_gauge) < 0.9  # one value per ingress replica that sampled it
    assert sum(_exported("ray_mgdspr_canary_samples_total", outcome="failed")) == 0
    # the gauges stay exported while their replica lives (set again every GAUGE_REFRESH_S: Ray drops stale ones)
    assert _exported("ray_mgdspr_serving_version", version="ivf") == [1.0] * len(ivf_gauge)
