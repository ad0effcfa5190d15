"""Command-line options that several tools share (dflash-compile, dflash-serve, dflash-bench): one definition of
each flag, its parsing and its help."""

from __future__ import annotations

import argparse

from ..errors import DFlashError


def parse_verify_width(spec: str) -> int | dict[int, int]:
    """A verify width for every bucket ("8"), or widths by batch size ("1:16,8:12,16:8")."""
    try:
        if ":" not in spec:
            return int(spec)
        pairs = [item.split(":") for item in spec.split(",") if item.strip()]
        return {int(batch): int(width) for batch, width in pairs}
    except ValueError:
        raise DFlashError(
            f"parameter 'verify_width': expected a width (8) or batch:width pairs (1:16,16:8), got {spec!r}"
        ) from None


def verify_width_arg(text: str) -> int | dict[int, int] | str:
    """argparse type of --verify-width: a width, batch:width pairs, or "tuned" (the tuning database's)."""
    if text == "tuned":
        return text
    try:
        return parse_verify_width(text)
    except DFlashError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_verify_width(parser, what: str = "") -> None:
    parser.add_argument(
        "--verify-width", type=verify_width_arg, default=None, help=f"{what}tokens verified per request and step: "
        "one width (8), by batch size (1:16,16:8), or tuned (what dflash-tune --runtime chose on the GPU profile); "
        "the drafter drafts its whole block (default: tuned on the batched runtime at the drafter's block, where the "
        "profile records a study of the model; else all of it)",
    )  # fmt: skip


def add_calibration(parser) -> None:
    parser.add_argument(
        "--calibration", help="--quant int4: prompts whose activations guide the quantizer (a prompt set: humaneval, "
        "gsm8k, mbpp, mt-bench, or a .jsonl of prompts); default: round to nearest",
    )  # fmt: skip
    parser.add_argument("--calibration-prompts", type=int, default=64, help="prompts of --calibration (default 64)")


def calibration_texts(args: argparse.Namespace) -> list[str] | None:
    """The texts of the --calibration prompts (None without the flag)."""
    if args.calibration is None:
        return None
    from ..benchmark.prompts import load_prompts

    return [p.text for p in load_prompts(args.calibration, args.calibration_prompts, "--calibration")]


def add_glue(parser) -> None:
    from ..codegen.inductor import GLUE_LOWERINGS

    parser.add_argument(
        "--glue", choices=GLUE_LOWERINGS, default="aten", help="batched runtime: the glue between the ops as "
        "ATen calls, or compiled by TorchInductor into fused regions (at each graph's first run)",
    )  # fmt: skip
