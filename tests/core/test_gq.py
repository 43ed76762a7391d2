"""GQ: Sobol prior codebook, posterior scoring, inverse; and the target-divergence KL regularizer."""

from __future__ import annotations

import math

import pytest
import torch

from revq_ray.core.quantizers import GaussianQuant, gaussian_prior_samples, nearest_code
from revq_ray.core.regularizers import TargetDivergenceKL, kl_bits, token_bits

pytestmark = pytest.mark.core

G, D, K = 5, 4, 256


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ prior samples
def test_sobol_prior_is_deterministic_and_gaussian():
    a, b, c = (
        gaussian_prior_samples(4096, 3, 7),
        gaussian_prior_samples(4096, 3, 7),
        gaussian_prior_samples(4096, 3, 8),
    )
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.isfinite(a).all() and a.dtype == torch.float32
    assert a.mean(0).abs().max() < 0.02 and (a.std(0) - 1).abs().max() < 0.03  # quasi-random: tight
    assert torch.unique(a, dim=0).shape[0] == 4096
    q = GaussianQuant(G, 3, 4096, seed=7)
    assert torch.equal(q.prior, a)
    assert "prior" not in q.state_dict()  # regenerated from (seed, K, dim), not stored
    assert list(q.parameters()) == []


# ------------------------------------------------------------------------------------------ quantization
def brute_force_scores(mu, logvar, prior, beta):
    """The reference's formula, in float64: sum_d log N(c; mu, s) - beta log N(c; 0, 1)."""
    mu, logvar, prior = mu.double(), logvar.double(), prior.double()
    post = torch.distributions.Normal(mu[..., None, :], torch.exp(0.5 * logvar)[..., None, :])
    std = torch.distributions.Normal(torch.zeros(()), torch.ones(())).log_prob(prior)
    return (post.log_prob(prior) - beta * std).sum(-1)  # (B, G, K)


