"""Dropout outputs regenerated in backward (fastdropout.regenerate_dropout_outputs and
replace_dropout(model, regenerate=True)): the same gradients bit for bit, the bytes of a model
without dropout, errors instead of wrong gradients, and every autograd feature torch's dropout
works with."""
import pytest
import torch

import fastdropout
from conftest import bits_equal
from fastdropout import regenerate as regen

P = 0.25
STATE = 16  # bytes: the (seed, offset) a dropout's own backward keeps


def in_scope(step):
    """``step`` run inside a regeneration scope (opened inside whatever hooks are outside)."""
    def run():
        with fastdropout.regenerate_dropout_outputs():
            return step()
    return run


def saved(step):
    """(device, data pointer) -> bytes of every storage autograd keeps for backward while
    ``step`` runs (an outer saved-tensor hook: a scope under test composes with it), and step's
    result."""
    storages = {}

    def pack(t):
        storages[(t.device, t.untyped_storage().data_ptr())] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    return storages, out


def saved_bytes(step):
    """The bytes :func:`saved` finds, each storage once, and step's result."""
    storages, out = saved(step)
    return sum(storages.values()), out


def attention(q, v, p=P, seed=7):
    """The eager-attention pattern: softmax keeps probs, the matmul keeps dropout(probs)."""
    probs = q.softmax(-1)
    return (fastdropout.dropout(probs, p, seed=seed) @ v).square().sum()


def inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, 16, 16, generator=g).to(dtype).requires_grad_()
    v = torch.randn(2, 3, 16, 8, generator=g).to(dtype).requires_grad_()
    return q, v


