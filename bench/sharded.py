"""Benchmark rows for the sharded ops (DTensor shards): the same local bytes through each
unsharded op (fastdropout::dropout, dropout_, dropout_backward, channel dropout with channels
of 64 elements, bias_dropout_add and its backward, on the local tensor) and through its
sharded form (fastdropout::sharded_*, the same kernel handed the map from local runs to global
indices), for runs of several lengths, with global run starts at multiples of 8 and not; and,
as the control, each op handed a map of one run (run start "one run"), whose kernels run as
unsharded, to show the sharded ops' own overhead per call.

    python bench/sharded.py [--device cpu|cuda] [--numel 16777216] [--dtype float32]
                            [--ops dropout bias_dropout_add ...] [--run-lengths 256 ...]
                            [--json]

A shard of a (rows, columns) tensor split on its columns over 2 ranks has runs of columns / 2
elements starting columns apart; "aligned" runs start at multiples of 8, "unaligned" ones at
8k + 3 (the kernel then draws two Philox calls for some groups of 8). For channel dropout the
start is counted in channels, its mask indices.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import _source_tree  # noqa: F401  (a source tree's in-place build, when not installed)
import fastdropout
import fastdropout.dtensor as fdt

ops = torch.ops.fastdropout
CHANNEL = 64  # channel dropout's channels, in elements


def _time_ms(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def _paired(unsharded, sharded, device: str, repeats: int):
    """Both passes timed alternately, so that load from other processes hits both alike: the
    fastest time of each and the median of the per-pair ratios."""
    unsharded(), sharded()
    pairs = [(_time_ms(unsharded, device), _time_ms(sharded, device)) for _ in range(repeats)]
    return (min(u for u, _ in pairs), min(s for _, s in pairs),
            statistics.median(s / u for u, s in pairs))


def _ops_for(x, bias, residual, rng_state, rmap, channel_rmap):
    """(name, unsharded call, sharded call) for every sharded op, over the same local bytes."""
    return [
        ("dropout", lambda: ops.dropout(x, 0.1, 1, 0, None, 1),
         lambda: ops.sharded_dropout(x, 0.1, *rmap, 1, 0, None, 1)),
        ("dropout_", lambda: ops.dropout_(x, 0.1, 1, 0, None, 1),
         lambda: ops.sharded_dropout_(x, 0.1, *rmap, 1, 0, None, 1)),
        ("dropout_backward", lambda: ops.dropout_backward(x, rng_state, 0.1, 1),
         lambda: ops.sharded_dropout_backward(x, rng_state, 0.1, *rmap, 1)),
        # channel dropout, channels of CHANNEL elements (dropout2d on 8 x 8 feature maps)
        ("dropout2d", lambda: ops.dropout(x, 0.1, 1, 0, None, CHANNEL),
         lambda: ops.sharded_dropout(x, 0.1, *channel_rmap, 1, 0, None, CHANNEL)),
        ("bias_dropout_add", lambda: ops.bias_dropout_add(x, bias, residual, 0.1, 1, 0, None),
         lambda: ops.sharded_bias_dropout_add(x, bias, residual, 0.1, *rmap, 1, 0, None)),
        ("bias_dropout_add_backward", lambda: ops.bias_dropout_add_backward(x, rng_state, 0.1),
         lambda: ops.sharded_bias_dropout_add_backward(x, rng_state, 0.1, *rmap)),
    ]


def rows(numel: int, dtype: torch.dtype, device: str, repeats: int, op_names=None,
         run_lengths=None):
    """One row per op, run length and run start: the unsharded and the sharded pass over the
    same local bytes."""
    out = []
    # The control: the sharded ops handed a map of one run (the whole local tensor), whose
    # kernels run as unsharded: what is left is the sharded ops' own overhead per call (the map's
    # arguments and their checks, sharded_ops.cpp).
    x = torch.randn(numel, device=device).to(dtype)
    rng_state = ops.dropout(x, 0.1, 1, 0, None, 1)[1]
    one_run = (numel, [1], [numel], 0)
    for name, unsharded, sharded in _ops_for(x, x[:1], x, rng_state, one_run, one_run):
        if (op_names and name not in op_names) or name.startswith("bias"):
            continue
        base, t, ratio = _paired(unsharded, sharded, device, repeats)
        out.append({"device": device, "dtype": str(dtype).replace("torch.", ""), "op": name,
                    "numel": numel, "run_length": numel, "run_start": "one run",
                    "unsharded_ms": round(base, 3), "sharded_ms": round(t, 3),
                    "sharded_vs_unsharded": round(ratio, 3)})
    for run_length in run_lengths or (256, 1024, 4096, 1 << 16, numel // 2):
        runs = numel // run_length
        x = torch.randn(runs, run_length, device=device).to(dtype)
        residual = torch.randn(runs, run_length, device=device).to(dtype)
        bias = torch.randn(run_length, device=device).to(dtype)
        rng_state = ops.dropout(x, 0.1, 1, 0, None, 1)[1]
        for start in (0, 3):
            # The local tensor is the columns [start, start + run_length) of a tensor
            # 2 * run_length wide.
            rmap = fdt.run_map((runs, 2 * run_length), (runs, run_length), (0, start))
            # Channel dropout's mask index is the channel: its runs start at channel 8k or
            # 8k + 3. (A DTensor shard's runs hold whole channels or lie inside one; runs that
            # cut channels anywhere are tested, not benchmarked.)
            channel_rmap = fdt.run_map((runs, 2 * run_length), (runs, run_length),
                                       (0, start * CHANNEL))
            for name, unsharded, sharded in _ops_for(x, bias, residual, rng_state, rmap,
                                                     channel_rmap):
                if op_names and name not in op_names:
                    continue
                base, t, ratio = _paired(unsharded, sharded, device, repeats)
                out.append({"device": device, "dtype": str(dtype).replace("torch.", ""),
                            "op": name, "numel": runs * run_length, "run_length": run_length,
                            "run_start": "aligned" if start == 0 else "8k+3",
                            "unsharded_ms": round(base, 3), "sharded_ms": round(t, 3),
                            "sharded_vs_unsharded": round(ratio, 3)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--numel", type=int, default=1 << 24)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--ops", nargs="*", help="only these ops (default: all)")
    parser.add_argument("--run-lengths", nargs="*", type=int,
                        help="only these run lengths (default: 256 1024 4096 65536 numel/2)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    table = rows(args.numel, getattr(torch, args.dtype), args.device, args.repeats, args.ops,
                 args.run_lengths)
    if args.json:
        print(json.dumps(table, indent=1))
        return
    print(f"fastdropout {fastdropout.__version__}, torch {torch.__version__}, {args.device}, "
          f"{torch.get_num_threads()} threads, {args.repeats} alternating pairs: fastest times, "
          "median ratio")
    print(f"{'op':>25} {'run length':>10} {'run start':>9} {'unsharded ms':>12} {'sharded ms':>10} "
          f"{'ratio':>6}")
    for r in table:
        print(f"{r['op']:>25} {r['run_length']:>10} {r['run_start']:>9} {r['unsharded_ms']:>12.3f} "
              f"{r['sharded_ms']:>10.3f} {r['sharded_vs_unsharded']:>6.3f}")


if __name__ == "__main__":
    main()
