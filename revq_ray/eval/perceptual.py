"""The metrics the field reports: rFID and LPIPS for images, PESQ for speech.

- **rFID**: the Fréchet distance between Gaussians fitted to Inception-v3 pool features (2048-d, the
  standard FID network as torch-fidelity ships it: TensorFlow's 2015-12-05 graph converted to PyTorch,
  weights file ``weights-inception-2015-12-05-6726825d.pth``) of the originals and of the reconstructions.
  torch-fidelity resizes to 299 x 299 the way TensorFlow 1.x did. The distance itself is computed here in
  float64 (:func:`frechet_distance`), checked against torch-fidelity's ``fid_statistics_to_metric`` in the
  tests. FID is biased upward on small sets (the bias falls roughly as 1/N): numbers over a few hundred
  images compare only with numbers over as many images, never with the papers' 50,000.
- **LPIPS**: the ``lpips`` package, ``LPIPS(net='alex')`` v0.1. Its linear heads ship inside the package;
  its AlexNet trunk is torchvision's ImageNet weights ``alexnet-owt-7be5be79.pth``. Inputs in [-1, 1];
  images smaller than 64 px are upsampled (bilinear) to 64 first, since AlexNet's strides leave nothing of
  a smaller image. The mean over images.
- **PESQ**: the ``pesq`` package (ITU-T P.862.2 wide-band at 16 kHz; other rates are resampled;
  narrow-band only when asked), per clip; a clip PESQ cannot score (no utterance detected, too short)
  is NaN and counted.

Weights are never bundled. :func:`locate_weights` looks in a directory the user names (``--metric-weights
DIR``, files under their standard names), then in the torch hub cache (``torch.hub.get_dir()/checkpoints``,
where torchvision and torch-fidelity keep them), then downloads into that cache unless downloads are
forbidden (``download=False``, ``--no-download``, or ``REVQ_OFFLINE=1``). A metric whose weights cannot be
found is left out and a note says which file is missing, where it looked and how to provide it.

Every heavy library (torch-fidelity, lpips, torchvision, pesq) is imported inside the function using it.
"""

from __future__ import annotations

import hashlib
import math
import os
import queue
import threading
import urllib.request
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

FeatureNet = Callable[[torch.Tensor], torch.Tensor]  # images (B, 3, H, W) in [0, 1] -> features (B, F)

LPIPS_MIN_SIZE = 64
OFFLINE_ENV = "REVQ_OFFLINE"


@dataclass(frozen=True)
class WeightsFile:
    """A pretrained-weights file under its standard name (the torch hub cache's), and where it comes from."""

    name: str
    url: str
    what: str  # for notes: what it is for

    @property
    def sha256_prefix(self) -> str:
        """The hash prefix in the name (torch hub's convention ``<stem>-<sha256 prefix>.pth``)."""
        return self.name.rsplit("-", 1)[-1].split(".")[0]


INCEPTION = WeightsFile(
    "weights-inception-2015-12-05-6726825d.pth",
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
    "rFID (FID Inception-v3, torch-fidelity)",
)
ALEXNET = WeightsFile(
    "alexnet-owt-7be5be79.pth",
    "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "LPIPS (AlexNet trunk, torchvision ImageNet weights)",
)


def offline() -> bool:
    """True when ``REVQ_OFFLINE`` is set to 1/true/yes: no metric weights are downloaded."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def hub_checkpoints() -> Path:
    """The user's torch hub checkpoint cache (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def locate_weights(
    wf: WeightsFile,
    weights_dir: str | Path | None = None,
    download: bool = True,
    timeout_s: float = 5.0,
    log: Callable[[str], None] | None = None,
) -> tuple[Path | None, str]:
    """(path, "") when ``wf`` is found or downloaded, else (None, a one-line note saying what is missing,
    where it looked and how to provide it). A failed download gives up within about ``timeout_s``."""
    looked = []
    if weights_dir is not None:
        p = Path(weights_dir).expanduser() / wf.name
        if p.is_file():
            return p, ""
        looked.append(f"--metric-weights {p.parent}")
    cache = hub_checkpoints()
    if (cache / wf.name).is_file():
        return cache / wf.name, ""
    looked.append(f"the torch hub cache {cache}")
    if offline():
        why = f"downloads are off ({OFFLINE_ENV}=1)"
    elif not download:
        why = "downloads are off (--no-download)"
    else:
        try:
            if log is not None:
                log(f"[eval] downloading {wf.url} -> {cache} (for {wf.what}; --no-download to skip)")
            return download_weights(wf, cache / wf.name, timeout_s), ""
        except Exception as err:
            why = f"the download from {wf.url} failed ({type(err).__name__}: {err})"
    return None, (
        f"{wf.what} not computed: {wf.name} is not in {' or '.join(looked)} and {why}. Provide it: download "
        f"{wf.url} into a directory and pass --metric-weights DIR (or into {cache}), or run once online."
    )


