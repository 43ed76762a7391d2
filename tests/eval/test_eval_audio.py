"""Audio evaluation through a (tiny, untrained) built-in mel VAE: mel/wave metrics, wav files and mel.png."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.eval

SHARED = Path(os.environ.get("REVQ_SHARED", Path(__file__).resolve().parents[3] / "shared"))


def _audio_folder(dst: Path) -> Path:
    """Three real speech prompts from ../shared when present, else three synthetic voiced tones."""
    import soundfile as sf

    dst.mkdir()
    speech = sorted((SHARED / "data" / "speech16k").glob("*.flac"))
    speech = [p for p in speech if sf.info(str(p)).duration > 1.0][:3]
    if speech:
        for p in speech:
            shutil.copy(p, dst / p.name)
        return dst
    sr = 16000
    t = np.arange(sr) / sr
    for i, f0 in enumerate((110.0, 160.0, 220.0)):
        wave = (
            sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 8))
            * 0.2
            * (1 + np.sin(2 * np.pi * 3 * t))
        )
        sf.write(str(dst / f"tone_{i}.wav"), wave.astype(np.float32), sr)
    return dst


def test_eval_audio_folder(tmp_path):
    from revq_ray.core.model import ReVQModel
    from revq_ray.eval.evaluate import main
    from revq_ray.tokenizer import Tokenizer
    from revq_ray.vae import load_vae
    from revq_ray.vae.audio import MelFrontEnd
    from revq_ray.vae.builtin import MelVAE

    torch.manual_seed(0)
    fe = MelFrontEnd(sample_rate=16000, n_fft=512, hop=128, n_mels=32, f_max=8000.0)
    MelVAE(n_mels=32, frames=128, width=16, latent_channels=4, front_end=fe.config()).save_pretrained(
        tmp_path / "vae"
    )
    spec = f"builtin:{tmp_path / 'vae'}"
    vae = load_vae(spec)
    assert vae.latent_shape == (4, 32)
    audio = _audio_folder(tmp_path / "audio")
    tok_model = ReVQModel(
        [4, 32],
        {
            "quantizer": {"tokens": 16, "codebook_size": 16},
            "rectifier": {"type": "cnn", "width": 16, "depth": 1},
        },
    )
    # fit on the eval clips themselves: the point is the plumbing, not the numbers
    from revq_ray.vae.audio import load_audio

    waves = [load_audio(p, 16000)[0] for p in sorted(audio.iterdir())]
    tok0 = Tokenizer(vae, tok_model, spec)
    z = vae.encode(tok0.preprocess(waves, sample_rate=16000))
    tok_model.standardizer.fit([z.repeat(8, 1, 1) + 0.01 * torch.randn(8 * len(z), *z.shape[1:])])
    tok_model.init_codebook(z.repeat(8, 1, 1) + 0.1 * torch.randn(8 * len(z), *z.shape[1:]))
    tok_model.eval().save_pretrained(tmp_path / "model")

    # Tokenizer: waveforms in, waveforms out, at the front end's rate (here resampled from 8 kHz input)
    tok = Tokenizer.build(spec, tmp_path / "model")
    assert tok.modality == "audio" and tok.sample_rate == 16000 and tok.clip_samples == 127 * 128
    import torchaudio

    ids = tok.encode(torchaudio.functional.resample(waves[0], 16000, 8000), sample_rate=8000)
    n = int(ids.lengths[0])  # at 16 kHz: the whole file, in windows of 128 frames, 16 ids each
    assert abs(n - waves[0].numel()) <= 2 and ids.item(0).shape == (16 * tok.num_windows(n),)
    wav = tok.decode(ids)
    assert wav.shape == (1, n) and float(wav.abs().max()) <= 1.0
    with pytest.raises(ValueError, match="sample_rate"):
        tok.encode(waves[0])

    out = tmp_path / "eval"
    assert (
        main(["--model", str(tmp_path / "model"), "--input", str(audio), "--output", str(out), "--vae", spec])
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    assert m["info"]["modality"] == "audio" and m["info"]["items"] == 3
    # whole files: every window of each, metrics per file
    files = m["files"]
    assert [f["name"] for f in files] == sorted(p.name for p in audio.iterdir())
    seconds = [w.numel() / 16000 for w in waves]
    assert [f["seconds"] for f in files] == pytest.approx(seconds)
    assert [f["windows"] for f in files] == [tok.num_windows(w.numel()) for w in waves]
    assert m["info"]["windows"] == sum(f["windows"] for f in files)
    a = m["audio"]
    for key in ("mel_mse_vae_only", "mel_mse_tokenized"):
        assert a[key] > 0 and all(f[key] > 0 for f in files)
    for key in ("vocoder_only", "vae_only", "tokenized"):
        assert np.isfinite(a[f"snr_db_{key}"]) and all(f"stoi_{key}" in f for f in files)
        # PESQ beside STOI (wide-band; NaN where PESQ finds no utterance in a tiny model's output)
        assert f"pesq_{key}" in m["summary"] and all(f"pesq_{key}" in f for f in files)
        assert all(np.isnan(f[f"pesq_{key}"]) or 1.0 <= f[f"pesq_{key}"] <= 4.65 for f in files)
    assert m["info"]["bits_per_second"] == pytest.approx(64 * m["info"]["windows"] / sum(seconds))
    for name in ("mel.png", "usage.png", "original_0.wav", "vae_only_0.wav", "tokenized_0.wav"):
        assert (out / name).is_file(), name
    assert "mel.png" in (out / "report.md").read_text()
