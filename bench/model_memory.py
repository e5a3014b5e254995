"""Bytes saved for backward and step time of real models, side by side in one run: torch's dropout,
fastdropout.replace_dropout(model), replace_dropout(model, functional=True), which also routes
the functional attention dropout of Hugging Face models, and that with regenerate=True, which
recomputes in backward the dropout outputs other ops save (fastdropout.regenerate_dropout_outputs).

    python bench/model_memory.py                         # the four models, realistic sizes
    python bench/model_memory.py --models gpt2 --seq 512 # one model, shorter sequences
    python bench/model_memory.py --small                 # tiny configs: a smoke test (seconds)
    python bench/model_memory.py --json out.json
    python bench/model_memory.py --models lora,lora0 --dtype bf16   # bf16 weights (or: autocast)

Models, built from configs (no weights, no downloads; needs transformers and timm):
  gpt2      Hugging Face GPT-2 small (12 x 768, 12 heads), eager attention, dropout 0.1 (its default)
  bert      Hugging Face BERT-base (12 x 768, 12 heads), eager attention, dropout 0.1 (its default),
            masked-LM head
  vit       Hugging Face ViT-B/16 at 224 px, eager attention, hidden and attention dropout 0.1
            (the config's default is 0; 0.1 is the ViT paper's setting for training from scratch)
  timm_vit  timm ViT-B/16 at 224 px, DeiT-B recipe: stochastic depth 0.1, no other dropout,
            timm's default fused attention
  lora      a Llama-architecture model (4 layers, d=1024, 16 heads, MLP 2816, vocab 8000, sdpa
            attention) with PEFT LoRA adapters (r=16) on all 7 linear layers, lora_dropout=0.1,
            2 x 1024 tokens; lora0: the same with lora_dropout=0 (needs peft)

--dtype: fp32 (default on the CPU), bf16 (the model's weights in bfloat16), autocast (fp32
weights, bfloat16 autocast; the default on CUDA). Under autocast a linear layer casts its input
and keeps the cast, not the dropout output: regeneration then has nothing to replace there.

"saved for backward" is every tensor autograd keeps for the backward of one training step
(torch.autograd.graph.saved_tensors_hooks), each storage counted once, parameters included.
Step time is forward + backward (no optimizer), the median of --steps rounds, each round timing
one step of each setup in turn (so a machine whose speed drifts slows them alike), after one
warm-up step each. On CUDA the allocated memory that is live after the forward (above the
resident models) and the peak of a step are reported too. torch's model and
a copy of it (same weights) with fastdropout's modules are both resident; the route is held only
while the third setup steps.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch

import _source_tree  # noqa: F401  (a source tree's in-place build, when not installed)
import fastdropout

Batch = Dict[str, torch.Tensor]


def build_gpt2(small: bool, batch: int, seq: int) -> Tuple[torch.nn.Module, Batch, str]:
    from transformers import GPT2Config, GPT2LMHeadModel
    size = dict(n_layer=2, n_embd=64, n_head=4) if small else dict(n_layer=12, n_embd=768, n_head=12)
    model = GPT2LMHeadModel(GPT2Config(**size, n_positions=max(seq, 1024), attn_implementation="eager"))
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    return model, dict(input_ids=ids, labels=ids), f"GPT-2 {'tiny' if small else 'small'}, {batch} x {seq} tokens"


def _encoder_size(small: bool) -> Dict[str, int]:
    """BERT-base / ViT-B sizes, or a tiny stand-in for smoke tests."""
    if small:
        return dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    return dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)


def build_bert(small: bool, batch: int, seq: int) -> Tuple[torch.nn.Module, Batch, str]:
    from transformers import BertConfig, BertForMaskedLM
    model = BertForMaskedLM(BertConfig(**_encoder_size(small), max_position_embeddings=max(seq, 512), attn_implementation="eager"))
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    return model, dict(input_ids=ids, labels=ids), f"BERT-{'tiny' if small else 'base'} MLM, {batch} x {seq} tokens"


def build_vit(small: bool, batch: int, image: int) -> Tuple[torch.nn.Module, Batch, str]:
    from transformers import ViTConfig, ViTForImageClassification
    model = ViTForImageClassification(ViTConfig(**_encoder_size(small), image_size=image, patch_size=16, num_labels=1000,
                                                hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                                                attn_implementation="eager"))
    batch_ = dict(pixel_values=torch.randn(batch, 3, image, image), labels=torch.randint(0, 1000, (batch,)))
    return model, batch_, f"ViT-{'tiny' if small else 'B'}/16 (HF), {batch} x {image} px"


class ClassifierLoss(torch.nn.Module):
    """Cross-entropy around a logits-only model, so every model is called as model(**batch).loss."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, labels):
        return type("Output", (), {"loss": torch.nn.functional.cross_entropy(self.model(pixel_values), labels)})


