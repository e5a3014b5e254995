"""nn.Module drop-ins. Each subclasses its torch counterpart, so constructor arguments, repr,
``p``/``inplace`` attributes, train/eval and isinstance checks behave as before, and
state dicts (empty for dropout) load both ways."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import functional as F

__all__ = ["Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "BiasDropoutAdd"]


class _CheckedP:
    """torch's constructors accept p = NaN; ours reject it like every other bad p."""

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        F._check_p(p)
        super().__init__(p, inplace)


class Dropout(_CheckedP, nn.Dropout):
    """Drop-in for :class:`torch.nn.Dropout` whose mask is regenerated in backward.

    Example::

        >>> layer = fastdropout.Dropout(p=0.1)
        >>> y = layer(torch.randn(32, 128))
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.dropout(input, self.p, self.training, self.inplace)


class Dropout1d(_CheckedP, nn.Dropout1d):
    """Drop-in for :class:`torch.nn.Dropout1d`: zeroes whole channels of (N, C, L) or (C, L)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.dropout1d(input, self.p, self.training, self.inplace)


class Dropout2d(_CheckedP, nn.Dropout2d):
    """Drop-in for :class:`torch.nn.Dropout2d`: zeroes whole channels of (N, C, H, W)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.dropout2d(input, self.p, self.training, self.inplace)


class Dropout3d(_CheckedP, nn.Dropout3d):
    """Drop-in for :class:`torch.nn.Dropout3d`: zeroes whole channels of (N, C, D, H, W)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.dropout3d(input, self.p, self.training, self.inplace)


class BiasDropoutAdd(nn.Module):
    """``residual + dropout(x + bias, p)`` fused: one pass forward, one backward.

    Example::

        >>> bda = fastdropout.BiasDropoutAdd(p=0.1)
        >>> out = bda(x, bias, residual)
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        F._check_p(p)
        self.p = p

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor],
                residual: torch.Tensor) -> torch.Tensor:
        return F.bias_dropout_add(x, bias, residual, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