@pytest.mark.parametrize("beta", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("budget_mb", [256.0, 0.02])
def test_gq_matches_reference_score(beta, budget_mb):
    q = GaussianQuant(G, D, K, beta=beta, seed=1, search_budget_mb=budget_mb)
    g = gen(2)
    mu = torch.randn(30, G, D, generator=g)
    logvar = torch.randn(30, G, D, generator=g) * 1.5 - 1.0
    out = q(mu, logvar_btd=logvar)
    scores = brute_force_scores(mu, logvar, q.prior, beta)
    ref = scores.argmax(-1)
    # float32 may swap exact near-ties: the chosen code's score must be the max up to rounding.
    chosen = scores.gather(-1, out.ids_bt[..., None]).squeeze(-1)
    torch.testing.assert_close(chosen, scores.max(-1).values, rtol=1e-5, atol=1e-4)
    assert (out.ids_bt == ref).float().mean() > 0.98
    assert out.losses == {}


def test_gq_tiny_variance_is_nearest_prior_sample():
    q = GaussianQuant(G, D, K, seed=3)
    mu = torch.randn(40, G, D, generator=gen(4))
    nearest, _ = nearest_code(mu.reshape(-1, 1, D), q.prior[None])
    nearest = nearest.view(40, G)
    assert torch.equal(q(mu).ids_bt, nearest)  # no logvar: point mass
    assert torch.equal(q(mu, logvar_btd=torch.full_like(mu, -18.0)).ids_bt, nearest)


def test_gq_codes_inverse_and_counts():
    q = GaussianQuant(G, D, K, seed=5)
    mu = torch.randn(12, G, D, generator=gen(6))
    q.eval()
    out = q(mu, logvar_btd=torch.zeros_like(mu))
    assert torch.equal(q.codes(out.ids_bt), out.quantized_btd)
    assert torch.equal(out.quantized_btd, q.prior[out.ids_bt])
    assert q.counts.sum() == 0
    q.train()
    q(mu)
    assert torch.equal(q.counts.sum(1), torch.full((G,), 12))
    assert q.init_from_tokens(mu) is None and q.maybe_reset(gen(0)) is None
    with pytest.raises(ValueError, match="logvar_btd"):
        q(mu, logvar_btd=torch.zeros(12, G, D + 1))


def test_gq_wide_posterior_prefers_small_prior_codes():
    # With beta=1 and a very wide posterior the score tends to sum_d c^2 (0.5 - 0.5/s2) ~ 0.5 * ||c||^2:
    # it rewards codes far from 0; with beta=0 the posterior's own density wins (code nearest mu).
    q1 = GaussianQuant(1, 2, 64, beta=1.0, seed=0)
    mu = torch.zeros(1, 1, 2)
    out = q1(mu, logvar_btd=torch.full((1, 1, 2), 10.0))
    norms = q1.prior.square().sum(-1)
    assert int(out.ids_bt) == int(norms.argmax())
    q0 = GaussianQuant(1, 2, 64, beta=0.0, seed=0)
    out0 = q0(mu, logvar_btd=torch.full((1, 1, 2), 10.0))
    assert int(out0.ids_bt) == int(norms.argmin())


# ------------------------------------------------------------------------------------------ regularizer
def test_kl_bits_matches_hand_computation():
    mu, logvar = torch.tensor(0.5), torch.tensor(math.log(0.25))
    # KL = 0.5 * (mu^2 + s2 - 1 - log s2) nats = 0.5 * (0.25 + 0.25 - 1 + 1.386294) = 0.443147 nats
    expected_bits = 0.5 * (0.25 + 0.25 - 1 - math.log(0.25)) / math.log(2)
    assert abs(float(kl_bits(mu, logvar)) - expected_bits) < 1e-6
    assert float(kl_bits(torch.tensor(0.0), torch.tensor(0.0))) == 0.0
    # Token sums, channel layout: (B=1, C=4, H=1, W=2), token_channels=2 -> tokens (1, 2, 1, 2).
    m = torch.arange(8, dtype=torch.float32).reshape(1, 4, 1, 2) / 8
    lv = torch.zeros_like(m)
    tb = token_bits(m, lv, 2, "channels")
    per = kl_bits(m, lv)
    assert tb.shape == (1, 2, 1, 2)
    torch.testing.assert_close(tb[0, 1, 0, 1], per[0, 2, 0, 1] + per[0, 3, 0, 1])
    tf = token_bits(m, lv, 2, "flat")
    assert tf.shape == (1, 4)
    torch.testing.assert_close(tf[0, 1], per.reshape(-1)[2] + per.reshape(-1)[3])


def _latents(bits_per_elem: float, shape=(4, 8, 3, 3)) -> tuple[torch.Tensor, torch.Tensor]:
    """mean with a chosen KL per element (logvar 0 -> bits = mu^2 / (2 ln 2))."""
    mu = torch.full(shape, math.sqrt(bits_per_elem * 2 * math.log(2)))
    return mu.requires_grad_(), torch.zeros(shape, requires_grad=True)


def test_regularizer_loss_and_weights():
    reg = TargetDivergenceKL(codebook_size=16, token_channels=2, tolerance_bits=0.5, weight=0.1).eval()
    mu, lv = _latents(2.0)  # 4 bits per token = target exactly
    loss, stats = reg(mu, lv)
    torch.testing.assert_close(loss, torch.tensor(0.1 * 4.0))
    assert float(stats["frac_above"]) == 0 and float(stats["frac_below"]) == 0
    loss.backward()
    assert mu.grad.abs().sum() > 0 and lv.grad is not None
    # Above the band: weight lam_max multiplies.
    reg.lam_max.fill_(3.0)
    mu, lv = _latents(4.0)  # 8 bits per token
    loss, _ = reg(mu, lv)
    torch.testing.assert_close(loss, torch.tensor(0.1 * 3.0 * 8.0), rtol=1e-5, atol=1e-5)


def test_regularizer_lams_move_and_stay_clamped():
    reg = TargetDivergenceKL(codebook_size=16, token_channels=2, step=1.5).train()
    hi = _latents(4.0)  # every token above the band
    reg(*hi)
    assert (
        float(reg.lam) == 1.5 and float(reg.lam_max) == 1.5 and float(reg.lam_min) == 1.0
    )  # min clamped at 1
    for _ in range(40):
        reg(*hi)
    assert float(reg.lam) == 1e3 and float(reg.lam_max) == 1e3  # upper clamps
    lo = _latents(0.1)  # every token below the band
    reg(*lo)
    assert float(reg.lam) == pytest.approx(1e3 / 1.5) and float(reg.lam_max) == pytest.approx(1e3 / 1.5)
    assert float(reg.lam_min) == pytest.approx(1 / 1.5)
    for _ in range(60):
        reg(*lo)
    assert float(reg.lam) == pytest.approx(1e-3) and float(reg.lam_max) == 1.0 and float(reg.lam_min) == 1e-3
    before = {k: v.clone() for k, v in reg.state_dict().items()}
    reg.eval()
    reg(*hi)
    assert all(torch.equal(before[k], v) for k, v in reg.state_dict().items())  # eval: no adaptation
    assert set(before) == {"lam", "lam_max", "lam_min"}


def test_regularizer_uses_global_statistics():
    # Locally every token is inside the band; the other "rank" has tokens above it.
    reg = TargetDivergenceKL(codebook_size=16, token_channels=2, step=2.0)
    other = torch.tensor([1000.0, 100.0, 100.0, 0.0], dtype=torch.float64)  # sum bits, n, n_above, n_below

    def reduce_fn(t: torch.Tensor) -> torch.Tensor:
        return t.add_(other)

    reg.reduce_fn = reduce_fn
    reg(*_latents(2.0))
    # global mean = (local 4*36*4 + 1000) / (144 + 100) > 4 bits -> lam up; a token above -> lam_max up
    assert float(reg.lam) == 2.0 and float(reg.lam_max) == 2.0 and float(reg.lam_min) == 1.0


def test_regularizer_rejects_bad_layout():
    reg = TargetDivergenceKL(codebook_size=16, token_channels=3)
    with pytest.raises(ValueError, match="token_channels"):
        reg(*_latents(1.0))
    with pytest.raises(ValueError, match="layout"):
        TargetDivergenceKL(codebook_size=16, token_channels=2, layout="spatial")
