#!/usr/bin/env bash
# GPU figures (issue 12, item 6): HighResNet3D on Keras 3 with the JAX backend against MONAI's
# HighResNet on PyTorch, on the same GPU in the same run; about 6 minutes at most (the time limits below).
#
# The GPU machine has PyTorch and JAX but no TensorFlow and no network, so the pure-Python
# packages Keras 3 and MONAI need travel with the repository as wheels. Fetch them once, on a
# machine with network access, from the repository root (benchmarks/wheels is git-ignored; send
# it along with the run, e.g. the device tool's carry=["benchmarks/wheels"]):
#
#   bash benchmarks/gpu.sh --fetch-wheels
#
# Then, on the GPU machine, from the repository root:
#
#   bash benchmarks/gpu.sh [OUT_DIR]          # GPU_BENCH_ARGS=--quick for a smoke run (CPU is fine)
#
# It installs the wheels whose module the interpreter cannot import into a scratch folder
# (nothing outside it changes), runs benchmarks/gpu_bench.py with KERAS_BACKEND=jax, ours then
# MONAI's, each in its own process under a time limit, and writes OUT_DIR/gpu.json and
# OUT_DIR/gpu.md (the table for docs/performance.md). Rows are saved as they are measured, the
# figures with targets first, so a side cut off by its time limit still reports what it measured.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels="${HIGHRES3D_WHEELS:-benchmarks/wheels}"
python="${PYTHON:-python3}"
# Distribution and the module that shows it is already there. optree and pyyaml are compiled:
# fetched for several Python versions, pip picks the one that fits.
packages=(keras:keras namex:namex optree:optree typing_extensions:typing_extensions absl-py:absl rich:rich
          markdown-it-py:markdown_it mdurl:mdurl pygments:pygments packaging:packaging pyyaml:yaml monai:monai)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p "$wheels"
    "$python" -m pip download --quiet --no-deps --only-binary=:all: -d "$wheels" keras==3.15.0 monai==1.6.1 \
        namex typing_extensions absl-py rich markdown-it-py mdurl pygments packaging
    for version in 3.10 3.11 3.12 3.13 3.14; do
        "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$version" \
            --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d "$wheels" optree pyyaml
    done
    ls "$wheels"
    exit 0
fi

out="${1:-${OUT:-gpu-results}}"
mkdir -p "$out"
site="$(mktemp -d)"
trap 'rm -rf "$site"' EXIT

export KERAS_BACKEND=jax  # before the checks: Keras' default backend, TensorFlow, is not on the GPU machine
missing=()
for p in "${packages[@]}"; do
    "$python" -c "import ${p##*:}" 2>/dev/null || missing+=("${p%%:*}")
done
if (( ${#missing[@]} )); then
    if ! compgen -G "$wheels/*.whl" > /dev/null; then
        echo "gpu.sh: $python cannot import ${missing[*]} and $wheels has no wheels:" \
             "run 'bash benchmarks/gpu.sh --fetch-wheels' where there is network and send $wheels along" >&2
        exit 2
    fi
    echo "installing from $wheels: ${missing[*]}" >&2
    "$python" -m pip install --quiet --no-deps --no-index --find-links "$wheels" --target "$site" "${missing[@]}"
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and PyTorch share the GPU in this run

"$python" - <<'PY'
import jax, keras, torch
gpu = [d for d in jax.devices() if d.platform == "gpu"]
print(f"jax {jax.__version__} devices {jax.devices()}; keras {keras.__version__} ({keras.backend.backend()}); "
      f"torch {torch.__version__}, cuda {torch.cuda.is_available()}")
if not gpu or not torch.cuda.is_available():
    print("WARNING: no GPU seen by JAX or by PyTorch: these are CPU figures", flush=True)
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# Each side in its own process, so neither framework holds GPU memory while the other runs; a side
# that runs past its limit or fails leaves the rows it measured and the other side still runs.
status=0
timeout "${GPU_OURS_SECONDS:-200}" "$python" benchmarks/gpu_bench.py --part ours --json "$out/ours.json" \
    ${GPU_BENCH_ARGS:-} || { status=$?; echo "ours: exit $status (124 = time limit); keeping its rows" >&2; }
# The delivered augmented pipeline limits its own process to 2 host cores: a process of its own.
timeout "${GPU_PIPELINE_SECONDS:-60}" "$python" benchmarks/gpu_bench.py --part pipeline --json "$out/pipeline.json" \
    ${GPU_BENCH_ARGS:-} || { status=$?; echo "pipeline: exit $status (124 = time limit)" >&2; }
timeout "${GPU_PEER_SECONDS:-100}" "$python" benchmarks/gpu_bench.py --part peer --json "$out/peer.json" \
    ${GPU_BENCH_ARGS:-} || { status=$?; echo "MONAI: exit $status (124 = time limit); keeping its rows" >&2; }
"$python" benchmarks/gpu_bench.py --part none --merge "$out/ours.json" "$out/pipeline.json" "$out/peer.json" --json "$out/gpu.json" \
    | tee "$out/gpu.md"
exit "$status"
