"""Benchmark: fastdropout against PyTorch's dropout and against a device copy of the same bytes.

    python -m fastdropout.bench            # full sweep on CUDA if present, else the CPU
    python -m fastdropout.bench --quick    # about a minute
    python -m fastdropout.bench --json out.json --plot out.png

Dropout is memory-bound: the fewest bytes a forward can move are those of a copy (read x, write
y), so the copy's time is "the limit" and every row reports its percentage of it. Times are
medians over repeats of a timed loop (CUDA events on the GPU, so host overhead between launches
shows up on small tensors, as it does in training).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import fastdropout

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


@dataclass
class Row:
    op: str            # "dropout" or "bias_dropout_add"
    impl: str          # copy | torch | torch.compile | fastdropout | ideal
    mode: str          # fwd | bwd | fwd+bwd
    dtype: str
    numel: int
    p: float
    ms: float
    gbps: float        # ideal bytes / time
    pct_of_limit: float
    speedup_vs_torch: Optional[float] = None
    saved_bytes_per_element: Optional[float] = None
    peak_mib: Optional[float] = None
    extra: Dict[str, float] = field(default_factory=dict)


class Timer:
    """Median time of fn in ms. CUDA: events around a loop of `inner` calls; CPU: perf_counter."""

    first_call_count = 0  # first calls timed one by one before the steady-state loop (--first-calls)

    def __init__(self, device: str, repeats: int, budget_s: float):
        self.device, self.repeats, self.budget_s = device, repeats, budget_s

    def first_calls(self, fn: Callable[[], object]) -> List[float]:
        """Times in ms of the next `first_call_count` calls of fn, each synchronised and timed on
        its own, with no warm-up: a process's first calls (lazy loading, first-touch page faults,
        huge-page compaction) next to the steady state the median shows.

        Example: ``Timer("cpu", 5, 0.3).first_calls(lambda: None) == []`` (count 0: off).
        """
        times = []
        for _ in range(self.first_call_count):
            self._sync()
            t0 = time.perf_counter()
            fn()
            self._sync()
            times.append((time.perf_counter() - t0) * 1e3)
        return times

    def __call__(self, fn: Callable[[], object]) -> float:
        fn()  # warm-up (and compilation)
        self._sync()
        t0 = time.perf_counter()
        fn()
        self._sync()
        one = max(time.perf_counter() - t0, 1e-6)
        inner = max(1, min(1000, int(0.02 / one)))  # loops of at least ~20 ms
        repeats = max(3, min(self.repeats, int(self.budget_s / (one * inner)) or 3))
        samples = []
        for _ in range(repeats):
            if self.device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / inner)
            else:
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                samples.append((time.perf_counter() - t0) * 1e3 / inner)
        return statistics.median(samples)

    def _sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes autograd saves for backward during fn (saved-tensor hooks)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def peak_mib(device: str, fn: Callable[[], object]) -> Optional[float]:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def bench_dropout(device, dtype_name, numel, p, timer, with_compile, rows, log):
    dtype = DTYPES[dtype_name]
    x = torch.randn(numel, device=device, dtype=torch.float32).to(dtype)
    g = torch.randn_like(x)
    out = torch.empty_like(x)
    nbytes = 2 * numel * x.element_size()
    copy_ms = timer(lambda: out.copy_(x))
    rows.append(Row("dropout", "copy", "fwd", dtype_name, numel, p, copy_ms, nbytes / copy_ms / 1e6, 100.0))

    impls: Dict[str, Callable] = {"torch": lambda t: F.dropout(t, p), "fastdropout": lambda t: fastdropout.dropout(t, p)}
    # First calls of the forward at this size, before anything else calls it (torch.compile's
    # would be its compilation: not timed here).
    first_calls = {name: timer.first_calls(lambda fn=fn: fn(x)) for name, fn in impls.items()}
    if with_compile:
        impls["torch.compile"] = _compiled(lambda t: F.dropout(t, p))
    # Backward alone: the kernel autograd runs (torch: native_dropout_backward over the stored
    # bool mask; fastdropout: the mask regenerated from the 16-byte state).
    _, torch_mask = torch.ops.aten.native_dropout(x, p, True)
    _, rng_state = fastdropout._ops.ops.dropout(x, p)
    scale = 1.0 / (1.0 - p)
    backward_kernels = {
        "torch": lambda: torch.ops.aten.native_dropout_backward(g, torch_mask, scale),
        "fastdropout": lambda: fastdropout._ops.ops.dropout_backward(g, rng_state, p),
    }
    results = {}
    for name, fn in impls.items():
        log(f"  dropout {dtype_name} n=2^{int(math.log2(numel))} {name}")
        xr = x.detach().clone().requires_grad_()
        fwd_ms = timer(lambda: fn(x))  # forward only, no graph kept

        def fwd_bwd():
            xr.grad = None
            fn(xr).backward(g)

        both_ms = timer(fwd_bwd)
        bwd_ms = timer(backward_kernels[name]) if name in backward_kernels else None
        saved = saved_bytes(lambda: fn(xr)) / numel
        peak = peak_mib(device, fwd_bwd)
        results[name] = (fwd_ms, bwd_ms, both_ms)
        for mode, ms, limit_ms, bytes_ in (("fwd", fwd_ms, copy_ms, nbytes), ("bwd", bwd_ms, copy_ms, nbytes),
                                           ("fwd+bwd", both_ms, 2 * copy_ms, 2 * nbytes)):
            if ms is None:
                continue
            rows.append(Row("dropout", name, mode, dtype_name, numel, p, ms, bytes_ / ms / 1e6,
                            100.0 * limit_ms / ms, saved_bytes_per_element=saved if mode == "fwd" else None,
                            peak_mib=peak if mode == "fwd+bwd" else None))
    for row in rows:
        if row.op == "dropout" and row.dtype == dtype_name and row.numel == numel and row.impl in results:
            i = ("fwd", "bwd", "fwd+bwd").index(row.mode)
            row.speedup_vs_torch = results["torch"][i] / row.ms
            if "torch.compile" in results and results["torch.compile"][i] is not None:
                row.extra["speedup_vs_compile"] = results["torch.compile"][i] / row.ms
    # fwd1st: the first call's time; fwd2-N: the slowest of calls 2..N (the steady state is fwd).
    for name, times in first_calls.items():
        for mode, ms in (("fwd1st", times[0] if times else None), (f"fwd2-{len(times)}", max(times[1:], default=None))):
            if ms is not None:
                rows.append(Row("dropout", name, mode, dtype_name, numel, p, ms, nbytes / ms / 1e6,
                                100.0 * copy_ms / ms))


def bench_bias_dropout_add(device, dtype_name, rows_, cols, p, timer, with_compile, rows, log):
    dtype = DTYPES[dtype_name]
    shape = (rows_, cols)
    x = torch.randn(shape, device=device).to(dtype)
    r = torch.randn(shape, device=device).to(dtype)
    b = torch.randn(cols, device=device).to(dtype)
    g = torch.randn(shape, device=device).to(dtype)
    numel = x.numel()
    out = torch.empty_like(x)
    copy_ms = timer(lambda: out.copy_(x))
    pass_ms = copy_ms / 2  # one read or one write of the tensor at copy bandwidth
    esize = x.element_size()
    first_row = len(rows)  # this shape's rows (two shapes may have one numel)
    shape_extra = {"columns": cols}

    def eager(x, b, r):
        return r + F.dropout(x + b, p)

    impls = {"torch": eager, "fastdropout": lambda x, b, r: fastdropout.bias_dropout_add(x, b, r, p)}
    if with_compile:
        impls["torch.compile"] = _compiled(eager)
    results = {}
    for name, fn in impls.items():
        log(f"  bias_dropout_add {dtype_name} {rows_}x{cols} {name}")
        xs = [t.detach().clone().requires_grad_() for t in (x, b, r)]
        fwd_ms = timer(lambda: fn(x, b, r))

        def fwd_bwd():
            for t in xs:
                t.grad = None
            fn(*xs).backward(g)

        both_ms = timer(fwd_bwd)
        saved = saved_bytes(lambda: fn(*xs)) / numel
        peak = peak_mib(device, fwd_bwd)
        results[name] = (fwd_ms, both_ms)
        # ideal: forward reads x, r and writes out (3 passes); forward+backward adds reading grad
        # and writing grad_x (5 passes; the bias reduction rides along, grad_r is grad itself).
        rows.append(Row("bias_dropout_add", name, "fwd", dtype_name, numel, p, fwd_ms, 3 * numel * esize / fwd_ms / 1e6,
                        100.0 * 3 * pass_ms / fwd_ms, saved_bytes_per_element=saved, extra=dict(shape_extra)))
        rows.append(Row("bias_dropout_add", name, "fwd+bwd", dtype_name, numel, p, both_ms, 5 * numel * esize / both_ms / 1e6,
                        100.0 * 5 * pass_ms / both_ms, peak_mib=peak, extra=dict(shape_extra)))
    rows.append(Row("bias_dropout_add", "ideal", "fwd", dtype_name, numel, p, 3 * pass_ms, 3 * numel * esize / (3 * pass_ms) / 1e6, 100.0,
                    extra=dict(shape_extra)))
    rows.append(Row("bias_dropout_add", "ideal", "fwd+bwd", dtype_name, numel, p, 5 * pass_ms, 5 * numel * esize / (5 * pass_ms) / 1e6, 100.0,
                    extra=dict(shape_extra)))
    for row in rows[first_row:]:
        if row.impl in results:
            row.speedup_vs_torch = results["torch"][("fwd", "fwd+bwd").index(row.mode)] / row.ms
            if "torch.compile" in results:
                row.extra["speedup_vs_compile"] = results["torch.compile"][("fwd", "fwd+bwd").index(row.mode)] / row.ms


def size_label(row: Row) -> str:
    """numel, or ROWSxCOLS for a fused row (two shapes can have one numel)."""
    cols = row.extra.get("columns")
    return f"{row.numel // int(cols)}x{int(cols)}" if cols else str(row.numel)


# Code that reaches dropout as Hugging Face's attention does: through the module global ``nn``.
_ROUTED_CODE = """
from torch import nn
import fastdropout

