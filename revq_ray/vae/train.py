"""Train a built-in Gaussian VAE (ImageConvVAE or MelVAE): ``python -m revq_ray.vae --config ...``.

Loss = reconstruction MSE + a KL term, either

- ``kl: plain``: ``kl_weight`` * the KL to N(0, I) in nats, summed over the latent and divided by the number
  of input elements (so it is on the same per-element footing as the mean-squared error), or
- ``kl: target``: GQ's target-divergence regularizer (:class:`revq_ray.core.regularizers.TargetDivergenceKL`,
  global weight ``kl_weight``) that pushes each token of ``target_token_channels`` values toward
  log2(``target_codebook_size``) bits, so the trained VAE can be quantized by GQ without further training.
  ``target_layout: flat`` (default) constrains revq-ray's TokenLayout tokens (C-major flatten, cut into
  d consecutive values), the tokens GQ quantizes in this project; ``channels`` is the paper's grouping.

Data: ``input`` is a folder of images, an IDX image file (``*-images-idx3-ubyte[.gz]``, Fashion-MNIST), or a
folder of audio files (``modality: audio``). Unreadable files are skipped and counted. Everything is read
once into memory (the shared sets are tens of MB), images already resized to ``image_size``.
The result is a ``save_pretrained`` directory that ``load_vae("builtin:<output>")`` opens.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from revq_ray.config import Section, dump_config
from revq_ray.runtime import get_logger
from revq_ray.vae.audio import MelFrontEnd, crop_or_pad, frame_mask, list_audio_files, load_audio
from revq_ray.vae.builtin import ImageConvVAE, MelVAE
from revq_ray.vae.images import batch_to_vae_input, list_image_files, read_idx_images, to_vae_input


class VAETrainConfig(Section):
    """A built-in VAE training preset (``configs/vae_*.yaml``); every field can be overridden with --set."""

    input: str = Field(..., min_length=1, description="image folder, IDX image file (.gz ok) or audio folder")
    modality: Literal["image", "audio"] = "image"
    output: str = Field("runs/vae", min_length=1, description="save_pretrained directory (builtin:<output>)")
    limit: int = Field(0, ge=0, description="use at most this many images / audio files; 0 = all")
    # model
    image_size: int = Field(32, ge=8, description="image: square training size, a multiple of 8")
    width: int = Field(64, ge=8, description="channels of the first conv stage")
    latent_channels: int = Field(8, ge=1)
    # audio front end (stored in the model's config.json so encoding later matches)
    sample_rate: int = Field(22050, ge=1000)
    n_fft: int = Field(1024, ge=16)
    hop: int = Field(256, ge=1)
    n_mels: int = Field(80, ge=1)
    f_max: float = Field(8000.0, gt=0.0)
    vocoder: str = Field(
        "griffin-lim",
        description="audio: griffin-lim (offline default) or vocos:<dir-or-hub-id>; with vocos the front end "
        "(sample_rate, n_fft, hop, n_mels, mel scale, f_max) comes from the vocoder so it can read the mels",
    )
    crop_seconds: float = Field(
        1.5, gt=0.0, description="audio: training crop; frames rounded to a multiple of 4"
    )
    # loss
    kl: Literal["plain", "target"] = Field(
        "plain", description="plain KL to N(0,I), or GQ's target divergence"
    )
    kl_weight: float = Field(
        1e-2,
        ge=0.0,
        description="plain: weight of the KL in nats per input element; target: the regularizer's global "
        "weight (GQ's reference uses 0.1; its adaptive lam rescales it by up to 1000x either way)",
    )  # fmt: skip
    target_codebook_size: int = Field(256, ge=2, description="kl=target: K; tokens aim at log2(K) bits")
    target_token_channels: int = Field(4, ge=1, description="kl=target: values per token (d)")
    target_layout: Literal["flat", "channels"] = Field(
        "flat", description="kl=target: flat = revq-ray's TokenLayout tokens (what GQ quantizes here); "
        "channels = GQ paper's d channels at one position"
    )  # fmt: skip
    target_tolerance_bits: float = Field(0.5, ge=0.0, description="kl=target: half-width of the bits band")
    # optimization
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    grad_clip: float = Field(1.0, ge=0.0, description="gradient-norm clip; 0 = off")
    seed: int = Field(0, ge=0)
    log_every: int = Field(50, ge=1, description="steps between progress lines")
    val_items: int = Field(64, ge=0, description="items held out and reported at every progress line")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int = Field(0, ge=0, description="torch.set_num_threads; 0 = leave as is")

    @model_validator(mode="after")
    def _check(self) -> VAETrainConfig:
        if self.modality == "image" and self.image_size % 8:
            raise ValueError(f"image_size={self.image_size} must be a multiple of 8 (three stride-2 stages)")
        if self.kl == "target":
            d = self.target_token_channels
            if self.target_layout == "channels" and self.latent_channels % d:
                raise ValueError(
                    f"latent_channels={self.latent_channels} must be a multiple of target_token_channels={d} "
                    "for kl=target with target_layout=channels"
                )
            if self.latent_numel() % d:
                raise ValueError(
                    f"the latent has {self.latent_numel()} values, not a multiple of "
                    f"target_token_channels={d}"
                )
        if self.modality == "audio" and self.f_max > self.sample_rate / 2:
            raise ValueError(f"f_max={self.f_max} is above Nyquist for sample_rate={self.sample_rate}")
        return self

    def latent_numel(self) -> int:
        """Values per latent: C * (S/8)^2 for images, C * frames/4 for audio."""
        if self.modality == "image":
            return self.latent_channels * (self.image_size // 8) ** 2
        return self.latent_channels * self.crop_frames() // 4

    def crop_frames(self, sample_rate: int | None = None, hop: int | None = None) -> int:
        """Training crop in mel frames: crop_seconds rounded to a multiple of 4 (at least 4). A vocos
        vocoder brings its own ``sample_rate`` and ``hop``."""
        frames = round(self.crop_seconds * (sample_rate or self.sample_rate) / (hop or self.hop))
        return max(4, 4 * round(frames / 4))


def _front_end(cfg: VAETrainConfig) -> MelFrontEnd:
    """The mel front end: the preset's parameters, or the vocos vocoder's (so it can vocode the mels)."""
    from revq_ray.vae.vocoder import GRIFFIN_LIM, front_end_for, parse_vocoder

    if parse_vocoder(cfg.vocoder)[0] == GRIFFIN_LIM:
        return MelFrontEnd(
            sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, hop=cfg.hop, n_mels=cfg.n_mels, f_max=cfg.f_max
        )
    fe = front_end_for(cfg.vocoder)
    _log(f"front end from {cfg.vocoder}: {fe} (sample_rate/n_fft/hop/n_mels/f_max of the preset unused)")
    return MelFrontEnd(**fe)


_log = get_logger("revq_ray.vae").info


# ------------------------------------------------------------------------------------------------ data
def _is_idx(path: Path) -> bool:
    return path.is_file() and ("idx3" in path.name or path.name.endswith(("-ubyte", "-ubyte.gz")))


def load_image_set(cfg: VAETrainConfig) -> torch.Tensor:
    """-> uint8 (N, C, S, S), C = 1 (gray, expanded to RGB per batch) or 3. Unreadable files skipped."""
    src = Path(cfg.input).expanduser()
    limit = cfg.limit or None
    if _is_idx(src):
        raw = read_idx_images(src, limit=limit)
        out = []
        for i in range(0, len(raw), 4096):  # chunks keep the float intermediate small
            x = batch_to_vae_input(raw[i : i + 4096], cfg.image_size)[:, :1]
            out.append((x * 255).round().to(torch.uint8))
        _log(f"read {len(raw)} images from {src} ({raw.shape[1]}x{raw.shape[2]} -> {cfg.image_size})")
        return torch.cat(out)
    if not src.exists():
        raise FileNotFoundError(f"input={cfg.input!r} does not exist (override with --set input=<path>)")
    from PIL import Image

    files = list_image_files(src)[:limit]
    items, skipped = [], 0
    for i, path in enumerate(files):
        try:
            with Image.open(path) as im:
                items.append((to_vae_input(im, cfg.image_size) * 255).round().to(torch.uint8))
        except Exception:  # a corrupt file must not end a run: count it instead
            skipped += 1
        if (i + 1) % 5000 == 0:
            _log(f"reading images: {i + 1}/{len(files)}")
    if not items:
        raise ValueError(f"input={cfg.input!r}: no readable images ({skipped} unreadable)")
    _log(f"read {len(items)} images from {src} ({skipped} unreadable skipped)")
    return torch.stack(items)


def load_audio_set(cfg: VAETrainConfig, sample_rate: int | None = None) -> list[torch.Tensor]:
    """-> mono waveforms at ``sample_rate`` (default the preset's). Unreadable or empty files skipped and
    counted."""
    sample_rate = sample_rate or cfg.sample_rate
    src = Path(cfg.input).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"input={cfg.input!r} does not exist (override with --set input=<path>)")
    files = list_audio_files(src)[: cfg.limit or None]
    waves, skipped = [], 0
    for i, path in enumerate(files):
        try:
            wave, _ = load_audio(path, sample_rate)
            if wave.numel() == 0 or not torch.isfinite(wave).all():
                raise ValueError("empty or non-finite")
            waves.append(wave)
        except Exception:  # corrupt audio is skipped, never fatal
            skipped += 1
        if (i + 1) % 100 == 0:
            _log(f"reading audio: {i + 1}/{len(files)}")
    if not waves:
        raise ValueError(f"input={cfg.input!r}: no readable audio files ({skipped} unreadable)")
    seconds = sum(w.numel() for w in waves) / sample_rate
    _log(f"read {len(waves)} audio files ({seconds / 60:.1f} min) from {src} ({skipped} unreadable skipped)")
    return waves


class _ImageBatches:
    def __init__(self, data_ncss: torch.Tensor, gen: torch.Generator):
        self.data, self.gen = data_ncss, gen

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, idx: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.data[idx].to(device).float() / 255.0
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x, None

    def sample(self, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.batch(torch.randint(0, len(self.data), (batch_size,), generator=self.gen), device)


class _AudioBatches:
    """Random fixed-length crops (zero-padded with a mask when a file is shorter), as normalized log-mel."""

    def __init__(self, waves: list[torch.Tensor], front_end: MelFrontEnd, frames: int, gen: torch.Generator):
        self.waves, self.front_end, self.gen = waves, front_end, gen
        self.n_samples = (frames - 1) * front_end.hop  # exactly `frames` frames from the centered STFT
        # Draw files in proportion to their length (at least one crop each) so every second counts alike.
        lengths = torch.tensor([max(w.numel(), self.n_samples) for w in waves], dtype=torch.float64)
        self.weights = lengths / lengths.sum()

    def __len__(self) -> int:
        return len(self.waves)

    def _crops(self, idx: torch.Tensor, random_offset: bool) -> tuple[torch.Tensor, torch.Tensor]:
        crops = [
            crop_or_pad(self.waves[int(i)], self.n_samples, None if random_offset else 0, self.gen)
            for i in idx
        ]
        return torch.stack([c[0] for c in crops]), torch.stack([c[1] for c in crops])

    def batch(self, idx: torch.Tensor, device: torch.device, random_offset: bool = False):
        wave, mask = self._crops(idx, random_offset)
        mel = self.front_end(wave.to(device))
        return mel, frame_mask(mask.to(device), self.front_end.hop)

    def sample(self, batch_size: int, device: torch.device):
        idx = torch.multinomial(self.weights, batch_size, replacement=True, generator=self.gen)
        return self.batch(idx, device, random_offset=True)


# ------------------------------------------------------------------------------------------------ loss
def plain_kl(mean: torch.Tensor, logvar: torch.Tensor, n_input: int) -> torch.Tensor:
    """KL(q || N(0, I)) in nats, summed over latent elements, per input element, averaged over the batch."""
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1).mean() / n_input


def _recon_loss(recon: torch.Tensor, x: torch.Tensor, mask_bt: torch.Tensor | None) -> torch.Tensor:
    if mask_bt is None:
        return F.mse_loss(recon, x)
    w = mask_bt[:, None, :].float()  # padding frames carry no signal: leave them out of the loss
    return ((recon - x).pow(2) * w).sum() / (w.sum() * x.shape[1]).clamp(min=1.0)


def _build_target_regularizer(cfg: VAETrainConfig):
    try:
        from revq_ray.core.regularizers import TargetDivergenceKL
    except ImportError as err:
        raise ImportError(
            "kl=target needs revq_ray.core.regularizers.TargetDivergenceKL, which is not available "
            f"({err}); use --set kl=plain"
        ) from None
    return TargetDivergenceKL(
        cfg.target_codebook_size,
        cfg.target_token_channels,
        tolerance_bits=cfg.target_tolerance_bits,
        weight=cfg.kl_weight,
        layout=cfg.target_layout,
    )


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is visible; use --set device=cpu")
    return torch.device(name)


# ------------------------------------------------------------------------------------------------ train
def _model_and_data(cfg: VAETrainConfig, gen: torch.Generator, device: torch.device) -> tuple[Any, Any]:
    """The untrained VAE (on ``device``, in train mode) and its training batches."""
    if cfg.modality == "image":
        data = _ImageBatches(load_image_set(cfg), gen)
        model = ImageConvVAE(image_size=cfg.image_size, width=cfg.width, latent_channels=cfg.latent_channels)
    else:
        front_end = _front_end(cfg).to(device)
        frames = cfg.crop_frames(front_end.sample_rate, front_end.hop)
        data = _AudioBatches(load_audio_set(cfg, front_end.sample_rate), front_end, frames, gen)
        model = MelVAE(
            n_mels=front_end.n_mels,
            frames=frames,
            width=cfg.width,
            latent_channels=cfg.latent_channels,
            front_end=front_end.config(),
            vocoder=None if cfg.vocoder == "griffin-lim" else cfg.vocoder,
        )
    return model.to(device).train(), data


def _hold_out(data: Any, val_items: int, device: torch.device) -> Any:
    """Take the first ``val_items`` items (at most half) out of ``data`` as a fixed validation batch."""
    # A fixed slice (and fixed audio offsets) gives a comparable val loss from step to step.
    n_val = min(val_items, len(data) // 2)
    val = data.batch(torch.arange(n_val), device) if n_val else None
    if n_val and isinstance(data, _ImageBatches):
        data.data = data.data[n_val:]
    elif n_val:
        data.waves, data.weights = data.waves[n_val:], data.weights[n_val:] / data.weights[n_val:].sum()
    return val


def train_vae(cfg: VAETrainConfig) -> Path:
    """Train a built-in VAE as ``cfg`` says, save it with ``save_pretrained`` to ``cfg.output``, and return
    that directory (loadable as ``builtin:<dir>``). Also writes ``train_config.yaml`` and ``train_log.json``
    (the progress lines as records) there."""
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = _device(cfg.device)

    model, data = _model_and_data(cfg, gen, device)
    val = _hold_out(data, cfg.val_items, device)

    target = _build_target_regularizer(cfg).to(device) if cfg.kl == "target" else None
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    n_params = sum(p.numel() for p in model.parameters())
    _log(
        f"{type(model).__name__}: {n_params / 1e6:.2f} M params, input {list(model.input_shape)} -> latent "
        f"{list(model.latent_shape)}, kl={cfg.kl}, {cfg.steps} steps of {cfg.batch_size} on {device}"
    )

    history: list[dict] = []
    sums: dict[str, float] = {}
    t0 = last = time.time()
    for step in range(1, cfg.steps + 1):
        x, mask = data.sample(cfg.batch_size, device)
        recon, mean, logvar = model(x)
        rec = _recon_loss(recon, x, mask)
        stats: dict[str, float] = {}
        if target is None:
            kl = plain_kl(mean, logvar, x[0].numel())
            loss = rec + cfg.kl_weight * kl
        else:
            kl, tstats = target(mean, logvar)  # already weighted by kl_weight * its adaptive lam
            stats = {k: float(v) for k, v in tstats.items() if torch.as_tensor(v).numel() == 1}
            loss = rec + kl
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"step {step}: loss is {loss.item()}; lower lr (now {cfg.lr}) or kl_weight"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()

        for k, v in {"loss": loss.item(), "recon": rec.item(), "kl": kl.item(), **stats}.items():
            sums[k] = sums.get(k, 0.0) + v
        sums["_n"] = sums.get("_n", 0.0) + 1
        if step % cfg.log_every == 0 or step == cfg.steps or step == 1:
            n = sums.pop("_n")
            rec_ = {"step": step, **{k: v / n for k, v in sums.items()}}
            if val is not None:
                rec_["val_recon"] = _val_recon(model, val)
                if cfg.modality == "image":
                    rec_["val_psnr"] = -10.0 * math.log10(max(rec_["val_recon"], 1e-12))
            now = time.time()
            rec_["items_per_s"] = cfg.batch_size * n / max(now - last, 1e-9)
            rec_["elapsed_s"] = now - t0
            last, sums = now, {}
            history.append(rec_)
            _log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec_.items()))

    out = Path(cfg.output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    model.cpu().eval().save_pretrained(out)
    (out / "train_config.yaml").write_text(dump_config(cfg))
    (out / "train_log.json").write_text(json.dumps(history, indent=1) + "\n")
    _log(f"saved to {out} (load with builtin:{out}) in {time.time() - t0:.1f}s")
    return out


@torch.no_grad()
def _val_recon(model: torch.nn.Module, val) -> float:
    was_training = model.training
    model.eval()
    x, mask = val
    recon = torch.cat([model(xb, sample=False)[0] for xb in x.split(256)])
    model.train(was_training)
    return float(_recon_loss(recon, x, mask))
