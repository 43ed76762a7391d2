"""Every stage against a real S3 endpoint: moto's S3 server on the loopback (HTTP, IAM auth on), configured
the way users configure S3 (AWS_ENDPOINT_URL + AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, see s3server.py).

One server and one local Ray (started after the variables are set, so every Ray worker inherits them, as
the workers of a cluster get them from its runtime_env / node environment) serve the module; stages build
on each other in file order, like a user's session:

1. unusable storage (wrong key, missing bucket, closed endpoint) stops each CLI in seconds, naming the URI,
   before Ray starts, and nothing is written to the local disk instead;
2. ``revq-ray encode`` of Fashion-MNIST through taef2 to s3://revq/latents, killed after its first shards,
   then run again: the finished shards are kept, the rest written;
3. training from those shards with ``output_dir=s3://revq/runs``, two workers, rank 0 killed after a
   checkpoint: Ray Train restores from the S3 checkpoint, and checkpoints, exports and metrics.csv (every
   step once) are in the bucket;
4. ``Tokenizer.from_pretrained``, ``revq-ray eval`` and ``revq-ray tokenize`` from the S3 export, the tokens
   written to S3 and read back;
5. ``revq-ray import-revq --output s3://...``;
6. (extended) a Tune sweep whose storage is on S3.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import s3server

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("REVQ_SHARED", ROOT.parent / "shared"))
BUCKET = "revq"
N_IMAGES = 128
SHARD_SIZE = 32
RAY_START_TIMEOUT = "The current node timed out during startup"


def _have_shared() -> bool:
    return (SHARED / "models" / "taef2").is_dir() and (SHARED / "data" / "fashion-mnist").is_dir()


@pytest.fixture(scope="module")
def s3():
    """The S3 server, its bucket, and the AWS variables set in this process (restored afterwards)."""
    srv = s3server.start(buckets=(BUCKET,))
    saved = {k: os.environ.get(k) for k in srv.env()}
    os.environ.update(srv.env())
    try:
        yield srv
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        srv.stop()


@pytest.fixture(scope="module")
def ray_s3(s3):
    """A local Ray started after the AWS variables are set: its workers inherit them."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    # Ray gives a node a fixed 30 s to register: a machine under heavy load can miss it; try once more
    for attempt in (1, 2):
        try:
            ray.init(
                address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
                configure_logging=False,
            )  # fmt: skip
            break
        except Exception as err:
            ray.shutdown()
            if attempt == 2 or RAY_START_TIMEOUT not in str(err):
                raise
    yield ray
    ray.shutdown()


def _fs():
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(f"s3://{BUCKET}")[0]


def _ls(prefix: str) -> list[str]:
    import pyarrow.fs as pafs

    sel = pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True)
    return sorted(i.path[len(BUCKET) + 1 :] for i in _fs().get_file_info(sel) if i.type == pafs.FileType.File)


def _read(key: str) -> bytes:
    with _fs().open_input_stream(f"{BUCKET}/{key}") as f:
        return f.read()


