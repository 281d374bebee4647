"""freeadv_fast: free adversarial training (Shafahi et al., NeurIPS 2019) with fused kernels."""
from . import _ext, ops  # noqa: F401

__version__ = "0.1.0"
