"""Settings shared by the whole test suite."""

from __future__ import annotations

import torch

# The tests run small tensors (tiny models, one layer at a time); on a machine with few cores, or one shared with
# other work, torch's thread pool then costs far more in synchronisation than it gains, by up to two orders of
# magnitude. One thread keeps the suite fast and its duration predictable.
torch.set_num_threads(1)
