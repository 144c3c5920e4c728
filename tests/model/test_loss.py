"""Spec §4: sampled softmax with temperature, accidental hits, mixed hard negatives I_mix, hinge; the optimiser."""

from __future__ import annotations

import math

import pytest
import torch

from ray_mgdspr.config import LossConfig, OptimConfig
from ray_mgdspr.model.loss import accidental_hits, compute_loss, hinge_loss, softmax_loss
from ray_mgdspr.model.optim import clip_grad_norm, make_optimizer, model_optimizer


def test_softmax_loss_by_hand_with_temperature_and_one_mixed_negative() -> None:
    # d = 2. q = (1, 0); i+ = (2, 0) -> s+ = 2; pool = (1, 1), (0, 3), (-1, 0) -> s = 1, 0, -1.
    q, pos = torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    pool = torch.tensor([[1.0, 1.0], [0.0, 3.0], [-1.0, 0.0]])
    # N = 1: I_hard = (1, 1) (score 1); α = 0.5 exactly (a = b) -> I_mix = (1.5, 0.5), s_mix = 1.5.
    cfg = LossConfig(tau=2.0, n_hard=1, alpha_low=0.5, alpha_high=0.5)
    out = softmax_loss(q, pos, pool, torch.zeros(1, 3, dtype=torch.bool), cfg)
    logits = [2.0, 1.0, 0.0, -1.0, 1.5]
    expect = -(2.0 / 2) + math.log(sum(math.exp(s / 2) for s in logits))
    assert math.isclose(out.loss.item(), expect, rel_tol=1e-6)
    assert out.logits.tolist() == [logits]


def test_sampling_correction_by_hand() -> None:
    """With log Q, each logit F/τ becomes F/τ - log Q (positive and pool), and I_mix mixes the corrected logits:
    the hard negative is chosen by its corrected score."""
    q, pos = torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    pool = torch.tensor([[1.0, 1.0], [0.0, 3.0], [-1.0, 0.0]])  # F = 1, 0, -1
    cfg = LossConfig(tau=2.0, n_hard=1, alpha_low=0.5, alpha_high=0.5)
    log_q = (torch.tensor([0.5]), torch.tensor([2.0, -1.0, 0.0]))  # pool item 0 is often in the pool, item 1 rarely
    out = softmax_loss(q, pos, pool, torch.zeros(1, 3, dtype=torch.bool), cfg, log_q=log_q)
    z = [2.0 / 2 - 0.5, 1.0 / 2 - 2.0, 0.0 / 2 + 1.0, -1.0 / 2 - 0.0]  # corrected: the hard one is now item 1
    z.append(0.5 * z[0] + 0.5 * z[2])
    expect = -z[0] + math.log(sum(math.exp(v) for v in z))
    assert math.isclose(out.loss.item(), expect, rel_tol=1e-6)
    torch.testing.assert_close(out.logits, torch.tensor([z]) * 2)  # returned in F's units
    plain = softmax_loss(q, pos, pool, torch.zeros(1, 3, dtype=torch.bool), cfg, log_q=(torch.zeros(1), torch.zeros(3)))
    assert math.isclose(plain.loss.item(), softmax_loss(q, pos, pool, torch.zeros(1, 3, dtype=torch.bool), cfg
                                                        ).loss.item(), rel_tol=1e-6)  # log Q = 0: no change


def test_accidental_hits_are_masked() -> None:
    q, pos = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    pool = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # pool[0] is the example's own positive (same id 7)
    hit = accidental_hits(torch.tensor([7]), torch.tensor([7, 8]))
    assert hit.tolist() == [[True, False]]
    out = softmax_loss(q, pos, pool, hit, LossConfig(tau=1.0, n_hard=0))
    expect = -1.0 + math.log(math.exp(1.0) + math.exp(0.0))
    assert math.isclose(out.loss.item(), expect, rel_tol=1e-6)


