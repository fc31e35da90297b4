#!/usr/bin/env bash
# GPU figures (issue 12, item 6): HighResNet3D on Keras 3 with the JAX backend against MONAI's
# HighResNet on PyTorch, on the same GPU in the same run; finishes in under 5 minutes.
#
# The GPU machine has PyTorch and JAX but no TensorFlow and no network, so the few pure-Python
# wheels Keras 3 and MONAI need travel with the repository. Fetch them once, on a machine
# with network access, from the repository root:
#
#   python -m pip download --no-deps --only-binary=:all: -d benchmarks/wheels \
#       keras==3.15.0 namex optree monai==1.6.1 pyyaml
#
# (optree and pyyaml are compiled: download them for the GPU machine's Python, e.g. with
# --python-version 3.11 --platform manylinux2014_x86_64.) Then, on the GPU machine, from the
# repository root:
#
#   bash benchmarks/gpu.sh [OUT_DIR]          # GPU_BENCH_ARGS=--quick for a smoke run
#
# It installs the wheels into a scratch folder (nothing outside it changes), runs
# benchmarks/gpu_bench.py with KERAS_BACKEND=jax, and writes OUT_DIR/gpu.json and
# OUT_DIR/gpu.md (the table for docs/performance.md). Wheels already importable are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu-results}}"
wheels="${HIGHRES3D_WHEELS:-benchmarks/wheels}"
python="${PYTHON:-python3}"
mkdir -p "$out"
site="$(mktemp -d)"
trap 'rm -rf "$site"' EXIT

if compgen -G "$wheels/*.whl" > /dev/null; then
    "$python" -m pip install --quiet --no-deps --no-index --target "$site" "$wheels"/*.whl
else
    echo "no wheels in $wheels: using what $python already has (see the header of this script)" >&2
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export KERAS_BACKEND=jax
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and PyTorch share the GPU in this run

"$python" - <<'PY'
import jax, keras, torch
print(f"jax {jax.__version__} devices {jax.devices()}; keras {keras.__version__} ({keras.backend.backend()}); "
      f"torch {torch.__version__}, cuda {torch.cuda.is_available()}")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# Each side in its own process, so neither framework holds GPU memory while the other runs.
timeout 150 "$python" benchmarks/gpu_bench.py --part ours --json "$out/ours.json" ${GPU_BENCH_ARGS:-}
timeout 120 "$python" benchmarks/gpu_bench.py --part peer --json "$out/gpu.json" --merge "$out/ours.json" ${GPU_BENCH_ARGS:-} \
    | tee "$out/gpu.md"
