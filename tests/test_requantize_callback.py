"""GNPIQRequantizeCallback and refine_grid: monotone error, only the chosen fraction changes, weights from disk."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

import peft_ismoe.quantization.callback as callback_module
from peft_ismoe import GNPIQConfig, GNPIQLinear, GNPIQRequantizeCallback, ISMoEConfig
from peft_ismoe.quantization import refine_grid
from peft_ismoe.quantization.model import find_linear_layers
from peft_ismoe.quantization.solver import grouped_weight, search_grid

VOCAB = 50
# Few load-time iterations leave room for the refinement to improve something.
LOAD_CONFIG = GNPIQConfig(bits=3, group_size=32, num_iterations=1)


def tiny_bert() -> BertModel:
    # Width 72 is not a multiple of 32: every layer reading the hidden state has a padded last group.
    return BertModel(
        BertConfig(vocab_size=VOCAB, hidden_size=72, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    )


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
    )
    return LlamaForCausalLM(config)


def tiny_gpt2() -> GPT2LMHeadModel:
    # GPT-2's Conv1D layers store their weights as [in_features, out_features]; c_proj is square.
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)


MODELS = [
    ("bert", tiny_bert, AutoModel),
    ("llama", tiny_llama, AutoModelForCausalLM),
    ("gpt2", tiny_gpt2, AutoModelForCausalLM),
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Per model name: a float checkpoint folder, its float model and its quantized model, built once per module."""
    built = {}
    for name, factory, auto_class in MODELS:
        path = tmp_path_factory.mktemp(name)
        torch.manual_seed(0)
        factory().save_pretrained(path)
        hf_logging.disable_progress_bar()
        built[name] = (
            path,
            auto_class.from_pretrained(path),
            auto_class.from_pretrained(path, quantization_config=LOAD_CONFIG),
        )
    return built


def float_and_quantized(checkpoints, name: str, copy_to: Path | None = None) -> tuple[Path, nn.Module, nn.Module]:
    """A fresh copy of the quantized model (rounds change it in place), and a private checkpoint copy on request."""
    path, float_model, quantized = checkpoints[name]
    if copy_to is not None:
        shutil.copytree(path, copy_to)
        path = copy_to
    return path, float_model, copy.deepcopy(quantized)


def float_weight(module: nn.Module) -> torch.Tensor:
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


def group_errors(layer: GNPIQLinear, W: torch.Tensor) -> torch.Tensor:
    """Squared error of the served weight per group, ``[out_features, num_groups]``, padding excluded."""
    residual = (layer.dequantize(torch.float32) - W.float()).square()
    padding = layer.padded_in_features - layer.in_features
    residual = torch.nn.functional.pad(residual, (0, padding))
    return residual.view(layer.out_features, -1, layer.group_size).sum(dim=2)


def packed_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers() if n.endswith(("qweight", "scales", "zeros"))}


def changed_layers(before: dict[str, torch.Tensor], model: nn.Module) -> set[str]:
    after = dict(model.named_buffers())
    return {name.rsplit(".", 1)[0] for name, b in before.items() if not torch.equal(b, after[name])}


@pytest.mark.parametrize("name", [m[0] for m in MODELS])
def test_error_never_rises_and_drops_somewhere(checkpoints, name):
    path, float_model, model = float_and_quantized(checkpoints, name)
    floats = find_linear_layers(float_model, LOAD_CONFIG.skipped_modules)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, GNPIQLinear)}
    errors = {n: group_errors(m, float_weight(floats[n])) for n, m in layers.items()}
    callback = GNPIQRequantizeCallback(path, fraction=0.5, granularity="group", num_iterations=3)

    for round_index in (1, 2, 3):
        record = callback.requantize(model, round_index=round_index)

        assert record.error_after <= record.error_before
        for name, layer in layers.items():
            new = group_errors(layer, float_weight(floats[name]))
            assert (new <= errors[name]).all(), name
            errors[name] = new
    assert sum(r.groups_improved for r in callback.history) > 0
    assert callback.history[-1].error_after < callback.history[0].error_before


