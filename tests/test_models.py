"""Drop-in use in real models: replace_dropout, torch.compile, checkpointing, autocast, DDP,
reproducible training."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import fastdropout


class MyDropout(nn.Dropout):
    """A user's subclass: replace_dropout must leave it alone."""


def make_model():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.Dropout2d(0.2), nn.Flatten(), nn.Linear(4 * 6 * 6, 32),
        nn.Dropout(0.3, inplace=True), nn.ReLU(), nn.AlphaDropout(0.1), MyDropout(0.4),
        nn.Sequential(nn.Linear(32, 16), nn.Dropout(0.5)), nn.Linear(16, 8),
    )


def test_replace_dropout_swaps_exact_types_and_keeps_settings():
    model = make_model()
    model.eval()
    model[8].train()  # a submodule left in training mode stays so
    skipped, replaced = [], []
    assert fastdropout.replace_dropout(model, skipped=skipped, replaced=replaced) is model
    assert type(model[1]) is fastdropout.Dropout2d and model[1].p == 0.2
    assert type(model[4]) is fastdropout.Dropout and model[4].p == 0.3 and model[4].inplace
    assert type(model[8][1]) is fastdropout.Dropout and model[8][1].training
    assert not model[4].training
    assert type(model[6]) is nn.AlphaDropout and type(model[7]) is MyDropout
    assert skipped == ["6", "7"]
    assert replaced == ["1", "4", "8.1"]
    # idempotent: a second pass swaps nothing and skips nothing of ours
    again, skipped2 = [], []
    fastdropout.replace_dropout(model, replaced=again, skipped=skipped2)
    assert again == [] and skipped2 == ["6", "7"]


def test_replace_dropout_logs_the_count(caplog):
    import logging
    with caplog.at_level(logging.INFO, logger="fastdropout"):
        fastdropout.replace_dropout(make_model())
    assert "replaced 3 dropout modules" in caplog.text


def test_state_dicts_load_both_ways():
    torch.manual_seed(0)
    ref = make_model()
    ours = fastdropout.replace_dropout(make_model())
    ours.load_state_dict(ref.state_dict())
    ref.load_state_dict(ours.state_dict())
    assert ref.state_dict().keys() == ours.state_dict().keys()
    x = torch.randn(5, 1, 8, 8)
    ref.eval(), ours.eval()
    assert torch.equal(ref(x), ours(x))


def test_training_statistics_match_torch_layer():
    """Same model, same weights: the mean activation after dropout agrees within 5 sigma."""
    torch.manual_seed(1)
    lin = nn.Linear(64, 256)
    x = torch.randn(4096, 64)
    h = torch.relu(lin(x)).detach()
    ours = fastdropout.Dropout(0.3)(h)
    theirs = nn.Dropout(0.3)(h)
    # both means estimate h.mean(); each has sd = sqrt(p/(1-p) * E[h^2] / n)
    n = h.numel()
    sd = (0.3 / 0.7 * (h ** 2).mean() / n).sqrt()
    assert abs(ours.mean() - h.mean()) < 5 * sd and abs(theirs.mean() - h.mean()) < 5 * sd


def _train(model, steps, seed):
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 1, 8, 8)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_manual_seed_makes_a_training_run_reproducible():
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = fastdropout.replace_dropout(make_model())
        runs.append(_train(model, 5, seed=3))
    assert runs[0] == runs[1]
    torch.manual_seed(0)
    other = _train(fastdropout.replace_dropout(make_model()), 5, seed=4)
    assert other != runs[0]


def test_compile_model_fullgraph_forward_backward():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(32, 64), fastdropout.Dropout(0.5), nn.ReLU(), nn.Linear(64, 64),
                          fastdropout.Dropout(0.5))
    x = torch.randn(8, 32)
    compiled = torch.compile(model, fullgraph=True)
    compiled(x).sum().backward()  # compile
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(9)
    eager_out = model(x)
    eager_out.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(9)
    out = compiled(x)
    out.sum().backward()
    assert torch.equal(out, eager_out)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), eager_grads))


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpoint_gradients_equal_plain(use_reentrant):
    from torch.utils.checkpoint import checkpoint
    lin1, lin2 = nn.Linear(32, 64), nn.Linear(64, 32)
    drop = fastdropout.Dropout(0.3)
    x = torch.randn(16, 32, requires_grad=True)

    def block(t):
        return lin2(drop(torch.relu(lin1(t))))

    torch.manual_seed(5)
    block(x).sum().backward()
    plain = [x.grad.clone()] + [p.grad.clone() for p in (*lin1.parameters(), *lin2.parameters())]
    x.grad = None
    for p in (*lin1.parameters(), *lin2.parameters()):
        p.grad = None
    torch.manual_seed(5)
    checkpoint(block, x, use_reentrant=use_reentrant, preserve_rng_state=True).sum().backward()
    got = [x.grad] + [p.grad for p in (*lin1.parameters(), *lin2.parameters())]
    assert all(torch.equal(a, b) for a, b in zip(plain, got))


def test_autocast_bf16_on_cpu():
    lin = nn.Linear(32, 32)
    x = torch.randn(8, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastdropout.dropout(lin(x), 0.2)
        out = fastdropout.bias_dropout_add(lin(x), None, lin(x), 0.2)
        assert y.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    (y.float().sum() + out.float().sum()).backward()
    assert torch.isfinite(x.grad).all()


# --- DistributedDataParallel, gloo, two processes on this machine ---------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, seeds, results):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # identical initial weights
        model = fastdropout.replace_dropout(nn.Sequential(nn.Linear(16, 64), nn.Dropout(0.5), nn.Linear(64, 4)))
        ddp = nn.parallel.DistributedDataParallel(model)
        torch.manual_seed(seeds[rank])  # each rank's own dropout stream
        x = torch.ones(8, 16)
        mask = (fastdropout.dropout(torch.ones(8, 64), 0.5) != 0)
        torch.manual_seed(seeds[rank])
        ddp(x).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results[rank] = (mask.clone(), grads.clone())
    finally:
        dist.destroy_process_group()


def _run_ddp(seeds):
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    results = manager.dict()
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, seeds, results)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    return dict(results)


def test_ddp_gloo_two_processes():
    res = _run_ddp(seeds=(1, 2))
    (mask0, grads0), (mask1, grads1) = res[0], res[1]
    assert torch.equal(grads0, grads1)           # gradients are synchronised
    assert not torch.equal(mask0, mask1)         # each rank draws its own masks
    same = _run_ddp(seeds=(7, 7))
    assert torch.equal(same[0][0], same[1][0])   # same seeds, same masks
