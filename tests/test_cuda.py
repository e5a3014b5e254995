"""CUDA checks, run by scripts/gpu_check.sh on a lent machine.

The comparisons of CUDA with the CPU run everywhere: without a GPU, TARGET is the CPU and they
compare the CPU with itself, so that their bodies (inputs, gradients, strides) are exercised by
every CPU suite and a broken test shows before a GPU run spends its minutes on it. The tests of
CUDA-only behaviour (generators, graphs, streams, memory) skip without a GPU."""
import pytest
import torch

import fastdropout
import reference
from conftest import FLOAT_DTYPES, TARGET, bits_equal, leaf, requires_cuda, snapshot
from stats import assert_binomial

@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("numel", [1, 7, 8, 9, 4096 + 3, (1 << 20) + 5])
@pytest.mark.gpu_stage2
def test_cpu_and_cuda_bit_identical(dtype, numel):
    x = (torch.randn(numel) * 5).to(dtype)
    for p in (0.1, 0.5, 0.9):
        cpu = fastdropout.dropout(x, p, seed=2**63 + 9, offset=2**35 + 1)
        gpu = fastdropout.dropout(x.to(TARGET), p, seed=2**63 + 9, offset=2**35 + 1)
        assert bits_equal(cpu, gpu)
        assert torch.equal(fastdropout.dropout_mask(numel, p, seed=4, offset=1),
                           fastdropout.dropout_mask(numel, p, seed=4, offset=1, device=TARGET).cpu())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.gpu_stage2
def test_unaligned_and_strided_inputs_take_the_scalar_path_correctly(dtype):
    base = torch.randn(4099, device=TARGET).to(dtype)
    for x in (base[1:], base[3:4003], base[::2], base[:4096].view(64, 64).t()):
        got = fastdropout.dropout(x, 0.3, seed=7)
        assert bits_equal(got, reference.dropout(x.contiguous().cpu(), 0.3, 7))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.gpu_stage2
def test_backward_matches_cpu(dtype):
    x = torch.randn(3, 1001).to(dtype)
    g = torch.randn(3, 1001).to(dtype)
    grads = []
    for dev in ("cpu", TARGET):
        xd = leaf(x, dev)
        fastdropout.dropout(xd, 0.2, seed=99).backward(g.to(dev))
        grads.append(snapshot(xd.grad))
    assert bits_equal(grads[0], grads[1])


@requires_cuda
def test_default_generator_offset_advances_by_4_and_sets_the_offset():
    gen = torch.cuda.default_generators[torch.cuda.current_device()]
    torch.cuda.manual_seed(1234)
    x = torch.ones(10000, device="cuda")
    before = gen.get_offset()
    y = fastdropout.dropout(x, 0.5)
    assert gen.get_offset() == before + 4
    want = fastdropout.dropout_mask(10000, 0.5, seed=gen.initial_seed(), offset=before // 4, device="cuda")
    assert torch.equal(y != 0, want)


@requires_cuda
def test_manual_seed_and_rng_state_reproduce():
    x = torch.ones(1 << 16, device="cuda")
    torch.cuda.manual_seed(7)
    state = torch.cuda.get_rng_state()
    a, b = fastdropout.dropout(x, 0.5), fastdropout.dropout(x, 0.5)
    torch.cuda.set_rng_state(state)
    assert torch.equal(a, fastdropout.dropout(x, 0.5)) and torch.equal(b, fastdropout.dropout(x, 0.5))
    assert not torch.equal(a, b)


@requires_cuda
def test_explicit_cuda_generator():
    x = torch.ones(4096, device="cuda")
    g1 = torch.Generator(device="cuda").manual_seed(3)
    g2 = torch.Generator(device="cuda").manual_seed(3)
    assert torch.equal(fastdropout.dropout(x, 0.5, generator=g1), fastdropout.dropout(x, 0.5, generator=g2))


@requires_cuda
def test_checkpoint_reproduces_masks():
    from torch.utils.checkpoint import checkpoint
    lin = torch.nn.Linear(64, 64).cuda()
    x = torch.randn(32, 64, device="cuda", requires_grad=True)

    def block(t):
        return fastdropout.dropout(torch.relu(lin(t)), 0.3)

    torch.cuda.manual_seed(5)
    block(x).sum().backward()
    plain = x.grad.clone()
    for reentrant in (True, False):
        x.grad = None
        torch.cuda.manual_seed(5)
        checkpoint(block, x, use_reentrant=reentrant, preserve_rng_state=True).sum().backward()
        assert torch.equal(x.grad, plain)


@requires_cuda
@pytest.mark.gpu_stage2
def test_cuda_graph_replay_draws_fresh_masks_and_backward_follows():
    x = torch.ones(1 << 14, device="cuda", requires_grad=True)
    static_grad = torch.ones(1 << 14, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside capture
        for _ in range(2):
            x.grad = None
            fastdropout.dropout(x, 0.5).backward(static_grad)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        y = fastdropout.dropout(x, 0.5)
        y.backward(static_grad)
    outs, grads = [], []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        outs.append(y.detach().clone())
        grads.append(x.grad.detach().clone())
    for out, grad in zip(outs, grads):
        assert torch.equal(out, grad)  # x = 1 and grad = 1: both are mask * 2
        assert_binomial(int((out != 0).sum()), out.numel(), 0.5, "kept per replay")
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])


