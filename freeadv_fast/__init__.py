"""freeadv_fast: free adversarial training (Shafahi et al., NeurIPS 2019) with fused kernels."""
from . import _ext, ops  # noqa: F401
from .checkpoint import load_checkpoint, save_checkpoint
from .methods import METHODS, FastTrainer, FreeAdversarialTrainer, NaturalTrainer, PGDTrainer
from .trainer import Trainer

__version__ = "0.1.0"
__all__ = ["FastTrainer", "FreeAdversarialTrainer", "METHODS", "NaturalTrainer", "PGDTrainer", "Trainer",
           "load_checkpoint", "save_checkpoint"]
