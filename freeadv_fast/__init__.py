"""freeadv_fast: free adversarial training (Shafahi et al., NeurIPS 2019) with fused kernels."""
import importlib

__version__ = "0.1.0"
# Where each public name lives. Importing the package imports none of them: a process that needs only
# the data layer (the nvjpeg loader's decoding processes, spawned DataLoader workers) would otherwise
# import the kernels, and with them Triton and torch._dynamo, for seconds each.
_PUBLIC = {"FastTrainer": "methods", "FreeAdversarialTrainer": "methods", "METHODS": "methods",
           "NaturalTrainer": "methods", "PGDTrainer": "methods", "Trainer": "trainer",
           "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint"}
__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value  # once
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
