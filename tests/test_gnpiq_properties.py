"""Property-based checks of GNPIQConfig: every value is either accepted and works, or refused with a clear error."""

from __future__ import annotations

import re

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_ismoe import GNPIQConfig
from peft_ismoe.quantization.solver import gnpiq_quantize

FIELDS = (
    "bits",
    "group_size",
    "num_iterations",
    "noise_std",
    "noise_decay",
    "refine_steps",
    "patience",
    "tolerance",
    "seed",
)

ints = st.integers(min_value=-3, max_value=130)
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32), st.integers(min_value=-2, max_value=3), st.booleans()
)
config_values = st.fixed_dictionaries(
    {},
    optional={
        "bits": st.one_of(st.sampled_from([2, 3, 4, 8]), ints, st.floats(0, 9), st.booleans(), st.none()),
        "group_size": st.one_of(ints, st.sampled_from(["64", 32.0, None])),
        "num_iterations": st.one_of(st.integers(-2, 4), st.just(2.5)),
        "noise_std": numbers,
        "noise_decay": numbers,
        "refine_steps": st.one_of(st.integers(-2, 3), st.just("1")),
        "patience": st.one_of(st.integers(-1, 6), st.just(2.0)),
        "tolerance": st.one_of(st.floats(-0.5, 1.5), st.just(float("nan"))),
        "seed": st.one_of(st.integers(-2, 2**31), st.just(1.0)),
    },
)


@settings(max_examples=150, deadline=None)
@given(values=config_values)
def test_config_is_accepted_and_works_or_refused_naming_the_field(values):
    try:
        config = GNPIQConfig(**values)
    except (ValueError, TypeError) as error:
        message = str(error)
        named = re.findall(r"`(\w+)`", message)
        assert named and named[0] in FIELDS, message
        assert named[0] in values, f"{message!r} names a field that was not given"
        assert "got" in message
        return

    # Accepted: the solver runs with it and honours its guarantees.
    W = torch.randn(6, 40, generator=torch.Generator().manual_seed(config.seed % 1000))
    quantized = gnpiq_quantize(W, seed=config.seed, **config.solver_kwargs())
    history = quantized.error_history
    assert quantized.dequantize().shape == W.shape
    assert all(later <= earlier for earlier, later in zip(history, history[1:], strict=False))
    assert all(torch.isfinite(torch.tensor(history)))
    assert int(quantized.codes.max()) < 2**config.bits
