"""Fine-tune any local backbone on any GLUE task with ISMoE (optionally on a GNP-IQ backbone) and the Trainer.

    python examples/glue.py --task mrpc --bits 8 --num-experts 8 --top-k 2
    python examples/glue.py --task stsb --model-path /path/to/bert --bits 0 --epochs 3
    python examples/glue.py --help        # every GNPIQConfig and ISMoEConfig field is a flag

The GLUE files are read from ``--data-dir`` (the original TSV layout); without it the task is loaded with
``datasets.load_dataset("glue", task)``, which needs network access. ``--model-path`` defaults to the offline
all-MiniLM-L6-v2. The dev metric is printed (accuracy, F1 for MRPC, Matthews correlation for CoLA, Pearson for
STS-B) and the adapter saved to ``--output-dir``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
from pathlib import Path

import numpy as np
import torch
from peft import get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

import peft_ismoe
from peft_ismoe.backbones import minilm_path
from peft_ismoe.data import GLUE_TASKS, get_glue_task, glue_metrics, load_glue, predictions_from_logits

DEFAULT_DATA_DIR = Path(os.environ.get("GLUE_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"))
# Fields set by the script itself, or meaningless on the command line.
_NOT_FLAGS = {
    "task_type",
    "peft_type",
    "quant_method",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "auto_mapping",
    "peft_version",
}


def add_config_flags(
    parser: argparse.ArgumentParser, config_cls: type, prefix: str = "", skip: tuple[str, ...] = ()
) -> list[str]:
    """One flag per simple field of a config dataclass (its help text from the field's metadata)."""
    group = parser.add_argument_group(config_cls.__name__)
    names = []
    for field in dataclasses.fields(config_cls):
        if field.name in _NOT_FLAGS or field.name in skip or field.name.startswith("_") or not field.init:
            continue
        default = field.default if field.default is not dataclasses.MISSING else None
        # The default tells the type; fields whose default is None or a list take JSON ("3", "null", '["a"]').
        if isinstance(default, bool):
            kind = lambda text: text.lower() in ("1", "true", "yes")  # noqa: E731
        elif isinstance(default, (int, float, str)):
            kind = type(default)
        else:
            kind = json.loads
        flag = "--" + (prefix + field.name).replace("_", "-")
        group.add_argument(flag, dest=prefix + field.name, type=kind, default=default, help=field.metadata.get("help"))
        names.append(field.name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="sst2", choices=sorted(GLUE_TASKS))
    parser.add_argument("--model-path", default=None, help="local backbone folder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--bits", type=int, default=8, help="GNP-IQ bits for the backbone; 0 keeps it in float")
    parser.add_argument("--max-train", type=int, default=8000)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=Path("glue-ismoe"))
    ismoe_fields = add_config_flags(parser, peft_ismoe.ISMoEConfig)
    gnpiq_fields = add_config_flags(parser, peft_ismoe.GNPIQConfig, prefix="gnpiq_", skip=("bits",))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)

    task = get_glue_task(args.task)
    data_dir = args.data_dir if args.data_dir.is_dir() else None
    train, dev = load_glue(task, "train", data_dir), load_glue(task, "dev", data_dir)
    order = list(range(len(train)))
    random.Random(args.seed).shuffle(order)
    train = train.select(order[: args.max_train])

    model_path = args.model_path or str(minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    gnpiq = peft_ismoe.GNPIQConfig(
        bits=args.bits or 8, **{name: getattr(args, "gnpiq_" + name) for name in gnpiq_fields}
    )
    base = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=task.num_labels, quantization_config=gnpiq if args.bits else None
    )
    ismoe = peft_ismoe.ISMoEConfig(task_type="SEQ_CLS", **{name: getattr(args, name) for name in ismoe_fields})
    model = get_peft_model(base, ismoe)
    model.print_trainable_parameters()

    def compute_metrics(prediction) -> dict[str, float]:
        # The model's output carries `aux_loss` beside the logits, so the Trainer hands over a tuple.
        logits = prediction.predictions
        logits = logits[0] if isinstance(logits, tuple) else logits
        return glue_metrics(task, predictions_from_logits(logits, task), prediction.label_ids)

    training_args = TrainingArguments(
        output_dir=str(args.output_dir / "trainer"),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=128,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_train_epochs=args.epochs,
        learning_rate=args.learning_rate,
        warmup_steps=0.06,
        weight_decay=0.01,
        logging_steps=50,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train.tokenize(tokenizer, args.max_length),
        eval_dataset=dev.tokenize(tokenizer, args.max_length),
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        # Evaluation metrics go into the model card that save_pretrained writes beside the adapter.
        callbacks=[peft_ismoe.ModelCardMetricsCallback(dataset=f"GLUE {args.task} dev")],
    )
    trainer.train()
    metrics = trainer.evaluate()
    print(json.dumps({key: float(np.round(value, 4)) for key, value in metrics.items()}, indent=1))
    model.save_pretrained(args.output_dir / "adapter")
    print(f"adapter saved to {args.output_dir / 'adapter'}")


if __name__ == "__main__":
    main()
