"""Train ISMoE with a plain Accelerate loop: no Trainer, the same code on one CPU, one GPU or several processes.

    python examples/accelerate_loop.py --task sst2 --max-train 2000
    accelerate launch --num_processes 2 examples/accelerate_loop.py --task sst2 --max-train 2000

The all-MiniLM-L6-v2 backbone is quantized to 8 bits with GNP-IQ, wrapped with an ISMoE side network, and trained
with AdamW. Accelerate places the model, shards the batches across processes and averages the gradients; only the
side network (and the classifier) has gradients, so that is all it synchronises.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import get_peft_model
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

import peft_ismoe
from peft_ismoe.backbones import minilm_path
from peft_ismoe.data import GLUE_TASKS, get_glue_task, glue_metrics, load_glue, predictions_from_logits

DEFAULT_DATA_DIR = Path(os.environ.get("GLUE_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="sst2", choices=sorted(GLUE_TASKS))
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--max-train", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=Path("accelerate-ismoe"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    accelerator = Accelerator()
    torch.manual_seed(args.seed)
    task = get_glue_task(args.task)
    data_dir = args.data_dir if args.data_dir.is_dir() else None
    train, dev = load_glue(task, "train", data_dir), load_glue(task, "dev", data_dir)
    order = list(range(len(train)))
    random.Random(args.seed).shuffle(order)
    train = train.select(order[: args.max_train])

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())

    collator = DataCollatorWithPadding(tokenizer)
    train_loader = DataLoader(train.tokenize(tokenizer), batch_size=args.batch_size, shuffle=True, collate_fn=collator)
    dev_loader = DataLoader(dev.tokenize(tokenizer), batch_size=128, collate_fn=collator)

    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=task.num_labels)
    peft_ismoe.quantize_model(base, peft_ismoe.GNPIQConfig(bits=args.bits), progress_bar=accelerator.is_main_process)
    model = get_peft_model(base, peft_ismoe.ISMoEConfig(task_type="SEQ_CLS", salient_feature="mean", init_seed=0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    model, optimizer, train_loader, dev_loader = accelerator.prepare(model, optimizer, train_loader, dev_loader)

    for epoch in range(args.epochs):
        model.train()
        for step, batch in enumerate(train_loader):
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            if step % 20 == 0:
                accelerator.print(f"epoch {epoch} step {step}: loss {loss.item():.4f}")

    model.eval()
    predictions, labels = [], []
    with torch.no_grad():
        for batch in dev_loader:
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            logits, batch_labels = accelerator.gather_for_metrics((logits, batch["labels"]))
            predictions.append(logits.float().cpu())
            labels.append(batch_labels.cpu())
    scores = glue_metrics(
        task, predictions_from_logits(torch.cat(predictions).numpy(), task), torch.cat(labels).numpy()
    )
    accelerator.print(f"{task.folder} dev: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(args.output_dir / "adapter")
        accelerator.print(f"adapter saved to {args.output_dir / 'adapter'}")


if __name__ == "__main__":
    main()
