"""What a kernel of a decode linear's size can reach on this GPU: for each 16-row linear of the tuning database, its
tuned time beside (a) a Triton kernel that only streams the same weight bytes on the same grid (each program sums
its share of 16-byte words: no dequantization, no dot), (b) an empty kernel on that grid, and (c) the copy floor of
the bytes at the bandwidth measured in the same run. All times are per call over CUDA-graph replays with rotating
inputs, as the tuner times. Where (a) is close to the tuned time the kernel is bound by its grid and latency, not by
its inner loop.

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
def _stream_kernel(w_ptr, out_ptr, words, BLOCK: tl.constexpr):
    """Sums this program's contiguous share of int32 words (4 at a time: 16-byte loads)."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    start = (pid.to(tl.int64) * words) // programs
    end = ((pid + 1).to(tl.int64) * words) // programs
    acc = tl.zeros((BLOCK,), tl.int32)
    for i in range(start, end, BLOCK):
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


def stream_and_empty_us(nbytes: int, programs: int, l2_bytes: int) -> tuple[float, float]:
    """Per-call times of the streaming kernel over nbytes (rotating copies, several times the L2) and of the empty
    kernel, both on `programs` programs."""
    rotations = max(2, (4 * l2_bytes) // nbytes + 1)
    words = [torch.randint(0, 1 << 30, (nbytes // 4,), dtype=torch.int32, device="cuda") for _ in range(rotations)]
    out = torch.empty(programs, dtype=torch.int32, device="cuda")
    stream = graph_time_us(lambda i: _stream_kernel[(programs,)](words[i], out, words[i].numel(), BLOCK=1024),
                           rotations)  # fmt: skip
    empty = graph_time_us(lambda i: _empty_kernel[(programs,)](out), rotations)
    return stream, empty


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    profile = profile_for_device(torch.cuda.get_device_properties(0))
    bandwidth = copy_bandwidth_tbps()
    rows = []
    for entry, shape in triton_linears(TuningDB.load(profile), args.rows):
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
    write_results(args.out, rows, profile=profile.name, copy_bandwidth_TBps=bandwidth, m=args.rows,
                  note="tuned_us is the database's (measured by dflash-tune on this profile's GPU)")  # fmt: skip


if __name__ == "__main__":
    main()
