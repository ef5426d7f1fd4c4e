"""Configuration of ISMoE, the interactive side mixture-of-experts tuner."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from peft.config import PeftConfig

from .._validation import check_int, is_real
from .registration import ISMOE_PEFT_TYPE
from .safety import LOADED_FROM_ATTRIBUTE, check_adapter_folder

__all__ = ["ROUTER_CHOICES", "SALIENT_FEATURE_CHOICES", "ISMoEConfig", "ISMoEWarning"]

SALIENT_FEATURE_CHOICES = ("cls", "mean", "token")
ROUTER_CHOICES = ("interactive", "side")
SUPPORTED_TASK_TYPES = ("SEQ_CLS", "TOKEN_CLS", "CAUSAL_LM", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION", None)
ACTIVATION_CHOICES = ("gelu", "relu", "silu")


class ISMoEWarning(UserWarning):
    """Something about an ISMoE adapter the user may want to change (a request that could not be honoured)."""


@dataclass
class ISMoEConfig(PeftConfig):
    """Settings of ISMoE: a small side network of experts trained beside a frozen backbone.

    For each tapped block of the backbone, the block's output hidden state is down-projected to the side width
    (``hidden_size // reduction_factor``) and mixed into the side state through a learned ladder gate; then a side
    block runs, whose feed-forward is a mixture of ``num_experts`` expert FFNs with top-``top_k`` routing. The last
    side state is up-projected and added to the backbone's last block output through a zero-initialised gate, so a
    fresh adapter gives exactly the base model's outputs. No gradient ever flows through the backbone.

    The defaults (8 experts, top-2, reduction 8, balancing loss 0.01) follow the Switch/Mixtral line and Ladder
    Side-Tuning; the paper names none of them. Change ``num_experts`` and ``top_k`` first when the task needs more
    capacity, ``reduction_factor`` when memory is tight, and ``salient_feature`` to ``"mean"`` for backbones trained
    as mean-pooled sentence encoders (all-MiniLM-L6-v2). ``docs/tuner.md`` explains every field.
    """

    num_experts: int = field(default=8, metadata={"help": "Expert FFNs per side block; 1 gives a dense side FFN."})
    top_k: int | None = field(
        default=None,
        metadata={"help": "Experts each token is routed to, in 1..num_experts; None: 2, or 1 with a single expert."},
    )
    reduction_factor: int = field(
        default=8, metadata={"help": "Side width = backbone hidden size / reduction_factor; must divide it."}
    )
    expert_ratio: float = field(
        default=2.0, metadata={"help": "Hidden width of each expert FFN as a multiple of the side width."}
    )
    activation: Literal["gelu", "relu", "silu"] = field(
        default="gelu", metadata={"help": "Activation inside each expert FFN."}
    )
    side_attention: bool | None = field(
        default=None,
        metadata={
            "help": "Self-attention over the side tokens in each side block, so the side network can gather "
            "information across tokens. None: on for stacks that need not be causal (encoders, sequence "
            "classification), off for causal stacks."
        },
    )
    tap_storage: Literal["full", "bfloat16"] = field(
        default="full",
        metadata={
            "help": "Precision in which the tapped backbone states are kept for backward: 'full' (their own dtype) "
            "or 'bfloat16', which halves that memory at a 0.4% rounding of the ladder projections' weight gradients."
        },
    )
    side_attention_heads: int = field(
        default=4, metadata={"help": "Heads of the side attention; must divide the side width."}
    )
    router: Literal["interactive", "side"] = field(
        default="interactive",
        metadata={"help": "'interactive' mixes the backbone-feature prior into routing; 'side' is a plain MoE."},
    )
    salient_feature: Literal["cls", "mean", "token"] | None = field(
        default=None,
        metadata={
            "help": "Backbone feature the interactive prior compares with each expert: 'cls' (first token), "
            "'mean' (mask-aware mean of tokens) or 'token' (each token's own state). None: 'token' for CAUSAL_LM, "
            "'cls' otherwise."
        },
    )
    aux_loss_coef: float = field(
        default=0.01, metadata={"help": "Weight of the Switch balancing loss added to the loss; 0 turns it off."}
    )
    ladder_temperature: float = field(
        default=0.1, metadata={"help": "T in the ladder gate sigmoid(alpha / T); alpha starts at 0."}
    )
    layers_to_tap: list[int] | None = field(
        default=None,
        metadata={"help": "Indices of the backbone blocks the side network reads (negative allowed); None: all."},
    )
    block_stack: list[str] | None = field(
        default=None,
        metadata={
            "help": "Dotted paths of the nn.ModuleList(s) holding the backbone blocks, e.g. ['bert.encoder.layer']; "
            "None finds them (encoder and decoder for encoder-decoder models)."
        },
    )
    train_layernorm: bool = field(
        default=False,
        metadata={
            "help": "Train a copy of the LayerNorm that produces each tapped block output (post-LN backbones), "
            "through the side network only."
        },
    )
    init_from_backbone: bool = field(
        default=False,
        metadata={
            "help": "Start each side block from its backbone block's FFN pruned to side width and split into experts "
            "(plain two-layer FFNs only; gated FFNs keep the random start)."
        },
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Backbone modules trained in full and saved with the adapter, e.g. ['classifier']."},
    )
    init_seed: int | None = field(
        default=None, metadata={"help": "Seed for the side network's initialisation; None uses torch's global RNG."}
    )
    base_model_fingerprint: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Set when the adapter is attached: the backbone's model type, hidden size and block stacks; an "
            "adapter loaded from disk is refused on a backbone that does not match it."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ISMOE_PEFT_TYPE
        # Checked here as well as at attach time, so a config that can never be used fails where it is written.
        task_type = None if self.task_type is None else str(getattr(self.task_type, "value", self.task_type))
        if task_type not in SUPPORTED_TASK_TYPES:
            raise ValueError(
                f"`task_type` must be one of {SUPPORTED_TASK_TYPES[:-1]} or None for ISMoE, got {self.task_type!r}."
            )
        check_int("num_experts", self.num_experts, minimum=1)
        if self.top_k is None:
            self.top_k = min(2, self.num_experts)
        check_int("top_k", self.top_k, minimum=1)
        if self.top_k > self.num_experts:
            raise ValueError(
                f"`top_k` must be in 1..num_experts (num_experts={self.num_experts}), got {self.top_k!r}; "
                "lower `top_k` or raise `num_experts`."
            )
        check_int("reduction_factor", self.reduction_factor, minimum=1)
        _check_positive("expert_ratio", self.expert_ratio)
        _check_positive("ladder_temperature", self.ladder_temperature)
        if not is_real(self.aux_loss_coef) or not math.isfinite(self.aux_loss_coef) or self.aux_loss_coef < 0:
            raise ValueError(f"`aux_loss_coef` must be a finite number >= 0, got {self.aux_loss_coef!r}.")
        _check_choice("activation", self.activation, ACTIVATION_CHOICES)
        _check_choice("router", self.router, ROUTER_CHOICES)
        if self.salient_feature is not None:
            _check_choice("salient_feature", self.salient_feature, SALIENT_FEATURE_CHOICES)
        self.layers_to_tap = _check_int_list("layers_to_tap", self.layers_to_tap)
        self.block_stack = _check_str_list("block_stack", self.block_stack)
        self.modules_to_save = _check_str_list("modules_to_save", self.modules_to_save)
        if self.side_attention is not None and not isinstance(self.side_attention, bool):
            raise TypeError(f"`side_attention` must be a bool or None, got {self.side_attention!r}.")
        check_int("side_attention_heads", self.side_attention_heads, minimum=1)
        _check_choice("tap_storage", self.tap_storage, ("full", "bfloat16"))
        for name in ("train_layernorm", "init_from_backbone"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"`{name}` must be a bool, got {getattr(self, name)!r}.")
        if self.init_seed is not None:
            check_int("init_seed", self.init_seed, minimum=0)
        if self.base_model_fingerprint is not None and not isinstance(self.base_model_fingerprint, dict):
            raise TypeError(f"`base_model_fingerprint` must be a dict or None, got {self.base_model_fingerprint!r}.")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any):
        """The config saved in a folder, once the folder's weights are known to be safe to read (`safety`)."""
        check_adapter_folder(pretrained_model_name_or_path, subfolder)
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if not isinstance(config, cls):
            raise ValueError(
                f"{pretrained_model_name_or_path!r} holds a {type(config).__name__} adapter "
                f"(peft_type {getattr(config, 'peft_type', None)!r}), not an ISMoE adapter."
            )
        setattr(config, LOADED_FROM_ATTRIBUTE, str(pretrained_model_name_or_path))
        return config

    def resolved_salient_feature(self, causal: bool) -> str:
        """The salient feature one side network uses: `salient_feature`, or the default for its kind of stack."""
        if self.salient_feature is not None:
            return self.salient_feature
        return "token" if causal else "cls"

    def resolved_side_attention(self, causal: bool) -> bool:
        """Whether one side network attends across tokens: `side_attention`, or on unless its stack is causal."""
        return (not causal) if self.side_attention is None else self.side_attention

    @property
    def is_causal_lm(self) -> bool:
        return str(self.task_type) in ("CAUSAL_LM", "TaskType.CAUSAL_LM")


def _check_positive(name: str, value: Any) -> None:
    if not is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")


def _check_int_list(name: str, value: Any) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise TypeError(f"`{name}` must be a list of ints or None, got {value!r}.")
    if not list(value):
        raise ValueError(f"`{name}` must name at least one block, got {value!r}; pass None for every block.")
    return list(value)


def _check_str_list(name: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"`{name}` must be a list of strings or None, got {value!r}.")
    return list(value)
