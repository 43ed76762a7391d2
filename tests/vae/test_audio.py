"""The mel front end, crops and the Griffin-Lim inverse on real speech."""

from __future__ import annotations

import pytest
import soundfile as sf
import torch

from revq_ray.vae.audio import MelFrontEnd, crop_or_pad, frame_mask, load_audio, mel_to_wave, save_wav

pytestmark = pytest.mark.data


def _envelope(wave: torch.Tensor, frame: int = 256) -> torch.Tensor:
    n = wave.shape[0] // frame * frame
    return wave[:n].view(-1, frame).pow(2).mean(1).sqrt()


def test_mel_front_end_and_griffin_lim_on_real_speech(shared_dir, tmp_path):
    path = shared_dir / "data" / "speech16k" / "vm-instructions.flac"
    assert sf.info(str(path)).samplerate == 16000
    fe = MelFrontEnd()  # 22,050 Hz, n_fft 1024, hop 256, 80 mels
    wave, sr = load_audio(path, fe.sample_rate)
    assert sr == 22050 and wave.dim() == 1
    assert abs(wave.shape[0] - round(sf.info(str(path)).frames * 22050 / 16000)) <= 1
    wave = wave[: 2 * sr]
    n = wave.shape[0]

    mel = fe(wave)
    assert mel.shape == (80, 1 + n // 256) == (80, fe.num_frames(n))
    # Fixed-constant normalization: silence floor at -1, speech stays roughly within [-1, 1].
    assert mel.min() >= -1.0 - 1e-6 and mel.max() < 1.2 and -0.8 < mel.mean() < 0.5
    assert fe(wave[None]).shape == (1, 80, 1 + n // 256)

    rebuilt = mel_to_wave(mel, fe, n_iter=16, length=n)
    assert rebuilt.shape == (n,)
    corr = torch.corrcoef(torch.stack([_envelope(wave), _envelope(rebuilt)]))[0, 1]
    assert corr > 0.8, f"Griffin-Lim envelope correlation {corr:.3f}"
    assert fe.mel_to_wave(mel, n_iter=4).shape == ((mel.shape[-1] - 1) * 256,)

    out = save_wav(tmp_path / "rebuilt.wav", rebuilt, sr)
    back, back_sr = sf.read(str(out), dtype="float32")
    assert back_sr == sr and back.shape == (n,)


def test_crop_or_pad_and_masks():
    wave = torch.arange(1, 11, dtype=torch.float32)
    w, m = crop_or_pad(wave, 4, offset=3)
    assert w.tolist() == [4, 5, 6, 7] and m.all()
    w, m = crop_or_pad(wave, 16)
    assert w.shape == (16,) and w[:10].equal(wave) and not w[10:].any()
    assert m.sum() == 10 and m[:10].all()
    g = torch.Generator().manual_seed(0)
    w, m = crop_or_pad(wave, 5, offset=None, generator=g)
    assert w.shape == (5,) and (w[1:] - w[:-1] == 1).all()
    fm = frame_mask(crop_or_pad(torch.ones(1000), 2048)[1], 256)
    assert fm.shape == (1 + 2048 // 256,) and fm[:4].all() and not fm[4:].any()


def test_load_audio_mixes_down_stereo(tmp_path):
    t = torch.linspace(0, 1, 8000)
    stereo = torch.stack([torch.sin(2 * torch.pi * 440 * t), torch.zeros_like(t)], 1).numpy()
    sf.write(str(tmp_path / "st.wav"), stereo, 8000)
    wave, sr = load_audio(tmp_path / "st.wav", 8000)
    assert sr == 8000 and wave.shape == (8000,)
    torch.testing.assert_close(wave, torch.from_numpy(stereo[:, 0]) / 2, atol=1e-4, rtol=0)
    up, _ = load_audio(tmp_path / "st.wav", 16000)
    assert abs(up.shape[0] - 16000) <= 1
