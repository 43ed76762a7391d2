"""Audio of any length through the Tokenizer: windows in time order, overlap-add reassembly, exact lengths,
and the Vocos vocoder option (a small randomly initialised Vocos saved to a directory; nothing downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.eval

SHARED = Path(os.environ.get("REVQ_SHARED", Path(__file__).resolve().parents[3] / "shared"))
SR = 16000


def real_speech(seconds: float) -> torch.Tensor:
    """``seconds`` of real speech at 16 kHz: the shared prompts concatenated (skips without ../shared)."""
    import soundfile as sf

    files = sorted((SHARED / "data" / "speech16k").glob("*.flac"))
    if not files:
        pytest.skip(f"../shared speech not found at {SHARED / 'data' / 'speech16k'} (set REVQ_SHARED)")
    need, parts = int(seconds * SR), []
    for f in files:
        data, sr = sf.read(str(f), dtype="float32", always_2d=True)
        assert sr == SR
        parts.append(data.mean(axis=1))
        if sum(len(p) for p in parts) >= need:
            break
    return torch.from_numpy(np.concatenate(parts)[:need].copy())


def make_tokenizer(root: Path, front_end: dict | None = None, vocoder: str | None = None):
    """A tiny (untrained) mel VAE + ReVQ model: 128-frame windows (latent (4, 32)), T=16 ids per window."""
    from revq_ray.core.model import ReVQModel
    from revq_ray.tokenizer import Tokenizer
    from revq_ray.vae import load_vae
    from revq_ray.vae.audio import MelFrontEnd
    from revq_ray.vae.builtin import MelVAE

    torch.manual_seed(0)
    fe = front_end or MelFrontEnd(sample_rate=SR, n_fft=512, hop=128, n_mels=32, f_max=8000.0).config()
    MelVAE(
        n_mels=fe["n_mels"], frames=128, width=16, latent_channels=4, front_end=fe, vocoder=vocoder
    ).save_pretrained(root / "vae")
    vae = load_vae(f"builtin:{root / 'vae'}")
    model = ReVQModel(
        list(vae.latent_shape),
        {
            "quantizer": {"tokens": 16, "codebook_size": 16},
            "rectifier": {"type": "cnn", "width": 16, "depth": 1},
        },
    )
    z = torch.randn(64, *vae.latent_shape)
    model.standardizer.fit([z])
    model.init_codebook(z)
    return Tokenizer(vae, model.eval(), f"builtin:{root / 'vae'}")


def test_overlap_add_is_exact_on_a_continuous_signal():
    """Windows and straddling windows cut from one signal blend back into exactly that signal."""
    from revq_ray.audio_tokens import overlap_add, split_windows

    x = torch.randn(3, 5 * 64)
    a = split_windows(x, 64, pad_value=0.0)
    b = split_windows(x[:, 32:], 64, pad_value=0.0)[:4]
    torch.testing.assert_close(overlap_add(a, b, 32), x)
    # borders: a step between windows of A is replaced by B there (weight of A is ~0 at a border)
    steps = torch.arange(5.0).repeat_interleave(64)[None]
    smooth = overlap_add(
        split_windows(steps, 64, 0.0), split_windows(steps[:, 32:] * 0 + 7.0, 64, 0.0)[:4], 32
    )
    assert abs(float(smooth[0, 64]) - 7.0) < 0.01 and abs(float(smooth[0, 32]) - 0.0) < 0.01


def test_twenty_seconds_of_real_speech_round_trip(tmp_path):
    tok = make_tokenizer(tmp_path)
    wave = real_speech(20.0)
    assert wave.numel() == 20 * SR
    ids = tok.encode(wave, sample_rate=SR)
    windows = tok.num_windows(wave.numel())
    assert windows == -(-(1 + wave.numel() // 128) // 128)  # ceil(frames / 128 frames per window) = 20
    assert ids.item(0).numel() == windows * tok.tokens and int(ids.windows[0]) == windows
    assert int(ids.lengths[0]) == 20 * SR and ids.window_samples == 128 * 128
    assert int(ids.ids.min()) >= 0 and int(ids.ids.max()) < tok.codebook_size
    out = tok.decode(ids)
    assert out.shape == (1, 20 * SR) and torch.isfinite(out).all() and float(out.abs().max()) <= 1.0
    # window w's ids are the ids of the w-th 128-frame slice of the whole recording's mel
    mel = tok.vae.front_end(wave)
    first = tok.encode_latents(tok.vae.encode(mel[None, :, :128]))
    assert torch.equal(first[0], ids.item_windows(0)[0])


def test_a_batch_of_different_lengths_and_rates(tmp_path):
    import torchaudio

    tok = make_tokenizer(tmp_path)
    long, short = real_speech(5.0), real_speech(0.7)
    ids = tok.encode([long, short], sample_rate=SR)
    assert ids.windows.tolist() == [tok.num_windows(long.numel()), 1]
    assert (ids.ids[1, tok.tokens :] == -1).all()  # padding past the short recording's one window
    waves = tok.decode_audio(ids)
    assert [w.numel() for w in waves] == [long.numel(), short.numel()]
    assert tok.decode(ids).shape == (2, long.numel())
    # 8 kHz input: resampled in, and back to 8 kHz at the input's exact length on request
    at8k = torchaudio.functional.resample(short, SR, 8000)[:5555]
    ids8 = tok.encode(at8k, sample_rate=8000)
    assert tok.decode(ids8, sample_rate=8000).shape == (1, 5555)
    assert tok.decode(ids8).shape == (1, int(ids8.lengths[0]))
    # a plain (B, W * T) tensor decodes to whole windows
    plain = tok.decode(ids.ids[:1, : 2 * tok.tokens])
    assert plain.shape == (1, 2 * tok.window_samples - 128)


def test_vocos_vocoder_from_a_local_directory(tmp_path):
    pytest.importorskip("vocos", reason="the vocos package is not installed (pip install vocos)")
    from revq_ray.tokenizer import Tokenizer
    from revq_ray.vae.vocoder import front_end_for, save_vocos

    voc_dir = save_vocos(tmp_path / "vocos", sample_rate=SR, n_fft=512, hop=128, n_mels=32, dim=32,
                         intermediate_dim=64, num_layers=1)  # fmt: skip
    spec = f"vocos:{voc_dir}"
    fe = front_end_for(spec)
    assert (fe["sample_rate"], fe["n_fft"], fe["hop"], fe["n_mels"], fe["mel_scale"]) == (
        SR,
        512,
        128,
        32,
        "htk",
    )
    tok = make_tokenizer(tmp_path, front_end=fe, vocoder=spec)
    assert type(tok.vocoder).__name__ == "VocosVocoder" and tok.sample_rate == SR
    wave = real_speech(3.0)
    ids = tok.encode(wave, sample_rate=SR)
    out = tok.decode(ids)
    assert out.shape == (1, wave.numel()) and torch.isfinite(out).all()
    # our front end computes exactly the features Vocos' own extractor does
    feats = tok.vocoder.model.feature_extractor(wave[None])
    ours = tok.vae.front_end(wave[None]) * tok.vae.front_end.half_range + tok.vae.front_end.center
    torch.testing.assert_close(ours, feats, atol=1e-4, rtol=1e-4)
    # the bundle keeps the choice; a mel VAE with another front end is refused with the fix named
    tok.save_pretrained(tmp_path / "bundle")
    again = Tokenizer.from_pretrained(tmp_path / "bundle")
    assert again.decode(ids).shape == (1, wave.numel())
    other = make_tokenizer(tmp_path / "gl")
    other.vocoder_override = spec
    with pytest.raises(ValueError, match="front end differs"):
        other.decode(other.encode(wave, sample_rate=SR))


def test_tokenize_and_detokenize_an_image_folder(tmp_path, tiny_assets):
    from PIL import Image

    from revq_ray.cli import main as cli
    from revq_ray.tokenize import read_tokens
    from revq_ray.tokenizer import Tokenizer

    tok = Tokenizer.build(tiny_assets["vae_spec"], tiny_assets["model_dir"])
    tok.save_pretrained(tmp_path / "bundle")
    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    for i, img in enumerate(tiny_assets["images"][:6]):
        Image.fromarray(img).save(src / ("sub" if i % 2 else "") / f"p{i}.png")
    (src / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "tokens"
    argv = ["--model", str(tmp_path / "bundle"), "--input", str(src), "--output", str(out)]
    # 1 unreadable of 7 is over the default 10% limit (exit 1, manifest written); the flag accepts it
    assert cli(["tokenize", *argv, "--ray", "never"]) == 1
    assert cli(["tokenize", *argv, "--ray", "never", "--max-skip-fraction", "0.2"]) == 0
    manifest, items = read_tokens(out)
    assert manifest["count"] == 6 and len(manifest["skipped"]) == 1 and "broken.png" in manifest["skipped"][0]
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["tokens"] == 4
    for meta, ids in items:
        assert ids.shape == (4,) and (out / meta["file"]).is_file()
        with Image.open(src / meta["name"]) as im:
            assert ids.tolist() == tok.encode(im.convert("RGB"))[0].tolist()
    media = tmp_path / "media"
    assert cli(["detokenize", "--input", str(out), "--output", str(media), "--ray", "never"]) == 0
    pngs = sorted(p.relative_to(media).as_posix() for p in media.rglob("*.png"))
    assert pngs == ["p0.png", "p2.png", "p4.png", "sub/p1.png", "sub/p3.png", "sub/p5.png"]
    with Image.open(media / "p0.png") as im:
        assert im.size == (16, 16)
    assert (
        cli(["tokenize", "--model", str(tmp_path / "nothing"), "--input", str(src), "--output", str(out)])
        == 2
    )


@pytest.mark.data
@pytest.mark.slow
def test_tokenize_audio_through_ray_data_into_shards_and_back(tmp_path, ray_local):
    import soundfile as sf

    from revq_ray.cli import main as cli
    from revq_ray.tokenize import read_tokens

    tok = make_tokenizer(tmp_path)
    tok.save_pretrained(tmp_path / "bundle")
    src = tmp_path / "speech"
    src.mkdir()
    lengths = {"a.wav": 4.3, "b.flac": 1.1, "c.wav": 2.0}
    for name, seconds in lengths.items():
        sf.write(str(src / name), real_speech(seconds).numpy(), SR)
    (src / "d.wav").write_bytes(b"RIFF....garbage")
    out = tmp_path / "tokens"
    argv = ["--model", str(tmp_path / "bundle"), "--input", str(src), "--output", str(out)]
    assert (
        cli(
            [
                "tokenize",
                *argv,
                "--ray",
                "always",
                "--workers",
                "1",
                "--format",
                "shards",
                "--shard-size",
                "2",
                "--max-skip-fraction",  # 1 unreadable of 4: skipped and counted, accepted here
                "0.3",
            ]
        )
        == 0
    )
    manifest, items = read_tokens(out)
    assert manifest["shards"] == ["tokens-000000.tar", "tokens-000001.tar"] and len(manifest["skipped"]) == 1
    got = {meta["name"]: (meta, ids) for meta, ids in items}
    assert sorted(got) == sorted(lengths)
    for name, seconds in lengths.items():
        meta, ids = got[name]
        n = int(seconds * SR)
        assert meta["length"] == n and ids.shape == (tok.num_windows(n), tok.tokens) == (meta["windows"], 16)
    media = tmp_path / "media"
    assert cli(["detokenize", "--input", str(out), "--output", str(media), "--ray", "never"]) == 0
    for name, seconds in lengths.items():
        info = sf.info(str(media / name.replace(".flac", ".wav")))
        assert info.samplerate == SR and info.frames == int(seconds * SR)


def test_mel_vae_trained_for_vocos_takes_the_vocoders_front_end(tmp_path):
    pytest.importorskip("vocos", reason="the vocos package is not installed (pip install vocos)")
    import soundfile as sf

    from revq_ray.vae import load_vae
    from revq_ray.vae.train import VAETrainConfig, train_vae
    from revq_ray.vae.vocoder import save_vocos

    voc = save_vocos(tmp_path / "vocos", sample_rate=SR, n_fft=512, hop=128, n_mels=24, dim=16,
                     intermediate_dim=32, num_layers=1)  # fmt: skip
    src = tmp_path / "speech"
    src.mkdir()
    for i in range(3):
        sf.write(
            str(src / f"{i}.wav"), real_speech(1.0 + i).numpy(), 22050
        )  # resampled to the vocoder's rate
    cfg = VAETrainConfig(
        input=str(src), modality="audio", output=str(tmp_path / "vae"), vocoder=f"vocos:{voc}",
        crop_seconds=0.5, width=8, latent_channels=2, steps=2, batch_size=2, val_items=0, device="cpu",
    )  # fmt: skip
    train_vae(cfg)
    vae = load_vae(f"builtin:{tmp_path / 'vae'}")
    fe = vae.front_end.config()
    assert (fe["sample_rate"], fe["hop"], fe["n_mels"], fe["mel_scale"], fe["norm"]) == (
        SR,
        128,
        24,
        "htk",
        None,
    )
    assert vae.vocoder_spec == f"vocos:{voc}" and vae.input_shape == (24, 64)  # 0.5 s at 16 kHz / 128 = 62.5
