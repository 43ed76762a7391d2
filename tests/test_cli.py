"""The revq-ray command line: help lists every subcommand, bad input errors clearly."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from revq_ray import cli

pytestmark = pytest.mark.eval

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = [
    "quickstart",
    "encode",
    "train",
    "tune",
    "eval",
    "compare",
    "vae",
    "import-revq",
    "export-revq",
    "tokenize",
    "detokenize",
    "prior",
    "sample",
]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "revq_ray", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_help_lists_subcommands():
    proc = _run("--help")
    assert proc.returncode == 0, proc.stderr
    for name in SUBCOMMANDS:
        assert f"  {name} " in proc.stdout, f"{name} missing from help:\n{proc.stdout}"
    assert list(cli.COMMANDS) == SUBCOMMANDS


def test_console_script_help():
    exe = shutil.which("revq-ray") or str(Path(sys.executable).with_name("revq-ray"))
    if not Path(exe).exists():
        pytest.skip("revq-ray console script not installed (pip install -e .)")
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "quickstart" in proc.stdout


def test_bad_subcommand_errors_clearly(capsys):
    assert cli.main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'frobnicate'" in err and "quickstart" in err
    proc = _run("frobnicate")
    assert proc.returncode == 2 and "unknown command" in proc.stderr


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help_delegates(command):
    # Each subcommand's own argparse answers --help (exit 0) with its options.
    proc = _run(command, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout and "--" in proc.stdout
