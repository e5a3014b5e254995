"""Sharded tensors (``torch.distributed.tensor.DTensor``): every shard draws exactly its slice of
the mask the unsharded call draws.

The mask contract makes the keep bit of an element a pure function of (seed, offset, its
logical index in the whole tensor, p). So a DTensor call maps each shard's local elements to
their global indices (a few integers: :func:`run_map`) and runs a kernel that draws the bit of
the global index (``torch.ops.fastdropout.sharded_dropout``). The result is a DTensor with the
input's placements whose ``full_tensor()`` equals the unsharded call bit for bit, whatever the
mesh, the placements or the parallel degree. The sharded ops are the unsharded ops' own
kernels handed the map (one pass forward, one backward, in place where the call is):

- ``Shard(d)`` on any dimension, even and uneven, on 1-D and 2-D (or larger) meshes;
- ``Replicate``: every rank runs the plain kernel on the whole tensor, so replicas stay equal;
- ``Partial`` (sum/avg): dropout is linear for a fixed mask, so each rank masks its partial
  with the global mask;
- channel dropout (``dropout1d/2d/3d``): the mask index is the global index / channel size;
- ``bias_dropout_add`` with ``x`` and ``residual`` sharded alike and a bias sharded on the last
  dimension like ``x``, or replicated.

The (seed, offset) pair is resolved exactly as for a plain tensor, on every rank: with
``seed=`` it is that seed; otherwise one draw from the rank's generator, so the ranks'
generators must be in step (``torch.manual_seed(s)`` with the same ``s`` on every rank, as
DTensor's own random ops require).

How it hooks in: ``torch.ops.fastdropout.dropout`` (and ``dropout_``, ``dropout_backward``,
``bias_dropout_add``, ``bias_dropout_add_backward``) get a rule for the DTensor subclass
(``torch.library.register_torch_dispatch``). The ops' C++ autograd stays above it: forward
saves the (seed, offset) state, backward calls ``dropout_backward`` with the DTensor gradient,
whose rule replays the mask on the gradient's own shards (its placements may differ from the
output's). Importing this module registers the rules (``import fastdropout.dtensor``).

Example (on every rank, after ``init_process_group``)::

    >>> from torch.distributed.tensor import distribute_tensor, init_device_mesh, Shard
    >>> mesh = init_device_mesh("cpu", (2,))
    >>> x = distribute_tensor(torch.randn(4, 8), mesh, [Shard(0)])
    >>> y = fastdropout.dropout(x, 0.5, seed=3)
    >>> torch.equal(y.full_tensor(), fastdropout.dropout(x.full_tensor(), 0.5, seed=3))
    True
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from . import _ops as _fakes
from ._ops import ops

__all__ = ["run_map", "shard_run_map", "AVAILABLE"]

try:
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    AVAILABLE = True
except ImportError:  # a torch built without torch.distributed: no DTensor to handle
    AVAILABLE = False

# (run_length, run_counts, run_strides, run_base): the sharded ops' map arguments.
RunMap = Tuple[int, List[int], List[int], int]

# Must match kMaxRunLevels in csrc/run_map.h.
_MAX_RUN_LEVELS = 4


def run_map(global_shape: Sequence[int], local_shape: Sequence[int],
            global_offset: Sequence[int]) -> Optional[RunMap]:
    """The map from a shard's local elements to the global tensor's logical row-major indices,
    for a shard that is the box ``[offset, offset + local_shape)`` of the global tensor.

    Returns None when the shard is the whole tensor (the plain kernels apply). Otherwise
    ``(run_length, counts, strides, base)``: read contiguously, the local tensor is a sequence
    of runs of ``run_length`` elements, each contiguous in the global order; run ``r`` starts at
    global index ``base + sum_l digit_l(r) * strides[l]``, the digits of ``r`` in the mixed radix
    ``counts`` (last fastest). Unsharded dimensions are merged into the runs and levels, so a
    shard of a mesh with k sharded tensor dimensions has at most k levels.

    Example::

        >>> run_map((4, 6), (4, 3), (0, 3))   # columns 3..5 of a 4x6 tensor
        (3, [4], [6], 3)
    """
    shape, local, offset = list(global_shape), list(local_shape), list(global_offset)
    sharded = [d for d in range(len(shape)) if local[d] != shape[d]]
    if not sharded:
        return None
    numel = math.prod(local)
    if numel == 0:
        return 1, [], [], 0  # nothing to map; the op still resolves (and records) its rng state
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    last = sharded[-1]
    run_length = math.prod(local[last:])
    base = sum(o * s for o, s in zip(offset, strides))
    counts: List[int] = []
    level_strides: List[int] = []
    for d in range(last):
        if local[d] == 1:
            continue  # contributes its offset (in base) only
        if counts and local[d] == shape[d] and level_strides[-1] == shape[d] * strides[d]:
            # A whole dimension after a level: index i * S + j with stride strides[d].
            counts[-1] *= shape[d]
            level_strides[-1] = strides[d]
        else:
            counts.append(local[d])
            level_strides.append(strides[d])
    if len(counts) > _MAX_RUN_LEVELS:
        raise NotImplementedError(
            f"fastdropout: a shard of shape {tuple(local)} in {tuple(shape)} needs {len(counts)} "
            f"run levels; the sharded kernels take at most {_MAX_RUN_LEVELS}")
    return run_length, counts, level_strides, base


def _check_placements(t: "DTensor", name: str) -> None:
    for i, placement in enumerate(t.placements):
        kind = type(placement)
        if kind is Shard or kind is Replicate:
            continue
        if kind is Partial and placement.reduce_op in ("sum", "avg"):
            continue
        raise NotImplementedError(
            f"fastdropout: {name} has placement {placement} on mesh dimension {i}; the sharded "
            "dropout takes Shard(d), Replicate and Partial(sum/avg) placements")


def shard_run_map(t: "DTensor", name: str = "x") -> Optional[RunMap]:
    """:func:`run_map` of this rank's shard of the DTensor ``t`` (None: the shard is the whole
    tensor: replicated or partial only).

    Example::

        >>> shard_run_map(distribute_tensor(torch.zeros(4, 6), mesh, [Shard(1)]))  # rank 1 of 2
        (3, [4], [6], 3)
    """
    _check_placements(t, name)
    local_shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh,
                                                                t.placements)
    if tuple(t._local_tensor.shape) != tuple(local_shape):
        raise RuntimeError(
            f"fastdropout: {name}'s local tensor has shape {tuple(t._local_tensor.shape)}, but its "
            f"placements {t.placements} give {tuple(local_shape)} on this rank")
    return run_map(t.shape, local_shape, offset)


# --- the DTensor rules ---------------------------------------------------------------------------

def _bind(func, args, kwargs) -> Dict[str, Any]:
    """The op's arguments by name, defaults filled in."""
    bound = {}
    for i, arg in enumerate(func._schema.arguments):
        if i < len(args):
            bound[arg.name] = args[i]
        elif arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        else:
            bound[arg.name] = arg.default_value
    return bound


