"""HTTP request and response bodies of the retrieval endpoint (separate models, limits on every field).

Request bodies are strict and closed (``Strict``): a value of the wrong JSON type is refused, never coerced
(``true`` is not the integer 1, ``"5"`` is not 5, ``5.0`` is not an integer, ``"no"`` is not false), an
unknown key is refused at every level, and every id and timestamp is bounded to what the stores hold (int64,
epoch milliseconds up to year 9999), so no request value can overflow a later stage. A query string (``GET``
routes) is text: its integers are decimal digits only (``QueryInt``), never ``" 5"``, ``"+5"``, ``"5.0"`` or
``"5_000"``, which pydantic's lax mode would take.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from ray_mgdspr.serve.store import Action, Behaviour, EpochMs, Id, PastQuery

Channel = Literal["embedding", "lexical"]


class Strict(BaseModel):
    """A request body: no coercion, no unknown keys (``store.Event`` is the same for events)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class RetrieveRequest(Strict):
    """``POST /v1/retrieve``. Limits that depend on the configuration (k, query length) are checked by the
    ingress with the configured values; these are the fixed ones."""

    query: str = Field(description="the query as typed")
    user_id: Id | None = Field(None, description="personalises with the user's histories; unknown or "
                               "absent: no personalisation")
    k: int | None = Field(None, description="items per channel, 1 to serve.max_k (default: serve.default_k)")
    filter: bool = Field(True, description="relevance control: drop items that miss the query's key terms")
    channels: list[Channel] = Field(["embedding"], min_length=1, max_length=2,
                                    description="embedding (MGDSPR + ANN) and/or lexical (BM25 over titles)")
    ts: EpochMs | None = Field(None, description="request time in epoch ms (replaying logs); default now")

    @field_validator("query")
    @classmethod
    def _not_blank(cls, query: str) -> str:
        if not query.strip():
            raise ValueError("query is empty or whitespace only")
        return query.strip()

    @field_validator("channels")
    @classmethod
    def _unique(cls, channels: list[str]) -> list[str]:
        if len(set(channels)) != len(channels):
            raise ValueError(f"channels repeat: {channels}")
        return channels


class RetrievedItem(BaseModel):
    item_id: int
    title: str
    channels: list[Channel] = Field(description="the channels that found the item")
    scores: dict[str, float] = Field(description="per channel: inner product (embedding) or BM25 (lexical)")


class RetrieveResponse(BaseModel):
    version: str = Field(description="the model+index version that answered, end to end")
    data: list[RetrievedItem] = Field(description="embedding hits best first, then lexical-only hits")
    count: int
    filtered: int = Field(description="hits the relevance filter removed (0 when filter is off)")
    fallback: Channel | None = Field(None, description="the channel that filled a page the filter left with "
                                     "fewer than k embedding hits (serve.fallback); null: the fallback did not run")
    fallback_added: int = Field(0, description="items the fallback added (its hits are listed with their channel)")
    relaxed_to: list[str] | None = Field(None, description="when too few items have every key term: the key terms "
                                         "(the query's product type) the fallback's added items were checked "
                                         "against instead; null: every item on the page has every key term")
    key_terms: list[str] = Field(description="catalogue terms found in the query (what the filter checks)")
    latency_ms: dict[str, float] = Field(description="per stage: encode, search (shard fan-out), merge, "
                                         "lexical, filter, fallback and relaxed (when they ran), total")


class EventsRequest(Strict):
    """``POST /v1/events``: behaviours and searches to append to users' histories (bearer token)."""

    behaviours: list[Behaviour] = Field(default_factory=list)
    queries: list[PastQuery] = Field(default_factory=list)


def _decimal(value: object) -> object:
    """A path or query-string value as an integer when it is one written in decimal digits (an optional "-", so
    that -1 is refused by the field's bound, which names it); any other string is refused here."""
    if isinstance(value, str):
        if not re.fullmatch(r"-?[0-9]{1,64}", value):
            raise PydanticCustomError("int_parsing", "Input should be an integer in decimal digits (at most 64)")
        return int(value)
    return value


QueryInt = BeforeValidator(_decimal)
MAX_BEHAVIOURS = 500
"""The most behaviours ``GET /v1/users/{user_id}/behaviours`` answers: more than the default feature windows hold
for one user (R^u and S^u 150 clicks, L^u 100 per action)."""


class BehavioursRequest(Strict):
    """``GET /v1/users/{user_id}/behaviours`` (bearer token): the path's user id and the query string."""

    user_id: Annotated[Id, QueryInt] = Field(description="the user whose behaviours to read")
    limit: Annotated[int, QueryInt] = Field(20, ge=1, le=MAX_BEHAVIOURS,
                                            description=f"at most this many, 1 to {MAX_BEHAVIOURS}")
    ts: Annotated[EpochMs, QueryInt] | None = Field(
        None, description="read the histories as a request at this time does (epoch ms); default now")


class UserBehaviour(BaseModel):
    item_id: int
    action: Action
    ts: int = Field(description="epoch ms")
    title: str | None = Field(description="the item's title in the serving version; null: the version does not "
                              "serve this item")


class BehavioursResponse(BaseModel):
    user_id: int
    version: str = Field(description="the version whose feature windows and titles answered")
    ts: int = Field(description="the time (epoch ms) the histories were read at")
    data: list[UserBehaviour] = Field(description="the behaviours the query encoder reads for a search by this "
                                      "user at ts (before ts, in its windows), most recent first")
    count: int


class PromoteRequest(Strict):
    """``POST /v1/admin/promote`` (bearer token)."""

    version: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=128)


class CanaryRecall(BaseModel):
    """The recall canary of one version in the version manager (``serve/canary.py``; docs/serving.md)."""

    k: int = Field(description="the k of recall@k (serve.canary_k)")
    recall: float | None = Field(description="mean recall@k of the ANN against the exact search over the last "
                                 "`window` samples, from every ingress replica; null: no sample yet")
    window: int = Field(description="samples the running recall is over (at most serve.canary_window)")
    samples: int = Field(description="samples received since the version manager started")
    reference: str | None = Field(None, description="what the reference search was: exact (Flat, torch), "
                                  "all-lists (IVF, nprobe = nlist), hnsw-ef<N> (near-exact), as-served (no "
                                  "exhaustive search for this index: 1.0 by construction)")
    updated_at: float | None = Field(None, description="epoch seconds of the last sample")


class VersionInfo(BaseModel):
    version: str | None = Field(description="the version new requests go to")
    shards: int | None = None
    dim: int | None = None
    model: str | None = Field(None, description="model summary")
    previous: str | None = Field(None, description="the version served before the last switch")
    draining: list[str] = Field(default_factory=list, description="versions still answering requests that "
                                "started on them")
    loading: str | None = Field(None, description="a version being loaded")
    last_error: str | None = Field(None, description="why the last promotion was refused")
    switched_at: float | None = Field(None, description="epoch seconds of the last switch")
    canary: dict[str, CanaryRecall] = Field(default_factory=dict, description="the recall canary per version "
                                            "sampled since the version manager started (serve.canary_share)")
