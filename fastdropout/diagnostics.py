"""What a bug report needs: :func:`system_info` (``fastdropout.system_info()``), printed by
``python -m fastdropout.info`` (fastdropout/info.py; ``--json`` for a machine-readable form).

Example output (this project's CPU CI machine)::

    fastdropout          0.1.0
    extension            /path/to/fastdropout/_C.cpython-311-x86_64-linux-gnu.so
    built against        torch 2.14.1+cu130 (CUDA 13.0), nvcc 13.0.88, TORCH_CUDA_ARCH_LIST=9.0+PTX
    running              torch 2.14.1+cu130 (CUDA 13.0), Python 3.11.9, Linux-x86_64
    CUDA kernels         built: SASS sm_90; PTX compute_90
    CPU kernels          avx2, 2 threads
    GPUs                 none visible
"""
from __future__ import annotations

import os
import platform
from typing import Dict, List, Optional

import torch

from . import _loader
from ._fatbin import cuda_archs
from ._ops import cuda_kernels_built
from ._version import __version__


def _cpu_flags() -> Optional[set]:
    """The CPU feature flags the Linux kernel reports, or None elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def cpu_kernel_path() -> str:
    """"avx2", "baseline" or "unknown": which keep-bit path the CPU kernels take, decided as in
    csrc/cpu/dropout_cpu.cpp (x86-64 built with GCC/Clang, the CPU has AVX2, and
    FASTDROPOUT_DISABLE_AVX2 is unset; the kernels read the variable once per process)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "baseline"
    if "FASTDROPOUT_DISABLE_AVX2" in os.environ:
        return "baseline"
    flags = _cpu_flags()
    if flags is None:
        return "unknown"
    return "avx2" if "avx2" in flags else "baseline"


def _binary_archs(path: str) -> Dict[str, Optional[List[str]]]:
    try:
        return cuda_archs(path)
    except (OSError, ValueError):
        return {"sass": None, "ptx": None}   # unknown


def _gpus() -> List[str]:
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append(f"{index}: {props.name} (sm_{props.major}{props.minor}, "
                    f"{props.total_memory / 2**30:.1f} GiB)")
    return gpus


def system_info() -> Dict[str, object]:
    """The facts a bug report needs, as a dict: fastdropout's version and extension file, the
    torch/CUDA it was built against and the one running, the CUDA architectures in the binary
    (``cuda_sass``, ``cuda_ptx``: lists, None when they cannot be read), the CPU kernel path
    (``"avx2"``/``"baseline"``) and torch's thread count, and the visible GPUs.

    Example::

        >>> import fastdropout
        >>> info = fastdropout.system_info()
        >>> info["running_torch"] == torch.__version__
        True
        >>> sorted(info)[:3]
        ['build_info_recorded', 'built_cuda_arch_list', 'built_nvcc']
    """
    build = _loader.read_build_info()
    extension = _loader._C.__file__
    archs = _binary_archs(extension)
    return {
        "fastdropout": __version__,
        "extension": extension,
        "build_info_recorded": build is not None,
        "built_torch": build and build["torch_version"],
        "built_torch_cuda": build and build["torch_cuda"],
        "built_nvcc": build and build["nvcc_version"],
        "built_cuda_arch_list": build and build["cuda_arch_list"],
        "running_torch": torch.__version__,
        "running_torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": f"{platform.system()}-{platform.machine()}",
        "cuda_kernels_built": cuda_kernels_built(),
        "cuda_sass": archs["sass"],
        "cuda_ptx": archs["ptx"],
        "cpu_kernel_path": cpu_kernel_path(),
        "cpu_threads": torch.get_num_threads(),
        "gpus": _gpus(),
        "rebuild_command": _loader.rebuild_command(),
    }


def _archs_text(archs: Optional[List[str]]) -> str:
    if archs is None:
        return "unknown"
    return " ".join(archs) if archs else "none"


def format_system_info(info: Optional[Dict[str, object]] = None) -> str:
    """:func:`system_info` as the lines ``python -m fastdropout.info`` prints."""
    info = system_info() if info is None else info
    if info["build_info_recorded"]:
        built = _loader.describe_torch(info["built_torch"], info["built_torch_cuda"])
        if info["built_nvcc"]:
            built += f", nvcc {info['built_nvcc']}, TORCH_CUDA_ARCH_LIST={info['built_cuda_arch_list']}"
    else:
        built = _loader.describe_torch(None, None)
    if info["cuda_kernels_built"]:
        cuda = f"built: SASS {_archs_text(info['cuda_sass'])}; PTX {_archs_text(info['cuda_ptx'])}"
    else:
        cuda = "not built (CPU-only build)"
    rows = [
        ("fastdropout", info["fastdropout"]),
        ("extension", info["extension"]),
        ("built against", built),
        ("running", f"{_loader.describe_torch(info['running_torch'], info['running_torch_cuda'])}, "
                    f"Python {info['python']}, {info['platform']}"),
        ("CUDA kernels", cuda),
        ("CPU kernels", f"{info['cpu_kernel_path']}, {info['cpu_threads']} threads"),
        ("GPUs", "; ".join(info["gpus"]) or "none visible"),
        ("rebuild with", info["rebuild_command"]),
    ]
    return "\n".join(f"{name:<20} {value}" for name, value in rows)
