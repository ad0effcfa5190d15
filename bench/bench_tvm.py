"""The TVM linear (codegen/tvm/, dlight schedules, one static build per M) against our Triton linear and torch, at
Qwen3.5-27B shapes, M in {1, 16, 64}, every weight format; the gate_up SwiGLU at M=16; and at M=16 the formats
LowBatchGEMV schedules once more through dlight's Matmul rule instead (low_batch=False), to choose between them.
Then the RMSNorm of the hidden state (5120, zero-centred as Qwen3.5's, with and without the residual add) at 1, 16
and 256 rows through TVM, the Triton kernel, TorchInductor (torch.compile of the PyTorch reference) and eager torch.

Timing, torch baselines, rotating weights and the floor (weight + activation + output bytes over the copy bandwidth
measured in the same run) are bench_linear.py's, so the rows compare with its table. The TVM kernels are built on
the GPU host for its architecture (NVRTC, CUDA headers under CUDA_PATH); build and first-call (load) times are
recorded per kernel.

    python bench/bench_tvm.py [--out bench/results/kernels-tvm-h200.json]
    python bench/bench_tvm.py --build-only --arch sm_90    # no GPU: cross-compile every kernel, print the rules
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from bench_linear import FORMATS, MS, SHAPES, Case  # noqa: E402
from common import copy_bandwidth_tbps, floor_us, graph_time_us, print_table, rotations_for, write_results  # noqa: E402

from dflash_compiler.codegen.tvm.build import TVMKernel  # noqa: E402
from dflash_compiler.codegen.tvm.linear import LOW_BATCH_FORMATS, build_linear  # noqa: E402
from dflash_compiler.codegen.tvm.linear import linear as tvm_linear  # noqa: E402
from dflash_compiler.codegen.tvm.norm import build_rms_norm  # noqa: E402
from dflash_compiler.codegen.tvm.norm import rms_norm as tvm_rms_norm  # noqa: E402

NORM_HIDDEN, NORM_ROWS, NORM_EPS = 5120, (1, 16, 256), 1e-6
NORM_COLUMNS = ("op", "rows", "tvm_us", "triton_us", "inductor_us", "torch_us", "floor_us", "tvm_vs_triton", "build_s")

TVM_FORMAT = {"bf16": "dense", "fp8_channel": "fp8_channel", "fp8_block": "fp8_block"}
SWIGLU_FORMATS = ("bf16", "fp8_block", "int4_asym")
COLUMNS = (
    "op",
    "shape",
    "tvm_us",
    "triton_us",
    "torch_us",
    "floor_us",
    "tvm_pct_copy",
    "tvm_vs_triton",
    "schedule",
    "build_s",
)


def build(fmt: str, m: int, n: int, k: int, arch: str, epilogue: str = "none", low_batch: bool = True) -> TVMKernel:
    """The TVM kernel for a bench format (bf16 activations; the weights bench_linear.make_format makes)."""
    kw = {"weight_dtype": torch.bfloat16} if fmt == "bf16" else {}
    if fmt.startswith("int4"):
        kw["scale_dtype"] = torch.float16  # quantize_int4's default
    fmt = TVM_FORMAT.get(fmt, fmt)
    return build_linear(fmt, m, n, k, torch.bfloat16, f"cuda -arch={arch}", epilogue, low_batch=low_batch, **kw)


def tasks(formats: tuple[str, ...] = FORMATS) -> list[tuple[str, str, int, str, bool]]:
    """(shape name, format, M, epilogue, low_batch) of every row, in table order."""
    out = []
    for name in SHAPES:
        for m in MS:
            out += [(name, fmt, m, "none", True) for fmt in formats]
            if m == 16:
                out += [(name, fmt, m, "none", False) for fmt in formats if TVM_FORMAT.get(fmt) in LOW_BATCH_FORMATS]
    out += [("gate_up", fmt, 16, "swiglu", True) for fmt in SWIGLU_FORMATS if fmt in formats]
    return out


def make_row(name, fmt, m, epilogue, kernel, *, tvm_us, err, triton_us, torch_us, floor, build_s, load_s) -> dict:
    n, k = SHAPES[name]
    return {
        "op": f"linear_{fmt}" + ("" if epilogue == "none" else f"+{epilogue}"),
        "shape": f"{name} M={m} N={n} K={k}",
        "dtype": fmt,
        "tvm_us": round(tvm_us, 2),
        "triton_us": round(triton_us, 2),
        "torch_us": round(torch_us, 2),
        "floor_us": round(floor, 2),
        "tvm_pct_copy": round(100 * floor / tvm_us, 1),
        "tvm_vs_triton": round(triton_us / tvm_us, 2),
        "schedule": "+".join(s.schedule for s in kernel.spec.stages),
        "build_s": round(build_s, 2),
        "load_s": round(load_s, 2),
        "rel_err": float(f"{err:.2e}"),
    }


def build_norm(rows: int, residual: bool, arch: str) -> TVMKernel:
    return build_rms_norm(rows, NORM_HIDDEN, torch.bfloat16, f"cuda -arch={arch}", eps=NORM_EPS, zero_centered=True,
                          residual=residual)  # fmt: skip


def norm_row(rows: int, residual: bool, arch: str, bw_tbps: float, inductor) -> dict:
    """One RMSNorm case through each lowering on the same rotating inputs, every output checked against the
    reference first."""
    from dflash_compiler.codegen import reference
    from dflash_compiler.codegen.triton.fused_ops import rms_norm as triton_rms_norm

    t0 = time.perf_counter()
    kernel = build_norm(rows, residual, arch)
    build_s = time.perf_counter() - t0
    act_bytes = rows * NORM_HIDDEN * 2
    nbytes = act_bytes * (4 if residual else 2) + NORM_HIDDEN * 2  # x (+ residual) in, y (+ the sum) out
    n = rotations_for(nbytes)
    xs = [torch.randn(rows, NORM_HIDDEN, device="cuda", dtype=torch.bfloat16) for _ in range(n)]
    rs = [torch.randn_like(x) if residual else None for x in xs]
    w = (torch.randn(NORM_HIDDEN, device="cuda") * 0.1).to(torch.bfloat16)
    kw = {"zero_centered": True}
    impls = {
        "tvm": lambda i: tvm_rms_norm(kernel, xs[i], w, NORM_EPS, residual=rs[i]),
        "triton": lambda i: triton_rms_norm(xs[i], w, NORM_EPS, residual=rs[i], **kw),
        "inductor": lambda i: inductor(xs[i], w, NORM_EPS, residual=rs[i], **kw),
        "torch": lambda i: reference.rms_norm(xs[i], w, NORM_EPS, residual=rs[i], **kw),
    }
    want = impls["torch"](0)
    times = {}
    for name, fn in impls.items():
        got = fn(0)
        for g, r in zip(got if residual else (got,), want if residual else (want,)):
            torch.testing.assert_close(g.float(), r.float(), rtol=2e-2, atol=2e-2)
        times[name] = graph_time_us(fn, n)
    return {
        "op": "rms_norm" + ("+residual" if residual else ""), "rows": rows,
        **{f"{k}_us": round(v, 2) for k, v in times.items()},
        "floor_us": round(floor_us(nbytes, bw_tbps), 2),
        "tvm_vs_triton": round(times["triton"] / times["tvm"], 2), "build_s": round(build_s, 2),
    }  # fmt: skip


def norm_rows(bw_tbps: float, arch: str) -> list[dict]:
    from dflash_compiler.codegen import reference

    inductor = torch.compile(reference.rms_norm)
    out = []
    for residual in (False, True):
        for rows in NORM_ROWS:
            out.append(norm_row(rows, residual, arch, bw_tbps, inductor))
            print("  ".join(str(out[-1][c]) for c in NORM_COLUMNS), flush=True)
    return out


def build_only(arch: str) -> None:
    rows = []
    for name, fmt, m, epilogue, low_batch in tasks():
        n, k = SHAPES[name]
        t0 = time.perf_counter()
        kernel = build(fmt, m, n, k, arch, epilogue, low_batch)
        rows.append(
            {
                "op": f"linear_{fmt}+{epilogue}",
                "shape": f"{name} M={m}",
                "schedule": "+".join(s.schedule for s in kernel.spec.stages),
                "build_s": round(time.perf_counter() - t0, 2),
            }
        )
    for residual in (False, True):
        for m in NORM_ROWS:
            t0 = time.perf_counter()
            kernel = build_norm(m, residual, arch)
            rows.append({"op": kernel.spec.op + ("+residual" if residual else ""), "shape": f"hidden M={m}",
                         "schedule": "+".join(s.schedule for s in kernel.spec.stages),
                         "build_s": round(time.perf_counter() - t0, 2)})  # fmt: skip
    print_table(rows, ("op", "shape", "schedule", "build_s"))
    print(f"{len(rows)} kernels for {arch} in {sum(r['build_s'] for r in rows):.1f} s")


def run(bw_tbps: float, arch: str) -> list[dict]:
    rows = []
    by_shape: dict[str, list] = {}
    for task in tasks():
        by_shape.setdefault(task[0], []).append(task)
    for name, shape_tasks in by_shape.items():
        n, k = SHAPES[name]
        case = Case(n, k, FORMATS)
        torch_us, triton_us = {}, {}
        for m in MS:
            torch_us[("bf16", m, "none")] = case.time_torch("bf16", m)
            torch_us[("fp8", m, "none")] = case.time_torch("fp8", m)
        if name == "gate_up":
            torch_us[("bf16", 16, "swiglu")] = case.time_torch("bf16", 16, swiglu=True)
        for _, fmt, m, epilogue, low_batch in shape_tasks:
            t0 = time.perf_counter()
            kernel = build(fmt, m, n, k, arch, epilogue, low_batch)
            build_s = time.perf_counter() - t0

            def launch(x, weight, out, residual, kernel=kernel):
                tvm_linear(kernel, x, weight, out=out, residual=residual)

            w0 = case.weights[fmt][0]
            x0 = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t0 = time.perf_counter()
            launch(x0, w0, None, None)  # the first call allocates the workspace (and JIT-loads a source module)
            torch.cuda.synchronize()
            load_s = time.perf_counter() - t0
            swiglu = epilogue == "swiglu"
            tvm_us, err, nbytes = case.time_ours(fmt, m, swiglu=swiglu, launch=launch)
            if (fmt, m, epilogue) not in triton_us:
                triton_us[(fmt, m, epilogue)] = case.time_ours(fmt, m, swiglu=swiglu)[0]
            family = "fp8" if fmt.startswith("fp8") and epilogue == "none" else "bf16"
            row = make_row(
                name,
                fmt,
                m,
                epilogue,
                kernel,
                tvm_us=tvm_us,
                err=err,
                triton_us=triton_us[(fmt, m, epilogue)],
                torch_us=torch_us[(family, m, epilogue)],
                floor=floor_us(nbytes, bw_tbps),
                build_s=build_s,
                load_s=load_s,
            )
            rows.append(row)
            print("  ".join(str(rows[-1][c]) for c in COLUMNS), flush=True)
        del case
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/kernels-tvm-h200.json")
    parser.add_argument("--build-only", action="store_true", help="cross-compile every kernel and stop (no GPU)")
    parser.add_argument("--arch", default=None, help="sm_80, sm_90, sm_100 or sm_120 (default: the GPU's)")
    args = parser.parse_args()
    arch = args.arch
    if arch is None:
        major, minor = torch.cuda.get_device_capability()
        arch = f"sm_{major}{minor}"
    if args.build_only:
        build_only(arch)
        return
    bw = copy_bandwidth_tbps()
    print(f"copy bandwidth {bw:.3f} TB/s on {torch.cuda.get_device_name()} ({arch})", flush=True)
    rows = run(bw, arch)
    print_table(rows, COLUMNS)
    norms = norm_rows(bw, arch)
    print_table(norms, NORM_COLUMNS)
    write_results(args.out, rows, copy_bandwidth_TBps=round(bw, 3), arch=arch, norms=norms)


if __name__ == "__main__":
    main()
