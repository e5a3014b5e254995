"""route_functional_dropout: which calls it reaches, what it leaves alone, undo, nesting,
threads, torch.compile and torch.utils.checkpoint (no third-party model code needed)."""
import logging
import threading

import pytest
import torch
import torch.nn.functional as torch_F
from torch import nn

import fastdropout
import routing_elsewhere
import routing_target
from dropout_counter import DropoutCalls


def _originals():
    return routing_target.nn, routing_target.F, routing_target.dropout3d


def _assert_torch_objects_back():
    assert routing_target.nn is nn
    assert routing_target.F is torch_F
    assert routing_target.dropout3d is torch_F.dropout3d


def test_routed_calls_are_fastdropout_calls_with_the_same_arguments():
    x = torch.randn(64, 8)
    with fastdropout.route_functional_dropout(routing_target) as route:
        assert route.modules == ("routing_target",)
        with DropoutCalls() as calls:
            torch.manual_seed(11)
            got = routing_target.routed_calls(x, 0.25)
        assert calls.torch == 0 and calls.fastdropout == 4
        torch.manual_seed(11)
        want = (fastdropout.dropout(x, 0.25), fastdropout.dropout1d(x.view(4, 8, -1), 0.25),
                fastdropout.dropout2d(x.view(2, 4, 4, -1), 0.25), fastdropout.dropout3d(x.view(2, 4, 2, 2, -1), 0.25))
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        # training=False behaves as torch's: values unchanged, dropout's own input returned
        outs = routing_target.routed_calls(x, 0.25, training=False)
        assert outs[0] is x and all(torch.equal(o.reshape(x.shape), x) for o in outs)
    _assert_torch_objects_back()


def test_alpha_variants_and_calls_through_torch_keep_torch():
    x = torch.randn(64, 8)
    with fastdropout.route_functional_dropout(routing_target):
        with DropoutCalls() as calls:
            routing_target.unrouted_calls(x, 0.25)
        assert calls.fastdropout == 0 and calls.torch == 3


def test_code_outside_the_route_is_untouched():
    x = torch.randn(64, 8)
    with fastdropout.route_functional_dropout(routing_target.Block()):
        assert torch_F.dropout is not routing_target.nn.functional.dropout
        assert routing_elsewhere.nn is nn and torch.nn.functional is torch_F
        with DropoutCalls() as calls:
            routing_elsewhere.helper_dropout(x, 0.5)  # another module's code
            nn.Dropout(0.5)(x)                        # torch's own module
            torch_F.dropout(x, 0.5)                   # torch's function, called directly
        assert calls.fastdropout == 0 and calls.torch == 3


def test_model_target_routes_its_code_only_and_unroute_undoes_it():
    torch.manual_seed(0)
    model = nn.Sequential(routing_target.Block(), nn.Linear(32, 32))
    routed, replaced = [], []
    fastdropout.replace_dropout(model, functional=True, routed=routed, replaced=replaced)
    assert routed == ["routing_target"] and replaced == ["0.drop"]
    with DropoutCalls() as calls:
        model(torch.randn(4, 16, 32)).sum().backward()
    assert calls.torch == 0 and calls.fastdropout == 2
    assert fastdropout.unroute_functional_dropout(model) == 1
    assert fastdropout.unroute_functional_dropout(model) == 0
    _assert_torch_objects_back()
    with DropoutCalls() as calls:
        model(torch.randn(4, 16, 32))
    assert calls.torch == 1 and calls.fastdropout == 1  # the swapped module stays swapped


def test_a_model_of_torch_layers_routes_nothing():
    with fastdropout.route_functional_dropout(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1))) as route:
        assert route.modules == ()
        assert torch_F.dropout.__module__ == "torch.nn.functional"


def test_routes_nest_and_the_last_removal_restores():
    first = fastdropout.route_functional_dropout(routing_target)
    second = fastdropout.route_functional_dropout(routing_target.Block())
    routed_nn = routing_target.nn
    assert routed_nn is not nn and routed_nn.functional.dropout is not torch_F.dropout
    first.remove()
    assert routing_target.nn is routed_nn and second.active and not first.active
    first.remove()  # a second removal does nothing
    assert routing_target.nn is routed_nn
    second.remove()
    _assert_torch_objects_back()
    assert "removed" in repr(second)


