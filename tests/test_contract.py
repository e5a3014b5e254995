"""The mask contract is public API: these tests pin it (README.md, "The mask contract")."""
import numpy as np
import pytest
import torch

import fastdropout
from conftest import FLOAT_DTYPES, bits_equal, devices
import reference

# Random123's Philox4x32-10 known-answer vectors (kat_vectors): counter, key, expected output.
PHILOX_KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
    ((0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff), (0xffffffff, 0xffffffff),
     (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
    ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
     (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1)),
]

SEEDS_OFFSETS = [(0, 0), (1, 0), (42, 7), (2**32 + 5, 3), (2**63 + 11, 2**40 + 1),
                 (2**64 - 1, 2**64 - 1), (0xDEADBEEFCAFEF00D, 2**32)]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    """The C++ Philox (the one every kernel calls) matches Random123 bit for bit."""
    assert tuple(torch.ops.fastdropout._philox4x32_10(list(counter), list(key))) == expected


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_reference_philox_known_answers(counter, key, expected):
    """The numpy reference the other tests trust is itself right."""
    out = reference.philox4x32_10(*[np.uint64(c) for c in counter], *key)
    assert tuple(int(w) for w in out) == expected


def test_mask_is_philox_of_the_documented_counter():
    """Element i of group g uses 16-bit lane i % 8 of Philox(counter=(o, g), key=s)."""
    seed, offset, group = 0x0123456789ABCDEF, 0x1122334455667788, 5
    words = torch.ops.fastdropout._philox4x32_10(
        [offset & 0xFFFFFFFF, offset >> 32, group, 0], [seed & 0xFFFFFFFF, seed >> 32])
    lanes = [(words[j // 2] >> (16 * (j % 2))) & 0xFFFF for j in range(8)]
    for p in (0.1, 0.5, 0.9):
        t = round(p * 65536)
        mask = fastdropout.dropout_mask(48, p, seed=seed, offset=offset)
        assert mask[40:48].tolist() == [u >= t for u in lanes]


def test_pinned_mask():
    """A literal: any change to the contract, in the kernels or the reference, fails here."""
    mask = fastdropout.dropout_mask(16, 0.5, seed=0)
    assert mask.int().tolist() == [1, 0, 1, 1, 1, 1, 1, 1, 0, 1, 0, 1, 1, 0, 0, 1]
    mask = fastdropout.dropout_mask(16, 0.5, seed=2**64 - 1, offset=2**33)
    assert mask.int().tolist() == [0, 0, 1, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("seed,offset", SEEDS_OFFSETS)
@pytest.mark.parametrize("numel", [1, 7, 8, 9, 63, 1000, 4099])
def test_dropout_mask_matches_reference(device, seed, offset, numel):
    for p in (0.1, 0.5):
        got = fastdropout.dropout_mask(numel, p, seed=seed, offset=offset, device=device)
        assert got.dtype == torch.bool and got.device.type == device
        np.testing.assert_array_equal(got.cpu().numpy(), reference.keep_mask(numel, p, seed, offset))


@pytest.mark.parametrize("p,t", [(0.0, 0), (1.0, 65536), (0.5, 32768), (0.1, 6554),
                                 (1.5 / 65536, 2), (2.5 / 65536, 2), (0.3, 19661)])
def test_threshold_rounds_half_to_even(p, t):
    assert reference.threshold(p) == t
    mask = fastdropout.dropout_mask(4096, p, seed=9)
    np.testing.assert_array_equal(mask.numpy(), reference.keep_mask(4096, p, 9))


def test_effective_probability_within_2_pow_minus_17():
    for p in np.linspace(0, 1, 1001):
        assert abs(reference.threshold(p) / 65536 - p) <= 2**-17


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 1.0])
def test_dropout_is_x_times_mask_times_scale(device, dtype, p):
    torch.manual_seed(0)
    x = (torch.randn(3, 1001) * 10).to(dtype).to(device)
    got = fastdropout.dropout(x, p, seed=1234, offset=5)
    assert bits_equal(got, reference.dropout(x, p, 1234, 5))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dropped_elements_are_zero_even_for_nan_and_inf(dtype):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0] * 64, dtype=dtype)
    y = fastdropout.dropout(x, 0.5, seed=3)
    mask = fastdropout.dropout_mask(x.shape, 0.5, seed=3)
    assert (y[~mask] == 0).all()
    torch.testing.assert_close(y[mask], x[mask] * 2, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", devices())
def test_mask_follows_logical_index_for_any_layout(device):
    """Non-contiguous inputs: the mask goes by the index in x.contiguous().view(-1)."""
    torch.manual_seed(1)
    base = torch.randn(40, 50, device=device)
    for x in (base.t(), base[:, ::3], base[5:25, 7:], base.unsqueeze(0).expand(3, 40, 50),
              torch.randn(2, 3, 9, 11, device=device).to(memory_format=torch.channels_last)):
        got = fastdropout.dropout(x, 0.3, seed=77, offset=2)
        want = reference.dropout(x.contiguous(), 0.3, 77, 2)
        assert torch.equal(got, want)
        assert got.stride() == torch.empty_like(x).stride()  # output layout as torch's


@pytest.mark.parametrize("device", devices())
def test_same_seed_same_mask_other_offset_other_mask(device):
    a = fastdropout.dropout_mask(10000, 0.5, seed=5, offset=0, device=device)
    b = fastdropout.dropout_mask(10000, 0.5, seed=5, offset=0, device=device)
    c = fastdropout.dropout_mask(10000, 0.5, seed=5, offset=1, device=device)
    d = fastdropout.dropout_mask(10000, 0.5, seed=6, offset=0, device=device)
    assert torch.equal(a, b)
    # Independent masks at p = 0.5 agree on about half the elements (5000 +- 50 sigma-1).
    for other in (c, d):
        agree = (a == other).sum().item()
        assert abs(agree - 5000) < 5 * 50


def test_mask_of_a_prefix_is_the_prefix_of_the_mask():
    """The mask of element i does not depend on the tensor's size."""
    long = fastdropout.dropout_mask(5000, 0.4, seed=8)
    for n in (1, 13, 4096, 4999):
        assert torch.equal(fastdropout.dropout_mask(n, 0.4, seed=8), long[:n])


# Shards whose keep bytes take the CPU's other drawing paths: short runs from starts off
# multiples of 8 (their groups drawn as one stream, 8 lanes at a time), runs of 5 (64 of them to
# a batch of keep bytes), long runs whose group count leaves a remainder, and channel dropout on
# runs of whole channels (drawn a span at a time).
_SHARD_CASES = [((40, 100), (40, 37), (0, 5)), ((300, 7), (300, 5), (0, 1)),
                ((3, 3000), (3, 1500), (0, 1003)),
                ((40, 96), (40, 48), (0, 27))]  # the last: runs of whole channels of 3


def _shard_masks():
    """Plain (channel_numel 1) and channel dropout (channels of 3 elements) on each shard."""
    from fastdropout.dtensor import run_map
    return [torch.ops.fastdropout.sharded_dropout(torch.ones(local), 0.3,
                                                  *run_map(shape, local, offset), 6, 1, None,
                                                  channel)[0]
            for shape, local, offset in _SHARD_CASES for channel in (1, 3)]


def test_cpu_simd_and_scalar_paths_draw_the_same_masks():
    """On x86-64 the CPU draws eight groups at a time with AVX2 when the CPU has it; the
    baseline loop (forced by FASTDROPOUT_DISABLE_AVX2=1, in a subprocess) must agree, for
    plain masks and for shards (whose keep bytes are also drawn from queues of groups)."""
    import os
    import subprocess
    import sys
    code = ("import torch, fastdropout, sys; sys.path.insert(0, sys.argv[2]); "
            "import test_contract; "
            "m = [fastdropout.dropout_mask(n, p, seed=s, offset=o) for n, p, s, o in "
            "[(1000, 0.1, 1, 2), (4099, 0.5, 2**64 - 1, 2**40), (77, 0.9, 5, 0)]]; "
            "torch.save(m + test_contract._shard_masks(), sys.argv[1])")
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fd_masks_{os.getpid()}.pt")
    try:
        subprocess.run([sys.executable, "-c", code, path, os.path.dirname(__file__)], check=True,
                       env={**os.environ, "FASTDROPOUT_DISABLE_AVX2": "1"})
        baseline = torch.load(path)
    finally:
        if os.path.exists(path):
            os.remove(path)
    here = [fastdropout.dropout_mask(n, p, seed=s, offset=o) for n, p, s, o in
            [(1000, 0.1, 1, 2), (4099, 0.5, 2**64 - 1, 2**40), (77, 0.9, 5, 0)]] + _shard_masks()
    assert len(here) == len(baseline) == 3 + 2 * len(_SHARD_CASES)
    for a, b in zip(here, baseline):
        assert torch.equal(a, b)
    # and the shards are their slices of the unsharded masks
    shards = iter(here[3:])
    for shape, local, offset in _SHARD_CASES:
        box = tuple(slice(o, o + n) for o, n in zip(offset, local))
        for channel in (1, 3):
            whole = torch.ops.fastdropout.dropout(torch.ones(shape), 0.3, 6, 1, None, channel)[0]
            assert torch.equal(next(shards), whole[box])


# --- NaN: every NaN a kernel writes is the dtype's canonical quiet NaN --------------------------

def _nan_inputs(dtype):
    """NaNs of both signs and several payloads, infinities, and ordinary values."""
    bits, int_dtype = reference.CANONICAL_NAN_BITS[dtype]
    width = {torch.int16: 16, torch.int32: 32, torch.int64: 64}[int_dtype]
    sign = 1 << (width - 1)
    nans = [bits, bits | 1, bits | sign, (bits | sign | 5)]  # +qNaN, payload, -qNaN, -payload
    nans = [v - (1 << width) if v >= sign else v for v in nans]
    nan_values = torch.tensor(nans, dtype=int_dtype).view(dtype)
    others = torch.tensor([float("inf"), -float("inf"), -0.0, 1.5], dtype=dtype)
    return torch.cat([nan_values, others]).repeat(64)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_kept_nans_become_the_canonical_quiet_nan(dtype):
    x = _nan_inputs(dtype)
    y = fastdropout.dropout(x, 0.5, seed=3)
    mask = fastdropout.dropout_mask(x.shape, 0.5, seed=3)
    kept_nan = mask & torch.isnan(x)
    assert kept_nan.sum() > 10 and (~mask & torch.isnan(x)).sum() > 10
    canonical = reference.canonical_nan(dtype).expand(int(kept_nan.sum()))
    assert bits_equal(y[kept_nan], canonical)
    assert bits_equal(y, reference.dropout(x, 0.5, 3))
    # backward replays the same rule on the gradient
    g = _nan_inputs(dtype)
    xr = torch.zeros_like(x, requires_grad=True)
    fastdropout.dropout(xr, 0.5, seed=3).backward(g)
    assert bits_equal(xr.grad, reference.dropout(g, 0.5, 3))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_bias_dropout_add_nans_are_canonical(dtype):
    x = _nan_inputs(dtype).view(-1, 8)
    r = _nan_inputs(dtype).flip(0).view(-1, 8)
    b = _nan_inputs(dtype)[:8]
    out = fastdropout.bias_dropout_add(x, b, r, 0.5, seed=9)
    assert bits_equal(out, reference.bias_dropout_add(x, b, r, 0.5, 9))
    assert torch.isnan(out).sum() > 10


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(1, 8), (63, 8), (64, 16), (65, 5), (2563, 24), (70001, 2),
                                   (1, 9001), (130, 9001)])
