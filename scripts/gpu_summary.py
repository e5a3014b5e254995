#!/usr/bin/env python3
"""The summary of scripts/gpu_check.sh: every figure of its stages on one page, printed last.

    python scripts/gpu_summary.py --work SCRATCH --out OUT [--deadline 465 --elapsed 312]

Reads what the stages left (SCRATCH/stages.tsv, env.txt, sass.json, bench-*.json; OUT/*.log),
merges the benchmark runs into OUT/bench.json, writes OUT/summary.txt and prints it. Works on
whatever is there: a stage that was skipped or cut short shows as such.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from typing import Dict, List, Optional, Tuple

BENCH_RUNS = ("bench-large", "bench-small", "bench-compile")  # merged in this order


def read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def stage_sections(log: str) -> Dict[str, str]:
    """Each stage's part of a log that several stages append to ('==== stage NAME' headers)."""
    sections: Dict[str, str] = {}
    for m in re.finditer(r"^==== stage (\S+) \(timeout[^\n]*\n(.*?)(?=^==== stage \S+ \(timeout|\Z)", log, re.M | re.S):
        sections[m.group(1)] = sections.get(m.group(1), "") + m.group(2)
    return sections


def pytest_outcome(text: str) -> Tuple[str, List[str]]:
    """('12 passed, 1 failed in 3.2s', ['FAILED tests/...']) from pytest -q -rfE output."""
    finals = re.findall(r"^=*\s*((?:\d+ \w+(?:, )?)+ in [\d.]+s(?: \([^)]*\))?)\s*=*$", text, re.M)
    failed = [line.strip() for line in text.splitlines() if re.match(r"(FAILED|ERROR) ", line.strip())]
    return (finals[-1] if finals else "no pytest result (cut short or did not start)"), failed


def sanitizer_outcome(text: str) -> str:
    found = re.findall(r"(ERROR SUMMARY: .*|RACECHECK SUMMARY: .*)", text)
    if "nothing to check" in text:
        return "not needed: no kernel uses shared memory"
    return "; ".join(s.replace("=", "").strip() for s in found) or "no sanitizer summary (cut short?)"


def sass_lines(path: str) -> List[str]:
    """The SASS report in short: totals, every failure, and the vector kernels' figures (the
    full per-kernel table is in build.log)."""
    if not os.path.exists(path):
        return ["(no SASS report)"]
    data = json.load(open(path))
    kernels = data["kernels"]
    regs = [k["regs"] for k in kernels if k["regs"] is not None]
    lines = [f"cubins: {', '.join(data.get('cubins', [])) or '-'}; PTX: {', '.join(data.get('ptx', [])) or 'none'}",
             f"{len(kernels)} kernel instantiations, registers {min(regs, default=0)}-{max(regs, default=0)}, "
             f"{sum(1 for k in kernels if k['failures'])} failing (local memory, or a vector kernel without 16-byte accesses)"]
    lines += [f"FAIL {k['arch']} {k['kernel']}{k['args']}: {'; '.join(k['failures'])}" for k in kernels if k["failures"]]
    lines.append(f"{'vector kernel<args>':<58}{'regs':>5}{'smem':>6}{'ld16':>5}{'st16':>5}{'<16':>5}"
                 f"{'div':>5}{'mul<ld':>7}{'rng1st':>7}{'keyadd':>8}{'instr':>6}")
    for k in kernels:
        if not k["needs_vector"]:
            continue
        name = f"{k['kernel'].replace('_cuda_kernel', '')}{k['args']}"
        first = "-" if k["rng_before_data"] is None else ("yes" if k["rng_before_data"] else "no")
        mul = "-" if k["muls_before_load"] is None else k["muls_before_load"]
        keyadd = f"{k['key_adds_thread']}/{k['key_adds_uniform']}"
        lines.append(f"{name[:58]:<58}{k['regs']!s:>5}{k['shared']!s:>6}{k['ld16']:>5}{k['st16']:>5}"
                     f"{k['ld_narrow'] + k['st_narrow']:>5}{k['div_calls'] + k['inline_divs']:>5}{mul!s:>7}"
                     f"{first:>7}{keyadd:>8}{k['instructions']:>6}")
    lines.append("(<16: narrower data accesses, tails included; div: division calls + inline; mul<ld: Philox "
                 "multiplies before the first 16-byte load; rng1st: a seed/offset load can run before it; "
                 "keyadd: key-schedule adds per thread/uniform; instr: static count)")
    return lines


def merge_bench(work: str, out: str) -> Tuple[List[dict], dict]:
    rows: List[dict] = []
    env: dict = {}
    runs = {}
    for name in BENCH_RUNS:
        path = os.path.join(work, f"{name}.json")
        if os.path.exists(path):
            try:
                data = json.load(open(path))
            except ValueError:
                continue  # cut short while writing
            runs[name] = len(data["rows"])
            env = env or data.get("environment", {})
            for r in data["rows"]:
                r.setdefault("extra", {})["run"] = name
            rows += data["rows"]
    if rows:
        with open(os.path.join(out, "bench.json"), "w") as f:
            json.dump({"environment": env, "runs": runs, "rows": rows}, f, indent=1)
    return rows, env


def size_label(r: dict) -> str:
    cols = (r.get("extra") or {}).get("columns")
    return f"{r['numel'] // int(cols)}x{int(cols)}" if cols else f"2^{r['numel'].bit_length() - 1}" \
        if r["numel"] & (r["numel"] - 1) == 0 else str(r["numel"])


