#!/usr/bin/env bash
# The wheels a bare CUDA machine needs for benchmarks/gpu_check.sh, into .whl/ (ignored by git).
#
#   bash benchmarks/gpu_wheels.sh                        # for a GPU image with Python 3.12 (the default)
#   GPU_PYTHON=3.13 bash benchmarks/gpu_wheels.sh        # for one with 3.11 / 3.13
#
# Run it where pip reaches PyPI (any Linux machine, any Python >= 3.9 with pip: nothing is installed here),
# then copy the checkout, .whl/ included, to the GPU machine and run `bash benchmarks/gpu_check.sh` there:
# it installs these wheels offline. Budget: the wheels plus the source tree stay under 60 MiB (machines that
# take code and wheels together often cap them at 64 MiB); the script fails if they do not, and prints both.
#
# What the GPU image is assumed to hold already (a typical PyTorch image): Python with torch (CUDA build) and
# its dependencies, numpy, pyarrow, pandas, tensorboard (+ protobuf), huggingface_hub (+ pyyaml, filelock,
# fsspec, packaging, tqdm) and pytest. What it lacks, and this folder brings (benchmarks/gpu_wheels.txt pins
# each with the reason):
# - ray 2.60, slimmed: its wheel is 75.6 MiB, over the budget by itself. Removed: ray/jars/ (Java workers)
#   and ray/dashboard/client/build/ (the dashboard's web client); ray.init() and Ray Train do not use them,
#   and the dashboard's Python packages are not brought either (revq_ray.runtime.init_ray starts without it).
#   The repacked wheel is a valid wheel: the removed files leave its RECORD too.
# - deepspeed 0.19.8, which PyPI has only as an sdist: built here into a py3-none-any wheel (no ops
#   pre-compiled, DS_BUILD_OPS=0, as a plain `pip install deepspeed` does).
# - pydantic & co., DeepSpeed's and Ray's small dependencies, tensorboardX, safetensors, requests & co.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${WHEELS:-.whl}
GPU_PYTHON=${GPU_PYTHON:-3.12}
PLATFORM=${GPU_PLATFORM:-manylinux2014_x86_64}
PY=${PY:-$(command -v python3)}
LIMIT_MIB=${LIMIT_MIB:-60}
TAG=cp${GPU_PYTHON/./}
REQS=benchmarks/gpu_wheels.txt

mkdir -p "$OUT"
rm -f "$OUT"/*.whl "$OUT"/*.tmp
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Binary wheels for the GPU machine's Python and platform, each pinned, without dependency resolution (the
# list is the closure of what the check imports beyond the image; the rehearsal, tests/gpu/test_rehearsal.py,
# proves it on a bare Python 3.12 environment). manylinux_2_28 covers wheels that dropped manylinux2014.
grep -vE '^\s*(#|$)' "$REQS" | sed 's/\s*#.*//' | grep -v '^deepspeed==' > "$tmp/binary.txt"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp/dl" \
  --python-version "$GPU_PYTHON" --implementation cp --abi "$TAG" --abi abi3 --abi none \
  --platform "$PLATFORM" --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
  -r "$tmp/binary.txt"
# DeepSpeed: sdist only; built in an isolated environment, without ops (JIT-built where needed, on the GPU).
ds=$(grep -E '^deepspeed==' "$REQS" | sed 's/\s*#.*//')
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-binary deepspeed --wheel-dir "$tmp/dl" "$ds"

# Ray without its Java jars and the dashboard's web client; RECORD rewritten to match.
"$PY" - "$tmp/dl" <<'EOF'
import sys, zipfile
from pathlib import Path

DROP = ("ray/jars/", "ray/dashboard/client/build/")
for whl in Path(sys.argv[1]).glob("ray-*.whl"):
    slim = whl.with_suffix(".slim")
    dropped = 0
    with zipfile.ZipFile(whl) as zin, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as zout:
        record = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        for info in zin.infolist():
            if info.filename.startswith(DROP):
                dropped += info.file_size
                continue
            data = zin.read(info)
            if info.filename == record:
                lines = data.decode().splitlines(keepends=True)
                data = "".join(ln for ln in lines if not ln.startswith(DROP)).encode()
            zout.writestr(info, data)  # the same ZipInfo: names, modes (executables stay executable), dates
    print(f"slimmed {whl.name}: {whl.stat().st_size / 2**20:.1f} -> {slim.stat().st_size / 2**20:.1f} MiB "
          f"({dropped / 2**20:.1f} MiB of jars and dashboard client removed, RECORD updated)")
    slim.replace(whl)
EOF
mv "$tmp"/dl/*.whl "$OUT"/
echo "python $GPU_PYTHON ($TAG, $PLATFORM)" > "$OUT/TARGET"

# The budget: these wheels plus the tracked source tree.
"$PY" - "$OUT" "$LIMIT_MIB" "$ROOT" <<'EOF'
import subprocess, sys
from pathlib import Path

out, limit, root = Path(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3])
wheels = sorted(out.glob("*.whl"), key=lambda p: -p.stat().st_size)
for w in wheels:
    print(f"  {w.stat().st_size / 2**20:6.2f} MiB  {w.name}")
w_mib = sum(w.stat().st_size for w in wheels) / 2**20
files = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
tree_mib = sum((root / f).stat().st_size for f in files.decode().split("\0") if f and (root / f).is_file()) / 2**20
total = w_mib + tree_mib
print(f"{len(wheels)} wheels {w_mib:.1f} MiB + source tree (git ls-files) {tree_mib:.1f} MiB = {total:.1f} MiB "
      f"(limit {limit:.0f} MiB) in {out}/")
sys.exit(0 if total < limit else f"gpu_wheels: {total:.1f} MiB is over the {limit:.0f} MiB budget")
EOF
