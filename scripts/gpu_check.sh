#!/usr/bin/env bash
# The check for a lent GPU machine (H100/H200, 16 cores, a CUDA torch, nvcc, no network), in
# stages by priority, each under its own timeout, the whole within FD_CHECK_SECONDS (default
# 465 s, so that with the summary it stays under 8 minutes):
#
#   stage          budget  what
#   env               10s  GPU, driver, torch, nvcc, tools (no GPU: says so and exits 2)
#   build            140s  setup.py build_ext --inplace, sm_90, every core, ptxas -v
#   sass              20s  scripts/sass_report.py: per-kernel registers, spills, 16-byte accesses
#   correctness       75s  pytest -m gpu_stage2 (+ the NaN rule and the sharded ops on CUDA):
#                          CPU vs CUDA bitwise, shards vs slices of the unsharded result
#   bench             80s  2^28 fp32/bf16/fp16 fwd/bwd/fwd+bwd vs copy and torch eager; fused
#                          shapes; then bench/sharded.py (2^26 bf16: every sharded op vs unsharded)
#   bench-small       25s  4K..64K elements (host overhead), first-call rows
#   memcheck          55s  compute-sanitizer memcheck, PYTORCH_NO_CUDA_MEMORY_CACHING=1, over 32
#                          correctness tests that launch every kernel (views, NaN, misaligned,
#                          permuted) and the 2 sharded-op tests on CUDA
#   racecheck         30s  racecheck on 21 fused tests (fp32 and fp64 accumulators), if a kernel
#                          uses shared memory (from the SASS report)
#   -- the budgets above add up to 435 s, 459 s with each stage's 3 s kill grace --
#   cuda-rest         60s  the other CUDA tests and the fuzz tests         } only with the time
#   compile-bench     90s  torch.compile rows (2^28 bf16, fused 65536x4096) } that is left, in
#   suite-rest       120s  the rest of the suite                            } this order
#
# A stage starts only with at least 10 s left and never runs past the deadline. Files under
# $OUT (default /tmp/fastdropout-gpu), six at most: build.log (build and SASS report), tests.log,
# sanitizer.log, bench.txt, bench.json, summary.txt. The summary, with every figure, is printed
# last. Exit status 0 only when a GPU was there and every stage that ran passed.
#
#   bash scripts/gpu_check.sh
#   FD_CHECK_STAGES=build,sass,bench bash scripts/gpu_check.sh     # some stages only
#   FD_CHECK_NO_GPU=1 bash scripts/gpu_check.sh                    # without a GPU: the stages
#                                                                  # that need none (exit 2)
set -uo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--stage" ]; then   # one stage's body, run by run_stage under its timeout
  stage="$2"
else
  stage=""
fi

export OUT="${OUT:-/tmp/fastdropout-gpu}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PY="${PYTHON:-python3}"
# The build is in place (stage build) and not installed: scripts run from the tree (bench/*.py)
# must find this tree's fastdropout first.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py="$PY"
pytest_cmd=("$py" -m pytest -q -p no:cacheprovider -rfE)

