"""Dropout outputs regenerated in backward instead of kept: :func:`regenerate_dropout_outputs`.

A fastdropout output is a pure function of its input and the 16-byte (seed, offset) state the
forward used. The ops that consume it keep it for their own backward (the attention's
``matmul(dropout(probs), V)``, each LoRA adapter's ``lora_A(dropout(x))``), B x H x S x S or
B x S x D bytes per call, while its input is usually kept anyway (softmax keeps ``probs``; the
base layer keeps ``x``). While a scope is active, a saved-tensor pack hook replaces such a saved
output (or a view of it) by a reference to the input plus the state, and the unpack hook
recomputes it, bit for bit, when backward needs it: one memory-bound pass, the backward kernel
applied to the input (``fastdropout::dropout_backward``, which applies the same mask and the
same scaling as the forward). On CUDA the state is the device tensor the forward wrote, so
nothing synchronises with the host and CUDA graphs capture and replay the recomputation.

What is regenerated: outputs of :func:`fastdropout.dropout` and of channel dropout
(``dropout1d/2d/3d``, ``feature_dropout``, the modules, and the routed ``F.dropout`` calls),
made out of place, with grad mode on, on plain CPU or CUDA tensors (not DTensor, not inside
vmap or torch.func transforms, not while torch.compile traces). Nothing else is touched:
in-place dropout (the input is gone), ``drop_path`` and ``bias_dropout_add`` (their outputs feed
an add, which saves nothing, or would need two inputs kept in place of one output) keep theirs.

Never more memory: a reference to the input replaces the output only where the input's storage
is no larger than the output's (an input that is a slice of a larger tensor keeps its output),
and an output that no op saves costs nothing. Never a silent wrong gradient: an output changed in
place before an op saves it is kept as it is; an input changed in place after the forward makes
backward raise, as torch does for a saved tensor modified in place.

Saved-tensor hooks nest; only the innermost act. A scope opened inside other hooks
(``torch.autograd.graph.save_on_cpu``, a user's, ``torch.utils.checkpoint``'s) composes with
them: the tensors it does not regenerate, and the input it keeps in place of an output, go
through the outer hooks (save_on_cpu then keeps the input on the CPU). Hooks opened inside the
scope act alone there, and dropout outputs saved there are kept as those hooks keep them.
torch.func's grad, vjp, jacrev and hessian refuse saved-tensor hooks: a scope opened inside
them does nothing (outputs are kept, as without it), and calling them inside a scope raises
torch's error, as with ``save_on_cpu``.
"""
from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from ._ops import ops

__all__ = ["regenerate_dropout_outputs", "regenerate_on_forward", "stop_regenerating_on_forward"]

Tensor = torch.Tensor

_local = threading.local()  # .depth: scopes open on this thread (only they record outputs)


def recording() -> bool:
    """Whether a dropout output made now on this thread should be recorded."""
    return getattr(_local, "depth", 0) > 0


class _Recipe:
    """How to regenerate one dropout output: its input (a detached alias: same storage and
    version counter, no autograd history) and the state its forward used; and, to recognise
    the output when an op saves it, a weak reference to it, its version and its dtype."""

    __slots__ = ("input", "input_version", "rng_state", "p", "channel_numel", "output_ref",
                 "output_version", "dtype", "__weakref__")

    def __init__(self, x: Tensor, out: Tensor, rng_state: Tensor, p: float,
                 channel_numel: int, key: Tuple[Any, int]) -> None:
        self.input = x.detach()
        self.input_version = x._version
        self.rng_state = rng_state
        self.p = p
        self.channel_numel = channel_numel
        self_ref = weakref.ref(self)
        # The entry goes when the output is freed (and with it this reference to the input).
        self.output_ref = weakref.ref(out, lambda _: _forget(key, self_ref))
        self.output_version = out._version
        self.dtype = out.dtype


# (device, storage data pointer) of a live dropout output -> its recipe. An entry is dropped when
# its output tensor is freed; a lookup also checks that the output is alive and still owns that
# storage, so a reused address never matches.
_recipes: Dict[Tuple[Any, int], _Recipe] = {}
_recipes_lock = threading.Lock()


