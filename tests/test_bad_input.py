"""Bad input, with nothing lost: every ISMoEConfig value works or is refused naming its field; adapters that do not
fit, broken weight files, NaN losses and awkward batches give clear errors (or correct results), and a refused
adapter leaves the user's model exactly as it was."""

from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from tuner_helpers import train_steps

from peft_ismoe import ISMoEConfig
from peft_ismoe.tuner.finite_loss import NonFiniteLossCallback, NonFiniteLossWarning, check_finite_loss

BERT = BertConfig(
    vocab_size=60,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=16,
    num_labels=2,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def _bert(seed: int = 0, **changes) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = copy.deepcopy(BERT)
    for key, value in changes.items():
        setattr(config, key, value)
    return BertForSequenceClassification(config).eval()


def _batch(batch: int = 3, seq: int = 6, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(1, BERT.vocab_size, (batch, seq), generator=generator),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "labels": torch.randint(0, 2, (batch,), generator=generator),
    }


def _snapshot(model) -> dict:
    """Everything about a model a failed load must not change."""
    return {
        "state": {name: value.clone() for name, value in model.state_dict().items()},
        "modules": [name for name, _ in model.named_modules()],
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
    }


def _assert_unchanged(model, snapshot) -> None:
    now = _snapshot(model)
    assert now["modules"] == snapshot["modules"]
    assert now["requires_grad"] == snapshot["requires_grad"]
    assert now["hooks"] == snapshot["hooks"]
    assert now["state"].keys() == snapshot["state"].keys()
    assert all(torch.equal(now["state"][k], snapshot["state"][k]) for k in snapshot["state"])


# ---------------------------------------------------------------------------------------------- config properties

FIELDS = (
    "num_experts",
    "top_k",
    "reduction_factor",
    "expert_ratio",
    "activation",
    "router",
    "salient_feature",
    "aux_loss_coef",
    "ladder_temperature",
    "layers_to_tap",
    "side_attention",
    "side_attention_heads",
    "train_layernorm",
    "init_from_backbone",
    "init_seed",
)
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32), st.integers(-2, 4), st.booleans(), st.just("1")
)
config_values = st.fixed_dictionaries(
    {},
    optional={
        "num_experts": st.one_of(st.integers(-1, 5), st.just(2.0), st.just(True)),
        "top_k": st.one_of(st.integers(-1, 5), st.just("1")),
        "reduction_factor": st.one_of(st.integers(-1, 17), st.just(4.0)),
        "expert_ratio": numbers,
        "activation": st.sampled_from(["gelu", "relu", "silu", "tanh", None]),
        "router": st.sampled_from(["interactive", "side", "random"]),
        "salient_feature": st.sampled_from(["cls", "mean", "token", None, "pooler"]),
        "aux_loss_coef": numbers,
        "ladder_temperature": numbers,
        "layers_to_tap": st.one_of(st.none(), st.lists(st.integers(-3, 2), max_size=3), st.just("0"), st.just([0.5])),
        "side_attention": st.sampled_from([True, False, None, 0]),
        "side_attention_heads": st.one_of(st.integers(-1, 5), st.just(2.0)),
        "train_layernorm": st.one_of(st.booleans(), st.just(1)),
        "init_from_backbone": st.one_of(st.booleans(), st.just("yes")),
        "init_seed": st.one_of(st.none(), st.integers(-1, 3), st.just(1.5)),
    },
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=config_values)
def test_every_config_is_accepted_and_trains_or_refused_naming_its_field(values):
    try:
        config = ISMoEConfig(task_type="SEQ_CLS", **values)
    except (ValueError, TypeError) as error:
        named = re.findall(r"`(\w+)`", str(error))
        assert named and named[0] in FIELDS and named[0] in values, str(error)
        assert repr(values[named[0]]) in str(error) or named[0] == "top_k", str(error)
        return

    try:
        model = get_peft_model(_bert(), config)
    except ValueError as error:
        # Only the rules that depend on the backbone are left for attach time, and they name their field too.
        named = re.findall(r"`(\w+)`", str(error))
        assert named and named[0] in (
            "reduction_factor",
            "layers_to_tap",
            "train_layernorm",
            "side_attention_heads",
        ), str(error)
        return
    batch = _batch()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train_steps(model, batch, steps=1)
    with torch.no_grad():
        output = model(**batch)
    assert torch.isfinite(output.logits).all() and torch.isfinite(output.loss)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


