"""freeadv_fast: free adversarial training (Shafahi et al., NeurIPS 2019) with fused kernels."""
from . import _ext, ops  # noqa: F401
from .checkpoint import load_checkpoint, save_checkpoint
from .trainer import TRAINERS, FastTrainer, FreeAdversarialTrainer, NaturalTrainer, PGDTrainer, Trainer

__version__ = "0.1.0"
__all__ = ["FastTrainer", "FreeAdversarialTrainer", "NaturalTrainer", "PGDTrainer", "TRAINERS", "Trainer",
           "load_checkpoint", "save_checkpoint"]
