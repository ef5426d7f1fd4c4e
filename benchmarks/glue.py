"""GLUE benchmark: every tuning method on all-MiniLM-L6-v2 under one training budget, resumable run by run.

Tasks: SST-2, MRPC, RTE, CoLA and STS-B, scored on their dev sets (accuracy for SST-2 and RTE, F1 for MRPC,
Matthews correlation for CoLA, Pearson for STS-B). The backbone is all-MiniLM-L6-v2 (6 layers, width 384) loaded
offline with ``AutoModelForSequenceClassification``.

Budget, the same for every method: at most 8,000 training examples (the first 8,000 after a shuffle with data
seed 0, so every method and seed sees the same examples), 2 epochs, batch 32, at most 64 tokens. Batches are padded
to their longest member and grouped by length, as the Trainer's ``group_by_length`` does. AdamW with weight decay
0.01, linear decay after a 6% warm-up, gradient norm clipped to 1. Only the learning rate depends on the method,
from the fixed table ``LEARNING_RATES`` below (chosen once, from the usual ranges, not tuned on dev): 5e-5 for full
fine-tuning, 1e-3 for LoRA and BitFit, 2e-3 for the side networks. One exception, in ``TASK_LEARNING_RATES``: LoRA
on STS-B trains at 3e-4, because at 1e-3 its regression collapsed to predicting the mean (Pearson 5.6; the
1e-3 run is kept as a probe). Seeds: 3 for lora, lst and mpismoe_8bit, 1 for
the others.

Methods:
    full          full fine-tuning.
    lora          peft LoRA, r=8, alpha=16, dropout 0.1, on query, key, value and every dense layer; classifier
                  trained.
    bitfit        biases and the classifier only.
    lst           ISMoE with one expert and the plain side router, float backbone (Ladder Side-Tuning's design).
    ismoe_fp32    ISMoE, 8 experts, top-2, interactive router, float backbone.
    mpismoe_8bit  the same ISMoE on a GNP-IQ 8-bit backbone (MP-ISMoE, the paper's setting).
    mpismoe_4bit  the same on a GNP-IQ 4-bit backbone.
    mpismoe_8bit_requant  mpismoe_8bit with the GNP-IQ search repeated at every epoch end on a tenth of the layers
                  (`GNPIQRequantizeCallback`'s defaults, float weights read back from the checkpoint on disk).
    ablation_*    MP-ISMoE with one thing changed (``ABLATION_BASELINES`` says what and against which method), run
                  on SST-2 and STS-B only: plain side router, round-to-nearest 4-bit backbone, 1/4/16 experts, no
                  balancing loss, the router's prior from the mean token instead of [CLS], the pooler trained.
The ISMoE methods are skipped, with a message, while ``peft_ismoe.ISMoEConfig`` cannot be imported.

Each (method, task, seed) run executes in its own process (so its peak RSS is its own) and writes
``benchmarks/results/glue/<method>-<task>-seed<seed>.json`` as soon as it ends: dev metrics, trainable
parameters, training memory, seconds, versions and the command. A rerun skips runs whose file exists unless
``--redo``. ``--report`` builds ``docs/results.md`` and the score-against-memory plot from those files alone.

Training memory is an accounting, measured on the model itself, not a guess: bytes of all weights and buffers
(the packed codes for a GNP-IQ backbone) + gradients of the trainable parameters + optimizer state (read from
AdamW after the first step) + bytes autograd saves for backward, captured with
``torch.autograd.graph.saved_tensors_hooks`` during one forward pass on a full 32 x 64-token batch (storages shared
with parameters are not counted twice). The process's peak RSS (and on CUDA the peak allocated bytes) is recorded
beside it.

Usage:
    python benchmarks/glue.py --methods lora --tasks sst2 mrpc --seeds 0 --threads 1
    python benchmarks/glue.py                 # everything missing, in the default order
    python benchmarks/glue.py --report        # docs/results.md and docs/figures/glue_score_vs_memory.png
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS_DIR = REPO_ROOT / "benchmarks" / "results" / "glue"
DEFAULT_DATA_DIR = Path(os.environ.get("GLUE_DIR", REPO_ROOT.parent / "shared" / "data" / "glue"))
DEFAULT_REPORT = REPO_ROOT / "docs" / "results.md"
DEFAULT_FIGURE = REPO_ROOT / "docs" / "figures" / "glue_score_vs_memory.png"

TASKS = ("sst2", "mrpc", "rte", "cola", "stsb")


@dataclass(frozen=True)
class SideRecipe:
    """How an ISMoE method builds its backbone and side network (the `ISMoEConfig` fields not listed keep their
    defaults)."""

    bits: int | None = None  # GNP-IQ bit width of the backbone; None keeps it in float
    num_iterations: int = 12  # GNP-IQ search length; 0 is plain min-max round-to-nearest
    num_experts: int = 8
    router: str = "interactive"
    aux_loss_coef: float = 0.01
    salient_feature: str | None = None  # None: the [CLS] state for these encoder classifiers
    # BERT's classifier reads the pooler (dense + tanh on [CLS]), which the side network's output passes through;
    # True keeps it in float and trains it with the head, as LoRA (on every dense layer) and BitFit do.
    train_pooler: bool = False


SIDE_RECIPES = {
    "lst": SideRecipe(num_experts=1, router="side"),
    "ismoe_fp32": SideRecipe(),
    "mpismoe_8bit": SideRecipe(bits=8),
    "mpismoe_4bit": SideRecipe(bits=4),
    "mpismoe_8bit_requant": SideRecipe(bits=8),
    # Ablations: MP-ISMoE 8-bit (or 4-bit) with one thing changed, run on ABLATION_TASKS only.
    "ablation_side_router": SideRecipe(bits=8, router="side"),
    "ablation_rtn_4bit": SideRecipe(bits=4, num_iterations=0),
    "ablation_1_expert": SideRecipe(bits=8, num_experts=1),
    "ablation_4_experts": SideRecipe(bits=8, num_experts=4),
    "ablation_16_experts": SideRecipe(bits=8, num_experts=16),
    "ablation_no_balance": SideRecipe(bits=8, aux_loss_coef=0.0),
    "ablation_mean_salient": SideRecipe(bits=8, salient_feature="mean"),
    "ablation_train_pooler": SideRecipe(bits=8, train_pooler=True),
}
MAIN_METHODS = ("lora", "full", "bitfit", "lst", "ismoe_fp32", "mpismoe_8bit", "mpismoe_4bit", "mpismoe_8bit_requant")
ABLATIONS = tuple(name for name in SIDE_RECIPES if name.startswith("ablation_"))
METHODS = MAIN_METHODS + ABLATIONS
ISMOE_METHODS = tuple(SIDE_RECIPES)
ABLATION_TASKS = ("sst2", "stsb")
# What each ablation changes, and the method it is compared against.
ABLATION_BASELINES = {
    "ablation_side_router": (
        "mpismoe_8bit",
        "plain router (reads the side stream only) instead of the interactive one",
    ),
    "ablation_rtn_4bit": ("mpismoe_4bit", "4-bit round-to-nearest backbone instead of 4-bit GNP-IQ"),
    "ablation_1_expert": ("mpismoe_8bit", "1 expert instead of 8"),
    "ablation_4_experts": ("mpismoe_8bit", "4 experts instead of 8"),
    "ablation_16_experts": ("mpismoe_8bit", "16 experts instead of 8"),
    "ablation_no_balance": ("mpismoe_8bit", "balancing loss off (coefficient 0 instead of 0.01)"),
    "ablation_mean_salient": ("mpismoe_8bit", "router prior from the mean of the tokens instead of [CLS]"),
    "ablation_train_pooler": ("mpismoe_8bit", "pooler kept in float and trained with the head"),
}
LEARNING_RATES = {"full": 5e-5, "lora": 1e-3, "bitfit": 1e-3} | {name: 2e-3 for name in SIDE_RECIPES}
# Per-task exceptions, each backed by a probe in benchmarks/results/glue_probes/: at 1e-3 LoRA's STS-B head
# collapsed to the label mean (training loss flat at the label variance), at 3e-4 it learns.
TASK_LEARNING_RATES = {("lora", "stsb"): 3e-4}
NUM_SEEDS = {"lora": 3, "lst": 3, "mpismoe_8bit": 3}  # every other method: 1
METHOD_LABELS = {
    "full": "Full fine-tuning",
    "lora": "LoRA (r=8)",
    "bitfit": "BitFit",
    "lst": "LST-like (ISMoE, 1 expert, side router)",
    "ismoe_fp32": "ISMoE, fp32 backbone",
    "mpismoe_8bit": "MP-ISMoE, 8-bit GNP-IQ backbone",
    "mpismoe_4bit": "MP-ISMoE, 4-bit GNP-IQ backbone",
    "mpismoe_8bit_requant": "MP-ISMoE 8-bit, GNP-IQ search repeated each epoch",
    "ablation_side_router": "MP-ISMoE 8-bit, plain side router",
    "ablation_rtn_4bit": "MP-ISMoE 4-bit, round-to-nearest backbone",
    "ablation_1_expert": "MP-ISMoE 8-bit, 1 expert",
    "ablation_4_experts": "MP-ISMoE 8-bit, 4 experts",
    "ablation_16_experts": "MP-ISMoE 8-bit, 16 experts",
    "ablation_no_balance": "MP-ISMoE 8-bit, no balancing loss",
    "ablation_mean_salient": "MP-ISMoE 8-bit, mean-token salient feature",
    "ablation_train_pooler": "MP-ISMoE 8-bit, pooler trained",
}
LORA_TARGETS = ["query", "key", "value", "dense"]

logger = logging.getLogger("benchmarks.glue")


@dataclass(frozen=True)
class Budget:
    """The training budget shared by every method."""

    max_train: int = 8000
    epochs: int = 2
    batch_size: int = 32
    max_length: int = 64
    data_seed: int = 0
    warmup_fraction: float = 0.06
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0

    def describe(self) -> str:
        return (
            f"at most {self.max_train:,} training examples (first after a seed-{self.data_seed} shuffle), "
            f"{self.epochs} epochs, batch {self.batch_size}, at most {self.max_length} tokens"
        )


def result_path(results_dir: Path, method: str, task: str, seed: int) -> Path:
    return results_dir / f"{method}-{task}-seed{seed}.json"


def ismoe_available() -> bool:
    try:
        from peft_ismoe import ISMoEConfig  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------------------------


def build_model(method: str, num_labels: int):
    """The all-MiniLM-L6-v2 classifier prepared for `method`: only the parameters it trains require grad."""
    import peft
    from transformers import AutoModelForSequenceClassification

    import peft_ismoe
    from peft_ismoe.backbones import minilm_path

    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=num_labels)

    if method == "full":
        return model
    if method == "bitfit":
        for name, parameter in model.named_parameters():
            parameter.requires_grad = name.endswith(".bias") or name.startswith("classifier.")
        return model
    if method == "lora":
        config = peft.LoraConfig(
            task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1, target_modules=LORA_TARGETS
        )
        return peft.get_peft_model(model, config)

    if method not in ISMOE_METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
    gnpiq = gnpiq_config(method)
    if gnpiq is not None:
        model = peft_ismoe.quantize_model(model, gnpiq, progress_bar=False)
    return peft.get_peft_model(model, side_config(method))


def gnpiq_config(method: str):
    """The `GNPIQConfig` of an ISMoE method's backbone, or None for a float backbone."""
    import peft_ismoe

    recipe = SIDE_RECIPES[method]
    if recipe.bits is None:
        return None
    keep_float = ["classifier", "pooler"] if recipe.train_pooler else None  # None: the default heads
    return peft_ismoe.GNPIQConfig(
        bits=recipe.bits, num_iterations=recipe.num_iterations, modules_to_not_convert=keep_float
    )


