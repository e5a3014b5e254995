"""Functional dropout with Philox masks that are regenerated in backward, never stored.

Every function here draws its mask by the contract in README.md ("The mask contract"): the
keep bit of the element at logical index ``i`` is a pure function of (seed, offset, i, p), the
same on the CPU and on every GPU.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Optional, Sequence, Tuple, Union

import torch

from . import regenerate
from ._ops import ops

__all__ = [
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "feature_dropout",
    "dropout_mask",
    "bias_dropout_add",
]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_U64 = 1 << 64


# --- argument checks: every bad input gets a Python error naming the argument ------------------

def _check_p(p) -> float:
    # A 0-dim real tensor is taken as its value, as torch.nn.functional.dropout takes it.
    if (isinstance(p, torch.Tensor) and p.dim() == 0 and p.dtype != torch.bool
            and not p.is_complex()):
        p = p.item()
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"fastdropout: p must be a float in [0, 1] or a 0-dim tensor, got {type(p).__name__}")
    p = float(p)
    if not (0.0 <= p <= 1.0):  # also rejects NaN
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p} (argument p)")
    return p


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fastdropout: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"fastdropout: {name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"fastdropout: {name} must be float32, float64, float16 or bfloat16, got {t.dtype}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"fastdropout: {name} must be on a CPU or CUDA device, got {t.device}")


def _to_int64(value: int, name: str) -> int:
    """A Python int in [0, 2**64) as the int64 with the same 64 bits. (Under torch.compile a seed
    that changes from call to call is traced as a SymInt, which the ops' schemas take.)"""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"fastdropout: {name} must be an int in [0, 2**64), got {type(value).__name__}")
    value = int(value)
    if not (0 <= value < _U64):
        raise ValueError(f"fastdropout: {name} must be in [0, 2**64), got {value}")
    return value - _U64 if value >= (1 << 63) else value


def _rng_args(x: torch.Tensor, seed, offset, generator) -> Tuple[Optional[int], int]:
    if seed is None:
        if offset != 0:
            raise ValueError("fastdropout: offset is only used together with seed=")
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(
                    f"fastdropout: generator must be a torch.Generator, got {type(generator).__name__}")
            gdev = generator.device
            if gdev.type != x.device.type or (
                    x.device.type == "cuda" and (gdev.index or 0) != (x.device.index or 0)):
                raise ValueError(
                    f"fastdropout: generator is on {gdev} but the tensor is on {x.device}")
        return None, 0
    if generator is not None:
        raise ValueError("fastdropout: pass either seed= or generator=, not both")
    return _to_int64(seed, "seed"), _to_int64(offset, "offset")


def _run(x: torch.Tensor, p: float, inplace: bool, seed, offset, generator,
         channel_numel: int) -> torch.Tensor:
    seed, offset = _rng_args(x, seed, offset, generator)
    if not inplace:
        out, rng_state = ops.dropout(x, p, seed, offset, generator, channel_numel)
        # is_compiling() first: Dynamo folds it, and never traces the thread-local read.
        if not torch.compiler.is_compiling() and regenerate.recording():
            regenerate.record(x, out, rng_state, p, channel_numel)
        return out
    if x.requires_grad and x.is_leaf and torch.is_grad_enabled():
        raise RuntimeError(
            "fastdropout: inplace=True on a leaf tensor that requires grad (x); "
            "use inplace=False or apply it to a non-leaf tensor")
    # Autograd (history rebased onto x, version bumped) and forward AD (x's tangent masked in
    # place) happen in the op's C++ autograd kernel.
    ops.dropout_(x, p, seed, offset, generator, channel_numel)
    return x


def dropout(x: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False, *,
            seed: Optional[int] = None, offset: int = 0,
            generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Dropout in one pass, drop-in for :func:`torch.nn.functional.dropout`.

    Each element is zeroed with probability ``p`` (exactly ``round(p * 65536) / 65536``) and
    the others are scaled by ``1 / (1 - p)``. Nothing is saved for backward but the 16-byte
    (seed, offset) pair: the mask is regenerated there.

    Args:
        x: float32, float64, float16 or bfloat16 tensor, on the CPU or a CUDA device, any shape
            and layout (the mask goes by logical row-major index).
        p: drop probability in [0, 1].
        training: when False, ``x`` itself is returned (as torch does).
        inplace: overwrite ``x``.
        seed: a 64-bit seed in [0, 2**64) makes the mask a pure function of
            (seed, offset, index, p), identical on every device. Default: drawn from the
            generator of ``x``'s device (CUDA: its Philox offset advances by 4 per call).
        offset: 64-bit stream offset used with ``seed``.
        generator: a torch.Generator on ``x``'s device to draw from instead of the default one.

    Example::

        >>> import torch, fastdropout
        >>> x = torch.ones(8)
        >>> fastdropout.dropout(x, p=0.5, seed=0)
        tensor([2., 0., 2., 2., 2., 2., 2., 2.])
    """
    p = _check_p(p)
    _check_tensor(x, "x")
    if not training or p == 0.0 or x.numel() == 0:
        return x
    return _run(x, p, inplace, seed, offset, generator, 1)


def feature_dropout(x: torch.Tensor, p: float = 0.5, training: bool = True,
                    inplace: bool = False, *, seed: Optional[int] = None, offset: int = 0,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Channel dropout over dims (N, C, ...), as :func:`torch.feature_dropout`: whole channels
    are zeroed, the keep bit of channel (n, c) being the contract's bit for mask index
    ``n * C + c``. Like torch, an input of fewer than 2 dimensions is an error only when a mask
    would be drawn (training, 0 < p < 1, non-empty); p = 1 zeroes it.

    Example::

        >>> y = fastdropout.feature_dropout(torch.ones(2, 3, 4), p=0.5, seed=0)
        >>> bool(((y == 0).all(-1) | (y != 0).all(-1)).all())  # whole channels
        True
    """
    p = _check_p(p)
    _check_tensor(x, "x")
    if not training or p == 0.0 or x.numel() == 0:
        return x
    if x.dim() >= 2:
        channel_numel = math.prod(x.shape[2:])
    elif p == 1.0:
        channel_numel = 1
    else:
        raise RuntimeError(
            "Feature dropout requires at least 2 dimensions in the input "
            f"(fastdropout: x is {x.dim()}-D; channels are dimension 1 of (N, C, ...))")
    return _run(x, p, inplace, seed, offset, generator, channel_numel)


def dropout1d(x: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False, *,
              seed: Optional[int] = None, offset: int = 0,
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Channel dropout for (N, C, L) or unbatched (C, L) inputs, as
    :func:`torch.nn.functional.dropout1d` (any other rank: RuntimeError, as in torch).

    Example::

        >>> y = fastdropout.dropout1d(torch.ones(2, 3, 4), p=0.5, seed=0)
    """
    p = _check_p(p)
    _check_tensor(x, "x")
    if x.dim() not in (2, 3):
        raise RuntimeError(
            f"dropout1d: Expected 2D or 3D input, but received a {x.dim()}D input "
            "(fastdropout: x must be (C, L) or (N, C, L))")
    return _channels(x, 3, p, training, inplace, seed, offset, generator)


def _warn_rank(name: str, x: torch.Tensor, usual: Tuple[int, int]) -> None:
    """torch accepts other ranks for dropout2d/dropout3d with a deprecation warning; so do we,
    with the same first sentence (which torch's tests match)."""
    if x.dim() not in usual:
        warnings.warn(
            f"{name}: Received a {x.dim()}-D input to {name}, which is deprecated and will "
            f"result in an error in a future release (as in torch; it expects "
            f"{usual[0]}-D or {usual[1]}-D input). fastdropout applies torch's behaviour for "
            "this rank; use dropout for element-wise dropout.", stacklevel=3)


def dropout2d(x: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False, *,
              seed: Optional[int] = None, offset: int = 0,
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Channel dropout for (N, C, H, W) inputs, as :func:`torch.nn.functional.dropout2d`:
    like torch, 3-D input is taken as (N, C, L) (with torch's warning), and other ranks warn
    and drop channels of dimension 1.

    Example::

        >>> y = fastdropout.dropout2d(torch.ones(2, 3, 4, 4), p=0.5, seed=0)
    """
    p = _check_p(p)
    _check_tensor(x, "x")
    _warn_rank("dropout2d", x, (3, 4))
    if x.dim() == 3:
        warnings.warn(
            "dropout2d: Received a 3D input to dropout2d and assuming that channel-wise 1D "
            "dropout behavior is desired - x is taken as (N, C, L), as torch does today (torch "
            "plans to read it as an unbatched (C, H, W) in a future release); use dropout1d "
            "to keep this behaviour.", stacklevel=2)
    return feature_dropout(x, p, training, inplace, seed=seed, offset=offset, generator=generator)


def dropout3d(x: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False, *,
              seed: Optional[int] = None, offset: int = 0,
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Channel dropout for (N, C, D, H, W) or unbatched (C, D, H, W) inputs, as
    :func:`torch.nn.functional.dropout3d`; like torch, any rank other than 5 is taken as
    unbatched (a batch dimension of 1 is added), other ranks than 4 and 5 with a warning.

    Example::

        >>> y = fastdropout.dropout3d(torch.ones(2, 3, 2, 2, 2), p=0.5, seed=0)
    """
    p = _check_p(p)
    _check_tensor(x, "x")
    _warn_rank("dropout3d", x, (4, 5))
    return _channels(x, 5, p, training, inplace, seed, offset, generator)


def _channels(x, batched_dim, p, training, inplace, seed, offset, generator):
    """Inputs of another rank than the batched one get a batch dimension of 1 (mask index =
    channel), as torch does."""
    if x.dim() == batched_dim:
        return feature_dropout(x, p, training, inplace, seed=seed, offset=offset, generator=generator)
    out = feature_dropout(x.unsqueeze(0), p, training, inplace, seed=seed, offset=offset,
                          generator=generator)
    return x if inplace else out.squeeze(0)


def dropout_mask(shape: Union[int, Sequence[int], torch.Size], p: float, seed: int,
                 offset: int = 0, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """The keep mask (True = kept) that :func:`dropout` applies to a tensor of ``shape`` with
    this ``seed`` and ``offset``: the mask contract, for inspection and tests.

    Example::

        >>> fastdropout.dropout_mask((2, 4), p=0.5, seed=0)
        tensor([[ True, False,  True,  True],
                [ True,  True,  True,  True]])
    """
    p = _check_p(p)
    shape = (shape,) if isinstance(shape, numbers.Integral) else tuple(shape)
    if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0 for s in shape):
        raise ValueError(f"fastdropout: shape must be non-negative ints, got {shape}")
    if seed is None:
        raise TypeError("fastdropout: dropout_mask needs an explicit seed")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"fastdropout: device must be a CPU or CUDA device, got {device}")
    rng_state = torch.tensor([_to_int64(seed, "seed"), _to_int64(offset, "offset")],
                             dtype=torch.int64, device=device)
    return ops.dropout_mask(rng_state, math.prod(shape), p).view(shape)


def bias_dropout_add(x: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor,
                     p: float, training: bool = True, *, seed: Optional[int] = None,
                     offset: int = 0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``residual + dropout(x + bias, p)`` in one pass forward and one pass backward.

    The mask is exactly the one :func:`dropout` draws for a tensor of ``x``'s shape with the
    same seed and offset. Arithmetic in float32 (float64 for float64 inputs), rounded once.
    ``bias`` is None or 1-D of size ``x.shape[-1]``; ``residual`` has ``x``'s shape, dtype and
    device. With ``training=False`` it returns ``residual + x + bias``.

    Example::

        >>> x, r = torch.randn(4, 16), torch.randn(4, 16)
        >>> b = torch.zeros(16)
        >>> out = fastdropout.bias_dropout_add(x, b, r, p=0.1, seed=1)
    """
    p = _check_p(p)
    _check_tensor(x, "x")
    _check_tensor(residual, "residual")
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(
            "fastdropout: residual must have x's shape, dtype and device "
            f"({tuple(x.shape)}, {x.dtype}, {x.device}), got "
            f"({tuple(residual.shape)}, {residual.dtype}, {residual.device})")
    if bias is not None:
        _check_tensor(bias, "bias")
        if x.dim() == 0 or bias.dim() != 1 or bias.shape[0] != x.shape[-1]:
            raise ValueError(
                f"fastdropout: bias must be 1-D with x.shape[-1] elements, got shape {tuple(bias.shape)} "
                f"for x of shape {tuple(x.shape)}")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(
                f"fastdropout: bias must have x's dtype and device ({x.dtype}, {x.device}), "
                f"got ({bias.dtype}, {bias.device})")
    if not training or p == 0.0:
        # Same single pass with nothing dropped; an explicit seed leaves the generator alone.
        return ops.bias_dropout_add(x, bias, residual, 0.0, 0, 0, None)[0]
    seed, offset = _rng_args(x, seed, offset, generator)
    return ops.bias_dropout_add(x, bias, residual, p, seed, offset, generator)[0]
