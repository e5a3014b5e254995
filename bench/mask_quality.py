"""Statistical battery over fastdropout's mask bits (Philox4x32-10, 16 bits per element).

    python bench/mask_quality.py                  # 2^30 bits, writes bench/MASK_QUALITY.md
    python bench/mask_quality.py --log2-bits 22   # a quick run (tests/test_mask_quality.py)

Every check is a z-score (or the largest of a family of z-scores) against the exact binomial
distribution of an ideal generator, and passes when |z| <= 5 (two-sided P = 5.7e-7 per check).
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch

import _source_tree  # noqa: F401  (a source tree's in-place build, when not installed)
import fastdropout

SIGMA_BOUND = 5.0


def z_binomial(count: float, trials: float, prob: float) -> float:
    return (count - trials * prob) / math.sqrt(trials * prob * (1 - prob))


def battery(log2_bits: int, seed: int = 20261128):
    n = 1 << log2_bits
    results = []

    def check(name, z, detail):
        results.append((name, float(z), detail, abs(z) <= SIGMA_BOUND))

    torch.set_num_threads(max(1, torch.get_num_threads()))
    bits = fastdropout.dropout_mask(n, 0.5, seed=seed).numpy()  # p = 0.5: each bit a fair coin
    ones = int(np.count_nonzero(bits))
    check("monobit (p = 0.5)", z_binomial(ones, n, 0.5), f"{ones} ones of {n}")

    # Wald-Wolfowitz runs test on the bit sequence.
    runs = 1 + int(np.count_nonzero(bits[1:] != bits[:-1]))
    n1, n0 = ones, n - ones
    mean = 1 + 2 * n1 * n0 / n
    var = 2 * n1 * n0 * (2 * n1 * n0 - n) / (n * n * (n - 1))
    check("runs", (runs - mean) / math.sqrt(var), f"{runs} runs, expected {mean:.0f}")

    groups = bits.reshape(-1, 8)
    worst, where = 0.0, ""
    for a in range(8):
        for b in range(a + 1, 8):
            agree = int(np.count_nonzero(groups[:, a] == groups[:, b]))
            z = z_binomial(agree, len(groups), 0.5)
            if abs(z) > abs(worst):
                worst, where = z, f"lanes {a},{b}"
    check("lane pairs within a Philox call (28 pairs, largest abs(z))", worst, where)
    worst, where = 0.0, ""
    for lane in range(8):
        col = groups[:, lane]
        z = z_binomial(int(np.count_nonzero(col[1:] == col[:-1])), len(col) - 1, 0.5)
        if abs(z) > abs(worst):
            worst, where = z, f"lane {lane}"
        z = z_binomial(int(np.count_nonzero(col)), len(col), 0.5)
        if abs(z) > abs(worst):
            worst, where = z, f"lane {lane} keep rate"
    check("same lane of consecutive groups, and per-lane keep rate (16 checks, largest abs(z))", worst, where)
    agree = int(np.count_nonzero(groups[:-1, 7] == groups[1:, 0]))
    check("lane 7 with the next group's lane 0", z_binomial(agree, len(groups) - 1, 0.5), "")
    del bits, groups

    # Keep rate at p = 0.1 (t = 6554) on another 2^(k-1) elements, other seed and offset.
    m = n // 2
    q = 1 - round(0.1 * 65536) / 65536
    kept = int(fastdropout.dropout_mask(m, 0.1, seed=seed + 1, offset=2**40).sum())
    check("keep rate at p = 0.1", z_binomial(kept, m, q), f"{kept} kept of {m}, expected rate {q:.6f}")

    # Per-position keep frequency across many seeds: positions 0..4095, n / 2 / 4096 seeds.
    positions = 4096
    seeds = max(64, m // positions)
    counts = np.zeros(positions, dtype=np.int64)
    for s in range(seeds):
        counts += fastdropout.dropout_mask(positions, 0.1, seed=s * 0x9E3779B97F4A7C15 % 2**64).numpy()
    zs = (counts - seeds * q) / math.sqrt(seeds * q * (1 - q))
    # the largest of 4096 |z|: compare with the Bonferroni-free 5-sigma bound per position
    check(f"per-position keep frequency over {seeds} seeds (4096 positions, largest abs(z))",
          float(zs[np.argmax(np.abs(zs))]), f"position {int(np.argmax(np.abs(zs)))}")
    chi2 = float((zs ** 2).sum())
    # chi-square with 4096 dof ~ N(4096, 2 * 4096)
    check("per-position chi-square (4096 dof, as z)", (chi2 - positions) / math.sqrt(2 * positions),
          f"chi2 = {chi2:.0f}")
    total_bits = n + m + seeds * positions
    return results, total_bits


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log2-bits", type=int, default=30)
    ap.add_argument("--out", default=None, help="write a Markdown report here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    results, total = battery(args.log2_bits)
    lines = [f"Mask quality battery: {total} mask bits (2^{args.log2_bits} at p = 0.5 plus the p = 0.1 checks), "
             f"fastdropout {fastdropout.__version__}, torch {torch.__version__}, {time.perf_counter() - t0:.0f} s",
             "", "| check | z | detail | within 5 sigma |", "|---|---|---|---|"]
    for name, z, detail, ok in results:
        lines.append(f"| {name} | {z:+.2f} | {detail} | {'yes' if ok else 'NO'} |")
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# Mask quality\n\nCommand: `python bench/mask_quality.py --log2-bits "
                    f"{args.log2_bits} --out {args.out}`\n\n" + report + "\n")
    return 0 if all(ok for *_, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())
