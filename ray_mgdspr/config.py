"""Typed configs for every stage, loaded from YAML.

One YAML file holds one section per stage (``simulate:``, ``vocab:``, ...); every section has defaults
that run on a 2-core laptop, so an empty file is a valid config. Unknown keys and wrong types are errors
that name the file and the key::

    configs/demo.yaml: simulate.n_items: Input should be a valid integer (got 'many')

Presets shipped with the package (``ray_mgdspr/presets/*.yaml``) list only what differs from these
defaults, with a reason per line.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the key."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------------
# simulate


class QuerySignals(StrictModel):
    """How queries are worded; the noise the 1-gram/2-gram granularities and the Trm exist for."""

    synonym_rate: float = Field(0.4, ge=0, le=1, description="P(a leaf's synonym replaces its head term)")
    partial_rate: float = Field(0.1, ge=0, le=1, description="P(a first query leaves out the leaf term)")
    shuffle_rate: float = Field(0.3, ge=0, le=1, description="P(the query's word order is shuffled)")
    typo_rate: float = Field(0.08, ge=0, le=1, description="P(a word gets a typo: swap, drop or doubling)")
    truncate_rate: float = Field(0.06, ge=0, le=1, description="P(a word is typed partially)")
    zh_space_rate: float = Field(0.3, ge=0, le=1, description="zh: P(spaces are kept between words)")
    attr_rate: float = Field(0.35, ge=0, le=1, description="P(an intent states an attribute slot)")
    own_taste_rate: float = Field(0.7, ge=0, le=1, description="P(a stated attribute is the user's taste)")
    brand_rate: float = Field(0.2, ge=0, le=1, description="P(an intent names a brand)")
    favourite_brand_rate: float = Field(0.8, ge=0, le=1, description="P(a named brand is a favourite)")


class SessionSignals(StrictModel):
    """Follow-up queries: ambiguous alone, clear from the user's recent queries and clicks."""

    followup_rate: float = Field(0.45, ge=0, le=1, description="P(another query follows in a session)")
    short_followup_rate: float = Field(0.6, ge=0, le=1, description="P(a follow-up is the new term alone)")
    max_queries: int = Field(4, ge=1, le=20, description="queries per session at most")


class ChoiceSignals(StrictModel):
    """Click / buy / collect choice model. Click logit on an examined item at rank r:
    a*grade + b*brand_pref + c*shop_pref + d*price_fit + e*quality + f*discount + g*taste + bias + N(0, noise).
    Examination falls like 1/log2(r+1) (position bias)."""

    page_size: int = Field(20, ge=4, le=200, description="items on a result page")
    relevant_share: float = Field(0.6, ge=0, le=1, description="share of the page that matches the leaf")
    attractive_share: float = Field(0.25, ge=0, le=1, description="share of popular/discounted off-leaf items")
    rank_noise: float = Field(1.0, ge=0, description="std of the noise in the engine's page ordering")
    candidates: int = Field(8, ge=1, description="leaf items the engine draws (by popularity) per relevant page "
                            "slot before it scores them: more lets personalisation reach beyond the popular items")
    a_relevance: float = Field(2.0, description="weight of graded relevance (0, 1, 2)")
    b_brand: float = Field(1.5, description="weight of the user's brand preference")
    c_shop: float = Field(0.8, description="weight of the user's shop preference")
    d_price: float = Field(1.0, description="weight of price fit (0 best, negative further away)")
    e_quality: float = Field(0.4, description="weight of latent quality")
    f_discount: float = Field(1.2, description="pull of discounted items: click noise on irrelevant items")
    g_taste: float = Field(1.0, description="weight of the share of wanted attribute values the item has")
    bias: float = Field(-3.5, description="click logit intercept")
    noise: float = Field(1.0, ge=0, description="std of per-impression logit noise")
    click_noise: float = Field(1.0, ge=0, description="multiplies P(click) of irrelevant (grade 0) items: 0 = no "
                               "clicks on irrelevant items, 1 = the choice model as is, more = noisier clicks "
                               "(docs/simulator.md maps it to the share of clicks on irrelevant items)")
    page_personalisation: float = Field(2.0, ge=0, description="weight of the searching user's affinity (the "
                                        "brand, shop, price and taste terms above) in the engine's page score: "
                                        "0 = pages built without the user")
    buy_bias: float = Field(-3.0, description="buy-after-click logit intercept")
    buy_relevance: float = Field(1.5, description="buy-after-click weight of relevance")
    buy_price: float = Field(1.5, description="buy-after-click weight of price fit")
    buy_long_term: float = Field(1.0, description="buy-after-click weight of long-term category preference")
    collect_bias: float = Field(-3.0, description="collect-after-click logit intercept")
    collect_taste: float = Field(1.5, description="collect-after-click weight of brand + attribute taste")


class UserSignals(StrictModel):
    """Latent preferences and how they drift; the signal for personalisation and the three sequences."""

    cate_concentration: float = Field(0.3, gt=0, description="Dirichlet alpha over first-level categories")
    fav_brands: int = Field(3, ge=1, description="favourite brands per user")
    fav_shops: int = Field(3, ge=1, description="favourite shops per user")
    price_pref_std: float = Field(0.8, ge=0, description="std of the preferred log-price offset (z units)")
    brand_drift: float = Field(0.02, ge=0, le=1, description="daily P(a favourite brand is replaced)")
    interest_burst_rate: float = Field(0.15, ge=0, le=1, description="daily P(a new short-lived interest)")
    interest_burst_days: int = Field(3, ge=1, description="how long a burst lasts")
    interest_burst_weight: float = Field(0.6, ge=0, le=1, description="share of activity a burst takes")
    activity_zipf: float = Field(1.1, gt=0, description="Zipf exponent of user activity (power users)")


