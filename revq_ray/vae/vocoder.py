"""Vocoders for mel VAEs: normalized log-mel (from :class:`~revq_ray.vae.audio.MelFrontEnd`) -> waveform.

===========================  ===============================================================================
spec                         what
===========================  ===============================================================================
``griffin-lim``              the default: InverseMelScale + Griffin-Lim (no weights, offline, any front end);
                             phase is re-estimated, so it caps what any mel tokenizer can sound like
``vocos:<dir>``              a Vocos neural vocoder (``pip install vocos``) from a directory holding
                             ``config.yaml`` + ``pytorch_model.bin`` (the layout of Vocos' hub repos)
``vocos:<owner/name>``       the same fetched from the Hugging Face hub when online, e.g.
                             ``vocos:charactr/vocos-mel-24khz`` (24 kHz, n_fft 1024, hop 256, 100 mels)
===========================  ===============================================================================

A Vocos vocoder reads the log-mel of its own feature extractor (torchaudio ``MelSpectrogram``, HTK mel
scale, no filterbank norm, f_max = Nyquist, ``ln(max(mel, 1e-7))``). :func:`front_end_for` returns the
:class:`MelFrontEnd` parameters that compute exactly those features (up to our fixed normalization, which
the vocoder undoes), so a mel VAE trained with that front end (``vocoder: vocos:...`` in
``configs/vae_speech.yaml``) can be vocoded by it. A front end that differs is refused with the fix named.

Vocos configs name classes to instantiate; only ``vocos.*`` classes are accepted, and weights are loaded
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

GRIFFIN_LIM = "griffin-lim"
VOCOS_FILES = ("config.yaml", "pytorch_model.bin")
VOCOS_LOG_FLOOR = 1e-7  # vocos.modules.safe_log's clip value
# The front-end fields that must agree between a mel VAE and a Vocos vocoder.
MATCH_KEYS = ("sample_rate", "n_fft", "hop", "n_mels", "win_length", "f_min", "f_max", "mel_scale", "norm")


def parse_vocoder(spec: str | None) -> tuple[str, str]:
    """``None`` / ``"griffin-lim"`` -> ("griffin-lim", ""); ``"vocos:<dir-or-id>"`` -> ("vocos", target)."""
    if spec is None or spec.strip().lower() in ("", GRIFFIN_LIM, "griffinlim"):
        return GRIFFIN_LIM, ""
    kind, _, target = spec.partition(":")
    if kind.strip().lower() != "vocos" or not target.strip():
        raise ValueError(
            f"vocoder {spec!r}: expected 'griffin-lim' or 'vocos:<dir-or-hub-id>' "
            "(e.g. vocos:charactr/vocos-mel-24khz, or a directory with config.yaml + pytorch_model.bin)"
        )
    return "vocos", target.strip()


def _vocos_file(target: str, name: str) -> Path:
    """``name`` from a local Vocos directory, or downloaded from the hub repo ``target``."""
    local = Path(target).expanduser()
    if local.is_dir():
        path = local / name
        if not path.is_file():
            raise FileNotFoundError(
                f"vocos:{target}: no {name} there (a Vocos directory holds {' + '.join(VOCOS_FILES)})"
            )
        return path
    if target.startswith((".", "/", "~")) or target.count("/") != 1:
        raise FileNotFoundError(
            f"vocos:{target}: not a directory, and not a hub id (owner/name) either; "
            "download one with `hf download charactr/vocos-mel-24khz --local-dir <dir>`"
        )
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=target, filename=name))
    except Exception as err:
        raise FileNotFoundError(
            f"vocos:{target}: could not fetch {name} from the hub ({type(err).__name__}: {err}); offline, "
            f"download it once where there is internet (`hf download {target} --local-dir <dir>`) and use "
            "vocos:<dir>"
        ) from err


def _vocos_config(target: str) -> dict[str, Any]:
    import yaml

    cfg = yaml.safe_load(_vocos_file(target, "config.yaml").read_text()) or {}
    for part in ("feature_extractor", "backbone", "head"):
        cls = str((cfg.get(part) or {}).get("class_path", ""))
        if not cls.startswith("vocos."):
            raise ValueError(
                f"vocos:{target}: config.yaml {part}.class_path={cls!r}; only vocos.* classes are loaded"
            )
    fe = cfg["feature_extractor"]
    if not fe["class_path"].endswith("MelSpectrogramFeatures"):
        raise ValueError(
            f"vocos:{target}: a {fe['class_path']} vocoder; mel VAEs need MelSpectrogramFeatures"
        )
    return cfg


def front_end_for(vocoder: str) -> dict[str, Any]:
    """:class:`MelFrontEnd` kwargs whose features a Vocos vocoder reads (from its ``config.yaml`` only)."""
    kind, target = parse_vocoder(vocoder)
    if kind != "vocos":
        raise ValueError(f"front_end_for: {vocoder!r} is not a vocos:<dir-or-id> vocoder")
    args = _vocos_config(target)["feature_extractor"].get("init_args", {})
    if args.get("padding", "center") != "center":
        raise ValueError(f"vocos:{target}: padding={args['padding']!r}; the mel front end is centered")
    sr, n_fft = int(args.get("sample_rate", 24000)), int(args.get("n_fft", 1024))
    return {
        "sample_rate": sr,
        "n_fft": n_fft,
        "hop": int(args.get("hop_length", 256)),
        "n_mels": int(args.get("n_mels", 100)),
        "win_length": n_fft,
        "f_min": 0.0,
        "f_max": None,
        "log_floor": VOCOS_LOG_FLOOR,
        "log_max": 2.0,
        "mel_scale": "htk",
        "norm": None,
    }


class GriffinLimVocoder:
    """InverseMelScale + Griffin-Lim through the front end itself (``MelFrontEnd.mel_to_wave``)."""

    spec = GRIFFIN_LIM

    def __init__(self, n_iter: int = 32):
        self.n_iter = n_iter

    def __call__(self, mel_bmf: torch.Tensor, front_end: Any, length: int) -> torch.Tensor:
        return front_end.to(mel_bmf.device).mel_to_wave(mel_bmf, n_iter=self.n_iter, length=length)


class VocosVocoder:
    """A Vocos model: our normalized log-mel -> its log-mel features -> waveform, cut/padded to ``length``."""

    def __init__(self, target: str, device: str | torch.device = "cpu"):
        try:
            from vocos import Vocos
        except ImportError as err:
            raise ImportError(
                f"vocoder vocos:{target} needs the vocos package: pip install vocos "
                "torch==2.11.0 torchaudio==2.11.0 (pins keep torch where it is)"
            ) from err
        self.spec = f"vocos:{target}"
        self.front_end_config = front_end_for(self.spec)
        config = _vocos_file(target, "config.yaml")
        state = torch.load(_vocos_file(target, "pytorch_model.bin"), map_location="cpu", weights_only=True)
        _vocos_config(target)  # class paths checked before anything is instantiated
        model = Vocos.from_hparams(str(config))
        model.load_state_dict(state)
        self.model = model.eval().requires_grad_(False).to(device)

    def check(self, front_end: Any) -> None:
        """Raise unless ``front_end`` computes the features this vocoder was trained on."""
        have = front_end.config()
        diff = {k: (have.get(k), v) for k, v in self.front_end_config.items() if k in MATCH_KEYS}
        diff = {k: hv for k, hv in diff.items() if hv[0] != hv[1] and not _same_float(*hv)}
        if diff:
            shown = ", ".join(f"{k}: VAE {a!r} vs vocoder {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"{self.spec}: the mel VAE's front end differs from the vocoder's ({shown}); train the mel "
                f"VAE with `vocoder: {self.spec}` (configs/vae_speech.yaml) so its front end matches"
            )

    @torch.no_grad()
    def __call__(self, mel_bmf: torch.Tensor, front_end: Any, length: int) -> torch.Tensor:
        self.check(front_end)
        dev = next(self.model.parameters()).device
        logmel = mel_bmf.float().to(dev) * front_end.half_range + front_end.center  # ln(max(mel, floor))
        squeeze = logmel.dim() == 2
        wave = self.model.decode(logmel[None] if squeeze else logmel)
        if wave.shape[-1] >= length:
            wave = wave[..., :length]
        else:
            wave = torch.nn.functional.pad(wave, (0, length - wave.shape[-1]))
        wave = wave.clamp(-1.0, 1.0).to(mel_bmf.device)
        return wave[0] if squeeze else wave


def _same_float(a: Any, b: Any) -> bool:
    try:
        return abs(float(a) - float(b)) < 1e-9
    except (TypeError, ValueError):
        return False


def load_vocoder(spec: str | None, device: str | torch.device = "cpu") -> GriffinLimVocoder | VocosVocoder:
    """``griffin-lim`` (also for None) or ``vocos:<dir-or-id>``."""
    kind, target = parse_vocoder(spec)
    return GriffinLimVocoder() if kind == GRIFFIN_LIM else VocosVocoder(target, device)


def save_vocos(
    directory: str | Path,
    sample_rate: int = 24000,
    n_fft: int = 1024,
    hop: int = 256,
    n_mels: int = 100,
    dim: int = 512,
    intermediate_dim: int = 1536,
    num_layers: int = 8,
    seed: int = 0,
) -> Path:
    """Write a randomly initialised Vocos (``config.yaml`` + ``pytorch_model.bin``, the hub layout) to
    ``directory``: the starting point for training one, and what the tests vocode with offline."""
    import yaml
    from vocos import Vocos

    cfg = {
        "feature_extractor": {
            "class_path": "vocos.feature_extractors.MelSpectrogramFeatures",
            "init_args": {
                "sample_rate": sample_rate,
                "n_fft": n_fft,
                "hop_length": hop,
                "n_mels": n_mels,
                "padding": "center",
            },
        },
        "backbone": {
            "class_path": "vocos.models.VocosBackbone",
            "init_args": {
                "input_channels": n_mels,
                "dim": dim,
                "intermediate_dim": intermediate_dim,
                "num_layers": num_layers,
            },
        },
        "head": {
            "class_path": "vocos.heads.ISTFTHead",
            "init_args": {"dim": dim, "n_fft": n_fft, "hop_length": hop, "padding": "center"},
        },
    }
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    torch.manual_seed(seed)
    model = Vocos.from_hparams(str(out / "config.yaml"))
    torch.save(model.state_dict(), out / "pytorch_model.bin")
    return out
