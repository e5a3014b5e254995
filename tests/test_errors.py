"""Bad input gets a clear Python error naming the argument, never a crash or a wrong tensor.
Each row of the README's table of rejected inputs has a test here."""
import math

import pytest
import torch

import fastdropout

X = torch.randn(4, 8)


@pytest.mark.parametrize("p", [-0.1, 1.0001, float("nan"), float("inf"), -float("inf")])
def test_p_out_of_range(p):
    for call in (lambda: fastdropout.dropout(X, p), lambda: fastdropout.Dropout(p),
                 lambda: fastdropout.dropout2d(torch.randn(2, 3, 4, 4), p),
                 lambda: fastdropout.bias_dropout_add(X, None, X, p),
                 lambda: fastdropout.dropout_mask(8, p, seed=0),
                 lambda: fastdropout.BiasDropoutAdd(p)):
        with pytest.raises(ValueError, match=r"between 0 and 1.*\(argument p\)|between 0 and 1"):
            call()


@pytest.mark.parametrize("p", ["0.5", None, True, [0.5], torch.tensor([0.5]), torch.tensor(True)])
def test_p_not_a_number(p):
    with pytest.raises(TypeError, match="p must be a float"):
        fastdropout.dropout(X, p)


@pytest.mark.parametrize("p", [torch.tensor(0.25), torch.tensor(0.25, dtype=torch.float64),
                               torch.tensor(0), torch.tensor(1)])
def test_p_as_a_0_dim_tensor_is_its_value(p):
    """torch.nn.functional.dropout takes a 0-dim tensor p; so does every fastdropout call."""
    value = p.item()
    assert torch.equal(fastdropout.dropout(X, p, seed=3), fastdropout.dropout(X, value, seed=3))
    assert fastdropout.Dropout(p).p == value
    assert torch.equal(fastdropout.dropout2d(X.view(2, 2, -1), p, seed=3),
                       fastdropout.dropout2d(X.view(2, 2, -1), value, seed=3))
    with pytest.raises(ValueError, match="between 0 and 1"):
        fastdropout.dropout(X, torch.tensor(1.5))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_non_float_dtypes(dtype):
    x = torch.zeros(4, dtype=dtype)
    with pytest.raises(TypeError, match="x must be float32, float64, float16 or bfloat16"):
        fastdropout.dropout(x, 0.5)
    with pytest.raises(TypeError, match="x must be float32"):
        fastdropout.bias_dropout_add(x, None, x, 0.5)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fastdropout.dropout([1.0, 2.0], 0.5)


def test_sparse_and_meta():
    with pytest.raises(TypeError, match="dense"):
        fastdropout.dropout(X.to_sparse(), 0.5)
    with pytest.raises(ValueError, match="CPU or CUDA device"):
        fastdropout.dropout(torch.empty(4, device="meta"), 0.5)


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, "7", True])
def test_seed_out_of_range(seed):
    with pytest.raises((ValueError, TypeError), match="seed must be"):
        fastdropout.dropout(X, 0.5, seed=seed)
    with pytest.raises((ValueError, TypeError), match="seed must be"):
        fastdropout.dropout_mask(8, 0.5, seed=seed)


@pytest.mark.parametrize("offset", [-1, 2**64])
def test_offset_out_of_range(offset):
    with pytest.raises(ValueError, match="offset must be in"):
        fastdropout.dropout(X, 0.5, seed=1, offset=offset)


def test_seed_edge_values_are_accepted():
    for seed in (0, 2**63 - 1, 2**63, 2**64 - 1):
        fastdropout.dropout(X, 0.5, seed=seed, offset=2**64 - 1)


def test_offset_without_seed_and_seed_with_generator():
    with pytest.raises(ValueError, match="offset is only used together with seed"):
        fastdropout.dropout(X, 0.5, offset=3)
    with pytest.raises(ValueError, match="either seed= or generator="):
        fastdropout.dropout(X, 0.5, seed=1, generator=torch.Generator())


def test_bad_generator():
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        fastdropout.dropout(X, 0.5, generator=123)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="generator is on"):
            fastdropout.dropout(X.cuda(), 0.5, generator=torch.Generator())
        with pytest.raises(ValueError, match="generator is on"):
            fastdropout.dropout(X, 0.5, generator=torch.Generator(device="cuda"))


