"""Nothing lost, nothing silently wrong on the data side: damaged shards are skipped and counted, an encode
never mixes plans, synthetic data never lands on real files, truncated IDX files and short audio clips are
reported, and huge images are refused before they are decoded. No Ray needed."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from revq_ray.data.shards import ShardWriter, read_manifest

pytestmark = pytest.mark.data

ROOT = Path(__file__).resolve().parents[2]


def _write(out: Path, n: int = 16, shard_size: int = 8) -> None:
    rng = np.random.default_rng(0)
    with ShardWriter(out, shard_size=shard_size) as w:
        for i in range(n):
            w.write(f"k{i:03d}", rng.standard_normal((4, 2, 2)).astype(np.float32))
    w.manifest(vae="test").save(out)


def _truncate_between_members(path: Path, keep: int) -> None:
    """Cut a shard right after its ``keep``-th member (a clean member boundary, no end-of-archive blocks)."""
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    nxt = members[keep]
    data = path.read_bytes()[: nxt.offset]
    path.write_bytes(data)


def test_manifest_records_size_and_sha256_of_each_shard(tmp_path):
    import hashlib

    _write(tmp_path)
    m = read_manifest(tmp_path)
    for s in m.shards:
        data = (tmp_path / s.name).read_bytes()
        assert (s.size, s.sha256) == (len(data), hashlib.sha256(data).hexdigest())


def test_truncated_shard_is_skipped_and_counted_by_readers_and_eval(tmp_path):
    from revq_ray.eval.inputs import read_latents

    _write(tmp_path)
    _truncate_between_members(tmp_path / "shard-000001.tar", keep=4)  # 4 of 8 latents left
    m = read_manifest(tmp_path)
    assert m.count == 8 and [s.name for s in m.shards] == ["shard-000000.tar"]
    assert m.bad_shards and m.bad_shards[0]["path"] == "shard-000001.tar"
    assert "truncated" in m.bad_shards[0]["reason"]
    data = read_latents(tmp_path)
    assert len(data) == 8
    assert len(data.skipped) == 1 and "shard-000001.tar" in data.skipped[0]


def test_damaged_shard_of_the_same_size_is_skipped_whole_by_eval(tmp_path):
    from revq_ray.eval.inputs import read_latents

    _write(tmp_path)
    path = tmp_path / "shard-000000.tar"
    raw = bytearray(path.read_bytes())
    with tarfile.open(path) as tf:
        first = tf.getmembers()[0]
    raw[first.offset_data + 200] ^= 0xFF  # a flipped byte in a latent's payload: same size, other content
    path.write_bytes(bytes(raw))
    data = read_latents(tmp_path)
    assert len(data) == 8 and all(not n.startswith("k00") or n >= "k008" for n in data.names)
    assert any("shard-000000.tar" in s and "sha256" in s for s in data.skipped), data.skipped


def test_synthetic_data_never_overwrites_existing_files(tmp_path):
    from revq_ray.config import load_config
    from revq_ray.data.synthetic import write_synthetic_shards
    from revq_ray.train.plan import ensure_shards, resolve_paths

    cfg = resolve_paths(load_config(ROOT / "configs" / "debug.yaml", [f"output_dir={tmp_path}"]))
    real = Path(cfg.data.shards)  # where data.shards: synthetic writes
    _write(real)
    (real / "manifest.json").unlink()  # an interrupted encode: shards, no manifest yet
    before = (real / "shard-000000.tar").read_bytes()
    with pytest.raises(ValueError, match=r"not empty \(shard-000000.tar.*missing or empty directory"):
        ensure_shards(cfg)
    assert (real / "shard-000000.tar").read_bytes() == before and not (real / "manifest.json").exists()
    write_synthetic_shards(tmp_path / "fresh", 8, (4, 2, 2))  # a missing directory is fine
    (tmp_path / "empty").mkdir()
    write_synthetic_shards(tmp_path / "empty", 8, (4, 2, 2))  # so is an empty one


def test_a_mistyped_shards_path_is_an_error_never_synthetic_data(tmp_path):
    """Issue 25.4: a preset copied from the debug one, with data.shards pointing at a typo, stops naming the
    path; nothing is written there or anywhere under output_dir."""
    from revq_ray.config import load_config
    from revq_ray.train.plan import ensure_shards, resolve_paths

    typo = tmp_path / "latnets"
    cfg = load_config(ROOT / "configs" / "debug.yaml", [f"data.shards={typo}", f"output_dir={tmp_path}/runs"])
    with pytest.raises(FileNotFoundError, match=rf"data.shards={typo}: no manifest.json.*data.shards: synth"):
        ensure_shards(resolve_paths(cfg))
    assert not typo.exists() and not (tmp_path / "runs").exists()
    # Asked for by name, synthetic latents are written once under output_dir and then reused.
    synth = resolve_paths(load_config(ROOT / "configs" / "debug.yaml", [f"output_dir={tmp_path}/runs"]))
    ensure_shards(synth)
    manifest = Path(synth.data.shards) / "manifest.json"
    assert manifest.is_file() and Path(synth.data.shards).parent == tmp_path / "runs" / "synthetic"
    mtime = manifest.stat().st_mtime_ns
    ensure_shards(synth)
    assert manifest.stat().st_mtime_ns == mtime


def _idx_bytes(n_header: int, images: np.ndarray) -> bytes:
    h, w = images.shape[1:]
    header = b"\x00\x00\x08\x03" + b"".join(int(v).to_bytes(4, "big") for v in (n_header, h, w))
    return header + images.tobytes()


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_idx_reads_what_is_present_once(tmp_path, gz):
    import pyarrow.fs as pafs

    from revq_ray.data import sources
    from revq_ray.data.encode import _decode_items
    from revq_ray.data.sources import SourceItem

    path = tmp_path / ("t-idx3-ubyte.gz" if gz else "t-idx3-ubyte")

    def write(images):  # the header promises 10 images, 6 are there
        blob = _idx_bytes(10, images)
        path.write_bytes(gzip.compress(blob)[:-12] if gz else blob)  # gz: cut short, no trailer either

    images = np.random.default_rng(0).integers(0, 255, (6, 8, 8), dtype=np.uint8)
    write(images)
    fs = pafs.LocalFileSystem()
    sources._IDX_CACHE.clear()
    got = sources.read_idx_range(fs, str(path), 0, 10)
    assert got.shape[0] >= 5 and np.array_equal(got, images[: got.shape[0]])
    write(255 - images)  # other pixels on disk: what follows is served from the one read above
    items = [SourceItem(str(path), "idx", i) for i in range(10)]
    settings = {"modality": "image", "input_shape": [3, 8, 8]}
    out = list(_decode_items(fs, items, settings))
    errors = [e for _, e, _ in out]
    assert errors[: got.shape[0]] == [""] * got.shape[0]
    assert all("truncated IDX file" in e for e in errors[got.shape[0] :]), errors
    assert np.allclose(out[0][0][0][0], images[0] / 255.0, atol=1e-6)
    sources._IDX_CACHE.clear()


def test_short_audio_clip_is_flagged(tmp_path):
    import pyarrow.fs as pafs
    import soundfile as sf

    from revq_ray.data.encode import _decode_items
    from revq_ray.data.sources import SourceItem

    sr = 16000
    for name, seconds in (("short.wav", 0.01), ("long.wav", 0.2)):
        buf = io.BytesIO()
        sf.write(buf, np.sin(np.arange(int(sr * seconds)) / 5).astype(np.float32), sr, format="WAV")
        (tmp_path / name).write_bytes(buf.getvalue())
    settings = {
        "modality": "audio",
        "input_kind": "waveform",
        "input_shape": [1, 1600],
        "sample_rate": sr,
        "crop_samples": 1600,
        "min_crop_fraction": 0.25,
    }
    items = [SourceItem(str(tmp_path / n), "file") for n in ("short.wav", "long.wav")]
    out = list(_decode_items(pafs.LocalFileSystem(), items, settings))
    (xs_short, err_short, note_short), (_, err_long, note_long) = out
    assert err_short == "" and len(xs_short) == 1  # still encoded: flagged, not dropped
    assert note_short == "short clip: 10 ms in a 100 ms crop (90% padding)"
    assert err_long == "" and note_long == ""


def test_encode_result_fails_when_nothing_encoded_or_too_many_skipped():
    from revq_ray.data.encode import EncodeResult, check_result
    from revq_ray.data.shards import Manifest, ShardInfo

    bad = [{"path": f"x{i}.png", "reason": "UnidentifiedImageError"} for i in range(3)]
    empty = EncodeResult(Manifest(count=0, latent_shape=[4], skipped=bad), 3, 0, 0, 1.0)
    assert check_result(empty, 0.1).startswith("nothing was encoded: 3 of 3 inputs were skipped")
    some = Manifest(count=7, latent_shape=[4], shards=[ShardInfo("shard-000000.tar", 7)], skipped=bad)
    assert "3 of 10 inputs (30.0%) were skipped" in check_result(EncodeResult(some, 10, 1, 0, 1.0), 0.1)
    assert check_result(EncodeResult(some, 10, 1, 0, 1.0), 0.5) == ""


def test_other_plans_shards_are_refused_and_the_manifest_invalidated_first(tmp_path):
    import pyarrow.fs as pafs

    from revq_ray.data.encode import _Plan, _prepare_output

    _write(tmp_path)
    fs = pafs.LocalFileSystem()
    # another encode's manifest (its plan id differs from this one's)
    plan = _Plan(todo=[{"shard": 0}], done={}, plan_id="mine", num_shards=1, foreign=[])
    with pytest.raises(ValueError, match=r"holds shards of another encode .*manifest.json.*--overwrite"):
        _prepare_output(fs, str(tmp_path), plan, overwrite=False)
    assert (tmp_path / "manifest.json").is_file()  # refused before anything was touched
    _prepare_output(fs, str(tmp_path), plan, overwrite=True)
    assert not (tmp_path / "manifest.json").exists() and not (tmp_path / "shard-000001.tar").exists()
    # a resumed encode of the same plan: the manifest goes before any shard is rewritten
    manifest = json.loads(json.dumps({"format": "x", "extra": {"plan": "mine"}}))
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    _prepare_output(fs, str(tmp_path), plan, overwrite=False)
    assert not (tmp_path / "manifest.json").exists() and (tmp_path / "shard-000000.tar").is_file()


def test_huge_image_is_refused_before_it_is_decoded(tmp_path):
    """A valid 10000x10000 PNG (a few hundred KB on disk) used to decode at ~3 GB; now it is refused from its
    header, in a process that stays small."""
    import PIL.Image

    big = tmp_path / "big.png"
    PIL.Image.new("L", (10000, 10000), 128).save(big, optimize=False)
    code = (
        "import sys; from revq_ray.data.sources import decode_image\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "try:\n    decode_image(data, 64); print('decoded')\n"
        "except ValueError as err:\n    print('refused:', err)\n"
        # VmHWM: this process's own peak (ru_maxrss would include the forking pytest's, kept across exec)
        "hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0].split()[1]\n"
        "print('maxrss_mb', int(hwm) // 1024)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(big)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert "refused:" in proc.stdout and "10000x10000" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    rss = int(proc.stdout.split("maxrss_mb")[1])
    assert rss < 1500, rss


def test_large_jpeg_decodes_at_reduced_scale(tmp_path):
    import PIL.Image

    from revq_ray.vae.images import open_image_capped

    buf = io.BytesIO()
    PIL.Image.new("RGB", (2048, 2048), (10, 200, 30)).save(buf, format="JPEG")
    img = open_image_capped(io.BytesIO(buf.getvalue()), 64, max_pixels=1_000_000)
    assert max(img.size) <= 512 and min(img.size) >= 64  # JPEG draft: decoded at 1/4 scale or less
    buf = io.BytesIO()
    PIL.Image.new("RGB", (2048, 2048)).save(buf, format="PNG")
    with pytest.raises(ValueError, match="2048x2048 .* over the cap"):
        open_image_capped(io.BytesIO(buf.getvalue()), 64, max_pixels=1_000_000)