class SimulateConfig(StrictModel):
    """A seeded Taobao-like world. Output is synthetic and labelled so wherever it is reported."""

    lang: Literal["en", "zh"] = "en"
    seed: int = 0
    n_items: int = Field(2_000, ge=50, description="catalogue size")
    n_users: int = Field(500, ge=1)
    n_brands: int = Field(200, ge=5)
    n_shops: int = Field(400, ge=5)
    leaves_per_category: int | None = Field(
        None, ge=1, description="cap on leaves per first-level category (None: all in the lexicon)"
    )
    warmup_days: int = Field(30, ge=0, description="history-only days before day 1 (long-term sequences)")
    train_days: int = Field(7, ge=1)
    test_days: int = Field(1, ge=1)
    base_date: dt.date = Field(dt.date(2020, 12, 1), description="calendar date of day 1")
    searches_per_day: float = Field(1.2, ge=0, description="mean search sessions per user-day (x activity)")
    browses_per_day: float = Field(3.0, ge=0, description="mean browsing clicks per user-day (x activity)")
    users_per_chunk: int = Field(20_000, ge=1, description="users simulated at once (bounds memory)")
    item_popularity_sigma: float = Field(1.2, ge=0, description="log-normal sigma of item popularity")
    title_synonym_rate: float = Field(0.3, ge=0, le=1, description="P(a title uses a synonym of the leaf)")
    queries: QuerySignals = QuerySignals()
    sessions: SessionSignals = SessionSignals()
    choice: ChoiceSignals = ChoiceSignals()
    users: UserSignals = UserSignals()

    @model_validator(mode="after")
    def _page_mix(self) -> SimulateConfig:
        if self.choice.relevant_share + self.choice.attractive_share > 1:
            raise ValueError(
                "choice.relevant_share + choice.attractive_share must be <= 1 "
                f"(got {self.choice.relevant_share} + {self.choice.attractive_share}); lower one of them"
            )
        return self


# --------------------------------------------------------------------------------------------------
# vocab


class VocabConfig(StrictModel):
    """Vocabularies for the model's granularities (characters, character bigrams, words)."""

    min_count: int = Field(2, ge=1, description="tokens seen fewer times go to the hashed OOV buckets")
    max_words: int = Field(200_000, ge=1)
    max_chars: int = Field(20_000, ge=1)
    max_bigrams: int = Field(200_000, ge=1, description="most frequent bigrams get their own id")
    oov_buckets: int = Field(1_000, ge=1, description="hashing buckets for out-of-vocabulary tokens")


# --------------------------------------------------------------------------------------------------
# features, model, loss, optimiser (spec §2-§4, §8-§9)


class FeatureConfig(StrictModel):
    """What the featurizer cuts from a search event and the user's history (spec §1, §2, §8)."""

    # how much of each text is kept (longer ones are cut; serve.max_query_chars is what refuses a query). The
    # names before 2026-12 (max_query_chars, ...) are still read: bundles saved earlier record them.
    query_chars_kept: int = Field(32, ge=1, validation_alias=AliasChoices("query_chars_kept", "max_query_chars"),
                                  description="q_1gram: characters of the query kept")
    query_bigrams_kept: int = Field(32, ge=1, validation_alias=AliasChoices("query_bigrams_kept",
                                                                            "max_query_bigrams"),
                                    description="q_2gram: character bigrams kept")
    query_words_kept: int = Field(12, ge=1, validation_alias=AliasChoices("query_words_kept", "max_query_words"),
                                  description="q_seg / q_seg_seq: segmented words kept")
    title_words_kept: int = Field(32, ge=1, validation_alias=AliasChoices("title_words_kept", "max_title_words"),
                                  description="item tower: title words kept")
    his_queries: int = Field(10, ge=0, description="k of q_his: the user's latest earlier queries (spec §9.9)")
    realtime_len: int = Field(50, ge=1, description="R^u: latest clicks before the search")
    short_len: int = Field(100, ge=1, description="S^u: clicks before R^u within short_days")
    long_len: int = Field(100, ge=1, description="L^u: per action, latest behaviours in the long window")
    short_days: float = Field(10.0, gt=0, description="S^u window (days before the search)")
    long_days: float = Field(30.0, gt=0, description="L^u window: from short_days to long_days before the search")

    @model_validator(mode="after")
    def _windows(self) -> FeatureConfig:
        if self.long_days <= self.short_days:
            raise ValueError(f"long_days ({self.long_days}) must exceed short_days ({self.short_days})")
        return self