def download_weights(wf: WeightsFile, dst: Path, timeout_s: float = 5.0) -> Path:
    """Download ``wf`` to ``dst`` (atomically, sha256 prefix checked). Connecting (DNS included) runs in a
    daemon thread joined with ``timeout_s``, and every read has that timeout: an unreachable host costs a
    few seconds, never a hang."""
    box: queue.Queue = queue.Queue()

    def connect() -> None:
        try:
            box.put(urllib.request.urlopen(wf.url, timeout=timeout_s))
        except Exception as err:  # handed to the caller
            box.put(err)

    threading.Thread(target=connect, daemon=True).start()
    try:
        resp = box.get(timeout=timeout_s + 1)
    except queue.Empty:
        raise TimeoutError(f"no connection within {timeout_s:.0f}s") from None
    if isinstance(resp, Exception):
        raise resp
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + f".part{os.getpid()}")
    sha = hashlib.sha256()
    try:
        with resp, open(tmp, "wb") as f:
            while chunk := resp.read(1 << 20):
                sha.update(chunk)
                f.write(chunk)
        if not sha.hexdigest().startswith(wf.sha256_prefix):
            raise ValueError(f"sha256 {sha.hexdigest()[:8]} does not match the name's {wf.sha256_prefix}")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def load_state_dict_safely(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict of tensors from ``path`` with ``torch.load(weights_only=True)``: a file holding anything
    else (arbitrary pickled objects) is refused with an error naming it."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a loadable tensor state dict ({type(err).__name__}: {err})") from err
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(sd).__name__}")
    return sd


class InceptionPool(torch.nn.Module):
    """The FID Inception-v3 (torch-fidelity's ``FeatureExtractorInceptionV3``): images (B, C, H, W) float in
    [0, 1] -> pool3 features (B, 2048). Images are quantized to uint8 as torch-fidelity expects."""

    def __init__(self, weights: str | Path) -> None:
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        # torch-fidelity loads the file with weights_only=False; refuse anything but plain tensors first.
        load_state_dict_safely(weights)
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights)
        )

    def forward(self, images_bchw: torch.Tensor) -> torch.Tensor:
        u8 = (to_rgb(images_bchw).clamp(0, 1) * 255).round().to(torch.uint8)
        return self.net(u8)[0]


def build_lpips(trunk_weights: str | Path | None) -> torch.nn.Module:
    """``lpips.LPIPS(net='alex')`` (v0.1 linear heads from the package) with its AlexNet trunk loaded from
    ``trunk_weights`` (torchvision's ``alexnet-owt-7be5be79.pth`` layout). ``None`` leaves the trunk random:
    for tests, never for reported numbers. Builds offline (``pnet_rand=True``: no torchvision download)."""
    import lpips

    with warnings.catch_warnings():  # lpips passes torchvision's deprecated ``pretrained=`` argument
        warnings.simplefilter("ignore")
        net = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    if trunk_weights is not None:
        sd = load_state_dict_safely(trunk_weights)
        mapped = {}
        for key in net.net.state_dict():  # "slice2.3.weight" <- torchvision's "features.3.weight"
            src = "features." + key.split(".", 1)[1]
            if src not in sd:
                raise ValueError(f"{trunk_weights}: not a torchvision AlexNet state dict (no {src!r})")
            mapped[key] = sd[src]
        net.net.load_state_dict(mapped, strict=True)
    return net.eval().requires_grad_(False)


def to_rgb(images_bchw: torch.Tensor) -> torch.Tensor:
    """Grayscale (B, 1, H, W) -> (B, 3, H, W); RGB unchanged."""
    if images_bchw.ndim != 4 or images_bchw.shape[1] not in (1, 3):
        raise ValueError(f"expected images (B, 1 or 3, H, W), got shape {tuple(images_bchw.shape)}")
    return images_bchw.expand(-1, 3, -1, -1) if images_bchw.shape[1] == 1 else images_bchw


