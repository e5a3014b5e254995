"""fastdropout.bias_dropout_add: residual + dropout(x + bias) in one pass each way."""
import pytest
import torch

import fastdropout
import reference
from conftest import FLOAT_DTYPES, bits_equal, devices

SHAPES = [(4, 64), (3, 5, 24), (7, 13), (2, 3, 4, 9), (1000,), (33, 8)]


def _inputs(shape, dtype, device, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype).to(device)
    b = torch.randn(shape[-1], generator=g).to(dtype).to(device)
    r = torch.randn(shape, generator=g).to(dtype).to(device)
    if grad:
        for t in (x, b, r):
            t.requires_grad_()
    return x, b, r


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_equals_composition(device, dtype, shape):
    x, b, r = _inputs(shape, dtype, device)
    got = fastdropout.bias_dropout_add(x, b, r, 0.3, seed=21, offset=4)
    assert bits_equal(got, reference.bias_dropout_add(x, b, r, 0.3, 21, 4))
    got = fastdropout.bias_dropout_add(x, None, r, 0.3, seed=21, offset=4)
    assert bits_equal(got, reference.bias_dropout_add(x, None, r, 0.3, 21, 4))


@pytest.mark.parametrize("device", devices())
def test_mask_is_dropouts_mask(device):
    x, b, r = _inputs((16, 40), torch.float32, device)
    out = fastdropout.bias_dropout_add(x, torch.zeros_like(b), torch.zeros_like(r), 0.5, seed=8)
    plain = fastdropout.dropout(x, 0.5, seed=8)
    assert torch.equal(out, plain)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(4, 64), (3, 5, 24), (7, 13), (1000,)])
def test_gradients_against_composition(device, dtype, shape):
    x, b, r = _inputs(shape, dtype, device, grad=True)
    out = fastdropout.bias_dropout_add(x, b, r, 0.25, seed=3)
    g = torch.randn_like(out)
    out.backward(g)
    mask = fastdropout.dropout_mask(shape, 0.25, seed=3, device=device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    want_x = torch.where(mask, (g.to(acc) * reference.scale_of(0.25, dtype)).to(dtype),
                         torch.zeros((), dtype=dtype, device=device))
    assert bits_equal(x.grad, want_x)
    assert bits_equal(r.grad, g)
    # grad_bias: the column sums of grad_x, float32 partial sums (float64 for float64)
    want_b = want_x.to(acc).reshape(-1, shape[-1]).sum(0).to(dtype)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(b.grad, want_b, rtol=tol, atol=tol)


def test_residual_gradient_is_grad_out_itself():
    x, b, r = _inputs((8, 16), torch.float32, "cpu", grad=True)
    seen = []
    r.register_hook(lambda g: seen.append(g))
    out = fastdropout.bias_dropout_add(x, b, r, 0.1, seed=1)
    g = torch.randn_like(out)
    out.backward(g)
    assert seen[0] is g or seen[0].data_ptr() == g.data_ptr()


@pytest.mark.parametrize("device", devices())
def test_bias_gradient_is_bitwise_deterministic(device):
    x, b, r = _inputs((513, 72), torch.float32, device, grad=True)
    g = torch.randn(513, 72, device=device)
    grads = []
    for _ in range(3):
        b.grad = None
        fastdropout.bias_dropout_add(x, b, r, 0.2, seed=5).backward(g)
        grads.append(b.grad.clone())
    assert all(bits_equal(grads[0], other) for other in grads[1:])


def test_bias_none_and_training_false():
    x, b, r = _inputs((6, 10), torch.float32, "cpu")
    torch.testing.assert_close(fastdropout.bias_dropout_add(x, b, r, 0.5, training=False), r + x + b,
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fastdropout.bias_dropout_add(x, None, r, 0.5, training=False), r + x)
    state = torch.get_rng_state()
    fastdropout.bias_dropout_add(x, b, r, 0.5, training=False)
    assert torch.equal(state, torch.get_rng_state())  # eval draws nothing


def test_module():
    m = fastdropout.BiasDropoutAdd(0.1)
    assert repr(m) == "BiasDropoutAdd(p=0.1)" and m.state_dict() == {}
    x, b, r = _inputs((4, 8), torch.float32, "cpu")
    m.eval()
    torch.testing.assert_close(m(x, b, r), r + x + b)
    m.train()
    out = m(x, b, r)
    assert out.shape == x.shape


def test_gradcheck_float64():
    x, b, r = _inputs((5, 12), torch.float64, "cpu", grad=True)
    f = lambda x, b, r: fastdropout.bias_dropout_add(x, b, r, 0.3, seed=13)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, b, r))
    assert torch.autograd.gradgradcheck(f, (x, b, r))
    g = lambda x, r: fastdropout.bias_dropout_add(x, None, r, 0.3, seed=13)  # noqa: E731
    assert torch.autograd.gradcheck(g, (x, r))


def test_compile_fullgraph():
    torch._dynamo.reset()
    x, b, r = _inputs((16, 32), torch.float32, "cpu", grad=True)

    def block(x, b, r):
        return fastdropout.bias_dropout_add(x, b, r, 0.1) * 2

    compiled = torch.compile(block, fullgraph=True)
    torch.manual_seed(4)
    eager = block(x, b, r)
    eager.sum().backward()
    eager_grads = [t.grad.clone() for t in (x, b, r)]
    for t in (x, b, r):
        t.grad = None
    torch.manual_seed(4)
    got = compiled(x, b, r)
    got.sum().backward()
    assert torch.equal(got, eager)
    for t, want in zip((x, b, r), eager_grads):
        assert torch.equal(t.grad, want)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True), (True, True, True)])
def test_any_subset_of_inputs_requiring_grad(with_bias, needs):
    x, b, r = _inputs((6, 16), torch.float32, "cpu")
    b = b if with_bias else None
    for t, need in zip((x, b, r), needs):
        if t is not None:
            t.requires_grad_(need)
    if not any(t is not None and t.requires_grad for t in (x, b, r)):
        return
    out = fastdropout.bias_dropout_add(x, b, r, 0.5, seed=2)
    g = torch.randn_like(out)
    out.backward(g)
    mask = fastdropout.dropout_mask((6, 16), 0.5, seed=2)
    if x.requires_grad:
        assert torch.equal(x.grad, torch.where(mask, g * 2, torch.zeros(())))
    if b is not None and b.requires_grad:
        torch.testing.assert_close(b.grad, torch.where(mask, g * 2, torch.zeros(())).sum(0))
    if r.requires_grad:
        assert torch.equal(r.grad, g)
