"""Train a tiny ISMoE model in one process or on several (DDP or FSDP2); run by `test_distributed.py`.

Run alone (one process, the whole global batch per step) or under a launcher (``--multi_gpu`` starts one process
per rank through torchrun; on a machine without GPUs they join a gloo group; ``--cpu`` alone would start one)::

    python tests/distributed_train.py OUT_DIR --per-device-batch 8
    python -m accelerate.commands.launch --multi_gpu --num_processes 2 tests/distributed_train.py OUT_DIR \
        --per-device-batch 4

Both see the same global batches in the same order (no shuffling; Accelerate deals consecutive per-device batches
to the ranks), so with ``aux_loss_coef=0`` and no dropout they follow the same trajectory up to float rounding. For
each of ``--modes`` (``find_unused``: DDP's ``find_unused_parameters=True``, what the HF Trainer picks for a
PeftModel; ``plain``: without it; ``fsdp``: FSDP2's ``fully_shard`` on the side networks and the trained head,
see `shard_trainable_parts`) the main process writes ``OUT_DIR/adapter_{mode}.safetensors`` (the trained side
network and head), and ``OUT_DIR/usage.json`` holds, per DDP mode and step, every rank's routing-slot counts of the
first side block.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from peft import get_peft_model
from safetensors.torch import save_file
from transformers import BertConfig, BertForSequenceClassification

from peft_ismoe import ISMoEConfig

BERT = BertConfig(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    num_labels=2,
    # Dropout draws from each rank's own random stream; without it one process and two follow the same path.
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
NUM_EXAMPLES = 32
SEQ = 6


class Examples(torch.utils.data.Dataset):
    """Short random sequences whose label is readable from the first token."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, BERT.vocab_size, (NUM_EXAMPLES, SEQ), generator=generator)
        self.mask = torch.ones_like(self.ids)
        self.mask[::3, SEQ - 2 :] = 0  # some padding, so masks matter
        self.labels = (self.ids[:, 0] > BERT.vocab_size // 2).long()

    def __len__(self) -> int:
        return NUM_EXAMPLES

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def build_model(aux_loss_coef: float = 0.0):
    torch.manual_seed(0)
    base = BertForSequenceClassification(copy.deepcopy(BERT))
    # Many experts and top-1 over few tokens per rank: some experts get no token on a rank at most steps.
    config = ISMoEConfig(task_type="SEQ_CLS", num_experts=8, top_k=1, aux_loss_coef=aux_loss_coef, init_seed=0)
    return get_peft_model(base, config)


def train(
    accelerator: Accelerator, per_device_batch: int, steps: int, aux_loss_coef: float = 0.0
) -> tuple[dict[str, torch.Tensor], list]:
    """`steps` AdamW steps; the trained tensors and, per step, every rank's routing counts of the first side block."""
    model = build_model(aux_loss_coef)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loader = torch.utils.data.DataLoader(Examples(), batch_size=per_device_batch, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    tuner = accelerator.unwrap_model(model).base_model

    usage = []
    model.train()
    batches = iter(loader)
    for _ in range(steps):
        batch = next(batches)
        tuner.reset_expert_usage()
        optimizer.zero_grad()
        accelerator.backward(model(**batch).loss)
        optimizer.step()
        counts = tuner.expert_usage()["backbone.blocks.0"]
        usage.append(accelerator.gather(counts[None]).tolist())  # [ranks, E]
    trained = {n: p.detach().clone().contiguous() for n, p in tuner.named_parameters() if p.requires_grad}
    return trained, usage


def shard_trainable_parts(model) -> None:
    """FSDP2 over what trains only: each side network and each trained head copy is sharded across the ranks.

    The frozen (possibly quantized) backbone is left out, so every rank keeps its own full copy and FSDP never
    gathers it. A side network is called from the backbone's hooks, not through the module that holds it, so each
    one is wrapped itself: that call is what makes FSDP gather its parameters in time.
    """
    from peft.utils.other import ModulesToSaveWrapper
    from torch.distributed.fsdp import fully_shard

    for sides in model.base_model.ismoe_layer.ismoe_side.values():
        for side in sides.values():
            fully_shard(side)
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            for copy_ in module.modules_to_save.values():
                fully_shard(copy_)


def train_fsdp(accelerator: Accelerator, per_device_batch: int, steps: int) -> dict[str, torch.Tensor]:
    """As `train`, with the trainable parts under FSDP2 instead of DDP; the trained tensors, gathered."""
    model = build_model()
    shard_trainable_parts(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loader = torch.utils.data.DataLoader(Examples(), batch_size=per_device_batch, shuffle=False)
    loader = accelerator.prepare_data_loader(loader)

    model.train()
    batches = iter(loader)
    for _ in range(steps):
        batch = next(batches)
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    trained = {}
    for name, p in model.base_model.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p  # a collective: every rank calls it
            trained[name] = full.detach().clone().contiguous()
    return trained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-device-batch", type=int, required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--aux-loss-coef", type=float, default=0.0, help="DDP modes only; the test keeps 0")
    parser.add_argument("--modes", default="find_unused,plain,fsdp", help="comma-separated: find_unused, plain, fsdp")
    args = parser.parse_args()

    torch.set_num_threads(1)
    results = {}
    for mode in args.modes.split(","):
        # One Accelerator per mode: the DDP options are read when the model is prepared.
        handlers = [DistributedDataParallelKwargs(find_unused_parameters=mode == "find_unused")]
        accelerator = Accelerator(cpu=True, kwargs_handlers=handlers)
        if mode == "fsdp":
            trained = train_fsdp(accelerator, args.per_device_batch, args.steps)
        else:
            trained, results[mode] = train(accelerator, args.per_device_batch, args.steps, args.aux_loss_coef)
        if accelerator.is_main_process:
            args.out.mkdir(parents=True, exist_ok=True)
            save_file(trained, str(args.out / f"adapter_{mode}.safetensors"))
        accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        (args.out / "usage.json").write_text(json.dumps({"world_size": accelerator.num_processes, "usage": results}))
    accelerator.end_training()


if __name__ == "__main__":
    main()