def _like(local: torch.Tensor, t: "DTensor", placements=None) -> "DTensor":
    """A DTensor of t's global shape (contiguous strides) on t's mesh from this rank's shard."""
    shape = t.shape
    stride = tuple(math.prod(shape[d + 1:]) for d in range(len(shape)))
    return DTensor.from_local(local, t.device_mesh, placements or t.placements, run_check=False,
                              shape=shape, stride=stride)


def _replicated(local: torch.Tensor, mesh) -> "DTensor":
    return DTensor.from_local(local, mesh, [Replicate()] * mesh.ndim, run_check=False)


def _local(t) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def _masked(local: torch.Tensor, rmap: Optional[RunMap], p: float, seed, offset, generator,
            channel_numel: int) -> Tuple[torch.Tensor, torch.Tensor]:
    if rmap is None:
        return ops.dropout(local, p, seed, offset, generator, channel_numel)
    return ops.sharded_dropout(local, p, *rmap, seed, offset, generator, channel_numel)


def _replayed(local: torch.Tensor, rng_state: torch.Tensor, rmap: Optional[RunMap], p: float,
              channel_numel: int) -> torch.Tensor:
    if rmap is None:
        return ops.dropout_backward(local, rng_state, p, channel_numel)
    return ops.sharded_dropout_backward(local, rng_state, p, *rmap, channel_numel)


