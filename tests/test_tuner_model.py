"""ISMoEModel on a tiny BERT: identity at init, frozen backbone, memory bound, adapters, save/load, unload."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel
from tuner_helpers import assert_round_trip, train_steps

import peft_ismoe
from peft_ismoe import GNPIQConfig, ISMoEConfig, quantize_model

BERT = BertConfig(
    vocab_size=120,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=64,
    num_labels=3,
)


def _bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(copy.deepcopy(BERT)).eval()


def _batch(batch: int = 4, seq: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq - 4 :] = 0
    return {
        "input_ids": torch.randint(0, BERT.vocab_size, (batch, seq), generator=generator),
        "attention_mask": mask,
        "labels": torch.randint(0, BERT.num_labels, (batch,), generator=generator),
    }


def _train(model, batch, steps: int = 3, lr: float = 1e-2) -> None:
    train_steps(model, batch, steps=steps, lr=lr)


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


CONFIGS = {
    "interactive-cls": ISMoEConfig(task_type="SEQ_CLS", num_experts=4, top_k=2),
    "interactive-mean": ISMoEConfig(task_type="SEQ_CLS", num_experts=4, top_k=1, salient_feature="mean"),
    "token-side-router": ISMoEConfig(task_type="SEQ_CLS", num_experts=2, top_k=2, router="side"),
    "one-expert": ISMoEConfig(task_type="SEQ_CLS", num_experts=1, top_k=1, layers_to_tap=[0, -1]),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fresh_adapter_leaves_outputs_unchanged(name):
    base, batch = _bert(), _batch()
    expected = _logits(base, batch)
    model = get_peft_model(base, CONFIGS[name])
    assert torch.equal(_logits(model, batch), expected)


def test_backbone_gets_no_gradient_and_only_side_and_head_train():
    model = get_peft_model(_bert(), ISMoEConfig(task_type="SEQ_CLS", num_experts=4, top_k=2))
    model.train()
    out = model(**_batch())
    assert out.aux_loss.ndim == 0 and out.aux_loss.item() >= 1.0 - 1e-5
    out.loss.backward()
    for name, parameter in model.named_parameters():
        is_adapter = "ismoe_side" in name or "modules_to_save" in name
        assert parameter.requires_grad == is_adapter, name
        if not is_adapter:
            assert parameter.grad is None, name
    side_grads = [p.grad for n, p in model.named_parameters() if "ismoe_side" in n]
    assert all(g is not None for g in side_grads)
    trainable, total = model.get_nb_trainable_parameters()
    assert 0 < trainable < 0.1 * total


def test_aux_loss_is_added_to_the_loss_only_with_labels():
    batch = _batch()
    base = _bert()
    with torch.no_grad():
        plain = base(**batch).loss
    model = get_peft_model(base, ISMoEConfig(task_type="SEQ_CLS", num_experts=4, top_k=2, aux_loss_coef=0.5))
    with torch.no_grad():
        out = model(**batch)
        unlabeled = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(out.loss, plain + 0.5 * out.aux_loss)
    assert unlabeled.loss is None and unlabeled.aux_loss is not None


class _SavedBytes:
    """Bytes autograd saves for backward, counted once per storage, the model's own tensors left out."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.excluded = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.seen: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in self.excluded:
            self.seen[pointer] = tensor.untyped_storage().nbytes()
        return tensor

    def measure(self, model, batch) -> int:
        model.train()
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            loss = model(**batch).loss
        loss.backward()
        return sum(self.seen.values())


def test_saved_bytes_are_a_small_fraction_of_lora_and_full_fine_tuning():
    batch = _batch(batch=8, seq=32)
    full = _bert()
    full_bytes = _SavedBytes(full).measure(full, batch)
    lora = get_peft_model(
        _bert(), LoraConfig(task_type="SEQ_CLS", r=8, target_modules=["query", "key", "value", "dense"])
    )
    lora_bytes = _SavedBytes(lora).measure(lora, batch)
    per_token = get_peft_model(_bert(), ISMoEConfig(task_type="SEQ_CLS", side_attention=False))
    per_token_bytes = _SavedBytes(per_token).measure(per_token, batch)
    ismoe = get_peft_model(_bert(), ISMoEConfig(task_type="SEQ_CLS", num_experts=8, top_k=2))
    ismoe_bytes = _SavedBytes(ismoe).measure(ismoe, batch)
    assert per_token_bytes < 0.2 * lora_bytes < full_bytes
    # The side attention keeps its queries, keys and values: a little more, still a small fraction. On the real
    # all-MiniLM-L6-v2 the default stays under 0.2x LoRA (tests/test_backbones.py).
    assert per_token_bytes < ismoe_bytes < 0.3 * lora_bytes