def grads_of(step, leaves, **kw):
    return torch.autograd.grad(step(), leaves, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_same_gradients_and_the_bytes_of_no_dropout(dtype):
    q, v = inputs(dtype=dtype)
    want = grads_of(lambda: attention(q, v), (q, v))
    kept, _ = saved_bytes(lambda: attention(q, v))
    without_dropout, _ = saved_bytes(lambda: attention(q, v, p=0.0))
    regenerated, loss = saved_bytes(in_scope(lambda: attention(q, v)))
    got = torch.autograd.grad(loss, (q, v))
    assert all(bits_equal(a, b) for a, b in zip(want, got))
    probs = q.numel() * q.element_size()
    assert kept == without_dropout + probs + STATE  # the dropout output, kept by the matmul
    assert regenerated == without_dropout + STATE


def test_views_layouts_and_channels_are_regenerated_bit_for_bit():
    torch.manual_seed(0)
    base = torch.randn(4, 6, 10, 12)
    cases = {
        "contiguous": (lambda t: fastdropout.dropout(t, P, seed=1), lambda d: d),
        "transposed view saved": (lambda t: fastdropout.dropout(t, P, seed=1), lambda d: d.transpose(-1, -2)),
        "slice saved": (lambda t: fastdropout.dropout(t, P, seed=1), lambda d: d[:, 2:5, 1:]),
        "permuted input": (lambda t: fastdropout.dropout(t.permute(0, 2, 3, 1), P, seed=2), lambda d: d),
        "channels": (lambda t: fastdropout.dropout2d(t, P, seed=3), lambda d: d),
        "channels_last": (lambda t: fastdropout.dropout2d(t.contiguous(memory_format=torch.channels_last), P, seed=4),
                          lambda d: d),
    }
    for name, (drop, view) in cases.items():
        x = base.clone().requires_grad_()
        w = torch.randn(view(drop(base)).shape[-1], 5, requires_grad=True)
        outputs = []

        def step():
            d = drop(x * 1)
            outputs.append(d)
            return (view(d) @ w).square().sum()

        want = torch.autograd.grad(step(), (x, w))
        storages, loss = saved(in_scope(step))
        assert (outputs[-1].device, outputs[-1].untyped_storage().data_ptr()) not in storages, name  # not kept
        got = torch.autograd.grad(loss, (x, w))
        assert all(bits_equal(a, b) for a, b in zip(want, got)), name


def test_input_changed_in_place_after_the_call_raises():
    q, v = inputs()
    with fastdropout.regenerate_dropout_outputs():
        probs = q.softmax(-1).detach()  # nothing else keeps or checks it
        loss = (fastdropout.dropout(probs, P, seed=1) @ v).sum()
    probs.mul_(2)
    with pytest.raises(RuntimeError, match="fastdropout: .*modified by an in-place operation"):
        loss.backward()


def test_output_changed_in_place_before_it_is_saved_is_kept():
    q, v = inputs()

    def step():
        d = fastdropout.dropout(q.softmax(-1), P, seed=5)
        d.mul_(3)  # the matmul saves this, not the dropout of probs
        return (d @ v).sum()

    want = grads_of(step, (q, v))
    with fastdropout.regenerate_dropout_outputs():
        loss = step()
    assert all(bits_equal(a, b) for a, b in zip(want, torch.autograd.grad(loss, (q, v))))


def test_input_that_views_a_larger_storage_keeps_the_output():
    q, v = inputs()
    big = torch.randn(4, 3, 16, 16)
    kept, _ = saved_bytes(in_scope(lambda: (fastdropout.dropout(big[:2], P, seed=1) @ v).sum()))
    out_bytes = 2 * 3 * 16 * 16 * 4
    assert kept == out_bytes  # the output itself (the matmul's only saved tensor), not big


def test_nothing_kept_for_outputs_no_op_saves():
    import weakref
    x = torch.randn(1000)
    x_alive = weakref.ref(x)
    with fastdropout.regenerate_dropout_outputs():
        y = fastdropout.dropout(x, P, seed=1)
    assert len(regen._recipes) == 1
    del y
    assert regen._recipes == {}  # the recipe (and its reference to x) went with the output
    del x
    assert x_alive() is None


def test_backward_twice_with_retain_graph_and_double_backward():
    q, v = inputs()

    def step():
        return attention(q, v)

    want1 = grads_of(step, (q, v), create_graph=True)
    want2 = torch.autograd.grad(sum(g.square().sum() for g in want1), (q, v))
    with fastdropout.regenerate_dropout_outputs():
        loss = step()
    first = torch.autograd.grad(loss, (q, v), retain_graph=True)
    again = torch.autograd.grad(loss, (q, v), create_graph=True)
    second = torch.autograd.grad(sum(g.square().sum() for g in again), (q, v))
    assert all(bits_equal(a, b) for a, b in zip(want1, first))
    assert all(bits_equal(a, b) for a, b in zip(want1, again))
    assert all(bits_equal(a, b) for a, b in zip(want2, second))


def test_torch_func_inside_and_around():
    q, v = inputs()

    def f(q_, v_):
        with fastdropout.regenerate_dropout_outputs():  # refused hooks: the scope does nothing
            return attention(q_, v_)

    want = grads_of(lambda: attention(q, v), (q, v))
    got = torch.func.grad(f, argnums=(0, 1))(q.detach(), v.detach())
    assert all(bits_equal(a, b) for a, b in zip(want, got))
    _, vjp_fn = torch.func.vjp(f, q.detach(), v.detach())
    assert all(bits_equal(a, b) for a, b in zip(want, vjp_fn(torch.tensor(1.0))))
    with fastdropout.regenerate_dropout_outputs():  # torch refuses hooks around its transforms
        with pytest.raises(RuntimeError, match="saved tensor hooks"):
            torch.func.grad(attention)(q.detach(), v.detach())


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("where", ["scope outside", "scope inside"])
def test_checkpoint(reentrant, where):
    from torch.utils.checkpoint import checkpoint
    q, v = inputs()
    want = grads_of(lambda: attention(q, v), (q, v))

    def block(q_, v_):
        if where == "scope inside":
            with fastdropout.regenerate_dropout_outputs():
                return attention(q_, v_)
        return attention(q_, v_)

    if where == "scope outside":
        with fastdropout.regenerate_dropout_outputs():
            checkpoint(block, q, v, use_reentrant=reentrant).backward()
    else:
        checkpoint(block, q, v, use_reentrant=reentrant).backward()
    got = (q.grad, v.grad)
    assert all(bits_equal(a, b) for a, b in zip(want, got))


def test_save_on_cpu_around_and_inside():
    q, v = inputs()
    want = grads_of(lambda: attention(q, v), (q, v))
    with torch.autograd.graph.save_on_cpu():
        with fastdropout.regenerate_dropout_outputs():  # composes: the input goes to save_on_cpu
            loss = attention(q, v)
    assert all(bits_equal(a, b) for a, b in zip(want, torch.autograd.grad(loss, (q, v))))
    with fastdropout.regenerate_dropout_outputs():
        with torch.autograd.graph.save_on_cpu():  # innermost: acts alone, keeps the output
            loss = attention(q, v)
    assert all(bits_equal(a, b) for a, b in zip(want, torch.autograd.grad(loss, (q, v))))


def test_user_hooks_outside_see_the_input_not_the_output():
    q, v = inputs()
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with fastdropout.regenerate_dropout_outputs():
            loss = attention(q, v)
    probs_bytes = q.numel() * q.element_size()
    ptrs = {t.untyped_storage().data_ptr() for t in packed if t.untyped_storage().nbytes() == probs_bytes}
    assert len(ptrs) == 1  # softmax's output and the input kept for the dropout: one storage
    loss.backward()


def test_autocast_cpu():
    q, v = inputs()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return attention(q, v).float()

    want = grads_of(step, (q, v))
    with fastdropout.regenerate_dropout_outputs():
        loss = step()
    assert all(bits_equal(a, b) for a, b in zip(want, torch.autograd.grad(loss, (q, v))))


def test_ddp_single_process(tmp_path):
    import torch.distributed as dist
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        inner = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Dropout(P), torch.nn.Linear(32, 4))
        fastdropout.replace_dropout(inner)
        ddp = torch.nn.parallel.DistributedDataParallel(inner)
        x = torch.randn(8, 16)
        torch.manual_seed(3)
        ddp(x).square().sum().backward()
        want = [p.grad.clone() for p in inner.parameters()]
        inner.zero_grad()
        fastdropout.replace_dropout(inner, regenerate=True)
        torch.manual_seed(3)
        ddp(x).square().sum().backward()
        assert all(bits_equal(a, p.grad) for a, p in zip(want, inner.parameters()))
        fastdropout.unroute_functional_dropout(inner)
    finally:
        dist.destroy_process_group()