def _dropout_rule(mode, func, types, args, kwargs):
    a = _bind(func, args, kwargs)
    x = a["x"]
    out, rng_state = _masked(x._local_tensor, shard_run_map(x), a["p"], a["seed"], a["offset"],
                             a["generator"], a["channel_numel"])
    return _like(out, x), _replicated(rng_state, x.device_mesh)


def _dropout_inplace_rule(mode, func, types, args, kwargs):
    a = _bind(func, args, kwargs)
    x = a["x"]
    rmap = shard_run_map(x)
    local = x._local_tensor
    if rmap is None:
        rng_state = ops.dropout_(local, a["p"], a["seed"], a["offset"], a["generator"],
                                 a["channel_numel"])
    else:
        rng_state = ops.sharded_dropout_(local, a["p"], *rmap, a["seed"], a["offset"],
                                         a["generator"], a["channel_numel"])
    return _replicated(rng_state, x.device_mesh)


def _dropout_backward_rule(mode, func, types, args, kwargs):
    a = _bind(func, args, kwargs)
    grad = a["grad"]
    out = _replayed(grad._local_tensor, _local(a["rng_state"]), shard_run_map(grad, "grad"),
                    a["p"], a["channel_numel"])
    return _like(out, grad)


def _no_partial(placements):
    return [Replicate() if p.is_partial() else p for p in placements]


def _bias_columns(bias: "DTensor", x: "DTensor", first: int, count: int) -> torch.Tensor:
    """Columns [first, first + count) of the 1-D DTensor bias, on this rank: its own shard
    when that is the range (bias sharded on the mesh dimension that shards x's last
    dimension), else gathered."""
    if bias.device_mesh != x.device_mesh:
        raise ValueError("fastdropout: bias must be on x's device mesh")
    _check_placements(bias, "bias")
    if any(p.is_partial() for p in bias.placements):
        bias = bias.redistribute(bias.device_mesh, _no_partial(bias.placements))
    local_shape, offset = compute_local_shape_and_global_offset(bias.shape, bias.device_mesh,
                                                                bias.placements)
    if offset[0] == first and local_shape[0] == count:
        return bias._local_tensor
    whole = bias.redistribute(bias.device_mesh, [Replicate()] * bias.device_mesh.ndim)
    return whole._local_tensor[first:first + count]


def _bias_dropout_add_rule(mode, func, types, args, kwargs):
    a = _bind(func, args, kwargs)
    x, bias, residual = a["x"], a["bias"], a["residual"]
    if not isinstance(residual, DTensor) or (bias is not None and not isinstance(bias, DTensor)):
        raise TypeError("fastdropout: bias_dropout_add with a DTensor x needs a DTensor residual "
                        "and bias (or bias=None)")
    _check_placements(x, "x")
    # x + bias and the residual are added once: a partial x is reduced first.
    placements = _no_partial(x.placements)
    if list(placements) != list(x.placements):
        x = x.redistribute(x.device_mesh, placements)
    if residual.device_mesh != x.device_mesh:
        raise ValueError("fastdropout: residual must be on x's device mesh")
    if list(residual.placements) != list(placements):
        residual = residual.redistribute(x.device_mesh, placements)
    xl, rl = x._local_tensor, residual._local_tensor
    local_shape, offset = compute_local_shape_and_global_offset(x.shape, x.device_mesh, placements)
    bl = None if bias is None else _bias_columns(bias, x, offset[-1], local_shape[-1])
    rmap = shard_run_map(x)
    p, seed, off, generator = a["p"], a["seed"], a["offset"], a["generator"]
    if rmap is None:
        out, rng_state = ops.bias_dropout_add(xl, bl, rl, p, seed, off, generator)
    else:
        out, rng_state = ops.sharded_bias_dropout_add(xl, bl, rl, p, *rmap, seed, off, generator)
    return _like(out, x, placements), _replicated(rng_state, x.device_mesh)


