"""DTensor (tensor and sequence parallelism): every shard's mask is its slice of the unsharded
tensor's mask, bit for bit (fastdropout/dtensor.py).

Each group of cases runs once in 2 or 4 processes (gloo on 127.0.0.1, or NCCL on 2 GPUs when
present); every rank checks each case against the unsharded call made on its own copy of the
global tensor, and reports per case. A group that does not finish in time fails its cases.
"""
import datetime
import math
import os
import socket
import traceback

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import fastdropout
from conftest import devices

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from torch.distributed.tensor import (  # noqa: E402
    DTensor, Partial, Replicate, Shard, distribute_tensor, init_device_mesh)

GROUP_TIMEOUT_S = 150  # a whole group: spawn, import, every case


def _bits(t: torch.Tensor) -> torch.Tensor:
    view = {torch.float32: torch.int32, torch.float64: torch.int64,
            torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype]
    return t.detach().cpu().contiguous().view(view)


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape)
    assert torch.equal(_bits(got), _bits(want)), f"{what}: not bit-identical"


def _data(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).to(device)


def _partial_parts(shape, dtype, device, world, seed):
    """Integer-valued parts summing exactly to the global tensor (so that the masked, scaled
    (p = 0.5: x2) partial sums are exact in every dtype)."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randint(-8, 8, shape, generator=g).to(dtype).to(device) for _ in range(world)]
    return parts, sum(parts)


def _dtensor(full, mesh, placements, parts=None, requires_grad=False):
    """This rank's box of `full` (of its part of `full` along a Partial mesh dimension 0) as a
    DTensor, sliced locally: no collective, so each rank may pass its own part."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    source = parts[mesh.get_local_rank(0)] if placements[0].is_partial() else full
    shape, offset = compute_local_shape_and_global_offset(full.shape, mesh, placements)
    box = source[tuple(slice(o, o + n) for o, n in zip(offset, shape))].contiguous()
    t = DTensor.from_local(box, mesh, placements, run_check=False, shape=full.shape,
                           stride=full.stride())
    return t.detach().requires_grad_(requires_grad)


# --- the cases (run on every rank; mesh shapes and placements per world size) ------------------

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _layouts(world):
    """(mesh shape, global shape, placements): even and uneven, every kind of placement."""
    if world == 2:
        return [((2,), (6, 10), [Shard(0)]), ((2,), (5, 7), [Shard(0)]), ((2,), (5, 7), [Shard(1)]),
                ((2,), (3, 4, 9), [Shard(1)]), ((2,), (3, 4, 9), [Shard(2)]),
                ((2,), (37, 129), [Shard(1)]), ((2,), (2, 4100), [Shard(1)]),
                ((2,), (5, 7), [Replicate()]), ((2,), (5, 7), [Partial()]), ((2,), (11,), [Shard(0)])]
    return [((4,), (7, 9), [Shard(0)]), ((4,), (7, 9), [Shard(1)]), ((4,), (3, 5, 6), [Shard(2)]),
            ((2, 2), (6, 10), [Shard(0), Shard(1)]), ((2, 2), (5, 7), [Shard(1), Shard(0)]),
            ((2, 2), (9, 6), [Shard(0), Shard(0)]), ((2, 2), (5, 6, 7), [Shard(1), Shard(2)]),
            ((2, 2), (4, 5, 6, 7), [Shard(0), Shard(2)]), ((2, 2), (5, 6, 7), [Replicate(), Shard(2)]),
            ((2, 2), (6, 10), [Partial(), Shard(1)]), ((2, 2), (130, 33), [Shard(1), Shard(0)])]


def case_dropout_explicit_seed(device, world):
    """Forward and backward, every layout and dtype: full_tensor() equals the unsharded call
    bit for bit; the gradient comes back on the gradient's own placements."""
    for i, (mesh_shape, shape, placements) in enumerate(_layouts(world)):
        mesh = init_device_mesh(device, mesh_shape)
        for dtype in DTYPES:
            p = 0.5 if any(pl.is_partial() for pl in placements) else 0.3
            parts, full = _partial_parts(shape, dtype, device, mesh_shape[0], i)
            if not any(pl.is_partial() for pl in placements):
                full = _data(shape, dtype, device, i)
            x = _dtensor(full, mesh, placements, parts, requires_grad=True)
            y = fastdropout.dropout(x, p, seed=1000 + i, offset=7)
            assert isinstance(y, DTensor) and tuple(y.placements) == tuple(placements)
            ref_x = full.clone().requires_grad_()
            ref = fastdropout.dropout(ref_x, p, seed=1000 + i, offset=7)
            what = f"{shape} {placements} {dtype}"
            assert_bits_equal(y.full_tensor(), ref, what + " forward")
            if not any(pl.is_partial() for pl in placements):
                local_ref = _dtensor(ref.detach(), mesh, placements).to_local()
                assert_bits_equal(y.to_local(), local_ref, what + " local shard")
            grad = _data(shape, dtype, device, 99 + i)
            y.backward(distribute_tensor(grad, mesh, [Replicate()] * len(mesh_shape)))
            ref.backward(grad)
            assert_bits_equal(x.grad.full_tensor(), ref_x.grad, what + " backward")


