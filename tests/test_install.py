"""Packaging and diagnostics: the build records the torch it was built against, a mismatch is a
plain ImportError with the rebuild command, ``python -m fastdropout.info`` reports what a bug
report needs, and (FASTDROPOUT_TEST_INSTALLED=1, set by .ci/run) the suite really tests an
installed copy, not the source tree."""
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import fastdropout
from fastdropout import _loader
from fastdropout._fatbin import cuda_archs

PACKAGE_DIR = os.path.dirname(fastdropout.__file__)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code, cwd, env_updates=None, pythonpath=None):
    env = dict(os.environ, **(env_updates or {}))
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def copy_package(tmp_path, build_info_source=None):
    """A copy of the imported fastdropout package (compiled module included) under tmp_path,
    optionally with another _build_info.py; import it with PYTHONPATH=tmp_path."""
    target = tmp_path / "fastdropout"
    shutil.copytree(PACKAGE_DIR, target, ignore=shutil.ignore_patterns("__pycache__"))
    if build_info_source is not None:
        (target / "_build_info.py").write_text(build_info_source)
    return target


def test_build_records_the_torch_it_was_built_against():
    info = _loader.read_build_info()
    assert info is not None, "fastdropout/_build_info.py is missing: setup.py writes it on every build"
    assert (info["torch_version"], info["torch_cuda"]) == (torch.__version__, torch.version.cuda)
    assert info["cuda_kernels"] == fastdropout.cuda_kernels_built()
    if info["cuda_kernels"]:
        assert info["nvcc_version"] and info["cuda_arch_list"]


def test_mismatch_message_names_both_torches_and_the_rebuild_command():
    message = _loader.torch_mismatch({"torch_version": "2.0.0+cu118", "torch_cuda": "11.8"})
    assert "built against torch 2.0.0+cu118 (CUDA 11.8)" in message
    running = "CUDA " + torch.version.cuda if torch.version.cuda else "CPU-only build"
    assert f"but torch {torch.__version__} ({running}) is running" in message
    assert _loader.rebuild_command() in message
    assert _loader.ALLOW_MISMATCH_ENV in message
    assert _loader.torch_mismatch({"torch_version": torch.__version__, "torch_cuda": torch.version.cuda}) is None
    assert _loader.torch_mismatch(None) is None   # built before the record existed: just try