def through_nn(x, p):
    return nn.functional.dropout(x, p, True)

def direct(x, p):
    return fastdropout.dropout(x, p, True)
"""


def bench_routing(device, numel, p, timer, rows, log):
    """Per-call cost of fastdropout.route_functional_dropout: the same call site timed with
    torch's dropout, routed to fastdropout, and calling fastdropout.dropout directly. The route
    adds one Python call (the adapter's type checks), nothing per element."""
    import types
    name = "fastdropout_bench_routed_code"
    code = types.ModuleType(name)
    sys.modules[name] = code
    try:
        exec(compile(_ROUTED_CODE, name, "exec"), vars(code))
        x = torch.randn(numel, device=device)
        out = torch.empty_like(x)
        copy_ms = timer(lambda: out.copy_(x))
        log(f"  routed dropout fp32 n={numel}")
        results = {"torch": timer(lambda: code.through_nn(x, p))}
        with fastdropout.route_functional_dropout(code):
            results["routed"] = timer(lambda: code.through_nn(x, p))
        results["fastdropout"] = timer(lambda: code.direct(x, p))
    finally:
        del sys.modules[name]
    nbytes = 2 * numel * x.element_size()
    for impl, ms in results.items():
        rows.append(Row("routed_dropout", impl, "fwd", "fp32", numel, p, ms, nbytes / ms / 1e6, 100.0 * copy_ms / ms,
                        speedup_vs_torch=results["torch"] / ms,
                        extra={"overhead_us_vs_direct": 1e3 * (ms - results["fastdropout"])}))


def format_table(rows: List[Row]) -> str:
    head = f"{'op':<17}{'impl':<14}{'mode':<8}{'dtype':<6}{'numel':>11}{'ms':>10}{'GB/s':>9}{'%limit':>8}{'vs torch':>9}{'saved B/el':>11}{'peak MiB':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.op:<17}{r.impl:<14}{r.mode:<8}{r.dtype:<6}{size_label(r):>11}{r.ms:>10.4f}{r.gbps:>9.1f}{r.pct_of_limit:>7.0f}%"
            + (f"{r.speedup_vs_torch:>8.2f}x" if r.speedup_vs_torch else f"{'':>9}")
            + (f"{r.saved_bytes_per_element:>11.3g}" if r.saved_bytes_per_element is not None else f"{'':>11}")
            + (f"{r.peak_mib:>9.1f}" if r.peak_mib is not None else f"{'':>9}"))
    return "\n".join(lines)