@requires_cuda
def test_make_graphed_callables():
    layer = fastdropout.Dropout(0.5).cuda()
    x = torch.ones(1 << 12, device="cuda", requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(layer, (x,))
    seen = []
    for _ in range(2):
        x.grad = None
        out = graphed(x)
        out.backward(torch.ones_like(out))
        assert torch.equal(x.grad, out.detach())  # each replay's backward uses its own mask
        seen.append(out.detach().clone())
    assert not torch.equal(seen[0], seen[1])


@requires_cuda
@pytest.mark.gpu_stage2
def test_more_than_2_pow_31_elements():
    n = 2**31 + 7
    x = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    y = fastdropout.dropout(x, 0.25, seed=11, offset=2)
    for start in (0, n - 4096):
        want = torch.from_numpy(reference.keep_mask(4096, 0.25, 11, 2, start=start))
        got = y[start:start + 4096].cpu()
        assert torch.equal(got != 0, want)
        assert (got[want] == torch.tensor(1 / 0.75, dtype=torch.float32).to(torch.bfloat16)).all()
    del x, y
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(64, 4096), (3, 5, 24), (7, 13), (33, 8), (2563, 24), (70001, 2),
                                   (4096, 4096), (1025, 64)])
@pytest.mark.gpu_stage2
def test_fused_cpu_and_cuda_agree(dtype, shape):
    x, b, r = (torch.randn(shape).to(dtype), torch.randn(shape[-1]).to(dtype), torch.randn(shape).to(dtype))
    g = torch.randn(shape).to(dtype)
    outs, gx, gb = [], [], []
    for dev in ("cpu", TARGET):
        xs = [leaf(t, dev) for t in (x, b, r)]
        out = fastdropout.bias_dropout_add(*xs, 0.1, seed=6)
        out.backward(g.to(dev))
        outs.append(snapshot(out))
        gx.append(snapshot(xs[0].grad))
        gb.append(snapshot(xs[1].grad))
    assert bits_equal(outs[0], outs[1]) and bits_equal(gx[0], gx[1])
    # grad_bias: the contract's summation order on both devices, so bit for bit too.
    assert bits_equal(gb[0], gb[1])
    assert bits_equal(gb[1], reference.bias_grad(gx[1]))


