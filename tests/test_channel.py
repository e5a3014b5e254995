"""Channel dropout (Dropout1d/2d/3d): whole channels, the mask of index n * C + c."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastdropout
import reference
from conftest import FLOAT_DTYPES, bits_equal, devices
from stats import assert_binomial

CASES = [
    (fastdropout.dropout1d, F.dropout1d, (4, 6, 10)),
    (fastdropout.dropout2d, F.dropout2d, (3, 5, 7, 9)),
    (fastdropout.dropout3d, F.dropout3d, (2, 4, 3, 5, 6)),
    (fastdropout.dropout2d, F.dropout2d, (4, 6, 10)),  # torch treats 3-D as (N, C, L)
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("fn,torch_fn,shape", CASES)
def test_matches_reference(device, dtype, fn, torch_fn, shape):
    x = torch.randn(shape, device=device).to(dtype)
    got = fn(x, 0.4, seed=17, offset=2)
    assert bits_equal(got, reference.channel_dropout(x, 0.4, 17, 2))
    # Same structure as torch's: each (n, c) channel all zero or all scaled.
    ref = torch_fn(x, 0.4)
    assert got.shape == ref.shape


@pytest.mark.parametrize("fn,batched", [(fastdropout.dropout1d, (6, 10)), (fastdropout.dropout3d, (4, 3, 5, 6))])
def test_unbatched_inputs_use_channel_index(fn, batched):
    x = torch.randn(batched)
    got = fn(x, 0.5, seed=9)
    assert got.shape == x.shape
    assert torch.equal(got, reference.channel_dropout(x.unsqueeze(0), 0.5, 9).squeeze(0))


def test_whole_channels_dropped_at_the_right_rate():
    n, c = 64, 256
    x = torch.ones(n, c, 4, 4)
    torch.manual_seed(0)
    y = fastdropout.dropout2d(x, 0.3)
    per_channel = y.view(n, c, -1)
    assert ((per_channel == 0).all(-1) | (per_channel != 0).all(-1)).all()
    assert_binomial(int((per_channel[..., 0] != 0).sum()), n * c, 0.7, "kept channels")


def test_backward_and_inplace():
    x = torch.randn(3, 5, 8, requires_grad=True)
    y = fastdropout.dropout1d(x, 0.5, seed=4)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, reference.channel_dropout(torch.ones(3, 5, 8), 0.5, 4))
    z = torch.randn(3, 5, 8)
    want = reference.channel_dropout(z, 0.5, 4)
    assert fastdropout.dropout1d(z, 0.5, inplace=True, seed=4) is z and torch.equal(z, want)
    w = torch.randn(5, 8)
    want = reference.channel_dropout(w.unsqueeze(0), 0.5, 4).squeeze(0)
    assert fastdropout.dropout1d(w, 0.5, inplace=True, seed=4) is w and torch.equal(w, want)


def test_modules_drop_in():
    for ours, theirs in [(fastdropout.Dropout1d, torch.nn.Dropout1d), (fastdropout.Dropout2d, torch.nn.Dropout2d),
                         (fastdropout.Dropout3d, torch.nn.Dropout3d)]:
        m, r = ours(0.2), theirs(0.2)
        assert isinstance(m, theirs) and repr(m) == repr(r) and m.state_dict() == {}
        m.eval()
        x = torch.randn(2, 3, 4, 4, 4) if ours is fastdropout.Dropout3d else torch.randn(2, 3, 4, 4) \
            if ours is fastdropout.Dropout2d else torch.randn(2, 3, 4)
        assert m(x) is x


def _outcome(fn, x, p=0.5, training=True, **kw):
    """(exception type or None, the warnings' first 100 characters, output) of one call."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out, err = fn(x, p, training, **kw), None
        except Exception as e:  # noqa: BLE001 - the type is what is compared
            out, err = None, type(e)
    return err, sorted(str(w.message)[:100] for w in caught), out


@pytest.mark.parametrize("ours,theirs,batched_rank", [
    (fastdropout.dropout1d, F.dropout1d, 3), (fastdropout.dropout2d, F.dropout2d, None),
    (fastdropout.dropout3d, F.dropout3d, 5)])
@pytest.mark.parametrize("rank", range(7))
@pytest.mark.parametrize("p,training", [(0.5, True), (1.0, True), (0.5, False)])
def test_every_rank_accepted_warned_or_rejected_as_torch(ours, theirs, batched_rank, rank, p, training):
    """Same exception type, same warnings (their first 100 characters: the part torch's tests match), and
    the same channel structure: the contract's mask over torch's channels for that rank."""
    x = torch.randn([4, 5, 3, 2, 2, 2][:rank])
    our_err, our_warnings, got = _outcome(ours, x, p, training, seed=21)
    torch_err, torch_warnings, want_shape = _outcome(theirs, x, p, training)
    assert our_err is torch_err
    assert our_warnings == torch_warnings
    if our_err is not None:
        return
    assert got.shape == want_shape.shape == x.shape
    if not training:
        assert torch.equal(got, x)
        return
    # torch adds a batch dimension of 1 to every rank but the batched one (dropout2d: never).
    view = x if batched_rank in (None, rank) else x.unsqueeze(0)
    expected = reference.channel_dropout(view, p, 21) if view.dim() >= 2 else torch.zeros_like(view)
    assert torch.equal(got, expected.view(x.shape))


def test_dropout1d_rank_error_is_torchs():
    for shape in [(2, 3, 4, 5), (2,)]:
        with pytest.raises(RuntimeError, match=f"Expected 2D or 3D input, but received a {len(shape)}D input"):
            fastdropout.dropout1d(torch.randn(shape), 0.5)
        with pytest.raises(RuntimeError, match=f"Expected 2D or 3D input, but received a {len(shape)}D input"):
            fastdropout.Dropout1d(0.5)(torch.randn(shape))


def test_feature_dropout_rank_error_is_torchs():
    with pytest.raises(RuntimeError, match="Feature dropout requires at least 2 dimensions in the input"):
        fastdropout.feature_dropout(torch.randn(5), 0.5)
    assert (fastdropout.feature_dropout(torch.randn(5), 1.0) == 0).all()  # p = 1 draws nothing