@torch.no_grad()
def extract_features(
    net: FeatureNet, images_bchw: torch.Tensor, batch_size: int = 64, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """``net`` over ``images_bchw`` (float in [0, 1]) in batches on ``device`` -> (N, F) float64 on CPU."""
    out = []
    for i in range(0, images_bchw.shape[0], batch_size):
        f = net(to_rgb(images_bchw[i : i + batch_size]).float().to(device))
        f = f[0] if isinstance(f, tuple | list) else f
        if f.ndim == 4 and f.shape[-2:] == (1, 1):
            f = f.flatten(1)
        if f.ndim != 2:
            raise ValueError(f"feature network returned shape {tuple(f.shape)}; expected (B, F)")
        out.append(f.double().cpu())
    return torch.cat(out)


def frechet_distance(feat_a: torch.Tensor, feat_b: torch.Tensor, method: str = "auto") -> float:
    """FID between Gaussians fitted to features (Na, F) and (Nb, F), in float64 with unbiased covariances
    (as numpy.cov and torch-fidelity): ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^1/2)``.

    ``tr((S_a S_b)^1/2)`` is the sum of the square roots of the eigenvalues of ``S_a S_b``. Those equal the
    squared singular values of ``A B^T / sqrt((Na-1)(Nb-1))`` (A, B: centered features), so ``method="gram"``
    takes the nuclear norm of that Na x Nb matrix: exact, no non-symmetric eigen-solve (a set against itself
    gives 0 to rounding) and O(Na Nb F) instead of O(F^3) for the few hundred images an eval scores.
    ``"feature"`` takes the nuclear norm of ``S_a^1/2 S_b^1/2`` (PSD roots by eigh), for sets larger than F;
    ``"auto"`` picks the cheaper.
    """
    a, b = feat_a.double(), feat_b.double()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (N, F) with equal F, got {tuple(a.shape)} and {tuple(b.shape)}")
    na, nb, dim = a.shape[0], b.shape[0], a.shape[1]
    if min(na, nb) < 2:
        raise ValueError(f"FID needs at least 2 items per set, got {na} and {nb}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = a - mu_a, b - mu_b
    tr_a, tr_b = ca.pow(2).sum() / (na - 1), cb.pow(2).sum() / (nb - 1)
    if method == "auto":
        method = "gram" if max(na, nb) <= dim else "feature"
    if method == "gram":
        tr_sqrt = torch.linalg.svdvals(ca @ cb.T).sum() / math.sqrt((na - 1) * (nb - 1))
    elif method == "feature":
        ra, rb = _psd_sqrt(ca.T @ ca / (na - 1)), _psd_sqrt(cb.T @ cb / (nb - 1))
        tr_sqrt = torch.linalg.svdvals(ra @ rb).sum()
    else:
        raise ValueError(f"method={method!r}: expected 'auto', 'gram' or 'feature'")
    return float((mu_a - mu_b).pow(2).sum() + tr_a + tr_b - 2 * tr_sqrt)


def _psd_sqrt(s: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(s)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


@torch.no_grad()
def lpips_per_image(
    net: torch.nn.Module,
    x_bchw: torch.Tensor,
    y_bchw: torch.Tensor,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    min_size: int = LPIPS_MIN_SIZE,
) -> torch.Tensor:
    """LPIPS between paired images (float in [0, 1]) -> (N,) float64; scaled to [-1, 1] as lpips expects,
    upsampled (bilinear) so the short side is at least ``min_size``."""
    if x_bchw.shape != y_bchw.shape:
        raise ValueError(f"LPIPS: shapes differ, {tuple(x_bchw.shape)} vs {tuple(y_bchw.shape)}")
    h, w = x_bchw.shape[-2:]
    scale = max(1.0, min_size / min(h, w))
    size = (round(h * scale), round(w * scale))
    out = []
    for i in range(0, x_bchw.shape[0], batch_size):
        pair = [to_rgb(t[i : i + batch_size]).float().clamp(0, 1).to(device) for t in (x_bchw, y_bchw)]
        if scale > 1:
            pair = [F.interpolate(t, size=size, mode="bilinear", align_corners=False) for t in pair]
        out.append(net(pair[0] * 2 - 1, pair[1] * 2 - 1).flatten().double().cpu())
    return torch.cat(out)


def pesq_clip(ref_l: torch.Tensor, deg_l: torch.Tensor, sample_rate: int, mode: str = "wb") -> float:
    """PESQ (MOS-LQO) of one degraded clip against its reference (1-D waveforms at ``sample_rate``); wide-band
    at 16 kHz (other rates resampled), narrow-band at 8 or 16 kHz. NaN when PESQ cannot score the clip."""
    from pesq import pesq

    if mode not in ("wb", "nb"):
        raise ValueError(f"PESQ mode {mode!r}: expected 'wb' (wide-band) or 'nb' (narrow-band)")
    rate = 8000 if (mode == "nb" and sample_rate == 8000) else 16000
    ref, deg = ref_l.detach().double().cpu().flatten(), deg_l.detach().double().cpu().flatten()
    if sample_rate != rate:
        from torchaudio.functional import resample

        ref, deg = resample(ref, sample_rate, rate), resample(deg, sample_rate, rate)
    n = min(ref.numel(), deg.numel())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(pesq(rate, ref[:n].numpy(), deg[:n].numpy(), mode))
    except Exception:  # NoUtterancesError, BufferTooShortError, silent clips: unscorable, not fatal
        return math.nan


@dataclass
class Perceptual:
    """The perceptual metrics of one evaluation: networks loaded once, notes for what is missing.

    ``fid_net`` / ``lpips_net`` may be given (any images -> (B, F) callable; an LPIPS-like module); else they
    are built from the weights :func:`locate_weights` finds (see the module docstring)."""

    weights_dir: str | Path | None = None
    download: bool = True
    device: str | torch.device = "cpu"
    batch_size: int = 64
    pesq_mode: str = "wb"
    log: Callable[[str], None] | None = None
    fid_net: FeatureNet | None = None
    lpips_net: torch.nn.Module | None = None
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    pesq_failed: int = 0
    pesq_scored: int = 0

    def __post_init__(self) -> None:
        if self.pesq_mode not in ("wb", "nb"):
            raise ValueError(f"pesq_mode={self.pesq_mode!r}: expected 'wb' (wide-band) or 'nb' (narrow-band)")

    def load_image_nets(self) -> None:
        """Find the weights and build the rFID and LPIPS networks (each left None, with a note, when its
        weights are missing or unloadable)."""
        nets = (("rfid", INCEPTION, "fid_net", InceptionPool), ("lpips", ALEXNET, "lpips_net", build_lpips))
        for metric, wf, attr, build in nets:
            if getattr(self, attr) is not None:
                self.info[f"{metric}_weights"] = "given"
                continue
            path, note = locate_weights(wf, self.weights_dir, self.download, log=self.log)
            if path is None:
                self.notes.append(note)
                continue
            try:
                setattr(self, attr, build(path).to(self.device).eval())
                self.info[f"{metric}_weights"] = str(path)
            except Exception as err:
                self.notes.append(f"{wf.what} not computed: {path} could not be loaded ({err}).")

    def features(self, images_bchw: torch.Tensor) -> torch.Tensor | None:
        if self.fid_net is None:
            return None
        return extract_features(self.fid_net, images_bchw, self.batch_size, self.device)

    def lpips(self, x_bchw: torch.Tensor, y_bchw: torch.Tensor) -> float | None:
        if self.lpips_net is None:
            return None
        return lpips_per_image(self.lpips_net, x_bchw, y_bchw, self.batch_size, self.device).mean().item()

    def pesq(self, refs: Sequence[torch.Tensor], degs: Sequence[torch.Tensor], sample_rate: int) -> float:
        """Mean PESQ over clip pairs (NaN when none scored); unscorable clips are counted."""
        vals = [pesq_clip(r, d, sample_rate, self.pesq_mode) for r, d in zip(refs, degs)]
        ok = [v for v in vals if not math.isnan(v)]
        self.pesq_scored += len(vals)
        self.pesq_failed += len(vals) - len(ok)
        return float(sum(ok) / len(ok)) if ok else math.nan

    def pesq_note(self) -> str | None:
        if not self.pesq_failed:
            return None
        return (
            f"PESQ could not score {self.pesq_failed} of {self.pesq_scored} clips (no utterance detected, "
            "too short or silent): NaN there, left out of the means."
        )
