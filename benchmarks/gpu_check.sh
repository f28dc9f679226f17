#!/usr/bin/env bash
# The device run of issue 15, one call: the gpu tests, training and sampling speed beside diffusers,
# peak memory, the bf16 matmul ceiling and the host-sync count of the sampling loop. Results:
# $OUT/gpu_check.json, $OUT/gpu_check.md (the table), $OUT/gpu_tests.log, $OUT/gpu_check.log.
#
# From this machine (the wheels travel as the ignored folder .whl; see /work/.library/device/README.md):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
#   device run, carry [".whl"], timeout_s 560:  bash benchmarks/gpu_check.sh
# Rehearsal on the CPU (tiny sizes, every code path but CUDA graphs and torch.compile):
#   DEVICE=cpu DRY_RUN=1 BUDGET=1200 OUT=/tmp/gc bash benchmarks/gpu_check.sh   (a loaded 2-core CPU)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import diffusers" 2>/dev/null; then
  # diffusers is not on the device image: install the carried wheels (diffusers, importlib_metadata)
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl; then
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
  else
    echo "could not install the carried wheels: the diffusers rows will say skipped"
  fi
fi
python3 -c "import diffusers; print('diffusers', diffusers.__version__)" 2>/dev/null \
  || echo "diffusers not importable: its rows will be skipped"
args=(--device "${DEVICE:-cuda}" --out "$OUT" --budget "${BUDGET:-450}")
[ -n "${DRY_RUN:-}" ] && args+=(--dry-run)
# 450 s budget for starting parts, each part capped by the time left: the whole stays under 8 minutes
timeout $(( ${BUDGET:-450} + 25 )) python3 benchmarks/gpu_check.py "${args[@]}" 2>&1 | tee "$OUT/gpu_check_stdout.log"
