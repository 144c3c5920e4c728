"""The towers of spec §2-§3, equation by equation: shapes, zero attention, padding, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_towers import FEATURES, ITEMS, VOCAB, B, D, batch, model_of, without_history

from ray_mgdspr.model.batch import item_shapes, query_shapes, random_batch
from ray_mgdspr.model.item_tower import item_inputs
from ray_mgdspr.model.layers import HashedEmbedding, masked_mean, zero_attention
from ray_mgdspr.model.query_tower import LONG_ATTRIBUTES, PRICE, SIDE_INFO, history_attention


def test_random_batch_has_the_featurizer_contract() -> None:
    b = random_batch(3, FEATURES, vocab_size=VOCAB, n_items=ITEMS)
    assert set(b) == set(query_shapes(FEATURES)) | set(item_shapes(FEATURES))
    for k, shape in (query_shapes(FEATURES) | item_shapes(FEATURES)).items():
        assert b[k].shape == (3, *shape) and b[k].dtype == np.int64, k


@pytest.mark.parametrize("mgs", [True, False])
def test_mgs_tokens(mgs: bool) -> None:
    m = model_of(mgs=mgs)
    q_mgs = m.query_tower.mgs(batch())
    assert q_mgs.shape == (B, 6 if mgs else 1, D)
    if mgs:  # q_mix = q_1gram + q_2gram + q_seg + q_seg_seq + q_his_seq
        torch.testing.assert_close(q_mgs[:, 5], q_mgs[:, :5].sum(1))


def test_q_seg_and_q_1gram_are_masked_means() -> None:
    m, b = model_of(), batch()
    q_mgs = m.query_tower.mgs(b)
    words = m.tables.words.weight
    for i in range(B):
        ids = b["query_words"][i][b["query_words"][i] > 0]
        expect = words[ids].mean(0) if len(ids) else torch.zeros(D)
        torch.testing.assert_close(q_mgs[i, 2], expect)
        chars = b["query_chars"][i][b["query_chars"][i] > 0]
        expect = m.tables.chars.weight[chars].mean(0) if len(chars) else torch.zeros(D)
        torch.testing.assert_close(q_mgs[i, 0], expect)


def test_q_his_seq_attends_with_q_seg() -> None:
    q, his = torch.randn(2, D), torch.randn(2, 3, D)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    out = history_attention(q, his, mask)
    w = torch.softmax(q[0] @ his[0, :2].T, -1)
    torch.testing.assert_close(out[0], w @ his[0, :2])
    assert torch.equal(out[1], torch.zeros(D))  # no history: exactly zero


def test_zero_attention_matches_the_formula_and_is_zero_without_behaviours() -> None:
    q, kv = torch.randn(2, 6, D), torch.randn(2, 4, D)
    mask = torch.tensor([[True, True, True, False], [False] * 4])
    out = zero_attention(q, kv, mask)
    keys = torch.cat([torch.zeros(1, D), kv[0, :3]])  # [0; R]
    torch.testing.assert_close(out[0], torch.softmax(q[0] @ keys.T, -1) @ keys)
    assert torch.equal(out[1], torch.zeros(6, D))


def test_empty_history_gives_exactly_zero_behaviour_attention() -> None:
    m, b = model_of(), without_history(batch())
    q_mgs = m.query_tower.mgs(b)
    for h in m.query_tower.behaviours(q_mgs, b):  # H_real, H_short, H_long
        assert h.shape == (B, 6, D)
        assert torch.equal(h, torch.zeros_like(h))
    assert torch.equal(q_mgs[:, 4], torch.zeros(B, D))  # q_his_seq


def test_query_tower_output_and_ablations() -> None:
    b = batch()
    for kw in [{}, {"mgs": False}, {"trm": False}, {"personalise": False}, {"type_embeddings": True}, {"kind": "dnn"}]:
        m = model_of(**kw)
        q, item, _ = m(b)
        assert q.shape == (B, D) and item.shape == (B, D), kw
        assert torch.isfinite(q).all() and torch.isfinite(item).all(), kw


def test_fusion_takes_cls_over_25_tokens() -> None:
    m, b = model_of(), batch()
    seen = {}
    m.query_tower.fusion.block.register_forward_hook(lambda mod, args, out: seen.update(x=args[0]))
    m.query_tower(b)
    assert seen["x"].shape == (B, 25, D)
    torch.testing.assert_close(seen["x"][:, 0], m.query_tower.fusion.cls.expand(B, -1))


def test_no_personalisation_ignores_behaviours() -> None:
    m, b = model_of(personalise=False), batch()
    no_behaviours = without_history(b) | {"his_query_words": b["his_query_words"]}
    torch.testing.assert_close(m.query_tower(b), m.query_tower(no_behaviours))


def test_item_tower_is_id_plus_tanh_of_mean_title() -> None:
    m, b = model_of(item_side_info=False, item_ids=True), batch()  # the paper's item tower
    h = m.embed_items(b)
    t = m.item_tower
    for i in range(B):
        ids = b["item_title"][i][b["item_title"][i] > 0]
        title = m.tables.words.weight[ids].mean(0) if len(ids) else torch.zeros(D)
        e_i = m.tables.item.weight[1 + b["item_id"][i] % (ITEMS)]
        torch.testing.assert_close(h[i], e_i + torch.tanh(t.W_t.weight @ title))
    assert item_inputs(m.cfg) == ("item_id", "item_title")


def test_item_tower_with_side_information_adds_tanh_of_the_side_tables() -> None:
    m, b = model_of(item_ids=True), batch()
    h, t, tables = m.embed_items(b), m.item_tower, m.tables
    side = ("leaf", "cate1", "brand", "shop", "price", "impressions", "clicks")
    assert item_inputs(m.cfg) == ("item_id", "item_title", *(f"item_{f}" for f in side))
    for i in range(B):
        ids = b["item_title"][i][b["item_title"][i] > 0]
        title = tables.words.weight[ids].mean(0) if len(ids) else torch.zeros(D)
        e_i = tables.item.weight[1 + b["item_id"][i] % ITEMS]
        rows = [getattr(tables, f)(b[f"item_{f}"][i : i + 1])[0] for f in side]
        want = e_i + torch.tanh(t.W_t.weight @ title) + torch.tanh(t.W_s(torch.cat(rows)))
        torch.testing.assert_close(h[i], want)
    # the side tables are the behaviours' own (one row per brand learns from both towers)
    assert t.side_tables["brand"] is tables.brand and t.side_tables["price"] is tables.price
    # a missing side value reads the padding row
    missing = {**b, "item_brand": torch.full_like(b["item_brand"], -1)}
    assert not torch.allclose(m.embed_items(missing), h)


def test_without_item_ids_no_tower_reads_an_item_id_row() -> None:
    """The default: H_item is tanh(W_t · title) + tanh(W_s · side); a behaviour is its side information (its item
    id only marks it present); no item table exists."""
    m, b = model_of(), batch()
    assert m.cfg.item_ids is False and not hasattr(m.tables, "item")
    t, tables, h = m.item_tower, m.tables, m.embed_items(b)
    side = ("leaf", "cate1", "brand", "shop", "price", "impressions", "clicks")
    for i in range(B):
        ids = b["item_title"][i][b["item_title"][i] > 0]
        title = tables.words.weight[ids].mean(0) if len(ids) else torch.zeros(D)
        rows = [getattr(tables, f)(b[f"item_{f}"][i : i + 1])[0] for f in side]
        torch.testing.assert_close(h[i], torch.tanh(t.W_t.weight @ title) + torch.tanh(t.W_s(torch.cat(rows))))
    other = {k: (torch.where(v >= 0, v + 1, v) if k.endswith("_item") or k == "item_id" else v)
             for k, v in b.items()}  # other item ids, the same side information
    torch.testing.assert_close(m.embed_items(other), h)
    torch.testing.assert_close(m.query_tower(other), m.query_tower(b))
    no_history = {**b, **{k: torch.full_like(v, -1) for k, v in b.items() if k in ("rt_item", "st_item")}}
    assert not torch.allclose(m.query_tower(no_history), m.query_tower(b))  # item ids still mark behaviours present


def test_popularity_switch_removes_the_popularity_inputs() -> None:
    m = model_of(item_popularity=False)
    assert not hasattr(m.tables, "clicks") and "item_clicks" not in item_inputs(m.cfg)
    b = {k: v for k, v in batch().items() if k not in ("item_impressions", "item_clicks")}
    q, item, _ = m(b)  # runs without the popularity keys
    assert q.shape == item.shape == (B, D)
    full = model_of()
    assert full.item_tower.side_tables["clicks"] is full.tables.clicks


def test_price_level_switch_removes_the_price_inputs() -> None:
    m = model_of(price_level=False)
    assert not hasattr(m.tables, "price") and "item_price" not in item_inputs(m.cfg)
    b = {k: v for k, v in batch().items() if not k.endswith("_price")}
    q, item, _ = m(b)  # runs without any price key
    assert q.shape == item.shape == (B, D)


def _widen(b: dict[str, torch.Tensor], extra: int) -> dict[str, torch.Tensor]:
    """The same batch with ``extra`` more padding positions on every sequence."""
    out = {}
    for k, v in b.items():
        if v.dim() == 1:
            out[k] = v
            continue
        pad = 0 if k.startswith(("query_", "his_")) or k == "item_title" else -1
        out[k] = torch.cat([v, torch.full((*v.shape[:-1], extra), pad, dtype=v.dtype)], dim=-1)
    return out


@pytest.mark.parametrize("kind", ["mgdspr", "dnn"])
def test_padding_does_not_change_outputs(kind: str) -> None:
    m, b = model_of(kind=kind), batch()
    q, item, _ = m(b)
    q2, item2, _ = m(_widen(b, 11))
    torch.testing.assert_close(q, q2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(item, item2)


def test_an_example_does_not_depend_on_the_rest_of_the_batch() -> None:
    m, b = model_of(), batch()
    q, _, _ = m(b)
    q0, _, _ = m({k: v[:1] for k, v in b.items()})
    torch.testing.assert_close(q[:1], q0, atol=1e-5, rtol=1e-5)


def _grad_mass(p: torch.nn.Parameter) -> float:
    if p.grad is None:
        return 0.0
    g = p.grad.coalesce().values() if p.grad.is_sparse else p.grad
    return g.abs().sum().item()


@pytest.mark.parametrize("kind", ["mgdspr", "dnn"])
def test_gradients_reach_every_parameter(kind: str) -> None:
    m = model_of(kind=kind).train()
    b = batch(fill=1.0, n=16)
    q, item, _ = m(b)
    (q @ item.T).logsumexp(1).sum().backward()
    dead = [n for n, p in m.named_parameters() if _grad_mass(p) == 0]
    assert dead == []
    for name in ("words", "chars", "bigrams", *SIDE_INFO, *LONG_ATTRIBUTES, *PRICE):
        if name == "item" and not m.cfg.item_ids:
            continue
        grad = getattr(m.tables, name).weight.grad.to_dense()
        assert torch.equal(grad[0], torch.zeros(D)), f"{name}: the padding row must not learn"


def test_hashed_ids_share_rows_only_beyond_the_table() -> None:
    e = HashedEmbedding(11, 4)
    rows = e.rows(torch.arange(-1, 25))
    assert rows[0] == 0 and len(set(rows[1:11].tolist())) == 10  # ids 0..9: distinct rows 1..10
    assert rows[11] == rows[1]  # id 10 wraps onto id 0's row


def test_masked_mean_of_nothing_is_zero() -> None:
    x = torch.randn(2, 3, 4)
    out = masked_mean(x, torch.tensor([[True, False, True], [False, False, False]]))
    torch.testing.assert_close(out[0], (x[0, 0] + x[0, 2]) / 2)
    assert torch.equal(out[1], torch.zeros(4))
