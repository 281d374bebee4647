"""Data feeding the trainers: every dataset by name (``DATASETS``; each is one
module of this package, registered when the package is imported) and the
loaders they are made of."""
import importlib
import pkgutil

from .registry import DATASETS, Data, DatasetSpec, register_dataset
from .tensors import TensorBatches
from . import imagenet, cifar, tiny_imagenet, fashion_mnist, synthetic, digits  # noqa: F401  (the order listed)

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["DATASETS", "Data", "DatasetSpec", "TensorBatches", "register_dataset"]