@requires_cuda
@pytest.mark.gpu_stage2
def test_fused_bias_grad_deterministic_on_cuda():
    x = torch.randn(4096, 1024, device="cuda", requires_grad=True)
    b = torch.randn(1024, device="cuda", requires_grad=True)
    g = torch.randn(4096, 1024, device="cuda")
    grads = []
    for _ in range(3):
        b.grad = None
        fastdropout.bias_dropout_add(x, b, x.detach(), 0.1, seed=3).backward(g)
        grads.append(b.grad.clone())
    assert bits_equal(grads[0], grads[1]) and bits_equal(grads[0], grads[2])


@pytest.mark.parametrize("fn,shape", [(fastdropout.dropout1d, (4, 6, 10)), (fastdropout.dropout2d, (3, 5, 7, 9)),
                                      (fastdropout.dropout3d, (2, 4, 3, 5, 6))])
@pytest.mark.gpu_stage2
def test_channel_dropout_cpu_and_cuda_agree(fn, shape):
    x = torch.randn(shape)
    assert bits_equal(fn(x, 0.4, seed=3), fn(x.to(TARGET), 0.4, seed=3))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(dtype):
    lin = torch.nn.Linear(64, 64).cuda()
    x = torch.randn(8, 64, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=dtype):
        y = fastdropout.dropout(lin(x), 0.2)
        assert y.dtype == dtype
    y.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@requires_cuda
def test_memory_returns_to_start_and_nothing_but_16_bytes_saved():
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    x = torch.randn(1 << 20, device="cuda", requires_grad=True)
    y = fastdropout.dropout(x * 1, 0.5)
    y.sum().backward()
    del x, y
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == start


@requires_cuda
def test_streams_draw_distinct_masks():
    x = torch.ones(1 << 16, device="cuda")
    streams = [torch.cuda.Stream() for _ in range(4)]
    outs = []
    for s in streams:
        with torch.cuda.stream(s):
            outs.append(fastdropout.dropout(x, 0.5))
    torch.cuda.synchronize()
    for i in range(4):
        for j in range(i + 1, 4):
            assert_binomial(int((outs[i] == outs[j]).sum()), x.numel(), 0.5, "agreement across streams")


@requires_cuda
def test_compile_on_cuda_matches_eager():
    torch._dynamo.reset()
    x = torch.ones(4096, device="cuda", requires_grad=True)

    def f(t):
        return fastdropout.dropout(t, 0.5) + 3 * fastdropout.dropout(t, 0.5)

    compiled = torch.compile(f, fullgraph=True)
    compiled(x)  # compile once
    torch.cuda.manual_seed(2)
    eager = f(x)
    torch.cuda.manual_seed(2)
    assert torch.equal(compiled(x), eager)


