"""A short soak (200 steps): nothing accumulates across training steps, and `unload()` leaves exactly the hooks the
base model had, so it can be wrapped again. `benchmarks/soak.py` runs the 2,000-step version (`docs/soak.md`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import BertConfig, BertForSequenceClassification
from tuner_helpers import train_steps

from peft_ismoe import ISMoEConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = BertConfig(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=32,
    num_labels=2,
)


def _soak_module():
    spec = importlib.util.spec_from_file_location("soak_benchmark", REPO_ROOT / "benchmarks" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_hundred_steps_accumulate_nothing_and_unload_restores_the_hooks():
    result = _soak_module().soak(steps=200, every=50, config=TINY, batch=4, seq=12, rewrap_steps=5)
    records = result["records"]
    assert [r["step"] for r in records] == [50, 100, 150, 200]
    # Routing statistics, hooks and per-call caches would each show up here if they grew with the steps.
    assert len({r["live_tensors"] for r in records}) == 1, records
    assert len({r["hooks"] for r in records}) == 1 and records[0]["hooks"] > result["hooks_before_wrapping"]
    assert all(r["tuner_state"] == 0 for r in records)
    assert all(r["usage_slots"] > 0 for r in records)  # usage is counted and reset, not accumulated
    assert result["unload_restores_hooks"] and result["second_unload_restores_hooks"]
    assert result["modules_with_extra_hooks"] == []


def test_unload_keeps_the_users_own_hooks_and_the_model_can_be_wrapped_again():
    torch.manual_seed(0)
    base = BertForSequenceClassification(TINY).eval()
    calls = []
    base.bert.encoder.layer[0].register_forward_hook(lambda module, args, output: calls.append(1))
    base.register_forward_pre_hook(lambda module, args: None)
    before = {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in base.named_modules()}
    batch = {"input_ids": torch.randint(1, TINY.vocab_size, (2, 8)), "labels": torch.tensor([0, 1])}
    with torch.no_grad():
        expected = base.bert(input_ids=batch["input_ids"]).last_hidden_state

    for _ in range(2):
        model = get_peft_model(base, ISMoEConfig(task_type="SEQ_CLS", num_experts=2, top_k=1, init_seed=0))
        train_steps(model, batch, steps=2)
        base = model.unload()
        after = {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in base.named_modules()}
        assert after == before

    calls.clear()
    with torch.no_grad():
        hidden = base.bert(input_ids=batch["input_ids"]).last_hidden_state
    assert calls == [1]  # the user's hook is still there and still runs
    # No side network is left in the backbone's path (PEFT's `unload()` keeps the trained head, by its convention).
    assert torch.equal(hidden, expected)
