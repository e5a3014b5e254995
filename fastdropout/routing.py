"""Route the functional dropout calls of a model's own code to fastdropout, and undo it.

Hugging Face transformers 5.x applies the attention-probability dropout, the largest dropout of
a transformer, with a functional call (``nn.functional.dropout(attn_weights, ...)`` in each
modeling file's ``eager_attention_forward``), which no module swap can reach.

How it is scoped. Python code finds ``nn.functional.dropout`` (or ``F.dropout``, or a
``dropout`` imported by name) through the globals of the module it is written in. A route
rebinds exactly those globals, in the Python modules that define the model's layers (for GPT-2:
``transformers.models.gpt2.modeling_gpt2``), to stand-ins whose ``dropout``, ``dropout1d``,
``dropout2d`` and ``dropout3d`` call fastdropout; every other attribute is torch's own object.
This is the precedent of Liger-Kernel's ``apply_liger_kernel_to_*``, which rebinds attributes of
transformers' modeling modules, made reference-counted and undoable here.

Why globals and not a ``TorchFunctionMode`` or forward hooks:

- No per-call cost: the routed code looks up a global as before and calls a small adapter; no
  other torch call in the model is intercepted (a mode would run Python for every op).
- ``torch.utils.checkpoint``: the recomputation in backward runs the same code, so it draws
  through fastdropout again with the state it saved (transformers checkpoints ``forward``, not
  ``__call__``, so hooks would not even run during the recomputation).
- ``torch.compile``: Dynamo guards on the globals a frame reads, so a compiled model switches
  to the routed graph when routed and back to torch's graph when the route is removed.

What is in scope: the code of the model's layer classes (their ``__module__`` and that of their
``forward``), for as long as a route is held. Every model built from that code routes too
(two GPT-2 models in one process share ``modeling_gpt2``); torch's own modules, fastdropout and
every other Python module are left as they were. Routes are reference-counted per Python
module under a lock, so routes taken and removed from several threads compose; while held, a
route applies to all threads (the code is shared).
"""
from __future__ import annotations

import logging
import sys
import threading
import types
import weakref
from typing import Callable, Dict, Iterable, List, Set, Tuple, Union

import torch
import torch.nn.functional as torch_F
from torch import nn

from . import functional as fd_F
from .regenerate import stop_regenerating_on_forward

__all__ = ["FunctionalDropoutRoute", "route_functional_dropout", "unroute_functional_dropout"]

_log = logging.getLogger("fastdropout")

# feature_alpha_dropout and alpha_dropout keep torch's: fastdropout has no alpha variant.
ROUTED_FUNCTIONS = ("dropout", "dropout1d", "dropout2d", "dropout3d")
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _adapter(name: str) -> Callable:
    """torch's signature, fastdropout's kernel; inputs fastdropout does not take (other devices,
    dtypes or layouts: MPS, meta, sparse...) keep torch's function, so a routed model runs
    wherever it ran before."""
    torch_fn = getattr(torch_F, name)
    ours = getattr(fd_F, name)

    def routed(input: torch.Tensor, p: float = 0.5, training: bool = True,
               inplace: bool = False) -> torch.Tensor:
        # is_cpu/is_cuda, not device.type: building a torch.device costs more than the rest
        if (isinstance(input, torch.Tensor) and (input.is_cuda or input.is_cpu)
                and input.dtype in _FLOAT_DTYPES and input.layout == torch.strided):
            return ours(input, p, training, inplace)
        return torch_fn(input, p, training, inplace)

    routed.__name__ = routed.__qualname__ = name
    routed.__doc__ = (f"torch.nn.functional.{name}, routed to fastdropout.{name} for float CPU/CUDA "
                      "tensors (see fastdropout.route_functional_dropout).")
    return routed


_ADAPTERS: Dict[str, Callable] = {name: _adapter(name) for name in ROUTED_FUNCTIONS}
# Identity of torch's functions -> our adapter, for code that imported them by name.
_FUNCTION_SWAPS = {id(getattr(torch_F, name)): _ADAPTERS[name] for name in ROUTED_FUNCTIONS}

_lock = threading.Lock()
_stand_ins: Dict[str, types.ModuleType] = {}
_holds: Dict[str, int] = {}                          # Python module name -> routes holding it
_saved: Dict[str, Dict[str, Tuple[object, object]]] = {}  # module -> {global: (torch's, ours)}
_routes_by_model: "weakref.WeakKeyDictionary[nn.Module, List[FunctionalDropoutRoute]]" = (
    weakref.WeakKeyDictionary())


