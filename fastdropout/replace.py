"""Swap torch's dropout modules (and timm's DropPath) for fastdropout's, in place; optionally
route the model's functional dropout calls too."""
from __future__ import annotations

import logging
import sys
from typing import Callable, Dict, List, Optional

from torch import nn

from .drop_path import DropPath
from .modules import Dropout, Dropout1d, Dropout2d, Dropout3d
from .regenerate import regenerate_on_forward
from .routing import route_functional_dropout

__all__ = ["replace_dropout"]

_log = logging.getLogger("fastdropout")


def _same_p(new_type: type) -> Callable[[nn.Module], nn.Module]:
    return lambda old: new_type(p=old.p, inplace=old.inplace)


# Exact types only: a user's subclass of nn.Dropout may change forward(), and ours must not
# silently drop that change.
_SWAPS: Dict[type, Callable[[nn.Module], nn.Module]] = {
    nn.Dropout: _same_p(Dropout),
    nn.Dropout1d: _same_p(Dropout1d),
    nn.Dropout2d: _same_p(Dropout2d),
    nn.Dropout3d: _same_p(Dropout3d),
}
_OURS = (Dropout, Dropout1d, Dropout2d, Dropout3d, DropPath)


def _timm_drop_path_type() -> Optional[type]:
    """timm's DropPath class if timm is loaded (a model cannot hold one otherwise)."""
    drop = sys.modules.get("timm.layers.drop")
    return getattr(drop, "DropPath", None)


def _swaps() -> Dict[type, Callable[[nn.Module], nn.Module]]:
    timm_drop_path = _timm_drop_path_type()
    if timm_drop_path is None:
        return _SWAPS
    return {**_SWAPS, timm_drop_path: lambda old: DropPath(old.drop_prob, old.scale_by_keep)}


def replace_dropout(model: nn.Module, *, functional: bool = False, regenerate: bool = False,
                    skipped: Optional[List[str]] = None, replaced: Optional[List[str]] = None,
                    routed: Optional[List[str]] = None) -> nn.Module:
    """Replace, in place, every ``nn.Dropout`` in ``model`` by :class:`fastdropout.Dropout`,
    every ``nn.Dropout1d/2d/3d`` by fastdropout's channel variants (keeping ``p``, ``inplace``
    and the train/eval flag) and every timm ``DropPath`` by :class:`fastdropout.DropPath`
    (keeping ``drop_prob`` and ``scale_by_keep``). Returns ``model``.

    With ``functional=True``, the functional dropout calls of the model's own code
    (``nn.functional.dropout`` in Hugging Face's attention, for instance) go to fastdropout
    too: see :func:`fastdropout.route_functional_dropout`; undo that with
    :func:`fastdropout.unroute_functional_dropout`.

    With ``regenerate=True``, every forward of ``model`` runs in a
    :class:`fastdropout.regenerate_dropout_outputs` scope: the dropout outputs that later ops
    save for backward are recomputed there from their input instead of kept (a model with
    dropout then keeps the bytes it keeps without). :func:`fastdropout.unroute_functional_dropout`
    undoes it too.

    Dropout-like modules it does not handle (``nn.AlphaDropout``, ``nn.FeatureAlphaDropout``,
    subclasses of the dropout classes or of timm's DropPath) are left alone; pass a list as
    ``skipped`` to receive their qualified names; pass a list as ``replaced`` to receive the
    names of those swapped, and one as ``routed`` to receive the Python modules routed. The
    number swapped is also logged on the ``fastdropout`` logger (INFO).

    Example::

        >>> model = torchvision.models.vgg11()
        >>> fastdropout.replace_dropout(model)
        >>> gpt2 = fastdropout.replace_dropout(gpt2, functional=True, regenerate=True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastdropout: model must be an nn.Module, got {type(model).__name__}")
    swaps = _swaps()
    root_swap = swaps.get(type(model))
    if root_swap is not None:
        raise ValueError("fastdropout: replace_dropout swaps submodules; to convert a lone "
                         f"{type(model).__name__}, construct {type(root_swap(model)).__name__} directly")
    handled_bases = tuple(t for t in swaps if t is not nn.Dropout) + (nn.modules.dropout._DropoutNd,)
    swapped = 0
    for name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            qualified = f"{name}.{child_name}" if name else child_name
            make = swaps.get(type(child))
            if make is not None:
                new = make(child)
                new.train(child.training)
                setattr(parent, child_name, new)
                swapped += 1
                if replaced is not None:
                    replaced.append(qualified)
            elif isinstance(child, handled_bases) and not isinstance(child, _OURS):
                if skipped is not None:
                    skipped.append(qualified)
    _log.info("fastdropout.replace_dropout: replaced %d dropout modules", swapped)
    if regenerate:
        regenerate_on_forward(model)
    if functional:
        route = route_functional_dropout(model)
        if routed is not None:
            routed.extend(route.modules)
    return model
