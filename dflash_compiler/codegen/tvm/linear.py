"""TVM lowering of the linear family: y = x @ W^T in fp32 for every weight format of codegen/weight_formats.py,
then an epilogue (none, + residual, or SwiGLU over W = [gate; up]), rounded once to x's dtype, as
reference.linear computes it.

The kernel reads the format's own tensors as stored (FP8 weights as their uint8 bits, a view). The weight is
written as a dequantizing compute stage feeding an fp32 reduction, so dlight inlines the decode into the GEMV or
matmul schedule. FP8 decodes natively from sm_89 on (cuda_fp8.h). Elsewhere TVM legalizes float8_e4m3fn into
integer code that decodes zero and the subnormals wrongly (on LLVM, 0x00 gives 2^-7; sm_80 gets the same kind of
shift-and-mask code), so on LLVM and sm_80 the bits are decoded arithmetically, exactly.

SwiGLU runs as two stages: the fp32 product into a static workspace [M, N], then the elementwise silu(gate) * up.
No dlight rule schedules a reduction whose epilogue reads two of its outputs (GEMV and Matmul both refuse it), and
the workspace costs M * N * 8 bytes of traffic against the weight's N * K.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from dflash_compiler.codegen import weight_formats as wf
from dflash_compiler.codegen.tvm.build import (
    TensorSpec,
    TVMKernel,
    compile_kernel,
    cuda_target,
    dtype_name,
    parse_target,
)
from dflash_compiler.errors import DFlashError

FORMATS = ("dense", "fp8_channel", "fp8_block", "int4_sym", "int4_asym")
EPILOGUES = ("none", "residual", "swiglu")
# dlight's LowBatchGEMV rule schedules these with a symbolic M; it returns None for FP8 block and INT4 (measured)
LOW_BATCH_FORMATS = ("dense", "fp8_channel")
LOW_BATCH_MAX_M = 16
ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def weight_format(weight) -> str:
    """The FORMATS name of a weight-format object."""
    if isinstance(weight, wf.DenseWeight):
        return "dense"
    if isinstance(weight, wf.FP8ChannelWeight):
        return "fp8_channel"
    if isinstance(weight, wf.FP8BlockWeight):
        return "fp8_block"
    if isinstance(weight, wf.Int4Weight):
        return "int4_sym" if weight.symmetric else "int4_asym"
    raise DFlashError(f"weight: not a weight format of codegen/weight_formats.py: {type(weight).__name__}")


def weight_tensors(weight) -> tuple[torch.Tensor, ...]:
    """The tensors of a weight-format object in the order the kernel takes them."""
    fmt = weight_format(weight)
    if fmt == "dense":
        return (weight.weight,)
    if fmt == "fp8_channel":
        return (weight.qweight.view(torch.uint8), weight.scale)
    if fmt == "fp8_block":
        return (weight.qweight.view(torch.uint8), weight.scale_inv)
    if fmt == "int4_sym":
        return (weight.qweight, weight.scales)
    return (weight.qweight, weight.scales, weight.qzeros)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _e4m3_to_f32(byte, native: bool):
    """An e4m3fn value from its uint8 bits (NaN bit patterns, which the quantizers never emit, decode as 480)."""
    from tvm import tirx

    if native:
        return tirx.reinterpret("float8_e4m3fn", byte).astype("float32")
    b = byte.astype("uint32")
    # normal numbers: exponent field e + 120 (bias 127 - 7) and the 3 mantissa bits on top of fp32's
    normal = tirx.reinterpret("float32", ((b & tirx.const(0x7F, "uint32")) << 20) + tirx.const(120 << 23, "uint32"))
    subnormal = (b & tirx.const(7, "uint32")).astype("float32") * tirx.const(2.0**-9, "float32")
    magnitude = tirx.Select((b & tirx.const(0x78, "uint32")) == tirx.const(0, "uint32"), subnormal, normal)
    return tirx.Select((b & tirx.const(0x80, "uint32")) != tirx.const(0, "uint32"), -magnitude, magnitude)


class _WeightStage(NamedTuple):
    specs: list  # TensorSpecs of the format's tensors, in call order
    placeholders: list
    dequant: object  # the fp32 weight [N, reduction] as a compute stage
    reduction: int  # extent of the reduction axis
    input_of: Callable | None = None  # reduction index -> input index (None: the same)
    col_scale: object = None  # a per-output scale applied after the reduction, or None


def _weight_stage(fmt: str, n: int, k: int, native_fp8: bool, weight_dtype: str, scale_dtype: str, group_size: int):
    """The format's tensors and its dequantized weight. FP8 per-channel scales go after the reduction: dlight's GEMV
    rule does not take a dequant stage that reads them (measured), and it saves a multiply per weight.

    INT4 reduces in the order the nibbles are stored (word t // 8, nibble t % 8), gathering the activations to match:
    indexed by input instead, the word index 16 (k // 128) + (k % 32) // 2 is not an affine split of k and dlight
    falls back from GEMV to GeneralReduction at M=1 (measured)."""
    from tvm import te

    if fmt == "dense":
        specs = [TensorSpec("weight", (n, k), weight_dtype)]
    elif fmt == "fp8_channel":
        specs = [TensorSpec("qweight", (n, k), "uint8"), TensorSpec("scale", (n,), "float32")]
    elif fmt == "fp8_block":
        block = wf.FP8_BLOCK
        specs = [
            TensorSpec("qweight", (n, k), "uint8"),
            TensorSpec("scale_inv", (_cdiv(n, block), _cdiv(k, block)), "float32"),
        ]
    else:
        groups = _cdiv(k, group_size)
        specs = [
            TensorSpec("qweight", (n, 16 * _cdiv(k, wf.INT4_RUN)), "int32"),
            TensorSpec("scales", (groups, n), scale_dtype),
        ]
        if fmt == "int4_asym":
            specs.append(TensorSpec("qzeros", (groups, _cdiv(n, 8)), "int32"))
    ph = [te.placeholder(s.shape, s.dtype, name=s.name) for s in specs]

    if fmt == "dense":
        (w,) = ph
        return _WeightStage(specs, ph, te.compute((n, k), lambda i, j: w[i, j].astype("float32"), name="dequant"), k)
    if fmt == "fp8_channel":
        q, s = ph
        deq = te.compute((n, k), lambda i, j: _e4m3_to_f32(q[i, j], native_fp8), name="dequant")
        return _WeightStage(specs, ph, deq, k, col_scale=s)
    if fmt == "fp8_block":
        q, s = ph
        b = wf.FP8_BLOCK
        deq = te.compute((n, k), lambda i, j: _e4m3_to_f32(q[i, j], native_fp8) * s[i // b, j // b], name="dequant")
        return _WeightStage(specs, ph, deq, k)

    qweight, scales = ph[0], ph[1]
    padded = wf.INT4_RUN * _cdiv(k, wf.INT4_RUN)

    def dequant(i, t):
        # nibble t % 8 of word t // 8 is input 128 r + 32 j + 2 w + h (the weight_formats layout); groups are whole
        # runs of 128, so its group is t // group_size
        nibble = (qweight[i, t // 8] >> (4 * (t % 8))) & 0xF
        if fmt == "int4_sym":
            zero = 8
        else:
            zero = (ph[2][t // group_size, i // 8] >> (4 * (i % 8))) & 0xF
        return (nibble - zero).astype("float32") * scales[t // group_size, i].astype("float32")

    def input_of(t):
        return 128 * (t // 128) + 32 * (t % 4) + 2 * ((t // 8) % 16) + (t % 8) // 4

    return _WeightStage(specs, ph, te.compute((n, padded), dequant, name="dequant"), padded, input_of)


def build_linear(
    fmt: str,
    m: int,
    n: int,
    k: int,
    dtype: torch.dtype,
    target: str,
    epilogue: str = "none",
    *,
    weight_dtype: torch.dtype | None = None,
    scale_dtype: torch.dtype = torch.float16,
    group_size: int = 128,
    low_batch: bool = True,
) -> TVMKernel:
    """A TVM linear for static M, N (weight rows; 2 * the output width with SwiGLU), K.

    dtype: the activation (and output, residual) dtype; weight_dtype: the dense weight's dtype (default dtype);
    scale_dtype / group_size: the INT4 scales. target: "llvm" or "cuda -arch=sm_XX". Call it with
    linear(kernel, x, weight, residual=...).

    On CUDA, M=1 takes dlight's GEMV rule and larger M its Matmul rule, except that with low_batch, 2 <= M <= 16
    and a format in LOW_BATCH_FORMATS the PrimFunc is written with a symbolic M, the form dlight's LowBatchGEMV rule
    needs (the kernel still checks that it gets the M it was built for)."""
    from tvm import te, tirx

    if fmt not in FORMATS:
        raise DFlashError(f"fmt: expected one of {FORMATS}, got {fmt!r}")
    if epilogue not in EPILOGUES:
        raise DFlashError(f"epilogue: expected one of {EPILOGUES}, got {epilogue!r}")
    for name, value in (("m", m), ("n", n), ("k", k)):
        if not isinstance(value, int) or value <= 0:
            raise DFlashError(f"{name}: expected a positive int, got {value!r}")
    if epilogue == "swiglu" and n % 2:
        raise DFlashError(f"n: SwiGLU needs an even number of weight rows ([gate; up]), got {n}")
    if fmt.startswith("int4") and (group_size <= 0 or group_size % wf.INT4_RUN):
        raise DFlashError(f"group_size: must be a positive multiple of {wf.INT4_RUN}, got {group_size}")
    act = dtype_name(dtype, "dtype", ACTIVATION_DTYPES)
    wdt = dtype_name(weight_dtype or dtype, "weight_dtype", ACTIVATION_DTYPES)
    sdt = dtype_name(scale_dtype, "scale_dtype", ACTIVATION_DTYPES)
    arch = parse_target(target).get("arch")
    native_fp8 = arch is not None and arch != "sm_80"
    use_low_batch = low_batch and arch is not None and 1 < m <= LOW_BATCH_MAX_M and fmt in LOW_BATCH_FORMATS
    mm = tirx.Var("m", "int64") if use_low_batch else m  # the batch extent of the PrimFuncs

    x_spec = TensorSpec("x", (m, k), act)
    stage = _weight_stage(fmt, n, k, native_fp8, wdt, sdt, group_size)
    w_specs, w_ph, w_deq = stage.specs, stage.placeholders, stage.dequant
    x = te.placeholder((mm, k), act, name="x")
    r = te.reduce_axis((0, stage.reduction), name="k")

    def x_at(i, t):
        if stage.input_of is None:
            return x[i, t].astype("float32")
        j = stage.input_of(t)
        if stage.reduction == k:
            return x[i, j].astype("float32")
        # the padding of the last INT4 run: its nibbles are 0, the activations past K do not exist
        return tirx.if_then_else(j < k, x[i, tirx.min(j, k - 1)].astype("float32"), tirx.const(0, "float32"))

    product = te.compute((mm, n), lambda i, j: te.sum(x_at(i, r) * w_deq[j, r], axis=r), name="matmul")
    if stage.col_scale is None:
        acc = product
    else:
        acc = te.compute((mm, n), lambda i, j: product[i, j] * stage.col_scale[j], name="scaled")
    inputs = [x_spec, *w_specs]
    names = ["x", *(s.name for s in w_specs)]
    attrs = {"format": fmt, "epilogue": epilogue, "m": m, "n": n, "k": k, "symbolic_m": use_low_batch}
    if fmt.startswith("int4"):
        attrs["group_size"] = group_size

    if epilogue == "swiglu":
        h = n // 2
        out_spec = TensorSpec("out", (m, h), act)
        ws_spec = TensorSpec("acc", (m, n), "float32")
        acc_in = te.placeholder((mm, n), "float32", name="acc")

        def swiglu(i, j):
            gate = acc_in[i, j]
            return (gate * tirx.sigmoid(gate) * acc_in[i, j + h]).astype(act)

        out = te.compute((mm, h), swiglu, name="out")
        # an explicit store stage: without an epilogue block, dlight's GeneralReduction does not apply (measured)
        acc_out = acc if stage.col_scale is not None else te.compute((mm, n), lambda i, j: acc[i, j], name="acc")
        funcs = {"linear": te.create_prim_func([x, *w_ph, acc_out]), "swiglu": te.create_prim_func([acc_in, out])}
        args = {"linear": (*names, "acc"), "swiglu": ("acc", "out")}
        return compile_kernel("linear", target, funcs, args, tuple(inputs), (out_spec,), (ws_spec,), attrs)

    out_spec = TensorSpec("out", (m, n), act)
    if epilogue == "residual":
        inputs.append(TensorSpec("residual", (m, n), act))
        res = te.placeholder((mm, n), act, name="residual")
        out = te.compute((mm, n), lambda i, j: (acc[i, j] + res[i, j].astype("float32")).astype(act), name="out")
        params = [x, *w_ph, res, out]
        names.append("residual")
    else:
        out = te.compute((mm, n), lambda i, j: acc[i, j].astype(act), name="out")
        params = [x, *w_ph, out]
    funcs = {"linear": te.create_prim_func(params)}
    args = {"linear": (*names, "out")}
    return compile_kernel("linear", target, funcs, args, tuple(inputs), (out_spec,), (), attrs)


def build_linear_for(
    weight, m: int, dtype: torch.dtype, target: str, epilogue: str = "none", low_batch: bool = True
) -> TVMKernel:
    """build_linear with the format, N, K and tensor dtypes read from a weight-format object."""
    fmt = weight_format(weight)
    n, k = weight.shape
    kw = {}
    if fmt == "dense":
        kw["weight_dtype"] = weight.weight.dtype
    elif fmt.startswith("int4"):
        kw.update(scale_dtype=weight.scales.dtype, group_size=weight.group_size)
    return build_linear(fmt, m, n, k, dtype, target, epilogue, low_batch=low_batch, **kw)


def linear(kernel: TVMKernel, x: torch.Tensor, weight, *, residual=None, out=None) -> torch.Tensor:
    """Run a build_linear kernel: reference.linear(x, weight, residual=..., swiglu=<the kernel's epilogue>)."""
    attrs = kernel.spec.attrs
    if kernel.spec.op != "linear":
        raise DFlashError(f"kernel: expected a linear kernel, got {kernel.spec.op}")
    if weight_format(weight) != attrs["format"]:
        raise DFlashError(f"weight: the kernel is built for {attrs['format']}, got {weight_format(weight)}")
    if (residual is not None) != (attrs["epilogue"] == "residual"):
        raise DFlashError(f"residual: the kernel is built with epilogue {attrs['epilogue']!r}")
    extra = () if residual is None else (residual,)
    return kernel(x, *weight_tensors(weight), *extra, out=out)


def device_target(device: torch.device) -> str:
    """The TVM target of a torch device: LLVM on the CPU, CUDA for the GPU's architecture."""
    if device.type == "cpu":
        return "llvm"
    if device.type == "cuda":
        return cuda_target(torch.cuda.get_device_capability(device))
    raise DFlashError(f"device: TVM lowers linears for cpu and cuda, got {device}")


# One kernel per static shape and target, shared by every layer that has it: built on a call's first run, built
# ahead for another target (building_for), or loaded from an artifact (install_kernels).
_KERNELS: dict[tuple, TVMKernel] = {}
_AHEAD: list[str] = []  # the target of an ahead-of-time build in progress (building_for)
_LOADED_ONLY: set[str] = set()  # targets whose kernels come from an artifact: a missing one is refused, not built


class KernelKey(NamedTuple):
    """What a TVM linear kernel is built for, as JSON-able values (an artifact's manifest lists the keys)."""

    fmt: str
    m: int
    n: int
    k: int
    act: str
    weight_dtypes: tuple[str, ...]
    group_size: int | None
    target: str
    epilogue: str
    low_batch: bool

    @classmethod
    def of(cls, x: torch.Tensor, weight, epilogue: str, target: str, low_batch: bool) -> KernelKey:
        n, k = weight.shape
        dtypes = tuple(str(t.dtype).removeprefix("torch.") for t in weight_tensors(weight))
        act = str(x.dtype).removeprefix("torch.")
        group = getattr(weight, "group_size", None)
        return cls(weight_format(weight), x.shape[0], n, k, act, dtypes, group, target, epilogue, bool(low_batch))


def static_linear(
    x: torch.Tensor, weight, *, residual=None, swiglu=False, norm=None, gate=None, out=None, low_batch=True
):
    """The TVM lowering of a linear call: a kernel for its exact shapes, built on the first call with them (the
    compiled step's warm-up, before any graph capture) and shared by every call of the same shapes. The fused
    prologues a TVM kernel does not take run first in PyTorch: the gate (x * sigmoid(gate)), then the RMSNorm.
    Within building_for(target) the kernel is built for that target and not run (the output is left unwritten)."""
    from dflash_compiler.codegen import reference

    if gate is not None:
        x = x * torch.sigmoid(gate)
    if norm is not None:
        x = reference.rms_norm(x, norm.weight, norm.eps, zero_centered=norm.zero_centered)
    epilogue = "swiglu" if swiglu else "residual" if residual is not None else "none"
    target = _AHEAD[-1] if _AHEAD else device_target(x.device)
    key = KernelKey.of(x, weight, epilogue, target, low_batch)
    kernel = _KERNELS.get(key)
    if kernel is None:
        if target in _LOADED_ONLY:
            raise DFlashError(
                f"TVM linear {tuple(key)}: not among the artifact's TVM kernels and would be built (strict mode)"
            )
        kernel = _KERNELS[key] = build_linear_for(weight, x.shape[0], x.dtype, target, epilogue, low_batch)
    if _AHEAD:  # the values are the reference's (the dry run's): an output of the right shape stands in
        return x.new_empty(x.shape[0], weight.shape[0] // 2 if swiglu else weight.shape[0])
    residual = residual.contiguous() if residual is not None else None
    return linear(kernel, x.contiguous(), weight, residual=residual, out=out)


@contextlib.contextmanager
def building_for(target: str):
    """static_linear builds its kernels for `target` (a CUDA target, from a machine without that GPU) and runs
    nothing: an artifact's ahead-of-time pass, whose dry run takes its values from the reference."""
    _AHEAD.append(target)
    try:
        yield
    finally:
        _AHEAD.pop()


def export_kernels(target: str, folder: Path) -> list[dict]:
    """Every kernel built for target, written to folder as NNN.so (+ its spec, .so.json): [{key, file}]."""
    entries = []
    for i, (key, kernel) in enumerate(sorted((k, v) for k, v in _KERNELS.items() if k.target == target)):
        path = folder / f"{i:03d}.so"
        kernel.export_library(path)
        entries.append({"key": list(key), "file": path.name})
    return entries


def install_kernels(entries: list[dict], folder: Path, strict: bool) -> int:
    """Loads an artifact's TVM kernels (export_kernels' entries, files in folder) for static_linear to find;
    strict: a call of a shape they do not cover raises instead of building. Returns how many were loaded."""
    targets = set()
    for entry in entries:
        key = KernelKey(*(tuple(v) if isinstance(v, list) else v for v in entry["key"]))
        _KERNELS[key] = TVMKernel.load(folder / entry["file"])
        targets.add(key.target)
    if strict:
        _LOADED_ONLY.update(targets)
    return len(entries)
