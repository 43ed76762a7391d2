"""A judge for generated images: a small classifier trained here, and distances in its feature space.

A stage-2 prior (``revq_ray.prior``) is judged by what it makes, with two numbers (issue 27):

- **class accuracy**: the share of class-conditional samples the judge assigns to the class they were asked
  for (a sample the judge cannot tell apart from that class counts; a blur or a wrong class does not);
- **classifier feature distance (FD)**: the Frechet distance between Gaussians fitted to the judge's
  penultimate-layer features of two image sets (samples vs held-out real images). It is the FID formula
  (:func:`revq_ray.eval.perceptual.frechet_distance`) in the feature space of *this* small classifier, not
  Inception-v3's: its numbers compare only with numbers of the same judge over as many images.

The judge is a plain-PyTorch conv net (two conv blocks, a 128-d penultimate layer) on grey 28 x 28 inputs:
:func:`to_judge_input` turns any image batch (uint8 or float, grey or RGB, any square size; the 64 x 64 RGB
images a taef2 tokenizer decodes included) into that by a channel mean and an antialiased bilinear resize,
so real images, reconstructions and samples go through the same transform. Nothing here reads a data set:
the caller hands :func:`train_judge` its images and labels (``benchmarks/prior_study.py`` trains it on
Fashion-MNIST). No Ray, no DeepSpeed.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from revq_ray.eval.perceptual import frechet_distance

JUDGE_SIZE = 28  # the judge's input side: Fashion-MNIST's own resolution (generated 64 x 64 images go down)
FEATURE_DIM = 128
WEIGHTS = "judge.pt"
CONFIG = "judge.json"


def to_judge_input(images: Any, size: int = JUDGE_SIZE) -> torch.Tensor:
    """Images -> the judge's input (B, 1, size, size) float32 in [0, 1].

    Accepts (B, H, W), (B, 1, H, W) or (B, 3, H, W), uint8 (0..255) or float (0..1), numpy or torch.
    RGB becomes grey by the channel mean (a grey image decoded to three equal channels comes back as it
    was); other sizes are resized with antialiased bilinear interpolation (downsampling averages, it does
    not alias).
    """
    # np.array copies: a read-only array (np.frombuffer) would otherwise become a read-only tensor
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images))
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images: expected (B, H, W), (B, 1, H, W) or (B, 3, H, W); got {tuple(x.shape)}")
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if x.shape[1] == 3:
        x = x.mean(1, keepdim=True)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0.0, 1.0)


class JudgeNet(nn.Module):
    """Two conv blocks (32 and 64 channels, 3x3, max-pool) -> 128-d features -> class logits."""

    def __init__(self, num_classes: int = 10, width: int = 32, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.num_classes, self.width, self.feature_dim = num_classes, width, feature_dim
        self.convs = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
        )  # fmt: skip
        self.fc = nn.Linear(2 * width * 16, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x_b1hw: torch.Tensor) -> torch.Tensor:
        """The penultimate layer (B, feature_dim): what the feature distance compares."""
        return F.relu(self.fc(self.convs(x_b1hw).flatten(1)))

    def forward(self, x_b1hw: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x_b1hw))


class Judge:
    """A trained :class:`JudgeNet` and what it measures. ``images`` are anything :func:`to_judge_input`
    takes; work runs in batches on the CPU (or the net's device)."""

    def __init__(self, net: JudgeNet, info: dict[str, Any] | None = None):
        self.net = net.eval()
        self.info = dict(info or {})

    @torch.no_grad()
    def _run(self, images: Any, fn: Callable[[torch.Tensor], torch.Tensor], batch_size: int) -> torch.Tensor:
        x = to_judge_input(images)
        dev = next(self.net.parameters()).device
        return torch.cat([fn(x[i : i + batch_size].to(dev)).cpu() for i in range(0, x.shape[0], batch_size)])

    def features(self, images: Any, batch_size: int = 512) -> torch.Tensor:
        """(B, feature_dim) penultimate features."""
        return self._run(images, self.net.features, batch_size)

    def predict(self, images: Any, batch_size: int = 512) -> torch.Tensor:
        """(B,) the class the judge assigns."""
        return self._run(images, self.net, batch_size).argmax(1)

    def accuracy(self, images: Any, labels: Any, batch_size: int = 512) -> float:
        """The share of ``images`` assigned to their ``labels`` (samples: the class they were asked for)."""
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
        pred = self.predict(images, batch_size)
        if pred.shape != labels.shape:
            raise ValueError(f"labels: {labels.numel()} for {pred.numel()} images")
        return float((pred == labels).float().mean())

    def feature_distance(self, images_a: Any, images_b: Any | torch.Tensor) -> float:
        """Classifier feature distance (FD) between two image sets (or a set and precomputed features)."""
        fa = self.features(images_a)
        fb = images_b if _is_features(images_b, self.net.feature_dim) else self.features(images_b)
        return frechet_distance(fa, fb)

    def save(self, path: str | Path) -> Path:
        """``judge.pt`` (a state dict) + ``judge.json`` (shape and what it was trained and scored on)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        torch.save(self.net.state_dict(), path / WEIGHTS)
        shape = {
            "num_classes": self.net.num_classes,
            "width": self.net.width,
            "feature_dim": self.net.feature_dim,
        }
        (path / CONFIG).write_text(
            json.dumps({**self.info, "net": shape, "input_size": JUDGE_SIZE}, indent=2)
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> Judge:
        """A judge written by :meth:`save` (the weights load with ``weights_only=True``)."""
        path = Path(path)
        if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
            raise FileNotFoundError(
                f"{path}: no judge here (expected {CONFIG} and {WEIGHTS}; train one first)"
            )
        info = json.loads((path / CONFIG).read_text())
        net = JudgeNet(**info["net"])
        net.load_state_dict(torch.load(path / WEIGHTS, map_location="cpu", weights_only=True))
        return cls(net, info)


def _is_features(x: Any, dim: int) -> bool:
    return isinstance(x, torch.Tensor) and x.ndim == 2 and x.shape[1] == dim and x.is_floating_point()


def train_judge(
    images: Any,
    labels: Any,
    *,
    num_classes: int | None = None,
    epochs: int = 3,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> Judge:
    """Train a :class:`JudgeNet` on ``images`` (anything :func:`to_judge_input` takes) and integer ``labels``.

    Adam with a cosine decay to zero over ``epochs`` passes, random shifts of up to 2 pixels (so the judge
    does not hinge on exact pixel positions, which a generator cannot be expected to hit). Deterministic for a
    given ``seed`` and thread count.
    """
    x = to_judge_input(images)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
    if y.numel() != x.shape[0]:
        raise ValueError(f"labels: {y.numel()} labels for {x.shape[0]} images")
    if y.numel() == 0 or int(y.min()) < 0:
        raise ValueError("labels: need at least one image and labels >= 0")
    num_classes = num_classes or int(y.max()) + 1
    if int(y.max()) >= num_classes:
        raise ValueError(f"labels: label {int(y.max())} is out of range for num_classes={num_classes}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = JudgeNet(num_classes)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    steps = epochs * math.ceil(x.shape[0] / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1)))
    )
    t0 = time.perf_counter()
    net.train()
    for epoch in range(epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        total, n = 0.0, 0
        for i in range(0, x.shape[0], batch_size):
            idx = order[i : i + batch_size]
            xb = _shift(x[idx], 2, gen)
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, n = total + float(loss.detach()) * idx.numel(), n + idx.numel()
        if log:
            log(f"judge epoch {epoch + 1}/{epochs}: loss {total / n:.4f} ({time.perf_counter() - t0:.0f} s)")
    info = {
        "train_items": int(x.shape[0]),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
    }
    return Judge(net.eval(), info)


def _shift(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Each image shifted by a random (dy, dx) in [-pad, pad] (zero fill): one shift per batch, cheap."""
    dy, dx = (int(v) for v in torch.randint(-pad, pad + 1, (2,), generator=gen))
    padded = F.pad(x, (pad, pad, pad, pad))
    h, w = x.shape[-2:]
    return padded[..., pad + dy : pad + dy + h, pad + dx : pad + dx + w]
