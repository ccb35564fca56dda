"""Triton kernels and their PyTorch references, imported as `sara_megatron.kernels`."""