stage_body() {
  case "$1" in
    env)
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || echo "nvidia-smi: none"
      "$py" -c "import platform, torch; print('python', platform.python_version(), '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| GPU', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
      { nvcc --version 2>/dev/null | grep -o "release [0-9.]*" || echo "nvcc: none"; } | sed 's/^/nvcc /'
      echo "cores $(nproc) | compute-sanitizer $(command -v compute-sanitizer || echo none) | cuobjdump $("$py" scripts/sass_report.py --find-cuobjdump || echo none)"
      ;;
    build)
      TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="$(nproc)" FASTDROPOUT_PTXAS_VERBOSE=1 \
        "$py" setup.py build_ext --inplace &&
      "$py" -c "import fastdropout, sys; sys.exit(0 if fastdropout.cuda_kernels_built() else 'built without the CUDA kernels')"
      ;;
    sass)
      "$py" scripts/sass_report.py --json "$WORK/sass.json"
      ;;
    correctness)   # CPU vs CUDA bit for bit, views, > 2^31 elements, graphs, grad_bias, NaN rule
      "${pytest_cmd[@]}" tests -k "gpu_stage2 or (cuda and nan) or (sharded and cuda)" --durations=8
      ;;
    bench)
      "$py" -m fastdropout.bench --device cuda --sizes 28 --dtypes fp32,bf16,fp16 \
        --fused-shapes 65536x4096,4096x4096,16384x1024 --no-compile --json "$WORK/bench-large.json" &&
      timeout 25 "$py" bench/sharded.py --device cuda --numel $((1 << 26)) --dtype bfloat16 --repeats 9
      ;;
    bench-small)
      "$py" -m fastdropout.bench --device cuda --quick --sizes 12,14,16 --dtypes fp32,bf16,fp16 \
        --no-fused --no-compile --json "$WORK/bench-small.json"
      ;;
    memcheck)
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 9 $(kernel_filter) \
        "${pytest_cmd[@]}" tests/test_cuda.py tests/test_dtensor.py \
        -k "views_match or nan_rule or misaligned_fused or permuted_layouts or (bit_identical and 4099) or (sharded and cuda)"
      ;;
    racecheck)
      if ! "$py" - "$WORK/sass.json" <<'EOF'
import json, os, sys
if not os.path.exists(sys.argv[1]):
    sys.exit(print("no SASS report: racecheck runs anyway"))
kernels = [k for k in json.load(open(sys.argv[1]))["kernels"] if (k["shared"] or 0) > 0]
print("kernels with shared memory:", ", ".join(sorted({k["kernel"] for k in kernels})) or "none")
sys.exit(0 if kernels else 3)
EOF
      then
        echo "racecheck: no kernel uses shared memory: nothing to check"
        return 0
      fi
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck --error-exitcode 9 $(kernel_filter) \
        "${pytest_cmd[@]}" tests/test_cuda.py \
        -k "(fused_cpu_and_cuda and (dtype0 or dtype1)) or bias_grad_deterministic or misaligned_fused"
      ;;
    cuda-rest)
      "${pytest_cmd[@]}" tests -k "(cuda or fuzz) and not gpu_stage2"
      ;;
    compile-bench)
      "$py" -m fastdropout.bench --device cuda --sizes 28 --dtypes bf16 --fused-shapes 65536x4096 \
        --first-calls 0 --json "$WORK/bench-compile.json"
      ;;
    suite-rest)
      "${pytest_cmd[@]}" tests -k "not cuda and not fuzz and not gpu_stage2"
      ;;
    *) echo "unknown stage $1" >&2; return 2 ;;
  esac
}

# Only our kernels are instrumented where this compute-sanitizer can filter by kernel name
# (torch's own kernels then run at full speed).
kernel_filter() {
  if compute-sanitizer --help 2>/dev/null | grep -q -- "--kernel-name "; then
    echo "--kernel-name kns=_cuda_kernel"
  fi
}

if [ -n "$stage" ]; then
  stage_body "$stage"
  exit $?
fi

# ------------------------------------------------------------------------------------------
# The driver: stages in priority order, each under min(its budget, time left).

DEADLINE="${FD_CHECK_SECONDS:-465}"
GRACE=3          # seconds between the stage's TERM and KILL
MIN_STAGE=10     # no stage starts with less than this left
ALL_STAGES="env build sass correctness bench bench-small memcheck racecheck cuda-rest compile-bench suite-rest"
SELECTED=" $(echo "${FD_CHECK_STAGES:-$ALL_STAGES}" | tr ',' ' ') "
NEEDS_GPU=" bench bench-small memcheck racecheck compile-bench "
declare -A BUDGET=([env]=10 [build]=140 [sass]=20 [correctness]=75 [bench]=80 [bench-small]=25
                   [memcheck]=55 [racecheck]=30 [cuda-rest]=60 [compile-bench]=90 [suite-rest]=120)
