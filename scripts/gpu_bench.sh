#!/usr/bin/env bash
# The accelerator benchmarks of issue 14, in one go, on a machine with an NVIDIA GPU.
#
#   bash scripts/gpu_bench.sh            # from the repository root; writes gpu_bench.md
#
# Installs anycam from this checkout (no dependencies: torch, JAX/Flax and, where present,
# TensorFlow come from the machine), adds the peers' wheels from .whl/ if that folder exists
# (scripts/gpu_wheels.sh downloads them on a machine with network access), then runs on CUDA:
#   1. the torch, JAX and TensorFlow benchmarks (Grad-CAM / inference at the last stage, K = 10 /
#      one map, peers); a framework that does not import or sees no GPU is skipped with its reason;
#   2. the time breakdown of one call at batch 64, 224² (forward, tapping, gradients,
#      device→host copy, NumPy core): the share of the copy and the core is the design question
#      of issue 14 (should the core run on the device?);
#   3. issue 21: ResNet-50, 224², batch 64, float32 and bfloat16 / float16: Grad-CAM with
#      arrays="native" and arrays="numpy" against inference, K = 10, differentiable=True, Captum's
#      and torchcam's Grad-CAM on the same card, peak device memory; JAX native mode and jit(explain_fn);
#   4. issue 22: rollout and gradient-weighted attention on a ViT-B/16-shaped model, batch 8.
# Matmuls run in full float32 (TF32 off in torch, "highest" precision in JAX) unless
# ANYCAM_TF32=1: the 1e-5 agreement of native maps with NumPy's assumes full float32.
# The report goes to stdout and to $OUT/gpu_bench.md (or ./gpu_bench.md without OUT).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=${ANYCAM_SITE:-/tmp/anycam-site}
REPORT=${OUT:-.}/gpu_bench.md
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and torch share the GPU in one process
if [ "${ANYCAM_TF32:-0}" != 1 ]; then
    export NVIDIA_TF32_OVERRIDE=0 JAX_DEFAULT_MATMUL_PRECISION=highest  # cuBLAS/cuDNN (all three), XLA
fi

"$PY" -m pip install -q --no-deps --no-build-isolation --no-index --target "$SITE" . || exit 1
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-deps --no-index --no-compile --target "$SITE" .whl/*.whl || exit 1
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

{
    echo "# anycam on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || echo 'no GPU found')"
    echo
    "$PY" - <<'PY'
import importlib
for name in ("numpy", "torch", "jax", "flax", "tensorflow", "captum", "torchcam", "pytorch_grad_cam"):
    try:
        print(f"- {name} {importlib.import_module(name).__version__}")
    except Exception as exc:  # a missing framework is reported, not fatal
        print(f"- {name}: not importable ({type(exc).__name__}: {exc})")
PY
    echo
    echo "## Benchmarks on CUDA (batch 8, 224²)"
    "$PY" -m tests.benchmarks --device cuda torch jax tensorflow
    echo
    echo "## Where the time of one call goes, batch 64, 224², CUDA"
    "$PY" -m tests.benchmarks --device cuda --phases --batch 64 --repeats 5 torch jax tensorflow
    for dtype in float32 bfloat16 float16; do
        echo
        echo "## Issue 21: native and NumPy modes, batch 64, 224², CUDA, $dtype"
        "$PY" -m tests.benchmarks --device cuda --batch 64 --dtype "$dtype" native_torch native_jax
    done
    echo
    echo "## Issue 22: attention methods, ViT-B/16 shape, batch 8, 224², CUDA"
    "$PY" -m tests.benchmarks --device cuda attention
} 2>&1 | tee "$REPORT"
