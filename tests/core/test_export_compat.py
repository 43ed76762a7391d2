"""A ReVQModel exported by an earlier revision still loads and gives the same tokens.

``data/export_e163450/`` was written by commit e163450's ``ReVQModel.save_pretrained`` (before the core took
plain arguments), with ``data/make_export_e163450.py`` run against that revision's code; ``expected.json``
holds what that model produced for a seeded probe batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from revq_ray.core.model import ReVQModel
from revq_ray.core.quantizers import GroupedVQ, ResetParams

pytestmark = pytest.mark.core

EXPORT = Path(__file__).parent / "data" / "export_e163450"


def test_export_of_e163450_loads_and_encodes_the_same():
    expected = json.loads((EXPORT / "expected.json").read_text())
    model = ReVQModel.from_pretrained(EXPORT)
    assert model.latent_shape == (4, 4, 4) and (model.tokens, model.codebook_size) == (16, 8)
    assert isinstance(model.quantizer, GroupedVQ)
    # The saved reset settings reach the quantizer as plain ResetParams.
    assert model.quantizer.reset_cfg == ResetParams(enabled=True, dead_threshold=2, ratio=0.5, noise=0.05)
    g = torch.Generator().manual_seed(expected["probe_seed"])
    probe = torch.randn(5, 4, 4, 4, generator=g) * 2 + 1
    with torch.no_grad():
        ids = model.encode(probe)
        rec = model.decode(ids)
    assert ids.tolist() == expected["ids"]
    assert float(rec.double().sum()) == pytest.approx(expected["decoded_sum"], rel=1e-5, abs=1e-4)
    assert float(rec.double().abs().sum()) == pytest.approx(expected["decoded_abs_sum"], rel=1e-5)


def test_export_round_trips_with_todays_code(tmp_path):
    model = ReVQModel.from_pretrained(EXPORT)
    model.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    # Fields added since e163450 are written with the values that keep its meaning (the full config is saved
    # so that a saved model never changes meaning when a default changes); the rest is what it was.
    added = {"layout": "contiguous", "weighting": "none", "weighting_samples": 64}
    assert {k: saved["model"].pop(k) for k in added} == added
    assert saved == json.loads((EXPORT / "config.json").read_text())
    again = ReVQModel.from_pretrained(tmp_path / "again")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