def test_error_record_matches_the_float_weights(checkpoints):
    path, float_model, model = float_and_quantized(checkpoints, "bert")
    floats = find_linear_layers(float_model, LOAD_CONFIG.skipped_modules)
    callback = GNPIQRequantizeCallback(path, fraction=0.25, num_iterations=3)
    layers = dict(model.named_modules())

    record = callback.requantize(model, round_index=1)

    after = sum(float(group_errors(layers[n], floats[n].weight.detach()).sum()) for n in record.layers)
    assert record.error_after == pytest.approx(after, rel=1e-4)


def test_float_weights_are_found_in_a_sharded_checkpoint(checkpoints, tmp_path):
    _, float_model, model = float_and_quantized(checkpoints, "llama")
    float_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    callback = GNPIQRequantizeCallback(tmp_path, fraction=1.0, num_iterations=2)

    record = callback.requantize(model, round_index=1)

    assert len(record.layers) == sum(isinstance(m, GNPIQLinear) for m in model.modules())
    assert len({file for file, _, _ in callback._sources.values()}) > 1
    assert record.error_after < record.error_before


def test_layer_granularity_changes_only_the_chosen_layers(checkpoints):
    path, _, model = float_and_quantized(checkpoints, "bert")
    num_layers = sum(isinstance(m, GNPIQLinear) for m in model.modules())  # 13: 6 per block and the pooler
    before = packed_state(model)
    callback = GNPIQRequantizeCallback(path, fraction=0.3, granularity="layer", num_iterations=3)

    record = callback.requantize(model, round_index=1)

    assert len(record.layers) == round(0.3 * num_layers)
    assert record.groups_improved > 0
    assert changed_layers(before, model) <= set(record.layers)


def test_group_granularity_searches_the_chosen_fraction_of_every_layer(checkpoints):
    path, _, model = float_and_quantized(checkpoints, "bert")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, GNPIQLinear)}
    before = {n: (m.codes().clone(), m.scales.clone()) for n, m in layers.items()}
    callback = GNPIQRequantizeCallback(path, fraction=0.2, granularity="group", num_iterations=3)

    record = callback.requantize(model, round_index=1)

    assert record.groups_searched == sum(round(0.2 * m.scales.numel()) for m in layers.values())
    changed = 0
    for name, layer in layers.items():
        codes, scales = before[name]
        grouped = (layer.codes() != codes).view(layer.out_features, -1, layer.group_size).any(dim=2)
        changed += int((grouped | (layer.scales != scales)).sum())
    assert 0 < changed <= record.groups_improved


def test_refine_grid_changes_only_the_groups_it_is_given(checkpoints):
    _, float_model, model = float_and_quantized(checkpoints, "bert")
    layer = model.encoder.layer[0].intermediate.dense
    W = float_model.encoder.layer[0].intermediate.dense.weight
    groups = torch.zeros_like(layer.scales, dtype=torch.bool)
    groups[::3, 1] = True

    result = refine_grid(W, layer, groups=groups, num_iterations=6, generator=torch.Generator().manual_seed(0))

    assert result.improved.any() and not (result.improved & ~groups).any()
    unchanged = ~result.improved
    assert torch.equal(result.scale[unchanged], layer.scales[unchanged])
    assert torch.equal(result.zero[unchanged], layer.zeros[unchanged])
    codes = result.codes.view(layer.out_features, -1, layer.group_size)
    assert torch.equal(codes[unchanged], layer.codes().view(layer.out_features, -1, layer.group_size)[unchanged])


def test_refine_grid_runs_the_solvers_search_from_the_stored_grid(checkpoints):
    _, float_model, model = float_and_quantized(checkpoints, "bert")
    layer = model.encoder.layer[1].output.dense
    W = float_model.encoder.layer[1].output.dense.weight.detach()
    groups = torch.zeros_like(layer.scales, dtype=torch.bool)
    groups[::2] = True
    settings = {"num_iterations": 4, "noise_std": 0.5, "noise_decay": 0.9, "refine_steps": 2}

    result = refine_grid(W, layer, groups=groups, generator=torch.Generator().manual_seed(7), **settings)

    # The same search, called directly on the chosen groups from the grid the layer stores.
    Wg, hg = grouped_weight(W.float(), layer.group_size)
    rows = groups.reshape(-1).nonzero().squeeze(1)
    search = search_grid(
        Wg[rows], None if hg is None else hg[rows], layer.scales.reshape(-1)[rows], layer.zeros.reshape(-1)[rows],
        bits=layer.bits, generator=torch.Generator().manual_seed(7), **settings,
    )  # fmt: skip
    improved = result.improved.reshape(-1)[rows]
    assert improved.any()
    assert torch.equal(result.scale.reshape(-1)[rows][improved], search.scale.half()[improved])
    assert torch.equal(result.zero.reshape(-1)[rows][improved], search.zero.half()[improved])


