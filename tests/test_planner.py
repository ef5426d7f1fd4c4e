"""The memory planner: its predictions match the measured step, and its choice fits the budget."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from transformers import BertConfig, BertForSequenceClassification

from peft_ismoe import GNPIQConfig, ISMoEConfig, plan, predict_training_memory, quantize_model
from peft_ismoe.memory import training_memory

BERT = BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
CASES = [(None, 1), (8, 4), (4, 8)]


def _bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(copy.deepcopy(BERT))  # quantizing records itself in the config


def _batch(batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {
        "input_ids": torch.randint(0, BERT.vocab_size, (batch_size, seq_len), generator=generator),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
        "labels": torch.zeros(batch_size, dtype=torch.long),
    }


@pytest.mark.parametrize(("bits", "experts"), CASES, ids=lambda v: str(v))
def test_prediction_matches_the_measured_training_step(bits, experts):
    gnpiq = None if bits is None else GNPIQConfig(bits=bits, num_iterations=1)
    ismoe = ISMoEConfig(task_type="SEQ_CLS", num_experts=experts, top_k=min(2, experts), init_seed=0)
    predicted, side = predict_training_memory(_bert(), gnpiq, ismoe, batch_size=6, seq_len=16)

    model = _bert()
    if gnpiq is not None:
        quantize_model(model, gnpiq, progress_bar=False)
    model = get_peft_model(model, ismoe)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    measured = training_memory(model, _batch(6, 16), optimizer)

    assert predicted.weights == measured.weights
    assert predicted.gradients == measured.gradients
    assert predicted.optimizer_state == measured.optimizer_state
    assert predicted.saved_for_backward == measured.saved_for_backward
    assert side == sum(p.numel() for n, p in model.named_parameters() if "ismoe_side" in n)


def test_the_planner_leaves_the_model_as_it_was():
    model = _bert()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    predict_training_memory(model, GNPIQConfig(bits=4), ISMoEConfig(task_type="SEQ_CLS"), 4, 8)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags
    get_peft_model(model, ISMoEConfig(task_type="SEQ_CLS"))  # and it can be wrapped for real


def test_plan_picks_the_largest_side_network_that_fits():
    model = _bert()
    kwargs = {"batch_size": 4, "seq_len": 16, "experts_choices": (8, 2), "reduction_choices": (4, 8)}
    roomy = plan(model, 10 * 2**20, bits_choices=(8, 4), **kwargs)
    sizes = sorted({c[3] for c in roomy.candidates})
    assert roomy.side_parameters == sizes[-1] and roomy.gnpiq_config.bits == 8
    assert roomy.predicted.total <= 10 * 2**20

    # A budget between the smallest and the largest prediction forces a smaller choice that still fits.
    totals = sorted(c[4] for c in roomy.candidates)
    budget = (totals[0] + totals[-1]) // 2
    tight = plan(model, budget, bits_choices=(8, 4), **kwargs)
    assert tight.predicted.total <= budget
    assert tight.side_parameters <= roomy.side_parameters


def test_a_budget_nothing_fits_is_refused_with_the_smallest_need():
    with pytest.raises(ValueError, match=r"No configuration fits `memory_budget`=1,000 bytes .* the smallest needs"):
        plan(_bert(), 1000, 4, 16, experts_choices=(1,), reduction_choices=(8,), bits_choices=(2,))
    with pytest.raises(ValueError, match="must be positive"):
        plan(_bert(), 0, 4, 16)


def test_a_quantized_model_is_refused():
    model = quantize_model(_bert(), GNPIQConfig(num_iterations=0), progress_bar=False)
    with pytest.raises(ValueError, match="`model` must be the float backbone"):
        predict_training_memory(model, None, ISMoEConfig(task_type="SEQ_CLS"), 2, 8)


def test_bad_planner_arguments_are_named():
    with pytest.raises(TypeError, match=r"`memory_budget` must be a positive number, got '1GB' \(str\)"):
        plan(_bert(), "1GB", 4, 16)
    with pytest.raises(ValueError, match=r"`experts_choices` must name at least one value, got \(\)"):
        plan(_bert(), 10**9, 4, 16, experts_choices=())
    # Hidden size 64: reduction 3 does not divide it, and reduction 32 leaves width 2 for 4 attention heads.
    with pytest.raises(ValueError, match=r"No entry of `reduction_choices`=\(3, 32\) gives a side width"):
        plan(_bert(), 10**9, 4, 16, reduction_choices=(3, 32))


def test_reductions_the_attention_heads_cannot_split_are_skipped_not_fatal():
    result = plan(_bert(), 10**9, 2, 8, experts_choices=(1,), bits_choices=(8,), reduction_choices=(8, 32))

    assert {reduction for _, _, reduction, _, _ in result.candidates} == {8}
    assert result.ismoe_config.reduction_factor == 8
