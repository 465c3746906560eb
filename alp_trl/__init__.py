"""alp_trl: Adaptive Layerwise Perturbation (ALP) for off-policy LLM RL on Hugging Face TRL."""

from .config import ALPConfig
from .perturbation import LayerwisePerturbation
from .trainer import ALPGRPOTrainer


__version__ = "0.1.0"

__all__ = ["ALPConfig", "ALPGRPOTrainer", "LayerwisePerturbation", "__version__"]
