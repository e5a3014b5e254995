"""Property-based fuzzing against the pure-numpy reference of the contract (tests/reference.py):
random shapes (0 to 5 dims, odd last dimensions), strides, slices, transposes, expanded and
channels_last inputs, every dtype, p anywhere in [0, 1] including both ends, seeds and offsets
across the whole 64-bit range; forward and backward of every op. The "ci" profile runs ~120
examples per test; HYPOTHESIS_PROFILE=nightly runs 3000."""
import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402

import fastdropout  # noqa: E402
import reference  # noqa: E402
from conftest import FLOAT_DTYPES, bits_equal, devices  # noqa: E402

U64 = st.integers(min_value=0, max_value=2**64 - 1)
PROBS = st.one_of(st.sampled_from([0.0, 1.0, 0.5, 1 / 65536, 1 - 1 / 65536]), st.floats(0.0, 1.0))
MAX_NUMEL = 3000


@st.composite
def shapes(draw, min_dims=0, max_dims=5):
    ndim = draw(st.integers(min_dims, max_dims))
    dims = []
    for _ in range(ndim):
        dims.append(draw(st.integers(0, 13)))
    while dims and math.prod(dims) > MAX_NUMEL:
        dims[draw(st.integers(0, len(dims) - 1))] //= 2
    return tuple(dims)


@st.composite
def tensors(draw, min_dims=0, max_dims=5):
    """A float tensor of a random layout: contiguous, transposed, sliced with a step, expanded
    (stride 0) or channels_last; values from a seeded generator (never all zeros)."""
    shape = draw(shapes(min_dims, max_dims))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    device = draw(st.sampled_from(devices()))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    layout = draw(st.sampled_from(["contiguous", "transpose", "slice", "expand", "channels_last"]))
    if layout == "transpose" and len(shape) >= 2:
        a, b = draw(st.permutations(range(len(shape))))[:2]
        base_shape = list(shape)
        base_shape[a], base_shape[b] = base_shape[b], base_shape[a]
        x = torch.randn(base_shape, generator=gen).transpose(a, b)
    elif layout == "slice" and len(shape) >= 1:
        dim = draw(st.integers(0, len(shape) - 1))
        step = draw(st.integers(2, 3))
        base_shape = list(shape)
        base_shape[dim] = shape[dim] * step + 1
        x = torch.randn(base_shape, generator=gen)[(slice(None),) * dim + (slice(1, None, step),)]
    elif layout == "expand" and len(shape) >= 1:
        dim = draw(st.integers(0, len(shape) - 1))
        base_shape = list(shape)
        base_shape[dim] = 1
        x = torch.randn(base_shape, generator=gen).expand(shape)
    elif layout == "channels_last" and len(shape) == 4:
        x = torch.randn(shape, generator=gen).contiguous(memory_format=torch.channels_last)
    else:
        x = torch.randn(shape, generator=gen)
    x = (x * 4).to(dtype=dtype, device=device)
    assert x.shape == torch.Size(shape)
    return x


def _grad_like(x):
    g = torch.Generator().manual_seed(x.numel() + 1)
    return torch.randn(x.shape, generator=g).to(x.dtype).to(x.device)


CHANNEL = "channel"


@pytest.mark.parametrize("kind", ["plain", CHANNEL])
@given(data=st.data(), p=PROBS, seed=U64, offset=U64)
def test_dropout_forward_and_backward(kind, data, p, seed, offset):
    """dropout (any shape) and channel dropout (2 dims or more) against the reference."""
    fn, ref = ((fastdropout.feature_dropout, reference.channel_dropout) if kind == CHANNEL
               else (fastdropout.dropout, reference.dropout))
    x = data.draw(tensors(min_dims=2 if kind == CHANNEL else 0))
    xv = x.detach().requires_grad_()
    y = fn(xv, p, seed=seed, offset=offset)
    if p == 0.0 or x.numel() == 0:
        assert y is xv
        return
    assert bits_equal(y, ref(x.contiguous(), p, seed, offset))
    assert y.stride() == torch.empty_like(x).stride()
    g = _grad_like(x)
    y.backward(g)
    if 0 not in x.stride():  # an expanded leaf's gradient sums over the view: checked above
        assert bits_equal(xv.grad, ref(g, p, seed, offset))


@given(shape=shapes(), p=PROBS, seed=U64, offset=U64, device=st.sampled_from(devices()))
def test_dropout_mask(shape, p, seed, offset, device):
    got = fastdropout.dropout_mask(shape, p, seed=seed, offset=offset, device=device)
    want = torch.from_numpy(reference.keep_mask(math.prod(shape), p, seed, offset)).view(shape)
    assert torch.equal(got.cpu(), want)


@given(x=tensors(min_dims=1), p=PROBS, seed=U64, offset=U64, with_bias=st.booleans(),
       data=st.data())
def test_bias_dropout_add(x, p, seed, offset, with_bias, data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    bias = torch.randn(x.shape[-1], generator=gen).to(x.dtype).to(x.device) if with_bias else None
    residual = torch.randn(x.shape, generator=gen).to(x.dtype).to(x.device)
    if data.draw(st.booleans()) and x.dim() >= 2:
        residual = residual.transpose(0, -1).contiguous().transpose(0, -1)  # another layout
    xv = x.detach().requires_grad_()
    bv = bias.detach().requires_grad_() if with_bias else None
    rv = residual.detach().requires_grad_()
    out = fastdropout.bias_dropout_add(xv, bv, rv, p, seed=seed, offset=offset)
    want = reference.bias_dropout_add(x.contiguous(), bias, residual.contiguous(), p if p > 0 else 0.0, seed, offset)
    assert bits_equal(out, want)
    g = _grad_like(x)
    out.backward(g)
    assert bits_equal(rv.grad, g)
    if 0 in x.stride():
        return
    gx = reference.dropout(g, p, seed, offset) if p > 0 else g
    assert bits_equal(xv.grad, gx)
    if with_bias:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        cols = x.shape[-1]
        want_b = (gx.to(acc).reshape(-1, cols).sum(0) if x.numel() else torch.zeros(cols, dtype=acc)).to(x.dtype)
        tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}[x.dtype]
        torch.testing.assert_close(bv.grad, want_b, rtol=tol, atol=tol)
