"""peft_ismoe: MP-ISMoE for the Hugging Face stack.

MP-ISMoE (mixed-precision interactive side mixture-of-experts) fine-tunes a large frozen model by training only a
small side network that reads the model's hidden states, so no gradient flows through the model itself; the
frozen model is stored in few bits (GNP-IQ) and the memory saved pays for a side network made of experts (ISMoE).
"""

from .planner import MemoryPlan, plan, predict_training_memory
from .quantization import GNPIQConfig, GNPIQLinear, GNPIQRequantizeCallback, gnpiq_quantize, quantize_model
from .tuner import ISMoEConfig, ISMoEModel, ModelCardMetricsCallback, NonFiniteLossCallback, record_metrics

__version__ = "0.1.0"

__all__ = [
    "GNPIQConfig",
    "GNPIQLinear",
    "GNPIQRequantizeCallback",
    "ISMoEConfig",
    "ISMoEModel",
    "MemoryPlan",
    "ModelCardMetricsCallback",
    "NonFiniteLossCallback",
    "__version__",
    "gnpiq_quantize",
    "plan",
    "predict_training_memory",
    "quantize_model",
    "record_metrics",
]