def test_bias_grad_follows_the_contracts_summation_order(dtype, shape):
    """grad_bias is summed in the order the contract fixes (slices, chunks, fan-in levels), bit
    for bit: 1 chunk, 2 chunks, 41 chunks (2 levels), 1094 chunks (3 levels); rows wider than
    the CPU kernel's 4096-column blocks, one chunk and 3 chunks (a fan-in level)."""
    torch.manual_seed(0)
    x = torch.randn(shape).to(dtype).requires_grad_()
    b = torch.randn(shape[-1]).to(dtype).requires_grad_()
    g = (torch.randn(shape) * 3).to(dtype)
    fastdropout.bias_dropout_add(x, b, torch.zeros(shape, dtype=dtype), 0.2, seed=4).backward(g)
    assert bits_equal(x.grad, reference.dropout(g, 0.2, 4))
    assert bits_equal(b.grad, reference.bias_grad(x.grad))


def test_bias_grad_nan_is_canonical():
    g = torch.ones(16, 8)
    g[3, 2] = reference.canonical_nan(torch.float32).neg()  # a negative NaN in the gradient
    x = torch.zeros(16, 8, requires_grad=True)
    b = torch.zeros(8, requires_grad=True)
    fastdropout.bias_dropout_add(x, b, torch.zeros(16, 8), 0.0, seed=1).backward(g)
    assert bits_equal(b.grad[2:3], reference.canonical_nan(torch.float32).view(1))