_SIDE_GATE = "base_model.ismoe_layer.ismoe_side.default.backbone.output_gate"


def _with_new_head(seed: int) -> BertForSequenceClassification:
    """The same backbone as `_bert()` with a differently initialised classifier."""
    model = _bert()
    torch.manual_seed(seed)
    model.classifier.reset_parameters()
    return model


def test_save_then_load_gives_identical_outputs(tmp_path):
    batch = _batch()
    model = get_peft_model(_bert(), ISMoEConfig(task_type="SEQ_CLS", num_experts=4, top_k=2))
    _train(model, batch)
    trained = _logits(model, batch)
    model.save_pretrained(tmp_path)

    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "ISMOE"
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert all("ismoe_side." in key or ".classifier." in key for key in tensors), sorted(tensors)
    assert any(".classifier." in key for key in tensors) and not any(".default." in key for key in tensors)

    fresh = _with_new_head(seed=123)
    assert not torch.equal(_logits(fresh, batch), _logits(_bert(), batch))
    loaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    # A freshly built model may round the last float32 bit differently (the CPU attention kernel).
    torch.testing.assert_close(_logits(loaded, batch), trained, rtol=0, atol=1e-6)


def test_load_under_another_adapter_name(tmp_path):
    batch = _batch()
    model = get_peft_model(_bert(), ISMoEConfig(task_type="SEQ_CLS", num_experts=2, top_k=1))
    _train(model, batch)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_with_new_head(7), tmp_path, adapter_name="task_a").eval()
    # A freshly built model may round the last float32 bit differently (the CPU attention kernel).
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), rtol=0, atol=1e-6)


def test_disable_adapter_gives_base_outputs_after_training():
    batch = _batch()
    base = _bert()
    expected = _logits(base, batch)
    model = get_peft_model(base, ISMoEConfig(task_type="SEQ_CLS", num_experts=4, top_k=2, modules_to_save=None))
    _train(model, batch)
    assert not torch.equal(_logits(model, batch), expected)
    with model.disable_adapter():
        assert torch.equal(_logits(model, batch), expected)
    assert not torch.equal(_logits(model, batch), expected)


def test_two_adapters_switch_with_set_adapter():
    batch = _batch()
    model = get_peft_model(_bert(), ISMoEConfig(task_type="SEQ_CLS", num_experts=2, top_k=1))
    _train(model, batch)
    first = _logits(model, batch)
    model.add_adapter("second", ISMoEConfig(task_type="SEQ_CLS", num_experts=4, top_k=2))
    assert torch.equal(_logits(model, batch), first)  # the new adapter is not active yet
    model.set_adapter("second")
    assert all(not p.requires_grad for n, p in model.named_parameters() if "ismoe_side.default." in n)
    assert all(p.requires_grad for n, p in model.named_parameters() if "ismoe_side.second." in n)
    _train(model, batch)
    second = _logits(model, batch)
    assert not torch.equal(second, first)
    model.set_adapter("default")
    assert torch.equal(_logits(model, batch), first)
    with pytest.raises(ValueError, match="one side network at a time"):
        model.base_model.set_adapter(["default", "second"])
    model.delete_adapter("second")
    assert list(model.peft_config) == ["default"]


def test_unload_returns_the_base_model_and_merge_raises():
    batch = _batch()
    model = get_peft_model(_bert(), ISMoEConfig(task_type="SEQ_CLS", num_experts=2, top_k=1))
    _train(model, batch)
    with pytest.raises(NotImplementedError, match="cannot be merged into the backbone's weights"):
        model.merge_and_unload()
    with torch.no_grad():
        model.base_model.ismoe_layer.ismoe_side["default"]["backbone"].output_gate.zero_()
    # What is left without the side network: the backbone and the trained head (PEFT keeps modules_to_save).
    expected = _logits(model, batch)
    unloaded = model.unload()
    assert type(unloaded) is BertForSequenceClassification
    assert not any("ismoe" in name or "modules_to_save" in name for name, _ in unloaded.named_modules())
    assert all(not block._forward_hooks and not block._forward_pre_hooks for block in unloaded.bert.encoder.layer)
    assert torch.equal(_logits(unloaded, batch), expected)