class ModelConfig(StrictModel):
    """Sizes and switches of the two towers (spec §2, §3, §8, §9). Defaults are the paper's except where a field
    says otherwise (init: docs/model.md, "Convergence"; item side information: "Item side information")."""

    kind: Literal["mgdspr", "dnn"] = Field("mgdspr", description="dnn: the mean-pooling two-tower baseline")
    d: int = Field(128, ge=8, description="embedding size everywhere")
    heads: int = Field(8, ge=1, description="self-attention heads (Trm, behaviour self-attention, fusion)")
    dropout: float = Field(0.2, ge=0, lt=1, description="between the real-time LSTM's layers")
    attn_dropout: float = Field(0.0, ge=0, lt=1, description="attention dropout (paper: none stated)")
    # ID tables: None sizes a table to the training world (one row per id, no collisions); a number caps it
    # and raw ids are hashed into that many rows (a 100M-item catalogue does not need 100M rows).
    item_buckets: int | None = Field(None, ge=2, description="item ID table rows (None: one per catalogue id)")
    shop_buckets: int | None = Field(None, ge=2, description="shop ID table rows (None: one per shop id)")
    brand_buckets: int | None = Field(None, ge=2, description="brand ID table rows (None: one per brand id)")
    category_buckets: int | None = Field(None, ge=2, description="leaf / first-level category table rows")
    sparse_ids: bool = Field(True, description="sparse gradients for the ID and token tables (Adagrad)")
    mgs: bool = Field(True, description="ablation -mgs: False uses q_seg alone as a single token")
    trm: bool = Field(True, description="ablation -trm: False fuses by concatenation + MLP instead of [CLS]")
    personalise: bool = Field(True, description="False: query only, no behaviour attention")
    type_embeddings: bool = Field(False, description="learned token-group embeddings in the fusion (not in paper)")
    item_side_info: bool = Field(
        True, description="item tower also reads the item's leaf, first-level category, brand, shop and price level "
        "(not in the paper, whose item tower is ID + title; docs/model.md, \"Item side information\")")
    price_level: bool = Field(
        True, description="behaviour side information includes the item's price level (not in the paper); with "
        "item_side_info, so does the item tower")
    item_popularity: bool = Field(
        True, description="with item_side_info, the item tower also reads how often the item was shown and clicked "
        "in the training days' searches (log2 levels; not in the paper; docs/model.md, \"Item popularity\")")
    item_ids: bool = Field(
        False, description="item ID rows: the item tower's e_i and the behaviours' item ID (the paper's, True); False: "
        "items are their title and side information in both towers, and no item ID table exists (docs/model.md, "
        "\"Item IDs\": on every packaged preset an ID row sees a few clicks and memorises them)")
    item_id_init: Literal["zero", "normal"] = Field(
        "zero", description="item ID rows at start: zero (an item starts as its title's vector) or N(0, 1/d)")
    cls_init: Literal["zero", "normal"] = Field(
        "zero", description="[CLS] at start: zero (the fusion starts as attention pooling of the tokens) or "
        "N(0, 1/d)")

    @model_validator(mode="after")
    def _heads_divide_d(self) -> ModelConfig:
        if self.d % self.heads:
            raise ValueError(f"d ({self.d}) must be divisible by heads ({self.heads})")
        return self


class LossConfig(StrictModel):
    """Sampled softmax with temperature and mixed hard negatives (spec §4, §9.1-§9.3)."""

    kind: Literal["softmax", "hinge"] = "softmax"
    tau: float = Field(2.0, gt=0, description="temperature; 1 is the -tau ablation")
    pool_size: int = Field(1024, ge=1, description="shared negative pool: batch positives + uniform samples")
    gather_positives: bool = Field(True, description="data-parallel: positives of every worker join the pool")
    n_hard: int = Field(684, ge=0, description="N of I_mix; 0 switches the mixed hard negatives off")
    alpha_low: float = Field(0.4, ge=0, le=1, description="a of alpha ~ U(a, b)")
    alpha_high: float = Field(0.6, ge=0, le=1, description="b of alpha ~ U(a, b)")
    margin: float = Field(0.1, gt=0, description="hinge loss margin (hinge kind only)")
    logq: bool = Field(
        True, description="softmax: subtract log Q (each item's expected count in the pool) from its logit, so a "
        "pool of batch positives does not teach the model to rank often-clicked items down (not in the paper; "
        "docs/model.md, \"Sampling correction\")")

    @model_validator(mode="after")
    def _alpha_range(self) -> LossConfig:
        if self.alpha_low > self.alpha_high:
            raise ValueError(f"alpha_low ({self.alpha_low}) must not exceed alpha_high ({self.alpha_high})")
        return self


class OptimConfig(StrictModel):
    """The optimiser (spec §9.4: Adagrad as in TF) with global-norm clipping; docs/model.md, "Convergence"."""

    kind: Literal["adam", "adagrad"] = Field(
        "adam", description="adam: Adam on the dense layers, SparseAdam on the sparse tables (leaves the initial "
        "loss plateau in tens of steps); adagrad: the paper's, with TF's accumulator")
    lr: float | None = Field(None, gt=0, description="None: 3e-3 for adam, the paper's 0.1 for adagrad")
    initial_accumulator: float = Field(0.1, ge=0, description="adagrad only: TF's starting accumulator")
    clip_norm: float = Field(3.0, gt=0)
    schedule: Literal["constant", "cosine"] = Field(
        "cosine", description="learning rate over the run: cosine decay from lr to lr * final_lr_ratio by the "
        "last step, or constant (docs/model.md, \"Learning-rate schedule\")")
    final_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine only: the last step's lr as a share of lr")
    lr_scaling: Literal["none", "sqrt", "linear"] = Field(
        "none", description="scale lr with the global batch (batch_size x workers) against lr_reference_batch: "
        "none; sqrt (lr x sqrt(batch / reference), the rule for Adam); linear (lr x batch / reference, the rule "
        "for SGD, with warm-up). For a larger batch on a GPU at the rate tuned at the reference "
        "(docs/training.md, \"Larger batches\")")
    lr_reference_batch: int = Field(256, ge=1, description="the global batch optim.lr was tuned at (lr_scaling)")
    warmup_steps: int = Field(0, ge=0, description="steps over which lr rises linearly to its (scaled) value "
                              "before the schedule starts; 0: none")

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "batch_size" in data:
            raise ValueError("batch_size moved to train.batch_size (examples per step and worker)")
        return data

    @property
    def learning_rate(self) -> float:
        """``lr``, or the kind's default: 3e-3 for Adam (measured, docs/model.md), the paper's 0.1 for Adagrad."""
        return self.lr if self.lr is not None else {"adam": 3e-3, "adagrad": 0.1}[self.kind]

    def scaled_learning_rate(self, global_batch: int | None) -> float:
        """``learning_rate`` scaled to ``global_batch`` by ``lr_scaling`` (None: unscaled).

        Example:
            >>> OptimConfig(lr=1e-3, lr_scaling="sqrt").scaled_learning_rate(1024)
            0.002
        """
        if global_batch is None or self.lr_scaling == "none":
            return self.learning_rate
        ratio = global_batch / self.lr_reference_batch
        return self.learning_rate * (ratio ** 0.5 if self.lr_scaling == "sqrt" else ratio)


