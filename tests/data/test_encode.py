"""The encode pipeline end to end with a real local Ray and real VAEs: image folders, IDX, tars of media and
audio, compared with a direct VAE encode; skipping, statistics and resume."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from revq_ray.data.encode import encode_to_shards
from revq_ray.data.reader import latent_dataset
from revq_ray.data.shards import read_manifest, safe_key

pytestmark = pytest.mark.data

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("REVQ_SHARED", ROOT.parent / "shared"))
HAVE_SHARED = (SHARED / "README.md").is_file()


def _real_images(n: int) -> list[np.ndarray]:
    """Real photos: Fashion-MNIST (28x28 gray) when ../shared is present, else scikit-image's bundled ones."""
    if HAVE_SHARED:
        with gzip.open(SHARED / "data/fashion-mnist/train-images-idx3-ubyte.gz") as f:
            data = f.read(16 + 784 * n)
        return list(np.frombuffer(data, np.uint8, offset=16).reshape(n, 28, 28))
    import skimage.data

    photos = [skimage.data.camera(), skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
    photos += [skimage.data.coins(), skimage.data.logo(), skimage.data.rocket(), skimage.data.moon()]
    out = []
    for i in range(n):  # crops of different sizes of the bundled photos: gray, RGB and RGBA
        p = photos[i % len(photos)]
        s = 96 + 16 * (i // len(photos))
        out.append(np.ascontiguousarray(p[:s, : s + 8 * (i % 3)]))
    return out


@pytest.fixture(scope="module")
def image_vae(tmp_path_factory):
    from revq_ray.vae.builtin import ImageConvVAE

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("vae_img") / "vae"
    ImageConvVAE(image_size=32, width=16, latent_channels=4).save_pretrained(str(d))
    return f"builtin:{d}"


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    import PIL.Image

    d = tmp_path_factory.mktemp("images")
    (d / "sub").mkdir()
    for i, img in enumerate(_real_images(20)):
        ext = "png" if i % 4 else "jpg"
        target = d / ("sub" if i % 2 else "") / f"img.{i:03d}.{ext}"
        im = PIL.Image.fromarray(img)
        (im.convert("RGB") if ext == "jpg" else im).save(target)
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (d / "notes.txt").write_text("ignored: not an image")
    return d


def _read_back(out) -> dict[str, dict[str, np.ndarray]]:
    return {r["key"]: r for r in latent_dataset(out, shuffle_files=False).take_all()}


def test_image_folder_matches_direct_encode_and_stats(ray_local, image_vae, image_dir, tmp_path):
    import PIL.Image

    from revq_ray.vae import load_vae
    from revq_ray.vae.images import to_vae_input

    out = tmp_path / "out"
    res = encode_to_shards(str(image_dir), image_vae, str(out), shard_size=8, batch_size=4, num_actors=2)
    m = read_manifest(out)
    assert res.manifest == m
    assert m.count == 20 and m.has_logvar and m.latent_shape == [4, 4, 4] and m.input_shape == [3, 32, 32]
    assert [s.count for s in m.shards] == [7, 8, 5]  # 21 inputs (one broken) cut by sorted order into 8s
    assert len(m.skipped) == 1 and m.skipped[0]["path"].endswith("broken.png") and m.skipped[0]["reason"]

    rows = _read_back(out)
    assert len(rows) == 20
    vae = load_vae(image_vae, image_size=32)
    files = sorted(p for p in image_dir.rglob("img.*"))
    x = torch.stack([to_vae_input(PIL.Image.open(p), 32) for p in files])
    post = vae.posterior(x)
    by_name = {k[9:]: r for k, r in rows.items()}
    for i, p in enumerate(files):
        r = by_name[safe_key(str(p.relative_to(image_dir).with_suffix("")), 60)]
        np.testing.assert_allclose(r["latent"], post.mean[i].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(r["logvar"], post.logvar[i].numpy(), rtol=1e-4, atol=1e-5)

    # Per-element statistics merged from per-shard stats == a direct computation over what was stored.
    z = torch.from_numpy(np.stack([r["latent"] for r in rows.values()])).double()
    stats = m.running_stats()
    assert stats.count == 20
    torch.testing.assert_close(stats.mean, z.mean(0))
    torch.testing.assert_close(stats.var, z.var(0, unbiased=False))


def test_resume_keeps_finished_shards(ray_local, image_vae, image_dir, tmp_path):
    out = tmp_path / "out"
    first = encode_to_shards(str(image_dir), image_vae, str(out), shard_size=6, logvar=False, progress=False)
    assert [s.name for s in first.manifest.shards] == [f"shard-00000{i}.tar" for i in range(4)]
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    # Simulate a crash: shard 2 never finished (a stray temp file instead), and no manifest was written.
    (out / "shard-000002.tar").unlink()
    (out / "manifest.json").unlink()
    (out / "shard-000002.tar.tmp-123-abcd").write_bytes(b"half a shard")
    second = encode_to_shards(str(image_dir), image_vae, str(out), shard_size=6, logvar=False, progress=False)
    assert second.shards_kept == 3 and second.shards_written == 1
    for name, t in mtimes.items():
        if not name.startswith("shard-000002"):
            assert (out / name).stat().st_mtime_ns == t, f"{name} was rewritten"
    assert (out / "shard-000002.tar").is_file() and not list(out.glob("*.tmp-*"))
    m = read_manifest(out)
    assert m.count == first.manifest.count and m.shards == first.manifest.shards
    torch.testing.assert_close(m.running_stats().mean, first.manifest.running_stats().mean)
    assert len(m.skipped) == 1
    # A different setting (dtype) changes every shard's plan: that is another encode, refused before anything
    # is written; with overwrite nothing is wrongly kept.
    with pytest.raises(ValueError, match="holds shards of another encode.*--overwrite"):
        encode_to_shards(str(image_dir), image_vae, str(out), shard_size=6, dtype="float16", progress=False)
    assert (
        read_manifest(out).dtype == "float32"
        and (out / "shard-000000.tar").stat().st_mtime_ns == mtimes["shard-000000.tar"]
    )
    third = encode_to_shards(
        str(image_dir), image_vae, str(out), shard_size=6, dtype="float16", progress=False, overwrite=True
    )
    assert third.shards_kept == 0 and read_manifest(out).dtype == "float16"


def test_tar_of_media_input(ray_local, image_vae, image_dir, tmp_path):
    tar_path = tmp_path / "media" / "part-0.tar"
    tar_path.parent.mkdir()
    files = sorted(image_dir.rglob("img.*"))[:6]
    with tarfile.open(tar_path, "w") as tf:
        for i, p in enumerate(files):
            tf.add(p, arcname=f"sample{i:02d}{p.suffix}")
            data = b"label"
            info = tarfile.TarInfo(f"sample{i:02d}.cls")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    res = encode_to_shards(
        str(tar_path.parent), image_vae, str(tmp_path / "out"), shard_size=4, progress=False
    )
    assert res.manifest.count == 6 and res.manifest.source == str(tar_path.parent)
    import PIL.Image

    from revq_ray.vae import load_vae
    from revq_ray.vae.images import to_vae_input

    x = torch.stack([to_vae_input(PIL.Image.open(p), 32) for p in files])
    z = load_vae(image_vae, image_size=32).encode(x)
    got = _read_back(tmp_path / "out")
    for i in range(len(files)):
        key = next(k for k in got if k.endswith(f"part-0_sample{i:02d}"))
        np.testing.assert_allclose(got[key]["latent"], z[i].numpy(), rtol=1e-4, atol=1e-5)


def _speech_or_synth(d: Path) -> list[Path]:
    """Real speech (shared) copied into ``d``, else synthesized sine / chirp clips written with soundfile."""
    import soundfile as sf

    if HAVE_SHARED:
        import shutil

        src = sorted((SHARED / "data/speech16k").glob("*.flac"), key=lambda p: p.stat().st_size)
        picks = [src[40], src[120], src[200]]  # short prompts, a few tenths of a second to ~1 s
        return [Path(shutil.copy(p, d / p.name)) for p in picks]
    t = np.arange(int(0.7 * 22050)) / 22050
    out = []
    for i, f0 in enumerate((220.0, 440.0)):
        wave = 0.5 * np.sin(2 * np.pi * (f0 + 300 * i * t) * t)  # a tone and a chirp
        sf.write(d / f"clip{i}.wav", wave.astype(np.float32), 22050)
        out.append(d / f"clip{i}.wav")
    sf.write(d / "stereo48k.wav", np.stack([wave, wave], 1)[:20000].astype(np.float32), 48000)
    out.append(d / "stereo48k.wav")
    return out


def test_audio_folder_matches_direct_encode(ray_local, tmp_path):
    from revq_ray.vae import load_vae
    from revq_ray.vae.audio import MelFrontEnd, load_audio
    from revq_ray.vae.builtin import MelVAE

    sr = 16000 if HAVE_SHARED else 22050
    fe = MelFrontEnd(sample_rate=sr, n_fft=512, hop=128, n_mels=32, f_max=7000.0)
    torch.manual_seed(0)
    vdir = tmp_path / "melvae"
    MelVAE(n_mels=32, frames=32, width=32, latent_channels=4, front_end=fe.config()).save_pretrained(
        str(vdir)
    )
    spec = f"builtin:{vdir}"
    audio = tmp_path / "audio"
    audio.mkdir()
    clips = _speech_or_synth(audio)
    (audio / "corrupt.flac").write_bytes(b"fLaC but nothing after")

    res = encode_to_shards(
        str(audio), spec, str(tmp_path / "out"), shard_size=2, batch_size=8, progress=False
    )
    m = res.manifest
    assert m.modality == "audio" and m.latent_shape == [4, 8] and m.input_shape == [32, 32]
    assert len(m.skipped) == 1 and m.skipped[0]["path"].endswith("corrupt.flac")
    crop = m.extra["audio"]["crop_samples"]
    assert crop == 31 * 128  # (frames - 1) * hop: exactly 32 mel frames per crop

    # Direct: fixed crops (last one zero-padded; a tail under 1/4 crop dropped), mel, VAE posterior mean.
    vae = load_vae(spec)
    rows = _read_back(tmp_path / "out")
    total = 0
    for clip in sorted(clips):
        wave, _ = load_audio(clip, sr)
        starts = list(range(0, len(wave), crop))
        if len(starts) > 1 and len(wave) - starts[-1] < crop / 4:
            starts.pop()
        crops = torch.stack(
            [torch.nn.functional.pad(wave[s : s + crop], (0, crop - len(wave[s : s + crop]))) for s in starts]
        )
        z = vae.encode(fe(crops))
        keys = sorted(k for k in rows if safe_key(clip.stem, 60) in k)
        assert len(keys) == len(starts)
        for j, k in enumerate(keys):
            np.testing.assert_allclose(rows[k]["latent"], z[j].numpy(), rtol=1e-4, atol=1e-4)
        total += len(starts)
    assert m.count == total


def test_idx_through_cli_with_taef2(ray_local, shared_dir, tmp_path):
    from revq_ray.encode import main
    from revq_ray.vae import load_vae
    from revq_ray.vae.images import read_idx_images, to_vae_input

    idx = shared_dir / "data/fashion-mnist/train-images-idx3-ubyte.gz"
    spec = f"taesd:{shared_dir / 'models/taef2'}"
    out = tmp_path / "fm"
    argv = ["--input", str(idx), "--vae", spec, "--output", str(out), "--limit", "12", "--image-size", "64"]
    assert main(argv + ["--shard-size", "5", "--batch-size", "6", "--num-actors", "2"]) == 0
    m = read_manifest(out)
    assert m.count == 12 and m.latent_shape == [32, 8, 8] and not m.has_logvar and m.vae == spec
    assert [s.count for s in m.shards] == [5, 5, 2]
    rows = _read_back(out)
    vae = load_vae(spec, image_size=64)
    imgs = read_idx_images(idx, limit=12)
    z = vae.encode(torch.stack([to_vae_input(im, 64) for im in imgs]))
    for i in range(12):
        np.testing.assert_allclose(rows[f"{i:08d}"]["latent"], z[i].numpy(), rtol=1e-4, atol=1e-4)
    assert main(["--input", str(tmp_path / "nothing"), "--vae", spec, "--output", str(out)]) == 2


def test_actors_that_leave_no_cpu_for_readers_are_refused(ray_local, image_vae, image_dir, tmp_path):
    # 8 one-CPU actors on this 8-CPU Ray would leave no CPU for a read task: Ray Data would wait forever,
    # silently (seen: `revq-ray encode --num-actors 2` on a 2-core machine). It must fail at once instead.
    with pytest.raises(ValueError, match=r"num_actors=8 x cpus_per_actor=1.0 leave no CPU.*--num-cpus"):
        encode_to_shards(str(image_dir), image_vae, str(tmp_path / "out"), num_actors=8, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