# ---------------------------------------------------------------------------------------- adapters that do not fit


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    path = tmp_path_factory.mktemp("adapter")
    model = get_peft_model(_bert(), ISMoEConfig(task_type="SEQ_CLS", num_experts=2, top_k=1, init_seed=0))
    train_steps(model, _batch(), steps=2)
    model.save_pretrained(path)
    return path


MISFITS = {
    "hidden-size": (lambda: _bert(hidden_size=64, intermediate_size=128), r"hidden_size: adapter 32, model 64"),
    "layer-count": (lambda: _bert(num_hidden_layers=3), r"block_stacks: adapter \{'bert.encoder.layer': 2\}"),
    "architecture": (
        lambda: GPT2ForSequenceClassification(
            GPT2Config(vocab_size=60, n_embd=32, n_layer=2, n_head=2, n_positions=16, num_labels=2, pad_token_id=0)
        ),
        r"model_type: adapter 'bert', model 'gpt2'",
    ),
}


@pytest.mark.parametrize("case", list(MISFITS))
def test_adapter_on_a_base_it_does_not_fit_is_refused_before_any_change(saved_adapter, case):
    build, message = MISFITS[case]
    base = build()
    snapshot = _snapshot(base)
    with pytest.raises(ValueError, match=rf"trained on another backbone.*{message}"):
        PeftModel.from_pretrained(base, saved_adapter)
    _assert_unchanged(base, snapshot)


def test_the_same_base_still_loads(saved_adapter):
    loaded = PeftModel.from_pretrained(_bert(), saved_adapter)
    assert loaded.peft_config["default"].base_model_fingerprint["hidden_size"] == BERT.hidden_size


def test_an_adapter_of_another_peft_type_is_refused(tmp_path):
    lora = get_peft_model(_bert(), LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], r=2))
    lora.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"holds a LoraConfig adapter .*not an ISMoE adapter"):
        ISMoEConfig.from_pretrained(str(tmp_path))


# ------------------------------------------------------------------------------------------- broken weight files


def _copy_adapter(source, target):
    target.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (target / name).write_bytes((source / name).read_bytes())
    return target / "adapter_model.safetensors"


CORRUPTIONS = {
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
    "garbage-header": lambda data: b"\xff" * 8 + data[8:],
    "header-only": lambda data: data[: 8 + int.from_bytes(data[:8], "little")],
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_broken_adapter_file_is_named_and_the_model_is_untouched(tmp_path, saved_adapter, case):
    weights = _copy_adapter(saved_adapter, tmp_path / case)
    weights.write_bytes(CORRUPTIONS[case](weights.read_bytes()))
    base = _bert()
    snapshot = _snapshot(base)
    with pytest.raises(ValueError, match=rf"{re.escape(str(weights))!s}.*not a readable safetensors file"):
        PeftModel.from_pretrained(base, tmp_path / case)
    _assert_unchanged(base, snapshot)


def test_non_finite_adapter_weights_are_refused(tmp_path, saved_adapter):
    from safetensors.torch import load_file, save_file

    weights = _copy_adapter(saved_adapter, tmp_path / "nan")
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(weights))
    base = _bert()
    snapshot = _snapshot(base)
    with pytest.raises(ValueError, match=rf"non-finite values .*{re.escape(name)}"):
        PeftModel.from_pretrained(base, tmp_path / "nan")
    _assert_unchanged(base, snapshot)


# -------------------------------------------------------------------------------------------------- NaN losses


class _Examples(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.arange(1, 7) + i
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor(i % 2)}