# --------------------------------------------------------------------------------------------------
# Ray Data ingest and Ray Train


class DataConfig(StrictModel):
    """Ray Data: read the logs, validate, featurize in an actor pool (resources are configuration)."""

    featurize_actors: int = Field(1, ge=1, description="featurizer actors (each holds the users' histories)")
    featurize_cpus: float = Field(0.25, gt=0, description="CPUs per featurizer actor (fractional on a laptop)")
    batch_rows: int = Field(1024, ge=1, description="rows per featurize call")
    read_cpus: float = Field(0.25, gt=0, description="CPUs per read / explode task (fractional on a laptop)")
    repartition: int | None = Field(None, ge=1, description="split the read into this many blocks (None: as read)")
    shuffle_buffer: int | None = Field(2048, ge=1, description="rows each worker shuffles locally (None: off)")
    prefetch_batches: int = Field(1, ge=0, description="batches each training worker's iterator prepares ahead of "
                                  "the step, in a background thread (Ray Data iter_torch_batches)")
    materialize: bool = Field(True, description="featurize once per run: the examples are featurized before the "
                              "first epoch and kept in Ray's object store (spilled to disk when it is full) for "
                              "every epoch; false streams the logs through the featurizer actors again each epoch "
                              "(docs/training.md, \"Feeding the workers\")")
    share_history: bool = Field(
        True, description="build the featurizer (catalogue, every user's histories) once per run, save its arrays "
        "under the run's directory and memory-map them in every featurizer actor: a node holds one copy however "
        "many actors it runs; false: each actor reads the world and builds its own copy")
    materialize_to: Literal["auto", "object_store", "storage"] = Field(
        "auto", description="where examples featurized once are kept: object_store (Ray's, fastest; a block lost "
        "with its node cannot be rebuilt, since actors made it), storage (Parquet under the run's directory on "
        "train.storage_path, reused by a resumed run with the same inputs; survives the loss of any node), or auto "
        "(storage when the cluster has more than one node, else object_store)")


class RayConfig(StrictModel):
    """Where stages run: an existing cluster, or a local Ray started by the command."""

    address: str | None = Field(None, description="cluster address (None: $RAY_ADDRESS, else start a local Ray)")
    local_num_cpus: int | None = Field(
        4, ge=1, description="logical CPUs of a local Ray (None: the machine's); Ray Data's file listing asks for a "
        "whole CPU, so a 2-core laptop running 2 fractional workers needs more logical CPUs than cores")
    http_proxy: Literal["haproxy", "ray"] = Field(
        "haproxy", description="Serve's HTTP front in a local Ray the command starts: haproxy (the HAProxy Ray "
        "bundles, in front of ingress replicas that serve HTTP themselves; RAY_SERVE_ENABLE_HA_PROXY=1) or ray "
        "(Ray's Python proxy actor). A cluster's is set in its nodes' environment (clusters/README.md)")
    serve_throughput_optimized: bool = Field(
        True, description="Ray Serve's throughput-optimised mode in a local Ray the command starts "
        "(RAY_SERVE_THROUGHPUT_OPTIMIZED=1: gRPC between deployments, the router and user code on each replica's "
        "event loop, GC frozen after start-up). A cluster's is set in its nodes' environment")
    serve_control_loop_s: float = Field(
        0.5, gt=0, le=10, description="period of Serve's controller loop in a local Ray the command starts "
        "(RAY_SERVE_CONTROL_LOOP_INTERVAL_S; Ray's default 0.1). It reconciles replicas, versions and autoscaling; "
        "0.5 s cut the idle endpoint's CPU from 0.147 to 0.104 cores on 2 cores (benchmarks/idle_serve.py), and a "
        "replica's start or stop is noticed up to 0.4 s later. A cluster's is set in its nodes' environment")
    dashboard: bool = Field(
        True, description="Ray's dashboard in a local Ray the command starts (ray.init include_dashboard): its web "
        "UI and state API. It costs ~0.02 cores of an idle endpoint on 2 cores (benchmarks/idle_serve.py); "
        "false drops it (`mgdspr serve status` and the endpoint's /metrics do not need it). A cluster's is "
        "chosen by `ray start`")