def build_timm_vit(small: bool, batch: int, image: int) -> Tuple[torch.nn.Module, Batch, str]:
    from timm.models.vision_transformer import VisionTransformer
    size = dict(embed_dim=64, depth=2, num_heads=4) if small else dict(embed_dim=768, depth=12, num_heads=12)
    model = VisionTransformer(img_size=image, patch_size=16, num_classes=1000, drop_path_rate=0.1, **size)
    batch_ = dict(pixel_values=torch.randn(batch, 3, image, image), labels=torch.randint(0, 1000, (batch,)))
    return ClassifierLoss(model), batch_, f"timm ViT-{'tiny' if small else 'B'}/16, drop_path 0.1, {batch} x {image} px"


def _build_lora(lora_dropout: float, small: bool, batch: int, seq: int) -> Tuple[torch.nn.Module, Batch, str]:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    size = (dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, vocab_size=512)
            if small else dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                               num_attention_heads=16, vocab_size=8000))
    model = LlamaForCausalLM(LlamaConfig(**size, num_key_value_heads=size["num_attention_heads"],
                                         max_position_embeddings=max(seq, 1024), attn_implementation="sdpa"))
    model = get_peft_model(model, LoraConfig(
        r=16, lora_alpha=32, lora_dropout=lora_dropout,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    ids = torch.randint(0, size["vocab_size"], (batch, seq))
    return model, dict(input_ids=ids, labels=ids), (f"Llama-arch {'tiny' if small else '4 x 1024'} + LoRA r=16 "
                                                    f"(7 layers), lora_dropout={lora_dropout}, {batch} x {seq} tokens")


def build_lora(small: bool, batch: int, seq: int):
    return _build_lora(0.1, small, batch, seq)


def build_lora0(small: bool, batch: int, seq: int):
    return _build_lora(0.0, small, batch, seq)


# name -> (builder, default batch, default sequence length or image size)
MODELS: Dict[str, Tuple[Callable, int, int]] = {
    "gpt2": (build_gpt2, 1, 1024),
    "bert": (build_bert, 2, 512),
    "vit": (build_vit, 8, 224),
    "timm_vit": (build_timm_vit, 8, 224),
    "lora": (build_lora, 2, 1024),
    "lora0": (build_lora0, 2, 1024),
}
SETUPS = ("torch", "replace_dropout", "functional", "regenerate")


def saved_for_backward(step: Callable[[], torch.Tensor]) -> Tuple[int, torch.Tensor]:
    """Bytes autograd saves while ``step`` runs, each storage once; returns them and its loss."""
    storages: Dict[Tuple[str, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[(str(t.device), storage.data_ptr())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    return sum(storages.values()), loss


class Setup:
    """One of the setups: a model (torch's, or a copy with fastdropout's modules), whether its
    functional dropout is routed while it steps, and whether its dropout outputs are
    regenerated in backward instead of kept."""

    def __init__(self, model: torch.nn.Module, route: bool, regenerate: bool = False):
        self.model, self.route, self.regenerate = model, route, regenerate

    def routed(self):
        """The functional route while this setup runs (its backward too: a checkpointed model
        recomputes there), or nothing."""
        return fastdropout.route_functional_dropout(self.model) if self.route else contextlib.nullcontext()

    def step(self, batch: Batch, device: str, autocast_dtype) -> torch.Tensor:
        self.model.zero_grad(set_to_none=True)
        scope = fastdropout.regenerate_dropout_outputs() if self.regenerate else contextlib.nullcontext()
        with self.routed(), scope, torch.autocast(device, dtype=autocast_dtype or torch.float32,
                                                  enabled=autocast_dtype is not None):
            return self.model(**batch).loss


def measure(setups: Dict[str, Setup], batch: Batch, steps: int, device: str, autocast_dtype,
            log) -> Dict[str, Dict[str, object]]:
    """Saved bytes of each setup (that step is also its warm-up), then ``steps`` rounds that
    time one step of each setup in turn: a machine whose speed drifts affects them alike."""
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    out: Dict[str, Dict[str, object]] = {}
    for name, setup in setups.items():
        log(f"  {name}: saved for backward")
        saved, loss = saved_for_backward(lambda: setup.step(batch, device, autocast_dtype))
        with setup.routed():
            loss.backward()
        del loss
        out[name] = dict(saved_bytes=saved, saved_mib=saved / 2**20, step_times_s=[], peak_mib=None,
                         live_after_forward_mib=None)
    for round_ in range(steps):
        log(f"  timing round {round_ + 1} of {steps}")
        for name, setup in setups.items():
            sync()
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            loss = setup.step(batch, device, autocast_dtype)
            if device == "cuda":
                out[name]["live_after_forward_mib"] = (torch.cuda.memory_allocated() - base) / 2**20
            with setup.routed():
                loss.backward()
            sync()
            out[name]["step_times_s"].append(time.perf_counter() - t0)
            if device == "cuda":
                out[name]["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            del loss
    for result in out.values():
        result["step_s"] = statistics.median(result["step_times_s"]) if result["step_times_s"] else None
    return out


def run_model(name: str, args, log) -> Dict[str, object]:
    builder, default_batch, default_size = MODELS[name]
    torch.manual_seed(0)
    model, batch, label = builder(args.small, args.batch or default_batch, args.seq or default_size)
    model = model.to(args.device).train()
    if args.dtype == "bf16":
        model = model.to(torch.bfloat16)
    batch = {k: v.to(args.device) for k, v in batch.items()}
    if args.dtype == "bf16":
        batch = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()}
    params_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    swapped = copy.deepcopy(model)  # same weights
    replaced = []
    fastdropout.replace_dropout(swapped, replaced=replaced)
    with fastdropout.route_functional_dropout(swapped) as route:
        routed = list(route.modules)
    log(f"{label}: {len(replaced)} modules swapped; functional dropout routed in "
        f"{', '.join(routed) or 'no module (none calls it)'}")
    setups = {"torch": Setup(model, False), "replace_dropout": Setup(swapped, False),
              "functional": Setup(swapped, True), "regenerate": Setup(swapped, True, regenerate=True)}
    result: Dict[str, object] = dict(model=name, label=label, params_mib=params_mib,
                                     modules_swapped=len(replaced), modules_routed=routed)
    result.update(measure(setups, batch, args.steps, args.device, args.autocast, log))
    return result


def format_table(results: List[Dict[str, object]], device: str) -> str:
    heads = ("torch", "`replace_dropout`", "+ `functional=True`", "+ `regenerate=True`")
    lines = ["| model | saved for backward: " + " | ".join(heads) + " | step: " + " | ".join(heads) + " |"
             + (" live after forward: torch | + regenerate | peak: torch | + regenerate |" if device == "cuda" else ""),
             "|---|" + "---|" * (2 * len(SETUPS)) + ("---|" * 4 if device == "cuda" else "")]
    for r in results:
        base = r["torch"]["saved_mib"]
        saved = [f"{r[c]['saved_mib']:.0f} MiB" + ("" if c == "torch" else f" ({100 * (1 - r[c]['saved_mib'] / base):.1f}% less)")
                 for c in SETUPS]
        steps = ["not timed" if r[c]["step_s"] is None else f"{r[c]['step_s']:.2f} s" for c in SETUPS]
        row = f"| {r['label']} ({r['modules_swapped']} modules swapped) | " + " | ".join(saved + steps) + " |"
        if device == "cuda":
            row += "".join(f" {r[c][k]:.0f} MiB |" for k in ("live_after_forward_mib", "peak_mib")
                           for c in ("torch", "regenerate"))
        lines.append(row)
    return "\n".join(lines)


def environment(device: str) -> Dict[str, str]:
    import importlib.metadata as md
    env = {"torch": torch.__version__, "fastdropout": fastdropout.__version__, "python": platform.python_version(),
           "device": device, "threads": str(torch.get_num_threads()), "date": time.strftime("%Y-%m-%d")}
    for pkg in ("transformers", "timm", "peft"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = "not installed"
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() and fastdropout.cuda_kernels_built() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="default per model: gpt2 1, bert 2, vit 8, timm_vit 8, lora 2")
    ap.add_argument("--seq", type=int, default=None, help="tokens (gpt2 1024, bert 512, lora 1024) or image size (224)")
    ap.add_argument("--steps", type=int, default=3,
                    help="timing rounds (one step of each setup per round); 0: saved bytes only")
    ap.add_argument("--dtype", choices=("fp32", "bf16", "autocast"), default=None,
                    help="fp32, bf16 weights, or fp32 weights under bf16 autocast (default: autocast on "
                         "CUDA, fp32 on the CPU)")
    ap.add_argument("--bf16", action="store_true", help="the same as --dtype autocast")
    ap.add_argument("--small", action="store_true", help="tiny configs: a smoke test")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    names = args.models.split(",")
    for n in names:
        if n not in MODELS:
            ap.error(f"unknown model {n!r}; choose from {', '.join(MODELS)}")
    if args.dtype is None:
        args.dtype = "autocast" if (args.bf16 or args.device == "cuda") else "fp32"
    args.autocast = torch.bfloat16 if args.dtype == "autocast" else None

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    env = environment(args.device)
    env["dtype"] = args.dtype
    results = [run_model(n, args, log) for n in names]
    print(f"# bench/model_memory.py: {', '.join(f'{k}={v}' for k, v in env.items())}, "
          f"{dict(fp32='fp32', bf16='bf16 weights', autocast='fp32 weights, bf16 autocast')[args.dtype]}, "
          f"step time: median of {args.steps} rounds")
    print(format_table(results, args.device))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "results": results}, f, indent=1)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
