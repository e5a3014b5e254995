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


# The canonical quiet NaN of each dtype, by its bits: every NaN a kernel writes is this one.
CANONICAL_NAN_BITS = {torch.float32: (0x7FC00000, torch.int32),
                      torch.float64: (0x7FF8000000000000, torch.int64),
                      torch.float16: (0x7E00, torch.int16), torch.bfloat16: (0x7FC0, torch.int16)}


def canonical_nan(dtype: torch.dtype) -> torch.Tensor:
    bits, int_dtype = CANONICAL_NAN_BITS[dtype]
    return torch.tensor(bits, dtype=int_dtype).view(dtype)


def canonicalise(v: torch.Tensor) -> torch.Tensor:
    """Every NaN of v replaced by the dtype's canonical quiet NaN."""
    return torch.where(torch.isnan(v), canonical_nan(v.dtype).to(v.device), v)


def dropout(x: torch.Tensor, p: float, seed: int, offset: int = 0) -> torch.Tensor:
    """The contract's output: kept elements x * scale (float32 product, one rounding), dropped 0."""
    mask = torch.from_numpy(keep_mask(x.numel(), p, seed, offset)).view(x.shape)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    kept = canonicalise((x.to(acc) * scale_of(p, x.dtype)).to(x.dtype))
    return torch.where(mask.to(x.device), kept, torch.zeros((), dtype=x.dtype, device=x.device))


def channel_dropout(x: torch.Tensor, p: float, seed: int, offset: int = 0) -> torch.Tensor:
    """Channel dropout: the mask of index n * C + c spread over channel (n, c)."""
    n, c = x.shape[0], x.shape[1]
    mask = torch.from_numpy(keep_mask(n * c, p, seed, offset)).view(n, c, *([1] * (x.dim() - 2)))
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    kept = canonicalise((x.to(acc) * scale_of(p, x.dtype)).to(x.dtype))
    return torch.where(mask.to(x.device), kept, torch.zeros((), dtype=x.dtype, device=x.device))


def bias_dropout_add(x, bias, residual, p, seed, offset=0):
    """residual + keep * (x + bias) * scale, in float32 (float64), rounded once."""
    mask = torch.from_numpy(keep_mask(x.numel(), p, seed, offset)).view(x.shape).to(x.device)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    v = x.to(acc) if bias is None else x.to(acc) + bias.to(acc)
    dropped = torch.where(mask, v * scale_of(p, x.dtype), torch.zeros((), dtype=acc, device=x.device))
    return canonicalise((residual.to(acc) + dropped).to(x.dtype))


def _tree_sum(rows: np.ndarray) -> np.ndarray:
    """The contract's tree_sum over axis 0 (a power of two long): stride n/2 .. 1."""
    v = rows.copy()
    stride = v.shape[0] // 2
    while stride >= 1:
        v[:stride] = v[:stride] + v[stride:2 * stride]
        stride //= 2
    return v[0]


def bias_grad(grad_x: torch.Tensor) -> torch.Tensor:
    """bias_dropout_add's grad_bias from grad_x, summed in the contract's order: slices of 8
    rows summed in row order from +0, a tree over the 8 slices of each 64-row chunk, then
    trees over runs of 32 partials until one is left; acc dtype float32 (float64 for float64)."""
    acc = np.float64 if grad_x.dtype == torch.float64 else np.float32
    columns = grad_x.shape[-1]
    g = grad_x.detach().cpu().reshape(-1, columns).to(torch.float64 if acc == np.float64 else torch.float32).numpy()
    rows = g.shape[0]
    if rows == 0:
        return torch.zeros(columns, dtype=grad_x.dtype)
    chunks = -(-rows // 64)
    # Absent rows may be added as +0: a sum that starts from +0 is never -0, so adding +0
    # changes nothing.
    padded = np.zeros((chunks * 64, columns), dtype=acc)
    padded[:rows] = g
    rows_by_slice = padded.reshape(chunks, 8, 8, columns)  # chunk, slice, row in slice, column
    slices = np.zeros((chunks, 8, columns), dtype=acc)
    for r in range(8):
        slices = slices + rows_by_slice[:, :, r]
    partials = np.stack([_tree_sum(slices[k]) for k in range(chunks)]) if chunks else slices[:, 0]
    while partials.shape[0] > 1:
        n = partials.shape[0]
        runs = -(-n // 32)
        padded = np.zeros((runs * 32, columns), dtype=acc)
        padded[:n] = partials
        partials = np.stack([_tree_sum(padded[32 * m:32 * m + 32]) for m in range(runs)])
    return canonicalise(torch.from_numpy(partials[0].copy()).to(grad_x.dtype))
