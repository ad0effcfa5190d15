"""Pre-quantized checkpoints loaded straight into the compiler's weight formats.

Three layouts are read, named by config.json's `quantization_config.quant_method`:

- `fp8`: Qwen's official FP8 releases. `X.weight` float8_e4m3fn [N, K] and `X.weight_scale_inv` [ceil(N/128),
  ceil(K/128)] (128x128 blocks, `weight_block_size: [128, 128]`, dynamic activation scales) -> FP8BlockWeight.
- `gptq`: 4-bit `X.qweight` [K/8, N], `X.qzeros` [G, N/8], `X.scales` [G, N] and optionally `X.g_idx` [K], any
  group size that is a multiple of 128, symmetric or not, v1 (`checkpoint_format: gptq`, zeros stored minus one)
  or v2 (`gptq_v2`) -> Int4Weight. Act-order checkpoints load only when `g_idx` is the plain k // group_size.
- `awq`: 4-bit GEMM layout, `X.qweight` [K, N/8], `X.qzeros` [G, N/8], `X.scales` [G, N] -> Int4Weight.

Which linear layers are quantized is read off the tensors beside each module (exporters spell their exclusion
lists differently: `modules_to_not_convert`, `ignored_layers`, GPTQModel's `dynamic`), the config gives the method
and its parameters. A quantized layer becomes a `QuantizedLinear` holding its format as `.weight_format`; the
compiler keeps that format, and the eager forward is the reference matmul of codegen/reference.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..codegen.weight_formats import FP8BlockWeight, Int4Weight
from ..errors import DFlashError

QUANT_METHODS = ("fp8", "gptq", "awq")
GPTQ_FORMATS = {"gptq": True, "gptq_v2": False}  # checkpoint_format -> zeros stored minus one (v1)


class QuantizedLinear(nn.Module):
    """y = x @ W^T (+ bias) for W held in a compiled weight format (FP8BlockWeight, Int4Weight, ...).

    The format's tensors are buffers (`qweight`, `scale`, `zeros`), so they move with the module and the compiler
    traces them as weights; `weight_format` is the codegen object over them."""

    def __init__(self, weight_format: FP8BlockWeight | Int4Weight, bias: torch.Tensor | None = None):
        super().__init__()
        from ..graph.ops import linear_args  # the op's view of a format (lazy: graph imports the models)

        args = linear_args(weight_format)
        self.fmt, self.group_size = args["fmt"], args.get("group_size", 128)
        self.register_buffer("qweight", args["weight"])
        self.register_buffer("scale", args.get("scale"))
        self.register_buffer("zeros", args.get("zeros"))
        self.out_features, self.in_features = weight_format.shape
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def weight_format(self) -> FP8BlockWeight | Int4Weight:
        from ..graph.ops import weight_format

        return weight_format(self.fmt, self.qweight, self.scale, self.zeros, self.in_features, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # imported here: codegen.reference imports the runtime, which imports the loaders
        from ..codegen.reference import linear

        y = linear(x, self.weight_format)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        fmt = type(self.weight_format).__name__
        return f"in_features={self.in_features}, out_features={self.out_features}, format={fmt}"


@dataclass(frozen=True)
class QuantSpec:
    """What config.json's `quantization_config` says about the checkpoint's quantized linear layers."""

    method: str
    group_size: int = 128
    symmetric: bool | None = None  # GPTQ `sym`; None: read the zero points
    gptq_v1: bool = True

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """Per-module tensors of the method besides a plain `weight`."""
        return ("weight_scale_inv",) if self.method == "fp8" else ("qweight", "qzeros", "scales", "g_idx")

    @classmethod
    def from_config(cls, data: dict[str, Any], path: Path) -> QuantSpec | None:
        qc = data.get("quantization_config")
        if qc is None and isinstance(data.get("text_config"), dict):
            qc = data["text_config"].get("quantization_config")
        if qc is None:
            return None

        def fail(name: str, why: str) -> DFlashError:
            return DFlashError(f"{path}: field 'quantization_config.{name}' {why}")

        if not isinstance(qc, dict):
            raise DFlashError(f"{path}: field 'quantization_config' must be an object")
        method = qc.get("quant_method")
        if method not in QUANT_METHODS:
            raise fail("quant_method", f"is {method!r}; supported: {', '.join(QUANT_METHODS)}")
        if method == "fp8":
            block = qc.get("weight_block_size", [128, 128])
            if list(block or []) != [128, 128]:
                raise fail("weight_block_size", f"is {block!r}; supported: [128, 128]")
            if qc.get("fmt", "e4m3") != "e4m3":
                raise fail("fmt", f"is {qc.get('fmt')!r}; supported: 'e4m3'")
            if qc.get("activation_scheme", "dynamic") != "dynamic":
                raise fail("activation_scheme", f"is {qc.get('activation_scheme')!r}; supported: 'dynamic'")
            return cls("fp8")
        bits = qc.get("bits", qc.get("w_bit"))
        if bits != 4:
            raise fail("bits", f"is {bits!r}; supported: 4")
        group = qc.get("group_size", qc.get("q_group_size"))
        if isinstance(group, bool) or not isinstance(group, int) or group <= 0 or group % 128:
            raise fail("group_size", f"is {group!r}; supported: a positive multiple of 128")
        if method == "awq":
            version = str(qc.get("version", "gemm")).lower()
            if version != "gemm":
                raise fail("version", f"is {qc.get('version')!r}; supported: 'gemm'")
            if qc.get("zero_point", True) is not True:
                raise fail("zero_point", f"is {qc.get('zero_point')!r}; supported: true")
            return cls("awq", group_size=group)
        sym = qc.get("sym", True)
        if not isinstance(sym, bool):
            raise fail("sym", f"must be true or false, got {sym!r}")
        fmt_key = "checkpoint_format" if "checkpoint_format" in qc else "format"
        fmt = qc.get(fmt_key, "gptq")
        if fmt not in GPTQ_FORMATS:
            raise fail(fmt_key, f"is {fmt!r}; supported: {', '.join(GPTQ_FORMATS)}")
        return cls("gptq", group_size=group, symmetric=sym, gptq_v1=GPTQ_FORMATS[fmt])


@dataclass
class LoadedTensor:
    tensor: torch.Tensor
    path: Path
    name: str  # as in the checkpoint


def quantized_format(
    spec: QuantSpec, parts: dict[str, LoadedTensor], shape: tuple[int, int], device: torch.device
) -> FP8BlockWeight | Int4Weight:
    """The weight format of one quantized linear (out x in = shape) from its checkpoint tensors (by leaf name)."""
    leaf0, any_part = next(iter(parts.items()))
    prefix = any_part.name[: -len(leaf0)]  # the module's name as the checkpoint spells it, with its dot

    def need(leaf: str, dtypes: tuple[torch.dtype, ...], want: tuple[int, ...]) -> torch.Tensor:
        if leaf not in parts:
            raise DFlashError(f"{any_part.path}: missing tensor '{prefix}{leaf}' (quant_method {spec.method})")
        got = parts[leaf]
        if got.tensor.dtype not in dtypes:
            names = "/".join(str(d).removeprefix("torch.") for d in dtypes)
            raise DFlashError(f"{got.path}: tensor '{got.name}' is {got.tensor.dtype}, expected {names}")
        if tuple(got.tensor.shape) != want:
            stored = list(got.tensor.shape)
            raise DFlashError(f"{got.path}: tensor '{got.name}' has shape {stored}, expected {list(want)}")
        return got.tensor.to(device)

    n, k = shape
    floats = (torch.float16, torch.bfloat16, torch.float32)
    try:
        if spec.method == "fp8":
            weight = need("weight", (torch.float8_e4m3fn,), (n, k))
            scale_inv = need("weight_scale_inv", floats, (-(-n // 128), -(-k // 128)))
            return FP8BlockWeight.from_checkpoint(weight, scale_inv)
        groups = -(-k // spec.group_size)
        scales = need("scales", floats, (groups, n))
        if spec.method == "awq":
            qweight = need("qweight", (torch.int32,), (k, n // 8))
            qzeros = need("qzeros", (torch.int32,), (groups, n // 8))
            return Int4Weight.from_awq(qweight, qzeros, scales, group_size=spec.group_size)
        qweight = need("qweight", (torch.int32,), (k // 8, n))
        qzeros = need("qzeros", (torch.int32,), (groups, n // 8))
        g_idx = need("g_idx", (torch.int32, torch.int64), (k,)) if "g_idx" in parts else None
        return Int4Weight.from_gptq(
            qweight, qzeros, scales, g_idx, group_size=spec.group_size, v1=spec.gptq_v1, symmetric=spec.symmetric
        )
    except DFlashError as e:
        if str(e).startswith(str(any_part.path)):
            raise
        raise DFlashError(f"{any_part.path}: module '{prefix.rstrip('.')}': {e}") from None