def side_config(method: str):
    """The `ISMoEConfig` of an ISMoE method."""
    import peft_ismoe

    recipe = SIDE_RECIPES[method]
    return peft_ismoe.ISMoEConfig(
        modules_to_save=["pooler"] if recipe.train_pooler else None,  # PEFT adds the classifier either way
        task_type="SEQ_CLS",
        num_experts=recipe.num_experts,
        top_k=min(2, recipe.num_experts),
        router=recipe.router,
        aux_loss_coef=recipe.aux_loss_coef,
        salient_feature=recipe.salient_feature,
    )


def tokenize(split, tokenizer, max_length: int) -> list[dict]:
    """One feature dict per example (input ids, attention mask, token types, label), unpadded."""
    encoded = tokenizer(*split.texts(), truncation=True, max_length=max_length)
    features = [{key: encoded[key][i] for key in encoded.keys()} for i in range(len(split))]
    for feature, label in zip(features, split.labels, strict=True):
        feature["labels"] = label
    return features


def length_grouped_batches(lengths: list[int], batch_size: int, generator, group: int = 50) -> list[list[int]]:
    """One epoch of batches of similar length, in random order (the idea of the Trainer's ``group_by_length``).

    A random permutation is cut into groups of `group` batches; each group is sorted by length and cut into
    batches, and the batches are shuffled. Every example appears once per epoch, as in plain shuffling, but a batch
    is padded to a length close to its members' (on SST-2 the padded length drops from about 41 to 14 tokens),
    which is what makes CPU runs affordable.
    """
    permutation = generator.permutation(len(lengths))
    batches = []
    for start in range(0, len(permutation), group * batch_size):
        chunk = sorted(permutation[start : start + group * batch_size].tolist(), key=lambda i: -lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in generator.permutation(len(batches))]


