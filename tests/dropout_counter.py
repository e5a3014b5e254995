"""Counts the dropout kernels that actually run, below autograd: torch's (native_dropout on
CUDA, bernoulli on the CPU, the draw of its channel and stochastic-depth masks) and
fastdropout's. Tests use it to show which implementation every dropout call of a model reached."""
from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

TORCH_DRAWS = ("aten.native_dropout.", "aten.bernoulli")
FASTDROPOUT_DRAWS = ("fastdropout.dropout.", "fastdropout.dropout_.", "fastdropout.bias_dropout_add.")


class DropoutCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    def _count(self, prefixes):
        return sum(n for op, n in self.ops.items() if op.startswith(prefixes))

    @property
    def torch(self) -> int:
        """Masks drawn by torch."""
        return self._count(TORCH_DRAWS)

    @property
    def fastdropout(self) -> int:
        """Masks drawn by fastdropout's forward kernels."""
        return self._count(FASTDROPOUT_DRAWS)
