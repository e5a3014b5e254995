"""PyTorch's own dropout checks, run against fastdropout.

Two parts, written for this project after the checks PyTorch runs on its layers:
- the bodies of test/nn/test_dropout.py (statistics, layouts, whole channels, unbatched inputs,
  warnings and errors, eval mode, p = 0 / 1, empty tensors), with torch's assertions and
  tolerances, fastdropout's modules and functions in place of torch's;
- the OpInfo checks of nn.functional.dropout / dropout2d / dropout3d in test_ops.py,
  test_ops_gradients.py, test_ops_fwd_gradients.py and test_schema_check.py: the same samples
  (shapes (S, S), (S,), () or the valid channel ranks, p in {0, 0.5, 1}, training on and off),
  each call made under torch.manual_seed(42) as OpInfo's wrapper does.

What is left out by design: comparisons of exact masks with torch's (ours come from another
generator; the contract pins ours in test_contract.py).
"""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._subclasses.schema_check_mode import SchemaCheckMode
from torch.testing import make_tensor

import fastdropout
from conftest import FLOAT_DTYPES

S = 5


# --- test/nn/test_dropout.py --------------------------------------------------------------------

def _check_dropout(cls, x, memory_format=torch.contiguous_format):
    """torch's _test_dropout. Its bound (|mean - (1 - p)| < 0.05) is kept; the callers give at
    least 1600 independent mask bits so that it is 5 sigma of the binomial (torch's 1000
    elements and 10-15 x 10-15 channels make it 1.5 to 4 sigma)."""
    p = 0.2
    x = x.fill_(1 - p)
    module = cls(p)
    xv = x.clone(memory_format=memory_format).requires_grad_()
    out = module(xv)
    assert out.is_contiguous(memory_format=memory_format)
    assert abs(out.data.mean() - (1 - p)) < 0.05
    out.backward(x)
    assert xv.grad.is_contiguous(memory_format=memory_format)
    assert abs(xv.grad.data.mean() - (1 - p)) < 0.05

    module = cls(p, True)
    xv = x.clone(memory_format=memory_format).requires_grad_()
    out = module(xv + 0)
    assert out.is_contiguous(memory_format=memory_format)
    assert abs(out.data.mean() - (1 - p)) < 0.05
    out.backward(x)
    assert xv.grad.is_contiguous(memory_format=memory_format)
    assert abs(xv.grad.data.mean() - (1 - p)) < 0.05

    for inplace in (True, False):  # eval mode changes nothing
        module = cls(p, inplace).eval()
        torch.testing.assert_close(x, module(x))
    repr(module), str(module)


def _check_dropout_discontiguous(cls, memory_format=torch.contiguous_format):
    for p in (0, 1e-10):  # 1e-10: almost no drop, but the kernel path
        inp = torch.ones(2, 3, 3, 3)
        discontiguous = torch.empty(2, 3, 3, 6, memory_format=memory_format)[..., ::2]
        discontiguous.copy_(inp)
        out = cls(p=p)(discontiguous)
        if p != 0:
            assert out.is_contiguous(memory_format=memory_format)
        torch.testing.assert_close(discontiguous, out)


def _check_no_batch(dropout, x):
    x_clone = x.clone()
    with torch.random.fork_rng():
        no_batch = dropout(x)
    with torch.random.fork_rng():
        batched = dropout(x_clone.unsqueeze(0)).squeeze(0)
    torch.testing.assert_close(no_batch, batched)


def _check_channel_zero(dropout, x):
    b, c = x.shape[:2]
    channel_numel = torch.tensor(x.shape[2:]).prod()
    result = dropout(x)
    for i, j in itertools.product(range(b), range(c)):
        assert result[i, j].count_nonzero() in (0, channel_numel)


def test_Dropout():
    torch.manual_seed(0)
    _check_dropout(fastdropout.Dropout, torch.empty(2000))
    _check_dropout_discontiguous(fastdropout.Dropout)
    _check_dropout_discontiguous(fastdropout.Dropout, memory_format=torch.channels_last)


def test_Dropout1d():
    torch.manual_seed(0)
    n, c, length = 40, 41, 14
    _check_dropout(fastdropout.Dropout1d, torch.empty(n, c, length, dtype=torch.double))
    with pytest.raises(RuntimeError, match="Expected 2D or 3D input, but received a 4D input"):
        fastdropout.Dropout1d(p=0.5)(torch.rand(1, 2, 2, 2))
    with pytest.raises(RuntimeError, match="Expected 2D or 3D input, but received a 1D input"):
        fastdropout.Dropout1d(p=0.5)(torch.rand(2))
    x = torch.rand(50, 2)
    _check_no_batch(fastdropout.Dropout1d(p=0.5), x)
    _check_no_batch(fastdropout.Dropout1d(p=0.5, inplace=True), x)
    x = torch.ones(10, 4, 2)
    _check_channel_zero(fastdropout.Dropout1d(p=0.5), x)
    _check_channel_zero(fastdropout.Dropout1d(p=0.5, inplace=True), x)