def collate(features: list[dict], tokenizer, device, pad_to: int | None = None) -> dict:
    import torch

    labels = [feature["labels"] for feature in features]
    inputs = [{key: value for key, value in feature.items() if key != "labels"} for feature in features]
    padding = "max_length" if pad_to else "longest"
    batch = tokenizer.pad(inputs, padding=padding, max_length=pad_to, return_tensors="pt")
    dtype = torch.float32 if isinstance(labels[0], float) else torch.long
    batch["labels"] = torch.tensor(labels, dtype=dtype)
    return {key: value.to(device) for key, value in batch.items()}


def _tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (tied or viewed tensors count once)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def measure_saved_and_gradients(model, batch) -> dict[str, int]:
    """Bytes autograd saves for backward on `batch` (`peft_ismoe.memory.SavedTensorCounter`: storages of the
    model's own parameters and buffers left out), and the gradient bytes its backward pass leaves. The gradients
    are cleared afterwards, no step is taken.
    """
    from peft_ismoe.memory import SavedTensorCounter

    model.zero_grad(set_to_none=True)
    with SavedTensorCounter(exclude=[*model.parameters(), *model.buffers()]) as counter:
        loss = model(**batch).loss
    loss.backward()
    gradient_bytes = _tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    return {"saved_for_backward_bytes": counter.nbytes, "gradient_bytes": gradient_bytes}


def optimizer_state_bytes(optimizer) -> int:
    from peft_ismoe.memory import optimizer_state_bytes as count

    return count(optimizer)


def evaluate(model, features: list[dict], tokenizer, device, task, batch_size: int = 128) -> dict[str, float]:
    import numpy as np
    import torch

    from peft_ismoe.data import glue_metrics, predictions_from_logits

    model.eval()
    logits = []
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            batch = collate(features[start : start + batch_size], tokenizer, device)
            batch.pop("labels")
            logits.append(model(**batch).logits.float().cpu().numpy())
    predictions = predictions_from_logits(np.concatenate(logits), task)
    return glue_metrics(task, predictions, [feature["labels"] for feature in features])


def versions() -> dict[str, str]:
    import numpy
    import peft
    import torch
    import transformers

    import peft_ismoe

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "peft_ismoe": peft_ismoe.__version__,
        "numpy": numpy.__version__,
        "git_commit": commit,
        "platform": platform.platform(),
    }


def learning_rate_for(method: str, task: str) -> float:
    return TASK_LEARNING_RATES.get((method, task), LEARNING_RATES[method])


