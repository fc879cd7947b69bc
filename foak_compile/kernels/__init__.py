"""Triton kernels, one module per fused-op family. Nothing here knows about graphs."""
