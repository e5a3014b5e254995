#!/usr/bin/env bash
# One command for a lent GPU machine (H100/H200; Python with a CUDA torch, nvcc, ninja, no
# internet): builds for sm_90 with every core, runs the whole test suite on the GPU,
# compute-sanitizer memcheck and racecheck over the CUDA tests, and the benchmark. Logs and
# results go under $OUT (default /tmp/fastdropout-gpu); the summary is printed last.
#
#   bash scripts/gpu_check.sh            # everything (about 8 minutes on an H200)
#   FD_SKIP_SANITIZER=1 bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/fastdropout-gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
status=0
step() { echo "== [${SECONDS}s] $*"; }

step "environment"
{ nvidia-smi; "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"; nvcc --version | tail -2; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | grep -E "torch|release|H100|H200" | head -5

step "build (sm_90, $(nproc) jobs)"
if ! TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)" FASTDROPOUT_PTXAS_VERBOSE=1 \
    "$py" -m pip install --no-build-isolation --no-deps --no-index -v -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  exit 1
fi
"$py" -c "import fastdropout; assert fastdropout.cuda_kernels_built(), 'no CUDA kernels'; print('CUDA kernels built')"
# Resource report: registers, and any spill or stack (there should be none).
grep -E "registers|spill|stack frame" "$OUT/build.log" | sort | uniq -c | sort -rn | head -8
so=$(ls fastdropout/_C*.so)
cuobjdump --dump-sass "$so" > "$OUT/sass.txt" 2>&1 || true
echo "SASS: $(grep -c 'LDG.E.128' "$OUT/sass.txt") LDG.E.128, $(grep -c 'STG.E.128' "$OUT/sass.txt") STG.E.128, $(grep -c -E 'LDL|STL' "$OUT/sass.txt") local-memory accesses"

step "test suite on the GPU"
"$py" -m pytest tests -q -p no:cacheprovider -rs > "$OUT/tests.log" 2>&1 || status=1
tail -5 "$OUT/tests.log"

if [ -z "${FD_SKIP_SANITIZER:-}" ] && command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck; do
    step "compute-sanitizer --tool $tool (CUDA tests, without the 2^31-element and compile ones)"
    timeout 240 compute-sanitizer --tool "$tool" --error-exitcode 9 "$py" -m pytest tests/test_cuda.py -q -p no:cacheprovider \
      -k "not 2_pow_31 and not compile and not graph" > "$OUT/sanitizer-$tool.log" 2>&1 || status=1
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$OUT/sanitizer-$tool.log" | tail -3
  done
fi

step "benchmark"
"$py" -m fastdropout.bench --json "$OUT/bench.json" --plot "$OUT/bench.png" > "$OUT/bench.txt" 2> "$OUT/bench.err" || status=1
grep -E "^#|^op | 4096 | 65536 | 268435456 " "$OUT/bench.txt" | head -80

step "done (status $status)"
exit $status