def case_dropout_default_generator(device, world):
    """No seed: one draw from each rank's generator, seeded alike: the unsharded mask."""
    for i, (mesh_shape, shape, placements) in enumerate(_layouts(world)):
        if any(pl.is_partial() for pl in placements):
            continue
        mesh = init_device_mesh(device, mesh_shape)
        full = _data(shape, torch.float32, device, i)
        x = _dtensor(full, mesh, placements)
        torch.manual_seed(42 + i)
        if device == "cuda":
            torch.cuda.manual_seed(42 + i)
        y = fastdropout.dropout(x, 0.4)
        after = fastdropout.dropout(x, 0.4).full_tensor()  # the generator moved on alike
        torch.manual_seed(42 + i)
        if device == "cuda":
            torch.cuda.manual_seed(42 + i)
        assert_bits_equal(y.full_tensor(), fastdropout.dropout(full, 0.4), f"{shape} {placements}")
        assert_bits_equal(after, fastdropout.dropout(full, 0.4), f"{shape} {placements} 2nd call")


def case_dropout_module_and_inplace(device, world):
    mesh_shape, shape, placements = _layouts(world)[2]
    mesh = init_device_mesh(device, mesh_shape)
    full = _data(shape, torch.float32, device, 5)
    x = _dtensor(full, mesh, placements)
    torch.manual_seed(3)
    y = fastdropout.Dropout(0.25)(x)
    torch.manual_seed(3)
    assert_bits_equal(y.full_tensor(), fastdropout.dropout(full, 0.25), "module")
    z = x.clone()
    out = fastdropout.dropout(z, 0.25, inplace=True, seed=8)
    assert out is z
    assert_bits_equal(z.full_tensor(), fastdropout.dropout(full, 0.25, seed=8), "inplace")


def case_compile(device, world):
    """torch.compile over DTensor inputs (aot_eager: the graphs dynamo builds, and the fakes):
    forward and backward equal the eager unsharded call, as torch's own dropout compiles there."""
    mesh = init_device_mesh(device, (world,))
    full, res = _data((5, 7), torch.float32, device, 6), _data((5, 7), torch.float32, device, 7)
    bias = _data((7,), torch.float32, device, 8)

    def f(t):
        return fastdropout.dropout(t, 0.4, seed=9).sin()

    for placements in ([Shard(1)], [Shard(0)], [Replicate()]):
        torch._dynamo.reset()
        x = _dtensor(full, mesh, placements, requires_grad=True)
        ref_x = full.clone().requires_grad_()
        y, ref = torch.compile(f, backend="aot_eager")(x), f(ref_x)
        y.sum().backward()
        ref.sum().backward()
        what = f"compiled dropout {placements}"
        assert_bits_equal(y.full_tensor(), ref, what)
        assert_bits_equal(x.grad.full_tensor(), ref_x.grad, what + " grad")
        g = torch.compile(lambda a, b, r: fastdropout.bias_dropout_add(a, b, r, 0.3, seed=4),
                          backend="aot_eager")
        out = g(_dtensor(full, mesh, placements), distribute_tensor(bias, mesh, [Replicate()]),
                _dtensor(res, mesh, placements))
        assert_bits_equal(out.full_tensor(), fastdropout.bias_dropout_add(full, bias, res, 0.3, seed=4),
                          f"compiled bias_dropout_add {placements}")