def test_unload_keeps_a_trained_container_module_such_as_the_pooler():
    batch = _batch()
    config = ISMoEConfig(task_type="SEQ_CLS", num_experts=2, modules_to_save=["pooler"])
    model = get_peft_model(_bert(), config)
    _train(model, batch)
    trained_pooler = model.base_model.model.bert.pooler.modules_to_save["default"]

    unloaded = model.unload()

    assert unloaded.bert.pooler is trained_pooler  # the trained copy, not the frozen original
    assert not any("modules_to_save" in name for name, _ in unloaded.named_modules())


def test_expert_usage_counts_tokens_and_resets():
    model = get_peft_model(_bert(), ISMoEConfig(task_type="SEQ_CLS", num_experts=4, top_k=2))
    batch = _batch()
    _logits(model, batch)
    usage = model.base_model.expert_usage(reset=True)
    assert sorted(usage) == ["backbone.blocks.0", "backbone.blocks.1", "backbone.blocks.2"]
    real_tokens = int(batch["attention_mask"].sum())
    assert all(counts.sum().item() == 2 * real_tokens for counts in usage.values())
    assert all(c.sum().item() == 0 for c in model.base_model.expert_usage().values())


def test_reduction_factor_must_divide_the_hidden_size():
    with pytest.raises(ValueError, match=r"`reduction_factor` must divide the hidden size of .*\(64\), got 7"):
        get_peft_model(_bert(), ISMoEConfig(task_type="SEQ_CLS", reduction_factor=7))


class _NoStack(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = BertConfig(hidden_size=16)
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.proj(x)


def test_missing_block_stack_names_the_model_and_the_config_field():
    with pytest.raises(ValueError, match=r"_NoStack.*Set `block_stack`"):
        get_peft_model(_NoStack(), ISMoEConfig(num_experts=2, top_k=1))
    with pytest.raises(ValueError, match=r"`block_stack` entry 'proj' must name a non-empty nn.ModuleList"):
        get_peft_model(_NoStack(), ISMoEConfig(num_experts=2, top_k=1, block_stack=["proj"]))


def test_explicit_block_stack_and_layers_to_tap():
    base, batch = _bert(), _batch()
    expected = _logits(base, batch)
    config = ISMoEConfig(
        task_type="SEQ_CLS", num_experts=2, top_k=1, block_stack=["bert.encoder.layer"], layers_to_tap=[1]
    )
    model = get_peft_model(base, config)
    assert model.base_model.targeted_module_names == ["bert.encoder.layer"]
    assert len(model.base_model.ismoe_layer.ismoe_side["default"]["backbone"].blocks) == 1
    assert torch.equal(_logits(model, batch), expected)
    with pytest.raises(ValueError, match="`layers_to_tap` entry 5 is out of range"):
        get_peft_model(_bert(), ISMoEConfig(task_type="SEQ_CLS", layers_to_tap=[5]))


def test_train_layernorm_trains_a_copy_through_the_side_network_only(tmp_path):
    batch = _batch()
    base = _bert()
    expected = _logits(base, batch)
    original = base.bert.encoder.layer[1].output.LayerNorm.weight.detach().clone()
    model = get_peft_model(base, ISMoEConfig(task_type="SEQ_CLS", num_experts=2, top_k=1, train_layernorm=True))
    assert torch.equal(_logits(model, batch), expected)

    model.train()
    model(**batch).loss.backward()
    side = model.base_model.ismoe_layer.ismoe_side["default"]["backbone"]
    assert sorted(side.norm_params) == [f"{i}_{n}" for i in range(3) for n in ("bias", "weight")]
    assert all(p.grad is not None for p in side.norm_params.values())
    assert base.bert.encoder.layer[1].output.LayerNorm.weight.grad is None
    model.zero_grad()

    _train(model, batch)
    assert torch.equal(base.bert.encoder.layer[1].output.LayerNorm.weight, original)
    with torch.no_grad():
        side.output_gate.zero_()  # the side network adds nothing: only the trained LayerNorms change the output
    assert not torch.allclose(_logits(model, batch), expected)
    with model.disable_adapter():
        assert torch.equal(_logits(model, batch), expected)

    trained = _logits(model, batch)
    model.save_pretrained(tmp_path)
    assert any("norm_params" in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    loaded = PeftModel.from_pretrained(_with_new_head(3), tmp_path).eval()
    assert torch.equal(_logits(loaded, batch), trained)


def test_train_layernorm_on_a_pre_ln_backbone_raises():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=32))
    model = get_peft_model(gpt2, ISMoEConfig(task_type="CAUSAL_LM", num_experts=2, top_k=1, train_layernorm=True))
    with pytest.raises(ValueError, match="pre-LN backbone. Set `train_layernorm=False`"):
        model(input_ids=torch.randint(0, 50, (1, 5)))


