"""Only the rectifier may run in reduced precision: under bf16 autocast (what DeepSpeed's torch_autocast wraps
around the whole training forward) every quantizer picks exactly the codes of the fp32 search, and the
model's training forward, its encode and the Tokenizer agree. CPU supports bf16 autocast, so this runs here.

At e163450 the bf16 search picked other codes for 4-9 % of tokens; these tests failed there.
"""

from __future__ import annotations

import pytest
import torch

from revq_ray.config import ModelConfig, parse_config
from revq_ray.core.model import ReVQModel
from revq_ray.core.quantizers import GaussianQuant, GroupedVQ, SimVQ, nearest_code

pytestmark = pytest.mark.core


def _bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _close_codes(G: int, K: int, d: int, B: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and a dense codebook where neighbouring codes' scores differ in the 3rd-4th digit (the case
    bf16 gets wrong)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, G, d, generator=g), torch.randn(G, K, d, generator=g)


def test_search_under_bf16_autocast_equals_fp32():
    tokens, codebook = _close_codes(G=8, K=4096, d=4, B=128)
    ids32, d32 = nearest_code(tokens, codebook)
    with _bf16():
        ids16, d16 = nearest_code(tokens, codebook)
        # the control: a bf16 matmul does pick other codes (so the test would catch a regression)
        scores = torch.baddbmm(
            codebook.square().sum(-1)[:, None, :], tokens.transpose(0, 1), codebook.transpose(1, 2), alpha=-2
        )
    assert scores.dtype == torch.bfloat16
    wrong = (scores.float().argmin(-1).t() != ids32).float().mean().item()
    assert wrong > 0.01, f"bf16 scores agree with fp32 on {1 - wrong:.1%} of tokens: the control is too easy"
    assert torch.equal(ids16, ids32)
    assert d16.dtype == torch.float32 and torch.equal(d16, d32)


@pytest.mark.parametrize("kind", ["revq", "simvq", "gq"])
def test_quantizer_forward_under_bf16_autocast_equals_fp32(kind):
    G, K, d, B = 8, 2048, 4, 64
    tokens, codebook = _close_codes(G, K, d, B, seed=1)
    torch.manual_seed(0)
    if kind == "revq":
        q = GroupedVQ(G, d, K)
        with torch.no_grad():
            q.codebook.copy_(codebook)
    elif kind == "simvq":
        q = SimVQ(G, d, K)
    else:
        q = GaussianQuant(G, d, K)
    q.train()
    ref = q(tokens)
    with _bf16():
        out = q(tokens)
    assert torch.equal(out.ids_bt, ref.ids_bt)
    assert out.quantized_btd.dtype == torch.float32
    torch.testing.assert_close(out.quantized_btd, ref.quantized_btd, rtol=0, atol=0)
    for k, v in ref.losses.items():
        assert out.losses[k].dtype == torch.float32
        torch.testing.assert_close(out.losses[k], v, rtol=0, atol=0)
    # the quantizer got bf16 tokens from some caller: still fp32 search and outputs
    with _bf16():
        out16 = q(tokens.bfloat16())
    assert torch.equal(out16.ids_bt, nearest_code_for(q, tokens.bfloat16().float()))


def nearest_code_for(q, tokens):
    with torch.no_grad():
        if isinstance(q, GroupedVQ):
            return nearest_code(tokens, q.codebook)[0]
        if isinstance(q, SimVQ):
            return nearest_code(tokens, q.effective_codebook())[0]
        return q.quantize_ids(tokens)


def _model(rectifier: str = "vit") -> ReVQModel:
    cfg = parse_config(
        {
            "quantizer": {"tokens": 32, "codebook_size": 512},
            "rectifier": {"type": rectifier, "width": 32, "head_dim": 16, "depth": 1},
        },
        ModelConfig,
    )
    torch.manual_seed(0)
    model = ReVQModel.from_config([4, 8, 8], cfg)
    z = torch.randn(2048, 4, 8, 8)
    from revq_ray.core.stats import RunningStats

    stats = RunningStats((4, 8, 8))
    stats.update(z)
    model.standardizer.set_stats(stats)
    model.init_codebook(z, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # a rectifier that is not the identity, so bf16 changes its output
        for p in model.rectifier.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("rectifier", ["vit", "cnn"])
def test_model_training_forward_under_bf16_matches_fp32_encode(rectifier):
    """The training forward under autocast (the trainer) and encode in fp32 (the Tokenizer) give the same ids;
    the rectifier really runs in bf16 and its outputs and losses come back as fp32."""
    model = _model(rectifier).train()
    z = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with _bf16():
        out = model(z)
    ids_fp32 = model.encode(z)
    assert torch.equal(out.ids_bt, ids_fp32)
    z_std = model.standardizer(z)
    assert torch.equal(out.ids_bt, nearest_code(model.layout.to_tokens(z_std), model.quantizer.codebook)[0])
    assert out.rectified_std.dtype == out.latents_rec.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in out.losses.values())
    ref = model(z)
    assert not torch.equal(out.rectified_std, ref.rectified_std), "the rectifier did not run in bf16"
    torch.testing.assert_close(out.rectified_std, ref.rectified_std, rtol=0.05, atol=0.05)
    out.loss.backward()
    assert model.quantizer.codebook.grad.dtype == torch.float32
    # decode under autocast: the same codes; only the rectifier differs by rounding
    with _bf16():
        dec = model.decode(ids_fp32)
    assert dec.dtype == torch.float32
