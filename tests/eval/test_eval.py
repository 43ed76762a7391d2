"""python -m revq_ray.eval on a tiny model: metrics.json, report.md and PNGs for every input kind."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest
from PIL import Image

from revq_ray.eval.evaluate import main

pytestmark = pytest.mark.eval


def _check_png(path) -> None:
    assert path.is_file(), path
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
        assert np.asarray(im.convert("L")).std() > 1  # not a blank canvas


def test_eval_image_folder_and_run_dir(tiny_assets, run_dir_from, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, a in enumerate(tiny_assets["images"][:20]):
        Image.fromarray(a).save(folder / f"img_{i:03d}.png")
    (folder / "broken.png").write_bytes(b"not a png")  # skipped and counted, never fatal
    run = run_dir_from(tiny_assets["model_dir"], vae_spec=tiny_assets["vae_spec"])
    out = tmp_path / "eval"
    # The VAE comes from the run's config.yaml; the model from run/export/best.
    assert main(["--model", str(run), "--input", str(folder), "--output", str(out), "--device", "cpu"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["info"]["items"] == 20 and m["info"]["bits_per_sample"] == 16.0
    assert m["info"]["vae"] == tiny_assets["vae_spec"]
    for key in ("vae_only", "tokenized", "tokenized_without_rectifier"):
        assert math.isfinite(m["image"][key]["psnr"]) and -1 <= m["image"][key]["ssim"] <= 1
    lat = m["latent"]
    assert lat["mse_std_without_rectifier"] > 0 and lat["mse_std_with_rectifier"] > 0
    u = m["usage"]
    assert len(u["per_group"]["usage"]) == 4 and 0 < u["mean_usage"] <= 1
    assert 0 < u["entropy_bits"] <= 4 + 1e-6
    # tests run offline with an empty torch hub cache: rFID/LPIPS are absent, and a note names the file
    assert "lpips_tokenized" not in m["summary"] and "rfid_tokenized" not in m["summary"]
    assert any("alexnet-owt-7be5be79.pth" in n for n in m["notes"]) and any(
        "unreadable" in n for n in m["notes"]
    )
    for name in ("grid.png", "usage.png", "curves.png"):
        _check_png(out / name)
    report = (out / "report.md").read_text()
    assert "grid.png" in report and "usage.png" in report and "curves.png" in report and "LPIPS" in report
    assert "psnr_tokenized" in capsys.readouterr().out


def test_eval_idx_with_explicit_vae(tiny_assets, tmp_path):
    # An IDX3 file of real grayscale crops (Fashion-MNIST's format), gray -> RGB by the tokenizer.
    gray = tiny_assets["images"][:12].mean(-1).astype(np.uint8)
    header = bytes([0, 0, 8, 3]) + b"".join(int(v).to_bytes(4, "big") for v in gray.shape)
    idx = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(idx, "wb") as f:
        f.write(header + gray.tobytes())
    out = tmp_path / "eval"
    rc = main(
        ["--model", str(tiny_assets["model_dir"]), "--input", str(idx), "--output", str(out),
         "--vae", tiny_assets["vae_spec"], "--limit", "10", "--device", "cpu"]
    )  # fmt: skip
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["info"]["items"] == 10 and m["info"]["input_kind"] == "idx"
    _check_png(out / "grid.png")
    assert not (out / "curves.png").exists()  # a bare export has no training CSV: noted, not faked
    assert any("curves.png not written" in n for n in m["notes"])


def test_eval_latent_shards(tiny_assets, tmp_path):
    from revq_ray.data.shards import ShardWriter

    shards = tmp_path / "shards"
    z = tiny_assets["latents"].numpy()
    with ShardWriter(shards, shard_size=16) as w:
        w.write_batch([f"{i:04d}" for i in range(len(z))], z)
    w.manifest(vae=tiny_assets["vae_spec"], modality="image").save(shards)
    out = tmp_path / "eval"
    rc = main(
        [
            "--model",
            str(tiny_assets["model_dir"]),
            "--input",
            str(shards),
            "--output",
            str(out),
            "--limit",
            "40",
        ]
    )
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["info"]["items"] == 40 and m["info"]["input_kind"] == "latents"
    assert m["image"]["reference"].startswith("VAE-only")  # no originals in shards
    _check_png(out / "grid.png")
    _check_png(out / "usage.png")


def test_eval_bad_input_errors_clearly(tiny_assets, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = main(
        ["--model", str(tiny_assets["model_dir"]), "--input", str(empty), "--output", str(tmp_path / "o")]
    )
    assert rc == 2 and "expected a latent-shard directory" in capsys.readouterr().err
    rc = main(["--model", str(tmp_path), "--input", str(empty), "--output", str(tmp_path / "o")])
    assert rc == 2 and "holds no trained model" in capsys.readouterr().err