class _PoisonAfter(TrainerCallback):
    """Writes Inf into the side network's output gate after step `step`: the next step's loss is not finite."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.base_model.ismoe_layer.ismoe_side["default"]["backbone"].output_gate.fill_(float("inf"))


def test_nan_loss_under_the_trainer_warns_naming_the_step(tmp_path):
    model = get_peft_model(_bert(), ISMoEConfig(task_type="SEQ_CLS", num_experts=2, top_k=1, init_seed=0))
    watcher = NonFiniteLossCallback()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Examples(), callbacks=[watcher, _PoisonAfter(2)])
    with pytest.warns(NonFiniteLossWarning, match=r"at step 3\b"):
        trainer.train()
    assert watcher.bad_steps[0] == 3 and 1 not in watcher.bad_steps and 2 not in watcher.bad_steps
    assert not model._forward_hooks  # the watcher's hook is gone after training


def test_check_finite_loss_for_custom_loops():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_finite_loss(torch.tensor(0.5), step=7)
    with pytest.warns(NonFiniteLossWarning, match=r"\(\[inf\]\) at step 8"):
        assert not check_finite_loss(torch.tensor(math.inf), step=8)


# ------------------------------------------------------------------------------------------------ awkward batches


@pytest.fixture
def model():
    torch.manual_seed(0)
    return get_peft_model(_bert(), ISMoEConfig(task_type="SEQ_CLS", num_experts=4, top_k=2, init_seed=0))


def test_sequences_longer_than_the_position_table_are_refused(model):
    with pytest.raises(ValueError, match=r"`input_ids` has sequences of 17 tokens.*16 positions only"):
        model(input_ids=torch.ones(2, 17, dtype=torch.long))
    assert model(input_ids=torch.ones(2, 16, dtype=torch.long)).logits.shape == (2, 2)


def test_empty_batches_and_empty_sequences_are_refused(model):
    with pytest.raises(ValueError, match=r"`input_ids` holds an empty batch \(shape \(0, 6\)\)"):
        model(input_ids=torch.ones(0, 6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`inputs_embeds` holds sequences with no token"):
        model(inputs_embeds=torch.ones(2, 0, BERT.hidden_size))


def test_padding_only_rows_change_nothing_for_the_other_rows(model):
    train_steps(model, _batch(), steps=2)  # a trained side network, so its correction is not zero
    batch = _batch(batch=3)
    padded = {key: value.clone() for key, value in batch.items()}
    padded["attention_mask"][1] = 0
    model.base_model.reset_expert_usage()
    with torch.no_grad():
        alone = model(**{k: v[[0, 2]] for k, v in batch.items()})
        usage_alone = sum(c.sum() for c in model.base_model.expert_usage(reset=True).values())
        mixed = model(**padded)
        usage_mixed = sum(c.sum() for c in model.base_model.expert_usage(reset=True).values())
    torch.testing.assert_close(mixed.logits[[0, 2]], alone.logits, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(mixed.logits).all() and torch.isfinite(mixed.loss)
    assert usage_mixed == usage_alone  # the padding row's tokens are not routed into the statistics

    everything_padded = {**batch, "attention_mask": torch.zeros_like(batch["attention_mask"])}
    with torch.no_grad():
        output = model(**everything_padded)
    assert torch.isfinite(output.logits).all() and output.aux_loss.item() == 0.0


def test_bf16_autocast_with_a_float32_side_network(model):
    batch = _batch()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(**batch)
    output.loss.backward()
    side = model.base_model.ismoe_layer.ismoe_side["default"]["backbone"]
    assert all(p.dtype == torch.float32 for p in side.parameters())
    grads = [p.grad for p in side.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        reference = model(**batch).logits
    torch.testing.assert_close(output.logits.float(), reference, rtol=0.05, atol=0.05)


def test_bf16_backbone_with_a_float32_side_network_trains():
    base = _bert().to(torch.bfloat16)
    model = get_peft_model(base, ISMoEConfig(task_type="SEQ_CLS", num_experts=2, top_k=1, init_seed=0))
    side = model.base_model.ismoe_layer.ismoe_side["default"]["backbone"]
    side.float()
    gate = side.output_gate.detach().clone()
    train_steps(model, _batch(), steps=2)
    assert side.output_gate.dtype == torch.float32 and not torch.equal(side.output_gate, gate)
    with torch.no_grad():
        output = model(**_batch())
    assert output.logits.dtype == torch.bfloat16 and torch.isfinite(output.logits.float()).all()