def case_channel_dropout(device, world):
    """dropout2d / dropout1d: the channel of a global index, whatever dimension is sharded
    (the spatial one included: a channel then spans two ranks)."""
    mesh_shape = (world,) if world == 2 else (2, 2)
    mesh = init_device_mesh(device, mesh_shape)
    if world == 2:
        cases = [((4, 6, 3, 5), [Shard(0)]), ((4, 6, 3, 5), [Shard(1)]), ((4, 6, 3, 5), [Shard(2)]),
                 ((4, 6, 3, 5), [Shard(3)]), ((3, 5, 3, 5), [Replicate()])]
    else:
        cases = [((4, 6, 3, 5), [Shard(0), Shard(1)]), ((5, 6, 3, 5), [Shard(1), Shard(3)])]
    for i, (shape, placements) in enumerate(cases):
        for dtype in (torch.float32, torch.bfloat16):
            full = _data(shape, dtype, device, 20 + i)
            x = _dtensor(full, mesh, placements, requires_grad=True)
            y = fastdropout.dropout2d(x, 0.5, seed=11, offset=i)
            ref_x = full.clone().requires_grad_()
            ref = fastdropout.dropout2d(ref_x, 0.5, seed=11, offset=i)
            assert_bits_equal(y.full_tensor(), ref, f"dropout2d {shape} {placements}")
            grad = _data(shape, dtype, device, 30 + i)
            y.backward(distribute_tensor(grad, mesh, placements))
            ref.backward(grad)
            assert_bits_equal(x.grad.full_tensor(), ref_x.grad, f"dropout2d grad {shape} {placements}")
    full = _data((4, 6, 9), torch.float32, device, 40)
    x = _dtensor(full, mesh, [Shard(2)] + [Replicate()] * (len(mesh_shape) - 1))
    assert_bits_equal(fastdropout.dropout1d(x, 0.5, seed=2).full_tensor(),
                      fastdropout.dropout1d(full, 0.5, seed=2), "dropout1d Shard(2)")


def _bda_layouts(world):
    """(mesh shape, x placements, bias placements) with x of shape (4, 6, 16)."""
    if world == 2:
        return [((2,), [Shard(0)], [Replicate()]), ((2,), [Shard(1)], [Replicate()]),
                ((2,), [Shard(2)], [Shard(0)]), ((2,), [Shard(2)], [Replicate()]),
                ((2,), [Replicate()], [Replicate()])]
    return [((2, 2), [Shard(0), Shard(2)], [Replicate(), Shard(0)]),
            ((2, 2), [Shard(1), Shard(2)], [Replicate(), Replicate()]),
            ((4,), [Shard(1)], [Replicate()])]


def case_bias_dropout_add(device, world):
    """Forward bit-identical to the unsharded fused call; grad_x and grad_residual too;
    grad_bias equal up to the order of its sum over rows (bit-identical when not sharded)."""
    shape = (4, 6, 16)
    for i, (mesh_shape, placements, bias_placements) in enumerate(_bda_layouts(world)):
        mesh = init_device_mesh(device, mesh_shape)
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            xf, rf = _data(shape, dtype, device, 50 + i), _data(shape, dtype, device, 60 + i)
            bf = _data(shape[-1:], dtype, device, 70 + i)
            x = _dtensor(xf, mesh, placements, requires_grad=True)
            r = _dtensor(rf, mesh, placements, requires_grad=True)
            b = _dtensor(bf, mesh, bias_placements, requires_grad=True)
            out = fastdropout.bias_dropout_add(x, b, r, 0.3, seed=77, offset=i)
            refs = [t.clone().requires_grad_() for t in (xf, bf, rf)]
            ref = fastdropout.bias_dropout_add(refs[0], refs[1], refs[2], 0.3, seed=77, offset=i)
            what = f"bias_dropout_add {placements} bias {bias_placements} {dtype}"
            assert tuple(out.placements) == tuple(placements)
            assert_bits_equal(out.full_tensor(), ref, what)
            grad = _data(shape, dtype, device, 80 + i)
            out.backward(distribute_tensor(grad, mesh, placements))
            ref.backward(grad)
            assert_bits_equal(x.grad.full_tensor(), refs[0].grad, what + " grad_x")
            assert_bits_equal(r.grad.full_tensor(), refs[2].grad, what + " grad_residual")
            tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2}[dtype]
            torch.testing.assert_close(b.grad.full_tensor(), refs[1].grad, rtol=tol, atol=tol)
            if all(type(pl) is Replicate for pl in placements):
                assert_bits_equal(b.grad.full_tensor(), refs[1].grad, what + " grad_bias")
            no_bias = fastdropout.bias_dropout_add(x, None, r, 0.3, seed=5)
            assert_bits_equal(no_bias.full_tensor(),
                              fastdropout.bias_dropout_add(xf, None, rf, 0.3, seed=5), what + " no bias")


def case_rejects_unsupported_placement(device, world):
    mesh = init_device_mesh(device, (world,))
    x = DTensor.from_local(torch.zeros(2, 4, device=device), mesh, [Partial("max")], run_check=False)
    with pytest.raises(NotImplementedError, match="Partial"):
        fastdropout.dropout(x, 0.5, seed=1)


# --- a transformer block, tensor- and sequence-parallel ----------------------------------------