def test_stand_in_modules_share_torch_objects():
    with fastdropout.route_functional_dropout(routing_target):
        stand_in = routing_target.nn
        assert stand_in.Linear is nn.Linear and stand_in.Module is nn.Module
        assert stand_in.functional.softmax is torch_F.softmax
        assert stand_in.functional.alpha_dropout is torch_F.alpha_dropout
        assert routing_target.F is stand_in.functional


def test_inputs_fastdropout_does_not_take_keep_torch():
    with fastdropout.route_functional_dropout(routing_target):
        meta = torch.empty(64, 8, device="meta")
        out = routing_target.nn.functional.dropout(meta, 0.5)  # fastdropout rejects meta
        assert out.device.type == "meta" and out.shape == meta.shape
        with pytest.raises(ValueError, match="between 0 and 1"):
            routing_target.nn.functional.dropout(torch.randn(4), 1.5)


def test_a_global_rebound_while_routed_is_kept(caplog):
    route = fastdropout.route_functional_dropout(routing_target)
    theirs = routing_target.F
    sentinel = object()
    routing_target.F = sentinel
    try:
        with caplog.at_level(logging.WARNING, logger="fastdropout"):
            route.remove()
        assert routing_target.F is sentinel and "routing_target.F was rebound" in caplog.text
        assert routing_target.nn is nn
    finally:
        routing_target.F = torch_F
    assert theirs is not torch_F


def test_threads_taking_and_removing_routes_leave_torch_objects():
    errors, barrier = [], threading.Barrier(8)
    held = fastdropout.route_functional_dropout(routing_target)
    routed_nn = routing_target.nn

    def worker():
        try:
            barrier.wait()
            for _ in range(200):
                with fastdropout.route_functional_dropout(routing_target):
                    assert routing_target.nn is routed_nn
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert routing_target.nn is routed_nn  # the outer route is still held
    held.remove()
    _assert_torch_objects_back()


def test_bad_targets_are_rejected():
    with pytest.raises(TypeError, match="at least one"):
        fastdropout.route_functional_dropout()
    with pytest.raises(TypeError, match="nn.Module instances or Python modules"):
        fastdropout.route_functional_dropout("routing_target")
    with pytest.raises(ValueError, match="torch's and fastdropout's own code"):
        fastdropout.route_functional_dropout(torch_F)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        fastdropout.unroute_functional_dropout(routing_target)


def test_compile_fullgraph_follows_the_route_and_its_removal():
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = routing_target.Block()
    x = torch.randn(4, 16, 32)
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(block, fullgraph=True, backend=backend)

    def dropout_ops():
        return sorted(str(n.target) for n in backend.graphs[-1].graph.nodes
                      if n.op == "call_function" and "dropout" in str(n.target))

    def same_as_eager():
        torch.manual_seed(4)
        a = compiled(x)
        torch.manual_seed(4)
        return torch.equal(a, block(x))

    compiled(x)
    with fastdropout.route_functional_dropout(routing_target):
        compiled(x)
        assert backend.frame_count == 2  # the rebound global invalidated the first graph
        ops = dropout_ops()  # the functional call is routed, the nn.Dropout module is torch's
        assert len(ops) == 2 and ops.count("fastdropout.dropout") == 1
        assert same_as_eager()
        torch.manual_seed(4)
        routed_out = compiled(x)
    # with the route removed, torch's graph again: the first one, reused, and eager's values
    torch.manual_seed(4)
    assert not torch.equal(compiled(x), routed_out)
    assert backend.frame_count == 2 and same_as_eager()


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpoint_recomputation_goes_through_the_route(use_reentrant):
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    block = fastdropout.replace_dropout(routing_target.Block())
    x = torch.randn(4, 16, 32, requires_grad=True)

    def grads(run):
        for t in (x, *block.parameters()):
            t.grad = None
        torch.manual_seed(5)
        run(x).square().sum().backward()
        return [t.grad.clone() for t in (x, *block.parameters())]

    with fastdropout.route_functional_dropout(block):
        plain = grads(block)
        with DropoutCalls() as calls:
            ckpt = grads(lambda t: checkpoint(block, t, use_reentrant=use_reentrant, preserve_rng_state=True))
    assert calls.torch == 0 and calls.fastdropout == 4  # forward and recomputation, 2 each
    assert all(torch.equal(a, b) for a, b in zip(plain, ckpt))
