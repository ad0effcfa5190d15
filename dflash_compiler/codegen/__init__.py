"""Kernel code generation: Triton kernels and their launchers."""
