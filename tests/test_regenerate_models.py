"""replace_dropout(model, regenerate=True) on real model code, built from small configs (no
weights, no downloads): Hugging Face GPT-2 (eager attention, functional dropout routed) and a
Llama-architecture model with PEFT LoRA adapters on all seven linear layers. With the same
seeds the gradients are bit for bit those without regeneration, and the model keeps the bytes
it keeps without dropout (plus the 16-byte state of each dropout call)."""
import copy

import pytest
import torch

import fastdropout
from conftest import bits_equal
from test_hf_models import _gpt2
from test_regenerate import STATE, saved



def _lora(lora_dropout):
    tr = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = tr.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         attn_implementation="sdpa")
    model = peft.get_peft_model(tr.LlamaForCausalLM(cfg), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=lora_dropout, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    return model, dict(input_ids=ids, labels=ids)


def _step(model, batch, seed=5):
    def run():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        return model(**batch).loss
    return run


def _grads(model):
    return [p.grad for p in model.parameters() if p.requires_grad]


def _check(model, batch, without_dropout_bytes):
    """Gradients with regeneration == without, bit for bit; bytes == the model without dropout."""
    kept, loss = saved(_step(model, batch))
    loss.backward()
    want = [g.clone() for g in _grads(model)]
    fastdropout.replace_dropout(model, regenerate=True)
    regenerated, loss = saved(_step(model, batch))
    loss.backward()
    assert all(bits_equal(a, b) for a, b in zip(want, _grads(model)))
    states = sum(1 for n in regenerated.values() if n == STATE)
    assert states > 0
    assert sum(regenerated.values()) == without_dropout_bytes + STATE * states
    assert sum(kept.values()) > sum(regenerated.values())
    fastdropout.unroute_functional_dropout(model)
    return sum(kept.values()), sum(regenerated.values())


def test_gpt2_keeps_the_bytes_of_gpt2_without_dropout():
    model, batch = _gpt2()
    model.train()
    no_dropout = copy.deepcopy(model)
    for m in no_dropout.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    no_dropout.config.attn_pdrop = 0.0
    for block in no_dropout.transformer.h:
        block.attn.attn_dropout.p = 0.0
        block.attn.config.attn_pdrop = 0.0
    fastdropout.replace_dropout(no_dropout, functional=True)
    base, _ = saved(_step(no_dropout, batch))
    fastdropout.unroute_functional_dropout(no_dropout)
    fastdropout.replace_dropout(model, functional=True)
    _check(model, batch, sum(base.values()))


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("scope", ["around the checkpointed layers", "inside them"])
def test_gpt2_with_transformers_gradient_checkpointing(scope, reentrant):
    model, batch = _gpt2()
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    fastdropout.replace_dropout(model, functional=True)
    _step(model, batch)().backward()
    want = [g.clone() for g in _grads(model)]
    # transformers checkpoints each block's forward (not its __call__): a scope opened by the
    # model's forward is outside the checkpointed blocks, one opened by each block's attention
    # module is inside, and opens again in the recomputation.
    scoped = [model] if scope == "around the checkpointed layers" else [b.attn for b in model.transformer.h]
    for module in scoped:
        fastdropout.replace_dropout(module, regenerate=True)
    _step(model, batch)().backward()
    assert all(bits_equal(a, b) for a, b in zip(want, _grads(model)))
    for module in scoped:
        fastdropout.unroute_functional_dropout(module)


def test_lora_at_dropout_01_keeps_the_bytes_of_lora_at_0():
    without, batch = _lora(0.0)
    base, _ = saved(_step(without, batch))
    model, _ = _lora(0.1)
    fastdropout.replace_dropout(model)
    kept, regenerated = _check(model, batch, sum(base.values()))
    assert kept > sum(base.values())


def test_lora_under_cpu_autocast_same_gradients():
    model, batch = _lora(0.1)
    fastdropout.replace_dropout(model)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _step(model, batch)()

    step().backward()
    want = [g.clone() for g in _grads(model)]
    fastdropout.replace_dropout(model, regenerate=True)
    step().backward()
    assert all(bits_equal(a, b) for a, b in zip(want, _grads(model)))
    fastdropout.unroute_functional_dropout(model)


def test_compiled_gpt2_in_scope_matches_eager():
    torch._dynamo.reset()
    model, batch = _gpt2()
    model.train()
    fastdropout.replace_dropout(model, functional=True)
    eager_loss = _step(model, batch)()
    eager_loss.backward()
    want = [g.clone() for g in _grads(model)]
    compiled = torch.compile(model, backend="aot_eager")
    fastdropout.replace_dropout(model, regenerate=True)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    loss = compiled(**batch).loss
    loss.backward()
    assert bits_equal(loss, eager_loss)
    assert all(bits_equal(a, b) for a, b in zip(want, _grads(model)))
    fastdropout.unroute_functional_dropout(model)


def test_model_memory_bench_rows(tmp_path, capsys):
    """bench/model_memory.py's regenerate column, on tiny configs: fewer bytes than the
    functional route for GPT-2, and LoRA at lora_dropout=0.1 within the dropout states of
    LoRA at 0."""
    pytest.importorskip("peft")
    import json
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    import model_memory
    out = tmp_path / "memory.json"
    model_memory.main(["--small", "--device", "cpu", "--models", "gpt2,lora,lora0", "--steps", "1",
                       "--json", str(out)])
    rows = {r["model"]: r for r in json.loads(out.read_text())["results"]}
    assert "regenerate" in capsys.readouterr().out
    gpt2 = rows["gpt2"]
    assert gpt2["regenerate"]["saved_bytes"] < gpt2["functional"]["saved_bytes"] < gpt2["torch"]["saved_bytes"]
    lora, lora0 = rows["lora"], rows["lora0"]
    assert lora["regenerate"]["saved_bytes"] < lora["replace_dropout"]["saved_bytes"]
    extra = lora["regenerate"]["saved_bytes"] - lora0["regenerate"]["saved_bytes"]
    assert 0 < extra <= STATE * 7 * 2  # one state per adapter dropout: 7 layers x 2 blocks