class TrainConfig(StrictModel):
    """Ray Train: DDP training of the model on a world, checkpoints, resume, evaluation, the output bundle."""

    world: str = Field("runs/world", description="world directory (or URI pyarrow can read)")
    run_name: str = Field("mgdspr", description="same name + storage_path = resume from the last checkpoint")
    storage_path: str = Field("runs/train", description="where runs and checkpoints live (made absolute)")
    out: str | None = Field(None, description="model bundle directory (default: <storage_path>/<run_name>/bundle)")
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(256, ge=1, description="examples per step and worker (the global batch is "
                            "num_workers x this); also the single-process loop's (fit_local)")
    max_steps_per_epoch: int | None = Field(
        None, ge=1, description="cap per worker and epoch (smoke runs, bounded budgets); only the examples the "
        "capped epochs read are featurized")
    num_workers: int = Field(2, ge=1, description="DDP workers")
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 0.5}, description="fractional CPUs so 2 workers fit a 2-core laptop"
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="where the workers go: PACK fills a node first (fast gloo/nccl on one host); SPREAD "
        "puts them on different nodes where it can (one worker per GPU node, a lost node costs fewer workers)")
    bf16: bool = Field(True, description="bf16 autocast on GPU (ignored on CPU)")
    checkpoint_every: int = Field(200, ge=1, description="steps between checkpoints (and at every epoch end)")
    num_to_keep: int = Field(2, ge=1, description="checkpoints kept")
    max_failures: int = Field(1, ge=0, description="worker failures the run recovers from")
    eval_events: int = Field(1000, ge=1, description="held-out test-day searches sampled for Recall@K")
    eval_k: int = Field(100, ge=1, description="K of Recall@K (exact search over the whole catalogue)")
    seed: int = 0

    @model_validator(mode="after")
    def _gpu_resources(self) -> TrainConfig:
        if self.use_gpu and "GPU" not in self.resources_per_worker:
            self.resources_per_worker = {**self.resources_per_worker, "GPU": 1.0}
        return self


# --------------------------------------------------------------------------------------------------
# catalogue embedding


class EmbedConfig(StrictModel):
    """Catalogue embedding with a Ray Data actor pool; each actor loads the bundle's item tower once."""

    out: str = Field("runs/embeddings", description="root of embedding sets, one directory per model version")
    actors: int = Field(2, ge=1, description="item-tower actors (at 1M items on 2 cores, 2 x 1 CPU ran 1.06x an "
                        "in-process loop, 1 x 0.5 CPU 0.64x: docs/index.md)")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs per actor; Ray gives a worker of fewer than 2 CPUs one "
                                  "torch thread")
    gpus_per_actor: float = Field(0.0, ge=0, description="> 0 runs the item tower on a GPU")
    batch_size: int = Field(4096, ge=1, description="items per map_batches call")

# --------------------------------------------------------------------------------------------------
# index


def _probe_dim(factory: str) -> int:
    """A dimension every size in ``factory`` fits: PQ{m} needs m | d, PCA{d'} needs d' <= d.

    The real dimension comes from the model bundle and is checked again when a shard is built.
    """
    sizes = [int(s) for s in re.findall(r"\d+", factory) if 0 < int(s) <= 1024]
    return min(math.lcm(8, *sizes), 8192)  # the cap keeps odd mixes (PQ7 + PCA11 + ...) from allocating much


