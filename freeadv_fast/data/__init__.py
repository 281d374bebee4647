"""Data feeding the trainers. ``TensorBatches``: a dataset already in memory
(or on the device), batched, shuffled per pass and sharded across ranks."""
from .tensors import TensorBatches

__all__ = ["TensorBatches"]
