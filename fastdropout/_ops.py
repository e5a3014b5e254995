"""Operator plumbing: loads the compiled kernels and registers, for each torch.ops.fastdropout
operator, its fake (meta) kernel for torch.compile.

The schemas, the CPU/CUDA kernels (csrc/ops.cpp) and autograd (csrc/autograd.cpp) are
registered in C++. Backward saves nothing but the int64[2] (seed, offset) tensor the forward
actually used.
"""
from __future__ import annotations

import torch

from ._loader import _C  # noqa: F401  (registers torch.ops.fastdropout.*; a torch mismatch is a plain ImportError)

ops = torch.ops.fastdropout


def _keep_compile_from_merging_calls() -> None:
    """torch.compile's joint-graph CSE (torch._functorch.compile_utils.fx_graph_cse) in torch
    before 2.14 spares only aten's random ops, listed by name, not every op tagged
    nondeterministic_seeded: two dropout calls on the same tensor would be merged into one call,
    one mask. Listing ours there keeps them apart (torch 2.14 also checks the tag)."""
    try:
        from torch._functorch import compile_utils
    except ImportError:  # pragma: no cover - very old or stripped torch
        return
    rand_ops = getattr(compile_utils, "rand_ops", None)
    if isinstance(rand_ops, list):
        for packet in (ops.dropout, ops.dropout_, ops.bias_dropout_add, ops.sharded_dropout,
                       ops.sharded_dropout_, ops.sharded_bias_dropout_add):
            if packet not in rand_ops:
                rand_ops.append(packet)


_keep_compile_from_merging_calls()


def cuda_kernels_built() -> bool:
    """True when this build of fastdropout contains the CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastdropout::dropout", "CUDA")


# --- fake kernels (shapes, dtypes and layouts only) --------------------------------------------

def _rng_state_like(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((2,), dtype=torch.int64)


@torch.library.register_fake("fastdropout::dropout")
def _dropout_fake(x, p, seed=None, offset=0, generator=None, channel_numel=1):
    return torch.empty_like(x), _rng_state_like(x)


@torch.library.register_fake("fastdropout::dropout_")
def _dropout_inplace_fake(x, p, seed=None, offset=0, generator=None, channel_numel=1):
    return _rng_state_like(x)


@torch.library.register_fake("fastdropout::dropout_backward")
def _dropout_backward_fake(grad, rng_state, p, channel_numel=1):
    return torch.empty_like(grad)


@torch.library.register_fake("fastdropout::dropout_mask")
def _dropout_mask_fake(rng_state, numel, p):
    return rng_state.new_empty((numel,), dtype=torch.bool)


@torch.library.register_fake("fastdropout::bias_dropout_add")
def _bias_dropout_add_fake(x, bias, residual, p, seed=None, offset=0, generator=None):
    return torch.empty_like(x), _rng_state_like(x)


@torch.library.register_fake("fastdropout::bias_dropout_add_backward")
def _bias_dropout_add_backward_fake(grad, rng_state, p):
    return torch.empty_like(grad, memory_format=torch.contiguous_format), grad.new_empty(grad.shape[-1:])

# Autograd and forward-mode AD are registered in C++ (csrc/autograd.cpp): no Python runs in
# backward. vmap has its rules in _vmap.py (randomness "error" / "same" / "different"), which
# imports this module and is imported by the package's __init__.