class Block(nn.Module):
    """Pre-norm attention + MLP, torch's nn.Dropout after the attention projection, inside the
    MLP and after it (swapped by replace_dropout). Head counts are read from the local q, so the
    same code runs on a rank's heads."""

    def __init__(self, d=16, hidden=36, head_dim=4, p=0.25):
        super().__init__()
        self.head_dim = head_dim
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.drop_attn, self.drop_hidden, self.drop_out = nn.Dropout(p), nn.Dropout(p), nn.Dropout(p)

    def forward(self, x):
        h = self.ln1(x)
        batch, seq = h.shape[0], h.shape[1]
        q, k, v = (f(h).view(batch, seq, -1, self.head_dim).transpose(1, 2)
                   for f in (self.q, self.k, self.v))
        scores = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1)
        attn = (scores @ v).transpose(1, 2).reshape(batch, seq, -1)
        x = x + self.drop_attn(self.o(attn))
        hidden = self.drop_hidden(torch.nn.functional.gelu(self.fc1(self.ln2(x))))
        return x + self.drop_out(self.fc2(hidden))


def _record_masks(model, masks):
    def hook(module, args, out):
        full = out.full_tensor() if isinstance(out, DTensor) else out
        masks.append((full == 0).detach().cpu())
    for m in (model.drop_attn, model.drop_hidden, model.drop_out):
        m.register_forward_hook(hook)


def _block_run(model, x, weight, masks):
    torch.manual_seed(1234)  # dropout draws from the default generator, alike on every rank
    _record_masks(model, masks)
    out = model(x)
    out = out.full_tensor() if isinstance(out, DTensor) else out
    loss = (out * weight).sum()
    loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        g = param.grad
        grads[name] = (g.full_tensor() if isinstance(g, DTensor) else g).detach().cpu()
    return loss.detach().cpu(), grads


def case_transformer_block(device, world):
    from torch.distributed.tensor.parallel import (
        ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module)
    mesh = init_device_mesh(device, (world,))
    shape = (2, 6, 16)
    x_full = _data(shape, torch.float32, device, 90)
    weight = _data(shape, torch.float32, device, 91)
    for sequence_parallel in (False, True):
        torch.manual_seed(0)
        reference = fastdropout.replace_dropout(Block().to(device))
        torch.manual_seed(0)
        model = fastdropout.replace_dropout(Block().to(device))
        if sequence_parallel:
            plan = {"ln1": SequenceParallel(), "ln2": SequenceParallel(),
                    **{n: ColwiseParallel(input_layouts=Shard(1)) for n in ("q", "k", "v")},
                    "o": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
                    "fc1": ColwiseParallel(input_layouts=Shard(1), use_local_output=False),
                    "fc2": RowwiseParallel(output_layouts=Shard(1), use_local_output=False)}
            x = distribute_tensor(x_full, mesh, [Shard(1)])
        else:
            plan = {**{n: ColwiseParallel() for n in ("q", "k", "v")}, "o": RowwiseParallel(),
                    "fc1": ColwiseParallel(use_local_output=False), "fc2": RowwiseParallel()}
            x = x_full
        parallelize_module(model, mesh, plan)
        ref_masks, masks = [], []
        ref_loss, ref_grads = _block_run(reference, x_full, weight, ref_masks)
        loss, grads = _block_run(model, x, weight, masks)
        what = "sequence parallel" if sequence_parallel else "tensor parallel"
        assert len(masks) == 3 and all(torch.equal(a, b) for a, b in zip(masks, ref_masks)), what
        assert all(m.any() and not m.all() for m in masks)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5,
                                       msg=lambda m, n=name: f"{what} {n}: {m}")


GROUPS = {
    2: [case_dropout_explicit_seed, case_dropout_default_generator, case_dropout_module_and_inplace,
        case_channel_dropout, case_bias_dropout_add, case_rejects_unsupported_placement,
        case_transformer_block, case_compile],
    4: [case_dropout_explicit_seed, case_dropout_default_generator, case_dropout_module_and_inplace,
        case_channel_dropout, case_bias_dropout_add],
}