def test_refine_grid_refuses_a_weight_of_another_shape(checkpoints):
    _, _, model = float_and_quantized(checkpoints, "bert")

    with pytest.raises(ValueError, match=r"`W` must have the layer's shape \(64, 72\), got \(72, 64\)"):
        refine_grid(torch.zeros(72, 64), model.encoder.layer[0].intermediate.dense, generator=torch.Generator())


def test_rounds_are_reproducible_and_differ_between_epochs(checkpoints):
    path, _, first = float_and_quantized(checkpoints, "bert")
    _, _, second = float_and_quantized(checkpoints, "bert")

    a = GNPIQRequantizeCallback(path, fraction=0.3, num_iterations=3).requantize(first, round_index=4)
    b = GNPIQRequantizeCallback(path, fraction=0.3, num_iterations=3).requantize(second, round_index=4)

    assert a == b
    state_a, state_b = packed_state(first), packed_state(second)
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)

    c = GNPIQRequantizeCallback(path, fraction=0.3, num_iterations=0).requantize(second, round_index=5)

    assert c.layers != a.layers


def test_float_weights_are_read_from_disk_at_each_round_and_not_kept(checkpoints, tmp_path, monkeypatch):
    path, _, model = float_and_quantized(checkpoints, "bert", copy_to=tmp_path / "float")
    reads = []
    real_safe_open = callback_module.safe_open

    class CountingHandle:
        def __init__(self, *args, **kwargs):
            self.handle = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_slice(self, key):
            return self.inner.get_slice(key)

        def get_tensor(self, key):
            reads.append(key)
            return self.inner.get_tensor(key)

    monkeypatch.setattr(callback_module, "safe_open", CountingHandle)
    callback = GNPIQRequantizeCallback(path, fraction=0.5, num_iterations=2)
    callback.on_train_begin(None, None, None, model=model)
    assert reads == []  # resolving the layers reads headers only

    first = callback.requantize(model, round_index=1)
    assert sorted(reads) == sorted(f"{name}.weight" for name in first.layers)

    # Rewrite the checkpoint with doubled weights: the next round must measure against what is on disk now.
    file = path / "model.safetensors"
    tensors = {k: v * 2 if k.endswith(".weight") else v for k, v in load_file(file).items()}
    save_file(tensors, file, metadata={"format": "pt"})
    layers = {n: m for n, m in model.named_modules() if isinstance(m, GNPIQLinear)}
    before = {n: float(group_errors(m, tensors[f"{n}.weight"]).sum()) for n, m in layers.items()}
    second = callback.requantize(model, round_index=2)
    expected = sum(before[n] for n in second.layers)
    assert second.error_before == pytest.approx(expected, rel=1e-4)

    def holds_tensors(value) -> bool:
        if isinstance(value, torch.Tensor):
            return True
        if isinstance(value, dict):
            return any(holds_tensors(v) for v in value.values())
        if isinstance(value, (list, tuple, set)):
            return any(holds_tensors(v) for v in value)
        return hasattr(value, "__dict__") and any(holds_tensors(v) for v in vars(value).values())

    assert not holds_tensors(vars(callback))


def training_args(tmp_path: Path, **kwargs) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        **kwargs,
    )


def tiny_dataset(n: int = 4) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        {"input_ids": torch.randint(0, VOCAB, (8,), generator=generator), "labels": torch.tensor(i % 2)}
        for i in range(n)
    ]


# (id, callback arguments, training arguments, expected round indices)
SCHEDULES = [
    ("every-epoch", {"every_n_epochs": 1}, {"num_train_epochs": 2}, [1, 2]),
    ("every-2nd-epoch", {"every_n_epochs": 2}, {"num_train_epochs": 3}, [2]),
    ("every-3rd-step", {"every_n_steps": 3}, {"num_train_epochs": 3}, [3, 6]),
]


