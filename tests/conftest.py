import pytest
import torch

import fastdropout

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

HAS_CUDA = torch.cuda.is_available() and fastdropout.cuda_kernels_built()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and the CUDA kernels")

# The device that tests comparing CUDA with the CPU compare against: CUDA when present, else the
# CPU itself, so that those tests' bodies run (CPU against CPU) in every suite.
TARGET = "cuda" if HAS_CUDA else "cpu"


def leaf(t: torch.Tensor, device: str) -> torch.Tensor:
    """A fresh leaf copy of ``t`` on ``device`` that requires grad. (``t.to(device)`` is ``t``
    itself when ``t`` is there already: requiring grad on it would tie one device's inputs to
    the other's, and a copy made from a tensor that requires grad is no leaf.)"""
    return t.detach().to(device, copy=True).requires_grad_()


def snapshot(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of ``t`` as it is now (strides kept), never ``t`` itself: a later step of a
    test cannot change it (``.cpu()`` of a CPU tensor is the tensor, and a ``.grad`` accumulates
    in place)."""
    return t.detach().to("cpu", copy=True)


def devices():
    """The devices every device-generic test runs on: the CPU, and CUDA when present."""
    return ["cpu"] + (["cuda"] if HAS_CUDA else [])


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (tells -0 from 0 and compares NaN payloads)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    view = {torch.float32: torch.int32, torch.float64: torch.int64,
            torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]
    return torch.equal(a.detach().cpu().contiguous().view(view), b.detach().cpu().contiguous().view(view))


# Hypothesis profiles: "ci" (default) keeps the fuzz tests to a couple of minutes on 2 cores;
# "nightly" runs many more examples: HYPOTHESIS_PROFILE=nightly pytest tests/test_fuzz.py
try:
    import os

    from hypothesis import HealthCheck, settings

    settings.register_profile("ci", max_examples=120, deadline=None, derandomize=True,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("nightly", max_examples=3000, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis is a test dependency; test_fuzz.py skips without it
    pass
