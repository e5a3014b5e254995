"""vmap rules for fastdropout's operators, with torch's randomness modes.

``torch.func.vmap(f, randomness=...)`` decides what a random operation inside ``f`` does:

- ``"error"`` (the default): torch's own error is raised (by torch's own check, see
  :func:`_check_randomness`), unless ``seed=`` is given: then nothing random is drawn and the
  call is treated as under "same".
- ``"same"``: every slice gets the same mask, the contract's mask of one slice-shaped call with
  (seed, offset) (channel dropout: of one slice's (N, C) channels).
- ``"different"``: each slice gets its own mask, the contract's mask of the whole batched tensor
  with the batch dimension first, as if the call were made on ``torch.stack(slices)``; an
  unbatched input is expanded to the batch first. (Channel dropout: the mask of index
  ``(b * N + n) * C + c``.)

p = 0 and p = 1 draw nothing, so they never raise (torch's dropout does not either).

The rules are Python kernels at the FuncTorchVmapMode dispatch key, which every call under vmap
passes, batched input or not, as torch's own native_dropout rule does. (A FuncTorchBatched rule,
which is what torch.library.register_vmap registers, is skipped for unbatched inputs and could not
honour "error" or "different" there.) Outside vmap none of this runs.

Backward and forward-mode tangents replay the forward's mask from its rng_state and must do it in
the forward's layout. The forward returns its rng_state *batched* (an expand, no copy) when its
mask spans the batch ("different"), unbatched when it is one slice's mask ("same", or a forward
made outside this vmap, as in jacrev's vmapped backward). The replay ops go by that, not by the
current randomness mode, so vmap(grad(f)), jacrev, jacfwd and hessian replay exactly the mask the
forward drew.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
from torch._C._functorch import _add_batch_dim, _unwrap_batched
from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter

from ._ops import ops

_LIB = torch.library.Library("fastdropout", "IMPL")
_VMAP_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.FuncTorchVmapMode).add(
    torch._C.DispatchKey.FuncTorchBatched)

Tensor = torch.Tensor


class _Level:
    """The vmap level a rule runs at: unwraps its inputs, wraps its outputs, calls below it."""

    def __init__(self) -> None:
        interpreter = retrieve_current_functorch_interpreter()
        self.level = interpreter.level()
        self.batch_size = interpreter.batch_size()
        self.randomness = interpreter.randomness()

    def unwrap(self, t: Optional[Tensor]) -> Tuple[Optional[Tensor], bool]:
        """The tensor one level down, batch dimension first, and whether it was batched here."""
        if t is None:
            return None, False
        value, bdim = _unwrap_batched(t, self.level)
        if bdim is None:
            return value, False
        return value.movedim(bdim, 0), True

    def expand(self, value: Tensor, batched: bool) -> Tensor:
        """An unbatched value as (batch, *shape), without a copy."""
        return value if batched else value.expand(self.batch_size, *value.shape)

    def wrap(self, value: Tensor) -> Tensor:
        return _add_batch_dim(value, 0, self.level)

    def wrap_state(self, rng_state: Tensor) -> Tensor:
        """A forward's rng_state, marked as the state of a mask spanning the batch."""
        return self.wrap(rng_state.expand(self.batch_size, *rng_state.shape))

    @staticmethod
    def below():
        """Calls made in this context go to the next transform level down."""
        return torch._C._ExcludeDispatchKeyGuard(_VMAP_KEYS)


def _check_randomness(level: _Level, p: float, seed: Optional[int],
                      inplace_on_unbatched: bool) -> None:
    """Raise where torch raises for a random operation at this level: randomness="error", or an
    in-place random operation on an unbatched tensor under "different". torch's own check raises
    (a zero-element in-place Bernoulli draw at this level), so the exception is torch's, in
    torch's words, whatever the version; the RuntimeError below is only a safety net.

    With an explicit seed the mask is a pure function of (seed, offset), nothing random is
    drawn, so "error" lets it through and it is treated as "same" (each slice gets what a call
    on that slice gives): this is what makes torch.func.hessian / jacfwd work with seed=."""
    if not 0.0 < p < 1.0:
        return
    if (level.randomness == "error" and seed is None) or (
            inplace_on_unbatched and level.randomness == "different"):
        torch.empty(0).bernoulli_(0.5)
        raise RuntimeError(
            f"vmap: fastdropout drew a random mask under randomness={level.randomness!r}; use "
            "randomness='same' or 'different'")


def _slice_mask_for_every_slice(call: Callable[[Tensor, int], Tuple[Tensor, Tensor]],
                                value: Tensor, channel_numel: int) -> Tuple[Tensor, Tensor]:
    """Run ``call`` over a batch-first tensor so that every slice gets the mask of one slice.

    A slice of M elements is (M / channel_numel) channels of channel_numel elements. Viewed as
    (channels, batch, channel_numel), the contract's index of element (q, b, r) divided by
    batch * channel_numel is q: the slice's own mask index, whatever b.
    """
    batch = value.shape[0]
    channels = math.prod(value.shape[1:]) // channel_numel
    arranged = value.reshape(batch, channels, channel_numel).transpose(0, 1)
    out, rng_state = call(arranged, batch * channel_numel)
    return out.transpose(0, 1).reshape(value.shape), rng_state


