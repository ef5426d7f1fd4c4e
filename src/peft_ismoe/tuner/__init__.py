"""ISMoE: an interactive side mixture-of-experts trained beside a frozen backbone, as a PEFT method.

Importing this package adds ``"ISMOE"`` to `peft.utils.PeftType` and registers `ISMoEConfig` and `ISMoEModel`
with PEFT, so ``get_peft_model(model, ISMoEConfig(...))`` and ``PeftModel.from_pretrained(model, path)`` work.
"""

from .card import ModelCardMetricsCallback, guard_model_card, record_metrics
from .config import ISMoEConfig, ISMoEWarning
from .experts import InteractiveRouter, MoEFeedForward, RouterOutput, StackedExperts, load_balancing_loss
from .finite_loss import NonFiniteLossCallback
from .model import ISMoEModel, SideNetworkLayer
from .registration import ISMOE_PEFT_TYPE, register_ismoe
from .safety import guard_peft_weight_loading
from .side import SideBlock, SideNetwork

register_ismoe(ISMoEConfig, ISMoEModel)
guard_peft_weight_loading()
guard_model_card()

__all__ = [
    "ISMOE_PEFT_TYPE",
    "ISMoEConfig",
    "ISMoEModel",
    "ISMoEWarning",
    "InteractiveRouter",
    "MoEFeedForward",
    "ModelCardMetricsCallback",
    "NonFiniteLossCallback",
    "RouterOutput",
    "SideBlock",
    "SideNetwork",
    "SideNetworkLayer",
    "StackedExperts",
    "load_balancing_loss",
    "record_metrics",
]
