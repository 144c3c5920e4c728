"""The catalogue's item-tower inputs and exact retrieval over it (Ray-free; plain PyTorch and numpy).

Exact retrieval is brute-force inner product over every item of the catalogue (spec §6): the reference the
ANN index is measured against, what training reports as held-out Recall@K, and what the evaluation runs use.
Training samples its uniform negatives from the same ``CatalogueFeatures``. The Ray Data job that embeds a
catalogue into an artifact for the index is ``index/embed.py`` (``embed_catalogue``); ``item_vectors`` here
embeds one in memory.

Shapes: E searches, N items, d the embedding size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from ray_mgdspr.arrays import sorted_lookup
from ray_mgdspr.data.features import Featurizer
from ray_mgdspr.model.layers import as_tensors
from ray_mgdspr.model.mgdspr import TwoTower


@dataclass
class CatalogueFeatures:
    """Item-tower inputs of the whole catalogue: what negatives are sampled from and what gets embedded.

    ``features``: ``Featurizer.items`` of every item (``item_id`` (N,), ``item_title`` (N, T), ``item_<side>``
    (N,)), in catalogue order. ``clicks``: (N,) each item's clicks in the training days (``ItemPopularity``),
    which the sampling correction of the loss reads (``log_expected_count``); None: unknown, taken as equal.
    """

    features: dict[str, np.ndarray]
    clicks: np.ndarray | None = None
    _by_id: np.ndarray = field(init=False, repr=False)  # argsort of item_id: id -> row lookups
    _share: np.ndarray = field(init=False, repr=False)  # each item's add-one smoothed share of the clicks
    _unclicked: float = field(init=False, repr=False)  # the share of an item without clicks

    def __post_init__(self) -> None:
        self._by_id = np.argsort(self.item_id, kind="stable")
        clicks = np.zeros(len(self)) if self.clicks is None else self.clicks.astype(np.float64)
        self._unclicked = 1 / (clicks.sum() + len(self))
        self._share = (clicks + 1) * self._unclicked

    @classmethod
    def from_featurizer(cls, featurizer: Featurizer, item_ids: np.ndarray | pa.Array | pa.ChunkedArray
                        ) -> CatalogueFeatures:
        ids = np.asarray(item_ids, np.int64)
        f = featurizer.items(ids)
        return cls({k: np.array(v) for k, v in f.items()},  # own, writable copies
                   featurizer.popularity.count("clicks", ids))

    def log_expected_count(self, item_ids: np.ndarray, positives: int, uniform: int) -> np.ndarray:
        """log of how often each of ``item_ids`` is expected in one step's negative pool of ``positives`` batch
        positives (drawn as clicks are: an item's share of the training clicks, add-one smoothed) and ``uniform``
        uniform samples of the catalogue: the log Q of the sampled softmax's correction (``LossConfig.logq``).

        Example:
            >>> cat = CatalogueFeatures({"item_id": np.array([5, 9, 2])}, clicks=np.array([7, 0, 0]))
            >>> np.exp(cat.log_expected_count(np.array([5, 2]), positives=10, uniform=3)).round(3).tolist()
            [9.0, 2.0]
        """
        rows, found = sorted_lookup(self.item_id, item_ids, sorter=self._by_id)
        share = np.where(found, self._share[rows], self._unclicked)
        return np.log(positives * share + uniform / len(self))

    @property
    def item_id(self) -> np.ndarray:
        return self.features["item_id"]

    def __len__(self) -> int:
        return len(self.item_id)

    def rows(self, index: np.ndarray | slice) -> dict[str, np.ndarray]:
        """Every feature of the items at ``index``."""
        return {k: v[index] for k, v in self.features.items()}

    def sample(self, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """``n`` items drawn uniformly with replacement."""
        return self.rows(rng.integers(0, len(self), size=n))


@torch.inference_mode()
def item_vectors(model: TwoTower, catalogue: CatalogueFeatures, batch_size: int = 4096,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """H_item (N, d) of every catalogue item, in catalogue order, on ``device``."""
    model.eval()
    parts = [model.embed_items(as_tensors(catalogue.rows(slice(s, s + batch_size)), device))
             for s in range(0, len(catalogue), batch_size)]
    return torch.cat(parts)


@torch.inference_mode()
def query_vectors(model: TwoTower, features: dict[str, np.ndarray], batch_size: int = 512,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """H_qu (E, d) of featurized searches (``Featurizer.__call__`` output), on ``device``."""
    model.eval()
    rows = len(features["user_id"])
    parts = [model.query_tower(as_tensors({key: v[s:s + batch_size] for key, v in features.items()}, device))
             for s in range(0, rows, batch_size)]
    return torch.cat(parts) if parts else torch.zeros((0, model.query_tower.cfg.d), device=device)


@torch.inference_mode()
def exact_topk(queries: torch.Tensor | np.ndarray, items: torch.Tensor | np.ndarray, item_ids: np.ndarray, k: int,
               batch_size: int = 512) -> np.ndarray:
    """(E, k) ids of the items with the largest inner product per query, best first: brute force over every
    item (k is capped at N). Tensors stay on their device; numpy arrays are read as float32.

    Args:
        queries: (E, d). items: (N, d), rows in the order of ``item_ids`` (N,) int64.
    """
    q, it = _tensor(queries), _tensor(items)
    it = it.to(q.device)
    k = min(k, len(item_ids))
    out = [item_ids[(q[s:s + batch_size] @ it.T).topk(k, dim=1).indices.cpu().numpy()]
           for s in range(0, len(q), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, k), np.int64)


def retrieve(model: TwoTower, features: dict[str, np.ndarray], catalogue: CatalogueFeatures, k: int,
             device: torch.device | str = "cpu") -> np.ndarray:
    """Exact top-k item ids (E, k) of featurized searches over the whole catalogue."""
    return exact_topk(query_vectors(model, features, device=device), item_vectors(model, catalogue, device=device),
                      catalogue.item_id, k)


def targets_of(events: pa.Table) -> list[np.ndarray]:
    """The target item ids (clicked or bought) of each evaluation event (``Featurizer.events`` rows)."""
    return [np.asarray(t, np.int64) for t in events["target_item_ids"].to_pylist()]


def _tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x, np.float32))
