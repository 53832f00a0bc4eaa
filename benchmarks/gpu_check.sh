#!/usr/bin/env bash
# The CUDA kernel's checks on a machine with a CUDA GPU, in one run: build and install the
# package with the CUDA kernel (no network needed: build dependencies must be installed), run
# the GPU tests and the CPU kernel's tests, then the GPU benchmarks (the kernel's step, and
# host-offloaded state's device memory and step time), and bitsandbytes' step where torch and
# bitsandbytes are installed. Every stage runs even when an earlier one fails, logs to
# $OUT/<stage>.log, and the summary at the end lists each stage's exit status and seconds
# (about 5 minutes on an H200 machine with 16 cores).
#
# Usage, from the repository root:  OUT=/tmp/optax8-gpu benchmarks/gpu_check.sh
# SKIP_STAGES="cpu_tests bnb" leaves the named stages out.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
summary=()

stage() {  # stage NAME TIMEOUT_SECONDS COMMAND...
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  if [[ " ${SKIP_STAGES:-} " == *" $name "* ]]; then
    summary+=("$(printf '%-10s skipped (SKIP_STAGES)' "$name")")
    return
  fi
  echo "== $name: $*"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  summary+=("$(printf '%-10s exit %3d  %4ds  %s' "$name" "$rc" $((SECONDS - start)) "$OUT/$name.log")")
  tail -n 15 "$OUT/$name.log"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  nvcc --version | tail -n 2
  "$PYTHON" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
} >"$OUT/env.log" 2>&1

# Editable, so that the source tree imported from here finds the libraries the build installed.
stage build 150 env OPTAX8_CUDA=ON "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -v -e .
stage tests 240 "$PYTHON" -m pytest -p no:cacheprovider -o addopts= -q -rs --durations=10 \
  --rootdir=. tests/test_gpu.py
# The CPU kernel built against this machine's jaxlib, on its CPU backend.
stage cpu_tests 300 env JAX_PLATFORMS=cpu "$PYTHON" -m pytest -p no:cacheprovider -o addopts= -q -rs \
  --rootdir=. tests/test_native.py
stage benchmark 120 "$PYTHON" -m benchmarks.gpu_step
# Host-offloaded state: the compiled step's device bytes and step time, offloaded and not.
stage offload 180 "$PYTHON" -m benchmarks.offload --params 1e8 1e9
# bitsandbytes' Adam8bit on the same GPU, where torch and bitsandbytes are installed.
if "$PYTHON" -c "import bitsandbytes, torch" >/dev/null 2>&1; then
  stage bnb 60 "$PYTHON" -m benchmarks.bnb_step
fi

echo
echo "== summary"
cat "$OUT/env.log"
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.log"
grep -hE "passed|failed|error" "$OUT/tests.log" "$OUT/cpu_tests.log" 2>/dev/null | tail -n 6
grep -hE "^target|kernel:" "$OUT/benchmark.log"
grep -hE "offloading saves" "$OUT/offload.log" 2>/dev/null
if [[ -f "$OUT/bnb.log" ]]; then tail -n 6 "$OUT/bnb.log"; fi