class IndexConfig(StrictModel):
    """Sharded Faiss index of the catalogue embeddings: how shards are built and searched."""

    shards: int = Field(2, ge=1, description="S: item i goes to shard splitmix64(i) % S")
    factory: str = Field("Flat", description="Faiss index_factory string: Flat, IVF{nlist},Flat, HNSW32, "
                         "IVF{nlist},PQ{m}np (the builder adds the item-id map itself; np skips polysemous "
                         "training, which search never uses and which is slow)")
    metric: Literal["ip"] = Field("ip", description="inner product: the model scores by inner product")
    train_sample: int = Field(100_000, ge=1, description="vectors sampled per shard to train IVF / PQ")
    seed: int = Field(0, description="training sample seed (shard s uses seed + s)")
    nprobe: int = Field(16, ge=1, description="IVF: inverted lists visited per query")
    ef_search: int = Field(128, ge=1, description="HNSW: candidate list size at search time")
    backend: Literal["auto", "faiss-cpu", "faiss-gpu", "torch"] = Field(
        "auto", description="search backend; auto: faiss-gpu if faiss has GPU support, else torch exact on CUDA "
        "if a GPU is visible, else faiss-cpu")
    out: str = Field("runs/index", description="root of index versions (one directory per model version)")
    compact_at: float = Field(0.1, ge=0, description="delta updates (`mgdspr index update`) keep a shard's base files "
                              "and write its changes beside them as a delta segment, until the items changed since "
                              "the base files reach this share of them: then the shard is rewritten in full "
                              "(compacted); 0 rewrites every shard a delta touches")
    build_cpus: float = Field(0.5, gt=0, description="CPUs per shard-building Ray task")
    build_resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per "
                                              "shard-building task (e.g. {index_builder: 1} for big-memory nodes)")
    build_strategy: Literal["SPREAD", "DEFAULT"] = Field(
        "SPREAD", description="SPREAD builds the shards on different nodes (each holds one shard's vectors); "
        "DEFAULT lets Ray pack them")

    @field_validator("factory")
    @classmethod
    def _factory_parses(cls, factory: str) -> str:
        if factory == "Flat":  # the default needs no check, and faiss stays out of processes that never index
            return factory
        import faiss  # lazily: configs load on machines that never build an index

        if "IDMap" in factory:
            raise ValueError(f"factory {factory!r}: leave out IDMap, the builder maps item ids itself")
        try:
            faiss.index_factory(_probe_dim(factory), factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            reason = re.sub(r"^Error in .*? at \S+:\d+: (Error: )?", "", str(e))  # drop the C++ location
            raise ValueError(f"factory {factory!r} is not a Faiss index_factory string ({reason}); "
                             "examples: Flat, IVF1024,Flat, HNSW32, IVF1024,PQ16np") from None
        return factory


# --------------------------------------------------------------------------------------------------
# serve


# one POST /v1/events behaviour at its largest values, with its separator:
# {"user_id": 9223372036854775807, "item_id": 9223372036854775807, "action": "collect", "ts": 253402300799999},
BEHAVIOUR_JSON_BYTES = 110


class DeploymentConfig(StrictModel):
    """Resources and scaling of one Serve deployment (per replica); whole CPUs/GPUs on a real cluster."""

    num_cpus: float = Field(0.25, ge=0, description="CPUs per replica (fractional on small machines: RAY.md)")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica (shards: exact torch search on the GPU)")
    min_replicas: int = Field(1, ge=1, description="autoscaling lower bound")
    max_replicas: int = Field(2, ge=1, description="autoscaling upper bound (= min_replicas: fixed)")
    target_ongoing_requests: float = Field(4, gt=0, description="autoscaling target of in-flight requests per "
                                           "replica")
    max_ongoing_requests: int = Field(64, ge=1, description="requests a replica accepts at once; Serve's "
                                      "default of 5 collapses under 16 clients (RAY.md)")
    upscale_delay_s: float = Field(2.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=0, description="autoscaling decides on the mean of in-flight "
                                      "requests over this window (Serve's default 30 s): shorter follows the load "
                                      "sooner, both up and down")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per replica "
                                        "(pins the deployment to node types that offer them)")
    max_replicas_per_node: int | None = Field(None, ge=1, description="at most this many replicas of the "
                                              "deployment on one node (1: every replica on its own node)")

    @model_validator(mode="after")
    def _bounds(self) -> DeploymentConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas {self.max_replicas} < min_replicas {self.min_replicas}")
        return self

    def serve_options(self) -> dict[str, Any]:
        """Keyword arguments of ``Deployment.options``."""
        actor = {"num_cpus": self.num_cpus, **({"num_gpus": self.num_gpus} if self.num_gpus else {}),
                 **({"resources": dict(self.resources)} if self.resources else {})}
        scaling: dict[str, Any] = {"num_replicas": self.min_replicas}
        if self.max_replicas > self.min_replicas:
            scaling = {"autoscaling_config": {
                "min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s,
                "look_back_period_s": self.look_back_period_s}}
        if self.max_replicas_per_node is not None:
            scaling["max_replicas_per_node"] = self.max_replicas_per_node
        return {"ray_actor_options": actor, "max_ongoing_requests": self.max_ongoing_requests, **scaling}


