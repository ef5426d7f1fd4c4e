"""Configuration of GNP-IQ, the weight-only quantizer for frozen backbones."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from transformers.utils.quantization_config import QuantizationConfigMixin

from .._validation import check_int, is_real
from .packing import SUPPORTED_BITS

__all__ = ["DEFAULT_MODULES_TO_NOT_CONVERT", "GNPIQConfig"]

# Output heads are trained or tied to the embeddings, and their errors reach the loss undamped: keep them in float.
DEFAULT_MODULES_TO_NOT_CONVERT = ("classifier", "score", "lm_head", "qa_outputs")


@dataclass
class GNPIQConfig(QuantizationConfigMixin):
    """Settings of GNP-IQ (Gaussian-noise-perturbed iterative quantization).

    Every ``nn.Linear`` (and GPT-2's ``Conv1D``) of the backbone is stored as ``bits``-bit codes with one float16
    scale and zero point per group of ``group_size`` input columns; LayerNorms, embeddings and the output heads in
    ``modules_to_not_convert`` stay in float. The grid of each group is searched as described in
    :func:`peft_ismoe.quantization.solver.gnpiq_quantize`.

    The defaults were chosen by measurement on all-MiniLM-L6-v2 and SmolLM2-135M (``benchmarks/quantization.py``,
    results in ``docs/quantization.md``): 8 bits is the setting of MP-ISMoE; 4 bits halves the backbone again at
    a small cost; 2 and 3 bits are for when memory is all that matters. Group size 64 adds two float16 numbers per 64
    weights, half a bit per weight. Twelve iterations of three refit steps each, from noise of half a step at 4 bits
    (widened for finer grids by :func:`~peft_ismoe.quantization.solver.noise_in_steps`) decaying by 0.95, come within
    0.5-1.6% of an exhaustive clipping search on layers of both backbones; a group that has not improved for
    ``patience`` iterations leaves the search, which saves a quarter to a third of the work for at most 0.5% more
    error. ``docs/quantization.md`` has the sweep behind each value.

    Pass it to ``from_pretrained(..., quantization_config=GNPIQConfig(...))`` or to
    :func:`peft_ismoe.quantize_model`. It is saved in the model's ``config.json`` under ``quantization_config``.
    """

    bits: Literal[2, 3, 4, 8] = field(default=8, metadata={"help": "Bits per weight code: 2, 3, 4 or 8."})
    group_size: int = field(
        default=64,
        metadata={"help": "Input columns sharing one scale and zero point; a partial last group is padded."},
    )
    num_iterations: int = field(
        default=12, metadata={"help": "Noise-perturbed refits per group; 0 keeps plain min-max rounding."}
    )
    noise_std: float = field(
        default=0.5,
        metadata={"help": "Initial std of the Gaussian perturbation, in quantization steps at 4 bits."},
    )
    noise_decay: float = field(default=0.95, metadata={"help": "Factor in (0, 1] applied to the noise per iteration."})
    refine_steps: int = field(
        default=3, metadata={"help": "'Round, least-squares refit' steps polishing each perturbed proposal."}
    )
    patience: int = field(
        default=5, metadata={"help": "Iterations without improvement after which a group leaves the search."}
    )
    tolerance: float = field(
        default=1e-4,
        metadata={"help": "A block of groups stops once an iteration lowers its error by no more than this share."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the perturbations; the same seed gives the same codes."})
    modules_to_not_convert: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module names (or name suffixes) left in float; None means output heads such as "
            "`classifier`, `score` and `lm_head`."
        },
    )
    quant_method: str = field(default="gnpiq", metadata={"help": "Fixed: identifies this method to transformers."})

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise TypeError(
                f"`bits` must be an int in {SUPPORTED_BITS}, got {type(self.bits).__name__} {self.bits!r}."
            )
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"`bits` must be one of {SUPPORTED_BITS}, got {self.bits!r}.")
        check_int("group_size", self.group_size, minimum=1)
        check_int("num_iterations", self.num_iterations, minimum=0)
        check_int("refine_steps", self.refine_steps, minimum=0)
        check_int("patience", self.patience, minimum=1)
        if not is_real(self.tolerance) or not 0 <= self.tolerance < 1:
            raise ValueError(f"`tolerance` must be a number in [0, 1), got {self.tolerance!r}.")
        check_int("seed", self.seed, minimum=0)
        if not is_real(self.noise_std) or not math.isfinite(self.noise_std) or self.noise_std < 0:
            raise ValueError(f"`noise_std` must be a finite number >= 0, got {self.noise_std!r}.")
        if not is_real(self.noise_decay) or not 0 < self.noise_decay <= 1:
            raise ValueError(f"`noise_decay` must be a number in (0, 1], got {self.noise_decay!r}.")
        if self.modules_to_not_convert is not None:
            if isinstance(self.modules_to_not_convert, str) or not all(
                isinstance(name, str) for name in self.modules_to_not_convert
            ):
                raise TypeError(
                    "`modules_to_not_convert` must be a list of module names or None, got "
                    f"{self.modules_to_not_convert!r}."
                )
            self.modules_to_not_convert = list(self.modules_to_not_convert)
        if self.quant_method != "gnpiq":
            raise ValueError(f"`quant_method` of a GNPIQConfig must be 'gnpiq', got {self.quant_method!r}.")

    @property
    def skipped_modules(self) -> tuple[str, ...]:
        """The module names kept in float: `modules_to_not_convert`, or the default output heads."""
        if self.modules_to_not_convert is None:
            return DEFAULT_MODULES_TO_NOT_CONVERT
        return tuple(self.modules_to_not_convert)

    def solver_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `gnpiq_quantize` that this config sets."""
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "num_iterations": self.num_iterations,
            "noise_std": self.noise_std,
            "noise_decay": self.noise_decay,
            "refine_steps": self.refine_steps,
            "patience": self.patience,
            "tolerance": self.tolerance,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
