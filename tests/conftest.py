"""Settings shared by the whole test suite."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings
from transformers.utils import logging as hf_logging

# The tests run small tensors (tiny models, one layer at a time); on a machine with few cores, or one shared with
# other work, torch's thread pool then costs far more in synchronisation than it gains, by up to two orders of
# magnitude. One thread keeps the suite fast and its duration predictable.
torch.set_num_threads(1)

# Property tests draw their examples at random unless told otherwise; CI must not pass or fail by the draw, so the
# default profile derives the examples from each test's name. `HYPOTHESIS_PROFILE=explore` draws new ones, for
# searching for bugs locally.
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture(autouse=True)
def no_progress_bars():
    """Keep transformers' progress bars out of the test output; a test may turn them on, and they go off again."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    yield
    if was_enabled:
        hf_logging.enable_progress_bar()
