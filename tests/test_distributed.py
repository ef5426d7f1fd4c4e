"""ISMoE on two CPU processes (gloo): under DDP (with or without its search for unused parameters) and under FSDP2
(the side network and head sharded, the frozen backbone replicated), two ranks end where one process with the same
global batch ends, and experts idle on one rank break nothing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from distributed_train import BERT, Examples, build_model, train
from safetensors.torch import load_file
from torch.utils._pytree import tree_flatten, tree_unflatten
from transformers.modeling_outputs import SequenceClassifierOutput

from peft_ismoe.tuner.outputs import with_aux_loss

SCRIPT = Path(__file__).with_name("distributed_train.py")
STEPS = 4
GLOBAL_BATCH = 8
# Two ranks sum the same per-example gradients in another order; after a few AdamW steps the side network differs
# from the one-process run by float32 rounding only (3.6e-7 measured), far below one step's update (about 1e-2).
TOLERANCE = 1e-5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_two_ranks(out: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        str(SCRIPT),
        str(out),
        "--per-device-batch",
        str(GLOBAL_BATCH // 2),
        "--steps",
        str(STEPS),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"two-rank DDP run did not finish in {error.timeout} s (hang):\n{error.stderr}")
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    _launch_two_ranks(out)
    return out


@pytest.fixture(scope="module")
def one_process_run() -> tuple[dict[str, torch.Tensor], list]:
    return train(Accelerator(cpu=True), per_device_batch=GLOBAL_BATCH, steps=STEPS)


@pytest.mark.parametrize("mode", ["find_unused", "plain", "fsdp"])
def test_two_ranks_end_with_the_one_process_adapter(two_rank_run, one_process_run, mode):
    expected, _ = one_process_run
    trained = load_file(str(two_rank_run / f"adapter_{mode}.safetensors"))
    assert sorted(trained) == sorted(expected)
    moved = max((expected[name] - value).abs().max().item() for name, value in trained.items())
    assert moved <= TOLERANCE
    assert any("experts" in name for name in trained)


def test_experts_idle_on_one_rank_were_used_on_the_other(two_rank_run, one_process_run):
    record = json.loads((two_rank_run / "usage.json").read_text())
    assert record["world_size"] == 2
    _, single_usage = one_process_run
    for mode, steps in record["usage"].items():
        idle_on_one_rank = 0
        for step, (rank0, rank1) in enumerate(steps):
            # The ranks split the global batch: their routing counts add up to the one-process counts.
            assert [a + b for a, b in zip(rank0, rank1, strict=True)] == single_usage[step][0], (mode, step)
            idle_on_one_rank += sum((a == 0) != (b == 0) for a, b in zip(rank0, rank1, strict=True))
        assert idle_on_one_rank > 0, mode


def test_aux_loss_survives_the_pytree_round_trip_ddp_applies_to_outputs():
    logits = torch.randn(2, BERT.num_labels, requires_grad=True)
    output = with_aux_loss(SequenceClassifierOutput(loss=logits.sum(), logits=logits), torch.tensor(1.5))
    leaves, spec = tree_flatten(output)
    rebuilt = tree_unflatten(leaves, spec)
    assert isinstance(rebuilt, SequenceClassifierOutput)
    assert rebuilt.aux_loss.item() == 1.5 and rebuilt["aux_loss"].item() == 1.5
    assert torch.equal(rebuilt.logits, logits) and list(rebuilt.keys()) == ["loss", "logits", "aux_loss"]
    assert rebuilt.to_tuple()[-1] is rebuilt.aux_loss


def test_an_expert_without_tokens_is_a_zero_gradient_slice_of_a_used_parameter():
    # Why DDP finds no unused parameter: the experts of a block are one stacked tensor, used whenever any expert is.
    model = build_model()
    examples = Examples()
    batch = {
        key: torch.stack([examples[i][key] for i in range(2)]) for key in ("input_ids", "attention_mask", "labels")
    }
    model.train()
    model(**batch).loss.backward()
    usage = model.base_model.expert_usage()["backbone.blocks.0"]
    idle = [e for e, count in enumerate(usage.tolist()) if count == 0]
    experts = model.base_model.ismoe_layer.ismoe_side["default"]["backbone"].blocks[0].moe.experts
    assert idle and experts.w_in.grad is not None
    assert all(torch.count_nonzero(experts.w_in.grad[e]) == 0 for e in idle)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