def test_i_mix_takes_the_top_n_pool_negatives_and_alpha_in_range() -> None:
    torch.manual_seed(0)
    B, M, d, N = 6, 40, 8, 10
    q, pos, pool = torch.randn(B, d), torch.randn(B, d), torch.randn(M, d)
    pos_ids, pool_ids = torch.arange(B), torch.cat([torch.arange(B), 100 + torch.arange(M - B)])
    cfg = LossConfig(n_hard=N, alpha_low=0.3, alpha_high=0.45)
    out = compute_loss(q, pos, pool, pos_ids, pool_ids, cfg, torch.Generator().manual_seed(1))
    s_neg = (q @ pool.T).masked_fill(accidental_hits(pos_ids, pool_ids), float("-inf"))
    expect = s_neg.topk(N, dim=1).indices
    assert torch.equal(out.hard.sort(1).values, expect.sort(1).values)
    assert not accidental_hits(pos_ids, pool_ids).gather(1, out.hard).any()  # own positive never a hard negative
    # s_mix = α s+ + (1 - α) s_hard, so α = (s_mix - s_hard) / (s+ - s_hard)
    s_pos = (q * pos).sum(-1, keepdim=True)
    s_hard = s_neg.gather(1, out.hard)
    alpha = (out.logits[:, 1 + M :] - s_hard) / (s_pos - s_hard)
    assert ((alpha >= 0.3 - 1e-4) & (alpha <= 0.45 + 1e-4)).all()
    assert alpha.std() > 0.01  # drawn per (example, negative), not one value


def test_no_gradient_through_the_selection_but_through_i_mix() -> None:
    q = torch.randn(3, 4, requires_grad=True)
    pos, pool = torch.randn(3, 4, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    hit = torch.zeros(3, 8, dtype=torch.bool)
    out = softmax_loss(q, pos, pool, hit, LossConfig(n_hard=2))
    out.loss.backward()
    assert pool.grad is not None and pos.grad is not None and q.grad is not None


def test_i_mix_larger_than_the_pool_is_clamped_and_hits_never_mix() -> None:
    q, pos, pool = torch.randn(2, 4), torch.randn(2, 4), torch.randn(3, 4)
    hit = torch.tensor([[True, True, False], [False, False, False]])
    out = softmax_loss(q, pos, pool, hit, LossConfig(n_hard=684))
    assert out.logits.shape == (2, 1 + 3 + 3)
    assert torch.isinf(out.logits[0, 4:]).sum() == 2  # two masked hits cannot be hard negatives
    assert torch.isfinite(out.loss)


def test_temperature_one_is_plain_cross_entropy() -> None:
    q, pos, pool = torch.randn(4, 3), torch.randn(4, 3), torch.randn(5, 3)
    hit = torch.zeros(4, 5, dtype=torch.bool)
    out = softmax_loss(q, pos, pool, hit, LossConfig(tau=1.0, n_hard=0))
    logits = torch.cat([(q * pos).sum(-1, keepdim=True), q @ pool.T], 1)
    torch.testing.assert_close(out.loss, -logits.log_softmax(1)[:, 0].mean())


def test_hinge_by_hand() -> None:
    q, pos = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]])  # s+ = 1
    pool = torch.tensor([[0.95, 0.0], [0.0, 1.0], [1.0, 0.0]])  # s = 0.95, 0, (own positive)
    hit = torch.tensor([[False, False, True]])
    out = hinge_loss(q, pos, pool, hit, LossConfig(kind="hinge", margin=0.1))
    assert math.isclose(out.loss.item(), (0.05 + 0.0) / 2, rel_tol=1e-5)


def test_clip_handles_sparse_gradients_like_dense() -> None:
    torch.manual_seed(0)
    ids = torch.tensor([[1, 2, 2, 5]])
    grads = {}
    for sparse in (False, True):
        torch.manual_seed(0)
        emb, lin = torch.nn.Embedding(8, 3, sparse=sparse), torch.nn.Linear(3, 1)
        (lin(emb(ids)).sum() * 10).backward()
        norm = clip_grad_norm([emb.weight, lin.weight, lin.bias], 3.0)
        grads[sparse] = (norm, emb.weight.grad.to_dense(), lin.weight.grad, lin.bias.grad)
    for dense, sparse in zip(grads[False], grads[True], strict=True):
        torch.testing.assert_close(sparse, dense)
    assert grads[True][0] > 3.0  # it did clip
    total = torch.sqrt(sum(g.pow(2).sum() for g in grads[True][1:]))
    torch.testing.assert_close(total, torch.tensor(3.0), rtol=1e-4, atol=1e-4)


