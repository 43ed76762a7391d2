"""A saved model's config.json is checked against its weights' header before anything is allocated."""

from __future__ import annotations

import json
import resource
import time

import pytest

from revq_ray.config import ModelConfig, parse_config
from revq_ray.core.model import ReVQModel

pytestmark = pytest.mark.core


def _save(tmp_path, qtype: str):
    cfg = parse_config(
        {
            "quantizer": {"type": qtype, "tokens": 16, "codebook_size": 8},
            "rectifier": {"type": "cnn", "width": 8},
        },
        ModelConfig,
    )
    ReVQModel.from_config([4, 4, 4], cfg).save_pretrained(str(tmp_path))
    return json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize("qtype", ["revq", "simvq", "gq"])
def test_huge_codebook_size_in_config_fails_before_allocating(tmp_path, qtype):
    conf = _save(tmp_path, qtype)
    conf["model"]["quantizer"]["codebook_size"] = 2**31  # 4.4 TB of codebook if built
    (tmp_path / "config.json").write_text(json.dumps(conf))
    rss0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.time()
    with pytest.raises(ValueError, match=r"codebook_size=2147483648, model.safetensors holds 8 codes"):
        ReVQModel.from_pretrained(str(tmp_path))
    assert time.time() - t0 < 30
    assert (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 512 * 1024
    )  # KiB: nothing big allocated


def test_other_shape_changes_name_the_tensor(tmp_path):
    conf = _save(tmp_path, "revq")
    conf["model"]["rectifier"]["width"] = 16
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(
        ValueError, match=r"config.json does not match model.safetensors \(rectifier\..*gives"
    ):
        ReVQModel.from_pretrained(str(tmp_path))