def _dropout_rule(x, p, seed=None, offset=0, generator=None, channel_numel=1):
    level = _Level()
    value, batched = level.unwrap(x)
    _check_randomness(level, p, seed, inplace_on_unbatched=False)

    def call(t: Tensor, k: int) -> Tuple[Tensor, Tensor]:
        with level.below():
            return ops.dropout(t, p, seed, offset, generator, k)

    if level.randomness == "different":
        out, rng_state = call(level.expand(value, batched), channel_numel)
        return level.wrap(out), level.wrap_state(rng_state)
    if not batched:  # "same" on an unbatched input: one call, one slice's mask
        return call(value, channel_numel)
    out, rng_state = _slice_mask_for_every_slice(call, value, channel_numel)
    return level.wrap(out), rng_state


def _dropout_inplace_rule(x, p, seed=None, offset=0, generator=None, channel_numel=1):
    level = _Level()
    value, batched = level.unwrap(x)
    _check_randomness(level, p, seed, inplace_on_unbatched=not batched)
    if level.randomness == "different" and batched:
        with level.below():
            rng_state = ops.dropout_(value, p, seed, offset, generator, channel_numel)
        return level.wrap_state(rng_state)
    if not batched:
        with level.below():
            rng_state = ops.dropout_(value, p, seed, offset, generator, channel_numel)
        return rng_state

    def call(t: Tensor, k: int) -> Tuple[Tensor, Tensor]:
        with level.below():
            return ops.dropout(t, p, seed, offset, generator, k)

    out, rng_state = _slice_mask_for_every_slice(call, value, channel_numel)
    with level.below():
        value.copy_(out)  # value is a view of x's own storage
    return rng_state


def _dropout_backward_rule(grad, rng_state, p, channel_numel=1):
    level = _Level()
    value, batched = level.unwrap(grad)
    state, state_batched = level.unwrap(rng_state)

    def call(t: Tensor, k: int, s: Tensor) -> Tensor:
        with level.below():
            return ops.dropout_backward(t, s, p, k)

    if state_batched:  # the forward's mask spans the batch; every row holds the same state
        return level.wrap(call(level.expand(value, batched), channel_numel,
                               _one_state(state)))
    if not batched:
        return call(value, channel_numel, state)
    out, _ = _slice_mask_for_every_slice(lambda t, k: (call(t, k, state), state), value,
                                         channel_numel)
    return level.wrap(out)


def _one_state(state: Tensor) -> Tensor:
    """The (seed, offset) of a batched rng_state whose rows must all be equal (the state of one
    forward whose mask spans the batch). Rows that differ (states of separate calls, batched
    by hand) have no single mask to replay: an error, not row 0's mask for every slice."""
    if state.shape[0] > 1 and not bool((state == state[0]).all()):
        raise RuntimeError(
            "fastdropout: under vmap, rng_state differs across the batch; the backward of "
            "several separate dropout calls cannot be replayed as one batched call")
    return state[0]


def _canonical_nans(t: Tensor) -> Tensor:
    """NaNs replaced by the dtype's canonical quiet NaN, as the kernels write them."""
    return torch.where(torch.isnan(t), torch.full((), float("nan"), dtype=t.dtype, device=t.device), t)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bias_dropout_add_rule(x, bias, residual, p, seed=None, offset=0, generator=None):
    level = _Level()
    x_value, x_batched = level.unwrap(x)
    bias_value, bias_batched = level.unwrap(bias)
    residual_value, residual_batched = level.unwrap(residual)
    random = 0.0 < p < 1.0
    if not (x_batched or bias_batched or residual_batched) and not (
            random and level.randomness == "different"):
        _check_randomness(level, p, seed, inplace_on_unbatched=False)
        with level.below():
            return ops.bias_dropout_add(x_value, bias_value, residual_value, p, seed, offset,
                                        generator)
    # Composed at this level with the fused kernel's arithmetic (float32, or float64, each step
    # rounded as there, one final rounding), the mask chosen by dropout's rule: a batched bias
    # cannot be passed to the fused kernel, and "same" needs dropout's slice arrangement.
    acc = _accumulation_dtype(x.dtype)
    v = x.to(acc) if bias is None else x.to(acc) + bias.to(acc)
    dropped, rng_state = ops.dropout(v, p, seed, offset, generator, 1)
    return _canonical_nans((residual.to(acc) + dropped).to(x.dtype)), rng_state


def _bias_dropout_add_backward_rule(grad, rng_state, p):
    level = _Level()
    value, batched = level.unwrap(grad)
    state, state_batched = level.unwrap(rng_state)
    if not (batched or state_batched):
        with level.below():
            return ops.bias_dropout_add_backward(value, state, p)
    grad_x = ops.dropout_backward(grad, rng_state, p, 1)
    leading = tuple(range(grad_x.dim() - 1))
    grad_bias = grad_x.sum(dim=leading, dtype=_accumulation_dtype(grad.dtype)).to(grad.dtype)
    return grad_x, grad_bias


for _name, _rule in (("dropout", _dropout_rule), ("dropout_", _dropout_inplace_rule),
                     ("dropout_backward", _dropout_backward_rule),
                     ("bias_dropout_add", _bias_dropout_add_rule),
                     ("bias_dropout_add_backward", _bias_dropout_add_backward_rule)):
    _LIB.impl(_name, _rule, "FuncTorchVmapMode")
