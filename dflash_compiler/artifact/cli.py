"""`dflash-compile`: compile a target (and DFlash drafter) for one hardware profile into an artifact directory."""

from __future__ import annotations

import argparse
import sys
import time

from .. import __version__
from ..errors import DFlashError


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _lengths(text: str) -> list[int]:
    try:
        lengths = [int(n) for n in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"expected lengths >= 1, got {text!r}")
    return lengths


def compile_parser() -> argparse.ArgumentParser:
    from ..runtime.options import add_calibration, add_verify_width
    from .build import GPUS, QUANTS

    p = argparse.ArgumentParser(prog="dflash-compile", description=__doc__)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--target", help="target checkpoint directory (default: the bundled tiny pair)")
    p.add_argument("--drafter", help="DFlash drafter checkpoint directory (default with no --target: the bundled one)")
    p.add_argument("--gpu", required=True, choices=GPUS, help="hardware profile (auto: this machine's GPU, else cpu)")
    p.add_argument("--quant", default="bf16", choices=QUANTS, help="weight format (bf16: the weights as loaded)")
    p.add_argument("--dtype", default=None, help="activations: float32 (default on cpu), bfloat16 (default on GPUs)")
    p.add_argument("--block-size", type=int, default=None, help="draft block size (default: the drafter's)")
    add_verify_width(p)
    add_calibration(p)
    p.add_argument("--max-batch", type=int, default=32, help="most concurrent requests (default 32)")
    p.add_argument("--max-seq-len", type=int, default=4096, help="prompt + generated tokens per request (default 4096)")
    p.add_argument(
        "--graphs",
        type=_names,
        default=None,
        help="comma-separated step graphs to include (default: all; step,join,prefill serves greedy requests only)",
    )
    p.add_argument(
        "--prefill-lengths",
        type=_lengths,
        default=None,
        help="comma-separated prefill chunk lengths whose kernels are compiled ahead (default: 1..512, every one)",
    )
    p.add_argument(
        "--random-weights",
        type=int,
        default=None,
        metavar="SEED",
        help="seeded random weights for benchmarks at real shapes (--target/--drafter need only config.json): the "
        "artifact names the seed, and a load rebuilds the weights on its device",
    )
    p.add_argument("-o", "--output", required=True, help="the artifact directory to write")
    p.add_argument("--force", action="store_true", help="replace an existing artifact at --output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def compile_main(argv: list[str] | None = None) -> int:
    args = compile_parser().parse_args(argv)
    try:
        from ..runtime.options import calibration_texts
        from .build import compile_artifact

        calibration = calibration_texts(args)
        t0 = time.perf_counter()
        out = compile_artifact(
            args.output,
            target=args.target,
            drafter=args.drafter,
            gpu=args.gpu,
            quant=args.quant,
            block_size=args.block_size,
            verify_width=args.verify_width,
            max_batch=args.max_batch,
            max_seq_len=args.max_seq_len,
            dtype=args.dtype,
            graphs=args.graphs,
            prefill_lengths=args.prefill_lengths,
            force=args.force,
            progress=not args.quiet,
            calibration=calibration,
            random_weights=args.random_weights,
        )
    except DFlashError as e:
        print(f"dflash-compile: error: {e}", file=sys.stderr)
        return 2
    print(f"{out}: compiled in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(compile_main())