def _worker(rank, world, port, device, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    import fastdropout.dtensor  # noqa: F401  (registers the DTensor rules)
    try:
        for case in GROUPS[world]:
            try:
                case(device, world)
                results[(case.__name__, rank)] = "ok"
            except Exception:  # reported per case by the parent
                results[(case.__name__, rank)] = traceback.format_exc()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_RESULTS = {}


def _group_results(world, device):
    key = (world, device)
    if key not in _RESULTS:
        ctx = mp.get_context("spawn")
        with ctx.Manager() as manager:
            results = manager.dict()
            port = _free_port()
            procs = [ctx.Process(target=_worker, args=(r, world, port, device, results))
                     for r in range(world)]
            for p in procs:
                p.start()
            deadline = datetime.datetime.now() + datetime.timedelta(seconds=GROUP_TIMEOUT_S)
            for p in procs:
                p.join(timeout=max(1.0, (deadline - datetime.datetime.now()).total_seconds()))
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
            _RESULTS[key] = (dict(results), [p.exitcode for p in procs])
    return _RESULTS[key]


def _check(world, device, case):
    results, exitcodes = _group_results(world, device)
    for rank in range(world):
        outcome = results.get((case.__name__, rank))
        assert outcome is not None, (f"rank {rank} did not finish {case.__name__} within "
                                     f"{GROUP_TIMEOUT_S} s (exit codes {exitcodes})")
        assert outcome == "ok", f"rank {rank}:\n{outcome}"


@pytest.mark.parametrize("case", GROUPS[2], ids=lambda c: c.__name__)
def test_two_processes(case):
    _check(2, "cpu", case)


@pytest.mark.parametrize("case", GROUPS[4], ids=lambda c: c.__name__)
def test_four_processes(case):
    _check(4, "cpu", case)


two_gpus = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.device_count() >= 2
         and fastdropout.cuda_kernels_built() and dist.is_nccl_available()),
    reason="needs 2 CUDA GPUs, NCCL and the CUDA kernels")


@two_gpus
@pytest.mark.parametrize("case", GROUPS[2], ids=lambda c: c.__name__)
def test_two_gpus(case):
    _check(2, "cuda", case)


# --- the map itself, in one process -----------------------------------------------------------

def test_run_map_merges_unsharded_dimensions():
    from fastdropout.dtensor import run_map
    assert run_map((4, 6), (4, 6), (0, 0)) is None
    assert run_map((4, 6), (2, 6), (2, 0)) == (12, [], [], 12)
    assert run_map((4, 6), (4, 3), (0, 3)) == (3, [4], [6], 3)
    # (A, B, C, D) sharded on B and D: A is one level, B with C merged into another
    assert run_map((2, 4, 3, 10), (2, 2, 3, 5), (0, 2, 0, 5)) == (5, [2, 6], [120, 10], 65)
    assert run_map((5, 7), (0, 7), (5, 0)) == (1, [], [], 0)


@pytest.mark.parametrize("device", devices())
def test_sharded_op_matches_slices_of_the_unsharded_mask(device):
    """The sharded kernel alone: every box of a 3-D tensor (starts not multiples of 8
    included) gets exactly its slice of the unsharded output, forward and backward."""
    import fastdropout.dtensor as fdt
    ops = torch.ops.fastdropout
    shape = (5, 7, 67)
    for dtype in DTYPES:
        full = _data(shape, dtype, device, 1)
        ref, state = ops.dropout(full, 0.3, 21, 4, None, 1)
        for lo, hi in [((1, 2, 3), (4, 6, 60)), ((0, 0, 8), (5, 7, 16)), ((2, 3, 0), (3, 4, 67)),
                       ((0, 1, 0), (5, 6, 67)), ((1, 0, 5), (2, 7, 6))]:
            box = tuple(slice(a, b) for a, b in zip(lo, hi))
            rmap = fdt.run_map(shape, [b - a for a, b in zip(lo, hi)], lo)
            out, got_state = ops.sharded_dropout(full[box], 0.3, *rmap, 21, 4, None, 1)
            assert_bits_equal(out, ref[box], f"{dtype} {lo} {hi}")
            assert torch.equal(got_state, state)
            back = ops.sharded_dropout_backward(full[box], state, 0.3, *rmap, 1)
            assert_bits_equal(back, ref[box], f"{dtype} {lo} {hi} backward")
            chan, _ = ops.sharded_dropout(full[box], 0.3, *rmap, 21, 4, None, 67 * 7)
            assert_bits_equal(chan, ops.dropout(full, 0.3, 21, 4, None, 67 * 7)[0][box], "channels")


