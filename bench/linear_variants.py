"""The tuned linears of a profile's database against kernel variants of the same configs, on the GPU: each entry's
config as tuned, the same with the variant switched on, and two fixed alternatives with the variant, each as a
fraction of the floor (the call's bytes over the copy bandwidth measured in the same run). Every point is checked
against the PyTorch reference as the tuner checks it. Variants: `prequant_x` (FP8 weights: x quantized by a pass
before the GEMM) and `mma_sync` (Hopper: the dots as mma.sync instead of wgmma; every format).

    python bench/linear_variants.py --fmt fp8_channel --rows 16 --out bench/results/linear-variants-h200.json
    python bench/linear_variants.py --variant mma_sync --fmt int4_sym --rows 16 --out bench/results/mma-sync-h200.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from common import copy_bandwidth_tbps, floor_us, print_table, write_results  # noqa: E402
from tuning_report import call_bytes, triton_linears  # noqa: E402

from dflash_compiler.codegen.triton.linear import LinearConfig  # noqa: E402
from dflash_compiler.hw_profiles import profile_for_device  # noqa: E402
from dflash_compiler.hw_profiles.database import TuningDB  # noqa: E402
from dflash_compiler.tuning.measure import ConfigFailed, make_case  # noqa: E402

COLUMNS = ("shape", "variant", "us", "floor_us", "frac", "vs_tuned")


def variants(config: dict, sm_count: int, variant: str, fmt: str) -> dict[str, dict]:
    """The entry's config, it with the variant on, and 128-row stream-K and 64-row tile grids with the variant."""
    fixed = {"fp8_dot": True} if fmt.startswith("fp8") else {}
    on = {"prequant_x": True} if variant == "prequant_x" else {"mma_sync": True, "prequant_x": config.get("prequant_x")}
    on = {k: v for k, v in on.items() if v}
    return {
        "tuned": config,
        f"tuned+{variant}": {**config, **on},
        f"{variant} bn128 sk2": {
            **LinearConfig(128, 16, 128, 4, 4, programs=2 * sm_count, **on).__dict__,
            **fixed,
        },  # fmt: skip
        f"{variant} bn64 tile": {**LinearConfig(64, 16, 128, 4, 6, **on).__dict__, **fixed},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="prequant_x", choices=("prequant_x", "mma_sync"))
    p.add_argument(
        "--fmt", default="fp8_channel", choices=("bf16", "fp8_channel", "fp8_block", "int4_sym", "int4_asym")
    )
    p.add_argument("--rows", type=int, default=16, help="the entries' M")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if args.variant == "prequant_x" and not args.fmt.startswith("fp8"):
        p.error("--variant prequant_x: compares FP8 weights (--fmt fp8_channel or fp8_block)")
    profile = profile_for_device(torch.cuda.get_device_properties(0))
    bandwidth = copy_bandwidth_tbps()
    rows = []
    for entry, shape in triton_linears(TuningDB.load(profile), args.rows, args.fmt):
        case = make_case(shape, profile, torch.device("cuda"))
        floor = floor_us(call_bytes(shape), bandwidth)
        tuned_us = None
        for name, config in variants(entry.config, profile.device.sm_count, args.variant, args.fmt).items():
            try:
                us = case.measure("triton", config)
            except ConfigFailed as e:
                rows.append({"shape": entry.shape_key, "variant": name, "failed": str(e)[:200]})
                continue
            tuned_us = us if name == "tuned" else tuned_us
            rows.append({"shape": entry.shape_key, "variant": name, "us": us, "floor_us": floor, "frac": floor / us,
                         "vs_tuned": tuned_us / us if tuned_us else None, "config": config})  # fmt: skip
        del case
        torch.cuda.empty_cache()
    print_table(rows, COLUMNS)
    write_results(
        args.out, rows, profile=profile.name, copy_bandwidth_TBps=bandwidth, fmt=args.fmt, m=args.rows,
        variant=args.variant,
    )  # fmt: skip


if __name__ == "__main__":
    main()
