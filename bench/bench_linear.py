"""Linear layers at Qwen3.5-27B shapes, M in {1, 16, 64}: our Triton kernel per weight format vs torch vs the floor.

torch: cuBLAS bf16 (torch.mm) for bf16, and for INT4 too (on the dequantized weight); torch._scaled_mm with per-row
activation and per-column weight scales for FP8 (activations quantized beforehand, outside the timing; ours
quantizes them inside the kernel). Floor: weight bytes (scales and zeros included) + activation bytes + output
bytes over the copy bandwidth measured in the same run. Every timing replays a CUDA graph of calls over rotating
weight copies, so neither launch overhead nor L2 reuse flatters either side.

    python bench/bench_linear.py [--out bench/results/kernels-linear-h100.json] [--sweep SWEEP.json]

--sweep times a grid of explicit configs per (shape, M, format family) instead, prints the best of each and writes
every timing to SWEEP.json (the input for the default config table in codegen/triton/linear.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from common import copy_bandwidth_tbps, floor_us, graph_time_us, print_table, rotations_for, write_results  # noqa: E402

from dflash_compiler.codegen import weight_formats as wf  # noqa: E402
from dflash_compiler.codegen.triton.linear import LinearConfig, default_config, linear  # noqa: E402

SHAPES = {
    "gate_up": (34816, 5120),
    "down": (5120, 17408),
    "in_proj_qkv": (10240, 5120),
    "o_proj": (5120, 6144),
    "lm_head": (248320, 5120),
}
MS = (1, 16, 64)
FORMATS = ("bf16", "fp8_channel", "fp8_block", "int4_sym", "int4_asym")
CHECK_ROWS = 4096
COLUMNS = ("op", "shape", "dtype", "ours_us", "torch_us", "floor_us", "pct_copy", "vs_torch", "config")


def make_format(fmt: str, w: torch.Tensor):
    if fmt == "bf16":
        return wf.DenseWeight(w)
    if fmt == "fp8_channel":
        return wf.quantize_fp8_channel(w)
    if fmt == "fp8_block":
        return wf.quantize_fp8_block(w)
    return wf.quantize_int4(w, symmetric=fmt == "int4_sym")


def clone(weight):
    return dataclasses.replace(
        weight,
        **{
            f.name: getattr(weight, f.name).clone()
            for f in dataclasses.fields(weight)
            if isinstance(getattr(weight, f.name), torch.Tensor)
        },
    )


def cfg_str(cfg: LinearConfig) -> str:
    grid = f"P{cfg.programs}" if cfg.programs else f"s{cfg.split_k}"
    return f"n{cfg.block_n}m{cfg.block_m}k{cfg.block_k}w{cfg.num_warps}s{cfg.num_stages}{grid}"


class Case:
    """One weight shape: rotating copies of each format, and activations/outputs per M."""

    def __init__(self, n: int, k: int, formats: tuple[str, ...]):
        self.n, self.k = n, k
        gen = torch.Generator(device="cuda").manual_seed(n + k)
        dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
        self.weights = {}
        for fmt in formats:
            base = make_format(fmt, dense)
            self.weights[fmt] = [base] + [clone(base) for _ in range(rotations_for(base.nbytes) - 1)]
        self.dense = self.weights["bf16"] if "bf16" in self.weights else [wf.DenseWeight(dense)]
        del dense
        self.fp8 = self.weights.get("fp8_channel")

    def activations(self, m: int, rotations: int):
        xs = [torch.randn(m, self.k, device="cuda", dtype=torch.bfloat16) for _ in range(rotations)]
        return xs

    def time_ours(self, fmt, m, config=None, swiglu=False, residual=False, rep_ms=200.0, warmup_ms=25.0, launch=None):
        """(us, rel_err, bytes) of launch(x, weight, out, residual), by default our Triton linear with `config`."""
        ws = self.weights[fmt]
        rot = len(ws)
        xs = self.activations(m, rot)
        n_out = self.n // 2 if swiglu else self.n
        outs = [torch.empty(m, n_out, device="cuda", dtype=torch.bfloat16) for _ in range(rot)]
        res = [torch.randn(m, n_out, device="cuda", dtype=torch.bfloat16) for _ in range(rot)] if residual else None

        if launch is None:

            def launch(x, weight, out, residual):
                linear(x, weight, out=out, config=config, swiglu=swiglu, residual=residual)

        def fn(i):
            launch(xs[i], ws[i], outs[i], res[i] if res else None)

        us = graph_time_us(fn, rot, warmup_ms=warmup_ms, rep_ms=rep_ms)
        # Check the first CHECK_ROWS outputs (and their up rows) against torch on the dequantized weight.
        cols = min(CHECK_ROWS, n_out)

        def partial(start):
            return (xs[0].float() @ ws[0].rows(start, start + cols).dequantize().T).float()

        ref = partial(0)
        if swiglu:
            ref = torch.nn.functional.silu(ref) * partial(n_out)
        if residual:
            ref = ref + res[0][:, :cols].float()
        fn(0)
        err = ((outs[0][:, :cols].float() - ref).norm() / ref.norm()).item()
        nbytes = ws[0].nbytes + xs[0].numel() * 2 + outs[0].numel() * 2 * (2 if residual else 1)
        return us, err, nbytes

    def time_torch(self, kind: str, m: int, swiglu=False, residual=False, rep_ms=200.0, warmup_ms=25.0) -> float:
        if kind == "fp8":
            ws = self.fp8
            rot = len(ws)
            mp_ = max(m, 16)  # _scaled_mm wants dims that are multiples of 16: M=1 runs padded
            xq = [wf.quantize_fp8_channel(torch.randn(mp_, self.k, device="cuda")) for _ in range(rot)]
            sb = [w.scale.view(1, -1) for w in ws]

            def fn(i):
                return torch._scaled_mm(
                    xq[i].qweight,
                    ws[i].qweight.t(),
                    scale_a=xq[i].scale.view(-1, 1),
                    scale_b=sb[i],
                    out_dtype=torch.bfloat16,
                )

        else:
            ws = [w.weight for w in self.dense]
            rot = len(ws)
            xs = self.activations(m, rot)
            outs = [torch.empty(m, self.n, device="cuda", dtype=torch.bfloat16) for _ in range(rot)]
            res = (
                [torch.randn(m, self.n, device="cuda", dtype=torch.bfloat16) for _ in range(rot)] if residual else None
            )

            def fn(i):
                y = torch.mm(xs[i], ws[i].t(), out=outs[i])
                if swiglu:
                    gate, up = y.chunk(2, dim=-1)
                    return torch.nn.functional.silu(gate) * up
                if residual:
                    return y + res[i]
                return y

        return graph_time_us(fn, rot, warmup_ms=warmup_ms, rep_ms=rep_ms)


def row(op, name, n, k, m, dtype, ours, torch_us, floor, config, err=None) -> dict:
    r = {
        "op": op,
        "shape": f"{name} M={m} N={n} K={k}",
        "dtype": dtype,
        "ours_us": round(ours, 2),
        "torch_us": round(torch_us, 2),
        "floor_us": round(floor, 2),
        "pct_copy": round(100 * floor / ours, 1),
        "vs_torch": round(torch_us / ours, 2),
        "config": config,
    }
    if err is not None:
        r["rel_err"] = float(f"{err:.2e}")
    return r


# ---- parallel compilation: the kernel variants are compiled into Triton's disk cache by worker processes -----------


def _warm_one(task) -> str | None:
    fmt, cfg, swiglu, residual = task
    try:
        w = make_format(fmt, torch.randn(256, 512, device="cuda", dtype=torch.bfloat16) * 0.02)
        x = torch.randn(cfg["block_m"], 512, device="cuda", dtype=torch.bfloat16)
        r = torch.randn(cfg["block_m"], 256, device="cuda", dtype=torch.bfloat16) if residual else None
        linear(x, w, config=LinearConfig(**cfg), swiglu=swiglu, residual=r)
        torch.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001 - reported by the caller; an out-of-resources config is skipped there
        return f"{fmt} {cfg}: {type(e).__name__}: {str(e)[:200]}"


def warm(tasks, processes: int = 12) -> None:
    tasks = sorted(set(tasks), key=str)
    t0 = time.time()
    with mp.get_context("spawn").Pool(min(processes, len(tasks))) as pool:
        errors = [e for e in pool.map(_warm_one, [(f, dict(c), s, r) for f, c, s, r in tasks], chunksize=1) if e]
    print(f"compiled {len(tasks)} kernel variants in {time.time() - t0:.0f} s; {len(errors)} failed", flush=True)
    for e in errors:
        print("  ", e, flush=True)


def _key(cfg: LinearConfig) -> tuple:
    return tuple(sorted({**cfg.__dict__, "programs": None, "split_k": 1}.items()))


# ---- the benchmark ---------------------------------------------------------------------------------------------


def _fmt_family(fmt: str) -> str:
    return "fp8" if fmt.startswith("fp8") else "bf16"


def _kind(fmt: str, k: int):
    """A small weight of the format, for looking up its default config."""
    return make_format(fmt, torch.randn(16, k, dtype=torch.bfloat16))


def run(
    bw_tbps: float, formats: tuple[str, ...] = FORMATS, warm_first: bool = True, warm_only: bool = False
) -> list[dict]:
    dev = torch.device("cuda")
    tasks = []
    for n, k in SHAPES.values():
        for m in MS:
            for fmt in formats:
                tasks.append((fmt, _key(default_config(_kind(fmt, k), m, n, k, dev)), False, False))
    for fmt in ("bf16", "fp8_block", "int4_asym"):
        n, k = SHAPES["gate_up"]
        tasks.append((fmt, _key(default_config(_kind(fmt, k), 16, n // 2, k, dev, swiglu=True)), True, False))
    n, k = SHAPES["o_proj"]
    tasks.append(("bf16", _key(default_config(_kind("bf16", k), 16, n, k, dev)), False, True))
    if warm_first:
        warm(tasks)
    if warm_only:
        return []

    rows = []
    for name, (n, k) in SHAPES.items():
        case = Case(n, k, formats)
        for m in MS:
            t_bf16 = case.time_torch("bf16", m)
            t_fp8 = case.time_torch("fp8", m) if case.fp8 else float("nan")
            for fmt in formats:
                us, err, nbytes = case.time_ours(fmt, m)
                ref = t_fp8 if _fmt_family(fmt) == "fp8" else t_bf16
                cfg = cfg_str(default_config(case.weights[fmt][0], m, n, k, dev))
                rows.append(row(f"linear_{fmt}", name, n, k, m, fmt, us, ref, floor_us(nbytes, bw_tbps), cfg, err))
                print("  ".join(str(rows[-1][c]) for c in COLUMNS), flush=True)
        if name == "gate_up":
            t_torch = case.time_torch("bf16", 16, swiglu=True)
            for fmt in ("bf16", "fp8_block", "int4_asym"):
                us, err, nbytes = case.time_ours(fmt, 16, swiglu=True)
                cfg = cfg_str(default_config(case.weights[fmt][0], 16, n // 2, k, dev, swiglu=True))
                rows.append(
                    row(f"linear_{fmt}+swiglu", name, n, k, 16, fmt, us, t_torch, floor_us(nbytes, bw_tbps), cfg, err)
                )
        if name == "o_proj":
            t_torch = case.time_torch("bf16", 16, residual=True)
            us, err, nbytes = case.time_ours("bf16", 16, residual=True)
            cfg = cfg_str(default_config(case.weights["bf16"][0], 16, n, k, dev))
            rows.append(
                row("linear_bf16+residual", name, n, k, 16, "bf16", us, t_torch, floor_us(nbytes, bw_tbps), cfg, err)
            )
        del case
        torch.cuda.empty_cache()
    return rows


# ---- the config sweep ------------------------------------------------------------------------------------------

SWEEP_FORMATS = ("bf16", "fp8_channel", "int4_asym")


def candidates(m: int, sms: int, many_tiles: bool = False) -> list[LinearConfig]:
    if many_tiles:  # lm_head: tiles enough for whole waves; only check the classic grid against a persistent one
        grids = [None, 2 * sms]
    if m <= 16:
        tiles = [(64, 4, 4), (64, 4, 6), (128, 4, 4), (128, 4, 6), (128, 8, 4)]
        grids = [None, sms, 2 * sms, 3 * sms, 4 * sms] if not many_tiles else grids
        bm = 16
    else:
        tiles = [(64, 4, 3), (128, 4, 3), (128, 8, 4)]
        grids = [None, sms, 2 * sms] if not many_tiles else grids
        bm = 64
    return [
        LinearConfig(block_n=bn, block_m=bm, block_k=128, num_warps=w, num_stages=s, programs=p)
        for bn, w, s in tiles
        for p in grids
    ]


def sweep(bw_tbps: float, path: str, warm_first: bool = True, warm_only: bool = False) -> None:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tasks = [(fmt, _key(c), False, False) for fmt in SWEEP_FORMATS for m in (16, 64) for c in candidates(m, sms)]
    if warm_first:
        warm(tasks)
    if warm_only:
        return
    results, best_rows = [], []
    for name, (n, k) in SHAPES.items():
        case = Case(n, k, SWEEP_FORMATS)
        for m in MS:
            t_torch = {"bf16": case.time_torch("bf16", m, rep_ms=50), "fp8": case.time_torch("fp8", m, rep_ms=50)}
            for fmt in SWEEP_FORMATS:
                best = None
                for cfg in candidates(m, sms, many_tiles=name == "lm_head"):
                    try:
                        us, err, nbytes = case.time_ours(fmt, m, config=cfg, rep_ms=30, warmup_ms=5)
                    except Exception as e:  # noqa: BLE001 - a config out of resources is recorded and skipped
                        results.append(
                            {"shape": name, "m": m, "fmt": fmt, "config": cfg_str(cfg), "error": str(e)[:120]}
                        )
                        continue
                    floor = floor_us(nbytes, bw_tbps)
                    results.append(
                        {
                            "shape": name,
                            "m": m,
                            "fmt": fmt,
                            "config": cfg_str(cfg),
                            "us": us,
                            "floor_us": floor,
                            "err": err,
                        }
                    )
                    if err > 0.1:
                        print(f"BAD {name} M={m} {fmt} {cfg_str(cfg)} rel_err {err:.2e}", flush=True)
                    elif best is None or us < best[0]:
                        best = (us, cfg, floor)
                if best:
                    ref = t_torch[_fmt_family(fmt)]
                    best_rows.append(row(f"linear_{fmt}", name, n, k, m, fmt, best[0], ref, best[2], cfg_str(best[1])))
                    print("  ".join(str(best_rows[-1][c]) for c in COLUMNS), flush=True)
                Path(path).write_text(json.dumps({"copy_bandwidth_TBps": bw_tbps, "results": results}, indent=0))
        del case
        torch.cuda.empty_cache()
    print_table(best_rows, COLUMNS)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/kernels-linear-h100.json")
    parser.add_argument("--sweep", default=None, help="write a config sweep here instead of the benchmark")
    parser.add_argument("--warm-only", action="store_true", help="only compile the kernel variants (in parallel)")
    parser.add_argument("--skip-warm", action="store_true", help="the variants are compiled already")
    args = parser.parse_args()
    bw = 0.0 if args.warm_only else copy_bandwidth_tbps()
    print(f"copy bandwidth {bw:.3f} TB/s on {torch.cuda.get_device_name()}", flush=True)
    if args.sweep:
        sweep(bw, args.sweep, warm_first=not args.skip_warm, warm_only=args.warm_only)
        return
    rows = run(bw, warm_first=not args.skip_warm, warm_only=args.warm_only)
    if args.warm_only:
        return
    print_table(rows, COLUMNS)
    write_results(args.out, rows, copy_bandwidth_TBps=round(bw, 3))


if __name__ == "__main__":
    main()