def test_replace_dropout_regenerate_is_scoped_to_forward_and_undone():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Dropout(P), torch.nn.Linear(256, 8))
    fastdropout.replace_dropout(model)
    x = torch.randn(32, 64)

    def step():
        torch.manual_seed(1)
        return model(x).square().sum()

    kept, loss = saved_bytes(step)
    want = torch.autograd.grad(loss, list(model.parameters()))
    fastdropout.replace_dropout(model, regenerate=True)
    fastdropout.replace_dropout(model, regenerate=True)  # idempotent
    regenerated, loss = saved_bytes(step)
    got = torch.autograd.grad(loss, list(model.parameters()))
    assert all(bits_equal(a, b) for a, b in zip(want, got))
    # The second Linear keeps dropout(h) without regeneration, h (kept by nobody else) with it:
    assert regenerated == kept
    assert not regen.recording()  # the scope closed with the forward
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 3))  # a failing forward closes its scope too
    assert not regen.recording()
    assert fastdropout.unroute_functional_dropout(model) == 0
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_compiled_model_in_scope_matches_eager():
    torch._dynamo.reset()
    q, v = inputs()
    compiled = torch.compile(attention, fullgraph=True, backend="aot_eager")
    want = grads_of(lambda: attention(q, v), (q, v))
    with fastdropout.regenerate_dropout_outputs():
        loss = compiled(q, v)
    assert all(bits_equal(a, b) for a, b in zip(want, torch.autograd.grad(loss, (q, v))))


class _SeededBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(32, 64), torch.nn.Linear(64, 4)

    def forward(self, x, seed):
        return self.b(fastdropout.dropout(self.a(x), P, seed=seed))  # b saves the dropout output


def test_one_model_scope_entered_from_several_threads():
    """replace_dropout(model, regenerate=True) shares one scope object between the threads
    that call the model: each thread opens and closes its own hooks, and every thread's
    gradients are those without regeneration."""
    import threading
    torch.manual_seed(0)
    model = _SeededBlock()
    x = torch.randn(16, 32)
    want = {seed: torch.autograd.grad(model(x, seed).square().sum(), list(model.parameters()))
            for seed in range(4)}
    fastdropout.replace_dropout(model, regenerate=True)
    errors = []

    def worker(seed):
        try:
            for _ in range(10):
                loss = model(x, seed).square().sum()
                assert not regen.recording()  # this thread's scope closed with the forward
                grads = torch.autograd.grad(loss, list(model.parameters()))
                assert all(bits_equal(a, b) for a, b in zip(want[seed], grads))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    fastdropout.unroute_functional_dropout(model)
