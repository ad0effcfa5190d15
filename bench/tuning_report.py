"""The linear entries of a profile's tuning database against their floor: tuned, default and torch time per call
as measured by `dflash-tune`, each as a fraction of the floor (the bytes the call must move over the device's
measured copy bandwidth, which the profile lists, or its FLOPs over the measured bf16 matmul rate, whichever is
longer; FP8 weights at twice the rate where the profile has FP8 tensor cores), the gain over the default and over
torch.

    python bench/tuning_report.py --profile sm90 --device H200 --out bench/results/tuning-h200.json

Reads the database only (no GPU): the times are the ones measured on the device the entries name.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from common import floor_us, print_table, write_results  # noqa: E402

from dflash_compiler.hw_profiles import load_profile  # noqa: E402
from dflash_compiler.hw_profiles.database import TuningDB  # noqa: E402
from dflash_compiler.tuning.measure import format_weight  # noqa: E402
from dflash_compiler.tuning.spaces import DTYPES, parse_shape  # noqa: E402

COLUMNS = ("shape", "fmt", "lowering", "default_us", "tuned_us", "torch_us", "floor_us", "bound", "default_frac",
           "tuned_frac", "torch_frac", "vs_default", "vs_torch", "trials")  # fmt: skip


def call_bytes(shape) -> int:
    """Bytes one linear call must move: the weight in its format (shapes from a meta tensor), x, y, a residual."""
    weight = format_weight(torch.empty(shape.n, shape.k, device="meta"), shape.fmt).nbytes
    act = DTYPES[shape.act].itemsize
    out_reads = 2 if shape.epilogue == "residual" else 1
    return weight + shape.m * shape.k * act + out_reads * shape.m * shape.n_out * act


def triton_linears(db: TuningDB, rows: int, fmt: str | None = None):
    """(entry, shape) of the database's linears lowered to Triton at `rows` rows (of one format, if named)."""
    for entry in db.entries("linear"):
        shape = parse_shape("linear", entry.shape_key, entry.fmt)
        if shape.m == rows and entry.lowering == "triton" and fmt in (None, entry.fmt):
            yield entry, shape


def _frac(floor: float, us: float | None) -> float | None:
    return round(floor / us, 3) if us else None


def report_rows(db: TuningDB, profile, tflops: float, device: str | None) -> list[dict]:
    bandwidth_tbps = profile.memory_bandwidth_tbps
    fp8_rate = 2 if profile.fp8_tensor_cores else 1
    rows = []
    for e in db.entries("linear"):
        if device is not None and device not in e.device:
            continue
        shape = parse_shape(e.op, e.shape_key, e.fmt)
        memory = floor_us(call_bytes(shape), bandwidth_tbps)
        rate = tflops * (fp8_rate if shape.fmt.startswith("fp8") else 1)
        compute = 2 * shape.m * shape.n * shape.k / (rate * 1e12) * 1e6
        floor = max(memory, compute)
        rows.append(
            {
                "shape": e.shape_key,
                "fmt": e.fmt,
                "lowering": e.lowering if e.tuned else f"{e.lowering} (untuned)",
                "config": e.config,
                "device": e.device,
                "default_us": e.default_time_us,
                "tuned_us": e.time_us,
                "torch_us": e.torch_time_us,
                "floor_us": round(floor, 2),
                "bound": "memory" if memory >= compute else "compute",
                "default_frac": _frac(floor, e.default_time_us),
                "tuned_frac": _frac(floor, e.time_us),
                "torch_frac": _frac(floor, e.torch_time_us),
                "vs_default": round(e.default_time_us / e.time_us, 3) if e.time_us and e.default_time_us else None,
                "vs_torch": round(e.torch_time_us / e.time_us, 3) if e.time_us and e.torch_time_us else None,
                "trials": e.trials,
                "date": e.date,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="sm90")
    p.add_argument("--device", help="only entries measured on a device whose name contains this (H200)")
    p.add_argument("--db", help="directory holding the profiles' databases (default: the package's hw_profiles/)")
    p.add_argument("--tflops", type=float, default=686.7, help="bf16 matmul TFLOP/s (H200: 686.7, bench/e2e.py)")
    p.add_argument("--out", default="bench/results/tuning-h200.json")
    args = p.parse_args(argv)
    profile = load_profile(args.profile, args.device)
    bandwidth = profile.memory_bandwidth_tbps
    if bandwidth is None:
        raise SystemExit(f"profile {profile.name}: device {profile.device.name} lists no memory_bandwidth_tbps")
    rows = report_rows(TuningDB.load(profile, args.db), profile, args.tflops, args.device)
    if not rows:
        raise SystemExit(f"profile {profile.name}: no linear entries measured on {args.device or 'any device'}")
    print(f"{profile.name} on {profile.device.name}: floors at {bandwidth} TB/s copy, {args.tflops} TFLOP/s bf16")
    print_table([{k: f"{v:.2f}" if k.endswith("_frac") and v else v for k, v in r.items()} for r in rows], COLUMNS)
    return write_results(
        args.out, rows, device=profile.device.name, profile=profile.name, copy_bandwidth_TBps=bandwidth,
        matmul_bf16_TFLOPs=args.tflops,
        source=f"hw_profiles/{profile.name}/linear.jsonl (times measured by dflash-tune)",
    )  # fmt: skip


if __name__ == "__main__":
    main()
