#!/usr/bin/env bash
# Device check of issue #11 (FP8 training): FP8 vs bf16 GEMM TFLOP/s at 4096^3 and 8192^3, proof
# from the compiled HLO that the FP8 GEMMs run natively, and the bf16 vs FP8 train step of a
# ~1B-parameter shape. Writes OUT/fp8_gpu.{json,txt}, OUT/env.txt (and OUT/nvidia-smi.txt).
# Budget: < 8 minutes on one H100/H200 (the python part is capped at 450 s; whatever finished
# is already on disk). Without a GPU it runs a tiny CPU smoke, says so, and exits 0.
#
#   OUT=/tmp/out bash benchmarks/device_check.sh          # from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  date -u
  "$PY" -c 'import sys; print("python", sys.version.split()[0])'
  "$PY" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__); print(jax.devices())' 2>&1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if command -v nvidia-smi > /dev/null; then nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1; fi
if ! "$PY" -c 'import jax, flax, optax, pydantic, orbax.checkpoint' 2> "$OUT/import_error.txt"; then
  echo "missing python packages (see $OUT/import_error.txt): pip install -e . first"
  exit 1
fi
timeout 450 "$PY" benchmarks/fp8_gpu.py --out "$OUT" "$@"
rc=$?
if [ $rc -eq 124 ]; then echo "fp8_gpu.py hit the 450 s cap: partial results in $OUT"; fi
exit $rc
