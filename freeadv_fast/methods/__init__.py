"""Training methods by name (``METHODS``). Each module here defines one
method's trainer and registers its ``MethodSpec``; a new method is one new
module, registered with the others when this package is imported."""
import importlib
import pkgutil

from .registry import METHODS, MethodSpec, register_method
from .natural import NaturalTrainer  # the built-in ones first: their order is the order listed
from .free import FreeAdversarialTrainer
from .pgd import PGDTrainer
from .fast import FastTrainer

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "FastTrainer", "FreeAdversarialTrainer", "MethodSpec", "NaturalTrainer", "PGDTrainer",
           "register_method"]
