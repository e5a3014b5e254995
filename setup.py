"""Build fastdropout._C: CPU kernels always, CUDA kernels whenever nvcc and a CUDA build of
torch are present (a GPU is not needed to build).

Environment:
  FASTDROPOUT_CPU_ONLY=1   build the CPU kernels only
  TORCH_CUDA_ARCH_LIST     CUDA architectures (default when unset and no GPU is visible:
                           8.0;9.0, i.e. A100 and H100/H200)
  CUDA_HOME                the CUDA toolkit; found from nvcc on PATH when unset
  MAX_JOBS                 parallel compile jobs (ninja)
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _toolkit_root_from_nvcc():
    """The CUDA toolkit root of the nvcc on PATH. nvcc may be a wrapper script (as in
    /usr/local/bin/nvcc -> exec /usr/local/cuda-13.0/bin/nvcc), so ask nvcc itself."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        ).stderr
    except (OSError, subprocess.SubprocessError):
        out = ""
    m = re.search(r"^#\$ TOP=(.+)$", out, re.MULTILINE)
    if m:
        return os.path.normpath(m.group(1).strip())
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _find_cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.exists(os.path.join(os.environ[var], "bin", "nvcc")):
            return os.environ[var]
    root = _toolkit_root_from_nvcc()
    if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
        return root
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    return None


CPU_ONLY = os.environ.get("FASTDROPOUT_CPU_ONLY", "0") not in ("", "0")
CUDA_HOME = None if CPU_ONLY else _find_cuda_home()
if CUDA_HOME:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = CUDA_HOME

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

WITH_CUDA = bool(CUDA_HOME) and torch.version.cuda is not None


def _cuda_include_dirs():
    """Headers that a CUDA build of torch needs but a bare toolkit may lack (cusparse.h and
    friends ship in the nvidia-* pip packages: site-packages/nvidia/cu13/include, or
    site-packages/nvidia/*/include for older wheels)."""
    dirs = []
    for site in {os.path.dirname(os.path.dirname(torch.__file__))}:
        dirs += sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))
        dirs += sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def _default_arch_list():
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return  # honoured by torch.utils.cpp_extension
    if torch.cuda.is_available():
        return  # cpp_extension builds for the visible GPUs
    os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"


def _version():
    with open(os.path.join(ROOT, "fastdropout", "_version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def extensions():
    # The C++ standard is left to torch.utils.cpp_extension (C++17 or C++20 per torch version).
    # -ffp-contract=off: no FMA contraction (results must match the CUDA kernels bit for bit).
    # -fno-trapping-math: lets the select-after-multiply loops vectorise (FP exception flags
    # are not part of any result).
    # -fopenmp: at::parallel_for is a header that uses OpenMP pragmas; without the flag our CPU
    # kernels would run on one thread. The libgomp torch ships (same soname) serves both.
    cxx_flags = ["-O3", "-ffp-contract=off", "-fno-trapping-math"]
    link_flags = []
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    # Every C++ source under csrc/ (keep_avx2.cpp is empty unless x86-64); the CUDA ones
    # under csrc/cuda/ only in a CUDA build.
    sources = sorted(os.path.relpath(p, ROOT) for p in
                     glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True))
    if not WITH_CUDA:
        return [CppExtension("fastdropout._C", sources, extra_compile_args={"cxx": cxx_flags},
                             extra_link_args=link_flags)]
    _default_arch_list()
    # No --use_fast_math: the kernels' rounding must match the CPU's bit for bit.
    nvcc_flags = ["-O3", "-DFASTDROPOUT_WITH_CUDA", "-lineinfo"]
    if os.environ.get("FASTDROPOUT_PTXAS_VERBOSE"):
        nvcc_flags.append("-Xptxas=-v")
    return [CUDAExtension(
        "fastdropout._C",
        sources + sorted(os.path.relpath(p, ROOT) for p in
                         glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))),
        include_dirs=_cuda_include_dirs(),
        extra_compile_args={"cxx": cxx_flags + ["-DFASTDROPOUT_WITH_CUDA"], "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )]


setup(
    name="fastdropout",
    version=_version(),
    packages=find_packages(include=["fastdropout", "fastdropout.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
)
