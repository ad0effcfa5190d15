"""What a kernel of a decode linear's size can reach on this GPU, and what its time is made of.

1. For each 16-row linear of the tuning database, its tuned time beside (a) a Triton kernel that only streams the
   same weight bytes on the same grid (each program sums its contiguous share of int32 words, loads pipelined
   num_stages deep as the GEMM's are; the fastest of a few block sizes and depths), (b) an empty kernel on that
   grid, and (c) the copy floor of the bytes at the bandwidth measured in the same run. Where (a) is close to the
   tuned time the grid and its latency bound the kernel, not its inner loop.
2. K scaling: the tuned config of each format's n5120 k4096 call (the drafter's o_proj) timed at K from 1024 to
   16384, and a least-squares line time = fixed + bytes / rate through the points: a large `fixed` is a cost per
   call that no bandwidth removes.

All times are per call over CUDA-graph replays with rotating inputs, as the tuner times.

    python bench/linear_floor.py --out bench/results/linear-floor-h200.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from common import copy_bandwidth_tbps, floor_us, graph_time_us, print_table, write_results  # noqa: E402
from tuning_report import call_bytes, triton_linears  # noqa: E402

from dflash_compiler.hw_profiles import profile_for_device  # noqa: E402
from dflash_compiler.hw_profiles.database import TuningDB  # noqa: E402

COLUMNS = ("shape", "fmt", "programs", "tuned_us", "stream_us", "empty_us", "floor_us", "tuned_frac", "stream_frac")


@triton.jit
def _stream_kernel(w_ptr, out_ptr, words, BLOCK: tl.constexpr, STAGES: tl.constexpr = 1):
    """Sums this program's contiguous share of int32 words, BLOCK at a time, STAGES loads in flight."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    start = (pid.to(tl.int64) * words) // programs
    end = ((pid + 1).to(tl.int64) * words) // programs
    acc = tl.zeros((BLOCK,), tl.int32)
    for i in tl.range(start, end, BLOCK, num_stages=STAGES):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(w_ptr + offs, mask=offs < end, other=0)
    tl.store(out_ptr + pid, tl.sum(acc, 0))


@triton.jit
def _empty_kernel(out_ptr):
    if tl.program_id(0) < 0:
        tl.store(out_ptr, 0)


def grid_of(config: dict, m: int, n_out: int, k: int) -> int:
    """The linear kernel's grid for a database config (codegen/triton/linear.py's launcher)."""
    tiles = triton.cdiv(n_out, config.get("block_n", 64)) * triton.cdiv(m, config.get("block_m", 16))
    chunks = triton.cdiv(k, config.get("block_k", 128))
    programs = config.get("programs") or tiles * config.get("split_k", 1)
    return max(1, min(programs, tiles * chunks))


STREAM_VARIANTS = ((1024, 4), (2048, 4), (4096, 3))  # (BLOCK words, STAGES): 16-48 KB of loads in flight


def stream_and_empty_us(nbytes: int, programs: int, l2_bytes: int) -> tuple[float, float]:
    """Per-call times of the streaming kernel over nbytes (rotating copies, several times the L2; the fastest of
    STREAM_VARIANTS) and of the empty kernel, both on `programs` programs."""
    rotations = max(2, (4 * l2_bytes) // nbytes + 1)
    words = [torch.randint(0, 1 << 30, (nbytes // 4,), dtype=torch.int32, device="cuda") for _ in range(rotations)]
    out = torch.empty(programs, dtype=torch.int32, device="cuda")

    def stream(block: int, stages: int) -> float:
        def launch(i):
            _stream_kernel[(programs,)](words[i], out, words[i].numel(), BLOCK=block, STAGES=stages, num_warps=4)

        return graph_time_us(launch, rotations)

    fastest = min(stream(block, stages) for block, stages in STREAM_VARIANTS)
    empty = graph_time_us(lambda i: _empty_kernel[(programs,)](out), rotations)
    return fastest, empty


SCALING_KS = (1024, 2048, 4096, 8192, 16384)


def fit_fixed_and_rate(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares time_us = fixed_us + nbytes / rate through (nbytes, time_us) points: (fixed_us, TB/s)."""
    n = len(points)
    mx = sum(b for b, _ in points) / n
    my = sum(t for _, t in points) / n
    slope = sum((b - mx) * (t - my) for b, t in points) / sum((b - mx) ** 2 for b, _ in points)
    return my - slope * mx, 1e-6 / slope if slope > 0 else float("inf")  # slope: us per byte


def k_scaling(db: TuningDB, profile, rows: int) -> list[dict]:
    """Each format's n5120 k4096 call (its tuned config) timed at SCALING_KS, with the line through the times."""
    from dflash_compiler.tuning.measure import LinearCase
    from dflash_compiler.tuning.spaces import LinearShape

    out = []
    for entry, shape in triton_linears(db, rows):
        if (shape.n, shape.k) != (5120, 4096):
            continue
        points = []
        for k in SCALING_KS:
            s = LinearShape(shape.m, shape.n, k, shape.fmt, shape.epilogue, shape.act)
            us = LinearCase(s, profile, "cuda").measure("triton", entry.config)
            points.append((call_bytes(s), us))
            torch.cuda.empty_cache()
        fixed, rate = fit_fixed_and_rate(points)
        out.append({"fmt": entry.fmt, "n": shape.n, "epilogue": shape.epilogue, "config": entry.config,
                    "points": [{"k": k, "bytes": b, "us": us} for k, (b, us) in zip(SCALING_KS, points)],
                    "fixed_us": fixed, "rate_TBps": rate})  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    profile = profile_for_device(torch.cuda.get_device_properties(0))
    bandwidth = copy_bandwidth_tbps()
    rows = []
    db = TuningDB.load(profile)
    for entry, shape in triton_linears(db, args.rows):
        if entry.time_us is None:
            continue
        nbytes = call_bytes(shape)
        programs = grid_of(entry.config, shape.m, shape.n_out, shape.k)
        stream, empty = stream_and_empty_us(nbytes, programs, profile.l2_bytes or 64 << 20)
        floor = floor_us(nbytes, bandwidth)
        rows.append({"shape": entry.shape_key, "fmt": entry.fmt, "programs": programs, "tuned_us": entry.time_us,
                     "stream_us": stream, "empty_us": empty, "floor_us": floor, "tuned_frac": floor / entry.time_us,
                     "stream_frac": floor / stream, "config": entry.config})  # fmt: skip
    print_table(rows, COLUMNS)
    scaling = k_scaling(db, profile, args.rows)
    for r in scaling:
        times = "  ".join(f"k{p['k']}: {p['us']:.1f}" for p in r["points"])
        fit = f"fixed {r['fixed_us']:.1f} us + bytes at {r['rate_TBps']:.2f} TB/s"
        print(f"{r['fmt']:12s} n{r['n']} {times}  ->  {fit}")
    write_results(args.out, rows, profile=profile.name, copy_bandwidth_TBps=bandwidth, m=args.rows,
                  k_scaling=scaling,
                  note="tuned_us is the database's (measured by dflash-tune on this profile's GPU)")  # fmt: skip


if __name__ == "__main__":
    main()
