"""scripts/gpu_check.sh and its summary (scripts/gpu_summary.py), as far as they run without a GPU:
the script says there is none and exits 2 before building anything, and the summary reads the
stages' logs and benchmark rows back into one page."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = os.path.join(ROOT, "scripts", "gpu_check.sh")
SUMMARY = os.path.join(ROOT, "scripts", "gpu_summary.py")

needs_bash = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


@needs_bash
def test_script_parses():
    subprocess.run(["bash", "-n", CHECK], check=True)


@needs_bash
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the check would run")
def test_without_a_gpu_it_says_so_and_runs_nothing(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable)
    env.pop("FD_CHECK_NO_GPU", None)
    proc = subprocess.run(["bash", CHECK], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA GPU visible" in proc.stdout and "nothing run" in proc.stdout
    assert not os.path.exists(tmp_path / "out" / "build.log")  # no stage past env ran


def _row(op, impl, mode, ms, numel=1 << 28, dtype="bf16", **extra):
    return {"op": op, "impl": impl, "mode": mode, "dtype": dtype, "numel": numel, "p": 0.1, "ms": ms,
            "gbps": 2 * numel * 2 / ms / 1e6, "pct_of_limit": 100.0 * 0.5 / ms, "speedup_vs_torch": None,
            "saved_bytes_per_element": None, "peak_mib": None, "extra": extra}


def test_summary_reads_every_stage(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    (work / "stages.tsv").write_text("env\tok\t4\t10\t\ncorrectness\tFAIL\t40\t75\texit 1\n"
                                     "memcheck\tok\t50\t55\t\nsuite-rest\tskipped\t0\t120\tno time left\n")
    (work / "env.txt").write_text("==== stage env (timeout 10s)\nNVIDIA H200, 580.159.04, 143771 MiB\n")
    (out / "tests.log").write_text(
        "==== stage correctness (timeout 75s)\n....F\nFAILED tests/test_cuda.py::test_views[fp16] - assert False\n"
        "1 failed, 99 passed in 31.20s\n==== stage correctness: FAIL (40s)\n")
    (out / "sanitizer.log").write_text(
        "==== stage memcheck (timeout 55s)\n92 passed in 44.01s\n========= ERROR SUMMARY: 0 errors\n")
    rows = [_row("dropout", "copy", "fwd", 0.5), _row("dropout", "fastdropout", "fwd", 0.55),
            _row("dropout", "torch", "fwd", 1.1), _row("dropout", "fastdropout", "fwd1st", 7.5)]
    (work / "bench-large.json").write_text(json.dumps({"environment": {"gpu": "NVIDIA H200"}, "rows": rows}))
    proc = subprocess.run([sys.executable, SUMMARY, "--work", str(work), "--out", str(out),
                           "--deadline", "465", "--elapsed", "300"], capture_output=True, text=True, check=True)
    text = proc.stdout
    assert text == (out / "summary.txt").read_text()
    assert "NVIDIA H200, 580.159.04" in text
    assert "correctness  1 failed, 99 passed in 31.20s" in text and "test_views[fp16]" in text
    assert "ERROR SUMMARY: 0 errors" in text
    assert "dropout bf16 2^28: copy 0.5000 ms" in text and "2.00x" in text  # torch 1.1 ms / 0.55 ms
    assert "fastdropout fwd1st 7.500, steady 0.550 ms" in text
    assert text.rstrip().endswith("RESULT: FAIL: correctness (FAIL)")
    assert len(json.loads((out / "bench.json").read_text())["rows"]) == len(rows)


def test_bench_scripts_run_as_gpu_check_runs_them():
    """gpu_check.sh's bench stage runs ``python bench/sharded.py`` from the tree's root over an
    in-place build that is not installed: Python then puts bench/ on sys.path, not the root. Run
    here the same way, with no site hooks (an editable install's finder is one) and torch found
    through PYTHONPATH, on the CPU."""
    import site
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(site.getsitepackages()))
    proc = subprocess.run(
        [sys.executable, "-S", "bench/sharded.py", "--device", "cpu", "--numel", "65536",
         "--repeats", "1", "--ops", "dropout", "--run-lengths", "256", "--json"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(proc.stdout)
    assert rows and {row["op"] for row in rows} == {"dropout"}