def test_import_against_another_torch_fails_before_loading_with_a_plain_message(tmp_path):
    copy_package(tmp_path, "torch_version = '1.0.0+other'\ntorch_cuda = None\ncuda_kernels = False\n")
    result = run_python("import fastdropout", cwd=tmp_path, pythonpath=str(tmp_path))
    assert result.returncode != 0
    assert "ImportError: fastdropout's compiled extension was built against torch 1.0.0+other " \
           "(CPU-only build), but torch " + torch.__version__ in result.stderr, result.stderr
    assert "-m pip install --no-build-isolation" in result.stderr
    assert "undefined symbol" not in result.stderr

    # Opting in loads it anyway (here it does load: only the record was changed), with a warning.
    result = run_python(
        "import warnings; warnings.simplefilter('always'); import fastdropout, os; "
        "print(os.path.dirname(fastdropout.__file__))",
        cwd=tmp_path, pythonpath=str(tmp_path), env_updates={_loader.ALLOW_MISMATCH_ENV: "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "fastdropout")
    assert "RuntimeWarning" in result.stderr and "1.0.0+other" in result.stderr


def test_a_compiled_module_that_does_not_load_says_what_it_was_built_for(tmp_path):
    target = copy_package(tmp_path)
    for so in glob.glob(str(target / "_C*.so")) + glob.glob(str(target / "_C*.pyd")):
        with open(so, "wb") as f:
            f.write(b"not a shared library")
    result = run_python("import fastdropout", cwd=tmp_path, pythonpath=str(tmp_path))
    assert result.returncode != 0
    assert "ImportError: fastdropout's compiled extension (fastdropout._C in" in result.stderr, result.stderr
    assert "could not be loaded" in result.stderr
    assert "is running" in result.stderr and "rebuild it with" in result.stderr
    assert "-m pip install --no-build-isolation" in result.stderr


@pytest.mark.parametrize("record, expected", [
    ({"url": "file:///src/fastdropout", "dir_info": {"editable": True}},
     "py -m pip install --no-build-isolation -e /src/fastdropout"),
    ({"url": "file:///src/fastdropout", "dir_info": {}},
     "py -m pip install --no-build-isolation --no-deps --force-reinstall --no-cache-dir /src/fastdropout"),
    ({"url": "file:///d/fastdropout-0.1.0.tar.gz", "archive_info": {"hashes": {}}},
     "py -m pip install --no-build-isolation --no-deps --force-reinstall --no-cache-dir /d/fastdropout-0.1.0.tar.gz"),
    ({"url": "file:///srv/repo", "vcs_info": {"vcs": "git", "commit_id": "0123abc"}},
     "py -m pip install --no-build-isolation --no-deps --force-reinstall --no-cache-dir git+file:///srv/repo@0123abc"),
    ({"url": "https://example.org/fastdropout-0.1.0-cp311-cp311-linux_x86_64.whl", "archive_info": {}}, None),
    (None, None),
])
def test_rebuild_command_follows_where_fastdropout_was_installed_from(record, expected):
    assert _loader.command_from_record(record, python="py") == expected


def _arch_list_targets(arch_list):
    """The SASS and PTX targets TORCH_CUDA_ARCH_LIST asks for ("8.0;9.0+PTX")."""
    sass, ptx = set(), set()
    for arch in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        if not arch:
            continue
        number = arch.split("+")[0].replace(".", "")
        sass.add(f"sm_{number}")
        if arch.endswith("+PTX"):
            ptx.add(f"compute_{number}")
    return sass, ptx


def test_cuda_archs_in_the_binary_are_the_ones_the_build_asked_for():
    archs = cuda_archs(_loader._C.__file__)
    if not fastdropout.cuda_kernels_built():
        assert archs == {"sass": [], "ptx": []}
        return
    info = _loader.read_build_info()
    assert info is not None and info["cuda_arch_list"], "CUDA build without a recorded arch list"
    sass, ptx = _arch_list_targets(info["cuda_arch_list"])
    assert (set(archs["sass"]), set(archs["ptx"])) == (sass, ptx)


def _find_cuobjdump():
    candidates = [shutil.which("cuobjdump")]
    cuda_home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    candidates.append(os.path.join(cuda_home, "bin", "cuobjdump"))
    triton = importlib.util.find_spec("triton")
    if triton is not None and triton.submodule_search_locations:
        for location in triton.submodule_search_locations:
            candidates.append(os.path.join(location, "backends", "nvidia", "bin", "cuobjdump"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def test_fatbin_reader_agrees_with_cuobjdump():
    if not fastdropout.cuda_kernels_built():
        pytest.skip("CPU-only build: no CUDA code to list")
    cuobjdump = _find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton wheel) to compare with")
    so = _loader._C.__file__

    def listed(flag, prefix):
        out = subprocess.run([cuobjdump, flag, so], capture_output=True, text=True).stdout
        # "ELF file    1: dropout.sm_90.cubin", "PTX file    1: dropout.sm_90.ptx"
        return sorted({prefix + line.rsplit(".sm_", 1)[1].split(".")[0].rstrip("a")
                       for line in out.splitlines() if ".sm_" in line}, key=lambda s: int(s.split("_")[1]))

    archs = cuda_archs(so)
    assert archs["sass"] == listed("--list-elf", "sm_") and archs["sass"]
    assert archs["ptx"] == listed("--list-ptx", "compute_")


def test_info_command_reports_what_a_bug_report_needs(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fastdropout.info"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr
    text = result.stdout
    assert f"fastdropout          {fastdropout.__version__}" in text
    assert f"torch {torch.__version__}" in text
    for label in ("extension", "built against", "running", "CUDA kernels", "CPU kernels", "GPUs", "rebuild with"):
        assert f"\n{label:<20} " in "\n" + text, label

    result = subprocess.run([sys.executable, "-m", "fastdropout.info", "--json"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, FASTDROPOUT_DISABLE_AVX2="1"))
    info = json.loads(result.stdout)
    assert info["fastdropout"] == fastdropout.__version__
    assert (info["running_torch"], info["running_torch_cuda"]) == (torch.__version__, torch.version.cuda)
    assert (info["built_torch"], info["built_torch_cuda"]) == (torch.__version__, torch.version.cuda)
    assert info["cuda_kernels_built"] == fastdropout.cuda_kernels_built()
    assert info["cpu_kernel_path"] == "baseline"   # FASTDROPOUT_DISABLE_AVX2 is set
    assert info["cpu_threads"] == torch.get_num_threads()
    assert len(info["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def test_system_info_cpu_path_follows_the_kernels_rule(monkeypatch):
    from fastdropout import diagnostics
    monkeypatch.delenv("FASTDROPOUT_DISABLE_AVX2", raising=False)
    monkeypatch.setattr(diagnostics.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(diagnostics, "_cpu_flags", lambda: {"sse2", "avx", "avx2"})
    assert fastdropout.system_info()["cpu_kernel_path"] == "avx2"
    monkeypatch.setattr(diagnostics, "_cpu_flags", lambda: {"sse2", "avx"})
    assert fastdropout.system_info()["cpu_kernel_path"] == "baseline"
    monkeypatch.setattr(diagnostics, "_cpu_flags", lambda: {"avx2"})
    monkeypatch.setenv("FASTDROPOUT_DISABLE_AVX2", "1")
    assert fastdropout.system_info()["cpu_kernel_path"] == "baseline"
    monkeypatch.setattr(diagnostics.platform, "machine", lambda: "aarch64")
    monkeypatch.delenv("FASTDROPOUT_DISABLE_AVX2")
    assert fastdropout.system_info()["cpu_kernel_path"] == "baseline"


@pytest.mark.skipif(os.environ.get("FASTDROPOUT_TEST_INSTALLED") != "1",
                    reason="FASTDROPOUT_TEST_INSTALLED=1 (set by .ci/run) checks an installed copy")
def test_the_suite_runs_against_an_installed_copy_not_the_source_tree():
    here = os.path.realpath(PACKAGE_DIR)
    assert not here.startswith(os.path.realpath(REPO_ROOT) + os.sep), here
    record = _loader._installed_from()
    assert record is not None and not record.get("dir_info", {}).get("editable"), record
