"""``revq-ray sample``: a prior's ids -> images through a real (tiny) Tokenizer, PNGs and a grid with a row
per class; the Python API; a class out of range and a tokenizer the prior was not trained on are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from revq_ray.prior.data import tokenizer_model_sha256
from revq_ray.prior.model import PriorSpec, PriorTransformer

pytestmark = pytest.mark.eval


def _prior(tmp_path: Path, tokenizer: Path, num_classes: int = 3) -> Path:
    """A prior over the tokenizer's ids (untrained weights: what is tested is the path from ids to files)."""
    torch.manual_seed(0)
    spec = PriorSpec(tokens=4, codebook_size=16, num_classes=num_classes, d_model=16, layers=1, heads=2)
    meta = {
        "tokenizer": {
            "tokens": 4,
            "codebook_size": 16,
            "model": str(tokenizer),
            "model_sha256": tokenizer_model_sha256(str(tokenizer)),
        },
        "class_names": ["a", "b", "c"][:num_classes],
        "conditional": num_classes > 0,
    }
    return PriorTransformer(spec, meta=meta).save_pretrained(tmp_path / "run" / "export" / "best")


def test_sample_cli_writes_pngs_grid_and_ids(tiny_tokenizers, tmp_path, capsys):
    from PIL import Image

    from revq_ray import cli

    tok = tiny_tokenizers["main"]
    _prior(tmp_path, tok)
    out = tmp_path / "samples"
    args = [
        "sample",
        "--prior",
        str(tmp_path / "run"),
        "--tokenizer",
        str(tok),
        "--classes",
        "0,2",
        "--n",
        "3",
        "--output",
        str(out),
        "--guidance",
        "2",
        "--top-k",
        "5",
        "--temperature",
        "0.9",
        "--seed",
        "7",
    ]
    assert cli.main(args) == 0
    assert "samples/s" in capsys.readouterr().out
    info = json.loads((out / "samples.json").read_text())
    assert info["classes"] == [0, 2] and info["class_names"] == ["a", "c"] and info["samples"] == 6
    assert info["samples_per_s"] > 0
    assert sorted(info["files"]) == sorted(f"{c:03d}_{j:04d}.png" for c in (0, 2) for j in range(3))
    for f in info["files"]:
        assert Image.open(out / f).size == (16, 16)
    grid = Image.open(out / "grid.png")
    assert grid.size == (3 * 18 + 2, 2 * 18 + 2)  # 3 columns, a row per class, 2-pixel gaps
    import numpy as np

    ids = np.load(out / "ids.npy")
    assert ids.shape == (6, 4) and ids.min() >= 0 and ids.max() < 16
    # the same seed gives the same ids from Python
    from revq_ray.prior import load_prior, sample

    again = sample(load_prior(tmp_path / "run"), [0, 2], 3, temperature=0.9, top_k=5, guidance=2, seed=7)
    assert np.array_equal(again.numpy(), ids)
    # and the KV-cache sampler draws what the full-prefix reference draws
    ref = sample(
        load_prior(tmp_path / "run"), [0, 2], 3, temperature=0.9, top_k=5, guidance=2, seed=7, kv_cache=False
    )
    assert torch.equal(ref, again)


def test_sample_refuses_bad_classes_and_other_tokenizers(tiny_tokenizers, tmp_path, capsys):
    from revq_ray.prior.sampling import main

    _prior(tmp_path, tiny_tokenizers["main"])
    base = ["--prior", str(tmp_path / "run"), "--n", "1", "--output", str(tmp_path / "o")]
    assert main([*base, "--tokenizer", str(tiny_tokenizers["main"]), "--classes", "0,3"]) == 2
    err = capsys.readouterr().err
    assert (
        "class id(s) [3] out of range" in err and "config.json: spec.num_classes = 3" in err and "2=c" in err
    )
    assert main([*base, "--tokenizer", str(tiny_tokenizers["other_k"]), "--classes", "0"]) == 2
    err = capsys.readouterr().err
    assert (
        "field 'tokenizer.codebook_size' is 8" in err
        and "meta.tokenizer.codebook_size) was trained on 16" in err
    )
    assert main([*base, "--tokenizer", str(tiny_tokenizers["same_shape"]), "--classes", "0"]) == 2
    assert "same T and K, other weights" in capsys.readouterr().err
    # an unconditional prior takes no --classes
    uncond = tmp_path / "u"
    _prior(uncond, tiny_tokenizers["main"], num_classes=0)
    assert (
        main(
            [
                "--prior",
                str(uncond / "run"),
                "--n",
                "2",
                "--output",
                str(tmp_path / "o2"),
                "--tokenizer",
                str(tiny_tokenizers["main"]),
                "--classes",
                "1",
            ]
        )
        == 2
    )
    assert "the prior is unconditional" in capsys.readouterr().err
    assert (
        main(
            [
                "--prior",
                str(uncond / "run"),
                "--n",
                "2",
                "--output",
                str(tmp_path / "o2"),
                "--tokenizer",
                str(tiny_tokenizers["main"]),
            ]
        )
        == 0
    )
    assert len(list((tmp_path / "o2").glob("uncond_*.png"))) == 2


def test_evaluate_nll_on_a_token_dataset_of_the_right_tokenizer_only(tiny_tokenizers, tmp_path):
    import math

    import numpy as np

    from revq_ray.prior import evaluate_nll, load_prior
    from revq_ray.prior.data import TokenDataError

    from .conftest import patterned_ids, write_token_dir

    _prior(tmp_path, tiny_tokenizers["main"])
    prior = load_prior(tmp_path / "run")
    ids, labels = patterned_ids(20, 4, 16, 3)
    good = write_token_dir(
        tmp_path / "good",
        ids,
        codebook_size=16,
        labels=labels,
        class_names=["a", "b", "c"],
        tokenizer_model=str(tiny_tokenizers["main"]),
    )
    got = evaluate_nll(prior, good, batch_size=8)
    assert got["images"] == 20 and math.isfinite(got["nll_per_token"])
    assert got["bits_per_image"] == pytest.approx(got["nll_per_token"] * 4 / math.log(2))
    # untrained: about log(K) nats per token
    assert abs(got["nll_per_token"] - math.log(16)) < 0.5
    other = write_token_dir(
        tmp_path / "other",
        ids,
        codebook_size=16,
        labels=labels,
        class_names=["a", "b", "c"],
        tokenizer_model=str(tiny_tokenizers["same_shape"]),
    )
    with pytest.raises(TokenDataError, match=r"other/manifest.json: the tokenizer .* other weights"):
        evaluate_nll(prior, other)
    small_k = write_token_dir(tmp_path / "k8", np.minimum(ids, 7), codebook_size=8, labels=labels)
    with pytest.raises(TokenDataError, match=r"k8/manifest.json: field 'tokenizer.codebook_size' is 8"):
        evaluate_nll(prior, small_k)
    unlabelled = write_token_dir(tmp_path / "nolabels", ids, codebook_size=16)
    with pytest.raises(TokenDataError, match=r"nolabels/manifest.json: field 'labels' .* conditional"):
        evaluate_nll(prior, unlabelled)