def _stand_in_modules() -> Tuple[types.ModuleType, types.ModuleType]:
    """Module objects that hold torch.nn's (and torch.nn.functional's) attributes, the same
    objects, except ``functional`` and the four routed functions. Built once, under _lock."""
    if not _stand_ins:
        functional = types.ModuleType("fastdropout.routing.functional")
        functional.__dict__.update(vars(torch_F))
        functional.__dict__.update(_ADAPTERS)
        functional.__name__ = "fastdropout.routing.functional"
        functional.__doc__ = "torch.nn.functional with dropout, dropout1d/2d/3d routed to fastdropout."
        nn_stand_in = types.ModuleType("fastdropout.routing.nn")
        nn_stand_in.__dict__.update(vars(nn))
        nn_stand_in.__name__ = "fastdropout.routing.nn"
        nn_stand_in.__doc__ = "torch.nn whose functional routes dropout to fastdropout."
        nn_stand_in.functional = functional
        _stand_ins.update(nn=nn_stand_in, functional=functional)
    return _stand_ins["nn"], _stand_ins["functional"]


def _replacement(value: object) -> object:
    """What a global bound to ``value`` becomes under a route (None: left alone)."""
    nn_stand_in, functional = _stand_in_modules()
    if value is nn:
        return nn_stand_in
    if value is torch_F:
        return functional
    if isinstance(value, types.FunctionType):
        return _FUNCTION_SWAPS.get(id(value))
    return None


def _is_foreign(module_name: str) -> bool:
    """torch's and fastdropout's own code is never rebound."""
    root = module_name.split(".", 1)[0]
    return root in ("torch", "fastdropout", "builtins")


def _code_modules(model: nn.Module) -> Set[str]:
    """The Python modules whose code runs in ``model``'s forward: those defining its layer
    classes and their forward functions (followed through functools.wraps)."""
    names: Set[str] = set()
    for layer in model.modules():
        cls = type(layer)
        names.add(cls.__module__)
        fn = getattr(cls, "forward", None)
        while fn is not None:
            names.add(getattr(fn, "__module__", None) or cls.__module__)
            fn = getattr(fn, "__wrapped__", None)
    return {n for n in names if not _is_foreign(n)}


def _code_objects(module: types.ModuleType) -> Iterable[types.CodeType]:
    """The code of the functions and class methods defined in ``module`` (nested code
    included), unwrapping functools.wraps, staticmethod, classmethod and property."""
    pending = []
    for value in vars(module).values():
        if getattr(value, "__module__", None) != module.__name__:
            continue
        pending.extend(vars(value).values() if isinstance(value, type) else [value])
    seen: Set[int] = set()
    while pending:
        obj = pending.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, (staticmethod, classmethod)):
            pending.append(obj.__func__)
        elif isinstance(obj, property):
            pending.extend(f for f in (obj.fget, obj.fset, obj.fdel) if f is not None)
        elif isinstance(obj, types.FunctionType):
            pending.append(obj.__code__)
            if hasattr(obj, "__wrapped__"):
                pending.append(obj.__wrapped__)
        elif isinstance(obj, types.CodeType):
            yield obj
            pending.extend(c for c in obj.co_consts if isinstance(c, types.CodeType))


def _names_a_routed_function(module: types.ModuleType) -> bool:
    """Whether any code of ``module`` names dropout/dropout1d/2d/3d (an attribute or a global):
    modules that cannot call them are left untouched."""
    routed = set(ROUTED_FUNCTIONS)
    return any(routed.intersection(code.co_names) for code in _code_objects(module))


def _hold(module_name: str) -> bool:
    """Take one hold on a module; the first hold rebinds its globals. Returns whether the
    module has anything routed. Caller holds _lock."""
    module = sys.modules[module_name]
    if _holds.get(module_name, 0) == 0:
        swaps = {}
        for name, value in list(vars(module).items()):
            new = _replacement(value)
            if new is not None:
                swaps[name] = (value, new)
        for name, (_, new) in swaps.items():
            setattr(module, name, new)
        _saved[module_name] = swaps
    _holds[module_name] = _holds.get(module_name, 0) + 1
    return bool(_saved[module_name])


def _release(module_name: str) -> None:
    """Drop one hold; the last one puts torch's objects back, except where someone else has
    rebound the global since (that binding is theirs: it is kept, and logged). Caller holds _lock."""
    _holds[module_name] -= 1
    if _holds[module_name]:
        return
    del _holds[module_name]
    module = sys.modules.get(module_name)
    for name, (original, ours) in _saved.pop(module_name).items():
        if module is None:
            break
        if vars(module).get(name) is ours:
            setattr(module, name, original)
        else:
            _log.warning("fastdropout: %s.%s was rebound while routed; left as it is now",
                         module_name, name)


