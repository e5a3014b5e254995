#!/usr/bin/env bash
# Compiles every C++ source under csrc/ against the headers of the oldest torch this project
# claims (pyproject.toml: torch>=2.11), with the flags setup.py gives them, so that a change
# that builds only with the torch installed here fails CI instead of a user's build. (torch
# 2.11 holds autograd Nodes in std::shared_ptr where 2.13 and later hold c10::intrusive_ptr: a
# build against 2.14 alone did not show it.)
#
#   PYTHON=.venv/bin/python bash scripts/check_oldest_torch.sh [SOURCE...]   (default: all of csrc/)
#
# Needs only the headers: the torch wheel for this Python is downloaded once (pip download
# --no-deps, about 530 MB for 2.11.0) and its include/ kept under build/ (FD_OLDEST_TORCH
# pins another release). Both kernel sets are checked: the CPU-only build's sources, and the
# CUDA build's (FASTDROPOUT_WITH_CUDA), whose .cu files nvcc compiles for sm_90 when it is there.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
version="${FD_OLDEST_TORCH:-$(sed -n 's/^dependencies = \[.*"torch>=\([0-9.]*\)".*/\1/p' pyproject.toml).0}"
cache="build/oldest-torch/$version"
include="$cache/torch/include"
if [ ! -f "$include/torch/extension.h" ]; then
  echo "== fetching the headers of torch $version"
  rm -rf "$cache" && mkdir -p "$cache"
  "$py" -m pip download --disable-pip-version-check -q --no-deps "torch==$version" -d "$cache/wheel"
  unzip -q -o "$cache"/wheel/torch-*.whl 'torch/include/*' -d "$cache"
  rm -rf "$cache/wheel"
fi
python_include="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
# CUDA headers: the toolkit's, then those of the nvidia-* packages beside the installed torch.
cuda_includes=()
nvcc="$(command -v nvcc || true)"
if [ -n "$nvcc" ]; then
  cuda_root="$("$nvcc" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)"
  [ -d "$cuda_root/include" ] && cuda_includes+=("-I$cuda_root/include")
  while IFS= read -r d; do cuda_includes+=("-I$d"); done < <("$py" - <<'PY'
import glob, os, sysconfig
site = sysconfig.get_paths()["purelib"]
for d in sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")) + glob.glob(os.path.join(site, "nvidia", "*", "include"))):
    print(d)
PY
)
fi
# As setup.py and torch.utils.cpp_extension give them (torch 2.11 builds extensions as C++17).
common=(-std=c++17 -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C
        -D_GLIBCXX_USE_CXX11_ABI=1 -I"$include" -I"$include/torch/csrc/api/include"
        -I"$python_include" -Icsrc)
cxx=("${CXX:-g++}" "${common[@]}" -fopenmp -ffp-contract=off -fno-trapping-math -fsyntax-only)
jobs="${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}"
logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT
n=0
check() {  # label, command...: run in the background, at most $jobs at a time
  local label="$1"; shift
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
  n=$((n + 1))
  printf '%s\n' "$label" > "$logs/$n.label"
  ( if "$@" > "$logs/$n.log" 2>&1; then echo ok > "$logs/$n.status"; else echo FAIL > "$logs/$n.status"; fi ) &
}
if [ $# -gt 0 ]; then sources=("$@"); else mapfile -t sources < <(find csrc -name '*.cpp' -o -name '*.cu' | sort); fi
echo "== csrc/ against torch $version headers ($jobs at a time)"
with_cuda=0
[ -n "$nvcc" ] && [ "${#cuda_includes[@]}" -gt 0 ] && with_cuda=1
for src in "${sources[@]}"; do
  case "$src" in
    *.cpp)
      check "$src (CPU build)" "${cxx[@]}" "$src"
      [ "$with_cuda" = 1 ] && check "$src (CUDA build)" "${cxx[@]}" -DFASTDROPOUT_WITH_CUDA "${cuda_includes[@]}" "$src"
      ;;
    *.cu)
      [ "$with_cuda" = 1 ] && check "$src (nvcc, sm_90)" "$nvcc" "${common[@]}" "${cuda_includes[@]}" -DFASTDROPOUT_WITH_CUDA \
        -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
        -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr -O0 -Xptxas -O0 \
        -gencode arch=compute_90,code=sm_90 -c "$src" -o /dev/null
      ;;
  esac
done
wait
[ "$with_cuda" = 1 ] || echo "   (no nvcc or no CUDA headers: the CUDA build's sources were not checked)"
failed=0
for ((i = 1; i <= n; i++)); do
  status="$(cat "$logs/$i.status" 2>/dev/null || echo FAIL)"
  printf '   %-4s %s\n' "$status" "$(cat "$logs/$i.label")"
  if [ "$status" != ok ]; then failed=1; sed -n '1,40p' "$logs/$i.log"; fi
done
exit $failed