def test_adagrad_starts_its_accumulator_like_tf() -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    opt = make_optimizer([p], OptimConfig(kind="adagrad"))
    p.grad = torch.tensor([1.0, 0.0])
    opt.step()
    # TF: acc = 0.1 + g^2 = 1.1; step = lr * g / sqrt(acc)
    torch.testing.assert_close(p.data, torch.tensor([-0.1 / math.sqrt(1.1), 0.0]), rtol=1e-4, atol=1e-6)


def _spec_sketch(q, pos, pool, hit, cfg, generator):  # the spec §4.4 sketch, materialising I_mix
    s_pos = (q * pos).sum(-1, keepdim=True)
    s_neg = (q @ pool.T).masked_fill(hit, float("-inf"))
    hard = s_neg.detach().topk(cfg.n_hard, dim=1).indices
    alpha = torch.rand(q.size(0), cfg.n_hard, 1, generator=generator)
    alpha = cfg.alpha_low + (cfg.alpha_high - cfg.alpha_low) * alpha
    mix = alpha * pos.unsqueeze(1) + (1 - alpha) * pool[hard]
    s_mix = torch.einsum("bd,bnd->bn", q, mix)
    logits = torch.cat([s_pos, s_neg, s_mix], dim=1) / cfg.tau
    return torch.nn.functional.cross_entropy(logits, torch.zeros(q.size(0), dtype=torch.long))


def test_scoring_i_mix_without_building_it_equals_the_spec_sketch() -> None:
    torch.manual_seed(3)
    cfg = LossConfig(n_hard=7)
    leaves = [torch.randn(5, 6, requires_grad=True), torch.randn(5, 6, requires_grad=True),
              torch.randn(12, 6, requires_grad=True)]
    hit = torch.zeros(5, 12, dtype=torch.bool)
    ours = softmax_loss(*leaves, hit, cfg, torch.Generator().manual_seed(9)).loss
    grads = torch.autograd.grad(ours, leaves)
    ref = _spec_sketch(*leaves, hit, cfg, torch.Generator().manual_seed(9))
    torch.testing.assert_close(ours, ref)
    for g, g_ref in zip(grads, torch.autograd.grad(ref, leaves), strict=True):
        torch.testing.assert_close(g, g_ref)


def test_adam_steps_dense_layers_and_sparse_tables_and_round_trips_its_state() -> None:
    torch.manual_seed(0)
    table, lin = torch.nn.Embedding(6, 3, sparse=True), torch.nn.Linear(3, 1)
    model = torch.nn.ModuleDict({"table": table, "lin": lin})
    opt = model_optimizer(model, OptimConfig(kind="adam", lr=0.01))
    before = [p.detach().clone() for p in model.parameters()]
    lin(table(torch.tensor([1, 2]))).sum().backward()
    opt.step()
    after = list(model.parameters())
    assert all(not torch.equal(b, a) for b, a in zip(before, after, strict=True))  # both optimisers stepped
    assert torch.equal(before[0][3:], after[0][3:].detach())  # untouched table rows stay put (SparseAdam)
    fresh = model_optimizer(model, OptimConfig(kind="adam", lr=0.01))
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state_dict()["optimizers"][1]["state"][0]["step"] == 1
    with pytest.raises(ValueError, match="optimiser states"):
        model_optimizer(model, OptimConfig(kind="adam")).load_state_dict({"optimizers": [{}]})


def test_default_learning_rate_depends_on_the_optimiser() -> None:
    assert OptimConfig().learning_rate == 3e-3
    assert OptimConfig(kind="adagrad").learning_rate == 0.1
    assert OptimConfig(kind="adagrad", lr=0.5).learning_rate == 0.5
