"""Reliability of the training side without a Ray cluster: stale JIT locks, run identity, non-finite guards,
checkpoints that must not run code."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from revq_ray.config import ConfigError, load_config

pytestmark = pytest.mark.train

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------- JIT lock
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_live_jit_lock_owner_times_out_with_a_clear_message(tmp_path):
    from revq_ray.train.jit import OwnerLock

    owner = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    (tmp_path / "owner.json").write_text(json.dumps(owner))
    t0 = time.time()
    with pytest.raises(TimeoutError, match=rf"held by .*'pid': {os.getpid()}.*delete .*owner.json"):
        OwnerLock(tmp_path, timeout_s=0.5, poll_s=0.05).acquire()
    assert time.time() - t0 < 5
    assert (tmp_path / "owner.json").is_file()  # a live owner's lock is never broken


def test_dead_jit_lock_owner_is_broken(tmp_path):
    from revq_ray.train.jit import OwnerLock

    (tmp_path / "owner.json").write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid()}))
    with OwnerLock(tmp_path, timeout_s=5) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not (tmp_path / "owner.json").exists()


def _cached_shm_op() -> Path | None:
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", "")) / "deepspeed_shm_comm"
    return root if list(root.glob("*.so")) else None


@pytest.mark.parametrize("owner", ["dead-pid", "no-owner"])
def test_deepspeed_op_loads_past_a_killed_builds_locks(tmp_path, owner):
    """The locks a build killed mid-way leaves (torch's bare ``lock``, our owner file with a dead pid) do not
    block the next load: it finishes (the op is built already, so in seconds) instead of waiting forever."""
    cached = _cached_shm_op()
    ext = tmp_path / "ext"
    if cached is not None:  # reuse the session's build (mtimes kept: ninja has nothing to redo)
        shutil.copytree(
            cached, ext / "deepspeed_shm_comm", ignore=shutil.ignore_patterns("lock", "owner.json")
        )
    folder = ext / "deepspeed_shm_comm"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lock").write_bytes(b"")
    if owner == "dead-pid":
        (folder / "owner.json").write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid()}))
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext), "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    code = "from revq_ray.train.jit import load_deepspeed_ops; print('loaded', load_deepspeed_ops())"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loaded ['deepspeed_shm_comm']" in proc.stdout
    assert "removing stale" in proc.stdout
    assert not (folder / "lock").exists() and not (folder / "owner.json").exists()


# --------------------------------------------------------------------------------------------- identity
def _cfg(tmp_path: Path, shards: Path, **overrides):
    base = {"name": "same", "output_dir": str(tmp_path / "runs"), "data.shards": str(shards)}
    base.update(overrides)
    return load_config(ROOT / "configs" / "debug.yaml", [f"{k}={v}" for k, v in base.items()])


def test_run_identity_refuses_other_settings_or_data(tmp_path):
    from revq_ray.data.synthetic import write_synthetic_shards
    from revq_ray.train.identity import IDENTITY_FILE, check_run_identity

    a, b = tmp_path / "a", tmp_path / "b"
    write_synthetic_shards(a, 16, (4, 2, 2), seed=0)
    write_synthetic_shards(b, 16, (4, 2, 2), seed=1)
    storage = str(tmp_path / "runs")
    check_run_identity(_cfg(tmp_path, a), storage, "same")
    assert (tmp_path / "runs" / "same" / IDENTITY_FILE).is_file()
    # no checkpoint yet: nothing to merge into, so other settings simply start the run afresh
    check_run_identity(_cfg(tmp_path, a, **{"train.lr": 0.5}), storage, "same")
    check_run_identity(_cfg(tmp_path, a), storage, "same")
    (tmp_path / "runs" / "same" / "checkpoint_step000000008").mkdir()
    with pytest.raises(ConfigError, match=r"run same already exists in .*runs with other settings: train.lr"):
        check_run_identity(_cfg(tmp_path, a, **{"train.lr": 0.5}), storage, "same")
    with pytest.raises(ConfigError, match=r"data.shards \(manifest sha256\)"):
        check_run_identity(_cfg(tmp_path, b), storage, "same")
    with pytest.raises(ConfigError, match="model.quantizer.codebook_size: 64 -> 128"):
        check_run_identity(_cfg(tmp_path, a, **{"model.quantizer.codebook_size": 128}), storage, "same")
    # how long / where to run may change; force_resume accepts the rest and records it
    check_run_identity(_cfg(tmp_path, a, **{"train.max_steps": 99, "train.num_workers": 2}), storage, "same")
    check_run_identity(_cfg(tmp_path, b, **{"train.force_resume": True}), storage, "same")
    check_run_identity(_cfg(tmp_path, b), storage, "same")
    # a run recorded before a config key existed resumes when the key holds its default (an upgrade), not
    # when it is set to something else
    import json

    ident_file = tmp_path / "runs" / "same" / IDENTITY_FILE
    old = json.loads(ident_file.read_text())
    del old["model.layout"], old["model.weighting"]
    ident_file.write_text(json.dumps(old))
    check_run_identity(_cfg(tmp_path, b), storage, "same")
    ident_file.write_text(json.dumps(old))
    with pytest.raises(ConfigError, match="model.layout: null -> .position"):
        check_run_identity(_cfg(tmp_path, b, **{"model.layout": "position"}), storage, "same")


# --------------------------------------------------------------------------------------------- guards
def test_non_finite_window_or_parameters_stop_with_the_step():
    from revq_ray.train.guards import NonFiniteError, check_window

    module = torch.nn.Linear(2, 2)
    check_window(1.5, 5, 10, first_step=6, module=module)
    with pytest.raises(
        NonFiniteError, match="non-finite loss .* at steps 6-10: training stopped at step 10"
    ) as e:
        check_window(float("nan"), 5, 10, first_step=6)
    assert e.value.step == 10
    with pytest.raises(NonFiniteError, match="at step 3"):
        check_window(float("inf"), 1, 3, first_step=3)
    with torch.no_grad():
        module.weight[0, 0] = float("nan")
    check_window(1.0, 1, 4, first_step=4)  # parameters are only checked before a checkpoint/export
    with pytest.raises(NonFiniteError, match="non-finite parameters at step 4 \\(weight\\)"):
        check_window(1.0, 1, 4, first_step=4, module=module)


# --------------------------------------------------------------------------------------------- checkpoints
class _Payload:
    """A pickle that runs a command when loaded (what an attacker would plant)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _ResultFile(dict):
    """A worker's results, written as JSON when the worker ends: no multiprocessing.Manager, whose server
    process is forked from pytest (a fork of a process that ran Ray's gRPC threads can die at start-up)."""

    def __init__(self, path: str, **initial: object):
        super().__init__(initial)
        self.path = path

    def __enter__(self) -> _ResultFile:
        return self

    def __exit__(self, *exc: object) -> None:
        Path(self.path).write_text(json.dumps(dict(self)))


def _read_results(paths: list[Path]) -> dict:
    out: dict = {}
    for p in paths:
        assert p.is_file(), f"{p.name}: the worker wrote no results (it died before its end)"
        out.update(json.loads(p.read_text()))
    return out


def _ckpt_worker(rank: int, port: int, ckpt_dir: str, out: str, marker: str) -> None:
    with _ResultFile(out, marker=marker) as results:
        _ckpt_checks(port, ckpt_dir, results)


def _ckpt_checks(port: int, ckpt_dir: str, results: dict) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch.distributed as dist

    from revq_ray.config import ModelConfig, TrainConfig, parse_config
    from revq_ray.core.model import ReVQModel
    from revq_ray.train import checkpoint as ckpt
    from revq_ray.train import engine as eng

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        cfg = parse_config(
            {"quantizer": {"tokens": 16, "codebook_size": 8}, "rectifier": {"type": "cnn", "width": 8}},
            ModelConfig,
        )
        model = ReVQModel.from_config([4, 4, 4], cfg)
        engine, _, _ = eng.build_engine(
            model, TrainConfig(batch_size=4, zero_stage=2, codebook_update="dense"), 1
        )
        out = engine(torch.randn(4, 4, 4, 4), None)
        engine.backward(out.loss)
        engine.step()
        ckpt.save(engine, ckpt.TrainerState(step=1), ckpt_dir, 0, 1)
        before = model.quantizer.codebook.detach().clone()
        with torch.no_grad():
            model.quantizer.codebook.zero_()
        state = ckpt.load(engine, ckpt_dir, 0, 1)  # DeepSpeed's ZeRO 2 checkpoint passes the allowlist
        results["roundtrip"] = state.step == 1 and torch.equal(model.quantizer.codebook.detach(), before)
        target = Path(ckpt_dir) / "ds" / "mp_rank_00_model_states.pt"
        torch.save({"module": _Payload(results["marker"])}, target)
        try:
            ckpt.load(engine, ckpt_dir, 0, 1)
            results["error"] = ""
        except Exception as err:
            results["error"] = f"{type(err).__name__}: {err}"
    finally:
        dist.destroy_process_group()


def test_planted_pickle_in_a_checkpoint_does_not_run(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    marker = tmp_path / "payload-ran"
    out = tmp_path / "results.json"
    args = (port, str(tmp_path / "ckpt"), str(out), str(marker))
    mp.start_processes(_ckpt_worker, args=args, nprocs=1, start_method="spawn")
    res = _read_results([out])
    assert res["roundtrip"]
    assert not marker.exists(), "the planted payload ran on resume"
    assert res["error"].startswith("UntrustedCheckpointError"), res["error"]
    assert "mp_rank_00_model_states.pt: refusing to load" in res["error"]


# --------------------------------------------------------------------------------- optimizer state on resume
RESUME_CASES = (("dense", 0), ("rows_lazy", 0), ("dense", 2), ("rows_lazy", 2))


def _resume_worker(rank: int, port: int, root: str) -> None:
    """Two gloo ranks: 2 steps, save, a fresh engine loads, then one more step on both engines."""
    with _ResultFile(str(Path(root, f"results-{rank}.json"))) as results:
        _resume_checks(rank, port, root, results)


def _resume_checks(rank: int, port: int, root: str, results: dict) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch.distributed as dist

    from revq_ray.config import ModelConfig, TrainConfig, parse_config
    from revq_ray.core.model import ReVQModel
    from revq_ray.train import checkpoint as ckpt
    from revq_ray.train import engine as eng

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        cfg = parse_config(
            {"quantizer": {"tokens": 16, "codebook_size": 8}, "rectifier": {"type": "cnn", "width": 8}},
            ModelConfig,
        )
        for mode, zero in RESUME_CASES:
            train = TrainConfig(batch_size=8, zero_stage=zero, codebook_update=mode)

            def build(train: TrainConfig = train) -> tuple:
                torch.manual_seed(0)
                return eng.build_engine(ReVQModel.from_config([4, 4, 4], cfg), train, 2)

            def one_step(engine, rows, seed: int) -> None:
                x = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(seed))
                out = engine(x, None)
                eng.backward(engine, out.loss, rows)
                eng.step(engine, rows)

            engine, _, rows = build()
            for s in range(2):
                one_step(engine, rows, 10 * s + rank)  # each rank its own data: the all-reduce matters
            where = Path(root, f"{mode}-{zero}")
            ckpt.save(engine, ckpt.TrainerState(step=2, world_size=2), where, rank, 2, rows)
            dist.barrier()
            fresh, _, fresh_rows = build()
            ckpt.load(fresh, where, rank, 2, fresh_rows)
            # DeepSpeed's own optimizer (at ZeRO 1/2 its flat partition's torch optimizer) and, under rows*,
            # the codebook's: every moment tensor must be back, bit for bit.
            inner = getattr(engine.optimizer, "optimizer", engine.optimizer) if zero else engine.optimizer
            inner_fresh = getattr(fresh.optimizer, "optimizer", fresh.optimizer) if zero else fresh.optimizer

            def moments(opt) -> list[torch.Tensor]:
                return [v for st in opt.state.values() for k, v in sorted(st.items()) if torch.is_tensor(v)]

            a, b = moments(inner), moments(inner_fresh)
            same_state = len(a) == len(b) > 0 and all(torch.equal(x, y) for x, y in zip(a, b))
            if rows is not None:
                ra, rb = moments(rows.optimizer), moments(fresh_rows.optimizer)
                same_state = same_state and len(ra) == len(rb) > 0 and all(map(torch.equal, ra, rb))
            one_step(engine, rows, 100 + rank)
            one_step(fresh, fresh_rows, 100 + rank)
            same_params = all(
                torch.equal(p, q) for p, q in zip(engine.module.parameters(), fresh.module.parameters())
            )
            results[f"{rank}:{mode}:{zero}"] = (len(a), same_state, same_params)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_rank_resume_restores_every_optimizer_state(tmp_path):
    """A checkpoint written by two ranks and loaded into fresh engines restores AdamW's moments (DeepSpeed's
    at ZeRO 0 and 2, and the row-exchanged codebook's own), so the next step is the uninterrupted one, bit
    for bit. (Checks a report that DeepSpeed 0.19.8 dropped the optimizer state at ZeRO 0 on two ranks.)"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_resume_worker, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    res = _read_results([tmp_path / f"results-{r}.json" for r in range(2)])
    assert len(res) == 2 * len(RESUME_CASES), res
    for key, (n_moments, same_state, same_params) in sorted(res.items()):
        assert n_moments > 0, f"{key}: the optimizer had no state after 2 steps"
        assert same_state, f"{key}: the loaded optimizer state differs from the saved one"
        assert same_params, f"{key}: the step after the resume differs from the uninterrupted step"
