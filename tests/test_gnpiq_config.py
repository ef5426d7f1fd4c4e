"""GNPIQConfig: accepted values, refused values with their messages, and serialisation."""

from __future__ import annotations

import json

import pytest

from peft_ismoe import GNPIQConfig
from peft_ismoe.quantization.config import DEFAULT_MODULES_TO_NOT_CONVERT

BAD_VALUES = [
    ({"bits": 5}, ValueError, r"`bits` must be one of \(2, 3, 4, 8\), got 5"),
    ({"bits": 16}, ValueError, r"`bits` must be one of \(2, 3, 4, 8\), got 16"),
    ({"bits": 4.0}, TypeError, r"`bits` must be an int in \(2, 3, 4, 8\), got float 4.0"),
    ({"bits": True}, TypeError, r"`bits` must be an int"),
    ({"group_size": 0}, ValueError, r"`group_size` must be an int >= 1, got 0"),
    ({"group_size": -64}, ValueError, r"`group_size` must be an int >= 1, got -64"),
    ({"group_size": "64"}, TypeError, r"`group_size` must be an int >= 1, got str '64'"),
    ({"num_iterations": -1}, ValueError, r"`num_iterations` must be an int >= 0, got -1"),
    ({"refine_steps": -2}, ValueError, r"`refine_steps` must be an int >= 0, got -2"),
    ({"noise_std": -0.1}, ValueError, r"`noise_std` must be a finite number >= 0, got -0.1"),
    ({"noise_std": float("nan")}, ValueError, r"`noise_std` must be a finite number >= 0, got nan"),
    ({"noise_decay": 0.0}, ValueError, r"`noise_decay` must be a number in \(0, 1\], got 0.0"),
    ({"noise_decay": 1.5}, ValueError, r"`noise_decay` must be a number in \(0, 1\], got 1.5"),
    ({"seed": -1}, ValueError, r"`seed` must be an int >= 0, got -1"),
    ({"patience": 0}, ValueError, r"`patience` must be an int >= 1, got 0"),
    ({"tolerance": 1.0}, ValueError, r"`tolerance` must be a number in \[0, 1\), got 1.0"),
    ({"modules_to_not_convert": "lm_head"}, TypeError, r"`modules_to_not_convert` must be a list of module names"),
    ({"quant_method": "hqq"}, ValueError, r"`quant_method` of a GNPIQConfig must be 'gnpiq', got 'hqq'"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_VALUES, ids=lambda v: str(v)[:40])
def test_bad_values_are_refused_with_a_message(kwargs, error, message):
    with pytest.raises(error, match=message):
        GNPIQConfig(**kwargs)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_every_supported_bit_width_is_accepted(bits):
    assert GNPIQConfig(bits=bits).bits == bits


def test_defaults_keep_output_heads_in_float():
    config = GNPIQConfig()
    assert config.bits == 8 and config.group_size == 64
    assert config.skipped_modules == DEFAULT_MODULES_TO_NOT_CONVERT
    assert GNPIQConfig(modules_to_not_convert=["pooler"]).skipped_modules == ("pooler",)


def test_dict_round_trip_through_json():
    config = GNPIQConfig(bits=3, group_size=32, num_iterations=5, seed=7, modules_to_not_convert=["head"])
    restored = GNPIQConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert config.to_dict()["quant_method"] == "gnpiq"
