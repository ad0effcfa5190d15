"""TVM lowering of RMSNorm over the last dim, with the optional residual add, as reference.rms_norm computes it:
s = x + residual rounded to x's dtype, an fp32 mean of squares, then (zero-centred) s * rstd * (1 + w) or (plain)
w * round(s * rstd), rounded to x's dtype. With a residual the kernel also writes s."""

from __future__ import annotations

import torch

from dflash_compiler.codegen.tvm.build import TensorSpec, TVMKernel, compile_kernel, dtype_name
from dflash_compiler.codegen.tvm.linear import ACTIVATION_DTYPES
from dflash_compiler.errors import DFlashError


def build_rms_norm(
    rows: int,
    hidden: int,
    dtype: torch.dtype,
    target: str,
    *,
    eps: float,
    zero_centered: bool = False,
    residual: bool = False,
    weight_dtype: torch.dtype | None = None,
) -> TVMKernel:
    """A TVM RMSNorm of x [rows, hidden] (static shape) with a weight [hidden]; call it with rms_norm(kernel, ...)."""
    from tvm import te, tirx

    for name, value in (("rows", rows), ("hidden", hidden)):
        if not isinstance(value, int) or value <= 0:
            raise DFlashError(f"{name}: expected a positive int, got {value!r}")
    if not eps > 0:
        raise DFlashError(f"eps: expected a positive float, got {eps!r}")
    act = dtype_name(dtype, "dtype", ACTIVATION_DTYPES)
    wdt = dtype_name(weight_dtype or dtype, "weight_dtype", ACTIVATION_DTYPES)

    x = te.placeholder((rows, hidden), act, name="x")
    w = te.placeholder((hidden,), wdt, name="weight")
    inputs = [TensorSpec("x", (rows, hidden), act), TensorSpec("weight", (hidden,), wdt)]
    outputs = [TensorSpec("out", (rows, hidden), act)]
    funcs, args = {}, {}
    if residual:
        # the add is its own stage: no dlight GPU rule schedules a reduction block with two outputs (measured)
        res = te.placeholder((rows, hidden), act, name="residual")
        inputs.append(TensorSpec("residual", (rows, hidden), act))
        outputs.append(TensorSpec("residual_out", (rows, hidden), act))
        total = te.compute(
            (rows, hidden), lambda i, c: (x[i, c].astype("float32") + res[i, c].astype("float32")).astype(act), "sum"
        )
        funcs["add"], args["add"] = te.create_prim_func([x, res, total]), ("x", "residual", "residual_out")
        src = te.placeholder((rows, hidden), act, name="residual_out")
    else:
        src = x
    j = te.reduce_axis((0, hidden), name="j")
    sq = te.compute((rows,), lambda i: te.sum(src[i, j].astype("float32") * src[i, j].astype("float32"), axis=j))
    inv_hidden = tirx.const(1.0 / hidden, "float32")
    eps_c = tirx.const(eps, "float32")

    def norm(i, c):
        xn = src[i, c].astype("float32") * tirx.rsqrt(sq[i] * inv_hidden + eps_c)
        if zero_centered:
            return (xn * (tirx.const(1.0, "float32") + w[c].astype("float32"))).astype(act)
        # plain norms round the normalized value before the weight, as their reference implementations do
        return (w[c].astype("float32") * xn.astype(act).astype("float32")).astype(act)

    out = te.compute((rows, hidden), norm, name="out")
    funcs["rms_norm"] = te.create_prim_func([src, w, out])
    args["rms_norm"] = ("residual_out" if residual else "x", "weight", "out")
    attrs = {"rows": rows, "hidden": hidden, "eps": eps, "zero_centered": zero_centered, "residual": residual}
    return compile_kernel("rms_norm", target, funcs, args, tuple(inputs), tuple(outputs), (), attrs)


def rms_norm(kernel: TVMKernel, x, weight, eps, *, residual=None, out=None, residual_out=None):
    """Run a build_rms_norm kernel with reference.rms_norm's signature: y, or (y, x + residual) with a residual."""
    attrs = kernel.spec.attrs
    if kernel.spec.op != "rms_norm":
        raise DFlashError(f"kernel: expected an rms_norm kernel, got {kernel.spec.op}")
    if eps != attrs["eps"]:
        raise DFlashError(f"eps: the kernel is built with eps={attrs['eps']}, got {eps}")
    if (residual is not None) != attrs["residual"]:
        raise DFlashError(f"residual: the kernel is built with residual={attrs['residual']}")
    if residual is None:
        return kernel(x, weight, out=out)
    outs = None if out is None and residual_out is None else (out, residual_out)
    if outs is not None and None in outs:
        raise DFlashError("out/residual_out: give both or neither")
    return kernel(x, weight, residual, out=outs)