def run_one(method: str, task_name: str, seed: int, budget: Budget, args: argparse.Namespace) -> dict:
    """Train `method` on `task_name` with `seed` under `budget`, evaluate on dev, and return the result record."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from peft_ismoe.backbones import minilm_path
    from peft_ismoe.data import get_glue_task, load_glue

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    task = get_glue_task(task_name)
    started = time.perf_counter()

    # Data: the same shuffled subset for every method and seed; the seed only orders batches and initialises.
    train_split, dev_split = load_glue(task, "train", args.data_dir), load_glue(task, "dev", args.data_dir)
    order = np.random.default_rng(budget.data_seed).permutation(len(train_split))[: budget.max_train]
    train_split = train_split.select(order.tolist())
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    train_features = tokenize(train_split, tokenizer, budget.max_length)
    dev_features = tokenize(dev_split, tokenizer, budget.max_length)

    torch.manual_seed(seed)
    model = build_model(method, task.num_labels).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    num_trainable = sum(p.numel() for p in trainable)
    num_total = sum(p.numel() for p in model.parameters())
    weight_bytes = _tensor_bytes([*model.parameters(), *model.buffers()])
    logger.info("%s on %s, seed %d: %s trainable of %s parameters", method, task.name, seed, num_trainable, num_total)

    learning_rate = args.learning_rate or learning_rate_for(method, task_name)
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=budget.weight_decay)
    steps_per_epoch = math.ceil(len(train_features) / budget.batch_size)
    total_steps = steps_per_epoch * budget.epochs
    warmup = max(1, round(budget.warmup_fraction * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total_steps - step) / (total_steps - warmup)))
    )

    # Memory accounting on one full-length batch, before training (no step is taken).
    model.train()
    probe = collate(train_features[: budget.batch_size], tokenizer, device, pad_to=budget.max_length)
    memory = measure_saved_and_gradients(model, probe)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # The training-time repetition of the GNP-IQ search, fed from the float checkpoint on disk (off elsewhere).
    requantize = None
    if method.endswith("_requant"):
        from peft_ismoe import GNPIQRequantizeCallback

        requantize = GNPIQRequantizeCallback(minilm_path(), seed=seed)

    generator = np.random.default_rng(seed)
    lengths = [len(feature["input_ids"]) for feature in train_features]
    losses, step = [], 0
    train_started = time.perf_counter()
    for epoch in range(budget.epochs):
        model.train()
        for indices in length_grouped_batches(lengths, budget.batch_size, generator):
            batch = collate([train_features[i] for i in indices], tokenizer, device)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, budget.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if step == 0:
                memory["optimizer_state_bytes"] = optimizer_state_bytes(optimizer)
            losses.append(loss.item())
            step += 1
            if step % args.log_every == 0 or step == total_steps:
                logger.info(
                    "%s %s seed %d: epoch %d step %d/%d loss %.4f (%.0f s)",
                    method, task.name, seed, epoch, step, total_steps, np.mean(losses[-args.log_every :]),
                    time.perf_counter() - train_started,
                )  # fmt: skip
        if requantize is not None:
            round_ = requantize.requantize(model, round_index=epoch)
            logger.info("GNP-IQ search repeated: weight error %.6g -> %.6g", round_.error_before, round_.error_after)
    train_seconds = time.perf_counter() - train_started

    # Expert usage is counted over the dev pass: which experts the trained router picks on unseen text.
    tuner = getattr(model, "base_model", None)
    if hasattr(tuner, "reset_expert_usage"):
        tuner.reset_expert_usage()
    eval_started = time.perf_counter()
    metrics = evaluate(model, dev_features, tokenizer, device, task)
    eval_seconds = time.perf_counter() - eval_started
    expert_usage = None
    if hasattr(tuner, "expert_usage"):
        expert_usage = {name: counts.tolist() for name, counts in tuner.expert_usage().items()}

    memory["weight_bytes"] = weight_bytes
    memory["total_bytes"] = (
        weight_bytes + memory["gradient_bytes"] + memory["optimizer_state_bytes"] + memory["saved_for_backward_bytes"]
    )
    memory["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    if device.type == "cuda":
        memory["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)

    chunk = max(1, len(losses) // 20)
    return {
        "method": method,
        "task": task.name,
        "seed": seed,
        "metric": task.metric,
        "score": metrics["score"],
        "metrics": metrics,
        "trainable_parameters": num_trainable,
        "total_parameters": num_total,
        "memory": memory,
        "seconds": {
            "train": train_seconds,
            "eval": eval_seconds,
            "total": time.perf_counter() - started,
        },
        "learning_rate": learning_rate,
        "expert_usage": expert_usage,
        "budget": asdict(budget) | {"train_examples": len(train_features), "steps": total_steps},
        "train_loss_curve": [float(np.mean(losses[i : i + chunk])) for i in range(0, len(losses), chunk)],
        "device": str(device),
        "threads": args.threads,
        "versions": versions(),
        "command": args.command,
        "run_command": " ".join(shlex.quote(part) for part in single_run_argv(method, task.name, seed, args)),
    }


def write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    temporary.replace(path)  # a run interrupted while writing never leaves a half file that would be skipped


# ----------------------------------------------------------------------------------------------------------------
# Driving runs
# ----------------------------------------------------------------------------------------------------------------


def single_run_argv(method: str, task: str, seed: int, args: argparse.Namespace) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--single",
        f"{method}:{task}:{seed}",
        "--device", args.device,
        "--threads", str(args.threads),
        "--max-train", str(args.max_train),
        "--data-dir", str(args.data_dir),
        "--results-dir", str(args.results_dir),
        *(["--learning-rate", str(args.learning_rate)] if args.learning_rate else []),
        "--command", args.command,
    ]  # fmt: skip


def planned_runs(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    runs = []
    for method in args.methods:
        seeds = args.seeds if args.seeds is not None else list(range(NUM_SEEDS.get(method, 1)))
        tasks = [t for t in args.tasks if t in ABLATION_TASKS] if method in ABLATIONS else args.tasks
        for task in tasks:
            runs.extend((method, task, seed) for seed in seeds)
    return runs


def run_all(args: argparse.Namespace) -> int:
    have_ismoe = ismoe_available()
    failures = 0
    for method, task, seed in planned_runs(args):
        path = result_path(args.results_dir, method, task, seed)
        if method in ISMOE_METHODS and not have_ismoe:
            logger.warning(
                "Skipping %s on %s (seed %d): peft_ismoe.ISMoEConfig is not importable yet", method, task, seed
            )
            continue
        if path.exists() and not args.redo:
            logger.info("Skipping %s: already done (pass --redo to run it again)", path.name)
            continue
        logger.info("Running %s on %s, seed %d", method, task, seed)
        completed = subprocess.run(single_run_argv(method, task, seed, args))
        if completed.returncode != 0:
            failures += 1
            logger.error("%s on %s, seed %d failed with exit code %d", method, task, seed, completed.returncode)
    return 1 if failures else 0


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def load_results(results_dir: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(results_dir.glob("*.json"))]


@dataclass(frozen=True)
class ChanceLevel:
    """What a constant predictor scores on a task's dev set, and the line below which a method is "at chance".

    The test is run on ``statistic``: accuracy for the classification tasks judged by accuracy or F1 (F1 has no
    simple null distribution, and the all-positive predictor already scores 81 F1 on MRPC), the headline metric for
    the correlations. ``margin`` is two standard errors of that statistic under chance: binomial at the majority
    rate for accuracy, one over the square root of the dev size for a correlation.
    """

    score: float  # headline metric of the constant predictor, in points
    statistic: str  # key of the result's `metrics` that the test reads
    chance: float  # the statistic's value at chance, in points
    margin: float  # two standard errors, in points

    @property
    def threshold(self) -> float:
        return self.chance + self.margin


def chance_levels(data_dir: Path) -> dict[str, ChanceLevel]:
    """The `ChanceLevel` of every task, from its dev labels."""
    from peft_ismoe.data import binary_f1, get_glue_task, load_glue

    levels = {}
    for name in TASKS:
        task = get_glue_task(name)
        labels = load_glue(task, "dev", data_dir).labels
        n = len(labels)
        if task.metric in ("pearson", "matthews_correlation"):
            levels[name] = ChanceLevel(score=0.0, statistic=task.metric, chance=0.0, margin=100 * 2 / math.sqrt(n))
            continue
        majority = max(set(labels), key=labels.count)
        rate = labels.count(majority) / n
        score = binary_f1([majority] * n, labels) if task.metric == "f1" else rate
        margin = 100 * 2 * math.sqrt(rate * (1 - rate) / n)
        levels[name] = ChanceLevel(score=100 * score, statistic="accuracy", chance=100 * rate, margin=margin)
    return levels


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _format_score(values: list[float]) -> str:
    if not values:
        return "—"
    mean, std = _mean_std(values)
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def summarise(results: list[dict]) -> dict[str, dict]:
    """Per method: scores per task (in points), memory and time per run, parameters and seed counts."""
    by_method: dict[str, dict] = {}
    for record in results:
        entry = by_method.setdefault(
            record["method"],
            {
                "scores": defaultdict(list),
                "statistics": defaultdict(dict),
                "memory": [],
                "rss": [],
                "seconds": [],
                "trainable": set(),
                "total": set(),
            },
        )
        entry["scores"][record["task"]].append(100 * record["score"])
        for key, value in record.get("metrics", {"score": record["score"]}).items():
            entry["statistics"][record["task"]].setdefault(key, []).append(100 * value)
        entry["memory"].append(record["memory"]["total_bytes"])
        entry["rss"].append(record["memory"]["peak_rss_bytes"])
        entry["seconds"].append(record["seconds"]["total"])
        entry["trainable"].add(record["trainable_parameters"])
        entry["total"].add(record["total_parameters"])
    return by_method


def _all_at_chance(summary: dict[str, dict], methods: list[str], task: str, level: ChanceLevel) -> bool:
    """True when `task` has results and every method's mean `level.statistic` sits below `level.threshold`."""
    means = [
        _mean_std(summary[m]["statistics"][task][level.statistic])[0]
        for m in methods
        if level.statistic in summary[m]["statistics"].get(task, {})
    ]
    return bool(means) and all(mean < level.threshold for mean in means)


