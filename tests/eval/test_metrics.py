"""revq_ray.core.metrics against known values and scikit-image."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from revq_ray.core import metrics

pytestmark = pytest.mark.eval


def _photo_pair(seed: int = 0, noise: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    from skimage import data

    img = data.astronaut()[96:160, 200:264].astype(np.float64) / 255.0  # a real 64x64 RGB crop
    rng = np.random.default_rng(seed)
    return img, np.clip(img + rng.normal(0.0, noise, img.shape), 0.0, 1.0)


def _to_bchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).permute(2, 0, 1)[None].contiguous()


def test_psnr_of_known_noise():
    # Constant error of 0.1 everywhere: MSE = 0.01 -> PSNR = 20 dB exactly.
    x = torch.rand(4, 3, 16, 16)
    assert metrics.psnr(x, x + 0.1).item() == pytest.approx(20.0, abs=1e-4)
    # Gaussian noise of std s (no clipping): PSNR ~ -20 log10(s).
    g = torch.Generator().manual_seed(0)
    y = x + 0.05 * torch.randn(x.shape, generator=g)
    assert metrics.psnr(x, y).item() == pytest.approx(-20 * math.log10(0.05), abs=0.1)
    per_item = metrics.psnr(x, x + 0.1, reduction="none")
    assert per_item.shape == (4,)
    assert torch.isfinite(metrics.psnr(x, x))  # identical inputs stay finite


def test_ssim_matches_skimage():
    from skimage.metrics import structural_similarity

    for noise in (0.02, 0.1, 0.3):
        a, b = _photo_pair(noise=noise)
        ref = structural_similarity(
            a,
            b,
            data_range=1.0,
            channel_axis=-1,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        ours = metrics.ssim(_to_bchw(a), _to_bchw(b)).item()
        assert ours == pytest.approx(ref, abs=1e-3)
    # grayscale (B, H, W)
    a, b = _photo_pair(noise=0.05)
    ref = structural_similarity(
        a[..., 0], b[..., 0], data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert metrics.ssim(
        torch.from_numpy(a[None, ..., 0]), torch.from_numpy(b[None, ..., 0])
    ).item() == pytest.approx(ref, abs=1e-3)


def test_ssim_identity_and_batch():
    a, b = _photo_pair()
    x = torch.cat([_to_bchw(a), _to_bchw(b)])
    assert metrics.ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    per = metrics.ssim(x, x.flip(0), reduction="none")
    assert per.shape == (2,) and per[0] == pytest.approx(per[1].item(), abs=1e-6) and per[0] < 1
    with pytest.raises(ValueError, match="window"):
        metrics.ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.ssim(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 15))


def test_mse_mae_snr():
    x = torch.zeros(2, 10)
    y = torch.full((2, 10), 0.5)
    assert metrics.mse(x, y).item() == pytest.approx(0.25)
    assert metrics.mae(x, y).item() == pytest.approx(0.5)
    wave = torch.sin(torch.linspace(0, 100, 16000))
    # error = 1% of the amplitude everywhere -> SNR = 40 dB
    assert metrics.snr(wave, wave * 0.99).item() == pytest.approx(40.0, abs=1e-3)
    assert metrics.snr(wave[None].repeat(3, 1), wave[None].repeat(3, 1) * 0.9, reduction="none").shape == (3,)


def test_usage_entropy():
    k, t = 16, 3
    # Exactly uniform ids: every code of every group used equally often -> entropy log K, perplexity K.
    ids = torch.arange(k).repeat(5)[:, None].expand(-1, t)
    stats = metrics.usage_stats(ids, k)
    assert torch.allclose(stats["entropy"], torch.full((t,), math.log(k)), atol=1e-6)
    assert stats["mean_entropy"] == pytest.approx(math.log(k), abs=1e-6)
    assert stats["entropy_bits"] == pytest.approx(4.0, abs=1e-6)
    assert torch.allclose(stats["perplexity"], torch.full((t,), float(k)), atol=1e-4)
    assert stats["mean_usage"] == 1.0 and int(stats["dead"].sum()) == 0
    # One group collapsed to a single code: entropy 0, usage 1/K, K-1 dead.
    ids2 = ids.clone()
    ids2[:, 1] = 7
    s2 = metrics.usage_stats(ids2, k)
    assert s2["entropy"][1].item() == pytest.approx(0.0, abs=1e-9)
    assert s2["usage"][1].item() == pytest.approx(1 / k)
    assert int(s2["dead"][1]) == k - 1
    # counts input gives the same numbers
    s3 = metrics.usage_stats(counts_tk=metrics.code_counts(ids2, k))
    assert torch.equal(s3["dead"], s2["dead"])
    with pytest.raises(ValueError, match="codebook_size"):
        metrics.code_counts(torch.tensor([[k]]), k)
    assert metrics.bits_per_sample(512, 16384) == 7168
