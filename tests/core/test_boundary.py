"""The layering rule: revq_ray.core is pure PyTorch. It must import and run with Ray, DeepSpeed and diffusers
unimportable, and no file under revq_ray/core may import them or a higher revq_ray layer."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.core

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "revq_ray" / "core"
FORBIDDEN_ROOTS = {"ray", "deepspeed", "diffusers"}
# Everything above the core: the Ray layers and the app modules (config is read only by the bridges, lazily).
FORBIDDEN_LAYERS = {"data", "train", "eval", "vae", "tune", "runtime", "compare", "tokenizer", "quickstart"}

_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    BLOCKED = {"ray", "deepspeed", "diffusers"}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked by test_boundary")
            return None

    sys.meta_path.insert(0, Blocker())
    for mod in BLOCKED:
        try:
            __import__(mod)
        except ImportError:
            pass
        else:
            raise SystemExit(f"the blocker failed: {mod} imported")

    import revq_ray, revq_ray.core, revq_ray.core.model, revq_ray.core.quantizers  # noqa: E401
    import torch
    from revq_ray.config import ModelConfig
    from revq_ray.core.model import ReVQModel

    torch.manual_seed(0)
    cfg = ModelConfig.model_validate(
        {"quantizer": {"type": "revq", "tokens": 16, "codebook_size": 8},
         "rectifier": {"type": "vit", "width": 32, "depth": 1, "head_dim": 16}}
    )
    model = ReVQModel.from_config([4, 4, 4], cfg)
    z = torch.randn(6, 4, 4, 4)
    model.init_codebook(z)
    out = model(z)
    out.loss.backward()
    model.eval()
    ids = model.encode(z)
    assert ids.shape == (6, 16) and ids.dtype == torch.int64
    assert model.decode(ids).shape == z.shape
    assert revq_ray.ReVQModel is ReVQModel
    # the published models' rectifier (type dcae) is pure PyTorch too
    dcae = ModelConfig.model_validate({"quantizer": {"tokens": 16, "codebook_size": 8}, "rectifier":
                                       {"type": "dcae", "width": 32, "depth": 1, "head_dim": 16}})
    assert ReVQModel.from_config([4, 4, 4], dcae)(z).latents_rec.shape == z.shape
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, leaked
    print("BOUNDARY-OK")
    """
)


def test_core_imports_and_runs_without_ray_deepspeed_diffusers():
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "BOUNDARY-OK" in proc.stdout


_PLAIN_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, pkgutil, sys

    BLOCKED = {"ray", "deepspeed", "diffusers", "pydantic"}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked by test_boundary")
            return None

    sys.meta_path.insert(0, Blocker())
    import revq_ray.core

    # Every module of the core imports without pydantic, Ray and DeepSpeed ...
    for info in pkgutil.walk_packages(revq_ray.core.__path__, "revq_ray.core."):
        __import__(info.name)
    import torch
    from revq_ray.core.quantizers import GaussianQuant, GroupedVQ, ResetParams, SimVQ
    from revq_ray.core.rectifiers import EfficientViTBlock, Rectifier, ResConvBlock

    # ... and its quantizers and rectifiers are built from plain arguments and train.
    torch.manual_seed(0)
    tokens_btd = torch.randn(32, 4, 8)
    quantizers = [
        GroupedVQ(4, 8, 16, reset_cfg=ResetParams(dead_threshold=2, ratio=0.5, noise=0.0)),
        SimVQ(4, 8, 16, beta=0.25, shared=True, seed=1),
        GaussianQuant(4, 8, 16, beta=1.0, seed=2),
    ]
    for q in quantizers:
        q.train()
        if hasattr(q, "init_from_tokens"):
            q.init_from_tokens(tokens_btd)
        out = q(tokens_btd.clone().requires_grad_(True))
        assert out.ids_bt.shape == (32, 4), type(q).__name__
        loss = sum(out.losses.values())
        if torch.is_tensor(loss) and loss.requires_grad:  # GQ's codebook is fixed: nothing may train
            loss.backward()
    assert quantizers[0].maybe_reset() is not None
    for blocks, kernel in (([EfficientViTBlock(16, 8, 2.0, 2)], 3), ([ResConvBlock(16, 2)], 3)):
        rect = Rectifier(4, 16, blocks, kernel=kernel, spatial_dims=2)
        x = torch.randn(2, 4, 6, 6)
        assert rect(x).shape == x.shape
    from revq_ray.core.rectifiers_published import DCAERectifier

    assert DCAERectifier(4, 16, 1, 8)(x).shape == x.shape  # the published models' rectifier
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, leaked
    print("PLAIN-CORE-OK")
    """
)


def test_core_imports_and_builds_without_pydantic():
    """The core's modules import, and its quantizers and rectifiers build from plain arguments, with
    pydantic (the app config), Ray, DeepSpeed and diffusers all unimportable."""
    proc = subprocess.run(
        [sys.executable, "-c", _PLAIN_SCRIPT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PLAIN-CORE-OK" in proc.stdout


def test_import_revq_ray_is_cheap():
    code = (
        "import sys, revq_ray; "
        "heavy = [m for m in ('torch', 'ray', 'deepspeed', 'diffusers') if m in sys.modules];"
        "print(heavy); assert not heavy, heavy"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _resolve(node: ast.ImportFrom, module: str) -> str:
    """Absolute module name of a (possibly relative) ``from ... import``."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")[: -node.level]
    return ".".join(base + ([node.module] if node.module else []))