def test_Dropout2d():
    torch.manual_seed(0)
    x = torch.empty(1000, 3, 4, 5)
    _check_dropout(fastdropout.Dropout2d, x)
    _check_dropout(fastdropout.Dropout2d, x, memory_format=torch.channels_last)
    _check_dropout_discontiguous(fastdropout.Dropout2d)
    _check_dropout_discontiguous(fastdropout.Dropout2d, memory_format=torch.channels_last)
    with pytest.warns(UserWarning, match="Received a 5-D input to dropout2d"):
        fastdropout.Dropout2d(p=0.5)(torch.rand(1, 2, 2, 2, 2))
    with pytest.warns(UserWarning, match="Received a 2-D input to dropout2d"):
        fastdropout.Dropout2d(p=0.5)(torch.rand(1, 2))
    with pytest.warns(UserWarning, match="assuming that channel-wise 1D dropout"):
        fastdropout.Dropout2d(p=0.5)(torch.rand(1, 2, 2))
    x = torch.ones(10, 4, 2, 2)
    _check_channel_zero(fastdropout.Dropout2d(p=0.5), x)
    _check_channel_zero(fastdropout.Dropout2d(p=0.5, inplace=True), x)


def test_Dropout3d():
    torch.manual_seed(0)
    x = torch.empty(1000, 2, 3, 3, 4)
    _check_dropout(fastdropout.Dropout3d, x)
    _check_dropout(fastdropout.Dropout3d, x, memory_format=torch.channels_last_3d)
    with pytest.warns(UserWarning, match="Received a 6-D input to dropout3d"):
        fastdropout.Dropout3d(p=0.5)(torch.rand(1, 2, 2, 2, 2, 2))
    with pytest.warns(UserWarning, match="Received a 3-D input to dropout3d"):
        fastdropout.Dropout3d(p=0.5)(torch.rand(1, 2, 2))
    x = torch.rand(50, 2, 2, 2)
    _check_no_batch(fastdropout.Dropout3d(p=0.5), x)
    _check_no_batch(fastdropout.Dropout3d(p=0.5, inplace=True), x)
    x = torch.ones(10, 4, 2, 2, 2)
    _check_channel_zero(fastdropout.Dropout3d(p=0.5), x)
    _check_channel_zero(fastdropout.Dropout3d(p=0.5, inplace=True), x)


def test_empty_dropout():
    x = torch.tensor([])
    assert fastdropout.dropout(x).size() == x.size()


def test_p0_p1_corner_cases_match_torch():
    for train, p in itertools.product((True, False), (0.0, 1.0)):
        x = torch.randn(5).requires_grad_()
        x_ref = x.detach().requires_grad_()
        out = fastdropout.dropout(x, p, train)
        ref = torch.dropout(x_ref, p, train)
        out.sum().backward()
        ref.sum().backward()
        assert out.equal(ref) and x.grad.equal(x_ref.grad)


def test_invalid_dropout_p():
    v = torch.ones(1)
    for cls in (fastdropout.Dropout, fastdropout.Dropout1d, fastdropout.Dropout2d, fastdropout.Dropout3d):
        for p in (-0.1, 1.1):
            with pytest.raises(ValueError):
                cls(p)
    for p in (-0.1, 1.1):
        with pytest.raises(ValueError):
            fastdropout.dropout(v, p)


# --- OpInfo checks ------------------------------------------------------------------------------

def _seeded(fn, **fixed):
    """OpInfo's wrapper_set_seed: every call draws its mask after torch.manual_seed(42)."""
    def call(x, *args, **kwargs):
        with torch.random.fork_rng():
            torch.manual_seed(42)
            return fn(x, *args, **kwargs, **fixed)
    return call


OPS = {  # name: (function, valid input ranks or None for (S, S), (S,), ())
    "dropout": (fastdropout.dropout, None),
    "dropout2d": (fastdropout.dropout2d, (3, 4)),
    "dropout3d": (fastdropout.dropout3d, (4, 5)),
}


def _samples(ranks, dtype, requires_grad=False, noncontiguous=False, size=S):
    shapes = [(size,) * r for r in ranks] if ranks else [(size, size), (size,), ()]
    for shape, p, training in itertools.product(shapes, (0.0, 0.5, 1.0), (True, False)):
        yield make_tensor(shape, dtype=dtype, device="cpu", requires_grad=requires_grad,
                          noncontiguous=noncontiguous, low=-2, high=2), {"p": p, "training": training}
    yield make_tensor(shapes[-1], dtype=dtype, device="cpu", requires_grad=requires_grad,
                      noncontiguous=noncontiguous, low=-2, high=2), {}