def _cli(*argv: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    for _ in range(2):  # once more when Ray's fixed 30 s node start-up ran out on a loaded machine
        done = subprocess.run(
            [sys.executable, "-m", "revq_ray.cli", *argv], capture_output=True, text=True, timeout=timeout,
            env={**os.environ, **(env or {})}, cwd=ROOT,
        )  # fmt: skip
        if RAY_START_TIMEOUT not in done.stderr:
            break
    return done


# --------------------------------------------------------------------------------------------- 1. errors
@pytest.mark.parametrize(
    "case",
    ["wrong_key", "missing_bucket", "closed_endpoint"],
)
def test_unusable_storage_stops_in_seconds_naming_the_uri(s3, tmp_path, case):
    env = {}
    uri = f"s3://{BUCKET}/errors/{case}"
    if case == "wrong_key":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
        expect = "ACCESS_DENIED"
    elif case == "missing_bucket":
        uri = "s3://no-such-bucket/errors"
        expect = "bucket 'no-such-bucket' does not exist"
    else:
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{s3server.free_port()}"  # nothing listens there
        expect = "unreachable"
    commands = {
        "train": ["train", "--config", "configs/debug.yaml", "--set", f"output_dir={uri}", "--set",
                  f"data.shards={tmp_path / 'shards'}"],
        "encode": ["encode", "--input", str(tmp_path), "--vae", "builtin:x", "--output", uri],
        "tokenize": ["tokenize", "--model", str(tmp_path), "--input", str(tmp_path), "--output", uri],
    }  # fmt: skip
    if case != "missing_bucket":  # every CLI checks the same way: one of them per case is enough
        del commands["encode"], commands["tokenize"]
    for name, argv in commands.items():
        t0 = time.monotonic()
        done = _cli(*argv, env=env, timeout=120)
        took = time.monotonic() - t0
        assert done.returncode == 2, (name, done.stdout[-2000:], done.stderr[-3000:])
        assert uri in done.stderr and expect in done.stderr, (name, done.stderr[-2000:])
        # seconds (python + torch import included), never Ray's start or a hang
        assert took < 60, (name, took)
        assert "started a local Ray" not in done.stderr
    # the check itself, in this process: seconds (a closed port: pyarrow's retries, about 6 s)
    from revq_ray.data.fs import StorageError, check_location

    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        t0 = time.monotonic()
        with pytest.raises(StorageError, match=re.escape(uri)):
            check_location(uri, write=True)
        print(f"{case}: check_location failed after {time.monotonic() - t0:.1f}s")
        assert time.monotonic() - t0 < 20
    # never a fallback to the local disk: no "s3:" folder appeared anywhere here
    assert not list(ROOT.glob("s3*")) and not list(tmp_path.glob("**/s3*"))


# --------------------------------------------------------------------------------------------- 2. encode
def _encode_argv(out: str, tmp: Path) -> list[str]:
    if _have_shared():
        src = str(SHARED / "data" / "fashion-mnist" / "train-images-idx3-ubyte.gz")
        vae, size = f"taesd:{SHARED / 'models' / 'taef2'}", "64"
    else:  # without ../shared: scikit-image's photos through a small built-in VAE (untrained but real)
        import PIL.Image
        import skimage.data
        import torch

        from revq_ray.vae.builtin import ImageConvVAE

        src_dir = tmp / "images"
        src_dir.mkdir()
        photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
        for i in range(N_IMAGES):
            p = photos[i % 3]
            PIL.Image.fromarray(p[i % 50 :][:200, :200]).convert("RGB").save(src_dir / f"{i:04d}.png")
        torch.manual_seed(0)
        ImageConvVAE(image_size=32, width=16, latent_channels=16).save_pretrained(str(tmp / "vae"))
        src, vae, size = str(src_dir), f"builtin:{tmp / 'vae'}", "32"
    return ["encode", "--input", src, "--vae", vae, "--output", out, "--limit", str(N_IMAGES),
            "--image-size", size, "--shard-size", str(SHARD_SIZE), "--batch-size", "16",
            "--num-actors", "1"]  # fmt: skip


def _finished(keys: list[str]) -> list[str]:
    """The shards an encode finished: a shard's JSON sidecar is written after its tar."""
    return [k for k in keys if k.rsplit("/", 1)[-1].startswith("shard-") and k.endswith(".json")]


@pytest.fixture(scope="module")
def encoded(s3, tmp_path_factory):
    """``revq-ray encode`` to s3://revq/latents, killed once two shards are in the bucket, then rerun."""
    uri = f"s3://{BUCKET}/latents"
    argv = _encode_argv(uri, tmp_path_factory.mktemp("encode"))
    for _ in range(2):  # once more when Ray's fixed 30 s node start-up ran out on a loaded machine
        proc = subprocess.Popen(
            [sys.executable, "-m", "revq_ray.cli", *argv], cwd=ROOT, env=dict(os.environ),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 600
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                if len(_finished(_ls("latents"))) >= 2:
                    break
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the encoder and the Ray it started
            log = proc.communicate()[0]
        if RAY_START_TIMEOUT not in log:
            break
    before = _ls("latents")
    assert "latents/manifest.json" not in before, "killed too late: the first run finished\n" + log[-3000:]
    assert len(_finished(before)) >= 2, log[-3000:]
    done = _cli(*argv)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"uri": uri, "before": before, "stdout": done.stdout, "spec": argv[argv.index("--vae") + 1]}


def test_encode_to_s3_resumes_after_a_kill(encoded):
    from revq_ray.data.shards import read_manifest

    m = read_manifest(encoded["uri"])
    assert m.count == N_IMAGES and len(m.shards) == N_IMAGES // SHARD_SIZE
    kept = int(encoded["stdout"].split(" kept from an earlier run")[0].rsplit("written, ", 1)[1])
    # every shard the killed run finished is kept, the rest written
    assert kept == len(_finished(encoded["before"])) >= 2, encoded["stdout"]
    assert not [k for k in _ls("latents") if ".tmp-" in k]


# --------------------------------------------------------------------------------------------- 3. train
def _train_cfg(shards: str, name: str, **overrides):
    from revq_ray.config import load_config

    base = {
        "name": name, "output_dir": f"s3://{BUCKET}/runs", "data.shards": shards, "data.val_items": 32,
        "data.shuffle_buffer": 64, "model.quantizer.tokens": 256, "model.quantizer.codebook_size": 32,
        "train.batch_size": 32, "train.log_every": 1,
        "train.cpus_per_worker": 0.5, "train.num_workers": 2, "train.epochs": 2,
        "train.checkpoint_every": 3, "train.fail_at_step": 4, "train.max_failures": 1,
    }  # fmt: skip
    base.update(overrides)
    return load_config(ROOT / "configs" / "debug.yaml", [f"{k}={v}" for k, v in base.items()])


@pytest.fixture(scope="module")
def trained(encoded, ray_s3):
    from revq_ray.train.driver import run

    cfg = _train_cfg(encoded["uri"], "s3run")
    result = run(cfg)
    assert result.error is None, result.error
    return {"result": result, "run": f"s3://{BUCKET}/runs/s3run", "spec": encoded["spec"]}


def test_two_workers_train_on_s3_and_resume_from_its_checkpoint(trained):
    m = trained["result"].metrics
    keys = _ls("runs/s3run")
    total = m["step"]
    # Ray Train's checkpoints (both ranks' DeepSpeed parts) and our run files are in the bucket
    ckpts = sorted({k.split("/")[2] for k in keys if k.split("/")[2].startswith("checkpoint_")})
    assert ckpts, keys
    assert any(k.endswith("trainer_state.json") for k in keys)
    for f in ("export/best/model.safetensors", "export/latest/model.safetensors", "metrics.csv",
              "config.json", "workers.json", "starts.csv", "steps.log"):  # fmt: skip
        assert f"runs/s3run/{f}" in keys, (f, keys)
    assert any(k.startswith("runs/s3run/tensorboard/") for k in keys)
    assert m["run_dir"] == trained["run"]
    # two workers; rank 0 died after step 4 and the group resumed from the step-3 checkpoint in S3
    assert len(json.loads(_read("runs/s3run/workers.json"))) == 2
    starts = _read("runs/s3run/starts.csv").decode().split()[1:]
    assert [int(s.split(",")[1]) for s in starts] == [0, 3]
    rows = list(csv.DictReader(io.StringIO(_read("runs/s3run/metrics.csv").decode())))
    assert [int(r["step"]) for r in rows] == list(range(1, total + 1))  # every step once
    assert float(rows[-1]["epoch"]) == pytest.approx(2.0)
    assert "runs/s3run/.fail_at_step.done" in keys


# --------------------------------------------------------------------------------------------- 4. use it
def test_tokenizer_eval_and_tokenize_from_the_s3_export(trained, tmp_path):
    import numpy as np
    import PIL.Image
    import torch

    from revq_ray.tokenize import read_tokens
    from revq_ray.tokenizer import Tokenizer

    export = trained["run"] + "/export/best"
    tok = Tokenizer.from_pretrained(export)  # the VAE is named by the run's config / shards' manifest
    assert tok.vae_spec == trained["spec"]
    size = tok.vae.input_shape[-1]
    images = torch.rand(3, 3, size, size)
    ids = tok.encode(images)
    assert ids.shape == (3, tok.tokens) and int(ids.max()) < tok.codebook_size
    assert tok.decode(ids).shape == images.shape

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        PIL.Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    done = _cli("eval", "--model", export, "--input", str(folder), "--output", str(tmp_path / "eval"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "eval" / "report.md").is_file()

    out = f"s3://{BUCKET}/tokens/fmnist"
    done = _cli("tokenize", "--model", export, "--input", str(folder), "--output", out)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest, items = read_tokens(out)
    assert manifest["count"] == 4 and manifest["tokenizer"]["model"] == export
    got = {meta["name"]: a for meta, a in items}
    assert len(got) == 4 and all(a.shape == (tok.tokens,) for a in got.values())
    with PIL.Image.open(folder / "0.png") as im:
        want = tok.encode(np.asarray(im.convert("RGB")))
    np.testing.assert_array_equal(got["0.png"], want.reshape(-1).numpy())


# --------------------------------------------------------------------------------------------- 5. import
def test_import_revq_writes_its_bundle_to_s3(s3, tmp_path):
    import importlib.util

    from revq_ray.core.model import ReVQModel
    from revq_ray.tokenizer import local_model_path

    spec = importlib.util.spec_from_file_location("_published", ROOT / "tests" / "core" / "test_published.py")
    published = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(published)
    published.write_published(tmp_path / "pub", "512T")
    out = f"s3://{BUCKET}/bundles/512T"
    done = _cli("import-revq", *published._args(tmp_path / "pub", out))
    assert done.returncode == 0, done.stderr[-3000:]
    keys = _ls("bundles/512T")
    assert {"bundles/512T/tokenizer.json", "bundles/512T/model/model.safetensors"} <= set(keys), keys
    local = local_model_path(out)
    model = ReVQModel.from_pretrained(str(local / "model"))
    assert model.tokens == 512
    assert json.loads(_read("bundles/512T/tokenizer.json"))["tokens"] == 512


# --------------------------------------------------------------------------------------------- 6. tune
@pytest.mark.extended
def test_tune_sweep_with_its_storage_on_s3(encoded):
    out = f"s3://{BUCKET}/sweeps"
    done = _cli(
        "tune", "--config", "tuning/debug.yaml", "--set", f"output_dir={out}", "--set", "num_samples=2",
        "--set", "max_concurrent=1", "--set", "asha.max_t=1", "--train-set", f"data.shards={encoded['uri']}",
        timeout=1500,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    keys = _ls("sweeps/debug")
    for f in ("results.csv", "best.yaml", "tune_config.yaml"):
        assert f"sweeps/debug/{f}" in keys, keys
    rows = list(csv.DictReader(io.StringIO(_read("sweeps/debug/results.csv").decode())))
    assert len(rows) == 2 and all(r["val_mse"] for r in rows), rows
    # each trial's Train run keeps its checkpoints and exports in the bucket too
    assert any(re.search(r"sweeps/debug/runs/[^/]+/export/best/model.safetensors$", k) for k in keys), keys
