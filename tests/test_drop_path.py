"""drop_path / DropPath: timm's semantics with the contract's per-sample mask; replace_dropout
swaps timm's DropPath."""
import doctest

import pytest
import torch
from torch import nn

import fastdropout
from conftest import FLOAT_DTYPES, devices
from stats import assert_binomial


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_sample_n_is_kept_iff_the_contract_keeps_index_n(device, dtype):
    p, seed, offset = 0.3, 987654321, 5
    x = torch.randn(257, 3, 5, device=device).to(dtype)
    out = fastdropout.drop_path(x, p, training=True, seed=seed, offset=offset)
    keep = fastdropout.dropout_mask(257, p, seed, offset, device=device)
    kept_rows = (out != 0).flatten(1).any(1)
    assert torch.equal(kept_rows, keep & (x != 0).flatten(1).any(1))
    assert (out[~keep] == 0).all()
    # a kept sample is x times the contract's scale: float32 1/(1-p), product rounded once
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)
    want = (x[keep].float() * scale).to(dtype) if dtype != torch.float64 else x[keep] * (1.0 / (1.0 - p))
    if dtype in (torch.float32, torch.float64):
        assert torch.equal(out[keep], want)
    else:  # the factor is rounded to the dtype first, as timm's random tensor is
        torch.testing.assert_close(out[keep], want, rtol=2 * torch.finfo(dtype).eps, atol=0)


def test_without_scale_by_keep_kept_samples_are_unchanged():
    x = torch.randn(500, 7)
    out = fastdropout.drop_path(x, 0.4, training=True, scale_by_keep=False, seed=3)
    keep = fastdropout.dropout_mask(500, 0.4, 3)
    assert torch.equal(out[keep], x[keep]) and (out[~keep] == 0).all()


def test_identity_cases_return_x_itself():
    x = torch.randn(8, 4)
    assert fastdropout.drop_path(x, 0.5, training=False) is x
    assert fastdropout.drop_path(x, 0.0, training=True) is x
    assert fastdropout.drop_path(x) is x  # timm's default: training=False
    assert (fastdropout.drop_path(x, 1.0, training=True) == 0).all()
    empty = torch.empty(0, 4)
    assert fastdropout.drop_path(empty, 0.5, training=True).shape == (0, 4)


def test_keep_rate_is_binomial():
    n, p = 200_000, 0.15
    out = fastdropout.drop_path(torch.ones(n, 2), p, training=True)
    kept = int((out[:, 0] != 0).sum())
    assert_binomial(kept, n, 1 - round(p * 65536) / 65536, "kept samples")


def test_gradient_is_the_per_sample_factor_and_layouts_agree():
    x = torch.randn(64, 6, 5, requires_grad=True)
    out = fastdropout.drop_path(x, 0.25, training=True, seed=42)
    out.backward(torch.ones_like(out))
    factor = fastdropout.dropout(torch.ones(64), 0.25, seed=42)
    assert torch.equal(x.grad, factor.view(64, 1, 1).expand_as(x))
    # a transposed (non-contiguous) view gets the same per-sample mask
    xt = x.detach().transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(fastdropout.drop_path(xt, 0.25, training=True, seed=42), out.detach())


def test_generator_and_offset_change_the_mask_reproducibly():
    x = torch.ones(4096, 1)
    a = fastdropout.drop_path(x, 0.5, training=True, seed=1, offset=0)
    b = fastdropout.drop_path(x, 0.5, training=True, seed=1, offset=1)
    assert not torch.equal(a, b)
    g1, g2 = torch.Generator().manual_seed(8), torch.Generator().manual_seed(8)
    assert torch.equal(fastdropout.drop_path(x, 0.5, True, generator=g1),
                       fastdropout.drop_path(x, 0.5, True, generator=g2))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="between 0 and 1"):
        fastdropout.drop_path(torch.ones(4), 1.5, training=True)
    with pytest.raises(ValueError, match="between 0 and 1"):
        fastdropout.DropPath(-0.1)
    with pytest.raises(ValueError, match="batch dimension"):
        fastdropout.drop_path(torch.tensor(1.0), 0.5, training=True)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fastdropout.drop_path([1.0, 2.0], 0.5, training=True)
    with pytest.raises(TypeError, match="x must be float32"):
        fastdropout.drop_path(torch.ones(4, dtype=torch.int64), 0.5, training=True)


def test_module_follows_train_eval_and_has_no_state():
    layer = fastdropout.DropPath(0.5)
    assert repr(layer) == "DropPath(drop_prob=0.500)" and layer.state_dict() == {}
    x = torch.randn(32, 4)
    assert layer.eval()(x) is x
    torch.manual_seed(2)
    y = layer.train()(x)
    torch.manual_seed(2)
    assert torch.equal(y, fastdropout.drop_path(x, 0.5, training=True))


def test_docstring_example():
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder().find(fastdropout.drop_path, "drop_path",
                                              globs={"torch": torch, "fastdropout": fastdropout}):
        runner.run(test)
    assert runner.tries > 0 and runner.failures == 0


# --- against timm ---------------------------------------------------------------------------

def test_same_semantics_as_timm():
    timm_drop = pytest.importorskip("timm.layers.drop")
    x = torch.randn(20_000, 3)
    for scale_by_keep in (True, False):
        torch.manual_seed(0)
        theirs = timm_drop.drop_path(x, 0.2, True, scale_by_keep)
        ours = fastdropout.drop_path(x, 0.2, True, scale_by_keep)
        both = ((theirs != 0) & (ours != 0)).all(1)
        # where both keep a sample, the values agree to a unit in the last place of fp32
        torch.testing.assert_close(ours[both], theirs[both], rtol=2 ** -23, atol=0)
        # and both keep a binomial share of samples (5 sigma each)
        for out in (theirs, ours):
            assert_binomial(int((out != 0).all(1).sum()), x.shape[0], 0.8, "kept samples")
    assert fastdropout.drop_path(x, 0.2, False) is x and timm_drop.drop_path(x, 0.2, False) is x


def test_replace_dropout_swaps_timm_drop_path_exactly():
    timm_drop = pytest.importorskip("timm.layers.drop")

    class MyDropPath(timm_drop.DropPath):
        """A user's subclass: left alone."""

    model = nn.Sequential(nn.Linear(4, 4), timm_drop.DropPath(0.1, scale_by_keep=False),
                          nn.Sequential(timm_drop.DropPath(0.2), nn.Dropout(0.3)), MyDropPath(0.4),
                          nn.Identity())
    model[2].eval()
    replaced, skipped = [], []
    fastdropout.replace_dropout(model, replaced=replaced, skipped=skipped)
    assert replaced == ["1", "2.0", "2.1"] and skipped == ["3"]
    assert type(model[1]) is fastdropout.DropPath and model[1].drop_prob == 0.1 and not model[1].scale_by_keep
    assert type(model[2][0]) is fastdropout.DropPath and model[2][0].scale_by_keep and not model[2][0].training
    assert repr(model[2][0]) == repr(timm_drop.DropPath(0.2))
    assert type(model[3]) is MyDropPath and type(model[4]) is nn.Identity
    with pytest.raises(ValueError, match="construct DropPath directly"):
        fastdropout.replace_dropout(timm_drop.DropPath(0.1))
