"""A pure-numpy reference of the mask contract (README.md, "The mask contract"), written
independently of the C++ code: the tests compare every kernel against it."""
from __future__ import annotations

import numpy as np
import torch

M0, M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
W0, W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
LOW32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 over numpy uint64 arrays holding 32-bit words."""
    c0, c1, c2, c3 = (np.asarray(v, dtype=np.uint64) for v in (c0, c1, c2, c3))
    k0, k1 = np.uint64(k0), np.uint64(k1)
    for _ in range(10):
        p0 = M0 * c0
        p1 = M1 * c2
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & LOW32,
                          (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & LOW32)
        k0 = (k0 + W0) & LOW32
        k1 = (k1 + W1) & LOW32
    return c0, c1, c2, c3


def threshold(p: float) -> int:
    return round(p * 65536)  # Python's round: ties to even, as the contract says


def keep_mask(numel: int, p: float, seed: int, offset: int = 0, start: int = 0) -> np.ndarray:
    """Keep bits of logical indices start .. start + numel - 1."""
    i = np.arange(start, start + numel, dtype=np.uint64)
    g = i >> np.uint64(3)
    j = (i & np.uint64(7)).astype(np.int64)
    words = np.stack(philox4x32_10(
        np.full_like(g, offset & 0xFFFFFFFF), np.full_like(g, offset >> 32),
        g & LOW32, g >> np.uint64(32), seed & 0xFFFFFFFF, seed >> 32))
    word = words[j >> 1, np.arange(numel)]
    u = (word >> (np.uint64(16) * (j & 1).astype(np.uint64))) & np.uint64(0xFFFF)
    return u >= np.uint64(threshold(p))


def scale_of(p: float, dtype: torch.dtype) -> float:
    """1 / (1 - p) in double, rounded to float32 unless the tensor is float64."""
    if p >= 1.0:
        return 0.0
    s = 1.0 / (1.0 - p)
    return s if dtype == torch.float64 else float(np.float32(s))


def dropout(x: torch.Tensor, p: float, seed: int, offset: int = 0) -> torch.Tensor:
    """The contract's output: kept elements x * scale (float32 product, one rounding), dropped 0."""
    mask = torch.from_numpy(keep_mask(x.numel(), p, seed, offset)).view(x.shape)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    kept = (x.to(acc) * scale_of(p, x.dtype)).to(x.dtype)
    return torch.where(mask.to(x.device), kept, torch.zeros((), dtype=x.dtype, device=x.device))


def channel_dropout(x: torch.Tensor, p: float, seed: int, offset: int = 0) -> torch.Tensor:
    """Channel dropout: the mask of index n * C + c spread over channel (n, c)."""
    n, c = x.shape[0], x.shape[1]
    mask = torch.from_numpy(keep_mask(n * c, p, seed, offset)).view(n, c, *([1] * (x.dim() - 2)))
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    kept = (x.to(acc) * scale_of(p, x.dtype)).to(x.dtype)
    return torch.where(mask.to(x.device), kept, torch.zeros((), dtype=x.dtype, device=x.device))


def bias_dropout_add(x, bias, residual, p, seed, offset=0):
    """residual + keep * (x + bias) * scale, in float32 (float64), rounded once."""
    mask = torch.from_numpy(keep_mask(x.numel(), p, seed, offset)).view(x.shape).to(x.device)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    v = x.to(acc) if bias is None else x.to(acc) + bias.to(acc)
    dropped = torch.where(mask, v * scale_of(p, x.dtype), torch.zeros((), dtype=acc, device=x.device))
    return (residual.to(acc) + dropped).to(x.dtype)