def _violations(path: Path, root: Path = ROOT) -> list[str]:
    rel = path.relative_to(root).with_suffix("")
    module = ".".join(rel.parts)
    if path.name == "__init__.py":
        module += ".__init__"  # so that level=1 resolves to the package itself
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, module)
            names.append((node.lineno, target))
            # `from revq_ray import train` imports a layer too
            names += [(node.lineno, f"{target}.{a.name}") for a in node.names if target == "revq_ray"]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) in {"import_module", "__import__"}
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.append((node.lineno, node.args[0].value))
    bad = []
    for lineno, name in names:
        parts = name.split(".")
        if parts[0] in FORBIDDEN_ROOTS or (
            parts[0] == "revq_ray" and len(parts) > 1 and parts[1] in FORBIDDEN_LAYERS
        ):
            bad.append(f"{path.relative_to(root)}:{lineno}: imports {name}")
    return bad


def test_no_core_file_imports_forbidden_modules():
    files = sorted(CORE.rglob("*.py"))
    assert files, f"no python files under {CORE}"
    bad = [v for f in files for v in _violations(f)]
    assert not bad, "revq_ray/core must stay pure PyTorch:\n" + "\n".join(bad)


def test_static_checker_catches_violations(tmp_path):
    """The checker itself works (absolute, relative, dynamic and `from revq_ray import <layer>` forms)."""
    pkg = tmp_path / "revq_ray" / "core"
    pkg.mkdir(parents=True)
    bad = pkg / "bad.py"
    bad.write_text(
        "import ray.train\nfrom deepspeed import init\nfrom ..data import reader\nfrom revq_ray import eval\n"
        "import importlib\nimportlib.import_module('diffusers')\nfrom revq_ray.config import ModelConfig\n"
        "from . import layout\n"
    )
    found = _violations(bad, root=tmp_path)
    assert [f.split(": imports ")[1] for f in found] == [
        "ray.train",
        "deepspeed",
        "revq_ray.data",
        "revq_ray.eval",
        "diffusers",
    ], found


_PRIOR_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    BLOCKED = {"ray", "deepspeed", "diffusers", "pydantic"}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked by test_boundary")
            return None

    sys.meta_path.insert(0, Blocker())
    import torch
    from revq_ray.prior.model import PriorSpec, PriorTransformer

    m = PriorTransformer(PriorSpec(tokens=5, codebook_size=4, num_classes=2, d_model=16, layers=1, heads=2))
    ids = torch.randint(0, 4, (3, 5))
    loss, _ = m.loss(ids, m.drop_labels(torch.tensor([0, 1, 1])))
    loss.backward()
    assert m.generate(torch.tensor([0, 1]), guidance=2.0).shape == (2, 5)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, leaked
    print("PRIOR-OK")
    """
)


def test_the_prior_model_is_plain_pytorch():
    """revq_ray.prior.model (the stage-2 transformer) imports, trains a step and samples with Ray, DeepSpeed,
    diffusers and pydantic unimportable, and imports no revq_ray layer."""
    proc = subprocess.run(
        [sys.executable, "-c", _PRIOR_SCRIPT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PRIOR-OK" in proc.stdout
    model_py = ROOT / "revq_ray" / "prior" / "model.py"
    tree = ast.parse(model_py.read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [i for i in imported if i.split(".")[0] in FORBIDDEN_ROOTS | {"revq_ray", "pydantic"}], (
        imported
    )
