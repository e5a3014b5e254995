"""A GPT-2-style model (Hugging Face transformers, built from a config: no weights to download)
trained three ways, side by side: torch's dropout; fastdropout.replace_dropout(model), which
swaps the nn.Dropout modules; and replace_dropout(model, functional=True), which also routes
the functional attention dropout of transformers' eager attention to fastdropout. Reported:
step time, tokens/s, peak memory, and the loss curves (they should agree statistically, not bit
for bit: the masks differ).

    python examples/transformer.py                      # GPU if present: GPT-2 small-ish
    python examples/transformer.py --device cpu         # a tiny config, a minute or so
    python examples/transformer.py --steps 300 --plot gpt2.png
    python examples/transformer.py --memory-table       # then bench/model_memory.py's table for
                                                        # GPT-2, BERT, ViT and a timm ViT

The data is a synthetic but learnable token stream (a noisy modular-arithmetic language), so
the loss falls and the two runs can be compared.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import fastdropout


def synthetic_batch(gen, batch, seq, vocab, device):
    """Sequences where token t+1 = (a * token t + b) mod vocab, with 10% noise: learnable."""
    a = torch.randint(1, 8, (batch, 1), generator=gen)
    b = torch.randint(0, vocab, (batch, 1), generator=gen)
    tokens = torch.empty(batch, seq, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)
    for t in range(1, seq):
        tokens[:, t] = (a[:, 0] * tokens[:, t - 1] + b[:, 0]) % vocab
    noise = torch.rand(batch, seq, generator=gen) < 0.1
    tokens[noise] = torch.randint(0, vocab, (int(noise.sum()),), generator=gen)
    return tokens.to(device)


# label -> what replace_dropout is asked to do (None: torch's dropout throughout)
SETUPS = {"nn.Dropout": None, "replace_dropout": dict(functional=False),
          "+functional": dict(functional=True)}


def build(config_kwargs, device, setup, seed):
    """The same initial weights for every setup. A functional route is held by code (every
    GPT-2 in the process routes while it is held): the caller removes it after the run."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**config_kwargs))
    replaced, routed = [], []
    if SETUPS[setup] is not None:
        fastdropout.replace_dropout(model, replaced=replaced, routed=routed, **SETUPS[setup])
    return model.to(device).train(), replaced, routed


def run(label, model, args, device, dtype):
    gen = torch.Generator().manual_seed(args.seed)  # the same batches for both runs
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses, times = [], []
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(args.seed)
    for step in range(args.steps):
        tokens = synthetic_batch(gen, args.batch, args.seq, args.vocab, device)
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=tokens, labels=tokens).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"{label:<15} step {step:4d}  loss {loss.item():.4f}  {times[-1] * 1e3:7.1f} ms", flush=True)
    warm = times[min(5, len(times) - 1):]
    step_ms = statistics.median(warm) * 1e3
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
    return dict(losses=losses, step_ms=step_ms, tokens_per_s=args.batch * args.seq / (step_ms / 1e3), peak_mib=peak)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--lr", type=float, default=None, help="default 3e-4 on CUDA, 1e-3 on the CPU")
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attn", default="eager", choices=["eager", "sdpa"],
                    help="attention implementation; sdpa applies its dropout inside the kernel, "
                         "where no route reaches it")
    ap.add_argument("--plot", default="transformer_dropout.png")
    ap.add_argument("--memory-table", action="store_true",
                    help="afterwards, run bench/model_memory.py on this device (four models)")
    args = ap.parse_args()
    device = args.device
    if device == "cuda":
        cfg = dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024)
        args.steps, args.batch, args.seq = args.steps or 200, args.batch or 16, args.seq or 1024
        args.lr = args.lr or 3e-4
        dtype = torch.bfloat16
    else:
        cfg = dict(n_layer=2, n_head=4, n_embd=128, n_positions=128)
        args.steps, args.batch, args.seq = args.steps or 60, args.batch or 8, args.seq or 64
        args.lr = args.lr or 1e-3
        dtype = torch.float32
    cfg.update(vocab_size=args.vocab, bos_token_id=0, eos_token_id=0, attn_implementation=args.attn,
               resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.dropout)
    print(f"GPT-2 config {cfg}, batch {args.batch} x {args.seq} tokens, {args.steps} steps, {device} "
          f"{torch.cuda.get_device_name() if device == 'cuda' else ''}, torch {torch.__version__}, {dtype}")

    results = {}
    for label in SETUPS:
        model, replaced, routed = build(cfg, device, label, args.seed)
        if SETUPS[label] is not None:
            print(f"{label}: {len(replaced)} nn.Dropout modules swapped"
                  + (f", functional dropout routed in {', '.join(routed)}" if routed else ""))
        try:
            results[label] = run(label, model, args, device, dtype)
        finally:
            fastdropout.unroute_functional_dropout(model)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()

    print("\nresult (median step after 5 warm-up steps):")
    for label, r in results.items():
        tail = r["losses"][-max(1, args.steps // 5):]
        peak = f"{r['peak_mib']:8.0f} MiB" if device == "cuda" else "     n/a"
        print(f"  {label:<15} step {r['step_ms']:8.1f} ms   {r['tokens_per_s']:10.0f} tokens/s   "
              f"peak {peak}   mean loss of last {len(tail)} steps {statistics.mean(tail):.4f}")
    a = results["nn.Dropout"]
    for label in ("replace_dropout", "+functional"):
        b = results[label]
        print(f"  {label} / nn.Dropout: step time x{b['step_ms'] / a['step_ms']:.3f}"
              + (f", peak memory x{b['peak_mib'] / a['peak_mib']:.3f}" if device == "cuda" else ""))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, r in results.items():
            ax.plot(r["losses"], label=label, alpha=0.8)
        ax.set(xlabel="step", ylabel="training loss", title="GPT-2-style model: torch's dropout vs fastdropout")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"wrote {args.plot}")
    except ImportError:
        print("matplotlib is not installed: no chart")
    if args.memory_table:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
        import model_memory
        print("\nbench/model_memory.py (saved for backward and step time, four models):", flush=True)
        model_memory.main(["--device", device, "--models", "gpt2,bert,vit,timm_vit"])


if __name__ == "__main__":
    main()
