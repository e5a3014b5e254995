#!/usr/bin/env bash
# From a fresh clone, set everything up and run one job:
#
#   bash scripts/run.sh bench    # quick benchmark: the GPU if there is one, else the CPU
#   bash scripts/run.sh test     # the whole test suite (CUDA tests skip without a GPU)
#   bash scripts/run.sh deps     # only the environment: torch and the test dependencies
#
# Set-up: a virtual environment (FD_VENV, default .venv; FD_VENV=none uses the current Python),
# torch installed into it if missing (FD_TORCH pins a version, e.g. 2.13.0 for the CPU build),
# what the job needs (the build tools; for test and deps also the test dependencies and the
# model libraries the model tests use, tests/requirements-models.txt, with torch held at the
# installed version; FD_MODEL_TESTS=0 leaves those out), then the build: the first time
# `pip install --no-build-isolation -e .`, later only an incremental rebuild of what changed
# (ninja, in build/: nothing at all when csrc/ and setup.py are older than the library and the
# torch is the one it was built for). The CUDA kernels are built whenever nvcc and a CUDA build
# of torch are present (no GPU needed); with no GPU visible and TORCH_CUDA_ARCH_LIST unset,
# for sm_90 SASS and PTX only (a development build: this machine runs none of them; a plain
# `pip install` builds 8.0;9.0+PTX, see README.md). Extra arguments go to the job (pytest or
# the benchmark).
set -euo pipefail
cd "$(dirname "$0")/.."

job="${1:-test}"
shift || true
case "$job" in
  test|deps) model_tests="${FD_MODEL_TESTS:-1}" ;;
  bench) model_tests=0 ;;
  *) echo "usage: bash scripts/run.sh [test|bench|deps] [args...]" >&2; exit 2 ;;
esac
venv="${FD_VENV:-.venv}"

if [ "$venv" = "none" ]; then
  py="${PYTHON:-python3}"
else
  if [ ! -x "$venv/bin/python" ]; then
    echo "== creating $venv"
    "${PYTHON:-python3}" -m venv "$venv"
  fi
  py="$venv/bin/python"
fi

# --no-compile: no .pyc for all of torch up front (a minute of CPU on a small machine); Python
# writes them for the modules actually imported.
pip_install() { "$py" -m pip install --disable-pip-version-check --no-compile -q "$@"; }
# The given modules that cannot be found, found without importing them (importing torch takes
# seconds, timm with torchvision a quarter of a minute, on a small machine).
missing() {
  "$py" -c 'import importlib.util, sys; print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))' "$@"
}

if [ -n "$(missing torch)" ]; then
  echo "== installing torch${FD_TORCH:+==$FD_TORCH}"
  pip_install "torch${FD_TORCH:+==$FD_TORCH}"
fi
need=(ninja setuptools wheel numpy)
[ "$job" = bench ] || need+=(pytest hypothesis expecttest)
read -r -a absent <<< "$(missing "${need[@]}")"
if [ "${#absent[@]}" -gt 0 ]; then
  echo "== installing ${absent[*]}"
  pip_install "${absent[@]/#setuptools/setuptools>=64}"
fi

if [ "$model_tests" != "0" ] && [ -n "$(missing transformers timm peft)" ]; then
  echo "== installing the model libraries (tests/requirements-models.txt)"
  held="$(mktemp)"   # torch pinned by its distribution version (torch.__version__ may add +cu130)
  "$py" -c 'from importlib.metadata import version; print("torch==" + version("torch"))' > "$held"
  pip_install -r tests/requirements-models.txt -c "$held"
  rm -f "$held"
  # timm imports torchvision, and the torchvision wheels served for some torch releases are
  # CUDA builds that cannot load under a CPU-only torch ("operator torchvision::nms does not
  # exist"). Then the two go again, so that timm's tests skip instead of failing to import.
  if ! "$py" -c "import timm" 2>/dev/null; then
    broken=(timm)
    [ -n "$(missing torchvision)" ] || broken+=(torchvision)
    echo "== timm does not import with this torch: uninstalling ${broken[*]} (the timm tests skip)"
    "$py" -c "import timm" 2>&1 | tail -1 || true
    "$py" -m pip uninstall -y -q "${broken[@]}"
  fi
fi
[ "$job" = deps ] && exit 0

# What the build needs: "install" (fastdropout is not installed from this tree), "build" (the
# library is missing, older than a file of csrc/ or setup.py, or built for another torch), or
# nothing. Without importing torch.
build_state() {
  "$py" - <<'EOF'
import glob, json, os, re, importlib.metadata as md, importlib.util
root = os.getcwd()
try:
    url = json.loads(md.distribution("fastdropout").read_text("direct_url.json") or "{}")
    installed_here = (url.get("dir_info", {}).get("editable")
                      and os.path.realpath(url["url"].removeprefix("file://")) == os.path.realpath(root))
except md.PackageNotFoundError:
    installed_here = False
if not installed_here:
    raise SystemExit(print("install"))
libs = glob.glob(os.path.join(root, "fastdropout", "_C*.so")) + glob.glob(os.path.join(root, "fastdropout", "_C*.pyd"))
info = os.path.join(root, "fastdropout", "_build_info.py")
if not libs or not os.path.exists(info):
    raise SystemExit(print("build"))
built = min(os.path.getmtime(p) for p in libs)
sources = [os.path.join(root, "setup.py")] + glob.glob(os.path.join(root, "csrc", "**", "*"), recursive=True)
torch_dir = importlib.util.find_spec("torch").submodule_search_locations[0]
running = re.search(r"__version__ = '([^']+)'", open(os.path.join(torch_dir, "version.py")).read()).group(1)
built_for = re.search(r"torch_version = '([^']+)'", open(info).read())
# Another CUDA architecture list than the library's (when one is set for this build).
arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
built_arch = re.search(r"cuda_arch_list = '([^']*)'", open(info).read())
stale = (any(os.path.getmtime(p) > built for p in sources) or not built_for
         or built_for.group(1) != running or bool(arch and built_arch and built_arch.group(1) != arch))
print("build" if stale else "")
EOF
}

export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && ! { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; }; then
  export TORCH_CUDA_ARCH_LIST="9.0+PTX"
fi
state="$(build_state)"
if [ -n "$state" ]; then
  if [ "$state" = install ]; then
    echo "== building and installing fastdropout (editable)"
    "$py" -m pip install --disable-pip-version-check --no-build-isolation -q -e .
  else
    echo "== rebuilding fastdropout (incremental: what changed since the last build)"
    log="$(mktemp)"
    if ! "$py" setup.py build_ext --inplace > "$log" 2>&1; then
      cat "$log"; rm -f "$log"; exit 1
    fi
    grep -E '^\[[0-9]+/[0-9]+\]|ninja: no work' "$log" || true
    rm -f "$log"
  fi
  "$py" -m fastdropout.info
else
  echo "== fastdropout is built and up to date (csrc/ and setup.py unchanged)"
fi

case "$job" in
  test)  exec "$py" -m pytest tests -q -p no:cacheprovider "$@" ;;
  bench) exec "$py" -m fastdropout.bench --quick "$@" ;;
esac
