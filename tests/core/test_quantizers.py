"""GroupedVQ (ReVQ / VQ) and SimVQ: forward, inverse, losses and gradients, counts, init, reset."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from revq_ray.config import QuantizerConfig, ResetConfig
from revq_ray.core.quantizers import (
    GaussianQuant,
    GroupedVQ,
    Quantizer,
    ResetParams,
    SimVQ,
    build_quantizer,
    nearest_code,
    usage_from_counts,
)

pytestmark = pytest.mark.core

G, K, D = 4, 16, 3


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_vq(**kw) -> GroupedVQ:
    torch.manual_seed(0)
    return GroupedVQ(G, D, K, **kw)


# ------------------------------------------------------------------------------------------ build
@pytest.mark.parametrize(
    "qtype,cls", [("revq", GroupedVQ), ("vq", GroupedVQ), ("simvq", SimVQ), ("gq", GaussianQuant)]
)
def test_build_quantizer(qtype, cls):
    cfg = QuantizerConfig(type=qtype, tokens=G, codebook_size=K)
    q = build_quantizer(cfg, D)
    assert isinstance(q, cls) and isinstance(q, Quantizer)
    assert (q.tokens, q.dim, q.codebook_size) == (G, D, K)
    if qtype == "vq":
        assert q.reset_cfg.enabled is False and q.maybe_reset(gen(0)) is None
    if qtype == "revq":
        assert q.reset_cfg.enabled is True


def test_build_passes_knobs():
    cfg = QuantizerConfig(
        tokens=G, codebook_size=K, loss="joint", beta=0.5, init="kmeans++", kmeans_iters=2,
        search_budget_mb=3.0,
        reset=ResetConfig(dead_threshold=3, ratio=0.5, noise=0.2),
    )  # fmt: skip
    q = build_quantizer(cfg, D)
    assert (q.loss, q.beta, q.init, q.kmeans_iters, q.search_budget_mb) == ("joint", 0.5, "kmeans++", 2, 3.0)
    assert q.reset_cfg.dead_threshold == 3 and q.reset_cfg.ratio == 0.5


# ------------------------------------------------------------------------------------------ forward / inverse
@pytest.mark.parametrize("loss", ["decoupled", "joint"])
def test_forward_is_nearest_and_codes_is_exact_inverse(loss):
    q = make_vq(loss=loss).eval()
    z = torch.randn(20, G, D, generator=gen(1))
    out = q(z)
    ids, _ = nearest_code(z, q.codebook.detach())
    assert torch.equal(out.ids_bt, ids)
    assert torch.equal(q.codes(out.ids_bt), out.quantized_btd)
    manual = torch.stack([q.codebook.detach()[g, out.ids_bt[:, g]] for g in range(G)], 1)
    assert torch.equal(out.quantized_btd.detach(), manual)


def test_codes_rejects_bad_ids():
    q = make_vq()
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        q.codes(torch.full((2, G), K))
    with pytest.raises(ValueError, match="expected"):
        q.codes(torch.zeros(2, G + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens"):
        q(torch.zeros(2, G, D + 1))


def test_decoupled_gradient_reaches_only_the_codebook():
    q = make_vq(loss="decoupled").train()
    z = torch.randn(30, G, D, generator=gen(2), requires_grad=True)
    out = q(z)
    assert set(out.losses) == {"quant"}
    torch.testing.assert_close(out.losses["quant"], (out.quantized_btd - z).square().mean())
    out.losses["quant"].backward(retain_graph=True)
    assert z.grad is None
    grad = q.codebook.grad
    used = torch.zeros(G, K, dtype=torch.bool)
    used[torch.arange(G)[None].expand_as(out.ids_bt), out.ids_bt] = True
    assert grad[used].abs().sum() > 0 and grad[~used].abs().sum() == 0
    # No straight-through: the output's gradient goes to the codebook, never to the tokens.
    q.codebook.grad = None
    out.quantized_btd.sum().backward()
    assert z.grad is None and q.codebook.grad is not None


def test_joint_is_straight_through_with_commitment():
    q = make_vq(loss="joint", beta=0.25).train()
    z = torch.randn(30, G, D, generator=gen(3), requires_grad=True)
    out = q(z)
    assert set(out.losses) == {"commit"}
    qv = q.codes(out.ids_bt).detach()
    expect = 0.25 * (z.detach() - qv).square().mean() + (qv - z.detach()).square().mean()
    torch.testing.assert_close(out.losses["commit"], expect)
    assert torch.equal(out.quantized_btd.detach(), qv)  # value is exactly the code
    out.quantized_btd.sum().backward(retain_graph=True)
    assert torch.equal(z.grad, torch.ones_like(z))  # straight-through
    assert q.codebook.grad is None  # the output itself carries no codebook gradient
    out.losses["commit"].backward()
    assert q.codebook.grad.abs().sum() > 0


def test_counts_only_in_training_mode():
    q = make_vq()
    z = torch.randn(25, G, D, generator=gen(4))
    q.eval()
    q(z)
    assert q.counts.sum() == 0
    q.train()
    out = q(z)
    assert q.counts.dtype == torch.int64
    assert torch.equal(q.counts.sum(1), torch.full((G,), 25))
    for g in range(G):
        assert torch.equal(q.counts[g], torch.bincount(out.ids_bt[:, g], minlength=K))
    with torch.no_grad():  # no_grad in training mode still counts (it is the mode that matters)
        q(z)
    assert torch.equal(q.counts.sum(1), torch.full((G,), 50))


def test_usage_stats():
    counts = torch.zeros(3, 8, dtype=torch.long)
    counts[0] = 5  # uniform
    counts[1, 2] = 7  # one code
    stats = usage_from_counts(counts, dead_threshold=1)
    torch.testing.assert_close(stats["usage"], torch.tensor([1.0, 1 / 8, 0.0], dtype=torch.float32))
    torch.testing.assert_close(stats["perplexity"], torch.tensor([8.0, 1.0, 0.0], dtype=torch.float32))
    assert stats["dead"].tolist() == [0, 7, 8]
    q = make_vq(reset_cfg=ResetParams(dead_threshold=2))
    q.counts[:, :4] = 1
    q.counts[:, 4:6] = 2
    s = q.usage_stats()
    assert s["dead"].tolist() == [K - 2] * G  # threshold from reset_cfg
    assert s["usage"].shape == (G,) and s["perplexity"].shape == (G,)


def test_state_dict_round_trip_keeps_counts():
    q = make_vq().train()
    q(torch.randn(10, G, D, generator=gen(5)))
    q2 = make_vq()
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2.counts, q.counts) and torch.equal(q2.codebook, q.codebook)


# ------------------------------------------------------------------------------------------ init
def test_sample_init_without_replacement_has_no_duplicates():
    q = make_vq(init="sample")
    tokens = torch.randn(K, G, D, generator=gen(6))  # exactly K distinct tokens per group
    # Plus heavy exact duplicates (e.g. constant background): they must not become duplicate codes.
    tokens = torch.cat([tokens, torch.zeros(200, G, D)])
    q.init_from_tokens(tokens, gen(7))
    for g in range(G):
        cb = q.codebook.detach()[g]
        assert torch.unique(cb, dim=0).shape[0] == K
        # every code is one of the group's tokens
        d = (cb[:, None] - tokens[None, :, g]).abs().sum(-1).min(-1).values
        assert torch.all(d == 0)


def test_sample_init_is_deterministic_given_generator():
    tokens = torch.randn(100, G, D, generator=gen(8))
    a, b, c = make_vq(), make_vq(), make_vq()
    a.init_from_tokens(tokens, gen(9))
    b.init_from_tokens(tokens, gen(9))
    c.init_from_tokens(tokens, gen(10))
    assert torch.equal(a.codebook, b.codebook) and not torch.equal(a.codebook, c.codebook)


def test_sample_init_with_too_few_tokens_warns_and_fills():
    q = make_vq(init="sample")
    tokens = torch.randn(5, G, D, generator=gen(11))
    with pytest.warns(UserWarning, match="distinct init tokens"):
        q.init_from_tokens(tokens, gen(12))
    cb = q.codebook.detach()
    for g in range(G):
        assert torch.unique(cb[g], dim=0).shape[0] == K  # noisy copies are distinct
        d = (cb[g, :5, None] - tokens[None, :, g]).abs().sum(-1).min(-1).values
        assert torch.all(d == 0)  # the real tokens come first


def _clustered(n_per: list[int], centers: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    pts = [c + 0.05 * torch.randn(n, c.shape[-1], generator=g) for n, c in zip(n_per, centers)]
    return torch.cat(pts)


def test_kmeanspp_init_beats_sampling_on_clustered_data():
    k = 8
    g = gen(13)
    # Per group: 8 well-separated clusters of very unequal sizes. Sampling K tokens mostly picks the big
    # cluster and misses small ones; k-means++ seeding covers them.
    sizes = [400, 20, 20, 20, 20, 20, 20, 20]
    groups = [_clustered(sizes, 10 * torch.randn(k, D, generator=g), g) for _ in range(G)]
    tokens = torch.stack(groups, 1)  # (N, G, D)
    tokens = tokens[torch.randperm(tokens.shape[0], generator=g)]

    def mse(init: str, iters: int = 0) -> float:
        torch.manual_seed(0)
        q = GroupedVQ(G, D, k, init=init, kmeans_iters=iters)
        q.init_from_tokens(tokens, gen(14))
        _, dist = nearest_code(tokens, q.codebook.detach())
        return float(dist.mean())

    sample, kpp, kpp_lloyd = mse("sample"), mse("kmeans++"), mse("kmeans++", 3)
    assert kpp < 0.5 * sample, (kpp, sample)
    assert kpp_lloyd <= kpp + 1e-6
    assert kpp_lloyd < 0.05  # every cluster found: only the within-cluster spread remains


def test_random_init_matches_token_statistics():
    q = make_vq(init="random")
    tokens = 3 + 2 * torch.randn(500, G, D, generator=gen(15))
    q.init_from_tokens(tokens, gen(16))
    cb = q.codebook.detach()
    assert abs(float(cb.mean()) - 3) < 0.5 and abs(float(cb.std()) - 2) < 0.5


# ------------------------------------------------------------------------------------------ reset
def _vq_with_counts(counts: torch.Tensor, **reset) -> GroupedVQ:
    q = GroupedVQ(counts.shape[0], D, counts.shape[1], reset_cfg=ResetParams(**reset))
    with torch.no_grad():
        # Distinct, recognizable rows: code k of group g = (g, k, 0).
        gg, kk = torch.meshgrid(torch.arange(counts.shape[0]), torch.arange(counts.shape[1]), indexing="ij")
        q.codebook.copy_(torch.stack([gg, kk, torch.zeros_like(gg)], -1).float())
        q.counts.copy_(counts)
    return q


def test_reset_pairs_least_used_dead_with_most_used():
    counts = torch.tensor(
        [
            [0, 5, 0, 9, 0, 2, 0, 7, 0, 1],  # 5 dead, cap floor(0.3*10)=3
            [3, 3, 3, 0, 3, 3, 8, 3, 3, 3],  # 1 dead
        ]
    )
    q = _vq_with_counts(counts, ratio=0.3, noise=0.0, dead_threshold=1)
    before = q.codebook.detach().clone()
    report = q.maybe_reset(gen(0))
    # group 0: dead 0,2,4,6,8 (all 0 hits -> lowest index first) take the 3 most used: 3 (9), 7 (7), 1 (5)
    # group 1: dead 3 takes the most used 6 (8)
    assert report.groups.tolist() == [0, 0, 0, 1] and report.codes.tolist() == [0, 2, 4, 3]
    after = q.codebook.detach()
    assert torch.equal(after[0, 0], before[0, 3])
    assert torch.equal(after[0, 2], before[0, 7])
    assert torch.equal(after[0, 4], before[0, 1])
    assert torch.equal(after[1, 3], before[1, 6])
    changed = (after != before).any(-1).nonzero().tolist()
    assert changed == [[0, 0], [0, 2], [0, 4], [1, 3]]
    assert q.counts.sum() == 0


def test_reset_threshold_orders_by_count_then_index():
    counts = torch.tensor([[4, 1, 0, 2, 1, 0, 9, 8]])  # threshold 3: dead {1,2,3,4,5}; cap floor(0.5*8)=4
    q = _vq_with_counts(counts, ratio=0.5, noise=0.0, dead_threshold=3)
    before = q.codebook.detach().clone()
    report = q.maybe_reset(gen(0))
    # least used first: 2 (0), 5 (0), 1 (1), 4 (1); most used: 6 (9), 7 (8), 0 (4), 3 (2)
    assert report.codes.tolist() == [2, 5, 1, 4]
    after = q.codebook.detach()
    for t, s in zip([2, 5, 1, 4], [6, 7, 0, 3]):
        assert torch.equal(after[0, t], before[0, s])
    assert torch.equal(after[0, 3], before[0, 3])  # dead but over the cap: untouched


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reset_cap_and_report_on_random_counts(seed):
    g = gen(seed)
    Gx, Kx = 6, 50
    counts = torch.randint(0, 4, (Gx, Kx), generator=g) * torch.randint(0, 2, (Gx, Kx), generator=g)
    ratio = 0.2
    q = _vq_with_counts(counts, ratio=ratio, noise=0.1, dead_threshold=1)
    before = q.codebook.detach().clone()
    report = q.maybe_reset(gen(100 + seed))
    after = q.codebook.detach()
    changed = (after != before).any(-1)
    reported = torch.zeros_like(changed)
    reported[report.groups, report.codes] = True
    assert torch.equal(changed, reported)  # the report lists exactly the overwritten rows
    assert torch.all(counts[changed] == 0)  # only dead codes
    per_group = changed.sum(1)
    assert torch.all(per_group <= math.floor(ratio * Kx))
    assert torch.equal(per_group, torch.minimum((counts == 0).sum(1), torch.tensor(math.floor(ratio * Kx))))


def test_reset_is_deterministic_given_generator():
    counts = torch.randint(0, 3, (G, K), generator=gen(20))
    a = _vq_with_counts(counts, noise=0.1)
    b = _vq_with_counts(counts, noise=0.1)
    c = _vq_with_counts(counts, noise=0.1)
    a.maybe_reset(gen(5))
    b.maybe_reset(gen(5))
    c.maybe_reset(gen(6))
    assert torch.equal(a.codebook, b.codebook)
    assert not torch.equal(a.codebook, c.codebook)


def test_reset_with_nothing_dead_and_disabled():
    q = _vq_with_counts(torch.ones(G, K, dtype=torch.long))
    r = q.maybe_reset(gen(0))
    assert r is not None and r.count == 0 and q.counts.sum() == 0
    q2 = _vq_with_counts(torch.zeros(G, K, dtype=torch.long), enabled=False)
    assert q2.maybe_reset(gen(0)) is None


def test_reset_uses_reduce_fn_counts():
    # A reduce_fn stands in for an all-reduce: it adds the "other rank's" hits on codes 0..7.
    other = torch.zeros(G, K, dtype=torch.long)
    other[:, :8] = 5

    def reduce_fn(t: torch.Tensor) -> torch.Tensor:
        return t.add_(other)

    q = GroupedVQ(G, D, K, reset_cfg=ResetParams(ratio=1.0, noise=0.0), reduce_fn=reduce_fn)
    report = q.maybe_reset(gen(0))
    # Locally every code is dead; globally only codes 8..15 are.
    assert sorted(report.codes.tolist()) == sorted(list(range(8, 16)) * G)


# ------------------------------------------------------------------------------------------ SimVQ
@pytest.mark.parametrize("shared", [False, True])
def test_simvq_codes_equal_forward_in_eval(shared):
    q = SimVQ(G, D, K, shared=shared, seed=3).eval()
    z = torch.randn(20, G, D, generator=gen(21))
    out = q(z)
    assert torch.equal(q.codes(out.ids_bt), out.quantized_btd)
    # codes applies the map: C[g, id] W^T + b
    c = q.frozen_codebook[torch.arange(G)[None], out.ids_bt]
    W = q.weight if shared else q.weight[None]
    b = q.bias if shared else q.bias[None]
    manual = torch.einsum("bgd,bged->bge", c, W.expand(20, G, D, D)) + b
    torch.testing.assert_close(out.quantized_btd, manual.detach(), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out.quantized_btd, c)
    # and is the nearest effective code
    ids, _ = nearest_code(z, q.effective_codebook().detach())
    assert torch.equal(ids, out.ids_bt)


@pytest.mark.parametrize("shared", [False, True])
def test_simvq_gradient_reaches_map_not_frozen_codebook(shared):
    q = SimVQ(G, D, K, shared=shared).train()
    assert [n for n, _ in q.named_parameters()] == ["weight", "bias"]
    assert q.weight.shape == ((D, D) if shared else (G, D, D))
    z = torch.randn(30, G, D, generator=gen(22), requires_grad=True)
    out = q(z)
    assert set(out.losses) == {"commit"}
    out.losses["commit"].backward(retain_graph=True)
    assert q.weight.grad.abs().sum() > 0 and q.bias.grad.abs().sum() > 0
    assert not q.frozen_codebook.requires_grad
    z.grad = None
    q.zero_grad()
    out.quantized_btd.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z)) and q.weight.grad is None  # straight-through


def test_simvq_is_deterministic_given_seed_and_counts():
    a, b, c = SimVQ(G, D, K, seed=1), SimVQ(G, D, K, seed=1), SimVQ(G, D, K, seed=2)
    assert torch.equal(a.frozen_codebook, b.frozen_codebook) and torch.equal(a.weight, b.weight)
    assert not torch.equal(a.frozen_codebook, c.frozen_codebook)
    std = SimVQ(2, 8, 4096, seed=0).frozen_codebook.std()
    assert abs(float(std) - 8**-0.5) < 0.01
    a.train()
    a(torch.randn(7, G, D))
    assert torch.equal(a.counts.sum(1), torch.full((G,), 7))
    a.eval()
    a(torch.randn(7, G, D))
    assert torch.equal(a.counts.sum(1), torch.full((G,), 7))
    assert a.maybe_reset(gen(0)) is None


def test_simvq_training_reduces_commitment():
    torch.manual_seed(0)
    q = SimVQ(2, 2, 64, seed=0).train()
    z = torch.randn(256, 2, 2, generator=gen(23))
    opt = torch.optim.Adam(q.parameters(), lr=0.05)
    first = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(60):
            loss = q(z).losses["commit"]
            first = first if first is not None else float(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert float(loss) < 0.5 * first
