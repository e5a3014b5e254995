#!/usr/bin/env bash
# From a fresh clone, set everything up and run one job:
#
#   bash scripts/run.sh bench    # quick benchmark: the GPU if there is one, else the CPU
#   bash scripts/run.sh test     # the whole test suite (CUDA tests skip without a GPU)
#   bash scripts/run.sh deps     # only the environment: torch and the test dependencies
#
# Set-up: a virtual environment (FD_VENV, default .venv; FD_VENV=none uses the current Python),
# torch installed into it if missing (FD_TORCH pins a version, e.g. 2.13.0 for the CPU build),
# the test dependencies, and the model libraries the model tests use
# (tests/requirements-models.txt, with torch held at the installed version; FD_MODEL_TESTS=0
# skips them), then `pip install --no-build-isolation -e .`, which builds the CUDA kernels
# whenever nvcc and a CUDA build of torch are present (no GPU needed) and the CPU kernels
# always. Extra arguments go to the job (pytest or the benchmark).
set -euo pipefail
cd "$(dirname "$0")/.."

job="${1:-test}"
shift || true
case "$job" in
  test|bench|deps) ;;
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

if ! "$py" -c "import torch" 2>/dev/null; then
  echo "== installing torch${FD_TORCH:+==$FD_TORCH}"
  pip_install "torch${FD_TORCH:+==$FD_TORCH}"
fi
have() { "$py" -c "import $1" 2>/dev/null; }
missing=()
for mod in numpy pytest hypothesis expecttest ninja; do have "$mod" || missing+=("$mod"); done
have setuptools || missing+=("setuptools>=64")
have wheel || missing+=("wheel")
if [ "${#missing[@]}" -gt 0 ]; then
  echo "== installing ${missing[*]}"
  pip_install "${missing[@]}"
fi

if [ "${FD_MODEL_TESTS:-1}" != "0" ] && ! { have transformers && have timm; }; then
  echo "== installing the model libraries (tests/requirements-models.txt)"
  held="$(mktemp)"   # torch pinned by its distribution version (torch.__version__ may add +cu130)
  "$py" -c 'from importlib.metadata import version; print("torch==" + version("torch"))' > "$held"
  pip_install -r tests/requirements-models.txt -c "$held"
  rm -f "$held"
  # timm imports torchvision, and the torchvision wheels served for some torch releases are
  # CUDA builds that cannot load under a CPU-only torch ("operator torchvision::nms does not
  # exist"). Then the two go again, so that timm's tests skip instead of failing to import.
  if ! have timm; then
    broken=(timm)
    have torchvision || broken+=(torchvision)
    echo "== timm does not import with this torch: uninstalling ${broken[*]} (the timm tests skip)"
    "$py" -c "import timm" 2>&1 | tail -1 || true
    "$py" -m pip uninstall -y -q "${broken[@]}"
  fi
fi
[ "$job" = "deps" ] && exit 0

echo "== building fastdropout ($("$py" -c 'import torch; print("torch", torch.__version__)'))"
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}"
"$py" -m pip install --disable-pip-version-check --no-build-isolation -q -e .
"$py" -m fastdropout.info

case "$job" in
  test)  exec "$py" -m pytest tests -q -p no:cacheprovider "$@" ;;
  bench) exec "$py" -m fastdropout.bench --quick "$@" ;;
esac
