"""Tests of the GNP-IQ solver (`gnpiq_quantize`, `minmax_quantize`) and of the brute-force reference search."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch

from peft_ismoe.quantization import noise_in_steps as exported_noise_in_steps
from peft_ismoe.quantization.reference import clipping_fractions, clipping_search_quantize
from peft_ismoe.quantization.solver import (
    gnpiq_quantize,
    group_error,
    grouped_weight,
    minmax_quantize,
    noise_in_steps,
    round_to_grid,
    search_grid,
)

BITS = (2, 3, 4, 8)


def make_weight(out_features: int = 48, in_features: int = 128, seed: int = 0) -> torch.Tensor:
    """A heavy-tailed weight, like trained ones: Student-t entries with a few large channels."""
    generator = torch.Generator().manual_seed(seed)
    W = torch.randn(out_features, in_features, generator=generator)
    W /= torch.rand(out_features, in_features, generator=generator).add(0.2).sqrt()
    return 0.02 * W


def squared_error(W: torch.Tensor, W_hat: torch.Tensor, importance: torch.Tensor | None = None) -> float:
    residual = (W - W_hat).square()
    if importance is not None:
        residual = residual * importance
    return float(residual.sum())


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
@pytest.mark.parametrize("in_features", [128, 100], ids=["dividing", "padded"])
@pytest.mark.parametrize("weighted", [False, True], ids=["data_free", "importance"])
def test_error_never_rises_across_iterations(bits: int, in_features: int, weighted: bool) -> None:
    W = make_weight(in_features=in_features)
    importance = torch.rand(in_features, generator=torch.Generator().manual_seed(1)) + 0.1 if weighted else None
    quantized = gnpiq_quantize(W, bits=bits, num_iterations=10, importance=importance)
    history = quantized.error_history
    assert len(history) == 11
    assert all(later <= earlier for earlier, later in pairwise(history))
    assert history[-1] < history[0]  # the search did something


def test_same_seed_gives_identical_codes_and_different_seeds_differ() -> None:
    W = make_weight()
    first = gnpiq_quantize(W, bits=4, seed=3)
    second = gnpiq_quantize(W, bits=4, seed=3)
    other = gnpiq_quantize(W, bits=4, seed=4)
    assert torch.equal(first.codes, second.codes)
    assert torch.equal(first.scale, second.scale)
    assert torch.equal(first.zero, second.zero)
    assert first.error_history == second.error_history
    assert not (torch.equal(first.scale, other.scale) and torch.equal(first.zero, other.zero))


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
def test_gnpiq_beats_minmax_rounding(bits: int) -> None:
    W = make_weight()
    rtn = squared_error(W, minmax_quantize(W, bits=bits).dequantize())
    gnpiq = squared_error(W, gnpiq_quantize(W, bits=bits).dequantize())
    assert gnpiq < 0.95 * rtn


@pytest.mark.parametrize("bits", [2, 4], ids=lambda b: f"{b}bit")
def test_importance_lowers_the_weighted_error_against_data_free(bits: int) -> None:
    W = make_weight()
    # A few channels dominate the inputs, as outlier features do in transformers.
    importance = torch.full((W.shape[1],), 0.05)
    importance[::16] = 20.0
    weighted = gnpiq_quantize(W, bits=bits, importance=importance)
    data_free = gnpiq_quantize(W, bits=bits)
    weighted_err = squared_error(W, weighted.dequantize(), importance)
    data_free_err = squared_error(W, data_free.dequantize(), importance)
    assert weighted_err < 0.9 * data_free_err
    # final_error is the objective the solver optimised, so it must be the importance-weighted error.
    assert weighted.final_error == pytest.approx(weighted_err, rel=1e-4)


def test_padded_group_size_works_and_padding_costs_nothing() -> None:
    W = make_weight(in_features=100)  # groups of 64: one full group and one of 36 columns plus 28 padded
    quantized = gnpiq_quantize(W, bits=3, group_size=64)
    assert quantized.codes.shape == (48, 128)
    assert quantized.scale.shape == quantized.zero.shape == (48, 2)
    assert quantized.group_size == 64
    W_hat = quantized.dequantize()
    assert W_hat.shape == W.shape
    # The reported error is the error of the 100 real columns alone: the padded ones carry no weight.
    assert quantized.final_error == pytest.approx(squared_error(W, W_hat), rel=1e-4)


def test_padding_does_not_change_the_grid_of_a_partial_group() -> None:
    # Min-max rounding of the 36-column tail must not see the padding: the same grid as that tail on its own.
    W = make_weight(in_features=100)
    padded = minmax_quantize(W, bits=4, group_size=64)
    alone = minmax_quantize(W[:, 64:].contiguous(), bits=4, group_size=36)
    assert torch.equal(padded.scale[:, 1], alone.scale[:, 0])
    assert torch.equal(padded.zero[:, 1], alone.zero[:, 0])
    assert torch.equal(padded.codes[:, 64:100], alone.codes)


def test_final_error_is_the_error_of_what_is_stored() -> None:
    W = make_weight()
    quantized = gnpiq_quantize(W, bits=2)
    assert quantized.final_error == pytest.approx(squared_error(W, quantized.dequantize()), rel=1e-4)
    assert quantized.codes.dtype == torch.uint8 and int(quantized.codes.max()) <= 3
    assert quantized.scale.dtype == quantized.zero.dtype == torch.float16


def test_constant_and_zero_rows_are_represented_exactly() -> None:
    W = make_weight(out_features=4)
    W[0] = 0.0
    W[1] = 0.125
    quantized = gnpiq_quantize(W, bits=2)
    W_hat = quantized.dequantize()
    assert torch.isfinite(W_hat).all()
    assert torch.equal(W_hat[0], W[0])
    assert torch.allclose(W_hat[1], W[1], rtol=1e-3)


def test_noise_is_widened_on_finer_grids() -> None:
    assert noise_in_steps(0.5, 4) == 0.5
    assert noise_in_steps(0.5, 8) == pytest.approx(0.5 * math.sqrt(17))
    assert noise_in_steps(0.5, 2) == pytest.approx(0.5 * math.sqrt(0.2))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_nan_or_inf_in_the_weight_raises(bad: float) -> None:
    W = make_weight()
    W[3, 5] = bad
    with pytest.raises(ValueError, match=r"`W` contains NaN or Inf"):
        gnpiq_quantize(W)
    with pytest.raises(ValueError, match=r"`W` contains NaN or Inf"):
        clipping_search_quantize(W)


BAD_INPUTS = [
    ({"W": torch.ones(4)}, r"`W` must be a 2-D float weight \[out_features, in_features\], got \(4,\)"),
    ({"W": torch.ones(4, 4, dtype=torch.int64)}, r"`W` must be a 2-D float weight"),
    ({"bits": 5}, r"`bits` must be one of \(2, 3, 4, 8\), got 5"),
    ({"group_size": 0}, r"`group_size` must be a positive int, got 0"),
    ({"group_size": 8.0}, r"`group_size` must be a positive int, got 8.0"),
    ({"importance": torch.ones(3)}, r"`importance` must have shape \(16,\), one weight per input column, got \(3,\)"),
    ({"importance": -torch.ones(16)}, r"`importance` must be finite and non-negative"),
    ({"patience": 0}, r"`patience` must be an int >= 1, got 0"),
    ({"tolerance": 1.0}, r"`tolerance` must be a number in \[0, 1\), got 1.0"),
    ({"tolerance": -0.1}, r"`tolerance` must be a number in \[0, 1\), got -0.1"),
    ({"num_iterations": -2}, r"`num_iterations` must be an int >= 0, got -2"),
    ({"refine_steps": -1}, r"`refine_steps` must be an int >= 0, got -1"),
    ({"noise_std": float("nan")}, r"`noise_std` must be a finite number >= 0, got nan"),
    ({"noise_decay": 3.0}, r"`noise_decay` must be a number in \(0, 1\], got 3.0"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_INPUTS, ids=lambda v: str(v)[:40] if isinstance(v, str) else None)
def test_bad_input_raises_a_value_error_that_names_it(kwargs: dict, message: str) -> None:
    kwargs = {"W": torch.ones(4, 16)} | kwargs
    with pytest.raises(ValueError, match=message):
        gnpiq_quantize(**kwargs)


def test_the_weight_is_never_modified() -> None:
    W = make_weight()
    before = W.clone()
    gnpiq_quantize(W, bits=2, importance=torch.rand(W.shape[1]))
    assert torch.equal(W, before)


@pytest.mark.parametrize("bits", [2, 8], ids=lambda b: f"{b}bit")
def test_reference_search_is_a_lower_yardstick(bits: int) -> None:
    W = make_weight(out_features=16)
    limit = clipping_search_quantize(W, bits=bits)
    rtn = minmax_quantize(W, bits=bits)
    gnpiq = gnpiq_quantize(W, bits=bits)
    assert limit.final_error < rtn.final_error
    # The solver comes close to the brute force, which tries about two thousand grids per group.
    assert gnpiq.final_error < 1.1 * limit.final_error


def test_reference_fractions_are_fine_near_zero_at_8_bits() -> None:
    fractions = clipping_fractions(8, num_fractions=24, max_fraction=0.5)
    assert fractions == sorted(fractions)
    assert fractions[0] == pytest.approx(-1 / 255)  # one step of widening
    quarter_steps = [k / (4 * 255) for k in range(-4, 17)]
    assert all(any(abs(f - q) < 1e-9 for f in fractions) for q in quarter_steps)
    assert max(fractions) == pytest.approx(0.5)


def grid_of(quantized) -> tuple[torch.Tensor, torch.Tensor]:
    return quantized.scale.reshape(-1).float(), quantized.zero.reshape(-1).float()


def test_noise_in_steps_is_exported_by_the_package() -> None:
    assert exported_noise_in_steps is noise_in_steps


def test_search_from_a_given_grid_never_rises_above_it() -> None:
    W = make_weight(in_features=100)
    Wg, hg = grouped_weight(W, 32)
    start = minmax_quantize(W, bits=3, group_size=32)
    scale, zero = grid_of(start)

    search = search_grid(Wg, hg, scale, zero, bits=3, num_iterations=6, generator=torch.Generator().manual_seed(0))

    _, start_error = round_to_grid(Wg, hg, scale, zero, bits=3)
    assert search.error_history[0] == pytest.approx(float(start_error.sum()), rel=1e-6)
    assert (search.error <= start_error).all()
    assert search.error_history[-1] < search.error_history[0]
    _, error = round_to_grid(Wg, hg, search.scale, search.zero, bits=3)
    torch.testing.assert_close(error, search.error)  # the error it reports is the error of its grid


def test_search_on_a_subset_touches_only_those_groups() -> None:
    W = make_weight()
    Wg, hg = grouped_weight(W, 64)
    scale, zero = grid_of(minmax_quantize(W, bits=4))
    rows = torch.tensor([0, 5, 17, 40])

    search = search_grid(
        Wg[rows], None, scale[rows], zero[rows], bits=4, num_iterations=5, generator=torch.Generator().manual_seed(1)
    )

    assert search.scale.shape == (4,) and search.error.shape == (4,)
    assert search.group_iterations <= 5 * 4
    codes, error = round_to_grid(Wg[rows], None, search.scale, search.zero, bits=4)
    torch.testing.assert_close(group_error(Wg[rows], None, codes, search.scale, search.zero), error)


def test_active_set_skips_groups_that_stopped_improving() -> None:
    W = make_weight()
    kwargs = {"bits": 4, "num_iterations": 12, "seed": 0, "tolerance": 0.0}
    Wg, _ = grouped_weight(W, 64)
    scale, zero = grid_of(minmax_quantize(W, bits=4))
    num_groups = Wg.shape[0]

    def run(patience: int):
        generator = torch.Generator().manual_seed(0)
        return search_grid(Wg, None, scale, zero, bits=4, num_iterations=12, patience=patience, tolerance=0.0,
                           generator=generator)  # fmt: skip

    full, lazy = run(patience=12), run(patience=1)

    assert full.group_iterations == 12 * num_groups
    assert lazy.group_iterations < full.group_iterations
    assert all(later <= earlier for earlier, later in pairwise(lazy.error_history))
    assert len(lazy.error_history) == 13
    quantized = gnpiq_quantize(W, patience=1, **kwargs)
    assert all(later <= earlier for earlier, later in pairwise(quantized.error_history))


def test_tolerance_stops_a_block_whose_error_stopped_falling() -> None:
    W = make_weight()
    Wg, _ = grouped_weight(W, 64)
    scale, zero = grid_of(minmax_quantize(W, bits=4))

    # Any first iteration gains less than 99% of the error: the block stops after it.
    search = search_grid(
        Wg, None, scale, zero, bits=4, num_iterations=8, tolerance=0.99, generator=torch.Generator().manual_seed(0)
    )

    assert search.group_iterations == Wg.shape[0]
    assert len(search.error_history) == 9
    assert len(set(search.error_history[1:])) == 1
    assert search.error_history[1] < search.error_history[0]


def test_same_seed_gives_identical_codes_with_the_active_set() -> None:
    W = make_weight(in_features=100)
    first = gnpiq_quantize(W, bits=8, group_size=32, patience=2, tolerance=1e-3, seed=5)
    second = gnpiq_quantize(W, bits=8, group_size=32, patience=2, tolerance=1e-3, seed=5)
    assert torch.equal(first.codes, second.codes)
    assert torch.equal(first.scale, second.scale) and torch.equal(first.zero, second.zero)
