"""Linear through the vendor GEMM: cuBLAS (torch.matmul) for dense weights and torch._scaled_mm for FP8
per-channel weights with per-token FP8 activations (quantized in one Triton launch). The same signature as
codegen/triton/linear.linear.

The Triton kernel streams weights at up to the copy bandwidth for the few rows of a decode or verify step; with
many rows (a large batch of verify blocks) the step turns compute-bound and the vendor GEMM's tensor-core
pipelines win (bench/results/e2e-h100.json: a verify of 256 rows ran at about a third of the bf16 matmul rate
through the Triton kernel). `supports` says which calls this lowering takes.
"""

from __future__ import annotations

import torch

from ..models import ops
from .weight_formats import DenseWeight, FP8ChannelWeight, quantize_fp8_activations


def supports(x: torch.Tensor, weight) -> bool:
    """Half-precision activations with dense weights, or FP8 per-channel weights on an FP8 tensor-core GPU."""
    if x.dtype not in (torch.bfloat16, torch.float16) or x.device.type != "cuda":
        return False
    if isinstance(weight, DenseWeight):
        return weight.weight.dtype == x.dtype
    if isinstance(weight, FP8ChannelWeight):
        n, k = weight.shape
        return torch.cuda.get_device_capability(x.device) >= (8, 9) and n % 16 == 0 and k % 16 == 0
    return False


def _matmul(x: torch.Tensor, weight, out: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T in x's dtype, into out where given (the GEMM writes it: no copy)."""
    if isinstance(weight, DenseWeight):
        return torch.mm(x, weight.weight.t(), out=out)
    if x.is_cuda:  # one Triton launch; the CPU (tests: Triton's interpreter mis-casts FP8) takes the torch ops
        from .triton.linear import quantize_x_fp8

        xq, scale_x = quantize_x_fp8(x if x.stride(1) == 1 else x.contiguous(), per_row=True)  # [M, 1] scales
    else:
        xq, scale_x = quantize_fp8_activations(x, group=x.shape[1])
    return torch._scaled_mm(
        xq, weight.qweight.t(), scale_a=scale_x, scale_b=weight.scale.view(1, -1), out_dtype=x.dtype, out=out
    )


def linear(
    x: torch.Tensor,
    weight,
    *,
    residual: torch.Tensor | None = None,
    swiglu: bool = False,
    out: torch.Tensor | None = None,
    fp8_dot: bool | None = None,
    config=None,
    norm=None,
    gate=None,
    residual_in_place: bool = False,
) -> torch.Tensor:
    """y = x @ W^T, then + residual or silu(gate) * up for W = [gate; up] (the GEMM's output rounded to x's dtype,
    the epilogue in fp32 and rounded once). norm (codegen/triton/linear.RowNorm): the RMSNorm kernel runs on x first;
    gate: x * sigmoid(gate) first. Without an epilogue the GEMM writes out itself; the residual is one add, SwiGLU
    one Triton launch (on CUDA). residual_in_place (the residual is dead after this call): dense weights accumulate
    into the residual's memory in the GEMM (beta = 1, rounded once, no add launch), the result is that tensor."""
    if gate is not None:
        x = x * torch.sigmoid(gate)
    if norm is not None:
        from .triton.fused_ops import rms_norm

        x = rms_norm(x, norm.weight, norm.eps, zero_centered=norm.zero_centered)
    if swiglu:
        y = _matmul(x, weight)
        if y.is_cuda:
            from .triton.fused_ops import swiglu as swiglu_rows

            return swiglu_rows(y, out=out)
        y = ops.swiglu(*y.float().chunk(2, dim=-1)).to(x.dtype)
        return y if out is None else out.copy_(y)
    if residual is not None and residual_in_place and out is None and isinstance(weight, DenseWeight):
        return residual.addmm_(x, weight.weight.t())
    if residual is not None:  # torch's add of half-precision tensors computes in fp32 and rounds once
        y = _matmul(x, weight)
        return torch.add(y, residual) if out is None else torch.add(y, residual, out=out)
    return _matmul(x, weight, out=out)
