#!/usr/bin/env bash
# Device check of issue #13 (and #11) on one H100/H200, about 8 minutes: env + PJRT plugins,
# the CUDA plugin registered by path, a GPU pytest subset, bf16 training MFU of a ~1B shape,
# FP8 vs bf16 GEMM + FP8-in-HLO proof, MoE dispatch step times, decode throughput, serving
# (continuous vs static batching, MHA/GQA/MQA at one KV budget). Each part
# runs in its own process under its own cap (benchmarks/device_check.py); results in
# OUT/device_check.json (+ device_check.log, env.txt, nvidia-smi.txt).
#
#   OUT=/tmp/out bash benchmarks/device_check.sh          # from the repository root
#   OUT=/tmp/out bash benchmarks/device_check.sh --dry    # CPU, tiny sizes (what the tests run)
#
# Python packages the GPU image lacks (pydantic and its three helpers) travel as wheels in
# .whl/ (see benchmarks/README.md "Device check"); they are installed to a temporary folder.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" > /dev/null; then
  SITE="$(mktemp -d)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl \
    || echo "wheel install from .whl/ failed"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  date -u
  "$PY" -c 'import sys, jax, flax, optax; print("python", sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__)' 2>&1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if command -v nvidia-smi > /dev/null; then nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1; fi
if ! "$PY" -c 'import jax, flax, optax, pydantic, orbax.checkpoint, yaml' 2>> "$OUT/env.txt"; then
  echo "missing python packages (see $OUT/env.txt): pip install -e . first, or carry wheels in .whl/"
  exit 1
fi
CAP=505                        # the parts' budget (495 s) + start-up; --dry: 5x (slow CPUs)
for a in "$@"; do if [ "$a" = "--dry" ]; then CAP=2530; fi; done
timeout "$CAP" "$PY" benchmarks/device_check.py --out "$OUT" "$@"
rc=$?
if [ $rc -eq 124 ]; then echo "device_check.py hit the $CAP s cap: partial results in $OUT"; fi
exit $rc
