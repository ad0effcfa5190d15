"""Every kernel benchmark in one run: the copy bandwidth measured once, then the linear, attention/fused/accept and
GDN kernels at Qwen3.5-27B shapes, into one table and bench/results/kernels-h100.json.

    python bench/bench_kernels.py [--out bench/results/kernels-h100.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_attention  # noqa: E402
import bench_gdn  # noqa: E402
import bench_linear  # noqa: E402
from common import copy_bandwidth_tbps, print_table, write_results  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/kernels-h100.json")
    args = p.parse_args()
    bw = copy_bandwidth_tbps()
    print(f"copy bandwidth {bw:.3f} TB/s", flush=True)
    rows = []
    for area, run in (("linear", bench_linear.run), ("attention", bench_attention.run), ("gdn", bench_gdn.run)):
        area_rows = run(bw) if area != "gdn" else run(bw, sweep=False)
        rows += [{"area": area, **r} for r in area_rows]
        print(f"{area}: {len(area_rows)} rows", flush=True)
        write_results(args.out, rows, copy_bandwidth_TBps=round(bw, 3), partial=True)
    for r in rows:
        r["of_floor"] = round(r["floor_us"] / r["ours_us"], 3) if r.get("ours_us") else None
    print_table(rows, ["area", "op", "shape", "dtype", "ours_us", "torch_us", "floor_us", "of_floor"])
    write_results(args.out, rows, copy_bandwidth_TBps=round(bw, 3), partial=False)


if __name__ == "__main__":
    main()