@pytest.mark.parametrize(
    ("callback_kwargs", "train_kwargs", "rounds"), [s[1:] for s in SCHEDULES], ids=[s[0] for s in SCHEDULES]
)
def test_trainer_runs_the_rounds_on_schedule(tmp_path, callback_kwargs, train_kwargs, rounds):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48
    )
    BertForSequenceClassification(config).save_pretrained(tmp_path / "float")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "float", quantization_config=LOAD_CONFIG)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["classifier"]))
    callback = GNPIQRequantizeCallback(tmp_path / "float", fraction=0.5, num_iterations=2, **callback_kwargs)

    trainer = Trainer(
        model=peft_model,
        args=training_args(tmp_path, **train_kwargs),
        train_dataset=tiny_dataset(),
        callbacks=[callback],
    )
    trainer.train()

    assert [r.round_index for r in callback.history] == rounds
    # Names are those of the wrapped model; the checkpoint's were matched by suffix.
    assert all(name.startswith("base_model.model.bert.") for r in callback.history for name in r.layers)


def test_a_quantized_backbone_under_an_ismoe_adapter_trains_with_the_callback(tmp_path):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    BertForSequenceClassification(config).save_pretrained(tmp_path / "float")
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "float", quantization_config=LOAD_CONFIG)
    model = get_peft_model(base, ISMoEConfig(task_type="SEQ_CLS", num_experts=2, top_k=1, init_seed=0))
    trainable_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    callback = GNPIQRequantizeCallback(tmp_path / "float", fraction=0.5, num_iterations=2)

    Trainer(
        model=model,
        args=training_args(tmp_path, num_train_epochs=2),
        train_dataset=tiny_dataset(),
        callbacks=[callback],
    ).train()

    assert [r.round_index for r in callback.history] == [1, 2]
    assert all(r.error_after <= r.error_before for r in callback.history)
    trained = dict(model.named_parameters())
    assert any(not torch.equal(trained[n], p) for n, p in trainable_before.items())


# (id, arguments, error, message)
BAD_ARGUMENTS = [
    ("fraction-zero", {"fraction": 0}, ValueError, r"`fraction` must be a number in \(0, 1\], got 0"),
    ("fraction-big", {"fraction": 1.5}, ValueError, r"`fraction` must be a number in \(0, 1\], got 1.5"),
    ("granularity", {"granularity": "row"}, ValueError, r"`granularity` must be 'layer' or 'group', got 'row'"),
    ("epochs", {"every_n_epochs": 0}, ValueError, r"`every_n_epochs` must be an int >= 1, got 0"),
    ("steps", {"every_n_steps": 2.5}, ValueError, r"`every_n_steps` must be an int >= 1, got 2.5"),
    ("seed", {"seed": -1}, ValueError, r"`seed` must be an int >= 0, got -1"),
    ("noise", {"noise_std": -1.0}, ValueError, r"`noise_std` must be a finite number >= 0, got -1.0"),
    ("iterations", {"num_iterations": 1.0}, TypeError, r"`num_iterations` must be an int >= 0, got float 1.0"),
]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"), [b[1:] for b in BAD_ARGUMENTS], ids=[b[0] for b in BAD_ARGUMENTS]
)
def test_bad_arguments_are_refused(tmp_path, kwargs, error, message):
    save_file({"w.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")

    with pytest.raises(error, match=message):
        GNPIQRequantizeCallback(tmp_path, **kwargs)


def test_a_folder_without_safetensors_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"`float_checkpoint` must be a folder saved with safetensors.*got '"):
        GNPIQRequantizeCallback(tmp_path / "nowhere")


def test_a_checkpoint_of_another_model_is_refused_before_training(checkpoints, tmp_path):
    _, _, model = float_and_quantized(checkpoints, "bert")
    torch.manual_seed(0)
    BertModel(
        BertConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(tmp_path / "other")
    callback = GNPIQRequantizeCallback(tmp_path / "other")

    with pytest.raises(ValueError, match=r"`encoder.layer.0.attention.self.query.weight` .* has shape \(48, 48\), "):
        callback.on_train_begin(None, None, None, model=model)


def test_a_model_without_quantized_layers_is_refused(checkpoints):
    path, float_model, _ = float_and_quantized(checkpoints, "bert")

    with pytest.raises(ValueError, match="holds no GNPIQLinear layer"):
        GNPIQRequantizeCallback(path).on_train_begin(None, None, None, model=float_model)
