#!/usr/bin/env bash
# The accelerator checks in one run (written for one H200; runs on any JAX GPU/TPU backend):
#   1. FP8 matmul: the Pallas kernel vs bf16 jnp.dot at 4096^3 and 8192^3 (with the kernel's
#      difference from the XLA reference on the same inputs), a GPU tile sweep, the XLA impl too;
#   2. the MoE layer ratio to the dense floor per dispatch path (16K tokens, hidden 2048, 64 experts
#      top-8, width 512, bf16), uniform and skewed load;
#   3. the real train step's tokens/s and MFU on the `h200` shape in bf16 (16K tokens per step);
#   4. the kernel tests (FP8 matmul, router, grouped matmul) on the accelerator (tests/conftest.py
#      defaults JAX_PLATFORMS to cpu: the stage sets it to the accelerator's platform).
# Each stage writes $OUT/<stage>.log (its last line is the benchmark's JSON) under its own time limit.
#
#   OUT=/tmp/gpu_checks bash benchmarks/run_gpu_checks.sh
#   QUICK=1 JAX_PLATFORMS=cpu OUT=/tmp/gpu_checks bash benchmarks/run_gpu_checks.sh   # a dry run on CPU
set -u
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date +%T), limit ${limit}s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "exit status $?" >>"$OUT/$name.log"
  tail -n 2 "$OUT/$name.log" | cut -c1-3000
}

{ nvidia-smi 2>/dev/null | head -15; date; git rev-parse HEAD 2>/dev/null
  $PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
} >"$OUT/env.log" 2>&1
cat "$OUT/env.log"

if [ "${QUICK:-0}" = 1 ]; then
  stage fp8_matmul 300 $PY benchmarks/fp8_matmul.py --sizes 256 --impls pallas,xla --repeats 2
  stage moe_layer 300 $PY benchmarks/moe_layer.py --tokens 512 --hidden 128 --expert-width 64 --dtype bfloat16 \
    --ref-tokens 0 --runs 2 --ref-runs 1
  stage train_step 300 $PY benchmarks/train_step.py --shapes tiny --dtype bfloat16 --peak-size 512 --steps 3
  stage kernel_tests 300 $PY -m pytest -q -x tests/test_fp8_matmul.py -k gpu_kernel
  exit 0
fi
stage fp8_matmul 140 $PY benchmarks/fp8_matmul.py --sizes 4096 8192 --impls pallas,xla \
  --gpu-configs 128x128w8s4 128x256w8s3 --repeats 10
stage moe_layer 130 $PY benchmarks/moe_layer.py --tokens 16384 --hidden 2048 --experts 64 --top-k 8 --groups 8 \
  --topk-groups 4 --expert-width 512 --dtype bfloat16 --ref-tokens 0 --runs 10 --ref-runs 5 --paths ragged,dense,blocked
stage train_step 160 $PY benchmarks/train_step.py --shapes h200 --dtype bfloat16 --peak-size 8192 --steps 10
stage kernel_tests 90 env JAX_PLATFORMS="${ACCELERATOR_PLATFORM:-cuda}" $PY -m pytest -q -x -p no:cacheprovider \
  tests/test_fp8_matmul.py tests/test_topk_router.py tests/test_grouped_matmul.py
