"""Fused perturbation ops of free adversarial training.

``make_input``, ``update_delta_``, ``update_and_make_input_`` and
``random_init_`` each take ``backend="auto"`` (cuda > triton > torch on GPU,
cpp > torch on CPU) or an explicit one of ``available_backends(device)``;
what a name means on a device is settled on its first call there, then
looked up. Every backend runs one op of one schema (backends.py).
``reference`` holds the pure-PyTorch spec every backend is tested against.
"""
from . import reference
from .backends import BackendUnavailableError, available_backends, resolve_backend
from .perturb import (PIXEL_MODES, channel_param, check_mode, check_values, layout_of, make_input, random_init_,
                      update_and_make_input_, update_delta_, vouch)

__all__ = ["BackendUnavailableError", "PIXEL_MODES", "available_backends", "channel_param", "check_mode",
           "check_values", "layout_of", "make_input", "random_init_", "reference", "resolve_backend",
           "update_and_make_input_", "update_delta_", "vouch"]