def _bias_dropout_add_backward_rule(mode, func, types, args, kwargs):
    a = _bind(func, args, kwargs)
    grad, p = a["grad"], a["p"]
    rng_state = _local(a["rng_state"])
    rmap = shard_run_map(grad, "grad")
    gl = grad._local_tensor
    last = grad.ndim - 1
    # grad_bias = sum of grad_x over all but the last dimension: sharded where grad's last
    # dimension is, partial where its other dimensions are.
    bias_placements = []
    for placement in grad.placements:
        if type(placement) is Shard:
            bias_placements.append(Shard(0) if placement.dim % grad.ndim == last else Partial())
        else:
            bias_placements.append(placement)
    if rmap is None:
        grad_x, grad_bias = ops.bias_dropout_add_backward(gl, rng_state, p)
    else:
        # grad_bias: the sum over this shard's rows (in the contract's order over them); the
        # sum over the shards is the Partial placement's reduction.
        grad_x, grad_bias = ops.sharded_bias_dropout_add_backward(gl, rng_state, p, *rmap)
    mesh = grad.device_mesh
    grad_bias = DTensor.from_local(grad_bias, mesh, bias_placements, run_check=False,
                                   shape=torch.Size(grad.shape[-1:]), stride=(1,))
    return _like(grad_x, grad), grad_bias


# --- registration --------------------------------------------------------------------------------

# The fakes of the unsharded ops, whose layouts the sharded ops share (ops.cpp runs both).
def _sharded_fake(x, p, run_length, run_counts, run_strides, run_base, seed=None, offset=0,
                  generator=None, channel_numel=1):
    return _fakes._dropout_fake(x, p)


def _sharded_inplace_fake(x, p, run_length, run_counts, run_strides, run_base, seed=None,
                          offset=0, generator=None, channel_numel=1):
    return _fakes._dropout_inplace_fake(x, p)


def _sharded_backward_fake(grad, rng_state, p, run_length, run_counts, run_strides, run_base,
                           channel_numel=1):
    return _fakes._dropout_backward_fake(grad, rng_state, p)


def _sharded_bias_dropout_add_fake(x, bias, residual, p, run_length, run_counts, run_strides,
                                   run_base, seed=None, offset=0, generator=None):
    return _fakes._bias_dropout_add_fake(x, bias, residual, p)


def _sharded_bias_dropout_add_backward_fake(grad, rng_state, p, run_length, run_counts,
                                            run_strides, run_base):
    return _fakes._bias_dropout_add_backward_fake(grad, rng_state, p)


def _register() -> None:
    torch.library.register_fake("fastdropout::sharded_dropout", _sharded_fake)
    torch.library.register_fake("fastdropout::sharded_dropout_", _sharded_inplace_fake)
    torch.library.register_fake("fastdropout::sharded_dropout_backward", _sharded_backward_fake)
    torch.library.register_fake("fastdropout::sharded_bias_dropout_add",
                                _sharded_bias_dropout_add_fake)
    torch.library.register_fake("fastdropout::sharded_bias_dropout_add_backward",
                                _sharded_bias_dropout_add_backward_fake)
    # Their autograd is registered in C++ (csrc/autograd.cpp), as the unsharded ops'.
    if not AVAILABLE:
        return
    for name, rule in (("dropout", _dropout_rule), ("dropout_", _dropout_inplace_rule),
                       ("dropout_backward", _dropout_backward_rule),
                       ("bias_dropout_add", _bias_dropout_add_rule),
                       ("bias_dropout_add_backward", _bias_dropout_add_backward_rule)):
        torch.library.register_torch_dispatch(f"fastdropout::{name}", DTensor, rule)


_register()
