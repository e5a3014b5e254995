"""Real model code: Hugging Face GPT-2, BERT and ViT (eager attention, whose attention dropout is
a functional call) and a timm ViT with stochastic depth, built from small configs (no weights,
no downloads). With replace_dropout(model, functional=True) every dropout kernel that runs is
fastdropout's, as many as torch ran before; eval mode is bit for bit the unmodified model;
training-mode losses have torch's distribution. transformers and timm are test extras: each
model's tests skip without its library."""
import contextlib
import math
import statistics
import sys

import pytest
import torch

import fastdropout
from dropout_counter import DropoutCalls


def _gpt2():
    tr = pytest.importorskip("transformers")
    cfg = tr.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=128, bos_token_id=0,
                        eos_token_id=0, attn_implementation="eager")  # defaults: every dropout 0.1
    model = tr.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    return model, dict(input_ids=ids, labels=ids)


def _bert():
    tr = pytest.importorskip("transformers")
    cfg = tr.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, attn_implementation="eager")
    model = tr.BertForMaskedLM(cfg)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(2))
    return model, dict(input_ids=ids, labels=ids)


def _vit():
    tr = pytest.importorskip("transformers")
    cfg = tr.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, num_labels=10, hidden_dropout_prob=0.1,
                       attention_probs_dropout_prob=0.1, attn_implementation="eager")
    model = tr.ViTForImageClassification(cfg)
    gen = torch.Generator().manual_seed(3)
    return model, dict(pixel_values=torch.randn(4, 3, 32, 32, generator=gen),
                       labels=torch.randint(0, 10, (4,), generator=gen))


