"""Router, stacked experts and balancing loss of ISMoE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peft_ismoe.tuner.experts import InteractiveRouter, MoEFeedForward, StackedExperts, load_balancing_loss

WIDTH, BACKBONE, HIDDEN = 8, 16, 12


def _moe(num_experts: int, top_k: int, use_prior: bool = True) -> MoEFeedForward:
    torch.manual_seed(0)
    return MoEFeedForward(
        WIDTH, BACKBONE, num_experts=num_experts, top_k=top_k, hidden=HIDDEN, activation="gelu", use_prior=use_prior
    )


def test_one_expert_equals_the_dense_ffn():
    moe = _moe(num_experts=1, top_k=1)
    x, salient = torch.randn(10, WIDTH), torch.randn(10, BACKBONE)
    out, _ = moe(x, moe.router.prior(salient))
    ex = moe.experts
    dense = F.gelu(x @ ex.w_in[0] + ex.b_in[0]) @ ex.w_out[0] + ex.b_out[0]
    torch.testing.assert_close(out, dense)


@pytest.mark.parametrize("use_prior", [True, False], ids=["interactive", "side"])
def test_top_k_equal_to_num_experts_is_the_soft_mixture(use_prior):
    moe = _moe(num_experts=4, top_k=4, use_prior=use_prior)
    x, salient = torch.randn(6, WIDTH), torch.randn(6, BACKBONE)
    prior = moe.router.prior(salient) if use_prior else None
    out, _ = moe(x, prior)
    probs = torch.softmax(moe.router.gate(x), dim=-1)
    if use_prior:
        probs = (probs + prior) / 2
    soft = sum(probs[:, e : e + 1] * moe.experts.expert(e, x) for e in range(4))
    torch.testing.assert_close(out, soft)


def test_top_k_routing_matches_a_per_token_loop():
    moe = _moe(num_experts=5, top_k=2)
    x, salient = torch.randn(9, WIDTH), torch.randn(9, BACKBONE)
    routing = moe.router(x, moe.router.prior(salient))
    out = moe.experts(x, routing.weights, routing.indices)
    for t in range(9):
        expected = sum(
            routing.weights[t, j] * moe.experts.expert(int(routing.indices[t, j]), x[t : t + 1])[0] for j in range(2)
        )
        torch.testing.assert_close(out[t], expected)


def test_router_output_shapes_and_normalisation():
    router = InteractiveRouter(WIDTH, BACKBONE, num_experts=6, top_k=3, use_prior=True)
    routing = router(torch.randn(7, WIDTH), router.prior(torch.randn(7, BACKBONE)))
    assert routing.logits.shape == routing.probs.shape == (7, 6)
    assert routing.weights.shape == routing.indices.shape == (7, 3)
    torch.testing.assert_close(routing.probs.sum(-1), torch.ones(7))
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(7))
    assert torch.all(
        routing.probs.gather(1, routing.indices)[:, :-1] >= routing.probs.gather(1, routing.indices)[:, 1:]
    )


def test_interactive_router_needs_the_salient_feature():
    router = InteractiveRouter(WIDTH, BACKBONE, num_experts=2, top_k=1, use_prior=True)
    with pytest.raises(ValueError, match="needs `prior`"):
        router(torch.randn(3, WIDTH), None)


def test_prior_follows_the_representative_vectors():
    router = InteractiveRouter(WIDTH, BACKBONE, num_experts=3, top_k=1, use_prior=True)
    with torch.no_grad():
        router.gate.weight.zero_()  # side logits uniform: the prior alone decides
        router.representatives.copy_(torch.eye(3, BACKBONE) * 50)
    salient = torch.zeros(3, BACKBONE)
    salient[torch.arange(3), torch.tensor([2, 0, 1])] = 1.0
    assert router(torch.randn(3, WIDTH), router.prior(salient)).indices[:, 0].tolist() == [2, 0, 1]


def test_unused_experts_do_not_run():
    experts = StackedExperts(4, WIDTH, HIDDEN)
    x = torch.randn(5, WIDTH)
    indices = torch.tensor([[1], [1], [3], [1], [3]])
    out = experts(x, torch.ones(5, 1), indices)
    out.sum().backward()
    assert experts.w_in.grad[0].abs().sum() == 0 and experts.w_in.grad[2].abs().sum() == 0
    assert experts.w_in.grad[1].abs().sum() > 0 and experts.w_in.grad[3].abs().sum() > 0


def test_balancing_loss_is_one_when_uniform_and_larger_when_collapsed():
    uniform = torch.full((8, 4), 0.25)
    spread = torch.arange(8).remainder(4).unsqueeze(1)
    assert load_balancing_loss(uniform, spread, 4).item() == pytest.approx(1.0)
    collapsed = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).expand(8, 4)
    assert load_balancing_loss(collapsed, torch.zeros(8, 1, dtype=torch.long), 4).item() == pytest.approx(3.88)


def test_balancing_loss_ignores_masked_tokens():
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    indices = torch.tensor([[0], [1]])
    mask = torch.tensor([True, False])
    assert load_balancing_loss(probs, indices, 2, mask).item() == pytest.approx(2.0)
    assert load_balancing_loss(probs, indices, 2, torch.tensor([False, False])).item() == 0.0


def test_usage_counts_accumulate_and_reset():
    moe = _moe(num_experts=3, top_k=2)
    mask = torch.tensor([True] * 5 + [False] * 2)
    for _ in range(3):
        moe(torch.randn(7, WIDTH), moe.router.prior(torch.randn(7, BACKBONE)), mask)
    assert moe.usage.sum().item() == 3 * 5 * 2 and moe.usage.dtype == torch.long
    assert "usage" not in moe.state_dict()
    moe.reset_usage()
    assert moe.usage.sum().item() == 0
