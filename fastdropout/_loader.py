"""Loads the compiled extension fastdropout._C, and turns a torch mismatch into a plain error.

A C++ extension only works with the torch it was compiled against: with another one it fails
to load with an undefined symbol (``_ZN5torch8autograd10deleteNodeEPNS0_4NodeE``), or worse,
loads and misbehaves. setup.py records the torch (and CUDA) of the build in
fastdropout/_build_info.py; before the shared library is loaded, that record is compared with
the running torch, and a difference is reported as an ImportError that names both and the one
command that rebuilds fastdropout. ``FASTDROPOUT_ALLOW_TORCH_MISMATCH=1`` loads it anyway.
"""
from __future__ import annotations

import importlib
import json
import os
import shlex
import sys
import warnings
from importlib import metadata
from types import ModuleType
from typing import Optional
from urllib.parse import unquote, urlparse

import torch

ALLOW_MISMATCH_ENV = "FASTDROPOUT_ALLOW_TORCH_MISMATCH"
BUILD_INFO_FIELDS = ("torch_version", "torch_cuda", "cuda_kernels", "nvcc_version", "cuda_arch_list")
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def read_build_info() -> Optional[dict]:
    """What the extension was built against (fastdropout/_build_info.py, written by setup.py),
    or None for a build that predates the record.

    Example::

        >>> read_build_info()["torch_version"] == torch.__version__   # doctest: +SKIP
        True
    """
    try:
        module = importlib.import_module(f"{__package__}._build_info")
    except ImportError:
        return None
    return {field: getattr(module, field, None) for field in BUILD_INFO_FIELDS}


def describe_torch(version: Optional[str], cuda: Optional[str]) -> str:
    """``torch 2.14.1+cu130 (CUDA 13.0)`` or ``torch 2.13.0+cpu (CPU-only build)``."""
    if version is None:
        return "an unknown torch (no fastdropout/_build_info.py: built before it was recorded)"
    return f"torch {version} ({f'CUDA {cuda}' if cuda else 'CPU-only build'})"


def _path_from_file_url(url: str) -> Optional[str]:
    parsed = urlparse(url)
    return unquote(parsed.path) if parsed.scheme == "file" else None


def _installed_from() -> Optional[dict]:
    """The PEP 610 record (direct_url.json) of the fastdropout distribution that this package
    directory belongs to, or None (not installed by pip, or this copy is not that install)."""
    try:
        dist = metadata.distribution("fastdropout")
        record = json.loads(dist.read_text("direct_url.json") or "null")
    except (metadata.PackageNotFoundError, ValueError, OSError):
        return None
    if not isinstance(record, dict) or "url" not in record:
        return None
    here = os.path.realpath(PACKAGE_DIR)
    if record.get("dir_info", {}).get("editable"):
        root = _path_from_file_url(record["url"])
        if root and here.startswith(os.path.realpath(root) + os.sep):
            return record
        return None
    if os.path.realpath(str(dist.locate_file("fastdropout"))) == here:
        return record
    return None


def command_from_record(record: Optional[dict], python: str = sys.executable) -> Optional[str]:
    """The pip command that rebuilds fastdropout from the source a PEP 610 record
    (direct_url.json) names: a directory (editable or not), an sdist or a git URL; None for a
    wheel (it cannot be rebuilt; its source can) or no record.

    Example::

        >>> command_from_record({"url": "file:///src/fastdropout-0.1.0.tar.gz", "archive_info": {}}, "python")
        'python -m pip install --no-build-isolation --no-deps --force-reinstall --no-cache-dir /src/fastdropout-0.1.0.tar.gz'
    """
    if not record or "url" not in record:
        return None
    pip = f"{shlex.quote(python)} -m pip install --no-build-isolation"
    url = record["url"]
    vcs = record.get("vcs_info")
    if record.get("dir_info", {}).get("editable"):
        return f"{pip} -e {shlex.quote(_path_from_file_url(url) or url)}"
    if vcs:
        commit = vcs.get("commit_id")
        target = f"{vcs.get('vcs', 'git')}+{url}" + (f"@{commit}" if commit else "")
    else:
        target = _path_from_file_url(url) or url
    if target.endswith(".whl"):
        return None
    # --no-cache-dir: pip caches the wheels it builds from an sdist or a git commit, and would
    # reinstall the very wheel that was built against the old torch.
    return f"{pip} --no-deps --force-reinstall --no-cache-dir {shlex.quote(target)}"


def rebuild_command() -> str:
    """The one shell command that rebuilds fastdropout against the running torch, from the
    source it was installed from (a source tree, an sdist, a git URL), as far as that is known.

    Example::

        >>> print(rebuild_command())   # doctest: +SKIP
        /work/main/.venv/bin/python -m pip install --no-build-isolation -e /work/main
    """
    source_root = os.path.dirname(PACKAGE_DIR)
    if os.path.isfile(os.path.join(source_root, "setup.py")) and os.path.isdir(os.path.join(source_root, "csrc")):
        # running from a source tree (in-place or editable build)
        return command_from_record({"url": f"file://{source_root}", "dir_info": {"editable": True}})
    return (command_from_record(_installed_from())
            or f"{shlex.quote(sys.executable)} -m pip install --no-build-isolation --no-deps "
               f"--force-reinstall --no-cache-dir <the fastdropout source: a clone, an sdist or a git URL>")


def torch_mismatch(build_info: Optional[dict]) -> Optional[str]:
    """The error text when the extension was built against another torch than the running one
    (None when they agree or the build predates the record)."""
    if build_info is None or build_info.get("torch_version") is None:
        return None
    built = (build_info["torch_version"], build_info.get("torch_cuda"))
    running = (torch.__version__, torch.version.cuda)
    if built == running:
        return None
    return (
        f"fastdropout's compiled extension was built against {describe_torch(*built)}, "
        f"but {describe_torch(*running)} is running. A C++ extension works only with the torch "
        f"it was compiled against. Rebuild fastdropout for the running torch with\n"
        f"    {rebuild_command()}\n"
        f"or install the torch it was built for. ({ALLOW_MISMATCH_ENV}=1 loads it anyway, at "
        f"your own risk.)"
    )


def load_extension() -> ModuleType:
    """Imports fastdropout._C (which registers torch.ops.fastdropout.*), after checking that it
    was built against the running torch; any failure is an ImportError that says what to do."""
    build_info = read_build_info()
    mismatch = torch_mismatch(build_info)
    if mismatch is not None:
        if os.environ.get(ALLOW_MISMATCH_ENV, "0") in ("", "0"):
            raise ImportError(mismatch)
        warnings.warn(mismatch, RuntimeWarning, stacklevel=2)
    try:
        return importlib.import_module(f"{__package__}._C")
    except ImportError as error:
        build_info = build_info or {}
        built = describe_torch(build_info.get("torch_version"), build_info.get("torch_cuda"))
        raise ImportError(
            f"fastdropout's compiled extension (fastdropout._C in {PACKAGE_DIR}) could not be "
            f"loaded: {error}\nIt was built against {built}; {describe_torch(torch.__version__, torch.version.cuda)} "
            f"is running. If it was never built, or torch has changed since, rebuild it with\n"
            f"    {rebuild_command()}"
        ) from error


_C = load_extension()
