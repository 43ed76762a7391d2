"""``Tokenizer``: media -> token ids -> media, one object bundling a frozen VAE and a trained ReVQModel.

    from revq_ray import Tokenizer

    tok = Tokenizer.build("builtin:runs/quickstart/vae", "runs/quickstart/train/export/best")
    ids = tok.encode(images)            # (B, T) int64, images: uint8/float tensors, numpy arrays or PIL
    images_rec = tok.decode(ids)        # (B, 3, H, W) float in [0, 1]
    tok.save_pretrained("my_tokenizer") # self-contained bundle
    tok = Tokenizer.from_pretrained("my_tokenizer")

Audio tokenizers take waveforms of any length and their sample rate (``tok.encode(wave, sample_rate=16000)``
-> :class:`~revq_ray.audio_tokens.AudioIds`): each recording is resampled to the VAE's rate, cut into
consecutive windows of the clip the VAE was trained on (the last one padded, the true length kept) and its
ids are the windows' ids in time order, T per window (the layout is documented in
:mod:`revq_ray.audio_tokens`). ``decode`` reassembles the windows by overlap-add and returns waveforms of the
original length at ``tok.sample_rate`` (or ``sample_rate=``), vocoded from the decoded mel by the VAE's
vocoder (Griffin-Lim, or Vocos: ``vocoder="vocos:<dir-or-id>"``, see :mod:`revq_ray.vae.vocoder`).

Bundle layout written by :meth:`Tokenizer.save_pretrained`::

    tokenizer.json   {"format": "revq-ray-tokenizer", "version": 1, "vae": "<spec>", ...}
    model/           ReVQModel.save_pretrained (config.json + model.safetensors)
    vae/             a copy of the VAE for built-in and TAESD VAEs (specs inside the bundle are relative)

Diffusers VAEs are referenced by their spec (a hub id or a directory) rather than copied, because they are
large; pass ``copy_vae=True`` to copy a local diffusers directory too.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from revq_ray.audio_tokens import AudioCodec
from revq_ray.vae import load_vae_for

FORMAT = "revq-ray-tokenizer"
VERSION = 1
CONFIG_NAME = "tokenizer.json"
MODEL_SUBDIR = "model"
VAE_SUBDIR = "vae"
_BUNDLE_PREFIX = "bundle://"  # marks a VAE spec whose path is relative to the bundle directory


# --------------------------------------------------------------------------------------------- locating
_RUN_FILES = ("config.json", "config.yaml", "metrics.csv")  # what a run's export is read with


def local_model_path(path: str | os.PathLike) -> Path:
    """``path`` as a local folder. A URI (``s3://...``: a bundle, an export or a run folder) is downloaded
    into ``~/.cache/revq_ray/remote/...`` first (a run folder without its checkpoints; an export
    ``<run>/export/<name>`` with its run's config and metrics beside it, as on disk), so everything that
    reads a model reads local files; an unusable URI fails naming it."""
    from revq_ray.runtime import is_uri

    loc = str(path)
    if not is_uri(loc):
        return Path(loc).expanduser()
    from revq_ray.data import fs as _fs

    parts = loc.rstrip("/").rsplit("/", 2)
    if len(parts) == 3 and parts[1] == "export":  # <run>/export/<name>: the exports and the run's files
        out = _fs.local_copy(parts[0], only=("export", *_RUN_FILES)) / "export" / parts[2]
        if not out.is_dir():
            raise FileNotFoundError(f"{loc}: no such export (train writes export/best and export/latest)")
        return out
    return _fs.local_copy(loc, skip_prefix=("checkpoint_",))


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A directory holding a ``save_pretrained`` ReVQModel, from a tokenizer bundle, an export or a run dir.

    Accepted: a Tokenizer bundle (``<dir>/model``), an export (``config.json`` + ``model.safetensors``),
    or a training run directory (``export/best``, else ``export/latest``).
    """
    p = local_model_path(path)
    candidates = [p, p / MODEL_SUBDIR, p / "export" / "best", p / "export" / "latest"]
    for c in candidates:
        if (c / "config.json").is_file() and (c / "model.safetensors").is_file():
            return c
    raise FileNotFoundError(
        f"{str(p)!r} holds no trained model: expected a Tokenizer bundle, an export directory "
        "(config.json + model.safetensors, from save_pretrained) or a run directory with export/best; "
        "train one with 'revq-ray train' or run 'revq-ray quickstart'"
    )


def run_dir_of(model_dir: Path) -> Path | None:
    """The training run directory an ``export/<name>`` model dir belongs to (None otherwise)."""
    model_dir = Path(model_dir).resolve()
    if model_dir.parent.name == "export":
        return model_dir.parent.parent
    return None


def vae_spec_from_run(model_dir: str | os.PathLike) -> str | None:
    """The VAE spec of the run an export belongs to, or None.

    The run's saved config (``config.json`` written by ``revq_ray.train``) names it in ``vae``; when that is
    empty, the manifest of the run's training shards records the VAE the latents were encoded with.
    """
    run_dir = run_dir_of(Path(model_dir))
    if run_dir is None:
        return None
    import yaml

    for name in ("config.json", "config.yaml"):
        f = run_dir / name
        if not f.is_file():
            continue
        try:
            data = yaml.safe_load(f.read_text()) or {}  # JSON is YAML
        except Exception:
            continue
        if not isinstance(data, dict):
            continue
        if data.get("vae"):
            return str(data["vae"])
        shards = (data.get("data") or {}).get("shards")
        if shards:
            try:
                from revq_ray.data.shards import read_manifest

                spec = read_manifest(shards).vae
            except Exception:
                continue
            if spec and spec != "synthetic":
                return spec
    return None


def image_resize_of(path: str | os.PathLike) -> str:
    """How a bundle fits non-square images to the VAE's square: its ``image_resize``, else ``stretch``."""
    cfg_file = Path(path).expanduser() / CONFIG_NAME
    if not cfg_file.is_file():
        return "stretch"
    return str(json.loads(cfg_file.read_text()).get("image_resize") or "stretch")


def _spec_kind_and_path(spec: str) -> tuple[str, str]:
    if ":" not in spec:
        raise ValueError(f"VAE spec {spec!r}: expected '<kind>:<path or id>' (diffusers:, taesd:, builtin:)")
    kind, rest = spec.split(":", 1)
    return kind, rest


# --------------------------------------------------------------------------------------------- inputs
def _as_image_list(inputs: Any) -> list[Any]:
    """Split ``inputs`` into single images (each HxW, HxWxC array/tensor or PIL image)."""
    if hasattr(inputs, "convert") and hasattr(inputs, "size"):  # one PIL image
        return [inputs]
    if isinstance(inputs, torch.Tensor | np.ndarray):
        arr = inputs
        if arr.ndim == 4:
            # (B, C, H, W) when the second dim looks like channels, else (B, H, W, C)
            if arr.shape[1] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
                arr = arr.permute(0, 2, 3, 1) if isinstance(arr, torch.Tensor) else arr.transpose(0, 2, 3, 1)
            return list(arr)
        if arr.ndim == 3:
            if arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):  # one CHW image
                return [arr.permute(1, 2, 0) if isinstance(arr, torch.Tensor) else arr.transpose(1, 2, 0)]
            return [arr]
        if arr.ndim == 2:
            return [arr]
        raise ValueError(
            f"images: expected (B, C, H, W), (B, H, W, C), (H, W, C) or (H, W); got {tuple(arr.shape)}"
        )
    if isinstance(inputs, list | tuple):
        out = []
        for item in inputs:
            out.extend(_as_image_list(item))
        return out
    raise TypeError(
        f"images: unsupported input type {type(inputs).__name__} (tensor, numpy array, PIL image or list)"
    )


# --------------------------------------------------------------------------------------------- Tokenizer
class Tokenizer:
    """A frozen VAE plus a trained :class:`~revq_ray.core.model.ReVQModel`: media <-> token ids.

    Args:
        vae: a loaded frozen VAE (:func:`revq_ray.vae.load_vae`).
        model: the trained ReVQModel (standardizer, quantizer, rectifier), e.g. ``ReVQModel.from_pretrained``.
        vae_spec: the spec string the VAE was loaded from (defaults to ``vae.spec``); stored in the bundle.
    """

    def __init__(self, vae: Any, model: Any, vae_spec: str | None = None, vocoder: str | None = None):
        self.vae = vae
        self.model = model.eval()
        self.vae_spec = vae_spec or getattr(vae, "spec", "")
        # audio of any length: windowing, overlap-add and the vocoder (revq_ray.audio_tokens)
        self.audio = AudioCodec(self, vocoder)
        if tuple(vae.latent_shape) != tuple(model.latent_shape):
            raise ValueError(
                f"VAE {self.vae_spec!r} makes latents of shape {tuple(vae.latent_shape)} but the model was "
                f"trained on {tuple(model.latent_shape)}: use the VAE (and image size / clip length) the "
                "latents came from"
            )

    # ----------------------------------------------------------------------------------------- building
    @classmethod
    def build(
        cls,
        vae_spec: str,
        model_dir: str | os.PathLike,
        device: str | torch.device = "cpu",
        image_size: int | None = None,
        vocoder: str | None = None,
    ) -> Tokenizer:
        """Combine a VAE spec and a trained model (export dir, run dir or bundle) into a Tokenizer."""
        from revq_ray.core.model import ReVQModel

        model = ReVQModel.from_pretrained(str(resolve_model_dir(model_dir))).to(device)
        vae = load_vae_for(vae_spec, model.latent_shape, device, image_size)
        return cls(vae, model, vae_spec, vocoder=vocoder)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, device: str | torch.device = "cpu", vae: str | None = None
    ) -> Tokenizer:
        """Load a bundle written by :meth:`save_pretrained`.

        Also accepts an export or run directory plus ``vae=<spec>`` (or a run whose config names its VAE).
        """
        path = local_model_path(path)
        cfg_file = path / CONFIG_NAME
        if not cfg_file.is_file():
            spec = vae or vae_spec_from_run(resolve_model_dir(path))
            if not spec:
                raise FileNotFoundError(
                    f"{str(path)!r} is not a Tokenizer bundle (no {CONFIG_NAME}); "
                    "for a bare model export pass "
                    "vae='<spec>' (e.g. builtin:<dir>) or use Tokenizer.build(vae_spec, model_dir)"
                )
            return cls.build(spec, path, device=device)
        cfg = json.loads(cfg_file.read_text())
        if cfg.get("format") != FORMAT:
            raise ValueError(f"{cfg_file}: not a revq-ray tokenizer (format={cfg.get('format')!r})")
        if int(cfg.get("version", 0)) > VERSION:
            raise ValueError(
                f"{cfg_file}: version {cfg['version']} is newer than this revq-ray ({VERSION}); upgrade"
            )
        spec = vae or cls.absolute_spec(cfg["vae"], path)
        from revq_ray.core.model import ReVQModel

        model = ReVQModel.from_pretrained(str(path / MODEL_SUBDIR)).to(device)
        vae_obj = load_vae_for(spec, model.latent_shape, device, cfg.get("image_size"))
        tok = cls(vae_obj, model, spec, vocoder=cfg.get("vocoder"))
        tok.vae_spec = cfg["vae"] if vae is None else vae
        tok.image_resize = cfg.get("image_resize", "stretch")
        tok._bundle_dir = path
        return tok

    @staticmethod
    def absolute_spec(spec: str, bundle_dir: Path) -> str:
        """A VAE spec saved relative to a bundle (``kind:<bundle>/...``) as an absolute ``kind:/path``."""
        kind, rest = _spec_kind_and_path(spec)
        if rest.startswith(_BUNDLE_PREFIX):
            return f"{kind}:{(bundle_dir / rest[len(_BUNDLE_PREFIX) :]).resolve()}"
        return spec

    def save_pretrained(self, path: str | os.PathLike, copy_vae: bool | None = None) -> Path:
        """Write a bundle: ``tokenizer.json``, ``model/`` and (built-in / TAESD VAEs) the VAE in ``vae/``.

        ``copy_vae``: None copies built-in and TAESD VAE directories (small) and references diffusers VAEs by
        spec; True copies any local VAE directory; False never copies (the bundle then needs the VAE path).
        """
        path = Path(path).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(path / MODEL_SUBDIR))
        spec = self.vae_spec
        bundle_dir = getattr(self, "_bundle_dir", None)
        kind, rest = _spec_kind_and_path(spec)
        if rest.startswith(_BUNDLE_PREFIX):  # re-saving a loaded bundle: the VAE lives in the old bundle
            rest = str(Path(bundle_dir or ".") / rest[len(_BUNDLE_PREFIX) :])
            spec = f"{kind}:{rest}"
            if copy_vae is None:
                copy_vae = True
        src = Path(rest).expanduser()
        do_copy = copy_vae if copy_vae is not None else kind in ("builtin", "taesd")
        if do_copy and src.is_dir():
            dst = path / VAE_SUBDIR
            if src.resolve() != dst.resolve():
                if dst.exists():
                    shutil.rmtree(dst)
                shutil.copytree(src, dst)
            spec = f"{kind}:{_BUNDLE_PREFIX}{VAE_SUBDIR}"
        elif src.exists():
            spec = f"{kind}:{src.resolve()}"  # a local reference must survive a change of working directory
        cfg = {
            "format": FORMAT,
            "version": VERSION,
            "vae": spec,
            "modality": self.modality,
            "input_kind": self.input_kind,
            "input_shape": list(self.vae.input_shape),
            "latent_shape": list(self.model.latent_shape),
            "image_size": int(self.vae.input_shape[-1]) if self.modality == "image" else None,
            "image_resize": getattr(self, "image_resize", "stretch"),
            "sample_rate": self.sample_rate,
            "tokens": self.tokens,
            "codebook_size": self.codebook_size,
            "bits_per_sample": self.bits_per_sample,
            "quantizer": self.model.cfg.quantizer.type,
            "rectifier": self.model.cfg.rectifier.type,
        }
        if self.modality == "audio":
            cfg["window_samples"] = self.window_samples
            cfg["vocoder"] = self.vocoder_override  # None: the VAE's own (griffin-lim unless it names vocos)
        (path / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
        return path

    # ----------------------------------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return self.model.standardizer.mean.device

    @property
    def modality(self) -> str:
        return str(getattr(self.vae, "modality", "image"))

    @property
    def input_kind(self) -> str:
        return str(getattr(self.vae, "input_kind", "image" if self.modality == "image" else "mel"))

    @property
    def sample_rate(self) -> int | None:
        return self.audio.sample_rate

    @property
    def tokens(self) -> int:
        return int(self.model.tokens)

    @property
    def codebook_size(self) -> int:
        return int(self.model.codebook_size)

    @property
    def bits_per_sample(self) -> float:
        return float(self.model.bits_per_sample)

    # audio: AudioCodec's, here for the callers of earlier versions
    @property
    def clip_samples(self) -> int | None:
        """Audio: the waveform length of one window's input (:attr:`AudioCodec.clip_samples`)."""
        return self.audio.clip_samples if self.modality == "audio" else None

    @property
    def window_samples(self) -> int | None:
        """Audio: how far one window of T ids reaches in time, in samples."""
        return self.audio.window_samples if self.modality == "audio" else None

    def num_windows(self, n_samples: int) -> int:
        """Audio: windows (of T ids each) that a recording of ``n_samples`` at ``sample_rate`` takes."""
        return self.audio.num_windows(n_samples)

    @property
    def vocoder(self) -> Any:
        """Mel VAEs: the vocoder (:attr:`AudioCodec.vocoder`)."""
        return self.audio.vocoder

    @property
    def vocoder_override(self) -> str | None:
        """The vocoder spec given to the Tokenizer; None = the VAE's own."""
        return self.audio.vocoder_override

    @vocoder_override.setter
    def vocoder_override(self, spec: str | None) -> None:
        self.audio.use_vocoder(spec)

    def to(self, device: str | torch.device) -> Tokenizer:
        self.model.to(device)
        self.vae.to(device)
        return self

    # ------------------------------------------------------------------------------- media <-> VAE input
    def preprocess(self, inputs: Any, sample_rate: int | None = None) -> torch.Tensor:
        """Media -> a VAE input batch: images (B, 3, S, S) in [0, 1]; audio: normalized mel or waveforms."""
        if self.modality == "image":
            from revq_ray.vae.images import to_vae_input

            size = int(self.vae.input_shape[-1])
            resize = getattr(self, "image_resize", "stretch")  # "center_crop" in imported published models
            return torch.stack([to_vae_input(img, size, resize) for img in _as_image_list(inputs)])
        # audio: waveforms of any length -> every window of each, stacked (sum of windows, *input_shape)
        return torch.cat(self.audio.windows(inputs, sample_rate)[0])

    def audio_windows(
        self, inputs: Any, sample_rate: int | None
    ) -> tuple[list[torch.Tensor], list[int], list[int]]:
        """Audio: see :meth:`AudioCodec.windows`."""
        return self.audio.windows(inputs, sample_rate)

    def postprocess(self, x: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """A VAE output batch -> media: images (B, 3, H, W) in [0, 1]; audio waveforms (B, L) in [-1, 1]
        (``length`` samples, default one clip)."""
        if self.modality == "image":
            return x.clamp(0.0, 1.0)
        return self.audio.postprocess(x, length)

    # ----------------------------------------------------------------------------------------- API
    @torch.no_grad()
    def encode_latents(self, latents: torch.Tensor, logvar: torch.Tensor | None = None) -> torch.Tensor:
        """Raw VAE latents (B, *latent_shape) -> ids (B, T); ``logvar`` is used by GQ only."""
        return self.model.encode(latents.to(self.device), None if logvar is None else logvar.to(self.device))

    @torch.no_grad()
    def decode_latents(self, ids_bt: torch.Tensor) -> torch.Tensor:
        """Ids (B, T) -> raw VAE latents (B, *latent_shape) (rectified, de-standardized)."""
        return self.model.decode(torch.as_tensor(ids_bt, device=self.device))

    @torch.no_grad()
    def encode(self, inputs: Any, sample_rate: int | None = None, batch_size: int = 64) -> Any:
        """Media -> token ids.

        Images: a (B, C, H, W) or (B, H, W, C) uint8/float tensor or array, one image, a PIL image or a
        list of them (resized to the VAE's input size) -> (B, T) int64 in [0, codebook_size).

        Audio: waveforms of any length, (L,), (B, L) or a list of different lengths, with ``sample_rate``
        -> :class:`~revq_ray.audio_tokens.AudioIds`: per recording ``num_windows(L) * T`` ids, window after
        window in time order (``ids.item(b)``), with the true lengths.
        """
        if self.modality == "audio":
            return self.audio.encode(inputs, sample_rate, batch_size)
        return self.encode_inputs(self.preprocess(inputs, sample_rate), batch_size)

    def encode_inputs(self, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """VAE inputs (N, *input_shape) -> ids (N, T)."""
        # GQ scores codes against the posterior N(mu, sigma^2): give it the log-variance when the VAE has one.
        use_posterior = self.model.cfg.quantizer.type == "gq" and bool(
            getattr(self.vae, "is_gaussian", False)
        )
        out = []
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size].to(self.device)
            if use_posterior:
                post = self.vae.posterior(xb)
                out.append(self.model.encode(post.mean, post.logvar).cpu())
            else:
                out.append(self.encode_latents(self.vae.encode(xb)).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def decode(
        self,
        ids: Any,
        batch_size: int = 64,
        sample_rate: int | None = None,
    ) -> torch.Tensor:
        """Token ids -> media.

        Images: ids (B, T) -> (B, 3, H, W) in [0, 1].

        Audio: :class:`~revq_ray.audio_tokens.AudioIds` (from ``encode``) -> waveforms (B, L_max) in [-1, 1]
        at ``tok.sample_rate``, recording b in its first ``ids.lengths[b]`` samples (zeros after);
        ``sample_rate=ids.source_rate`` resamples back to the input rate and length. A plain (B, W * T)
        id tensor (``PAD`` = -1 after a shorter row's windows) decodes to whole windows.
        """
        if self.modality == "audio":
            waves = self.audio.decode(ids, batch_size, sample_rate)
            out = torch.zeros(len(waves), max(w.numel() for w in waves))
            for b, w in enumerate(waves):
                out[b, : w.numel()] = w
            return out
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.ndim == 1:
            ids = ids[None]
        out = []
        for i in range(0, ids.shape[0], batch_size):
            z = self.decode_latents(ids[i : i + batch_size])
            out.append(self.postprocess(self.vae.decode(z)).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def decode_audio(
        self, ids: Any, batch_size: int = 64, sample_rate: int | None = None
    ) -> list[torch.Tensor]:
        """Audio ids -> one waveform per recording, each of its exact length (:meth:`AudioCodec.decode`)."""
        return self.audio.decode(ids, batch_size, sample_rate)

    def decode_windows(self, items: list[torch.Tensor], batch_size: int = 64) -> list[torch.Tensor]:
        """Audio: see :meth:`AudioCodec.decode_windows`."""
        return self.audio.decode_windows(items, batch_size)

    def decode_latent_windows(self, z_items: list[torch.Tensor], batch_size: int = 64) -> list[torch.Tensor]:
        """Audio: see :meth:`AudioCodec.decode_latent_windows`."""
        return self.audio.decode_latent_windows(z_items, batch_size)

    @torch.no_grad()
    def reconstruct(self, inputs: Any, sample_rate: int | None = None) -> torch.Tensor:
        """``decode(encode(inputs))``."""
        return self.decode(self.encode(inputs, sample_rate=sample_rate))

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vae={self.vae_spec!r}, modality={self.modality}, tokens={self.tokens}, "
            f"codebook_size={self.codebook_size}, bits_per_sample={self.bits_per_sample:g}, "
            f"quantizer={self.model.cfg.quantizer.type})"
        )