declare -A LOG=([env]=env [build]=build.log [sass]=build.log [correctness]=tests.log [bench]=bench.txt
                [bench-small]=bench.txt [memcheck]=sanitizer.log [racecheck]=sanitizer.log
                [cuda-rest]=tests.log [compile-bench]=bench.txt [suite-rest]=tests.log)

mkdir -p "$OUT"
rm -f "$OUT"/{build.log,tests.log,sanitizer.log,bench.txt,bench.json,summary.txt}
export WORK; WORK="$(mktemp -d "${TMPDIR:-/tmp}/fastdropout-check.XXXXXX")"   # scratch, not returned
trap 'rm -rf "$WORK"' EXIT
: > "$WORK/stages.tsv"
overall=0
have_gpu=1

record() {  # stage status seconds budget note
  printf '%s\t%s\t%s\t%s\t%s\n' "$@" >> "$WORK/stages.tsv"
}

run_stage() {
  local name="$1" budget="${BUDGET[$1]}" left limit t0 rc status note=""
  local log="$OUT/${LOG[$1]}"
  [ "${LOG[$1]}" = env ] && log="$WORK/env.txt"
  if [[ "$SELECTED" != *" $name "* ]]; then
    record "$name" skipped 0 "$budget" "not selected"; return 0
  fi
  if [ "$have_gpu" = 0 ] && [[ "$NEEDS_GPU" == *" $name "* ]]; then
    record "$name" skipped 0 "$budget" "no GPU"; return 0
  fi
  if [ -n "${BLOCKED:-}" ]; then
    record "$name" skipped 0 "$budget" "$BLOCKED"; return 0
  fi
  left=$(( DEADLINE - SECONDS - GRACE ))
  limit=$(( budget < left ? budget : left ))
  if [ "$limit" -lt "$MIN_STAGE" ]; then
    record "$name" skipped 0 "$budget" "no time left"; return 0
  fi
  echo "== [${SECONDS}s] $name (timeout ${limit}s) -> ${log#"$OUT"/}"
  echo "==== stage $name (timeout ${limit}s)" >> "$log"
  t0=$SECONDS
  timeout -k "$GRACE" "$limit" bash "$SELF" --stage "$name" >> "$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=timeout; note="cut at ${limit}s" ;;
    *) status=FAIL; note="exit $rc" ;;
  esac
  [ "$status" = ok ] || overall=1
  echo "==== stage $name: $status ($((SECONDS - t0))s)" >> "$log"
  echo "   $status in $((SECONDS - t0))s"
  record "$name" "$status" "$((SECONDS - t0))" "$budget" "$note"
  return $rc
}

run_stage env
sed -e '/^====/d' -e 's/^/   /' "$WORK/env.txt"
probe="$("$py" -c "import torch; print('gpu' if torch.cuda.is_available() else 'none')" 2>&1 | tail -1)"
if [ "$probe" != gpu ]; then
  have_gpu=0
  if [ "$probe" != none ]; then
    echo "!! $py cannot import torch ($probe): set PYTHON to the Python that has torch. Nothing run."
    exit 2
  fi
  echo "!! no CUDA GPU visible here (torch.cuda.is_available() is False): this check is for an H100/H200 machine."
  if [ -z "${FD_CHECK_NO_GPU:-}" ]; then
    echo "!! nothing run. FD_CHECK_NO_GPU=1 runs the stages that need no GPU (the CUDA tests then skip)."
    exit 2
  fi
fi
run_stage build || BLOCKED="the build failed"
run_stage sass
for name in correctness bench bench-small memcheck racecheck cuda-rest compile-bench suite-rest; do
  run_stage "$name"
done

"$py" scripts/gpu_summary.py --work "$WORK" --out "$OUT" --deadline "$DEADLINE" --elapsed "$SECONDS" \
  || { echo "!! the summary failed; logs under $OUT"; overall=1; }
[ "$have_gpu" = 1 ] || overall=2
exit $overall