def test_causal_lm_rejects_non_causal_salient_features():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=32))
    with pytest.raises(ValueError, match="CAUSAL_LM needs `salient_feature='token'`"):
        get_peft_model(gpt2, ISMoEConfig(task_type="CAUSAL_LM", salient_feature="mean"))
    with pytest.raises(ValueError, match="`side_attention=True` is not supported for CAUSAL_LM"):
        get_peft_model(gpt2, ISMoEConfig(task_type="CAUSAL_LM", side_attention=True))


def test_side_attention_lets_a_token_read_the_others_and_ignores_padding():
    from peft_ismoe.tuner.side import SideAttention

    torch.manual_seed(0)
    attention = SideAttention(16, num_heads=4)
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[True, True, True, False, False], [False] * 5])
    y = attention(x, mask)

    changed = x.clone()
    changed[0, 1] += torch.randn(16)  # a real token of row 0
    assert not torch.allclose(attention(changed, mask)[0, 0], y[0, 0])  # the first token reads it
    padded = x.clone()
    padded[0, 4] += torch.randn(16)  # a padding token of row 0
    torch.testing.assert_close(attention(padded, mask)[0, :3], y[0, :3])  # nobody reads it
    assert torch.isfinite(y[1]).all()  # a row of padding only stays finite
    with pytest.raises(ValueError, match=r"`side_attention_heads` must divide the side width \(16\), got 3"):
        SideAttention(16, num_heads=3)


def test_gnpiq_backbone_trains_and_round_trips(tmp_path):
    batch = _batch()
    base = quantize_model(_bert(), GNPIQConfig(bits=4, num_iterations=2), progress_bar=False)
    expected = _logits(base, batch)
    model = get_peft_model(base, ISMoEConfig(task_type="SEQ_CLS", num_experts=4, top_k=2))
    assert torch.equal(_logits(model, batch), expected)
    model.train()
    model(**batch).loss.backward()
    assert all(
        p.grad is None for n, p in model.named_parameters() if "ismoe_side" not in n and "modules_to_save" not in n
    )
    _train(model, batch)
    trained = _logits(model, batch)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert not any("qweight" in key or "scales" in key for key in tensors)
    fresh = quantize_model(_with_new_head(5), GNPIQConfig(bits=4, num_iterations=2), progress_bar=False)
    loaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    assert torch.equal(loaded.state_dict()[_SIDE_GATE], model.state_dict()[_SIDE_GATE])
    # Every saved tensor is restored bit for bit; the dequantized weights are rebuilt in fresh buffers on each call,
    # where the CPU kernels may round the last bit differently, hence the tolerance.
    torch.testing.assert_close(_logits(loaded, batch), trained, rtol=0, atol=1e-6)


def test_push_to_hub_uploads_exactly_the_adapter_files(monkeypatch):
    import transformers.utils.hub as hub

    uploaded: dict[str, bytes] = {}

    class _FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})()

        def create_commit(self, repo_id, operations, **kwargs):
            for op in operations:
                with open(op.path_or_fileobj, "rb") as handle:
                    uploaded[op.path_in_repo] = handle.read()
            return "committed"

    class _Card:
        def save(self, path):
            with open(path, "w") as handle:
                handle.write("card")

    monkeypatch.setattr(hub, "hf_api", lambda: _FakeApi())
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *args, **kwargs: _Card())
    model = get_peft_model(_bert(), ISMoEConfig(task_type="SEQ_CLS", num_experts=2, top_k=1))
    assert model.push_to_hub("user/ismoe-test") == "committed"
    assert sorted(uploaded) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert json.loads(uploaded["adapter_config.json"])["peft_type"] == "ISMOE"


def test_package_exports_the_tuner():
    assert peft_ismoe.ISMoEConfig is ISMoEConfig
    assert "ISMoEModel" in peft_ismoe.__all__


