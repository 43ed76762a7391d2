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

from revq_ray.vae import load_vae_for

FORMAT = "revq-ray-tokenizer"
VERSION = 1
CONFIG_NAME = "tokenizer.json"
MODEL_SUBDIR = "model"
VAE_SUBDIR = "vae"
_BUNDLE_PREFIX = "bundle://"  # marks a VAE spec whose path is relative to the bundle directory


# --------------------------------------------------------------------------------------------- locating
def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A directory holding a ``save_pretrained`` ReVQModel, from a tokenizer bundle, an export or a run dir.

    Accepted: a Tokenizer bundle (``<dir>/model``), an export (``config.json`` + ``model.safetensors``),
    or a training run directory (``export/best``, else ``export/latest``).
    """
    p = Path(path).expanduser()
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


def _as_wave_list(inputs: Any) -> list[torch.Tensor]:
    if isinstance(inputs, np.ndarray):
        inputs = torch.from_numpy(np.ascontiguousarray(inputs))
    if isinstance(inputs, torch.Tensor):
        if inputs.ndim == 1:
            return [inputs.float()]
        if inputs.ndim == 2:
            return [w.float() for w in inputs]
        raise ValueError(f"waveforms: expected (L,) or (B, L); got {tuple(inputs.shape)}")
    if isinstance(inputs, list | tuple):
        out = []
        for item in inputs:
            out.extend(_as_wave_list(item))
        return out
    raise TypeError(f"waveforms: unsupported input type {type(inputs).__name__}")


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
        # mel VAEs: how decoded mels become waveforms; None = the VAE's own choice (griffin-lim by default)
        self.vocoder_override = vocoder
        self._vocoder: Any = None
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
        path = Path(path).expanduser()
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
        fe = getattr(self.vae, "front_end", None)
        if fe is not None:
            return int(fe.sample_rate)
        sr = getattr(self.vae, "sample_rate", None)
        return int(sr) if sr else None

    @property
    def tokens(self) -> int:
        return int(self.model.tokens)

    @property
    def codebook_size(self) -> int:
        return int(self.model.codebook_size)

    @property
    def bits_per_sample(self) -> float:
        return float(self.model.bits_per_sample)

    @property
    def clip_samples(self) -> int | None:
        """Audio: the waveform length (samples) whose mel is exactly one window (``(F - 1) * hop`` for a mel
        VAE: a centered STFT gives ``1 + n // hop`` frames)."""
        if self.modality != "audio":
            return None
        if self.input_kind == "mel":
            return (int(self.vae.input_shape[-1]) - 1) * int(self.vae.front_end.hop)
        return int(self.vae.input_shape[-1])

    @property
    def window_samples(self) -> int | None:
        """Audio: how far one window of T ids reaches in time, in samples (``F * hop`` for a mel VAE)."""
        if self.modality != "audio":
            return None
        if self.input_kind == "mel":
            return int(self.vae.input_shape[-1]) * int(self.vae.front_end.hop)
        return int(self.vae.input_shape[-1])

    def num_windows(self, n_samples: int) -> int:
        """Audio: windows (of T ids each) that a recording of ``n_samples`` at ``sample_rate`` takes."""
        from revq_ray.audio_tokens import num_windows

        if self.input_kind == "mel":
            return num_windows(self.vae.front_end.num_frames(n_samples), int(self.vae.input_shape[-1]))
        return num_windows(n_samples, int(self.vae.input_shape[-1]))

    @property
    def vocoder(self) -> Any:
        """Mel VAEs: the vocoder (``griffin-lim`` unless the VAE or ``vocoder=`` names ``vocos:...``)."""
        if self._vocoder is None:
            from revq_ray.vae.vocoder import load_vocoder

            spec = self.vocoder_override or getattr(self.vae, "vocoder_spec", None)
            self._vocoder = load_vocoder(spec, self.device)
            check = getattr(self._vocoder, "check", None)
            if check is not None:
                check(self.vae.front_end)
        return self._vocoder

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
        return self._preprocess_audio(inputs, sample_rate)

    def _preprocess_audio(self, inputs: Any, sample_rate: int | None) -> torch.Tensor:
        """Waveforms of any length -> every window of each, stacked (sum of windows, *input_shape)."""
        return torch.cat(self.audio_windows(inputs, sample_rate)[0])

    def audio_windows(
        self, inputs: Any, sample_rate: int | None
    ) -> tuple[list[torch.Tensor], list[int], list[int]]:
        """Waveforms -> (per recording its windows (W_i, *input_shape), lengths at ``self.sample_rate``,
        lengths as given). Mel VAEs take the mel of the whole recording, then cut it into windows of F
        frames, so a window's frames are those the long recording has there."""
        import torchaudio

        from revq_ray.audio_tokens import split_windows

        if sample_rate is None:
            raise ValueError(
                "audio tokenizer: pass sample_rate= with the waveforms (their sampling rate in Hz)"
            )
        windows, lengths, source_lengths = [], [], []
        for w in _as_wave_list(inputs):
            if w.numel() == 0:
                raise ValueError("audio tokenizer: an empty waveform (0 samples) has no tokens")
            source_lengths.append(int(w.numel()))
            if int(sample_rate) != self.sample_rate:
                w = torchaudio.functional.resample(w, int(sample_rate), int(self.sample_rate))
            lengths.append(int(w.numel()))
            if self.input_kind == "mel":
                fe = self.vae.front_end
                mel = fe(w.to(fe.mel.spectrogram.window.device))  # (n_mels, 1 + n // hop)
                windows.append(split_windows(mel, int(self.vae.input_shape[-1]), pad_value=-1.0))
            else:
                wins = split_windows(w[None], int(self.vae.input_shape[-1]), pad_value=0.0)
                windows.append(wins.reshape(-1, *self.vae.input_shape))
        return windows, lengths, source_lengths

    def postprocess(self, x: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """A VAE output batch -> media: images (B, 3, H, W) in [0, 1]; audio waveforms (B, L) in [-1, 1]
        (``length`` samples, default one clip)."""
        if self.modality == "image":
            return x.clamp(0.0, 1.0)
        length = self.clip_samples if length is None else int(length)
        if self.input_kind == "mel":
            return self.vocoder(x, self.vae.front_end, length)
        x = x.reshape(x.shape[0], -1)
        if x.shape[-1] < length:
            x = torch.nn.functional.pad(x, (0, length - x.shape[-1]))
        return x[..., :length].clamp(-1.0, 1.0)

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
            return self._encode_audio(inputs, sample_rate, batch_size)
        return self._encode_inputs(self.preprocess(inputs, sample_rate), batch_size)

    def _encode_inputs(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
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

    def _encode_audio(self, inputs: Any, sample_rate: int | None, batch_size: int) -> Any:
        from revq_ray.audio_tokens import AudioIds

        windows, lengths, source_lengths = self.audio_windows(inputs, sample_rate)
        ids_nt = self._encode_inputs(torch.cat(windows), batch_size)  # every window of every recording
        items = list(ids_nt.split([len(w) for w in windows]))
        return AudioIds.from_items(
            items,
            lengths,
            self.tokens,
            self.window_samples,
            self.sample_rate,
            int(sample_rate),
            source_lengths,
        )

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
            waves = self.decode_audio(ids, batch_size, sample_rate)
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
        """Audio ids -> one waveform per recording, each of its exact length (see :meth:`decode`)."""
        import torchaudio

        audio_ids = self._as_audio_ids(ids)
        outs = self.decode_windows([audio_ids.item_windows(b) for b in range(len(audio_ids))], batch_size)
        waves = []
        for b, y in enumerate(outs):
            n = int(audio_ids.lengths[b])
            w = self._output_to_wave(y, n)
            if sample_rate is not None and int(sample_rate) != self.sample_rate:
                w = torchaudio.functional.resample(w, self.sample_rate, int(sample_rate))
                src = audio_ids.source_lengths
                if audio_ids.source_rate == int(sample_rate) and src is not None:
                    n_out = int(src[b])
                    w = torch.nn.functional.pad(w, (0, max(0, n_out - w.numel())))[:n_out]
            waves.append(w.cpu())
        return waves

    def decode_windows(self, items: list[torch.Tensor], batch_size: int = 64) -> list[torch.Tensor]:
        """Per recording its ids (W_i, T) -> its VAE output reassembled over time, (C, W_i * N), by
        overlap-add of the windows and the windows straddling their borders (:mod:`revq_ray.audio_tokens`)."""
        from revq_ray.audio_tokens import overlap_add

        counts = [int(x.shape[0]) for x in items]
        z = self._latents_of(torch.cat(items), batch_size)
        per_item = list(z.split(counts))
        return [overlap_add(*self._decode_pair(z_w, batch_size)) for z_w in per_item]

    def decode_latent_windows(self, z_items: list[torch.Tensor], batch_size: int = 64) -> list[torch.Tensor]:
        """Like :meth:`decode_windows` from raw latents (W_i, *latent_shape) per recording."""
        from revq_ray.audio_tokens import overlap_add

        return [overlap_add(*self._decode_pair(z.to(self.device), batch_size)) for z in z_items]

    def _latents_of(self, ids_nt: torch.Tensor, batch_size: int) -> torch.Tensor:
        return torch.cat(
            [self.decode_latents(ids_nt[i : i + batch_size]) for i in range(0, ids_nt.shape[0], batch_size)]
        )

    def _decode_pair(self, z_wcl: torch.Tensor, batch_size: int) -> tuple[Any, Any, int]:
        """Decoded windows, decoded straddling windows, and how far into a window the latter start."""
        from revq_ray.audio_tokens import straddling_latents

        def dec(z: torch.Tensor) -> torch.Tensor:
            out = [self.vae.decode(z[i : i + batch_size]).cpu() for i in range(0, z.shape[0], batch_size)]
            y = torch.cat(out)
            return (
                y.reshape(y.shape[0], -1, y.shape[-1])
                if self.input_kind == "mel"
                else y.reshape(y.shape[0], 1, -1)
            )

        a = dec(z_wcl)
        b = dec(straddling_latents(z_wcl)) if z_wcl.shape[0] > 1 else None
        n, L = a.shape[-1], z_wcl.shape[-1]
        return a, b, (L // 2) * (n // L)

    def _output_to_wave(self, y_ct: torch.Tensor, n_samples: int) -> torch.Tensor:
        """A reassembled VAE output (C, N) -> waveform (n_samples,)."""
        if self.input_kind == "mel":
            frames = self.vae.front_end.num_frames(n_samples)
            return self.postprocess(y_ct[None, :, :frames].to(self.device), length=n_samples)[0]
        return self.postprocess(y_ct.reshape(1, -1), length=n_samples)[0]

    def _as_audio_ids(self, ids: Any) -> Any:
        from revq_ray.audio_tokens import PAD, AudioIds

        if isinstance(ids, AudioIds):
            return ids
        t = torch.as_tensor(ids, dtype=torch.long)
        t = t[None] if t.ndim == 1 else t
        if t.ndim != 2 or t.shape[1] % self.tokens:
            raise ValueError(
                f"audio ids: expected AudioIds or (B, W * T) with T={self.tokens}; got {tuple(t.shape)}"
            )
        rows = [r.view(-1, self.tokens) for r in t]
        rows = [r[(r != PAD).any(dim=1)] for r in rows]  # drop padding windows
        hop = int(self.vae.front_end.hop) if self.input_kind == "mel" else 1
        # whole windows: a mel window of F frames is (F * W - 1) * hop samples of a centered STFT
        lengths = [len(r) * self.window_samples - (hop if self.input_kind == "mel" else 0) for r in rows]
        return AudioIds.from_items(rows, lengths, self.tokens, self.window_samples, self.sample_rate)

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
