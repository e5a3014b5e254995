"""fastdropout.dropout and fastdropout.Dropout: semantics, statistics against torch's own
layer, autograd, operator checks and torch.compile."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fastdropout
import reference
from conftest import FLOAT_DTYPES, bits_equal, devices
from stats import assert_binomial

PROBS = [0.01, 0.1, 0.3, 0.5, 0.9, 0.99]


# --- semantics shared with torch.nn.functional.dropout ---------------------------------------

@pytest.mark.parametrize("device", devices())
def test_eval_mode_p0_and_empty_return_x_itself(device):
    x = torch.randn(10, device=device)
    assert fastdropout.dropout(x, 0.5, training=False) is x
    assert fastdropout.dropout(x, 0.0) is x
    e = torch.randn(0, 3, device=device)
    assert fastdropout.dropout(e, 0.5) is e
    assert F.dropout(x, 0.0) is x and F.dropout(e, 0.5) is e  # the behaviour we copy


@pytest.mark.parametrize("device", devices())
def test_p1_zeroes_everything(device):
    x = torch.randn(100, device=device, requires_grad=True)
    y = fastdropout.dropout(x, 1.0)
    assert (y == 0).all() and y is not x
    y.sum().backward()
    assert (x.grad == 0).all()


@pytest.mark.parametrize("device", devices())
def test_zero_dim_tensor(device):
    x = torch.tensor(3.0, device=device)
    y = fastdropout.dropout(x, 0.5, seed=0)
    assert y.shape == () and y.item() in (0.0, 6.0)
    assert y.item() == (6.0 if fastdropout.dropout_mask((), 0.5, seed=0).item() else 0.0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_inplace(device, dtype):
    x = torch.randn(257, 3, device=device).to(dtype)
    expected = reference.dropout(x, 0.4, 11)
    ret = fastdropout.dropout(x, 0.4, inplace=True, seed=11)
    assert ret is x and bits_equal(x, expected)
    # non-contiguous in place: the logical-index mask, written back into x's storage
    y = torch.randn(30, 40, device=device).to(dtype).t()
    expected = reference.dropout(y.contiguous(), 0.4, 12)
    assert fastdropout.dropout(y, 0.4, inplace=True, seed=12) is y
    assert bits_equal(y, expected)


@pytest.mark.parametrize("device", devices())
def test_inplace_autograd_on_non_leaf(device):
    x = torch.randn(1000, device=device, requires_grad=True)
    a = x * 1.0
    y = fastdropout.dropout(a, 0.3, inplace=True, seed=3)
    assert y is a
    y.sum().backward()
    mask = fastdropout.dropout_mask(1000, 0.3, seed=3, device=device)
    assert torch.equal(x.grad, mask.float() * reference.scale_of(0.3, torch.float32))


def test_module_drop_in():
    m = fastdropout.Dropout(p=0.2, inplace=False)
    ref = torch.nn.Dropout(p=0.2)
    assert isinstance(m, torch.nn.Dropout)
    assert repr(m) == "Dropout(p=0.2, inplace=False)" == repr(ref)
    assert m.state_dict() == {} and list(m.parameters()) == []
    x = torch.randn(64)
    m.eval()
    assert m(x) is x
    m.train()
    y = m(x)
    assert ((y == 0) | torch.isclose(y, x / 0.8)).all()
    with pytest.raises(ValueError, match="between 0 and 1"):
        fastdropout.Dropout(p=1.5)
    assert copy.deepcopy(m).p == 0.2


# --- the generator: where seed and offset come from --------------------------------------------

def test_manual_seed_reproduces_cpu_masks():
    x = torch.ones(4096)
    torch.manual_seed(123)
    a1, a2 = fastdropout.dropout(x, 0.5), fastdropout.dropout(x, 0.5)
    torch.manual_seed(123)
    b1, b2 = fastdropout.dropout(x, 0.5), fastdropout.dropout(x, 0.5)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, a2)


def test_explicit_generator_is_used_and_advanced():
    x = torch.ones(4096)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    a = fastdropout.dropout(x, 0.5, generator=g1)
    torch.manual_seed(99)  # the default generator plays no part
    b = fastdropout.dropout(x, 0.5, generator=g2)
    assert torch.equal(a, b)
    assert not torch.equal(fastdropout.dropout(x, 0.5, generator=g1), a)


def test_seed_is_device_independent_of_global_state():
    x = torch.ones(1000)
    torch.manual_seed(1)
    a = fastdropout.dropout(x, 0.5, seed=10, offset=3)
    torch.manual_seed(2)
    assert torch.equal(a, fastdropout.dropout(x, 0.5, seed=10, offset=3))


# --- statistics, with torch's own layer as the reference ---------------------------------------

@pytest.mark.parametrize("p", PROBS)
def test_keep_rate_matches_torch_within_5_sigma(p):
    n = 1 << 20
    torch.manual_seed(2024)
    x = torch.ones(n)
    ours = (fastdropout.dropout(x, p) != 0).sum().item()
    theirs = (F.dropout(x, p) != 0).sum().item()
    assert_binomial(ours, n, 1 - p, "fastdropout kept")
    assert_binomial(theirs, n, 1 - p, "torch kept")
    # The difference of two independent binomials: sd * sqrt(2).
    assert abs(ours - theirs) <= 5 * (2 * n * p * (1 - p)) ** 0.5


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_mean_preserved(p):
    n = 1 << 20
    torch.manual_seed(7)
    y = fastdropout.dropout(torch.ones(n, dtype=torch.float64), p)
    # mean = scale * kept / n, kept ~ Binomial(n, 1 - p): sd(mean) = scale * sqrt(p (1-p) / n).
    sd = (1 / (1 - p)) * (p * (1 - p) / n) ** 0.5
    assert abs(y.mean().item() - 1.0) <= 5 * sd


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_kept_values_within_one_ulp_of_torch(dtype, p):
    torch.manual_seed(3)
    x = (torch.randn(1 << 16) * 100).to(dtype)
    ours = fastdropout.dropout(x, p)
    theirs = F.dropout(x, p)
    both = (ours != 0) & (theirs != 0)
    assert both.sum() > 0
    diff = (ours[both].double() - theirs[both].double()).abs()
    _, exponent = torch.frexp(theirs[both].double())  # v = m * 2^e, 0.5 <= |m| < 1
    ulp = torch.finfo(dtype).eps * torch.pow(2.0, exponent.double() - 1)  # one unit in the last place of v
    assert (diff <= ulp).all()
    # and exactly the contract's value: x * scale in float32, rounded once
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert torch.equal(ours[ours != 0], (x.to(acc) * reference.scale_of(p, dtype)).to(dtype)[ours != 0])


def _pair_agreement(mask, a, b):
    return (mask[:, a] == mask[:, b]).sum().item(), mask.shape[0]


def test_no_dependence_between_lanes_groups_and_neighbours():
    """At p = 0.5 each keep bit is a fair coin: any two of them agree with probability 1/2."""
    n = 1 << 21
    mask = fastdropout.dropout_mask(n, 0.5, seed=31337).view(-1, 8)
    for a in range(8):  # all lane pairs inside one Philox call
        for b in range(a + 1, 8):
            agree, trials = _pair_agreement(mask, a, b)
            assert_binomial(agree, trials, 0.5, f"lanes {a},{b}")
    # neighbours across the group boundary, and the same lane of consecutive groups
    flat = mask.view(-1)
    assert_binomial((flat[7::8][:-1] == flat[8::8]).sum().item(), n // 8 - 1, 0.5, "lane 7 | next lane 0")
    for lane in range(8):
        col = mask[:, lane]
        assert_binomial((col[1:] == col[:-1]).sum().item(), col.numel() - 1, 0.5, f"lane {lane} consecutive groups")
        assert_binomial(col.sum().item(), col.numel(), 0.5, f"lane {lane} keep rate")


def test_chi_square_of_neighbouring_pairs_at_p01():
    """The 2x2 table of (keep_i, keep_i+1) over all neighbours at p = 0.1: chi-square, 3 degrees
    of freedom, against independent Bernoulli(0.9) pairs. The 5-sigma tail of chi2(3) is 32.5."""
    n = 1 << 21
    m = fastdropout.dropout_mask(n, 0.1, seed=99).long()
    cells = torch.bincount(2 * m[:-1] + m[1:], minlength=4).double()
    q = 1 - reference.threshold(0.1) / 65536
    expected = torch.tensor([(1 - q) ** 2, (1 - q) * q, q * (1 - q), q * q], dtype=torch.float64) * (n - 1)
    chi2 = ((cells - expected) ** 2 / expected).sum().item()
    assert chi2 < 32.5


def test_successive_calls_independent():
    torch.manual_seed(0)
    x = torch.ones(1 << 18)
    a = fastdropout.dropout(x, 0.5) != 0
    b = fastdropout.dropout(x, 0.5) != 0
    assert_binomial((a == b).sum().item(), x.numel(), 0.5, "agreement of two calls")


# --- autograd ------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", devices())
def test_gradcheck_float64(device):
    x = torch.randn(6, 13, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fastdropout.dropout(t, 0.3, seed=17, offset=1), (x,))
    assert torch.autograd.gradgradcheck(lambda t: fastdropout.dropout(t, 0.3, seed=17), (x,))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_backward_uses_the_forward_mask(device, dtype):
    torch.manual_seed(5)
    x = torch.randn(4, 1001, device=device).to(dtype).requires_grad_()
    y = fastdropout.dropout(x, 0.25)  # mask from the generator: only backward can know it
    g = torch.randn_like(y)
    y.backward(g)
    kept = y != 0
    assert torch.equal(x.grad != 0, kept & (g != 0))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    want = torch.where(kept, (g.to(acc) * reference.scale_of(0.25, dtype)).to(dtype), torch.zeros((), dtype=dtype, device=device))
    assert bits_equal(x.grad, want)


def test_backward_saves_only_the_rng_state():
    x = torch.randn(1 << 16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fastdropout.dropout(x * 2, 0.5)
    ours = [t for t in saved if t.dtype == torch.int64]
    assert len(ours) == 1 and ours[0].numel() == 2
    assert sum(t.numel() * t.element_size() for t in saved) == 16


def test_opcheck_every_op():
    x = torch.randn(5, 17, dtype=torch.float32, requires_grad=True)
    rng = torch.tensor([7, 3], dtype=torch.int64)
    ops = torch.ops.fastdropout
    torch.library.opcheck(ops.dropout.default, (x, 0.3, 7, 3, None, 1))
    torch.library.opcheck(ops.dropout.default, (x.detach().view(5, 17, 1), 0.3, 7, 3, None, 17))
    torch.library.opcheck(ops.dropout_.default, (x.detach().clone(), 0.3, 7, 3, None, 1))
    torch.library.opcheck(ops.dropout_backward.default, (x, rng, 0.3, 1))
    torch.library.opcheck(ops.dropout_mask.default, (rng, 85, 0.3))
    b = torch.randn(17, requires_grad=True)
    r = torch.randn(5, 17, requires_grad=True)
    torch.library.opcheck(ops.bias_dropout_add.default, (x, b, r, 0.3, 7, 3, None))
    torch.library.opcheck(ops.bias_dropout_add.default, (x, None, r, 0.3, 7, 3, None))
    torch.library.opcheck(ops.bias_dropout_add_backward.default, (x, rng, 0.3))


# --- torch.compile -------------------------------------------------------------------------------

def _two_dropouts(x):
    return fastdropout.dropout(x, 0.5) + fastdropout.dropout(x, 0.5) * 3


def test_compile_fullgraph_inductor_matches_eager_and_draws_two_masks():
    torch._dynamo.reset()
    x = torch.ones(4096, requires_grad=True)
    compiled = torch.compile(_two_dropouts, fullgraph=True)
    torch.manual_seed(11)
    eager = _two_dropouts(x)
    eager.sum().backward()
    eager_grad = x.grad.clone()
    x.grad = None
    torch.manual_seed(11)
    got = compiled(x)
    got.sum().backward()
    assert torch.equal(got, eager) and torch.equal(x.grad, eager_grad)
    first = got.detach() % 3 != 0  # the first mask contributes 2, the second 6
    second = got.detach() >= 6
    assert_binomial((first == second).sum().item(), 4096, 0.5, "agreement of the two masks")


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("kind", ["seed", "offset", "fused seed"])
def test_compile_with_a_new_seed_each_call_compiles_at_most_twice(backend, kind):
    """The ops take seed and offset as SymInt, so a training loop that passes a new seed each
    step gets one graph for the first value and one dynamic graph for all others (as torch's
    own ops with integer arguments do), not a graph per seed until Dynamo's cache limit."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    x = torch.randn(64, requires_grad=True)
    bias, residual = torch.randn(8), torch.randn(64).view(8, 8)
    calls = {
        "seed": lambda t, s: fastdropout.dropout(t, 0.1, seed=s),
        "offset": lambda t, s: fastdropout.dropout(t, 0.1, seed=7, offset=s),
        "fused seed": lambda t, s: fastdropout.bias_dropout_add(t.view(8, 8), bias, residual, 0.1, seed=s),
    }
    f = torch.compile(calls[kind], backend=counter)
    for s in (3, 10, 2**40 + 1, 2**62 + 5, 12345):
        got = f(x, s)
        want = calls[kind](x, s)
        assert torch.equal(got, want), s
        got.sum().backward()
    assert counter.frame_count <= 2
