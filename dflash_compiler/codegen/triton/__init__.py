"""Triton kernels for the verify/draft hot path. Each file holds a kernel and its launcher."""