@pytest.mark.parametrize("device", devices())
def test_sharded_ops_on_long_and_many_runs(device):
    """Shards large enough for every way the kernels draw a shard's keep bytes: many runs per
    batch of keep bytes (runs of 1 to 300 elements from starts on and off multiples of 8), runs
    longer than a batch, chunks of the parallel loop cutting runs; channel dropout whose runs are
    whole channels (from channel starts on and off multiples of 8), lie inside one channel, or
    cut channels anywhere. Every op equals the slice of its unsharded result."""
    import fastdropout.dtensor as fdt
    ops = torch.ops.fastdropout
    cases = [  # (global shape, local shape, offsets, channel_numels)
        ((600, 512), (600, 256), (0, 0), (64, 512 * 40)),
        ((600, 512), (600, 256), (0, 3), (64, 512 * 40)),
        ((300, 608), (300, 300), (0, 301), (1, 608 * 3)),
        ((20000, 7), (20000, 5), (0, 1), (7,)),
        ((3, 9000), (3, 5003), (0, 2001), (3000,)),
        ((8, 200, 16), (8, 157, 16), (0, 13, 0), (16, 16 * 200)),  # whole channels, 13 = 8 + 5
        ((6, 40, 300), (6, 40, 283), (0, 0, 7), (40 * 300, 300, 450)),  # inside channels, or not
        # runs of a few whole channels, few between them (drawn a span at a time): from channel
        # 8k + 3, from channels 6r + 2 (some runs cross a group of 8), and on two levels
        ((600, 512), (600, 256), (0, 192), (64,)),
        ((40, 6, 64), (40, 3, 64), (0, 2, 0), (64,)),
        ((10, 12, 6, 32), (10, 6, 3, 32), (0, 5, 2, 0), (32,)),
    ]
    for shape, local, offset, channels in cases:
        box = tuple(slice(o, o + n) for o, n in zip(offset, local))
        rmap = fdt.run_map(shape, local, offset)
        what = f"{shape} {local} {offset}"
        full = _data(shape, torch.float32, device, 5)
        ref, state = ops.dropout(full, 0.3, 11, 2, None, 1)
        assert_bits_equal(ops.sharded_dropout(full[box], 0.3, *rmap, 11, 2, None, 1)[0], ref[box],
                          what)
        assert_bits_equal(ops.sharded_dropout_backward(full[box], state, 0.3, *rmap, 1), ref[box],
                          what + " backward")
        for channel in channels:
            got, _ = ops.sharded_dropout(full[box], 0.3, *rmap, 11, 2, None, channel)
            assert_bits_equal(got, ops.dropout(full, 0.3, 11, 2, None, channel)[0][box],
                              f"{what} channels of {channel}")
        bias = _data(shape[-1:], torch.float32, device, 6)
        res = _data(shape, torch.float32, device, 7)
        fused, fused_state = ops.bias_dropout_add(full, bias, res, 0.3, 11, 2, None)
        got, _ = ops.sharded_bias_dropout_add(full[box], bias[box[-1]], res[box], 0.3, *rmap, 11, 2,
                                              None)
        assert_bits_equal(got, fused[box], what + " bias_dropout_add")
        grad_x, _ = ops.sharded_bias_dropout_add_backward(full[box], fused_state, 0.3, *rmap)
        assert_bits_equal(grad_x, ops.bias_dropout_add_backward(full, fused_state, 0.3)[0][box],
                          what + " grad_x")


def _boxes(shape, boxes):
    import fastdropout.dtensor as fdt
    for lo, hi in boxes:
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        yield box, fdt.run_map(shape, [b - a for a, b in zip(lo, hi)], lo), f"{lo} {hi}"


# Boxes of (5, 7, 24) and (3, 100, 16): row starts off multiples of 8, 8-aligned columns,
# columns not a multiple of 8, and one of 240 rows (four 64-row chunks of grad_bias).
_FUSED_CASES = [((5, 7, 24), [((1, 2, 3), (4, 6, 21)), ((0, 0, 8), (5, 7, 16)),
                              ((0, 0, 4), (5, 7, 20)), ((2, 3, 0), (3, 4, 24)),
                              ((0, 1, 0), (5, 6, 24)), ((1, 0, 5), (2, 7, 6))]),
                ((3, 100, 16), [((0, 10, 8), (3, 90, 16)), ((1, 3, 0), (3, 100, 16))])]


