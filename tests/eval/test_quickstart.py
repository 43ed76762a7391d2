"""The quickstart a newcomer runs first: offline, end to end, resumable (``--fast`` sizes here)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
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


def readme_quickstart_commands() -> list[str]:
    """The commands of the README's Quickstart block: the first ```bash block under '## Quickstart',
    comments and blank lines left out."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README: no ```bash block in the Quickstart section"
    lines = [ln.strip() for ln in block.group(1).splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def test_readme_quickstart_is_two_commands_and_ci_runs_the_second():
    cmds = readme_quickstart_commands()
    assert cmds == ["make quickstart", "make test"], (
        f"README Quickstart must hold exactly two commands (the main job, the tests), found {cmds}"
    )
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert cmds[1] in ci, f".ci/run must call the README's test command verbatim ({cmds[1]!r})"
    makefile = (ROOT / "Makefile").read_text()
    for target in ("quickstart", "test"):
        assert re.search(rf"^{target}: \$\(STAMP\)$", makefile, re.M), f"Makefile: {target} must set up first"
    # the "no tests collected" guard lives in the test target CI calls
    assert "-eq 5" in makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]


def _make(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    if shutil.which("make") is None:
        pytest.skip("make is not installed (the README's two commands need it; the manual path does not)")
    return subprocess.run(["make", *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_make_sets_up_once_and_again_when_pyproject_changes(tmp_path):
    """Dry runs (make -n) on a copy: no stamp -> venv + pip install; stamp present -> straight to the
    command; pyproject.toml edited -> installs again (the stamp is keyed on its content, not its mtime)."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    venv = tmp_path / "venv"
    dry = _make("-n", "quickstart", f"VENV={venv}", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "-m venv" in dry.stdout and "pip install" in dry.stdout and "quickstart" in dry.stdout
    stamp = Path(_make("-s", "print-STAMP", f"VENV={venv}", cwd=tmp_path).stdout.strip())
    assert stamp.parent == venv
    venv.mkdir()
    stamp.touch()
    for target in ("quickstart", "test"):
        dry = _make("-n", target, f"VENV={venv}", cwd=tmp_path)
        assert dry.returncode == 0 and "pip install" not in dry.stdout, dry.stdout
    os.utime(tmp_path / "pyproject.toml")  # touched, same content: still set up
    assert "pip install" not in _make("-n", "test", f"VENV={venv}", cwd=tmp_path).stdout
    with open(tmp_path / "pyproject.toml", "a") as f:
        f.write("\n# a changed dependency list\n")
    assert "pip install" in _make("-n", "test", f"VENV={venv}", cwd=tmp_path).stdout


def test_make_keeps_one_environment_per_python(tmp_path):
    """3.11 keeps .venv; 3.12 / 3.13 get .venv-3.12 / .venv-3.13, and the stamp names the version, so
    `make test PYTHON=python3.12` never reuses a 3.11 environment. Other versions are refused."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    venv = _make("-s", "print-VENV", f"PYTHON={sys.executable}", cwd=tmp_path).stdout.strip()
    assert venv == (".venv" if ver == "3.11" else f".venv-{ver}")
    stamp = _make("-s", "print-STAMP", f"PYTHON={sys.executable}", "VENV=env", cwd=tmp_path).stdout.strip()
    assert stamp.startswith(f"env/.revq-ray-installed-py{ver}-"), stamp
    old = shutil.which("python3.10") or "/root/.pyenv/versions/3.10.13/bin/python3.10"
    if Path(old).is_file() and subprocess.run([old, "-V"], capture_output=True).returncode == 0:
        refused = _make("venv", f"PYTHON={old}", "VENV=env310", cwd=tmp_path)
        assert refused.returncode != 0 and "needs Python 3.11, 3.12 or 3.13" in refused.stderr
        assert not (tmp_path / "env310").exists()


def test_progress_filter_keeps_a_few_lines():
    from revq_ray.quickstart import ProgressFilter

    pick = ProgressFilter(vae_steps=100)
    vae = [
        f"[revq_ray.vae] step={i} loss=0.{i:03d} recon=0.1 kl=0.2 val_recon=0.1 val_psnr=20.5"
        for i in range(1, 101)
    ]
    shown = [s for s in map(pick, vae) if s]
    assert len(shown) == 3 and shown[0].startswith("[2/5] vae: step 1/100") and "step 100/100" in shown[-1]
    worker = "\x1b[36m(RayTrainWorker pid=5904)\x1b[0m [revq_ray.train] "
    train = [
        f"{worker}step {i}/40 ({100 * i // 40}%) ep 0.10 | loss 0.9161 (quant 0.4 rect 0.4) | val 0.3072 "
        f"(norect 0.3079) | usage 59.0% (min 50.0%) ppl 8 dead 105 | lr 1.0e-02 | 1 samples/s | eta 0m56s"
        for i in range(1, 41)
    ]
    shown = [s for s in map(pick, train) if s]
    assert len(shown) == 3 and "step 20/40" in shown[1]
    assert shown[-1] == "[4/5] train: step 40/40 (100%) ep 0.10 | loss 0.9161 | val 0.3072 | eta 0m56s"
    noise = [
        "2026-12-03 08:41:48,251\tWARNING authentication_token_setup.py:85 -- Token authentication ...",
        "[2026-12-03 08:41:57,482 E 4747 4747] core_worker.cc:2465: Actor with class name: 'MapWorker'",
        f"{worker}Checkpoint successfully created at: Checkpoint(filesystem=local)",
    ]
    assert [pick(n) for n in noise] == [None, None, None]


def test_quiet_console_sends_everything_but_our_lines_to_the_log(tmp_path, capfd):
    """Python prints, raw fd writes (what C++ parts do) and child processes all land in the log; the terminal
    gets the _log lines and the picked progress lines."""
    from revq_ray import quickstart as qs

    log = tmp_path / "q.log"
    with qs.quiet_console(log, lambda line: "picked" if "progress-marker" in line else None):
        print("python noise")
        os.write(2, b"fd-level noise\n")
        subprocess.run([sys.executable, "-c", "print('child noise'); print('progress-marker')"], check=True)
        qs._log("a line for the newcomer")
    print("after")  # restored
    out, err = capfd.readouterr()
    assert out.splitlines() == ["[quickstart] picked", "[quickstart] a line for the newcomer", "after"]
    assert err == ""
    text = log.read_text()
    for s in ("python noise", "fd-level noise", "child noise", "a line for the newcomer"):
        assert s in text, s


@pytest.mark.slow
def test_quickstart_fast_end_to_end(tmp_path):
    """The README's quickstart target (make quickstart) at --fast sizes, on the environment running the
    tests (``-o STAMP``: never installs into it; in CI that is the .venv `make test` just set up)."""
    out = tmp_path / "qs"
    venv = Path(sys.prefix)
    if not (venv / "bin" / "revq-ray").is_file():
        pytest.skip(
            f"no revq-ray script in {venv}/bin (not a virtual environment with the package installed)"
        )
    stamp = _make("-s", "print-STAMP", f"VENV={venv}", cwd=ROOT).stdout.strip()
    proc = subprocess.run(
        ["make", "-o", stamp, "quickstart", f"VENV={venv}", f"ARGS=--fast --output {out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    for stage in ("[1/5] photos", "[2/5] vae", "[3/5] encode", "[4/5] train", "[5/5]"):
        assert stage in proc.stdout, f"no progress line for {stage}"
    assert "revq-ray quickstart summary" in proc.stdout and "report:" in proc.stdout
    # one screen, and none of Ray's / DeepSpeed's noise (it is in the log the summary names)
    assert len(proc.stdout.splitlines()) <= 40, proc.stdout
    for noise in ("WARNING", "core_worker", "RayTrainWorker", "DeepSpeed deepspeed.ops", "Loading weights"):
        assert noise not in log, f"{noise!r} reached the console:\n{log}"
    summary = json.loads((out / "summary.json").read_text())
    assert f"log:       {summary['log']}" in proc.stdout
    ray_log = Path(summary["log"]).read_text()
    assert "RayTrainWorker" in ray_log and "[revq_ray.train] step 6/6" in ray_log
    # the trainer's progress reaches the console (ProgressFilter still reads its line format)
    assert "[4/5] train: step 6/6 (100%)" in proc.stdout and "[2/5] vae: step 20/20" in proc.stdout
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