class ServeConfig(StrictModel):
    """The retrieval endpoint: where it listens, what it serves, limits, and each deployment's resources."""

    host: str = Field("127.0.0.1", description="bind address; loopback by default (0.0.0.0 exposes it)")
    port: int = Field(8000, ge=1, le=65535)
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        "EveryNode", description="Serve's HTTP proxies: on every node (behind a load balancer) or on the head only")
    app_name: str = Field("mgdspr", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
                          description="Serve application of the HTTP ingress; each served version runs as "
                          "the application <app_name>-<version>")
    index_root: str | None = Field(None, description="root of index versions (default: index.out)")
    version: str | None = Field(None, description="version to serve at start (default: the index root's "
                                "CURRENT); later versions arrive by promotion or by moving CURRENT")
    world: str | None = Field(None, description="world whose catalogue gives the featurizer's item side "
                              "information, key terms and BM25 titles (default: train.world)")
    store: str = Field("runs/store/behaviours.sqlite", description="behaviour store: an SQLite file (built "
                       "from the world's logs when missing) or a redis:// URL")
    backend: Literal["auto", "faiss-cpu", "faiss-gpu", "torch"] | None = Field(
        None, description="shard search backend (default: index.backend)")
    nprobe: int | None = Field(None, ge=1, description="IVF lists visited per query (default: index.nprobe)")
    ef_search: int | None = Field(None, ge=1, description="HNSW candidate list (default: index.ef_search)")
    faiss_threads: int = Field(1, ge=1, description="OpenMP threads per shard replica: on a busy machine one "
                               "thread per query batch beats many (measured 8-40x per query on 2 cores)")
    torch_threads: int = Field(1, ge=1, description="intra-op threads of the query encoder")
    search_threads: int = Field(1, ge=1, description="threads that search the shards of one batch at once in a "
                                "replica that holds the whole version (inline, colocated, the Ray-free core); 1: "
                                "one shard after another. No gain measured on 2 cores, where a request's other "
                                "work already holds the second core (docs/serving.md, 'Searching the shards at once')")
    query_tower: Literal["onnx", "torchscript", "module"] = Field(
        "onnx", description="how the query tower runs, made at load and checked against the module (a graph that "
        "cannot be made or disagrees is logged and the next one runs): onnx, exported and run by ONNX Runtime "
        "(a one-request batch of the large preset's tower in 5.5 ms p50 against 6.8 for torchscript and 10.8 for "
        "the module on a slow day of 2 cores); torchscript, traced, frozen and optimised; module, the eager module "
        "(docs/serving.md, 'The query tower')")
    default_k: int = Field(50, ge=1)
    max_k: int = Field(1000, ge=1, description="largest k a request may ask for")
    filter_fetch: int = Field(20, ge=1, description="with the relevance filter on, the lexical channel (and the "
                              "fallback) fetches k x this many candidates so that k items that pass usually remain")
    max_fetch: int = Field(1000, ge=1, description="at most this many lexical candidates (never below k); the "
                           "embedding channel's depth is serve.filter_depth")
    filter_depth: int = Field(9600, ge=1, description="with the relevance filter on and key terms in the query, "
                              "the embedding channel searches this deep (the paper's 9,600), capped by the "
                              "catalogue size; each shard returns only its hits down to its k-th passing one")
    verdict_cache_mb: int = Field(64, ge=0, description="memory for the relevance filter's kept verdicts, per "
                                  "item table (each shard, and the lexical channel's catalogue): one byte per item "
                                  "per key term, two for a phrase; the least recently used terms are dropped (at "
                                  "least 16 are kept)")
    fallback: Literal["lexical", "none"] = Field(
        "lexical", description="when fewer than k embedding hits pass the filter, fill the page with the lexical "
        "(BM25) channel's passing hits (runs only then); none: leave the page short")
    early_fallback: float = Field(
        4.0, ge=0, description="start the lexical fallback beside the embedding search, instead of after it, when "
        "at most k x this many of the version's items can pass the query's key terms (counted from the filter's "
        "postings, off the request's path): such a page is nearly always short. Colocated and inline placement "
        "and the Ray-free core; 0: never (docs/serving.md, 'The lexical channel')")
    max_query_chars: int = Field(256, ge=1, description="longer queries are refused with 422")
    max_body_bytes: int = Field(16_384, ge=256, description="larger bodies of POST /v1/retrieve and "
                                "/v1/admin/promote are refused with 413")
    max_events: int = Field(1000, ge=1, description="events (behaviours + past queries) per POST /v1/events")
    max_events_bytes: int = Field(131_072, ge=256, description="larger bodies of POST /v1/events are refused "
                                  "with 413; must hold serve.max_events behaviours at their largest values "
                                  f"({BEHAVIOUR_JSON_BYTES} bytes each)")
    retry_backoff_ms: float = Field(50.0, gt=0, description="a read (encoder, shard, lexical call) that failed "
                                    "because its replica died or is unavailable is retried on another replica "
                                    "after this wait, doubling per attempt, within serve.request_timeout_s")
    token: str | None = Field(None, description="bearer token of the write paths (events, promotion); the "
                              "MGDSPR_SERVE_TOKEN environment variable overrides; none set: writes are refused")
    placement: Literal["per_stage", "colocated", "inline"] = Field(
        "inline", description="how a served version is deployed: inline, every ingress replica holds the whole "
        "version and answers a batch of requests itself (no hop: Serve's ~3 ms and ~4 CPU ms per hop saved; a new "
        "version is loaded in every ingress replica before the switch; serve.ingress sizes those replicas; for a "
        "version that fits one replica's memory); colocated, one deployment whose every replica holds the whole "
        "version, one hop from the ingress (the HTTP front and the versions scale apart); per_stage, one "
        "deployment for the encoder, one per shard and one for BM25, each scaling and placed on its own (a "
        "cluster whose shards need their own nodes or GPUs); docs/serving.md, Placement")
    batch_size: int = Field(32, ge=1, description="the most requests in one batch of the encoder and the shards "
                            "(colocated, inline: of the whole version's); a batch forms when the replica is free to "
                            "run it, from the requests that queued meanwhile (serve/batching.py)")
    batch_wait_ms: float = Field(0.0, ge=0, description="how long a batch waits for more after its first request "
                                 "unless it fills (0: it takes the requests that queued while the batch before it "
                                 "ran; a wait makes each request of a quiet endpoint pay it)")
    request_timeout_s: float = Field(10.0, gt=0, description="a request's budget across all stages")
    version_refresh_s: float = Field(0.25, gt=0, description="the ingress hears of a switch at once (a long poll "
                                     "of the version manager); when that poll fails (the manager restarting), it "
                                     "asks again after this wait")
    drain_s: float = Field(5.0, ge=0, description="after a switch, how long the old version keeps serving "
                           "requests that started on it before its application is deleted")
    load_timeout_s: float = Field(300.0, gt=0, description="how long a new version may take to load")
    watch_current_s: float = Field(2.0, ge=0, description="poll the index root's CURRENT this often and "
                                   "promote what it names (0: only explicit promotion)")
    canary_share: float = Field(0.01, ge=0, le=1, description="recall canary: this share of /v1/retrieve "
                                "requests (chosen at random) is also searched exactly in the background, off the "
                                "request's path, to measure the index's recall@canary_k (0: off; docs/serving.md, "
                                "Recall canary)")
    canary_k: int = Field(50, ge=1, le=10_000, description="the k of the canary's recall@k: the ANN's top k "
                          "against the exact top k of the same query embedding, unfiltered")
    canary_window: int = Field(200, ge=1, le=100_000, description="the canary's running recall is the mean of "
                               "the last this many samples (per version, per ingress replica and in the version "
                               "manager)")
    canary_ef_search: int = Field(4096, ge=1, description="HNSW shards: the efSearch of the canary's reference "
                                  "search (near-exact; IVF shards probe every list, Flat is exact)")
    ingress: DeploymentConfig = DeploymentConfig()
    encoder: DeploymentConfig = DeploymentConfig()
    shard: DeploymentConfig = DeploymentConfig(max_replicas=1)
    head: DeploymentConfig = DeploymentConfig(max_replicas=1, num_cpus=0.1)
    retriever: DeploymentConfig = Field(DeploymentConfig(), description="placement colocated: the replicas of "
                                        "the whole version (encoder, every shard, BM25 in one process each)")

    def resolved(self, project: ProjectConfig) -> ResolvedServeConfig:
        """This section with every field it inherits (``None``: index_root, world, backend, nprobe, ef_search)
        filled from the project's other sections: the one place those defaults are resolved."""
        inherited = {"index_root": project.index.out, "world": project.train.world,
                     "backend": project.index.backend, "nprobe": project.index.nprobe,
                     "ef_search": project.index.ef_search}
        values = self.model_dump()
        return ResolvedServeConfig.model_validate(
            {**values, **{name: value for name, value in inherited.items() if values[name] is None}})

    @model_validator(mode="before")
    @classmethod
    def _replaced(cls, data: Any) -> Any:
        """``trace_query_tower`` (until 2026-12, and in every config a run wrote out) is read as ``query_tower``:
        false as ``module``, true (a compiled graph, the old default) as the new default, with a warning."""
        if isinstance(data, dict) and "trace_query_tower" in data:
            data = dict(data)
            traced = data.pop("trace_query_tower")
            if traced is False and "query_tower" not in data:
                data["query_tower"] = "module"
            warnings.warn(f"serve.trace_query_tower ({traced}) is replaced by serve.query_tower: read as "
                          f"query_tower {data.get('query_tower', 'onnx')!r}; set that instead (onnx, torchscript "
                          "or module)", FutureWarning, stacklevel=2)
        return data

    @model_validator(mode="after")
    def _k_bounds(self) -> ServeConfig:
        if self.default_k > self.max_k:
            raise ValueError(f"default_k {self.default_k} > max_k {self.max_k}")
        need = self.max_events * BEHAVIOUR_JSON_BYTES + 64
        if self.max_events_bytes < need:
            raise ValueError(f"max_events={self.max_events} behaviours of up to {BEHAVIOUR_JSON_BYTES} bytes of "
                             f"JSON each need max_events_bytes >= {need} (got {self.max_events_bytes}): raise "
                             "max_events_bytes or lower max_events")
        return self