def bench_lines(rows: List[dict]) -> List[str]:
    """Per (op, dtype, size): the limit (a device copy of the bytes, or the fused op's ideal
    passes at copy speed), then fastdropout's median per mode with its % of the limit, torch
    eager and torch.compile and the speedups, then the first-call rows."""
    if not rows:
        return ["(no benchmark rows)"]
    groups: Dict[Tuple[str, str, str], Dict[Tuple[str, str], dict]] = {}
    for r in rows:
        key = (r["op"], r["dtype"], size_label(r))
        groups.setdefault(key, {})[(r["impl"], r["mode"])] = r  # a later run (compile) refines
    lines = [f"{'':<4}{'mode':<9}{'fastdropout':>12}{'%limit':>7}{'torch':>12}{'speedup':>8}{'compile':>12}{'speedup':>8}"]
    for (op, dtype, size), g in groups.items():
        copy = g.get(("copy", "fwd"))
        ideal = g.get(("ideal", "fwd"))
        limit = (f"copy {copy['ms']:.4f} ms, {copy['gbps']:.0f} GB/s" if copy else
                 f"ideal fwd {ideal['ms']:.4f} ms at copy speed" if ideal else "no limit row")
        lines.append(f"{op} {dtype} {size}: {limit}")
        for mode in ("fwd", "bwd", "fwd+bwd"):
            fd, tr, tc = g.get(("fastdropout", mode)), g.get(("torch", mode)), g.get(("torch.compile", mode))
            if fd is None:
                continue
            lines.append(f"{'':<4}{mode:<9}{fd['ms']:>10.4f}ms{fd['pct_of_limit']:>6.0f}%"
                         + (f"{tr['ms']:>10.4f}ms{tr['ms'] / fd['ms']:>7.2f}x" if tr else f"{'':>20}")
                         + (f"{tc['ms']:>10.4f}ms{tc['ms'] / fd['ms']:>7.2f}x" if tc else ""))
        firsts = sorted((impl, mode) for impl, mode in g if mode.startswith("fwd") and mode not in ("fwd", "fwd+bwd"))
        parts = []
        for impl in ("fastdropout", "torch"):
            got = [g[(i, m)] for i, m in firsts if i == impl]
            steady = g.get((impl, "fwd"))
            if got:
                parts.append(f"{impl} " + ", ".join(f"{r['mode']} {r['ms']:.3f}" for r in got)
                             + (f", steady {steady['ms']:.3f}" if steady else "") + " ms")
        if parts:
            lines.append(f"{'':<4}first calls: " + " | ".join(parts))
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--deadline", type=int, default=None)
    ap.add_argument("--elapsed", type=int, default=None)
    args = ap.parse_args()

    stages = [line.split("\t") for line in read(os.path.join(args.work, "stages.tsv")).splitlines() if line]
    lines = ["", "=" * 100, "fastdropout GPU check: summary", "=" * 100]
    lines += ["-- machine"] + [f"  {line}" for line in read(os.path.join(args.work, "env.txt")).splitlines()
                                if line.strip() and not line.startswith("====")]

    lines += ["", "-- SASS report (sm_90 build)"] + [f"  {line}" for line in sass_lines(os.path.join(args.work, "sass.json"))]

    tests = stage_sections(read(os.path.join(args.out, "tests.log")))
    sanitizer = stage_sections(read(os.path.join(args.out, "sanitizer.log")))
    lines += ["", "-- tests"]
    for name in ("correctness", "cuda-rest", "suite-rest"):
        if name in tests:
            outcome, failed = pytest_outcome(tests[name])
            lines.append(f"  {name:<12} {outcome}")
            lines += [f"      {line[:150]}" for line in failed[:12]]
            if len(failed) > 12:
                lines.append(f"      ... {len(failed) - 12} more in tests.log")
    for name in ("memcheck", "racecheck"):
        if name in sanitizer:
            outcome, failed = pytest_outcome(sanitizer[name])
            lines.append(f"  {name:<12} {sanitizer_outcome(sanitizer[name])}; pytest: {outcome}")
            lines += [f"      {line[:150]}" for line in failed[:6]]

    rows, env = merge_bench(args.work, args.out)
    lines += ["", "-- benchmark (median ms; %limit: of a device copy's time, fused: of the ideal passes)"]
    if env:
        lines.append(f"  {', '.join(f'{k}={v}' for k, v in env.items())}")
    lines += [f"  {line}" for line in bench_lines(rows)]

    lines += ["", "-- stages", f"  {'stage':<14}{'status':<9}{'time':>6}{'budget':>8}  note"]
    failed_stages = []
    for name, status, seconds, budget, *note in stages:
        lines.append(f"  {name:<14}{status:<9}{seconds + 's':>6}{budget + 's':>8}  {note[0] if note else ''}")
        if status in ("FAIL", "timeout"):
            failed_stages.append(f"{name} ({status})")
    if args.elapsed is not None:
        lines.append(f"  total {args.elapsed}s of {args.deadline}s")
    no_gpu = [name for name, status, _, _, *note in stages if status == "skipped" and note and note[0] == "no GPU"]
    if failed_stages:
        lines.append("RESULT: FAIL: " + ", ".join(failed_stages))
    elif no_gpu:
        lines.append("RESULT: INCOMPLETE: no GPU, so no " + ", ".join(no_gpu))
    else:
        lines.append("RESULT: PASS")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
