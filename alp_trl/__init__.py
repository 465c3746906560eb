"""alp_trl: Adaptive Layerwise Perturbation (ALP) for off-policy LLM RL on Hugging Face TRL."""

from typing import TYPE_CHECKING


__version__ = "0.1.0"

__all__ = ["ALPConfig", "ALPGRPOTrainer", "LayerwisePerturbation", "__version__"]

# Imported lazily: `import alp_trl.rewards` (e.g. in a grading worker process) should not pay for torch and TRL.
_LAZY = {"ALPConfig": ".config", "ALPGRPOTrainer": ".trainer", "LayerwisePerturbation": ".perturbation"}

if TYPE_CHECKING:
    from .config import ALPConfig
    from .perturbation import LayerwisePerturbation
    from .trainer import ALPGRPOTrainer


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