@pytest.mark.parametrize("device", devices())
def test_sharded_inplace_and_fused_ops_match_slices(device):
    """sharded_dropout_ (in place, on a contiguous local and on a strided view) and the fused
    sharded_bias_dropout_add forward and backward: every box gets exactly its slice of the
    unsharded result, and grad_bias is the contract-order sum of the box's own grad_x rows."""
    from reference import bias_grad
    ops = torch.ops.fastdropout
    for shape, boxes in _FUSED_CASES:
        for dtype in DTYPES:
            full = _data(shape, dtype, device, 2)
            res = _data(shape, dtype, device, 3)
            bias = _data(shape[-1:], dtype, device, 4)
            ref, state = ops.dropout(full, 0.3, 21, 4, None, 1)
            fused, fused_state = ops.bias_dropout_add(full, bias, res, 0.3, 21, 4, None)
            fused_no_bias, _ = ops.bias_dropout_add(full, None, res, 0.3, 21, 4, None)
            grad_x_ref, _ = ops.bias_dropout_add_backward(full, fused_state, 0.3)
            for box, rmap, where in _boxes(shape, boxes):
                what = f"{shape} {dtype} {where}"
                local = full[box].clone(memory_format=torch.contiguous_format)
                got_state = ops.sharded_dropout_(local, 0.3, *rmap, 21, 4, None, 1)
                assert_bits_equal(local, ref[box], what + " in place")
                assert torch.equal(got_state, state)
                strided = full.clone()
                ops.sharded_dropout_(strided[box], 0.3, *rmap, 21, 4, None, 1)
                outside = torch.ones(shape, dtype=torch.bool, device=device)
                outside[box] = False
                assert_bits_equal(strided[box], ref[box], what + " in place, strided view")
                assert torch.equal(strided[outside], full[outside]), what + ": wrote outside its box"
                columns = slice(box[-1].start, box[-1].stop)
                out, got_state = ops.sharded_bias_dropout_add(full[box], bias[columns], res[box],
                                                              0.3, *rmap, 21, 4, None)
                assert_bits_equal(out, fused[box], what + " bias_dropout_add")
                assert torch.equal(got_state, fused_state)
                out, _ = ops.sharded_bias_dropout_add(full[box], None, res[box], 0.3, *rmap, 21, 4,
                                                      None)
                assert_bits_equal(out, fused_no_bias[box], what + " bias_dropout_add, no bias")
                grad_x, grad_bias = ops.sharded_bias_dropout_add_backward(full[box], fused_state,
                                                                          0.3, *rmap)
                assert_bits_equal(grad_x, grad_x_ref[box], what + " grad_x")
                assert_bits_equal(grad_bias.cpu(), bias_grad(grad_x), what + " grad_bias")


@pytest.mark.parametrize("device", devices())
def test_sharded_ops_on_random_boxes(device):
    """Random shapes and boxes (fixed seed): runs shorter than 8, runs straddling groups of 8,
    boxes of one element; every sharded op equals the slice of its unsharded result."""
    import fastdropout.dtensor as fdt
    from reference import bias_grad
    ops = torch.ops.fastdropout
    g = torch.Generator().manual_seed(2024)
    for trial in range(40):
        ndim = int(torch.randint(1, 4, (), generator=g))
        shape = tuple(int(v) for v in torch.randint(1, 13, (ndim,), generator=g))
        lo = tuple(int(torch.randint(0, n, (), generator=g)) for n in shape)
        hi = tuple(int(torch.randint(a + 1, n + 1, (), generator=g)) for a, n in zip(lo, shape))
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        rmap = fdt.run_map(shape, [b - a for a, b in zip(lo, hi)], lo)
        if rmap is None:
            continue
        what = f"trial {trial}: {shape} {lo} {hi}"
        full, res = _data(shape, torch.float32, device, trial), _data(shape, torch.float32, device, 99)
        bias = _data(shape[-1:], torch.float32, device, 98)
        ref, state = ops.dropout(full, 0.5, 3, trial, None, 1)
        out, _ = ops.sharded_dropout(full[box], 0.5, *rmap, 3, trial, None, 1)
        assert_bits_equal(out, ref[box], what)
        channel = shape[-1]
        out, _ = ops.sharded_dropout(full[box], 0.5, *rmap, 3, trial, None, channel)
        assert_bits_equal(out, ops.dropout(full, 0.5, 3, trial, None, channel)[0][box], what + " channels")
        fused, fused_state = ops.bias_dropout_add(full, bias, res, 0.5, 3, trial, None)
        out, _ = ops.sharded_bias_dropout_add(full[box], bias[box[-1]], res[box], 0.5, *rmap, 3, trial,
                                              None)
        assert_bits_equal(out, fused[box], what + " bias_dropout_add")
        grad_x, grad_bias = ops.sharded_bias_dropout_add_backward(full[box], fused_state, 0.5, *rmap)
        assert_bits_equal(grad_x, ops.bias_dropout_add_backward(full, fused_state, 0.5)[0][box],
                          what + " grad_x")
        assert_bits_equal(grad_bias.cpu(), bias_grad(grad_x), what + " grad_bias")


