"""One training step of all-MiniLM-L6-v2 for sequence classification: memory and time, method by method.

    python benchmarks/train_step.py                     # every configuration, table to stdout and docs/
    python benchmarks/train_step.py --only lora ismoe_gnpiq4_e8

Each configuration runs in its own subprocess, so its peak resident memory is its own. Per configuration: the
trainable parameters; bytes of weights, gradients and AdamW state; bytes autograd saves for backward (counted by
storage with ``saved_tensors_hooks``, the model's own parameters excluded: see ``peft_ismoe.memory``); the median
step time over ``--steps`` steps after ``--warmup`` warm-up steps; peak RSS (and ``torch.cuda.max_memory_allocated``
with ``--device cuda``). The batch is 32 real SST-2 training sentences at 64 tokens.

Configurations: full fine-tuning; LoRA r=8 on query, key, value and dense layers; ISMoE with 1, 4 and 8 experts on
an fp32 backbone and on GNP-IQ 8-bit and 4-bit backbones, and 8 experts on 4 bits with the tapped states kept for
backward in bfloat16 (``tap_storage="bfloat16"``); and the floor, a no-grad forward of the backbone alone
(fp32, and GNP-IQ 4-bit for the quantized rows). Ratios are against LoRA and against the floor of the same backbone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SST2_TRAIN = REPO.parent / "shared" / "data" / "glue" / "SST-2" / "train.tsv"
BATCH_SIZE, SEQ_LEN = 32, 64

# name -> (method, backbone bits or None, experts)
CONFIGS: dict[str, tuple[str, int | None, int]] = {
    "forward_fp32": ("forward", None, 0),
    "forward_gnpiq8": ("forward", 8, 0),
    "forward_gnpiq4": ("forward", 4, 0),
    "full": ("full", None, 0),
    "lora": ("lora", None, 0),
    **{f"ismoe_fp32_e{e}": ("ismoe", None, e) for e in (1, 4, 8)},
    **{f"ismoe_gnpiq8_e{e}": ("ismoe", 8, e) for e in (1, 4, 8)},
    **{f"ismoe_gnpiq4_e{e}": ("ismoe", 4, e) for e in (1, 4, 8)},
    "ismoe_gnpiq4_e8_bf16taps": ("ismoe", 4, 8),
}
# Configurations that keep the tapped backbone states for backward in bfloat16 (ISMoEConfig.tap_storage).
BFLOAT16_TAPS = {"ismoe_gnpiq4_e8_bf16taps"}


def make_batch(tokenizer, device: str) -> dict[str, torch.Tensor]:
    lines = SST2_TRAIN.read_text(encoding="utf-8").splitlines()[1:]
    # Long sentences, so that 64 tokens are mostly real text rather than padding.
    rows = sorted((line.split("\t") for line in lines), key=lambda r: -len(r[0]))[:BATCH_SIZE]
    batch = tokenizer(
        [r[0] for r in rows], padding="max_length", truncation=True, max_length=SEQ_LEN, return_tensors="pt"
    )
    batch["labels"] = torch.tensor([int(r[1]) for r in rows])
    return {k: v.to(device) for k, v in batch.items()}


def ismoe_config(experts: int, tap_storage: str = "full"):
    import peft_ismoe

    return peft_ismoe.ISMoEConfig(
        task_type="SEQ_CLS", num_experts=experts, top_k=min(2, experts), tap_storage=tap_storage
    )


def build(method: str, bits: int | None, experts: int, device: str, tap_storage: str = "full"):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    import peft_ismoe
    from peft_ismoe.backbones import minilm_path

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    if bits is not None:
        peft_ismoe.quantize_model(model, peft_ismoe.GNPIQConfig(bits=bits), progress_bar=False)
    if method == "lora":
        config = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"])
        model = get_peft_model(model, config)
    elif method == "ismoe":
        model = get_peft_model(model, ismoe_config(experts, tap_storage))
    elif method == "forward":
        model.requires_grad_(False)
    return model.to(device)


def predict(bits: int | None, experts: int, tap_storage: str) -> dict[str, int]:
    """The memory planner's prediction for an ISMoE configuration, made on the float backbone before building it."""
    from transformers import AutoModelForSequenceClassification

    import peft_ismoe
    from peft_ismoe.backbones import minilm_path

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    gnpiq = None if bits is None else peft_ismoe.GNPIQConfig(bits=bits)
    predicted, _ = peft_ismoe.predict_training_memory(
        model, gnpiq, ismoe_config(experts, tap_storage), BATCH_SIZE, SEQ_LEN
    )
    return predicted.to_dict()


