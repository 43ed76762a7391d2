"""Writes tests/core/data/export_e163450 with commit e163450's code (kept for provenance, not run by tests).

    git archive e163450 revq_ray | tar -x -C /tmp/old && \\
        PYTHONPATH=/tmp/old python tests/core/data/make_export_e163450.py tests/core/data/export_e163450
"""

import json
import sys

import torch

import revq_ray
from revq_ray.config import ModelConfig
from revq_ray.core.model import ReVQModel

assert revq_ray.__file__.startswith("/tmp/old14b"), revq_ray.__file__
out = sys.argv[1]
torch.manual_seed(0)
cfg = ModelConfig.model_validate(
    {
        "quantizer": {
            "type": "revq",
            "tokens": 16,
            "codebook_size": 8,
            "reset": {"dead_threshold": 2, "ratio": 0.5, "noise": 0.05},
        },
        "rectifier": {"type": "vit", "width": 32, "depth": 1, "head_dim": 16},
    }
)
m = ReVQModel.from_config([4, 4, 4], cfg)
z = torch.randn(64, 4, 4, 4) * 2 + 1
m.standardizer.mean.copy_(z.mean(0))
m.standardizer.std.copy_(z.std(0))
m.init_codebook(z)
m(z[:8]).loss.backward()
m.eval()
g = torch.Generator().manual_seed(123)
probe = torch.randn(5, 4, 4, 4, generator=g) * 2 + 1
ids = m.encode(probe)
rec = m.decode(ids)
m.save_pretrained(out)
expected = {
    "probe_seed": 123,
    "ids": ids.tolist(),
    "decoded_sum": float(rec.detach().double().sum()),
    "decoded_abs_sum": float(rec.detach().double().abs().sum()),
}
with open(f"{out}/expected.json", "w") as f:
    json.dump(expected, f, indent=1)
print("ok", ids.shape)
