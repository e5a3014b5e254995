"""Stochastic depth (drop path): per-sample dropout of a residual branch, as timm's
``drop_path`` / ``DropPath``, with the keep bit of sample ``n`` taken from the mask contract."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import functional as F

__all__ = ["drop_path", "DropPath"]


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False,
              scale_by_keep: bool = True, *, seed: Optional[int] = None, offset: int = 0,
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Zero whole samples (index 0 of ``x``) with probability ``drop_prob``, timm's semantics:
    kept samples are scaled by ``1 / (1 - drop_prob)`` when ``scale_by_keep`` (and left as
    they are otherwise); ``training=False`` or ``drop_prob=0`` return ``x`` itself.

    Sample ``n`` is kept iff the contract keeps mask index ``n`` for this (seed, offset): the
    per-sample factor is :func:`fastdropout.dropout` of a ones vector of ``x.shape[0]``
    elements (x's dtype and device, the same seed/offset/generator arguments), then
    ``x * factor`` broadcast over the other dimensions (any layout, no copy). Backward keeps
    that factor (``x.shape[0]`` elements), as timm keeps its random tensor.

    Example::

        >>> x = torch.ones(4, 3)
        >>> fastdropout.drop_path(x, 0.5, training=True, seed=0)
        tensor([[2., 2., 2.],
                [0., 0., 0.],
                [2., 2., 2.],
                [2., 2., 2.]])
    """
    p = F._check_p(drop_prob)
    F._check_tensor(x, "x")
    if not training or p == 0.0:
        return x
    if x.dim() == 0:
        raise ValueError("fastdropout: drop_path needs x with a batch dimension (x.dim() >= 1), got a 0-dim tensor")
    factor = F.dropout(x.new_ones(x.shape[0]), p, True, seed=seed, offset=offset, generator=generator)
    if not scale_by_keep:
        factor = (factor != 0).to(x.dtype)
    return x * factor.view((x.shape[0],) + (1,) * (x.dim() - 1))


class DropPath(nn.Module):
    """Drop-in for timm's ``DropPath``: stochastic depth with the contract's per-sample mask.

    Example::

        >>> block_drop = fastdropout.DropPath(0.1)
        >>> y = residual + block_drop(branch(residual))
    """

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        F._check_p(drop_prob)
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"