class _TimmLoss(torch.nn.Module):
    """timm models return logits; the loss is taken here, so every model is called alike."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, labels):
        logits = self.model(pixel_values)
        return type("Output", (), {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits})


def _timm_vit():
    vit = pytest.importorskip("timm.models.vision_transformer")
    model = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10,
                                  drop_rate=0.1, pos_drop_rate=0.1, proj_drop_rate=0.1, attn_drop_rate=0.1,
                                  drop_path_rate=0.2)
    for layer in model.modules():
        if hasattr(layer, "fused_attn"):
            # The dropout inside scaled_dot_product_attention is out of any route's reach; timm's
            # unfused path applies its attn_drop module, which replace_dropout swaps.
            layer.fused_attn = False
    gen = torch.Generator().manual_seed(4)
    return _TimmLoss(model), dict(pixel_values=torch.randn(4, 3, 32, 32, generator=gen),
                                  labels=torch.randint(0, 10, (4,), generator=gen))


MODELS = {"gpt2": _gpt2, "bert": _bert, "vit": _vit, "timm_vit": _timm_vit}


def build(name, seed=0):
    torch.manual_seed(seed)
    model, inputs = MODELS[name]()
    return model.train(), inputs


@contextlib.contextmanager
def fastdropout_everywhere(model):
    """replace_dropout(model, functional=True), unrouted on exit (the route is held by code)."""
    replaced, routed = [], []
    fastdropout.replace_dropout(model, functional=True, replaced=replaced, routed=routed)
    try:
        yield replaced, routed
    finally:
        fastdropout.unroute_functional_dropout(model)
        for name in routed:
            assert sys.modules[name].nn is torch.nn  # torch's objects are back


def _loss(model, inputs):
    return model(**inputs).loss


@pytest.mark.parametrize("name", MODELS)
def test_every_dropout_call_goes_through_fastdropout(name):
    model, inputs = build(name)
    with DropoutCalls() as torch_run:
        _loss(model, inputs).backward()
    assert torch_run.fastdropout == 0 and torch_run.torch > 0
    with fastdropout_everywhere(model) as (replaced, routed):
        assert replaced
        if name != "timm_vit":  # Hugging Face's attention dropout is functional: routed, not swapped
            assert len(routed) == 1 and routed[0].endswith(f"modeling_{name}")
        else:
            assert any(r.endswith(("drop_path", "drop_path1", "drop_path2")) for r in replaced)
        with DropoutCalls() as ours:
            _loss(model, inputs).backward()
    assert ours.torch == 0
    assert ours.fastdropout == torch_run.torch, (torch_run.ops, ours.ops)


@pytest.mark.parametrize("name", MODELS)
def test_eval_mode_is_exactly_the_unmodified_model(name):
    model, inputs = build(name)
    model.eval()
    with torch.no_grad():
        want = model(**inputs).logits
        with fastdropout_everywhere(model):
            got = model(**inputs).logits
    assert torch.equal(got, want)


def _z(a, b):
    """Two-sample z statistic of the means of a and b (independent draws)."""
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return (statistics.mean(a) - statistics.mean(b)) / se


@pytest.mark.parametrize("name", MODELS)
def test_training_mode_loss_has_torchs_distribution(name):
    """Fixed weights and batch, fresh masks per draw: the losses under fastdropout and under torch's
    dropout are two samples of one distribution; their means agree within 5 standard errors."""
    model, inputs = build(name)
    draws = 32
    torch.manual_seed(10)
    with torch.no_grad():
        theirs = [_loss(model, inputs).item() for _ in range(draws)]
        with fastdropout_everywhere(model):
            ours = [_loss(model, inputs).item() for _ in range(draws)]
    assert statistics.stdev(theirs) > 0 and statistics.stdev(ours) > 0  # dropout is on in both
    assert abs(_z(ours, theirs)) <= 5.0, (statistics.mean(ours), statistics.mean(theirs))


def test_gpt2_training_runs_track_torch():
    """Four short training runs each (same initial weights and batches, different dropout seeds):
    the mean loss of the last steps is statistically the same with fastdropout as with torch
    (Welch statistic within 5), and both learn."""
    tr = pytest.importorskip("transformers")
    steps, seeds = 12, range(4)
    vocab, seq = 32, 16
    gen = torch.Generator().manual_seed(0)
    start = torch.randint(0, vocab, (steps, 4, 1), generator=gen)
    batches = (start + torch.arange(seq)) % vocab  # learnable: each token is the previous plus one

    def run(use_fastdropout, seed):
        torch.manual_seed(0)
        model = tr.GPT2LMHeadModel(tr.GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=seq,
                                                 vocab_size=vocab, bos_token_id=0, eos_token_id=0,
                                                 attn_implementation="eager")).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ctx = fastdropout_everywhere(model) if use_fastdropout else contextlib.nullcontext()
        losses = []
        torch.manual_seed(100 + seed)
        with ctx:
            for ids in batches:
                loss = model(input_ids=ids, labels=ids).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
        return losses

    theirs = [run(False, s) for s in seeds]
    ours = [run(True, s) for s in seeds]
    tail = lambda runs: [statistics.mean(r[-4:]) for r in runs]  # noqa: E731
    for runs in (theirs, ours):
        assert all(statistics.mean(r[-4:]) < 0.8 * r[0] for r in runs)  # both learn
    assert abs(_z(tail(ours), tail(theirs))) <= 5.0, (tail(ours), tail(theirs))


def test_gpt2_compile_fullgraph_draws_every_mask_with_fastdropout():
    from torch._dynamo.testing import CompileCounterWithBackend
    model, inputs = build("gpt2")
    ids = inputs["input_ids"]
    torch._dynamo.reset()
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    # the loss (and transformers' logging around it) stays outside the compiled region
    loss = lambda m: m(input_ids=ids).logits.float().square().mean()  # noqa: E731
    with DropoutCalls() as eager_torch:
        loss(model)
    with fastdropout_everywhere(model):
        torch.manual_seed(7)
        got = loss(compiled)
        got.backward()
        torch.manual_seed(7)
        want = loss(model)
    targets = [str(n.target) for n in backend.graphs[-1].graph.nodes if n.op == "call_function"]
    assert targets.count("fastdropout.dropout") == eager_torch.torch
    assert not any("dropout" in t and t != "fastdropout.dropout" for t in targets)
    assert torch.equal(got, want)


def test_gpt2_gradient_checkpointing_recomputes_through_fastdropout():
    model, inputs = build("gpt2")

    def grads():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        _loss(model, inputs).backward()
        return [p.grad.clone() for p in model.parameters()]

    with fastdropout_everywhere(model):
        with DropoutCalls() as plain_calls:
            plain = grads()
        # transformers 5.x: activation_checkpointing_*; earlier: gradient_checkpointing_*
        enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
        disable = getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)
        enable({"use_reentrant": False})
        with DropoutCalls() as calls:
            checkpointed = grads()
        disable()
    assert calls.torch == 0
    assert calls.fastdropout > plain_calls.fastdropout  # the layers' dropouts ran again in backward
    assert all(torch.equal(a, b) for a, b in zip(plain, checkpointed))
