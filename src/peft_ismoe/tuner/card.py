"""The model card written beside an ISMoE adapter: method, base model, configuration and, when known, metrics.

PEFT's ``save_pretrained`` calls ``PeftModel.create_or_update_model_card``, which starts from the generic Hub
template (a page of "More Information Needed") and adds its tags. For an ISMoE adapter that page says nothing a
reader can use, so `guard_model_card` wraps that method: the ISMoE section below is written first, between two
marker comments, and PEFT then adds its own tags and version to it as usual. A README.md that is already in the
folder (the user's own, or one the Trainer wrote) is kept, and only the marked section is replaced, so saving
twice never duplicates it and nothing the user wrote is lost.

Metrics reach the card through `record_metrics` (or `ModelCardMetricsCallback` for the Trainer); they live on the
tuner, per adapter, and are written at the next save.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from typing import Any

from huggingface_hub import ModelCard
from transformers import TrainerCallback

__all__ = ["ModelCardMetricsCallback", "guard_model_card", "model_card_section", "model_card_text", "record_metrics"]

START = "<!-- peft_ismoe: start of the generated ISMoE section; edits inside it are replaced at the next save -->"
END = "<!-- peft_ismoe: end of the generated ISMoE section -->"

_TAGS = ("peft_ismoe", "ismoe")

# Trainer bookkeeping that `evaluate` returns beside the metrics; it says nothing about the adapter.
_NOT_METRICS = ("runtime", "samples_per_second", "steps_per_second", "epoch")

_AUTO_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "FEATURE_EXTRACTION": "AutoModel",
}


def _ismoe_tuner(model):
    """The `ISMoEModel` under a `PeftModel`, or None for any other method."""
    from .model import ISMoEModel

    tuner = getattr(model, "base_model", None)
    return tuner if isinstance(tuner, ISMoEModel) else None


def record_metrics(model, metrics: dict[str, float], dataset: str | None = None, adapter_name: str | None = None):
    """Remember `metrics` (name -> number) for the model card the next ``save_pretrained`` writes.

    `model` is the `PeftModel` holding an ISMoE adapter; `adapter_name` defaults to the active one. Later calls
    update earlier values of the same name. `dataset` (for example ``"glue/sst2 validation"``) is shown beside them.
    """
    tuner = _ismoe_tuner(model)
    if tuner is None:
        raise TypeError(f"`model` must be a PeftModel with an ISMoE adapter, got {type(model).__name__}.")
    if not isinstance(metrics, dict) or not metrics:
        raise ValueError(f"`metrics` must be a non-empty dict of name -> number, got {metrics!r}.")
    for name, value in metrics.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"Metric names must be non-empty strings, got {name!r}.")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"Metric {name!r} must be a finite number, got {value!r}.")
    if dataset is not None and not isinstance(dataset, str):
        raise ValueError(f"`dataset` must be a string or None, got {dataset!r}.")
    adapter_name = adapter_name or model.active_adapter
    if adapter_name not in model.peft_config:
        raise ValueError(f"No adapter named {adapter_name!r}; the model has {sorted(model.peft_config)}.")
    entry = tuner.card_metrics.setdefault(adapter_name, {"metrics": {}, "dataset": None})
    entry["metrics"].update({name: float(value) for name, value in metrics.items()})
    if dataset is not None:
        entry["dataset"] = dataset


class ModelCardMetricsCallback(TrainerCallback):
    """Records the Trainer's evaluation metrics on an ISMoE model, so that ``save_pretrained`` writes them.

    `dataset` names what was evaluated on the card. Timing entries (runtime, samples per second) are left out.
    """

    def __init__(self, dataset: str | None = None):
        self.dataset = dataset

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        if model is None or not metrics or _ismoe_tuner(model) is None:
            return
        kept = {
            name: value
            for name, value in metrics.items()
            if not name.endswith(_NOT_METRICS) and isinstance(value, numbers.Real) and math.isfinite(value)
        }
        if kept:
            record_metrics(model, kept, dataset=self.dataset)


def _quantization_of(base_model) -> dict[str, Any] | None:
    config = getattr(getattr(base_model, "config", None), "quantization_config", None)
    if config is None:
        return None
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return as_dict if as_dict.get("quant_method") == "gnpiq" else None


def _value(value) -> str:
    if hasattr(value, "value"):  # enums such as TaskType
        value = value.value
    return f"`{value!r}`" if isinstance(value, str) else f"`{value}`"


def model_card_section(model, adapter_name: str) -> str:
    """The marked ISMoE section of the card for `adapter_name` of `model` (a `PeftModel`)."""
    config = model.peft_config[adapter_name]
    base_model = model.get_base_model()
    base_name = getattr(getattr(base_model, "config", None), "_name_or_path", "") or "<base model>"
    task_type = getattr(config.task_type, "value", config.task_type)
    quantization = _quantization_of(base_model)
    tuner = _ismoe_tuner(model)

    if quantization is not None:
        backbone = f"frozen, its linear layers stored in {quantization['bits']} bits with GNP-IQ"
        load = f"quantization_config=peft_ismoe.GNPIQConfig(bits={quantization['bits']})"
        method = "MP-ISMoE (ISMoE on a GNP-IQ quantized backbone)"
    else:
        backbone = "frozen, in floating point"
        load = ""
        method = "ISMoE"
    auto_class = _AUTO_CLASSES.get(task_type, "AutoModel")
    load_args = f'"{base_name}"' + (f", {load}" if load else "")

    lines = [
        f"## {method} adapter `{adapter_name}`",
        "",
        f"A side network of experts (interactive side mixture-of-experts, arXiv 2605.04058) trained beside "
        f"`{base_name}`, which stays {backbone}. The side network reads the backbone's hidden states; no gradient "
        "flows through the backbone. This folder holds the side network only.",
        "",
        f"- **Method:** {method}",
        f"- **Base model:** `{base_name}`",
        f"- **Task type:** {task_type}",
        "",
        "### Use",
        "",
        "```python",
        "import peft_ismoe  # registers ISMoE with peft and GNP-IQ with transformers",
        "from peft import PeftModel",
        f"from transformers import {auto_class}",
        "",
        f"base = {auto_class}.from_pretrained({load_args})",
        'model = PeftModel.from_pretrained(base, "path/to/this/adapter")',
        "```",
        "",
    ]

    entry = tuner.card_metrics.get(adapter_name) if tuner is not None else None
    if entry and entry["metrics"]:
        dataset = f" on {entry['dataset']}" if entry["dataset"] else ""
        lines += [f"### Metrics{dataset}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value:.4g} |" for name, value in entry["metrics"].items()]
        lines.append("")

    fields = {k: v for k, v in config.to_dict().items() if k not in ("peft_type", "base_model_name_or_path")}
    lines += ["### ISMoE configuration", "", "| field | value |", "|---|---|"]
    lines += [f"| {name} | {_value(value)} |" for name, value in sorted(fields.items())]
    lines.append("")
    if quantization is not None:
        lines += ["### Backbone quantization (GNP-IQ)", "", "| field | value |", "|---|---|"]
        lines += [f"| {name} | {_value(value)} |" for name, value in sorted(quantization.items())]
        lines.append("")
    return "\n".join(lines)


def model_card_text(model) -> str:
    """The marked ISMoE section of the card: one part per ISMoE adapter of `model`, the active one first."""
    from .registration import ISMOE_PEFT_TYPE

    names = [name for name, config in model.peft_config.items() if config.peft_type == ISMOE_PEFT_TYPE]
    names.sort(key=lambda name: name != model.active_adapter)
    return "\n".join([START, *(model_card_section(model, name) for name in names), END])


def _write_section(path: str, section: str) -> None:
    """Put `section` into the card at `path`: replace an earlier marked section, else append, else create."""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        if START in text and END in text:
            before, rest = text.split(START, 1)
            after = rest.split(END, 1)[1]
            text = before + section + after
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n\n"
    else:
        # Front matter first, so that huggingface_hub parses it and PEFT can add its tags.
        text = "---\nlibrary_name: peft\n---\n\n" + section + "\n\n"
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def guard_model_card() -> None:
    """Make ``PeftModel.create_or_update_model_card`` write the ISMoE section for ISMoE adapters (idempotent)."""
    from peft import PeftModel

    original = PeftModel.create_or_update_model_card
    if getattr(original, "_ismoe_card", False):
        return

    @functools.wraps(original)
    def create_or_update_model_card(self, output_dir: str):
        if _ismoe_tuner(self) is None:
            return original(self, output_dir)
        path = os.path.join(output_dir, "README.md")
        _write_section(path, model_card_text(self))
        original(self, output_dir)
        # PEFT replaces the tag list with its own; put ours back so the Hub can find ISMoE adapters.
        card = ModelCard.load(path)
        card.data.tags = sorted({*(card.data.tags or []), *_TAGS})
        card.save(path)

    create_or_update_model_card._ismoe_card = True
    PeftModel.create_or_update_model_card = create_or_update_model_card
