#!/usr/bin/env bash
# Rehearse the GPU check here, on the CPU, before a GPU machine is paid for: a Python 3.12 environment
# holding only what a bare GPU image holds (torch, numpy, pyarrow, pandas, tensorboard, huggingface_hub,
# pytest), the wheel folder of benchmarks/gpu_wheels.sh installed offline, and benchmarks/gpu_check.sh
# --device cpu: every import and code path of the check at tiny shapes. A missing wheel, or a line that only
# Python 3.11 accepts, fails here rather than on the GPU.
#
#   bash benchmarks/gpu_rehearsal.sh        # tests/gpu/test_rehearsal.py runs this (pytest -m extended)
#
# The "image" environment is made once (pip, from PyPI or pip's cache) in $GPU_IMAGE_VENV (default
# ~/.cache/revq_ray/gpu-image-py3.12) and never modified after: the wheels go to .gl/site-py3.12/. .whl/ is
# filled by gpu_wheels.sh when it is empty (that needs PyPI once). The check itself runs with the network
# cut off (unshare --net, where the machine allows it; else pip's --no-index alone keeps it offline).
set -euo pipefail
cd "$(dirname "$0")/.."
PY312=${GPU_IMAGE_PYTHON:-}
if [ -z "$PY312" ]; then  # python3.12 on PATH (a pyenv shim may not run here), else pyenv's own 3.12
  for cand in "$(command -v python3.12 || true)" /usr/bin/python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
    if [ -n "$cand" ] && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      PY312=$cand; break
    fi
  done
fi
IMAGE=${GPU_IMAGE_VENV:-$HOME/.cache/revq_ray/gpu-image-py3.12}
IMAGE_PKGS=(torch==2.11.0 numpy pyarrow pandas tensorboard huggingface_hub pytest)
[ -n "$PY312" ] && "$PY312" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null \
  || { echo "gpu_rehearsal: no Python 3.12 found (set GPU_IMAGE_PYTHON=/path/to/python3.12)" >&2; exit 2; }

ready="$IMAGE/.image-ready"
if [ ! -f "$ready" ] || [ "$(cat "$ready")" != "${IMAGE_PKGS[*]}" ]; then
  echo "gpu_rehearsal: making the image environment $IMAGE (${IMAGE_PKGS[*]})"
  rm -rf "$IMAGE"
  "$PY312" -m venv "$IMAGE"
  "$IMAGE/bin/pip" install --quiet "${IMAGE_PKGS[@]}"
  echo "${IMAGE_PKGS[*]}" > "$ready"
fi
# The image must not already hold what the wheels bring, or the rehearsal would prove nothing.
"$IMAGE/bin/python" - <<'EOF'
import importlib.util, sys
present = [m for m in ("ray", "deepspeed", "pydantic", "hjson", "jsonschema", "tensorboardX")
           if importlib.util.find_spec(m)]
sys.exit(f"gpu_rehearsal: the image environment already has {present}: remove it" if present else 0)
EOF
ls .whl/*.whl >/dev/null 2>&1 || bash benchmarks/gpu_wheels.sh

NET=()
if unshare --net true 2>/dev/null; then
  NET=(unshare --net sh -c 'ip link set lo up 2>/dev/null || true; exec "$@"' --)
  echo "gpu_rehearsal: the check runs without network (unshare --net; loopback only)"
fi
rm -rf .gl/site-py3.12  # install afresh: the rehearsal covers the install too
# Rehearsal timeouts: 6x the GPU's (2 shared cores, Ray start and DeepSpeed's JIT build of its CPU op).
"${NET[@]}" env PY="$IMAGE/bin/python" PIP_NO_INDEX=1 GPU_CHECK_TIMEOUT=3000 \
  bash benchmarks/gpu_check.sh --device cpu --timeout-scale 6 "$@"
