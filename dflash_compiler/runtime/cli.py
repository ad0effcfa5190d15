"""`dflash-generate`: generate from a target (and DFlash drafter) checkpoint, streaming text, then tau and speed."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import DFlashError


def generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dflash-generate", description=__doc__)
    p.add_argument("--target", help="target checkpoint directory (default: the bundled tiny pair)")
    p.add_argument("--drafter", help="DFlash drafter checkpoint directory (omit to run the target alone)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--block-size", type=int, default=None, help="draft block size (default: the drafter's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on CPU, else bf16)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (eager runtime)")
    p.add_argument(
        "--runtime",
        default="auto",
        choices=("auto", "eager", "batched"),
        help="batched: CUDA graphs and Triton kernels (the default on CUDA); eager: the reference loop",
    )
    p.add_argument(
        "--quant",
        default="bf16",
        choices=("bf16", "fp8", "int4"),
        help="weight format, converted at load (batched runtime)",
    )
    p.add_argument("--baseline", action="store_true", help="also run the target alone and report the speedup")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    return p


def generate_main(argv: list[str] | None = None) -> int:
    args = generate_parser().parse_args(argv)
    try:
        return _generate(args)
    except DFlashError as e:
        print(f"dflash-generate: error: {e}", file=sys.stderr)
        return 2


def _generate(args: argparse.Namespace) -> int:
    from .engine import Engine
    from .speculative import GenerationStats

    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    engine = Engine.from_pretrained(
        args.target, args.drafter, args.device, dtype, args.block_size, runtime=args.runtime, quant=args.quant
    )
    load = dict(device=args.device, dtype=dtype, runtime=args.runtime, quant=args.quant)
    kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        chat=args.chat,
        seed=args.seed,
    )
    if args.json:
        result = engine.generate(args.prompt, **kwargs)
        doc = {
            "token_ids": result.token_ids,
            "text": result.text,
            "finish_reason": result.finish_reason,
            **result.stats.as_dict(),
        }
        if args.baseline:
            doc["baseline_tokens_per_s"] = _baseline(engine, args, load, kwargs).tokens_per_s
        print(json.dumps(doc))
        return 0
    stats = GenerationStats()
    for piece in engine.stream(args.prompt, stats=stats, **kwargs):
        print(piece, end="", flush=True)
    print()
    line = (
        f"[{stats.generated_tokens} tokens, block {stats.block_size}, acceptance length tau = "
        f"{stats.acceptance_length:.2f}, {stats.tokens_per_s:.1f} tokens/s"
    )
    if args.baseline and engine.drafter is not None:
        base = _baseline(engine, args, load, kwargs)
        speedup = stats.tokens_per_s / base.tokens_per_s if base.tokens_per_s else float("nan")
        line += f"; autoregressive {base.tokens_per_s:.1f} tokens/s, speedup {speedup:.2f}x"
    print(line + "]", file=sys.stderr)
    return 0


def _baseline(engine, args: argparse.Namespace, load: dict, kwargs: dict):
    """The same request with block size 1: plain autoregressive decoding, through the same loop (eager) or the
    same batched runtime on a fresh copy of the target (the batched engine owns its weights; it is closed first
    so that both never hold GPU memory at once)."""
    from .engine import DEFAULT_PAIR, Engine
    from .speculative import GenerationStats

    stats = GenerationStats()
    if engine.runtime == "eager":
        alone = Engine(engine.target, None, engine.tokenizer, runtime="eager")
    else:
        engine.close()
        alone = Engine.from_pretrained(args.target or DEFAULT_PAIR / "target", None, **load)
    for _ in alone.stream_tokens(args.prompt, stats=stats, **kwargs):
        pass
    alone.close()
    return stats