class FunctionalDropoutRoute:
    """A held route (see :func:`route_functional_dropout`). ``remove()`` undoes it (once;
    later calls do nothing); as a context manager it is removed on exit.

    Attributes:
        modules: names of the Python modules whose functional dropout calls go to fastdropout
            while this route is held (those in scope that call it through a global).
    """

    def __init__(self, module_names: Iterable[str]) -> None:
        self._held: Tuple[str, ...] = ()
        routed = []
        with _lock:
            held = []
            try:
                for name in sorted(set(module_names)):
                    if _hold(name):
                        routed.append(name)
                    held.append(name)
            except BaseException:
                for name in held:
                    _release(name)
                raise
            self._held = tuple(held)
        self.modules: Tuple[str, ...] = tuple(routed)
        _log.info("fastdropout: functional dropout routed in %d modules: %s", len(routed),
                  ", ".join(routed) or "(none)")

    @property
    def active(self) -> bool:
        return bool(self._held)

    def remove(self) -> None:
        with _lock:
            held, self._held = self._held, ()
            for name in held:
                _release(name)

    def __enter__(self) -> "FunctionalDropoutRoute":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"FunctionalDropoutRoute({state}, modules={list(self.modules)})"


def route_functional_dropout(*targets: Union[nn.Module, types.ModuleType]) -> FunctionalDropoutRoute:
    """Send the ``torch.nn.functional.dropout`` (and ``dropout1d/2d/3d``) calls that the code of
    ``targets`` makes to fastdropout, until the returned route is removed.

    A target is an ``nn.Module`` (its code: the Python modules that define its layer classes
    and their forward functions; torch's own layers, e.g. ``nn.Dropout``, are swapped by
    :func:`replace_dropout`, not here) or a Python module object. Calls on tensors fastdropout
    does not take (other devices, dtypes, sparse) keep torch's function. ``alpha_dropout`` and
    ``feature_alpha_dropout`` are not routed. Calls written ``torch.nn.functional.dropout(...)``
    through the global ``torch``, and dropout inside ``scaled_dot_product_attention``, are not
    reached.

    The route is held by code, not by object: every model built from the same modeling code
    routes while it is held. Routes nest and are counted; removing the last restores torch's
    objects. It works under ``torch.compile`` (Dynamo guards on the rebound globals, so a
    compiled model follows a removal) and ``torch.utils.checkpoint`` (the recomputation runs
    the same routed code).

    Example::

        >>> model = GPT2LMHeadModel(GPT2Config(attn_implementation="eager"))
        >>> with fastdropout.route_functional_dropout(model) as route:
        ...     model(input_ids=ids, labels=ids).loss.backward()
        >>> route.modules
        ('transformers.models.gpt2.modeling_gpt2',)
    """
    if not targets:
        raise TypeError("fastdropout: route_functional_dropout needs at least one model or module")
    names: Set[str] = set()
    models = []
    for target in targets:
        if isinstance(target, nn.Module):
            names |= _code_modules(target)
            models.append(target)
        elif isinstance(target, types.ModuleType):
            if _is_foreign(target.__name__):
                raise ValueError(f"fastdropout: route_functional_dropout leaves torch's and "
                                 f"fastdropout's own code alone, got module {target.__name__}")
            if sys.modules.get(target.__name__) is not target:
                raise ValueError(f"fastdropout: module {target.__name__} is not the one imported "
                                 "under that name in sys.modules")
            names.add(target.__name__)
        else:
            raise TypeError("fastdropout: targets must be nn.Module instances or Python modules, "
                            f"got {type(target).__name__}")
    route = FunctionalDropoutRoute(
        n for n in names if n in sys.modules and _names_a_routed_function(sys.modules[n]))
    with _lock:
        for model in models:
            _routes_by_model.setdefault(model, []).append(route)
    return route


def unroute_functional_dropout(model: nn.Module) -> int:
    """Remove every route taken for ``model`` (by :func:`route_functional_dropout` or
    ``replace_dropout(model, functional=True)``), and the regeneration that
    ``replace_dropout(model, regenerate=True)`` put around its forward. Returns how many routes
    were removed (the regeneration not counted).

    Example::

        >>> fastdropout.replace_dropout(model, functional=True)
        >>> fastdropout.unroute_functional_dropout(model)
        1
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastdropout: model must be an nn.Module, got {type(model).__name__}")
    stop_regenerating_on_forward(model)
    with _lock:
        routes = _routes_by_model.pop(model, [])
    removed = 0
    for route in routes:
        if route.active:
            route.remove()
            removed += 1
    return removed