@pytest.fixture(params=sorted(OPS))
def op(request):
    fn, ranks = OPS[request.param]
    return _seeded(fn), _seeded(fn, inplace=True), ranks


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_variant_consistency_eager(op, dtype):
    fn, inplace, ranks = op
    for x, kw in _samples(ranks, dtype):
        out = fn(x, **kw)
        y = x.clone()
        got = inplace(y, **kw)
        assert got is y
        torch.testing.assert_close(got, out, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_noncontiguous_samples(op, dtype):
    fn, _, ranks = op
    for (x, kw), (xn, _) in zip(_samples(ranks, dtype, requires_grad=True),
                                _samples(ranks, dtype, requires_grad=True, noncontiguous=True)):
        with torch.no_grad():
            xn.copy_(x)
        out, outn = fn(x, **kw), fn(xn, **kw)
        torch.testing.assert_close(outn, out, rtol=0, atol=0)
        g = torch.randn_like(out)
        if out.requires_grad:
            out.backward(g)
            outn.backward(g)
            torch.testing.assert_close(xn.grad, x.grad, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_neg_view(op, dtype):
    """TestMathBits.test_neg_view: the op on a negative-bit view equals the op on the
    materialised negation, forward and backward, out of place and in place."""
    fn, inplace, ranks = op
    for x, kw in _samples(ranks, dtype):
        expected = fn(torch.neg(x), **kw)
        torch.testing.assert_close(fn(torch._neg_view(x), **kw), expected)
        torch.testing.assert_close(inplace(torch._neg_view(x.clone()), **kw), expected)
        leaf = x.clone().requires_grad_()
        leaf_ref = x.clone().requires_grad_()
        out = fn(torch._neg_view(leaf), **kw)
        ref = fn(torch.neg(leaf_ref), **kw)
        if ref.requires_grad:
            g = torch.randn_like(ref)
            out.backward(g)
            ref.backward(g)
            torch.testing.assert_close(leaf.grad, leaf_ref.grad)


def _differentiable_samples(ranks):
    """The samples that draw a mask (p = 0.5, training), 2 per dimension (the numerical Jacobians
    of 5-D inputs of 5 per dimension take minutes on 2 cores): p = 0, p = 1 and eval are identity
    or zero maps, checked against torch in test_p0_p1_corner_cases_match_torch."""
    return [(x, kw) for x, kw in _samples(ranks, torch.float64, requires_grad=True, size=2)
            if kw.get("p") == 0.5 and kw.get("training")]


def test_fn_grad_and_gradgrad(op):
    fn, inplace, ranks = op
    for x, kw in _differentiable_samples(ranks):
        assert torch.autograd.gradcheck(lambda t: fn(t, **kw), (x,), check_batched_grad=True)
        assert torch.autograd.gradgradcheck(lambda t: fn(t, **kw), (x,), check_batched_grad=True)
        # test_inplace_grad / test_inplace_gradgrad: the in-place variant on a clone
        assert torch.autograd.gradcheck(lambda t: inplace(t.clone(), **kw), (x,), check_batched_grad=True)
        assert torch.autograd.gradgradcheck(lambda t: inplace(t.clone(), **kw), (x,))


def test_forward_mode_AD(op):
    fn, inplace, ranks = op
    for x, kw in _differentiable_samples(ranks):
        for f in (lambda t: fn(t, **kw), lambda t: inplace(t.clone(), **kw)):
            assert torch.autograd.gradcheck(f, (x,), check_forward_ad=True, check_backward_ad=False,
                                            check_undefined_grad=False, check_batched_grad=False)
            # test_fn_fwgrad_bwgrad
            assert torch.autograd.gradgradcheck(f, (x,), check_fwd_over_rev=True, check_rev_over_rev=False,
                                                check_undefined_grad=False)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_schema_check(op, dtype):
    """test_schema_check.py: aliasing and mutation agree with the operators' schemas."""
    fn, inplace, ranks = op
    for x, kw in _samples(ranks, dtype, requires_grad=dtype == torch.float64):
        with SchemaCheckMode():
            fn(x, **kw)
            inplace(x.detach().clone(), **kw)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_fake(op, dtype):
    """test_fake: under FakeTensorMode, the same shape, dtype and strides as the real call."""
    fn, inplace, ranks = op
    for x, kw in _samples(ranks, dtype):
        real = fn(x, **kw)
        copy = x.clone()
        with FakeTensorMode() as mode:
            fake = fn(mode.from_tensor(x), **kw)
            fake_inplace = inplace(mode.from_tensor(copy), **kw)
        for f in (fake, fake_inplace):
            assert f.shape == real.shape and f.dtype == real.dtype and f.stride() == real.stride()


def test_fake_bias_dropout_add_and_torch_functions_agree_on_layout():
    x = torch.randn(4, 6).t()
    with FakeTensorMode() as mode:
        fake = fastdropout.dropout(mode.from_tensor(x), 0.5)
    assert fake.stride() == F.dropout(x, 0.5).stride() == fastdropout.dropout(x, 0.5).stride()
