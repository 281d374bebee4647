"""Device code: CUDA sources (compiled into freeadv_fast._C) and Triton kernels (imported at run time)."""
