"""A token dataset read for the prior: labels, flips and the hold-out, the flat vocabulary converted, and
bad input stopped with an error naming the file and the field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from revq_ray.prior.data import TokenDataError, check_same_tokenizer, load_token_dataset

from .conftest import patterned_ids, write_token_dir

pytestmark = pytest.mark.core


def test_reads_ids_labels_flips_and_holds_out_sources(token_dir):
    d = load_token_dataset(str(token_dir), conditional="auto", val_items=10)
    assert (d.tokens, d.codebook_size, d.conditional, d.class_names) == (8, 6, True, ["a", "b", "c"])
    assert d.codebooks_tkd.shape == (8, 6, 4)
    # 96 originals + 96 flips; 10 held-out originals, their 10 flips left out of training
    assert int(d.val.sum()) == 10 and len(d.ids) == 96 * 2 - 10
    manifest = json.loads((token_dir / "manifest.json").read_text())
    by_key = {it["key"]: it for it in manifest["items"]}
    ids0 = np.load(token_dir / by_key["00000000"]["file"])
    assert any(np.array_equal(ids0.astype(np.int64), row) for row in d.ids)
    again = load_token_dataset(str(token_dir), conditional="auto", val_items=10)
    assert np.array_equal(again.val, d.val)  # a stable hold-out
    no_flips = load_token_dataset(str(token_dir), val_items=10, augmented=False)
    assert len(no_flips.ids) == 96 and int(no_flips.val.sum()) == 10
    uncond = load_token_dataset(str(token_dir), conditional="no")
    assert not uncond.conditional and uncond.num_classes == 0


def test_flat_vocabulary_is_converted_to_per_position_ids(tmp_path):
    ids, labels = patterned_ids(20, 8, 6, 2)
    flat = write_token_dir(tmp_path / "flat", ids, codebook_size=6, labels=labels, vocab="flat")
    stored = np.load(flat / "ids" / "00000003.npy")
    assert stored.max() >= 6  # really flat on disk: t*K + k
    d = load_token_dataset(str(flat))
    assert d.vocab == "flat" and d.notes and np.array_equal(d.ids, ids)
    # a flat id outside its position's range is refused, naming the item
    bad = stored.copy()
    bad[2] = 0  # position 2 owns [12, 18)
    np.save(flat / "ids" / "00000003.npy", bad)
    with pytest.raises(TokenDataError, match=r"manifest.json item '00000003'.*position 2.*\[12, 18\)"):
        load_token_dataset(str(flat))


def test_labels_missing_where_the_prior_is_conditional(tmp_path):
    ids, _ = patterned_ids(10, 8, 6, 2)
    plain = write_token_dir(tmp_path / "plain", ids, codebook_size=6)
    with pytest.raises(TokenDataError, match=r"manifest.json: field 'labels'.*conditional"):
        load_token_dataset(str(plain), conditional="yes")
    assert not load_token_dataset(str(plain), conditional="auto").conditional
    # labels declared, one item without its label
    labelled = write_token_dir(tmp_path / "lab", ids, codebook_size=6, labels=[0, 1] * 5)
    m = json.loads((labelled / "manifest.json").read_text())
    del m["items"][4]["label"]
    (labelled / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TokenDataError, match=r"item '00000004'.*field 'label' is missing"):
        load_token_dataset(str(labelled))


def test_label_and_id_out_of_range(tmp_path):
    ids, _ = patterned_ids(10, 8, 6, 2)
    d = write_token_dir(tmp_path / "d", ids, codebook_size=6, labels=[0, 1] * 5, class_names=["x", "y"])
    m = json.loads((d / "manifest.json").read_text())
    m["items"][2]["label"] = 2
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TokenDataError, match=r"item '00000002'.*field 'label' = 2 is outside \[0, 2\)"):
        load_token_dataset(str(d))
    e = write_token_dir(tmp_path / "e", ids, codebook_size=6)
    np.save(e / "ids" / "00000001.npy", np.full(8, 6, np.uint16))
    with pytest.raises(
        TokenDataError, match=r"item '00000001' \(ids/00000001.npy\): ids in \[6, 6\], outside"
    ):
        load_token_dataset(str(e))


def test_not_a_token_dataset_and_audio_are_refused(tmp_path):
    with pytest.raises(TokenDataError, match="no manifest.json"):
        load_token_dataset(str(tmp_path))
    ids, _ = patterned_ids(4, 8, 6, 2)
    d = write_token_dir(tmp_path / "a", ids, codebook_size=6)
    m = json.loads((d / "manifest.json").read_text())
    m["tokenizer"]["modality"] = "audio"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TokenDataError, match=r"field 'tokenizer.modality' is 'audio'"):
        load_token_dataset(str(d))


def test_a_dataset_of_another_tokenizer_is_refused():
    prior = {"tokens": 8, "codebook_size": 6, "model_sha256": "a" * 64}
    check_same_tokenizer(prior, "p/config.json", {"tokens": 8, "codebook_size": 6}, "d/manifest.json")
    with pytest.raises(
        TokenDataError, match=r"d/manifest.json: field 'tokenizer.codebook_size' is 7.*p/config"
    ):
        check_same_tokenizer(prior, "p/config.json", {"tokens": 8, "codebook_size": 7}, "d/manifest.json")
    with pytest.raises(TokenDataError, match=r"field 'tokenizer.tokens' is 16"):
        check_same_tokenizer(prior, "p/config.json", {"tokens": 16, "codebook_size": 6}, "d/manifest.json")
    with pytest.raises(TokenDataError, match="same T and K, other weights"):
        check_same_tokenizer(
            prior,
            "p/config.json",
            {"tokens": 8, "codebook_size": 6, "model_sha256": "b" * 64},
            "d/manifest.json",
        )


def test_prior_command_stops_before_ray_without_a_token_dataset(tmp_path, capsys):
    from pathlib import Path

    from revq_ray.prior.driver import main

    preset = str(Path(__file__).resolve().parents[2] / "configs" / "prior_debug.yaml")
    out = f"output_dir={tmp_path}"
    assert main(["--config", preset, "--set", out]) == 2
    assert "data.tokens is empty" in capsys.readouterr().err
    assert main(["--config", preset, "--set", out, "--set", f"data.tokens={tmp_path}"]) == 2
    assert f"data.tokens={tmp_path}: no manifest.json there" in capsys.readouterr().err
    assert main(["--config", preset, "--set", "model.bogus=1"]) == 2
    assert "model.bogus: unknown key" in capsys.readouterr().err
    assert main(["--config", preset, "--print-config"]) == 0
    assert "d_model: 32" in capsys.readouterr().out
