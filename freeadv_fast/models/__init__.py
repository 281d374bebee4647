"""Architectures by name: ``create_model(name, num_classes, in_channels)``."""
from .registry import ARCHITECTURES, create_model, register

__all__ = ["ARCHITECTURES", "create_model", "register"]
