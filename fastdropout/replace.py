"""Swap torch's dropout modules for fastdropout's, in place."""
from __future__ import annotations

import logging
from typing import List, Optional

from torch import nn

from .modules import Dropout, Dropout1d, Dropout2d, Dropout3d

__all__ = ["replace_dropout"]

_log = logging.getLogger("fastdropout")

# Exact types only: a user's subclass of nn.Dropout may change forward(), and ours must not
# silently drop that change.
_SWAPS = {
    nn.Dropout: Dropout,
    nn.Dropout1d: Dropout1d,
    nn.Dropout2d: Dropout2d,
    nn.Dropout3d: Dropout3d,
}
_OURS = (Dropout, Dropout1d, Dropout2d, Dropout3d)


def replace_dropout(model: nn.Module, *, skipped: Optional[List[str]] = None,
                    replaced: Optional[List[str]] = None) -> nn.Module:
    """Replace, in place, every ``nn.Dropout`` in ``model`` by :class:`fastdropout.Dropout` and
    every ``nn.Dropout1d/2d/3d`` by fastdropout's channel variants, keeping ``p``, ``inplace``
    and the train/eval flag. Returns ``model``.

    Dropout-like modules it does not handle (``nn.AlphaDropout``, ``nn.FeatureAlphaDropout``,
    subclasses of the dropout classes) are left alone; pass a list as ``skipped`` to receive
    their qualified names; pass a list as ``replaced`` to receive the names of those swapped.
    The number swapped is also logged on the ``fastdropout`` logger (INFO).

    Example::

        >>> model = torchvision.models.vgg11()
        >>> fastdropout.replace_dropout(model)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastdropout: model must be an nn.Module, got {type(model).__name__}")
    swapped = 0
    root_swap = _SWAPS.get(type(model))
    if root_swap is not None:
        raise ValueError("fastdropout: replace_dropout swaps submodules; to convert a lone "
                         f"{type(model).__name__}, construct {root_swap.__name__} directly")
    for name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            qualified = f"{name}.{child_name}" if name else child_name
            new_type = _SWAPS.get(type(child))
            if new_type is not None:
                new = new_type(p=child.p, inplace=child.inplace)
                new.train(child.training)
                setattr(parent, child_name, new)
                swapped += 1
                if replaced is not None:
                    replaced.append(qualified)
            elif isinstance(child, nn.modules.dropout._DropoutNd) and not isinstance(child, _OURS):
                if skipped is not None:
                    skipped.append(qualified)
    _log.info("fastdropout.replace_dropout: replaced %d dropout modules", swapped)
    return model