def test_sharded_ops_opcheck():
    """The sharded ops pass torch.library.opcheck (schemas, fakes, autograd registration)."""
    import fastdropout.dtensor as fdt
    ops = torch.ops.fastdropout
    shape, lo, local = (6, 20), (1, 5), (4, 8)
    rmap = fdt.run_map(shape, local, lo)
    x = torch.randn(local, dtype=torch.float64, requires_grad=True)
    b = torch.randn(local[-1:], dtype=torch.float64, requires_grad=True)
    r = torch.randn(local, dtype=torch.float64, requires_grad=True)
    _, rng = ops.sharded_dropout(x, 0.3, *rmap, 7, 3, None, 1)
    torch.library.opcheck(ops.sharded_dropout.default, (x, 0.3, *rmap, 7, 3, None, 1))
    torch.library.opcheck(ops.sharded_dropout.default, (x, 0.3, *rmap, 7, 3, None, 4))
    torch.library.opcheck(ops.sharded_dropout_.default, (x.detach().clone(), 0.3, *rmap, 7, 3,
                                                         None, 1))
    torch.library.opcheck(ops.sharded_dropout_backward.default, (x, rng, 0.3, *rmap, 1))
    torch.library.opcheck(ops.sharded_bias_dropout_add.default, (x, b, r, 0.3, *rmap, 7, 3, None))
    torch.library.opcheck(ops.sharded_bias_dropout_add.default,
                          (x, None, r, 0.3, *rmap, 7, 3, None))
    torch.library.opcheck(ops.sharded_bias_dropout_add_backward.default, (x, rng, 0.3, *rmap))
    # double backward through the fused op: the gradient is linear in grad
    out, _ = ops.sharded_bias_dropout_add(x, b, r, 0.3, *rmap, 7, 3, None)
    assert torch.autograd.gradcheck(
        lambda g: ops.sharded_bias_dropout_add_backward(g, rng, 0.3, *rmap),
        (torch.randn(local, dtype=torch.float64, requires_grad=True),))
    with pytest.raises(RuntimeError, match="multiple of the local last dimension"):
        ops.sharded_bias_dropout_add(torch.ones(4, 10), None, torch.ones(4, 10), 0.5, 5, [8],
                                     [20], 5, 3, 0, None)


def test_sharded_op_autograd_and_bad_map():
    import torch.autograd.forward_ad as fwAD

    import fastdropout.dtensor  # noqa: F401  (registers the fakes)
    ops = torch.ops.fastdropout
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)  # columns 5..9 of (4, 20)
    out, state = ops.sharded_dropout(x, 0.5, 5, [4], [20], 5, 3, 0, None, 1)
    out.sum().backward()
    assert torch.equal(x.grad, (out != 0).double() * 2)
    # The C++ autograd (csrc/autograd.cpp) replays the shard's mask for tangents and for the
    # backward of the backward too.
    t = torch.randn(4, 5, dtype=torch.float64)
    with fwAD.dual_level():
        dual, _ = ops.sharded_dropout(fwAD.make_dual(x.detach(), t), 0.5, 5, [4], [20], 5, 3, 0,
                                      None, 1)
        assert torch.equal(fwAD.unpack_dual(dual).tangent, (out != 0).double() * 2 * t)
    g = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    grad_in = ops.sharded_dropout_backward(g, state, 0.5, 5, [4], [20], 5, 1)
    assert torch.equal(grad_in.detach(), (out != 0).double() * 2 * g.detach())
    grad_in.sum().backward()
    assert torch.equal(g.grad, (out != 0).double() * 2)
    with pytest.raises(RuntimeError, match="covers"):
        ops.sharded_dropout(torch.ones(4, 10), 0.5, 5, [3], [20], 5, 3, 0, None, 1)
    with pytest.raises(RuntimeError, match="at most"):
        ops.sharded_dropout(torch.ones(1), 0.5, 1, [1] * 5, [1] * 5, 0, 3, 0, None, 1)
    with pytest.raises(RuntimeError, match="63 bits"):  # 3 * 2^62: past what the kernels index
        ops.sharded_dropout(torch.ones(4), 0.5, 1, [4], [2 ** 62], 0, 3, 0, None, 1)
    with pytest.raises(RuntimeError, match="63 bits"):
        ops.sharded_dropout(torch.ones(4), 0.5, 2 ** 40, [2 ** 40], [1], 0, 3, 0, None, 1)


def test_sharded_ops_on_maps_out_of_global_order():
    """The sharded ops take any map that covers the local tensor, not only the increasing ones
    DTensor shards give: a permutation of a tensor's elements, with channel dropout on runs of a
    few channels (the path that draws a span of channels at a time) and plain dropout, equals the
    unsharded result at each element's global index."""
    ops = torch.ops.fastdropout
    run_length, counts, strides, base = 2, [3, 8, 3], [48, 2, 16], 0  # a permutation of 144
    index = []
    for e in range(144):
        r, pos = divmod(e, run_length)
        g = base + pos
        for count, stride in zip(reversed(counts), reversed(strides)):
            r, digit = divmod(r, count)
            g += digit * stride
        index.append(g)
    index = torch.tensor(index)
    assert torch.equal(index.sort().values, torch.arange(144))
    full = torch.randn(144, generator=torch.Generator().manual_seed(4)) + 3
    for channel in (1, 2, 6):
        ref, _ = ops.dropout(full, 0.4, 9, 1, None, channel)
        got, _ = ops.sharded_dropout(full[index], 0.4, run_length, counts, strides, base, 9, 1,
                                     None, channel)
        assert_bits_equal(got, ref[index], f"channels of {channel}")
