#!/usr/bin/env bash
# The GPU check, one command, on any machine with a CUDA GPU and Python 3.11-3.13 with torch (CUDA build):
#
#   bash benchmarks/gpu_wheels.sh      # once, where pip reaches PyPI: fills .whl/ (ray, deepspeed, pydantic, ...)
#   bash benchmarks/gpu_check.sh       # on the GPU machine (offline is fine), the checkout with .whl/ beside it
#
# When .whl/ holds wheels, they are installed offline (pip --no-index --no-deps --target) into
# .gl/site-pyX.Y/, which then comes first on PYTHONPATH (Ray's local workers inherit it), so the image's own
# packages are never modified. Without .whl/, the Python must already have the project's dependencies
# (a `make venv` environment, .venv/ or .venv-X.Y/, is used when present). Then benchmarks/gpu_check.py runs
# each part under its own timeout (under 8 minutes in all) and prints one table; the JSON goes to
# benchmarks/results/gpu_check.json. Arguments go to gpu_check.py (`--device cpu`: the CPU rehearsal).
# Exit: 0 all parts passed, 1 a part failed, 2 no CUDA device, 3 the wheels could not be installed.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}
PY=${PY:-}
if [ -z "$PY" ]; then  # the image's python3 with wheels at hand, else a `make venv` environment if any
  for cand in .venv/bin/python .venv-3.12/bin/python .venv-3.13/bin/python; do
    if [ -x "$cand" ] && ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then PY=$cand; break; fi
  done
  PY=${PY:-python3}
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
PYVER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])') || { echo "gpu_check: $PY does not run" >&2; exit 3; }
"$PY" -c 'import torch' 2>/dev/null || { echo "gpu_check: $PY has no torch (the check expects a PyTorch image)" >&2; exit 3; }

if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  want=$(awk '{print $2; exit}' "$WHEELS/TARGET" 2>/dev/null)
  if [ -n "$want" ] && [ "$want" != "$PYVER" ]; then
    echo "gpu_check: $WHEELS/ holds wheels for Python $want, and $PY is $PYVER:" \
      "run GPU_PYTHON=$PYVER bash benchmarks/gpu_wheels.sh where pip reaches PyPI" >&2
    exit 3
  fi
  SITE=.gl/site-py$PYVER
  stamp="$SITE/.installed-$(ls -l "$WHEELS"/*.whl | cksum | cut -d' ' -f1)"
  if [ ! -f "$stamp" ]; then
    rm -rf "$SITE"
    t0=$(date +%s)
    # Offline and only these files: no index, no find-links or config from the machine, no dependency
    # resolution (the folder is the closure; the image provides the rest).
    if "$PY" -m pip --version >/dev/null 2>&1; then
      env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL PIP_CONFIG_FILE=/dev/null \
        timeout 300 "$PY" -m pip install --quiet --no-index --no-deps --disable-pip-version-check \
        --target "$SITE" "$WHEELS"/*.whl || { echo "gpu_check: installing $WHEELS/*.whl failed" >&2; exit 3; }
    else
      # No pip in the image: a wheel is a zip; unpack it as pip --target would (modes kept, .data merged).
      timeout 300 "$PY" - "$SITE" "$WHEELS"/*.whl <<'EOF' || { echo "gpu_check: unpacking the wheels failed" >&2; exit 3; }
import os, shutil, sys, zipfile
from pathlib import Path
site = Path(sys.argv[1])
for whl in sys.argv[2:]:
    with zipfile.ZipFile(whl) as z:
        for info in z.infolist():
            parts = info.filename.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue  # scripts, headers: not needed to import
                parts = parts[2:]
            dest = site.joinpath(*parts)
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst)
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                os.chmod(dest, mode)
EOF
    fi
    touch "$stamp"
    echo "gpu_check: installed $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS/ into $SITE/ in $(( $(date +%s) - t0 )) s (offline)"
  fi
  export PYTHONPATH="$PWD/$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! err=$("$PY" -c 'import ray, deepspeed, pydantic, ray.train.torch' 2>&1); then
  echo "$err" | tail -4 >&2
  echo "gpu_check: $PY cannot import ray, deepspeed and pydantic (above): run bash benchmarks/gpu_wheels.sh" \
    "(where pip reaches PyPI) and bring $WHEELS/ along, or use an environment from make venv" >&2
  exit 3
fi
# DeepSpeed picks CUDA by itself; the training workers are told explicitly (revq_ray.train.driver.worker_env).
unset DS_ACCELERATOR
export RAY_DEDUP_LOGS=0
exec timeout "${GPU_CHECK_TIMEOUT:-475}" "$PY" benchmarks/gpu_check.py "$@"