def test_inplace_on_leaf_requiring_grad():
    x = torch.randn(8, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf"):
        fastdropout.dropout(x, 0.5, inplace=True)
    with torch.no_grad():  # allowed, as for torch
        fastdropout.dropout(x, 0.5, inplace=True)


def test_inplace_on_overlapping_memory():
    x = torch.randn(1).expand(8)
    with pytest.raises(RuntimeError, match="more than one element"):
        fastdropout.dropout(x, 0.5, inplace=True)


def test_bias_and_residual_mismatches():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="bias must be 1-D with x.shape\\[-1\\]"):
        fastdropout.bias_dropout_add(x, torch.randn(7), x, 0.1)
    with pytest.raises(ValueError, match="bias must be 1-D"):
        fastdropout.bias_dropout_add(x, torch.randn(4, 8), x, 0.1)
    with pytest.raises(ValueError, match="bias must have x's dtype"):
        fastdropout.bias_dropout_add(x, torch.randn(8, dtype=torch.float64), x, 0.1)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        fastdropout.bias_dropout_add(x, None, torch.randn(4, 9), 0.1)
    with pytest.raises(ValueError, match="residual must have x's shape, dtype"):
        fastdropout.bias_dropout_add(x, None, x.half(), 0.1)
    with pytest.raises(ValueError, match="bias must be 1-D"):
        fastdropout.bias_dropout_add(torch.tensor(1.0), torch.randn(1), torch.tensor(1.0), 0.1)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="device"):
            fastdropout.bias_dropout_add(x.cuda(), None, x, 0.1)


def test_dropout_mask_arguments():
    with pytest.raises(ValueError, match="shape must be non-negative ints"):
        fastdropout.dropout_mask((2, -1), 0.5, seed=0)
    with pytest.raises(TypeError, match="explicit seed"):
        fastdropout.dropout_mask(8, 0.5, seed=None)
    with pytest.raises(ValueError, match="CPU or CUDA"):
        fastdropout.dropout_mask(8, 0.5, seed=0, device="meta")


def test_replace_dropout_needs_a_module():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        fastdropout.replace_dropout("not a model")


def test_raw_ops_check_their_arguments_too():
    """The C++ operators validate on their own: a direct call cannot crash the process."""
    ops = torch.ops.fastdropout
    with pytest.raises(RuntimeError, match="rng_state"):
        ops.dropout_backward(X, torch.zeros(3, dtype=torch.int64), 0.5)
    with pytest.raises(RuntimeError, match="rng_state"):
        ops.dropout_mask(torch.zeros(2, dtype=torch.int32), 4, 0.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        ops.dropout(X, 2.0)
    with pytest.raises(RuntimeError, match="must be float32"):
        ops.dropout(torch.zeros(3, dtype=torch.int64), 0.5)
    with pytest.raises(RuntimeError, match="channel_numel"):
        ops.dropout(X, 0.5, None, 0, None, 0)
    with pytest.raises(RuntimeError, match="numel must be >= 0"):
        ops.dropout_mask(torch.zeros(2, dtype=torch.int64), -1, 0.5)
    with pytest.raises(RuntimeError, match="bias must be 1-d"):
        ops.bias_dropout_add(X, torch.randn(3), X, 0.5)


@pytest.mark.parametrize("shape", [(0,), (3, 0, 2), ()])
def test_empty_and_zero_dim_never_crash(shape):
    x = torch.randn(shape)
    y = fastdropout.dropout(x, 0.5)
    assert y.shape == x.shape
    assert fastdropout.dropout_mask(shape, 0.5, seed=1).shape == torch.Size(shape)
    ops = torch.ops.fastdropout
    out, rng = ops.dropout(x, 0.5, 3, 0)
    assert out.shape == x.shape and rng.tolist() == [3, 0]
    if x.dim() > 0:
        r = fastdropout.bias_dropout_add(x, torch.randn(shape[-1]), x, 0.5, seed=1)
        assert r.shape == x.shape
        xg = x.clone().requires_grad_()
        bg = torch.randn(shape[-1], requires_grad=True)
        fastdropout.bias_dropout_add(xg, bg, x, 0.5, seed=1).sum().backward()
        assert bg.grad.shape == (shape[-1],) and (bg.grad == 0).all()


def test_channel_dropout_ranks_raise_and_warn_as_torch():
    """torch's exception types and first words, with fastdropout's detail naming x."""
    with pytest.raises(RuntimeError, match=r"dropout1d: Expected 2D or 3D input, but received a 4D input.*\bx\b"):
        fastdropout.dropout1d(torch.randn(2, 3, 4, 5), 0.5)
    with pytest.raises(RuntimeError, match=r"Feature dropout requires at least 2 dimensions in the input.*\bx\b"):
        fastdropout.feature_dropout(torch.randn(4), 0.5)
    with pytest.warns(UserWarning, match="Received a 5-D input to dropout2d, which is deprecated"):
        assert fastdropout.dropout2d(torch.randn(2, 3, 2, 2, 2), 0.5).shape == (2, 3, 2, 2, 2)
    with pytest.warns(UserWarning, match="Received a 6-D input to dropout3d, which is deprecated"):
        fastdropout.dropout3d(torch.randn(2, 3, 2, 2, 2, 2), 0.5)
