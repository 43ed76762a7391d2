"""The quickstart a newcomer runs first: offline, end to end, resumable (``--fast`` sizes here)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.eval

ROOT = Path(__file__).resolve().parents[2]


def test_photo_crops_are_real_and_reused(tmp_path):
    from PIL import Image

    from revq_ray.quickstart import FAST, _stage_photos

    train, val = _stage_photos(tmp_path, FAST)
    files = sorted(train.glob("*.png"))
    assert len(files) == FAST.train_crops and len(list(val.glob("*.png"))) == FAST.val_crops
    with Image.open(files[0]) as im:
        assert im.size == (FAST.crop, FAST.crop) and im.mode == "RGB"
    assert not any(p.name.startswith(("chelsea", "coffee")) for p in files)  # held out entirely
    mtime = files[0].stat().st_mtime_ns
    _stage_photos(tmp_path, FAST)  # second call reuses
    assert files[0].stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_quickstart_fast_end_to_end(tmp_path):
    out = tmp_path / "qs"
    proc = subprocess.run(
        [sys.executable, "-m", "revq_ray", "quickstart", "--fast", "--output", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    for stage in ("[1/5] photos", "[2/5] vae", "[3/5] encode", "[4/5] train", "[5/5]"):
        assert stage in log, f"no progress line for {stage}"
    assert "revq-ray quickstart summary" in proc.stdout and "report:" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    m = summary["metrics"]
    for key in ("psnr_vae_only", "psnr_tokenized", "latent_mse_std_with_rectifier", "usage_mean"):
        assert math.isfinite(m[key]), key
    for name in ("grid.png", "usage.png", "curves.png", "report.md", "metrics.json"):
        assert (out / "eval" / name).is_file(), name
    assert (out / "train" / "export" / "best" / "model.safetensors").is_file()
    # the Tokenizer bundle is self-contained and usable
    from PIL import Image

    from revq_ray import Tokenizer

    tok = Tokenizer.from_pretrained(out / "tokenizer")
    img = Image.open(sorted((out / "photos" / "val").glob("*.png"))[0])
    ids = tok.encode(img)
    assert ids.shape == (1, summary["sizes"]["tokens"])
    assert tok.decode(ids).shape == (1, 3, summary["sizes"]["image_size"], summary["sizes"]["image_size"])