class ResolvedServeConfig(ServeConfig):
    """The serve section as the endpoint runs it (``ServeConfig.resolved``): what it inherits is filled in, so
    nothing downstream (deployments, ``serve.engine.Retriever``) restates a default. Deployments validate their
    settings with it, so an unresolved section fails at once, naming the field."""

    index_root: str
    world: str
    backend: Literal["auto", "faiss-cpu", "faiss-gpu", "torch"]
    nprobe: int = Field(ge=1)
    ef_search: int = Field(ge=1)


# --------------------------------------------------------------------------------------------------
# the file


class ProjectConfig(StrictModel):
    """Everything one YAML file can configure; later stages add their sections here."""

    simulate: SimulateConfig = SimulateConfig()
    vocab: VocabConfig = VocabConfig()
    features: FeatureConfig = FeatureConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    ray: RayConfig = RayConfig()
    embed: EmbedConfig = EmbedConfig()
    index: IndexConfig = IndexConfig()
    serve: ServeConfig = ServeConfig()


def _format_error(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the defaults with `mgdspr config show`)"
        got = "" if e["type"] == "extra_forbidden" else f" (got {e.get('input')!r})"
        lines.append(f"{source}: {key}: {msg}{got}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any] | None, source: str = "<config>") -> ProjectConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of stage sections, got {type(data).__name__}")
    try:
        return ProjectConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(source, e)) from None


def load_config(path: str | Path) -> ProjectConfig:
    """Load a YAML config; a ``preset:NAME`` path loads a preset shipped with the package."""
    source = str(path)
    if source.startswith("preset:"):
        return load_preset(source.removeprefix("preset:"))
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    return parse_config(data, str(p))


DEFAULT_CONFIG = "preset:demo"
"""What every entry point runs with when given no config: the CLI's commands, ``mgdspr serve``, a Serve config's
application without ``args.config``, and the jobs (``mgdspr eval`` alone defaults to ``preset:eval``)."""


def resolve_config(config: str | Path | None = None, preset: str | None = None) -> ProjectConfig:
    """The project config an entry point runs with: ``config`` (a YAML file or ``preset:NAME``), else the preset
    ``preset``, else :data:`DEFAULT_CONFIG`. The one place that fallback is decided."""
    if config and preset:
        raise ConfigError("give --config or --preset, not both")
    if config:
        return load_config(config)
    return load_preset(preset) if preset else load_config(DEFAULT_CONFIG)


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("ray_mgdspr.presets").iterdir()
                  if p.name.endswith(".yaml"))


def load_preset(name: str) -> ProjectConfig:
    if name not in preset_names():
        raise ConfigError(f"unknown preset {name!r}; choose one of {preset_names()}")
    text = resources.files("ray_mgdspr.presets").joinpath(f"{name}.yaml").read_text()
    return parse_config(yaml.safe_load(text), f"preset:{name}")


def config_to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
