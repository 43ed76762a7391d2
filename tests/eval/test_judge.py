"""revq_ray.eval.judge: the classifier learns, its feature distance behaves, one input transform for all."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from revq_ray.eval import judge as J

pytestmark = pytest.mark.eval


def _shapes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A 3-class synthetic task (uint8, 28 x 28, noisy): a horizontal bar, a vertical bar, a filled square,
    each at a random place and brightness."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 40, (n, 28, 28)).astype(np.float64)
    y = rng.integers(0, 3, n)
    for i in range(n):
        r, c = rng.integers(3, 18, 2)
        v = rng.uniform(150, 255)
        if y[i] == 0:
            x[i, r : r + 3, c - 2 : c + 9] += v
        elif y[i] == 1:
            x[i, r - 2 : r + 9, c : c + 3] += v
        else:
            x[i, r : r + 6, c : c + 6] += v
    return x.clip(0, 255).astype(np.uint8), y


def test_judge_learns_a_synthetic_task_and_round_trips(tmp_path):
    xtr, ytr = _shapes(900, 0)
    xte, yte = _shapes(300, 1)
    untrained = J.Judge(J.JudgeNet(3))
    judge = J.train_judge(xtr, ytr, epochs=5, batch_size=64, seed=0)
    acc = judge.accuracy(xte, yte)
    assert acc > 0.95 > untrained.accuracy(xte, yte) + 0.3
    # the same images at 64 x 64 RGB (what a taef2 tokenizer decodes) are scored through one transform
    up = torch.nn.functional.interpolate(
        torch.as_tensor(xte[:, None]).float() / 255, size=64, mode="bilinear"
    )
    assert judge.accuracy(up.expand(-1, 3, -1, -1), yte) > 0.9
    f = judge.features(xte)
    assert f.shape == (300, J.FEATURE_DIM) and torch.isfinite(f).all()
    again = J.Judge.load(judge.save(tmp_path / "judge"))
    assert torch.equal(again.features(xte), f) and again.info["train_items"] == 900
    with pytest.raises(ValueError, match="labels"):
        J.train_judge(xtr, ytr[:10])
    with pytest.raises(FileNotFoundError, match="no judge"):
        J.Judge.load(tmp_path / "nothing")


def test_feature_distance_zero_for_identical_sets_and_grows_with_a_shift():
    torch.manual_seed(0)
    judge = J.Judge(J.JudgeNet(3))  # any fixed net: FD is a property of the feature map
    x, _ = _shapes(200, 2)
    assert abs(judge.feature_distance(x, x)) < 1e-6
    base = torch.as_tensor(x).float() / 255
    fds = [judge.feature_distance(base, (base + s).clamp(0, 1)) for s in (0.05, 0.15, 0.3)]
    assert 0 < fds[0] < fds[1] < fds[2]
    # precomputed reference features give the same number as the images they came from
    ref = judge.features(base)
    assert judge.feature_distance((base + 0.15).clamp(0, 1), ref) == pytest.approx(fds[1], rel=1e-9)


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    # N(mu_a, diag(sa^2)) vs N(mu_b, diag(sb^2)): FD = |mu_a - mu_b|^2 + sum (sa - sb)^2
    rng = np.random.default_rng(0)
    d, n = 6, 200_000
    mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
    sa, sb = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    a = torch.as_tensor(mu_a + sa * rng.standard_normal((n, d)))
    b = torch.as_tensor(mu_b + sb * rng.standard_normal((n, d)))
    closed = float(((mu_a - mu_b) ** 2).sum() + ((sa - sb) ** 2).sum())
    assert J.frechet_distance(a, b) == pytest.approx(closed, rel=0.02)
    # a rotation of both (non-diagonal covariances) leaves the distance as it is
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    qt = torch.as_tensor(q)
    assert J.frechet_distance(a @ qt, b @ qt) == pytest.approx(J.frechet_distance(a, b), rel=1e-6)


def test_to_judge_input_shapes_and_errors():
    x8 = np.full((2, 28, 28), 255, np.uint8)
    assert torch.equal(J.to_judge_input(x8), torch.ones(2, 1, 28, 28))
    rgb = torch.rand(2, 3, 64, 64)
    out = J.to_judge_input(rgb)
    assert out.shape == (2, 1, 28, 28) and float(out.min()) >= 0 and float(out.max()) <= 1
    assert torch.allclose(J.to_judge_input(rgb.mean(1, keepdim=True).expand(-1, 3, -1, -1)), out, atol=1e-6)
    with pytest.raises(ValueError, match="images"):
        J.to_judge_input(torch.rand(2, 2, 28, 28))


def test_judge_imports_without_ray():
    code = textwrap.dedent(
        """
        import sys
        import revq_ray.eval.judge
        bad = [m for m in ("ray", "deepspeed") if m in sys.modules]
        raise SystemExit(f"imported {bad}" if bad else 0)
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