@requires_cuda
@pytest.mark.gpu_stage2
def test_fused_cuda_graph_replay_draws_fresh_masks():
    x = torch.ones(64, 256, device="cuda", requires_grad=True)
    b = torch.zeros(256, device="cuda", requires_grad=True)
    r = torch.zeros(64, 256, device="cuda")
    g = torch.ones(64, 256, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            x.grad = b.grad = None
            fastdropout.bias_dropout_add(x, b, r, 0.5).backward(g)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    x.grad = b.grad = None
    with torch.cuda.graph(graph):
        out = fastdropout.bias_dropout_add(x, b, r, 0.5)
        out.backward(g)
    seen = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(x.grad, out.detach())  # grad_x = mask * 2 = out when x = 1, r = 0
        torch.testing.assert_close(b.grad, out.detach().sum(0))
        seen.append(out.detach().clone())
    assert not torch.equal(seen[0], seen[1])


# Layouts the GPU check's correctness stage must see: each a view whose strides and storage
# offset are the same on the CPU and on CUDA (the CPU is the reference: bit for bit).
VIEWS = {
    "channels_last": lambda b: b[:480].view(2, 5, 8, 6).permute(0, 3, 1, 2),  # NCHW, memory NHWC
    "permuted": lambda b: b[:480].view(6, 5, 16).permute(2, 0, 1),
    "misaligned": lambda b: b[1:481].view(2, 6, 5, 8),  # one element past a 16-byte boundary
    "misaligned_odd": lambda b: b[3:480],
}


@pytest.mark.gpu_stage2
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("view", sorted(VIEWS))
def test_views_match_cpu_bitwise_in_every_op(dtype, view):
    torch.manual_seed(0)
    base, grad_base, residual_base = ((torch.randn(512) * 4).to(dtype) for _ in range(3))
    got = []
    for dev in ("cpu", TARGET):
        x = VIEWS[view](base.to(dev, copy=True)).detach().requires_grad_()
        g = VIEWS[view](grad_base.to(dev))
        y = fastdropout.dropout(x, 0.3, seed=7, offset=3)
        y.backward(g)
        inplace = VIEWS[view](base.to(dev, copy=True))
        fastdropout.dropout(inplace, 0.3, inplace=True, seed=7, offset=3)
        out = {"forward": y, "backward": x.grad, "inplace": inplace}
        if x.dim() == 4:
            out["dropout2d"] = fastdropout.dropout2d(x.detach(), 0.4, seed=5)
        xf = x.detach().requires_grad_()
        bias = torch.linspace(-1, 1, x.shape[-1]).to(dtype).to(dev).requires_grad_()
        fused = fastdropout.bias_dropout_add(xf, bias, VIEWS[view](residual_base.to(dev)), 0.2, seed=9)
        fused.backward(g)
        out.update(fused=fused, fused_grad_x=xf.grad, fused_grad_bias=bias.grad)
        got.append({name: snapshot(t) for name, t in out.items()})
    cpu, target = got
    for name in cpu:
        assert cpu[name].stride() == target[name].stride(), name
        assert bits_equal(cpu[name], target[name]), name


@requires_cuda
@pytest.mark.gpu_stage2
def test_more_than_2_pow_31_elements_backward_and_fused():
    p, seed, offset = 0.25, 11, 2
    kept = torch.tensor(1 / 0.75, dtype=torch.float32).to(torch.bfloat16)
    columns = 4096
    rows = 2**31 // columns + 1
    n = rows * columns

    def check_mask(flat):
        for start in (0, n - 4096):
            want = torch.from_numpy(reference.keep_mask(4096, p, seed, offset, start=start))
            got = flat[start:start + 4096].cpu()
            assert torch.equal(got != 0, want), start
            assert (got[want] == kept).all(), start

    x = torch.ones(n, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    y = fastdropout.dropout(x, p, seed=seed, offset=offset)
    y.backward(torch.ones_like(y))
    check_mask(x.grad)  # grad = 1: the replayed mask times the scale
    del x, y
    torch.cuda.empty_cache()

    x = torch.ones(rows, columns, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    bias = torch.zeros(columns, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    residual = torch.zeros(rows, columns, dtype=torch.bfloat16, device="cuda")
    out = fastdropout.bias_dropout_add(x, bias, residual, p, seed=seed, offset=offset)
    check_mask(out.detach().view(-1))
    out.backward(torch.ones_like(out))
    check_mask(x.grad.view(-1))
    sums = x.grad[:, :8].double().sum(0)
    torch.testing.assert_close(bias.grad[:8].double(), sums, rtol=2**-7, atol=0)
    del x, bias, residual, out
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.gpu_stage2
def test_nan_rule_bit_identical_on_cpu_and_cuda(dtype):
    from test_contract import _nan_inputs
    x = _nan_inputs(dtype)
    r = _nan_inputs(dtype).flip(0)
    b = _nan_inputs(dtype)[:8]
    assert bits_equal(fastdropout.dropout(x.to(TARGET), 0.5, seed=3), reference.dropout(x, 0.5, 3))
    got = fastdropout.bias_dropout_add(x.view(-1, 8).to(TARGET), b.to(TARGET), r.view(-1, 8).to(TARGET), 0.5,
                                       seed=9)
    assert bits_equal(got, reference.bias_dropout_add(x.view(-1, 8), b, r.view(-1, 8), 0.5, 9))
    g = x.view(-1, 8).to(TARGET)
    xs = torch.zeros_like(g, requires_grad=True)
    bs = torch.zeros(8, dtype=dtype, device=TARGET, requires_grad=True)
    fastdropout.bias_dropout_add(xs, bs, torch.zeros_like(g), 0.5, seed=9).backward(g)
    assert bits_equal(xs.grad, reference.dropout(g.cpu(), 0.5, 9))
    assert bits_equal(bs.grad, reference.bias_grad(xs.grad))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.gpu_stage2
def test_misaligned_fused_and_channel_paths_agree_with_cpu(dtype):
    """Views that start mid-vector take the warp-tile (plain), scalar-load (channel) and
    plain-pass-then-column-sum (fused backward) paths: same bits as the CPU."""
    torch.manual_seed(1)
    base = torch.randn(3 * 257 * 24 + 1).to(dtype)
    x_cpu = base[1:].view(3 * 257, 24)
    g_cpu = torch.randn(3 * 257, 24).to(dtype)
    b_cpu = torch.randn(24).to(dtype)
    outs, grads = [], []
    for dev in ("cpu", TARGET):
        x = base.to(dev, copy=True)[1:].view(3 * 257, 24).requires_grad_()
        b = leaf(b_cpu, dev)
        out = fastdropout.bias_dropout_add(x, b, x.detach(), 0.3, seed=5)
        out.backward(g_cpu.to(dev))
        outs.append(snapshot(out))
        grads.append((snapshot(x.grad), snapshot(b.grad)))
    assert bits_equal(outs[0], outs[1])
    assert bits_equal(grads[0][0], grads[1][0]) and bits_equal(grads[0][1], grads[1][1])
    for shape in ((4, 6, 5, 7), (2, 3, 1, 9), (5, 3, 4, 4)):
        n = 1
        for s_ in shape:
            n *= s_
        flat = torch.randn(n + 3).to(dtype)
        for start in (0, 1, 3):
            xc = flat[start:start + n].view(shape)
            want = fastdropout.dropout2d(xc, 0.4, seed=8)
            got = fastdropout.dropout2d(xc.to(TARGET), 0.4, seed=8)
            assert bits_equal(want, got)
            assert bits_equal(fastdropout.dropout(xc, 0.4, seed=8), fastdropout.dropout(xc.to(TARGET), 0.4, seed=8))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.gpu_stage2
def test_permuted_layouts_agree_with_cpu(dtype):
    x = torch.randn(4, 16, 9, 24).to(dtype)
    for xc in (x.to(memory_format=torch.channels_last), x.permute(0, 2, 3, 1), x.transpose(1, 3)):
        for fn in (fastdropout.dropout, fastdropout.dropout2d):
            want = fn(xc, 0.3, seed=12)
            got = fn(xc.to(TARGET), 0.3, seed=12)
            assert got.stride() == torch.empty_like(xc.to(TARGET)).stride()
            assert bits_equal(want, got)


@requires_cuda
def test_regeneration_under_cuda_graph_capture_and_replay():
    """A dropout output saved by a multiply is regenerated in the captured backward from the
    state the captured forward wrote: on each replay, w.grad (= the regenerated output) equals
    the output the forward of that replay wrote, and replays draw fresh masks."""
    x = torch.randn(1 << 12, device="cuda")
    w = torch.ones(1 << 12, device="cuda", requires_grad=True)
    written = torch.empty(1 << 12, device="cuda")

    def step():
        with fastdropout.regenerate_dropout_outputs():
            d = fastdropout.dropout(x, 0.5)
            written.copy_(d)
            loss = (d * w).sum()  # the multiply saves d: regenerated in backward
        loss.backward()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            w.grad = None
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    w.grad = None
    with torch.cuda.graph(graph):
        step()
    seen = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        assert bits_equal(w.grad, written)
        seen.append(written.clone())
    assert not torch.equal(seen[0], seen[1])