def run_one(name: str, steps: int, warmup: int, device: str) -> dict:
    """Measure one configuration in this process (called in a fresh subprocess)."""
    from transformers import AutoTokenizer

    from peft_ismoe.backbones import minilm_path
    from peft_ismoe.memory import optimizer_state_bytes, peak_rss_bytes, training_memory

    method, bits, experts = CONFIGS[name]
    tap_storage = "bfloat16" if name in BFLOAT16_TAPS else "full"
    predicted = predict(bits, experts, tap_storage) if method == "ismoe" else None
    model = build(method, bits, experts, device, tap_storage)
    batch = make_batch(AutoTokenizer.from_pretrained(minilm_path()), device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    times = []
    if method == "forward":
        model.eval()
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        for step in range(warmup + steps):
            start = time.perf_counter()
            with torch.no_grad():
                model(**inputs)
            sync()
            if step >= warmup:
                times.append(time.perf_counter() - start)
        memory = None
    else:
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        memory = training_memory(model, batch, optimizer)  # also the first warm-up step
        for step in range(warmup + steps):
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            optimizer.step()
            sync()
            if step >= warmup:
                times.append(time.perf_counter() - start)
        assert optimizer_state_bytes(optimizer) == memory.optimizer_state

    result = {
        "name": name,
        "method": method,
        "backbone_bits": bits,
        "experts": experts,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "median_step_seconds": statistics.median(times),
        "peak_rss_bytes": peak_rss_bytes(),
        **({} if memory is None else memory.to_dict()),
    }
    if predicted is not None:
        result["predicted"] = predicted
    if device == "cuda":
        result["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated()
    return result


def _ratio(result: dict, reference: dict | None, key: str) -> str:
    return f"{result[key] / reference[key]:.3f}" if reference else "-"


def format_table(results: dict[str, dict]) -> str:
    lora = results.get("lora")
    header = (
        "| configuration | trainable | saved for backward MiB | weights MiB | grads+optim MiB | total MiB "
        "| total / LoRA | saved / LoRA | step ms | step / LoRA | step / no-grad forward | peak RSS MiB "
        "| planner's total MiB (/ measured) |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    mib = 2**20
    for name, r in results.items():
        floor = results.get({None: "forward_fp32", 8: "forward_gnpiq8", 4: "forward_gnpiq4"}[r["backbone_bits"]])
        step_ms = 1000 * r["median_step_seconds"]
        if r["method"] == "forward":
            rss = f"{r['peak_rss_bytes'] / mib:.0f}"
            cells = [name, "0", *["-"] * 6, f"{step_ms:.0f}", "-", "1.00", rss, "-"]
        else:
            cells = [
                name,
                f"{r['trainable_parameters']:,}",
                f"{r['saved_for_backward'] / mib:.1f}",
                f"{r['weights'] / mib:.1f}",
                f"{(r['gradients'] + r['optimizer_state']) / mib:.1f}",
                f"{r['total'] / mib:.1f}",
                _ratio(r, lora, "total"),
                _ratio(r, lora, "saved_for_backward"),
                f"{step_ms:.0f}",
                _ratio(r, lora, "median_step_seconds"),
                f"{r['median_step_seconds'] / floor['median_step_seconds']:.2f}" if floor else "-",
                f"{r['peak_rss_bytes'] / mib:.0f}",
                f"{r['predicted']['total'] / mib:.1f} ({r['predicted']['total'] / r['total']:.3f})"
                if "predicted" in r
                else "-",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS), help="run just these configurations")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "train_step.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(run_one(args.worker, args.steps, args.warmup, args.device)))
        return

    names = args.only or list(CONFIGS)
    results = {}
    for name in names:
        command = [
            sys.executable,
            __file__,
            "--worker",
            name,
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
        ]
        command += ["--device", args.device]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if done.returncode != 0:
            print(f"{name}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name}: {1000 * results[name]['median_step_seconds']:.0f} ms/step", file=sys.stderr)

    table = format_table(results)
    print(table)
    command = "python benchmarks/train_step.py " + " ".join(sys.argv[1:])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        "# One training step: memory and time\n\n"
        f"Made by `{command.strip()}` on {datetime.now(timezone.utc):%Y-%m-%d} ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, device {args.device}).\n\n"
        f"all-MiniLM-L6-v2 for sequence classification, batch {BATCH_SIZE} x {SEQ_LEN} tokens, AdamW, median of "
        f"{args.steps} steps after {args.warmup} warm-up steps. Ratios against LoRA (r=8 on query, key, value, dense) "
        "and against a no-grad forward of the same backbone.\n\n" + table + "\n\n"
        "```json\n" + json.dumps(results, indent=1) + "\n```\n"
    )


if __name__ == "__main__":
    main()
