"""torch.func transforms, forward-mode AD and vmap randomness on every fastdropout entry point.

Masks are pinned against the contract (tests/reference.py, fastdropout.dropout_mask): the
tangent of dropout is tangent * mask * scale, and under vmap "same" is the mask of one slice,
"different" the mask of the whole batch-first tensor (README, "torch.func and vmap")."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import fastdropout
import reference
from conftest import FLOAT_DTYPES, bits_equal

P, SEED, OFFSET = 0.4, 1234, 5


def mask_scale(shape, dtype=torch.float64, p=P, seed=SEED, offset=OFFSET):
    """keep * scale as a tensor: the derivative of dropout with this (seed, offset)."""
    return fastdropout.dropout_mask(shape, p, seed, offset).to(dtype) * reference.scale_of(p, dtype)


def channel_mask_scale(shape, p=P, seed=SEED, offset=OFFSET):
    return reference.channel_dropout(torch.ones(shape, dtype=torch.float64), p, seed, offset)


def drop(t):
    return fastdropout.dropout(t, P, seed=SEED, offset=OFFSET)


def torch_randomness_error_message():
    """The message torch's own dropout raises under vmap's default randomness="error"."""
    with pytest.raises(RuntimeError) as info:
        vmap(lambda t: F.dropout(t, 0.5))(torch.ones(2, 3))
    return str(info.value)


# --- forward-mode AD ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("inplace", [False, True])
def test_forward_ad_tangent_is_tangent_times_mask_times_scale(dtype, inplace):
    x = torch.randn(7, 33).to(dtype)
    t = torch.randn(7, 33).to(dtype)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x.clone(), t.clone())
        y = fastdropout.dropout(dual, P, inplace=inplace, seed=SEED, offset=OFFSET)
        assert (y is dual) == inplace
        primal, tangent = fwAD.unpack_dual(y)
    # The tangent goes through the same pass as the primal: the contract's value, bit for bit.
    assert bits_equal(primal, reference.dropout(x, P, SEED, OFFSET))
    assert bits_equal(tangent, reference.dropout(t, P, SEED, OFFSET))


def test_forward_ad_inplace_on_a_view_masks_the_base_tangent():
    x, t = torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    with fwAD.dual_level():
        base = fwAD.make_dual(x.clone(), t.clone())
        view = base[2:]
        fastdropout.dropout(view, P, inplace=True, seed=SEED)
        tangent = fwAD.unpack_dual(base).tangent
    assert torch.equal(tangent[:2], t[:2])
    assert torch.equal(tangent[2:], t[2:] * mask_scale((4, 8), offset=0))


@pytest.mark.parametrize("fn,shape", [(fastdropout.dropout1d, (3, 4, 5)), (fastdropout.dropout2d, (2, 3, 4, 4)),
                                      (fastdropout.dropout3d, (3, 2, 2, 2))])
@pytest.mark.parametrize("inplace", [False, True])
def test_forward_ad_channel_dropout(fn, shape, inplace):
    x, t = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    with fwAD.dual_level():
        y = fn(fwAD.make_dual(x.clone(), t.clone()), P, inplace=inplace, seed=SEED, offset=OFFSET)
        tangent = fwAD.unpack_dual(y).tangent
    batched = x if x.dim() in (3, 5) or fn is fastdropout.dropout2d else x.unsqueeze(0)
    assert torch.equal(tangent, reference.channel_dropout(t.view(batched.shape), P, SEED, OFFSET).view(shape))


def test_forward_ad_bias_dropout_add_every_tangent_combination():
    x, b, r = torch.randn(5, 16, dtype=torch.float64), torch.randn(16, dtype=torch.float64), torch.randn(5, 16, dtype=torch.float64)
    tx, tb, tr = torch.randn_like(x), torch.randn_like(b), torch.randn_like(r)
    m = mask_scale((5, 16))
    for with_x, with_b, with_r in [(1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1)]:
        with fwAD.dual_level():
            args = [fwAD.make_dual(v, tv) if on else v for v, tv, on in ((x, tx, with_x), (b, tb, with_b), (r, tr, with_r))]
            out = fastdropout.bias_dropout_add(*args, P, seed=SEED, offset=OFFSET)
            tangent = fwAD.unpack_dual(out).tangent
        want = m * (tx * with_x + tb * with_b) + tr * with_r
        assert torch.allclose(tangent, want, rtol=0, atol=1e-12)


def test_forward_ad_gradcheck_and_fwd_over_rev():
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    b, r = torch.randn(9, dtype=torch.float64, requires_grad=True), torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    fns = [(drop, (x,)), (lambda t: fastdropout.dropout2d(t.view(4, 9, 1), P, seed=SEED), (x,)),
           (lambda a, c, d: fastdropout.bias_dropout_add(a, c, d, P, seed=SEED), (x, b, r))]
    for fn, args in fns:
        assert torch.autograd.gradcheck(fn, args, check_forward_ad=True, check_batched_grad=True)
        assert torch.autograd.gradgradcheck(fn, args, check_fwd_over_rev=True)


# --- no autograd node without grad ------------------------------------------------------------

def test_no_node_and_nothing_saved_without_grad():
    packed = []
    x = torch.randn(64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        with torch.no_grad():
            assert fastdropout.dropout(x, P).grad_fn is None
            assert fastdropout.bias_dropout_add(x, x[:64], x, P).grad_fn is None
        y = fastdropout.dropout(torch.randn(64), P)  # no input requires grad
        rng = torch.tensor([1, 2], dtype=torch.int64)
        g = torch.ops.fastdropout.dropout_backward(torch.randn(64), rng, P)
        z = torch.randn(64)
        fastdropout.dropout(z, P, inplace=True)
    assert y.grad_fn is None and g.grad_fn is None and z.grad_fn is None
    assert packed == []


# --- torch.func: grad, vjp, jvp, jacrev, jacfwd, hessian, functional_call ---------------------

def test_grad_vjp_jvp_jacobians_of_dropout():
    x = torch.randn(12, dtype=torch.float64)
    m = mask_scale(12)
    assert torch.equal(grad(lambda t: drop(t).sum())(x), m)
    out, pullback = vjp(drop, x)
    cot = torch.randn(12, dtype=torch.float64)
    assert torch.equal(out, reference.dropout(x, P, SEED, OFFSET)) and torch.equal(pullback(cot)[0], cot * m)
    assert torch.equal(jvp(drop, (x,), (cot,))[1], cot * m)
    assert torch.equal(jacrev(drop)(x), torch.diag(m))
    assert torch.equal(jacfwd(drop)(x), torch.diag(m))  # seed= draws nothing: no randomness error
    assert torch.equal(hessian(lambda t: (drop(t) ** 2).sum())(x), torch.diag(2 * m * m))


def test_jacfwd_without_seed_follows_torch_randomness():
    x = torch.randn(6)
    with pytest.raises(RuntimeError, match="randomness"):
        jacfwd(lambda t: fastdropout.dropout(t, P))(x)
    torch.manual_seed(3)
    jac = jacfwd(lambda t: fastdropout.dropout(t, P), randomness="same")(x)
    torch.manual_seed(3)
    y = fastdropout.dropout(torch.ones(6), P)
    assert torch.equal(jac, torch.diag(y))


def test_grad_of_inplace_and_channel_and_fused():
    x = torch.randn(3, 4, 5, dtype=torch.float64)

    def inplace(t):
        u = t * 1.0
        fastdropout.dropout(u, P, inplace=True, seed=SEED, offset=OFFSET)
        return u.sum()

    assert torch.equal(grad(inplace)(x), mask_scale((3, 4, 5)))
    assert torch.equal(grad(lambda t: fastdropout.dropout1d(t, P, seed=SEED, offset=OFFSET).sum())(x),
                       channel_mask_scale((3, 4, 5)))
    b, r = torch.randn(5, dtype=torch.float64), torch.randn(3, 4, 5, dtype=torch.float64)
    gx, gb, gr = grad(lambda a, c, d: fastdropout.bias_dropout_add(a, c, d, P, seed=SEED, offset=OFFSET).sum(),
                      argnums=(0, 1, 2))(x, b, r)
    m = mask_scale((3, 4, 5))
    assert torch.equal(gx, m) and torch.allclose(gb, m.sum((0, 1))) and torch.equal(gr, torch.ones_like(r))


def test_functional_call_on_a_replaced_model():
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Dropout(0.3)).double()
    fastdropout.replace_dropout(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(4, 6, dtype=torch.float64)
    torch.manual_seed(9)
    grads = grad(lambda ps: functional_call(model, ps, (x,)).sum())(params)
    torch.manual_seed(9)
    kept = fastdropout.dropout(torch.ones(4, 6, dtype=torch.float64), 0.3)
    assert torch.allclose(grads["0.bias"], kept.sum(0))


# --- vmap randomness --------------------------------------------------------------------------

def test_vmap_error_mode_raises_torchs_error():
    message = torch_randomness_error_message()
    x = torch.randn(3, 8)
    for fn in (lambda t: fastdropout.dropout(t, P), lambda t: fastdropout.dropout2d(t.view(2, 2, 2), P),
               lambda t: fastdropout.dropout(t.clone(), P, inplace=True),
               lambda t: fastdropout.bias_dropout_add(t, None, t, P),
               lambda t: fastdropout.dropout(torch.ones(8), P) + t):  # unbatched input too
        with pytest.raises(RuntimeError) as info:
            vmap(fn)(x)
        assert str(info.value) == message
    # p = 0 / 1 and eval draw nothing, as with torch
    assert torch.equal(vmap(lambda t: fastdropout.dropout(t, 1.0))(x), torch.zeros_like(x))
    assert torch.equal(vmap(lambda t: fastdropout.dropout(t, P, training=False))(x), x)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("in_dim", [0, 1])
def test_vmap_same_and_different_masks_are_the_contracts(dtype, in_dim):
    xs = torch.randn(4, 5, 6).to(dtype)  # batch of 4 slices (5, 6), batch dim first
    batched = xs.movedim(0, in_dim)
    same = vmap(drop, in_dims=in_dim, randomness="same")(batched)
    different = vmap(drop, in_dims=in_dim, randomness="different")(batched)
    for b in range(4):  # "same": every slice the mask of one slice-shaped call
        assert bits_equal(same[b], reference.dropout(xs[b], P, SEED, OFFSET))
    # "different": the mask of the whole batch-first tensor
    assert bits_equal(different, reference.dropout(xs, P, SEED, OFFSET))


def test_vmap_generator_masks_same_and_different():
    xs = torch.ones(5, 64)
    torch.manual_seed(1)
    same = vmap(lambda t: fastdropout.dropout(t, 0.5), randomness="same")(xs)
    torch.manual_seed(1)
    one = fastdropout.dropout(xs[0], 0.5)
    assert all(torch.equal(same[b], one) for b in range(5))
    torch.manual_seed(1)
    different = vmap(lambda t: fastdropout.dropout(t, 0.5), randomness="different")(xs)
    torch.manual_seed(1)
    assert torch.equal(different, fastdropout.dropout(xs, 0.5))
    assert not torch.equal(different[0], different[1])


def test_vmap_unbatched_input():
    ones = torch.ones(5, 6, dtype=torch.float64)
    fn = lambda b: drop(ones) + 0 * b  # noqa: E731
    different = vmap(fn, randomness="different")(torch.zeros(3))
    assert torch.equal(different, reference.dropout(torch.ones(3, 5, 6, dtype=torch.float64), P, SEED, OFFSET))
    same = vmap(fn, randomness="same")(torch.zeros(3))
    assert torch.equal(same, reference.dropout(ones, P, SEED, OFFSET).expand(3, 5, 6))


@pytest.mark.parametrize("fn,shape", [(fastdropout.dropout1d, (2, 3, 5)), (fastdropout.dropout2d, (2, 3, 2, 2)),
                                      (fastdropout.dropout3d, (3, 2, 2, 2))])
def test_vmap_channel_dropout(fn, shape):
    xs = torch.randn(4, *shape, dtype=torch.float64)
    f = lambda t: fn(t, P, seed=SEED, offset=OFFSET)  # noqa: E731
    batched_shape = shape if len(shape) in (3, 5) or fn is fastdropout.dropout2d else (1, *shape)
    same = vmap(f, randomness="same")(xs)
    for b in range(4):
        assert torch.equal(same[b], reference.channel_dropout(xs[b].view(batched_shape), P, SEED, OFFSET).view(shape))
    different = vmap(f, randomness="different")(xs)
    # the mask of channel dropout over the stacked slices, (4 * N, C, ...)
    stacked = xs.reshape(4 * batched_shape[0], *batched_shape[1:])
    assert torch.equal(different, reference.channel_dropout(stacked, P, SEED, OFFSET).view(xs.shape))


def test_vmap_inplace():
    xs = torch.randn(4, 10, dtype=torch.float64)
    for mode, want in (("same", torch.stack([reference.dropout(xs[b], P, SEED, OFFSET) for b in range(4)])),
                       ("different", reference.dropout(xs, P, SEED, OFFSET))):
        ys = xs.clone()
        vmap(lambda t: fastdropout.dropout(t, P, inplace=True, seed=SEED, offset=OFFSET), randomness=mode)(ys)
        assert torch.equal(ys, want)
    # torch refuses "different" in-place randomness on an unbatched tensor (its CPU dropout fails
    # one step later, on the in-place multiply); we raise torch's own error for that case
    with pytest.raises(RuntimeError, match="vmap"):
        vmap(lambda t: F.dropout(torch.ones(3), 0.5, inplace=True) + t, randomness="different")(xs[:, :3])
    with pytest.raises(RuntimeError, match="different inplace randomness on an unbatched tensor"):
        vmap(lambda t: fastdropout.dropout(torch.ones(3), 0.5, inplace=True) + t, randomness="different")(xs[:, :3])


def test_nested_vmap():
    xs = torch.randn(2, 3, 8, dtype=torch.float64)
    inner_different = vmap(vmap(drop, randomness="different"), randomness="same")(xs)
    for a in range(2):
        assert torch.equal(inner_different[a], reference.dropout(xs[a], P, SEED, OFFSET))
    both = vmap(vmap(drop, randomness="different"), randomness="different")(xs)
    assert torch.equal(both, reference.dropout(xs, P, SEED, OFFSET))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_vmap_bias_dropout_add(dtype):
    x, r = torch.randn(3, 4, 8).to(dtype), torch.randn(3, 4, 8).to(dtype)
    biases = torch.randn(3, 8).to(dtype)
    f = lambda a, c, d: fastdropout.bias_dropout_add(a, c, d, P, seed=SEED, offset=OFFSET)  # noqa: E731
    different = vmap(f, randomness="different")(x, biases, r)  # a batched bias: composed at the vmap level
    want = torch.stack([reference.bias_dropout_add(x[b], biases[b], r[b], P, SEED) for b in range(3)])
    mask = torch.from_numpy(reference.keep_mask(x.numel(), P, SEED, OFFSET)).view(x.shape)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    want = (r.to(acc) + torch.where(mask, (x.to(acc) + biases[:, None].to(acc)) * reference.scale_of(P, dtype), 0)).to(dtype)
    assert bits_equal(different, want)
    same = vmap(f, in_dims=(0, None, 0), randomness="same")(x, biases[0], r)
    for b in range(3):
        assert bits_equal(same[b], reference.bias_dropout_add(x[b], biases[0], r[b], P, SEED, OFFSET))


# --- vmap over grad: per-sample gradients -----------------------------------------------------

def test_per_sample_gradients():
    xs = torch.randn(5, 7, dtype=torch.float64)
    loss = lambda t: (drop(t) * torch.arange(7.0, dtype=torch.float64)).sum()  # noqa: E731
    different = vmap(grad(loss), randomness="different")(xs)
    assert torch.equal(different, mask_scale((5, 7)) * torch.arange(7.0, dtype=torch.float64))
    same = vmap(grad(loss), randomness="same")(xs)
    assert torch.equal(same, (mask_scale(7) * torch.arange(7.0, dtype=torch.float64)).expand(5, 7))
    # and jacrev's vmapped backward (randomness "error"): the forward was outside that vmap
    assert torch.equal(jacrev(drop)(xs[0]), torch.diag(mask_scale(7)))


def test_per_sample_gradients_of_a_model_with_fused_and_channel_dropout():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8).double()
    params = {k: v.detach() for k, v in lin.named_parameters()}
    bias = torch.randn(8, dtype=torch.float64)

    def loss(ps, x):
        h = functional_call(lin, ps, (x,))
        h = fastdropout.bias_dropout_add(h, bias, x, P, seed=SEED, offset=OFFSET)
        return fastdropout.dropout1d(h.view(2, 4), P, seed=SEED + 1).sum()

    xs = torch.randn(6, 8, dtype=torch.float64)
    per_sample = vmap(grad(loss), in_dims=(None, 0), randomness="same")(params, xs)
    for b in range(6):
        one = grad(loss)(params, xs[b])
        assert torch.allclose(per_sample["weight"][b], one["weight"]) and torch.allclose(per_sample["bias"][b], one["bias"])


def test_compile_inplace_still_works():
    torch._dynamo.reset()

    def f(t):
        u = t * 2
        fastdropout.dropout(u, 0.5, inplace=True, seed=3)
        return u + 1

    x = torch.randn(64, requires_grad=True)
    got = torch.compile(f, fullgraph=True)(x)
    got.sum().backward()
    assert torch.equal(got, reference.dropout(x.detach() * 2, 0.5, 3) + 1)
    assert torch.equal(x.grad, 2 * mask_scale(64, torch.float32, p=0.5, seed=3, offset=0))


def test_vmap_bias_dropout_add_writes_canonical_nans():
    """The composed vmap path keeps the kernels' NaN rule (README, contract item 6)."""
    from test_contract import _nan_inputs
    import reference
    x = _nan_inputs(torch.float32).view(4, -1, 8)
    r = _nan_inputs(torch.float32).flip(0).view(4, -1, 8)
    b = torch.randn(4, 8)
    out = torch.func.vmap(lambda x_, b_, r_: fastdropout.bias_dropout_add(x_, b_, r_, 0.5, seed=9),
                          randomness="same")(x, b, r)
    nan = torch.isnan(out)
    assert nan.sum() > 10
    assert bits_equal(out[nan], reference.canonical_nan(torch.float32).expand(int(nan.sum())))


def test_vmap_backward_refuses_rng_states_that_differ_across_the_batch():
    states = torch.tensor([[1, 0], [2, 0]], dtype=torch.int64)
    grads = torch.ones(2, 16)
    rows = torch.func.vmap(lambda g, s: torch.ops.fastdropout.dropout_backward(g, s, 0.5, 1),
                           randomness="same")
    same = torch.tensor([[1, 0], [1, 0]], dtype=torch.int64)
    assert rows(grads, same).shape == (2, 16)
    with pytest.raises(RuntimeError, match="rng_state differs across the batch"):
        rows(grads, states)
