"""fastdropout: one-pass dropout for PyTorch whose masks are regenerated, never stored.

Example::

    >>> import torch, fastdropout
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Dropout(0.1))
    >>> fastdropout.replace_dropout(model)        # nn.Dropout -> fastdropout.Dropout
    >>> y = fastdropout.dropout(torch.randn(4, 64), p=0.1, seed=1234)
"""
from ._version import __version__
from ._ops import cuda_kernels_built
from . import _vmap  # noqa: F401  (registers the vmap rules of the ops _ops loads)
from .diagnostics import system_info
from .functional import (
    bias_dropout_add,
    dropout,
    dropout1d,
    dropout2d,
    dropout3d,
    dropout_mask,
    feature_dropout,
)
from .modules import BiasDropoutAdd, Dropout, Dropout1d, Dropout2d, Dropout3d
from .replace import replace_dropout
from .regenerate import regenerate_dropout_outputs
from .drop_path import DropPath, drop_path
from .routing import FunctionalDropoutRoute, route_functional_dropout, unroute_functional_dropout
# DTensor rules for the ops (each shard draws its slice of the unsharded mask); a no-op where
# torch.distributed is unavailable.
from . import dtensor as _dtensor  # noqa: F401

__all__ = [
    "__version__",
    "cuda_kernels_built",
    "system_info",
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "feature_dropout",
    "dropout_mask",
    "bias_dropout_add",
    "Dropout",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "BiasDropoutAdd",
    "replace_dropout",
    "regenerate_dropout_outputs",
    "drop_path",
    "DropPath",
    "route_functional_dropout",
    "unroute_functional_dropout",
    "FunctionalDropoutRoute",
]