def _bnb_4bit(path) -> BertForSequenceClassification:
    from transformers import BitsAndBytesConfig

    # bitsandbytes' CPU 4-bit kernel cannot take an input that requires grad, which the layers after the last
    # block (BERT's pooler) receive: those stay in float, as heads usually do.
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["classifier", "bert.pooler"]
    )
    return BertForSequenceClassification.from_pretrained(path, quantization_config=config).eval()


def test_bitsandbytes_4bit_backbone_trains_and_round_trips(tmp_path):
    pytest.importorskip("bitsandbytes")
    _bert().save_pretrained(tmp_path / "base")
    base = _bnb_4bit(tmp_path / "base")
    assert type(base.bert.encoder.layer[0].attention.self.query).__name__ == "Linear4bit"
    batch = _batch()
    expected = _logits(base, batch)
    model = get_peft_model(base, ISMoEConfig(task_type="SEQ_CLS", num_experts=4, top_k=2))
    assert torch.equal(_logits(model, batch), expected)
    _train(model, batch, steps=2)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    trained = _logits(model, batch)
    assert not torch.allclose(trained, expected)
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(_bnb_4bit(tmp_path / "base"), tmp_path / "adapter").eval()
    assert_round_trip(model, loaded, trained, _logits(loaded, batch))


def test_bfloat16_backbone_with_a_float32_side_network():
    batch = _batch()
    base = _bert().to(torch.bfloat16)
    expected = _logits(base, batch)
    model = get_peft_model(base, ISMoEConfig(task_type="SEQ_CLS", num_experts=2, top_k=1, train_layernorm=True))
    assert torch.equal(_logits(model, batch), expected)
    side = model.base_model.ismoe_layer.ismoe_side["default"]["backbone"]
    assert side.dtype == torch.float32
    _train(model, batch, steps=2)
    trained = _logits(model, batch)
    assert trained.dtype == torch.bfloat16 and not torch.equal(trained, expected)


def test_unsupported_task_type_raises():
    with pytest.raises(ValueError, match="`task_type` must be one of .* for ISMoE, got 'QUESTION_ANS'"):
        ISMoEConfig(task_type="QUESTION_ANS")  # refused where it is written, before any model is touched


def test_low_cpu_mem_usage_loading_and_load_adapter(tmp_path):
    batch = _batch()
    model = get_peft_model(_bert(), ISMoEConfig(task_type="SEQ_CLS", num_experts=2, top_k=2))
    _train(model, batch, steps=2)
    trained = _logits(model, batch)
    model.save_pretrained(tmp_path)

    lazy = PeftModel.from_pretrained(_with_new_head(3), tmp_path, low_cpu_mem_usage=True).eval()
    assert not any(p.is_meta for p in lazy.parameters())
    assert_round_trip(model, lazy, trained, _logits(lazy, batch))

    trainable = PeftModel.from_pretrained(_with_new_head(3), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters() == model.get_nb_trainable_parameters()
    trainable.load_adapter(tmp_path, adapter_name="again")
    trainable.set_adapter("again")
    trainable.eval()
    torch.testing.assert_close(_logits(trainable, batch), trained, rtol=0, atol=1e-6)


def test_taps_kept_in_bfloat16_halve_their_bytes_and_barely_move_the_gradients():
    batch = _batch(batch=8, seq=32)

    def run(tap_storage):
        model = get_peft_model(_bert(), ISMoEConfig(task_type="SEQ_CLS", tap_storage=tap_storage, init_seed=0))
        with torch.no_grad():  # open the output gate, or no gradient reaches the side network
            model.get_parameter(_SIDE_GATE).fill_(1.0)
        saved = _SavedBytes(model).measure(model, batch)
        model.train()
        model(**batch).loss.backward()
        down = model.get_parameter("base_model.ismoe_layer.ismoe_side.default.backbone.down.0.weight")
        return saved, down.grad.clone()

    full_bytes, full_grad = run("full")
    half_bytes, half_grad = run("bfloat16")
    hidden, taps = BERT.hidden_size, BERT.num_hidden_layers
    # Each tapped [8, 32, hidden] float32 state is kept in two bytes per value instead of four.
    assert full_bytes - half_bytes == taps * 8 * 32 * hidden * 2
    assert (half_grad - full_grad).norm() <= 0.01 * full_grad.norm()
    with pytest.raises(ValueError, match=r"`tap_storage` must be one of \('full', 'bfloat16'\), got 'fp8'"):
        ISMoEConfig(tap_storage="fp8")