def plot(rows: List[Row], path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    dtypes = sorted({r.dtype for r in rows if r.op == "dropout"})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.5), squeeze=False)
    for ax, dt in zip(axes[0], dtypes):
        for impl in ("copy", "torch", "torch.compile", "fastdropout"):
            pts = sorted((r.numel, r.gbps) for r in rows
                         if r.op == "dropout" and r.dtype == dt and r.impl == impl and r.mode == "fwd")
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("elements")
        ax.set_ylabel("GB/s (read x + write y)")
        ax.set_title(f"dropout forward, {dt}")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def environment(device: str) -> Dict[str, str]:
    env = {"torch": torch.__version__, "fastdropout": fastdropout.__version__, "python": platform.python_version(),
           "device": device, "threads": str(torch.get_num_threads()), "date": time.strftime("%Y-%m-%d")}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = str(torch.version.cuda)
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def save_json(path: str, env: Dict[str, str], p: float, rows: List[Row]) -> None:
    """All rows so far and the environment, as --json writes them (after every configuration,
    so that a run cut short keeps what it measured)."""
    with open(path, "w") as f:
        json.dump({"environment": env, "p": p, "rows": [asdict(r) for r in rows]}, f, indent=1)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastdropout.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None,
                    help="default: cuda when a GPU and the CUDA kernels are there, else cpu")
    ap.add_argument("--quick", action="store_true", help="a few sizes, short timings (about a minute)")
    ap.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16,fp64")
    ap.add_argument("--p", type=float, default=0.1, help="drop probability (default 0.1)")
    ap.add_argument("--min-log2", type=int, default=12)
    ap.add_argument("--max-log2", type=int, default=None, help="default 28 on CUDA, 24 on the CPU")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--compile-every-size", action="store_true",
                    help="time torch.compile at every size, not only the largest")
    ap.add_argument("--no-fused", action="store_true", help="skip the bias_dropout_add rows")
    ap.add_argument("--no-routing", action="store_true",
                    help="skip the rows timing a call routed by fastdropout.route_functional_dropout")
    ap.add_argument("--sizes", default=None,
                    help="comma list of log2 sizes, timed in this order (instead of --min-log2..--max-log2), e.g. 28,12,16")
    ap.add_argument("--fused-shapes", default=None,
                    help="comma list of ROWSxCOLS for bias_dropout_add, e.g. 65536x4096,16384x1024 (default: one shape)")
    ap.add_argument("--first-calls", type=int, default=10,
                    help="time the first N forward calls at each size one by one: rows fwd1st and fwd2-N (0: off)")
    ap.add_argument("--json", default=None, help="write all rows and the environment here")
    ap.add_argument("--plot", default=None, help="write a PNG chart here (needs matplotlib)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    args = ap.parse_args(argv)

    cuda_ok = torch.cuda.is_available() and fastdropout.cuda_kernels_built()
    device = args.device or ("cuda" if cuda_ok else "cpu")
    if device == "cuda" and not cuda_ok:
        ap.error("--device cuda needs a GPU and fastdropout built with its CUDA kernels")
    if args.threads:
        torch.set_num_threads(args.threads)
    default_dtypes = "fp32,bf16,fp16" if device == "cuda" else "fp32,bf16"
    dtypes = (args.dtypes or default_dtypes).split(",")
    for d in dtypes:
        if d not in DTYPES:
            ap.error(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    max_log2 = args.max_log2 or (28 if device == "cuda" else 24)
    if args.quick:
        sizes = sorted({args.min_log2, 16, max_log2 - 4 if device == "cuda" else 20, max_log2})
        timer = Timer(device, repeats=5, budget_s=0.3)
    else:
        sizes = list(range(args.min_log2, max_log2 + 1, 2))
        timer = Timer(device, repeats=15, budget_s=2.0)
    sizes = [s for s in sizes if args.min_log2 <= s <= max_log2]
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
    timer.first_call_count = args.first_calls

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    env = environment(device)
    log(f"fastdropout.bench on {env.get('gpu', env.get('cpu'))}, torch {env['torch']}, p={args.p}, "
        f"sizes 2^{sizes[0]}..2^{sizes[-1]}, dtypes {','.join(dtypes)}")
    rows: List[Row] = []
    for dt in dtypes:
        for s in sizes:
            # torch.compile is timed at the largest size only (each size is a fresh compilation)
            # unless --compile-every-size.
            with_compile = not args.no_compile and (args.compile_every_size or s == max(sizes))
            bench_dropout(device, dt, 1 << s, args.p, timer, with_compile, rows, log)
            if args.json:
                save_json(args.json, env, args.p, rows)
    if not args.no_fused:
        rows_, cols = (65536, 4096) if device == "cuda" else (4096, 4096)
        if args.quick and device == "cpu":
            rows_ = 1024
        shapes = ([tuple(int(n) for n in shape.split("x")) for shape in args.fused_shapes.split(",")]
                  if args.fused_shapes else [(rows_, cols)])
        for dt in (["bf16"] if "bf16" in dtypes else dtypes[:1]):
            for rows_, cols in shapes:
                bench_bias_dropout_add(device, dt, rows_, cols, args.p, timer, not args.no_compile, rows, log)
                if args.json:
                    save_json(args.json, env, args.p, rows)

    if not args.no_routing:
        for s in sorted({sizes[0], 16}):
            bench_routing(device, 1 << s, args.p, timer, rows, log)
    print(f"# fastdropout.bench: {', '.join(f'{k}={v}' for k, v in env.items())}, p={args.p}")
    print(format_table(rows))
    if args.json:
        save_json(args.json, env, args.p, rows)
        log(f"wrote {args.json}")
    if args.plot:
        log(f"wrote {args.plot}" if plot(rows, args.plot) else "matplotlib is not installed: no chart")
    return 0


if __name__ == "__main__":
    sys.exit(main())