def _forget(key: Tuple[Any, int], recipe_ref: "weakref.ref[_Recipe]") -> None:
    with _recipes_lock:
        if _recipes.get(key) is recipe_ref():
            del _recipes[key]


def _storage_key(t: Tensor) -> Tuple[Any, int]:
    return (t.device, t.untyped_storage().data_ptr())


def _plain(t: Tensor) -> bool:
    """A dense CPU/CUDA tensor of torch's own class (no subclass: DTensor, fake and functional
    tensors while compiling), not wrapped by a torch.func transform."""
    return (type(t) is Tensor and t.layout == torch.strided
            and not torch._C._functorch.is_functorch_wrapped_tensor(t))


def record(x: Tensor, out: Tensor, rng_state: Tensor, p: float, channel_numel: int) -> None:
    """Called by fastdropout's functional path for each out-of-place dropout made while a
    scope is open on this thread."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return
    if not (_plain(x) and _plain(out)) or x.dtype != out.dtype:
        return
    # Keeping x must never cost more than keeping out: not where x views a larger storage.
    if x.untyped_storage().nbytes() > out.untyped_storage().nbytes():
        return
    key = _storage_key(out)
    recipe = _Recipe(x, out, rng_state, p, channel_numel, key)
    with _recipes_lock:
        _recipes[key] = recipe


def _recipe_for(t: Tensor) -> Optional[_Recipe]:
    """The recipe of the dropout output that ``t`` is (or views), if it can be regenerated
    exactly now."""
    if not _plain(t) or t.numel() == 0:
        return None
    recipe = _recipes.get(_storage_key(t))
    if recipe is None:
        return None
    out = recipe.output_ref()
    if (out is None or out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
            or t.dtype != recipe.dtype):
        return None
    # Changed in place since the forward (the output, or the input it would be rebuilt from):
    # keep the output as it is.
    if t._version != recipe.output_version or recipe.input._version != recipe.input_version:
        return None
    return recipe


class _Regenerated:
    """What a saved dropout output is packed into: the recipe's input (packed by the outer
    hooks, if any), the state, and the saved tensor's geometry within the output's storage.
    It copies the recipe's fields rather than keeping the recipe, which holds the input itself:
    under outer hooks (save_on_cpu) that would keep the input where the hooks moved it from."""

    __slots__ = ("packed_input", "input_version", "rng_state", "p", "channel_numel", "size",
                 "stride", "storage_offset", "outer_unpack")

    def __init__(self, recipe: _Recipe, t: Tensor, outer: Optional[Tuple[Callable, Callable]]):
        self.packed_input = outer[0](recipe.input) if outer else recipe.input
        self.outer_unpack = outer[1] if outer else None
        self.input_version = recipe.input_version
        self.rng_state = recipe.rng_state
        self.p = recipe.p
        self.channel_numel = recipe.channel_numel
        self.size = t.size()
        self.stride = t.stride()
        self.storage_offset = t.storage_offset()

    def unpack(self) -> Tensor:
        if self.outer_unpack is not None:
            # The outer hooks own the input now (save_on_cpu: a copy); like torch with any
            # saved-tensor hooks, versions are theirs to check.
            x = self.outer_unpack(self.packed_input)
        else:
            x = self.packed_input
            if x._version != self.input_version:
                raise RuntimeError(
                    "fastdropout: a dropout output saved for backward cannot be regenerated: "
                    f"its input (a {x.dtype} tensor of shape {tuple(x.shape)}) was modified by an "
                    f"in-place operation after the dropout (it is at version {x._version}; "
                    f"expected version {self.input_version}). Avoid the in-place operation, or "
                    "run this part outside fastdropout.regenerate_dropout_outputs() (or without "
                    "replace_dropout(..., regenerate=True)).")
        with torch.no_grad():
            full = ops.dropout_backward(x, self.rng_state, self.p, self.channel_numel)
        return full.as_strided(self.size, self.stride, self.storage_offset)


class regenerate_dropout_outputs:
    """Within this scope, fastdropout dropout outputs that later ops save for backward are
    kept as their input plus the 16-byte state and recomputed, bit for bit, in backward: with
    dropout, a model keeps the bytes it keeps without (see the module docstring for what is
    covered and how it nests with other saved-tensor hooks).

    Usable as a context manager (reentrant, per thread) or, for a model, through
    ``replace_dropout(model, regenerate=True)``, which opens it around every forward.

    Example::

        >>> with fastdropout.regenerate_dropout_outputs():
        ...     loss = model(**batch).loss      # attention dropout outputs are not kept
        >>> loss.backward()                     # they are recomputed here
    """

    def __init__(self) -> None:
        # What each __enter__ opened, per thread: saved-tensor hooks are per thread, and one
        # scope object (a model's, under replace_dropout) may be entered by several threads.
        self._opened = threading.local()

    def _stack(self) -> list:
        if not hasattr(self._opened, "stack"):
            self._opened.stack = []
        return self._opened.stack

    def __enter__(self) -> "regenerate_dropout_outputs":
        # While torch.compile traces, nothing: saved-tensor hooks act when a graph runs, not in
        # it, and a compiled graph's dropout outputs are never recorded (see the README).
        if torch.compiler.is_compiling():
            return self
        hooks = None
        # Inside torch.func.grad/vjp saved-tensor hooks are refused: do nothing there.
        if torch._C._autograd._saved_tensors_hooks_get_disabled_error_message() is None:
            outer = torch._C._autograd._top_saved_tensors_default_hooks(True)
            hooks = torch.autograd.graph.saved_tensors_hooks(*_hooks_over(outer))
            hooks.__enter__()
        _local.depth = getattr(_local, "depth", 0) + 1
        self._stack().append(hooks)
        return self

    def __exit__(self, *exc) -> None:
        # Nothing open: an __enter__ that torch.compile traced (a no-op) whose frame then ran
        # eagerly from the middle (a graph break) leaves an eager __exit__ with nothing to close.
        if torch.compiler.is_compiling() or not self._stack():
            return
        hooks = self._stack().pop()
        _local.depth -= 1
        if hooks is not None:
            hooks.__exit__(*exc)


def _hooks_over(outer: Optional[Tuple[Callable, Callable]]) -> Tuple[Callable, Callable]:
    """The (pack, unpack) pair of a scope opened over ``outer`` hooks (None: none)."""

    def pack(t: Tensor) -> Any:
        recipe = _recipe_for(t)
        if recipe is not None:
            return _Regenerated(recipe, t, outer)
        return (outer[0](t),) if outer else t

    def unpack(packed: Any) -> Tensor:
        if isinstance(packed, _Regenerated):
            return packed.unpack()
        return outer[1](packed[0]) if outer else packed

    return pack, unpack


# --- around every forward of a model: replace_dropout(model, regenerate=True) -----------------

_model_hooks: "weakref.WeakKeyDictionary[torch.nn.Module, list]" = weakref.WeakKeyDictionary()


def regenerate_on_forward(model: torch.nn.Module) -> None:
    """Open a :class:`regenerate_dropout_outputs` scope around every call of ``model`` (its
    forward; backward needs none), until :func:`stop_regenerating_on_forward`. Idempotent."""
    if model in _model_hooks:
        return
    scope = regenerate_dropout_outputs()

    def open_scope(module, args):
        scope.__enter__()

    def close_scope(module, args, output):
        scope.__exit__(None, None, None)

    # always_call: the scope closes even when forward raises.
    handles = [model.register_forward_pre_hook(open_scope),
               model.register_forward_hook(close_scope, always_call=True)]
    _model_hooks[model] = handles


def stop_regenerating_on_forward(model: torch.nn.Module) -> bool:
    """Undo :func:`regenerate_on_forward`; True if it was on."""
    handles = _model_hooks.pop(model, None)
    for handle in handles or ():
        handle.remove()
    return handles is not None
