"""Operator plumbing: loads the compiled kernels and registers, for each torch.ops.fastdropout
operator, its fake (meta) kernel for torch.compile and its autograd formula.

The schemas and the CPU/CUDA kernels are registered in C++ (csrc/ops.cpp). Backward saves
nothing but the int64[2] (seed, offset) tensor the forward actually used.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (registers torch.ops.fastdropout.*)

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
        for packet in (ops.dropout, ops.dropout_, ops.bias_dropout_add):
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


# --- autograd ----------------------------------------------------------------------------------
# dropout: y = keep * scale * x, linear in x, so grad_x is the same pass over grad_y with the
# same (seed, offset). dropout_backward is linear in grad too: its own backward is itself.

def _dropout_setup_context(ctx, inputs, output):
    _, p, _, _, _, channel_numel = inputs
    _, rng_state = output
    ctx.p = p
    ctx.channel_numel = channel_numel
    ctx.save_for_backward(rng_state)


def _dropout_backward(ctx, grad_out, _grad_rng_state):
    (rng_state,) = ctx.saved_tensors
    grad_x = ops.dropout_backward(grad_out, rng_state, ctx.p, ctx.channel_numel)
    return grad_x, None, None, None, None, None


torch.library.register_autograd(
    "fastdropout::dropout", _dropout_backward, setup_context=_dropout_setup_context)


def _dropout_backward_setup_context(ctx, inputs, output):
    _, rng_state, p, channel_numel = inputs
    ctx.p = p
    ctx.channel_numel = channel_numel
    ctx.save_for_backward(rng_state)


def _dropout_backward_backward(ctx, grad_grad_x):
    (rng_state,) = ctx.saved_tensors
    return ops.dropout_backward(grad_grad_x, rng_state, ctx.p, ctx.channel_numel), None, None, None


torch.library.register_autograd(
    "fastdropout::dropout_backward", _dropout_backward_backward,
    setup_context=_dropout_backward_setup_context)


# bias_dropout_add: out = residual + keep * scale * (x + bias).
# grad_x = keep * scale * grad_out, grad_bias = grad_x summed over the leading dimensions (both
# from one fused pass), grad_residual = grad_out itself.

def _bias_dropout_add_setup_context(ctx, inputs, output):
    _, bias, _, p, _, _, _ = inputs
    _, rng_state = output
    ctx.p = p
    ctx.has_bias = bias is not None
    ctx.save_for_backward(rng_state)


def _bias_dropout_add_backward(ctx, grad_out, _grad_rng_state):
    (rng_state,) = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.has_bias and ctx.needs_input_grad[1]:
        grad_x, grad_bias = ops.bias_dropout_add_backward(grad_out, rng_state, ctx.p)
    elif ctx.needs_input_grad[0]:
        grad_x = ops.dropout_backward(grad_out, rng_state, ctx.p, 1)
    if grad_x is not None and not ctx.needs_input_grad[0]:
        grad_x = None
    grad_residual = grad_out if ctx.needs_input_grad[2] else None
    return grad_x, grad_bias, grad_residual, None, None, None, None


torch.library.register_autograd(
    "fastdropout::bias_dropout_add", _bias_dropout_add_backward,
    setup_context=_bias_dropout_add_setup_context)


def _bias_dropout_add_backward_setup_context(ctx, inputs, output):
    grad, rng_state, p = inputs
    ctx.p = p
    ctx.grad_shape = grad.shape
    ctx.save_for_backward(rng_state)


def _bias_dropout_add_backward_backward(ctx, gg_x, gg_bias):
    # grad_x and grad_bias are both linear in grad through the same mask:
    # d/d(grad) of <gg_x, grad_x> + <gg_bias, grad_bias> = keep * scale * (gg_x + gg_bias).
    (rng_state,) = ctx.saved_tensors
    if gg_x is None and gg_bias is None:
        return None, None, None
    if gg_x is None:
        total = gg_bias.expand(ctx.grad_shape)
    elif gg_bias is None:
        total = gg_x
    else:
        total = gg_x + gg_bias
    return ops.dropout_backward(total, rng_state, ctx.p, 1), None, None


torch.library.register_autograd(
    "fastdropout::bias_dropout_add_backward", _bias_dropout_add_backward_backward,
    setup_context=_bias_dropout_add_backward_setup_context)