def _display_path(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def write_report(
    results: list[dict],
    data_dir: Path,
    report_path: Path,
    figure_path: Path,
    results_dir: Path = DEFAULT_RESULTS_DIR,
    planner_check: bool = True,
) -> str:
    if not results:
        raise ValueError(f"No result files to report on; run the benchmark first (looked in {results_dir}).")
    budgets = {
        json.dumps({k: v for k, v in r["budget"].items() if k not in ("train_examples", "steps")}) for r in results
    }
    budget = Budget(**json.loads(sorted(budgets)[0]))
    if len(budgets) > 1:
        logger.warning("The result files hold %d different budgets; the table states the first", len(budgets))
    devices = sorted({r["device"] for r in results})
    levels = chance_levels(data_dir)
    summary = summarise(results)
    methods = [m for m in MAIN_METHODS if m in summary]
    # Percentages are of the unmodified float model (a GNP-IQ backbone holds its weights as buffers, not parameters).
    reference = max((max(summary[m]["total"]) for m in ("full", "bitfit") if m in summary), default=None)
    mib = 2**20

    task_heads = {"sst2": "SST-2 acc", "mrpc": "MRPC F1", "rte": "RTE acc", "cola": "CoLA MCC", "stsb": "STS-B r"}
    at_chance = [task for task in TASKS if _all_at_chance(summary, methods, task, levels[task])]
    lines = [
        "# GLUE results",
        "",
        "Generated by `python benchmarks/glue.py --report` from the JSON files in "
        f"`{_display_path(results_dir)}`; do not edit by hand. What the figures say, and what was tried where a "
        "target is missed: `docs/glue_discussion.md`.",
        "",
        f"Backbone all-MiniLM-L6-v2 (6 layers, width 384), dev sets. Budget, the same for every method: "
        f"{budget.describe()}; AdamW, weight decay {budget.weight_decay}, linear decay after a "
        f"{budget.warmup_fraction:.0%} warm-up. Device: {', '.join(devices)}.",
        "",
        "Scores are in points (mean ± sample standard deviation over seeds where there are several). Training "
        "memory is the accounting of weights + gradients + optimizer state + tensors saved for backward on one "
        f"{budget.batch_size} x {budget.max_length}-token batch; peak RSS is the whole process's, Python and "
        "data included. LoRA's figure includes what its dropout (0.1) saves for backward; `docs/train_step.md` "
        "measures LoRA without dropout. Seconds per run are wall time on a shared two-core machine, one thread per "
        "run, often with other runs beside it: a rough guide, not a speed comparison (that is "
        "`benchmarks/train_step.py`).",
        "",
        "| method | seeds | trainable params | train memory (MiB) | peak RSS (MiB) | s / run | "
        + " | ".join(task_heads[t] + (" (at chance)" if t in at_chance else "") for t in TASKS)
        + " | mean |",
        "|---|---|---|---|---|---|" + "---|" * len(TASKS) + "---|",
    ]
    for method in methods:
        entry = summary[method]
        planned = NUM_SEEDS.get(method, 1)
        cells = [
            _format_score(scores) + (" †" if 0 < len(scores) < planned else "")
            for scores in (entry["scores"].get(t, []) for t in TASKS)
        ]
        task_means = [_mean_std(entry["scores"][t])[0] for t in TASKS if entry["scores"].get(t)]
        mean = f"{sum(task_means) / len(task_means):.1f}" if len(task_means) == len(TASKS) else "—"
        trainable = max(entry["trainable"])
        lines.append(
            f"| {METHOD_LABELS[method]} | {planned} | {trainable:,} "
            f"({100 * trainable / (reference or max(entry['total'])):.2f}%) | {max(entry['memory']) / mib:.1f} | "
            f"{max(entry['rss']) / mib:.0f} | {sum(entry['seconds']) / len(entry['seconds']):.0f} | "
            + " | ".join(cells)
            + f" | {mean} |"
        )
    lines.append(
        "| *constant predictor (chance)* | | | | | | " + " | ".join(f"*{levels[t].score:.1f}*" for t in TASKS) + " | |"
    )
    lines += [
        "",
        "Trainable parameters (and their share of the float model's) are those of the two-class tasks (STS-B's one-output head has 385 fewer); the mean "
        "is over the five tasks and shown only where all five have a result; — is a run not done yet, † a score "
        "from fewer seeds than planned so far.",
        "",
    ]
    if at_chance:
        names = ", ".join(task_heads[t].split()[0] for t in at_chance)
        lines += [
            f"**At chance:** on {names} every method scores within two standard errors of a constant predictor "
            "(accuracy against the majority-class rate; correlation against 0), so the differences between methods "
            "there are noise, not a ranking.",
            "",
        ]
    lines += ["Learning rates (fixed per method, not tuned on dev; one exception, backed by a probe below):", ""]
    lines += [
        f"- {METHOD_LABELS[m]}: {LEARNING_RATES[m]:g}"
        + "".join(f" ({task}: {rate:g})" for (name, task), rate in TASK_LEARNING_RATES.items() if name == m)
        for m in methods
    ]
    lines += ["", f"![score against training memory]({os.path.relpath(figure_path, report_path.parent)})", ""]
    lines += target_lines(summary)
    lines += ablation_lines(summary)
    usage_path = figure_path.with_name("glue_expert_usage.png")
    if plot_expert_usage(results, usage_path):
        lines += [
            "## Expert usage",
            "",
            "Share of routing slots each expert received on the dev set after training, per side block. "
            "An even split is 1/E per expert; the balancing loss is what keeps it near that.",
            "",
            f"![expert usage]({os.path.relpath(usage_path, report_path.parent)})",
            "",
        ]
    lines += probe_lines(summary, load_probes(results_dir))
    if planner_check:
        lines += planner_lines(summary, results)

    plot_score_vs_memory(summary, methods, figure_path, levels)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text("\n".join(lines))
    return "\n".join(lines)


def _section(title: str, intro: str, columns: list[str]) -> list[str]:
    """The opening lines of a report section: heading, a paragraph, and a table's header row and rule."""
    return [f"## {title}", "", intro, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def _five_task_mean(entry: dict) -> float | None:
    if not all(entry["scores"].get(t) for t in TASKS):
        return None
    return sum(_mean_std(entry["scores"][t])[0] for t in TASKS) / len(TASKS)


def target_lines(summary: dict[str, dict]) -> list[str]:
    """The targets on the five-task mean, each with the measured figure, once the methods they compare are in."""
    means = {m: _five_task_mean(summary[m]) for m in ("lora", "lst", "mpismoe_8bit", "mpismoe_4bit") if m in summary}
    if means.get("mpismoe_8bit") is None:
        return []
    ours = means["mpismoe_8bit"]
    rows = []
    if means.get("lora") is not None:
        rows.append(("within 0.3 points of LoRA", f"{ours - means['lora']:+.1f} points", ours >= means["lora"] - 0.3))
        ratio = max(summary["mpismoe_8bit"]["memory"]) / max(summary["lora"]["memory"])
        rows.append(("at most 0.25x LoRA's training memory", f"{ratio:.3f}x", ratio <= 0.25))
    if means.get("lst") is not None:
        rows.append(
            ("at least 1.0 point above LST-like", f"{ours - means['lst']:+.1f} points", ours >= means["lst"] + 1.0)
        )
    if means.get("mpismoe_4bit") is not None:
        gap = means["mpismoe_4bit"] - ours
        rows.append(("4-bit within 0.5 points of 8-bit", f"{gap:+.1f} points", gap >= -0.5))
    lines = _section(
        "Targets", "MP-ISMoE 8-bit against its peers, on the five-task mean (seed means first).",
        ["target", "measured", "met"],
    )  # fmt: skip
    lines += [f"| {name} | {value} | {'yes' if met else '**no**'} |" for name, value, met in rows]
    return [*lines, ""]


def ablation_lines(summary: dict[str, dict]) -> list[str]:
    """One row per ablation: its score and its reference method's on each ablation task, and the difference."""
    present = [name for name in ABLATIONS if name in summary]
    if not present:
        return []
    heads = {"sst2": "SST-2 acc", "stsb": "STS-B r"}
    lines = _section(
        "Ablations",
        "Each row changes one thing in MP-ISMoE (one seed, seed 0) and is compared with the unchanged method "
        "(its seed mean where it has several). Δ is the ablation minus the reference.",
        ["change", "reference", "train memory (MiB)", "trainable params"]
        + [column for t in ABLATION_TASKS for column in (heads[t], "ref.", "Δ")],
    )
    for name in present:
        reference, change = ABLATION_BASELINES[name]
        entry, base = summary[name], summary.get(reference)
        cells = []
        for task in ABLATION_TASKS:
            scores = entry["scores"].get(task, [])
            base_scores = base["scores"].get(task, []) if base else []
            delta = f"{_mean_std(scores)[0] - _mean_std(base_scores)[0]:+.1f}" if scores and base_scores else "—"
            cells += [_format_score(scores), _format_score(base_scores), delta]
        lines.append(
            f"| {change} | {reference} | {max(entry['memory']) / 2**20:.1f} | {max(entry['trainable']):,} | "
            + " | ".join(cells)
            + " |"
        )
    return [*lines, ""]


def load_probes(results_dir: Path) -> list[dict]:
    """Runs outside the table (another learning rate, or a variant on a task the ablations skip), from
    ``<results_dir>_probes/<name>/*.json``."""
    sweep_dir = results_dir.with_name(results_dir.name + "_probes")
    return [json.loads(path.read_text()) for path in sorted(sweep_dir.glob("*/*.json"))]


def probe_lines(summary: dict[str, dict], probes: list[dict]) -> list[str]:
    """Each probe beside the same method and task in the table, at the table's rate (same seed)."""
    if not probes:
        return []
    lines = _section(
        "Probes",
        "Runs outside the table, made to check whether a result that looks broken is the learning rate's fault "
        "(`--learning-rate`), or whether a variant helps where the side networks fail; results in "
        "`benchmarks/results/glue_probes/`. The table keeps the fixed rates.",
        ["method", "task", "seed", "learning rate", "score", "at the table's rate"],
    )
    for probe in sorted(probes, key=lambda r: (r["method"], r["task"], r["learning_rate"])):
        method, task = probe["method"], probe["task"]
        table = summary.get(method, {}).get("scores", {}).get(task, [])
        if table:
            reference = f"{table[0]:.1f} ({learning_rate_for(method, task):g})"
        elif method in ABLATION_BASELINES:  # a variant probed off the ablation tasks: compare with what it varies
            base = ABLATION_BASELINES[method][0]
            scores = summary.get(base, {}).get("scores", {}).get(task, [])
            reference = f"{scores[0]:.1f} ({base}, {learning_rate_for(base, task):g})" if scores else "—"
        else:
            reference = "—"
        lines.append(
            f"| {METHOD_LABELS[method]} | {task} | {probe['seed']} | {probe['learning_rate']:g} | "
            f"{100 * probe['score']:.1f} | {reference} |"
        )
    return [*lines, ""]


def planner_lines(summary: dict[str, dict], results: list[dict]) -> list[str]:
    """`peft_ismoe.plan`'s accounting predicted for each ISMoE configuration, beside the benchmark's measurement."""
    from transformers import AutoModelForSequenceClassification

    import peft_ismoe
    from peft_ismoe.backbones import minilm_path

    budget = Budget()
    rows = []
    for method in (m for m in ISMOE_METHODS if m in summary):
        measured = [r for r in results if r["method"] == method and r["task"] != "stsb"]
        if not measured:
            continue
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
        predicted, _ = peft_ismoe.predict_training_memory(
            model, gnpiq_config(method), side_config(method), budget.batch_size, budget.max_length
        )
        actual = measured[0]["memory"]["total_bytes"]
        rows.append((method, predicted.total, actual))
    if not rows:
        return []
    lines = _section(
        "The memory planner against the measurement",
        "`peft_ismoe.predict_training_memory` (the accounting `peft_ismoe.plan` chooses with) for each ISMoE "
        f"configuration on a {budget.batch_size} x {budget.max_length}-token batch, computed without training or "
        "quantizing, against the training memory the benchmark measured on a two-class task.",
        ["configuration", "predicted (MiB)", "measured (MiB)", "predicted / measured"],
    )
    lines += [f"| {METHOD_LABELS[m]} | {p / 2**20:.1f} | {a / 2**20:.1f} | {p / a:.3f} |" for m, p, a in rows]
    return [*lines, ""]


def plot_expert_usage(results: list[dict], figure_path: Path) -> bool:
    """Heat maps of the routing share per side block and expert on the ablation tasks, one run (the lowest seed
    that recorded usage) per method that routes (MP-ISMoE 8-bit and its multi-expert ablations).

    Returns False (and draws nothing) when no run recorded it.
    """
    shown = (
        "mpismoe_8bit",
        "ablation_no_balance",
        "ablation_side_router",
        "ablation_4_experts",
        "ablation_16_experts",
    )
    chosen, seen = [], set()
    for record in sorted(results, key=lambda r: (shown.index(r["method"]) if r["method"] in shown else 99, r["seed"])):
        key = (record["method"], record["task"])
        if record["method"] in shown and record["task"] in ABLATION_TASKS and record.get("expert_usage"):
            if key not in seen:
                seen.add(key)
                chosen.append(record)
    chosen.sort(key=lambda r: (ABLATION_TASKS.index(r["task"]), shown.index(r["method"])))
    if not chosen:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    columns = min(4, len(chosen))
    rows = math.ceil(len(chosen) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.8 * rows), squeeze=False)
    for axis in axes.flat[len(chosen) :]:
        axis.set_visible(False)
    for axis, record in zip(axes.flat, chosen, strict=False):  # the grid may have spare panels
        counts = np.array(list(record["expert_usage"].values()), dtype=float)
        share = counts / counts.sum(axis=1, keepdims=True).clip(min=1)
        image = axis.imshow(share, vmin=0, vmax=min(1.0, 3 / share.shape[1]), cmap="viridis", aspect="auto")
        axis.set_title(f"{METHOD_LABELS[record['method']]}\n{record['task']}, seed {record['seed']}", fontsize=8)
        axis.set_xlabel("expert")
        axis.set_ylabel("side block")
        figure.colorbar(image, ax=axis, fraction=0.05)
    figure.tight_layout()
    figure_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(figure_path, dpi=120)
    plt.close(figure)
    return True


def plot_score_vs_memory(
    summary: dict[str, dict], methods: list[str], figure_path: Path, levels: dict[str, ChanceLevel] | None = None
) -> None:
    """One panel per task and one for the mean: each method's dev score against its training memory (MiB).

    Error bars are the standard deviation over seeds; the dashed line is the constant predictor's score.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"sst2": "SST-2 (accuracy)", "mrpc": "MRPC (F1)", "rte": "RTE (accuracy)", "cola": "CoLA (Matthews)"}
    titles |= {"stsb": "STS-B (Pearson)", "mean": "mean over the five tasks"}
    figure, axes = plt.subplots(2, 3, figsize=(13, 7.5), sharex=True)
    for axis, panel in zip(axes.flat, [*TASKS, "mean"], strict=True):
        drawn = 0
        for index, method in enumerate(methods):
            entry = summary[method]
            memory = max(entry["memory"]) / 2**20
            if panel == "mean":
                if not all(entry["scores"].get(t) for t in TASKS):
                    continue
                score, std = sum(_mean_std(entry["scores"][t])[0] for t in TASKS) / len(TASKS), None
            elif entry["scores"].get(panel):
                score, std = _mean_std(entry["scores"][panel])
            else:
                continue
            axis.errorbar(memory, score, yerr=std, fmt="o", color=f"C{index}", label=METHOD_LABELS[method], capsize=3)
            drawn += 1
        if levels is not None and panel in levels:
            axis.axhline(levels[panel].score, color="grey", linestyle="--", linewidth=1, label="constant predictor")
        if not drawn:
            axis.text(0.5, 0.8, "no results yet", transform=axis.transAxes, ha="center", va="center", color="grey")
        axis.set_xscale("log")
        axis.set_title(titles[panel])
        axis.set_xlabel("training memory (MiB, log scale)")
        axis.set_ylabel("dev score (points)")
        axis.grid(alpha=0.3)

    # One legend for the figure: the union of the panels' entries, in first-seen order.
    legend: dict[str, object] = {}
    for axis in axes.flat:
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    figure.legend(list(legend.values()), list(legend), loc="lower center", ncol=4, fontsize=9)
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    figure_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(figure_path, dpi=120)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="Default: 3 or 1 per method.")
    parser.add_argument("--max-train", type=int, default=Budget.max_train, help="Training examples at most.")
    parser.add_argument("--device", default="cpu", help="cpu or cuda.")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default all cores).")
    parser.add_argument(
        "--learning-rate", type=float, default=None,
        help="Override the method's learning rate (for sweeps; give them their own --results-dir).",
    )  # fmt: skip
    parser.add_argument("--redo", action="store_true", help="Run again even where a result file exists.")
    parser.add_argument("--report", action="store_true", help="Only assemble docs/results.md and the plot.")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="Folder of the GLUE TSV files.")
    parser.add_argument("--results-dir", type=Path, default=None, help="Default benchmarks/results/glue[/cuda].")
    parser.add_argument("--report-path", type=Path, default=DEFAULT_REPORT)
    parser.add_argument("--figure-path", type=Path, default=DEFAULT_FIGURE)
    parser.add_argument("--log-every", type=int, default=50, help="Training steps between loss log lines.")
    parser.add_argument("--single", default=None, help=argparse.SUPPRESS)  # method:task:seed, run in this process
    parser.add_argument("--command", default=None, help=argparse.SUPPRESS)  # the user's command, kept in results
    args = parser.parse_args(argv)

    if args.max_train < 1:
        parser.error(f"--max-train must be a positive integer, got {args.max_train!r}")
    if args.learning_rate is not None and not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        parser.error(f"--learning-rate must be a positive number, got {args.learning_rate!r}")
    if args.threads < 1:
        parser.error(f"--threads must be a positive integer, got {args.threads!r}")
    if args.results_dir is None:
        args.results_dir = DEFAULT_RESULTS_DIR / ("cuda" if args.device.startswith("cuda") else "")
    if args.command is None:
        args.command = " ".join(
            shlex.quote(part) for part in ["python", "benchmarks/glue.py", *(argv or sys.argv[1:])]
        )
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)

    if args.report:
        table = write_report(
            load_results(args.results_dir), args.data_dir, args.report_path, args.figure_path, args.results_dir
        )
        logger.info("Wrote %s and %s\n%s", args.report_path, args.figure_path, table)
        return 0

    if args.single is not None:
        method, task, seed = args.single.split(":")
        budget = Budget(max_train=args.max_train)
        record = run_one(method, task, int(seed), budget, args)
        path = result_path(args.results_dir, method, task, int(seed))
        write_json(path, record)
        logger.info(
            "%s on %s, seed %s: %s %.4f, %.1f MiB training memory, %.0f s -> %s",
            method, task, seed, record["metric"], record["score"], record["memory"]["total_bytes"] / 2**20,
            record["seconds"]["total"], path,
        )  # fmt: skip
        return 0

    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
