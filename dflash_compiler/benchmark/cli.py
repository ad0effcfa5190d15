"""`dflash-bench`: tokens/s, speedup over autoregressive decoding, acceptance length tau, per-position acceptance and
TTFT/TPOT percentiles on prompt sets, in process or against a running server, at several concurrencies."""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

import torch

from .. import __version__
from ..errors import DFlashError
from ..runtime.options import add_verify_width
from .prompts import PROMPT_SETS

BACKENDS = ("inprocess", "dflash", "vllm", "sglang")


def bench_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dflash-bench", description=__doc__)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument(
        "--backend",
        default="inprocess",
        choices=BACKENDS,
        help="inprocess: an Engine in this process (default); dflash: this project's server (OpenAI API); "
        "vllm: an OpenAI-compatible vLLM server; sglang: SGLang's native /generate",
    )
    g = p.add_argument_group("prompts")
    g.add_argument(
        "--prompts",
        default="humaneval",
        help=f"comma-separated prompt sets ({', '.join(PROMPT_SETS)}) or .jsonl files of "
        '{"prompt": ...} or {"messages": [...]} lines (default: humaneval)',
    )
    g.add_argument("--num-prompts", type=int, default=32, help="the first N prompts of them all (default 32)")
    g.add_argument("--chat", action="store_true", help="send prompts through the chat template (default: raw)")
    g.add_argument("--thinking", action="store_true", help="chat_template_kwargs enable_thinking (default off)")
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256, help="new tokens per request (default 256)")
    g.add_argument("--temperature", type=float, default=0.0, help="default 0: greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0: off")
    g = p.add_argument_group("run")
    g.add_argument("--concurrency", default="1", help="comma-separated request concurrencies (default 1)")
    g.add_argument("--no-ar", action="store_true", help="in process: skip the autoregressive baseline")
    g.add_argument("--no-warmup", action="store_true", help="skip the short uncounted requests before each run")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("-o", "--output", help="write the results as JSON to this path (plots go beside it)")
    g.add_argument("--plots", help="directory for the PNG plots (default: beside --output)")
    g = p.add_argument_group("in process")
    g.add_argument("--target", help="target checkpoint directory (default: the bundled tiny pair)")
    g.add_argument("--drafter", help="DFlash drafter directory (default with no --target: the bundled one)")
    g.add_argument(
        "--artifact", help="a compiled artifact directory (Engine.from_artifact); --target then names the AR baseline"
    )
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on CPU, else bf16)")
    g.add_argument(
        "--runtime",
        default="batched",
        choices=("auto", "eager", "batched"),
        help="batched (default) serves concurrent requests together; eager runs one at a time",
    )
    g.add_argument("--quant", default="bf16", choices=("bf16", "fp8", "int4"))
    g.add_argument("--block-size", type=int, default=None, help="draft block size (default: the drafter's)")
    add_verify_width(g, "DFlash, batched runtime: ")
    g.add_argument("--max-seq-len", type=int, default=None, help="batched runtime: prompt + new tokens per request")
    g = p.add_argument_group("server")
    g.add_argument("--base-url", help="the speculative (DFlash) server, e.g. http://127.0.0.1:8000")
    g.add_argument("--ar-base-url", help="a server of the target alone, for the speedup")
    g.add_argument("--model", help="OpenAI model name (default: the server's first)")
    g.add_argument("--api-key", help="bearer token for the server")
    g.add_argument("--tokenizer", help="sglang with --chat: directory of the tokenizer whose chat template to apply")
    g.add_argument("--timeout-s", type=float, default=3600.0, help="per request (default 3600)")
    return p


def bench_main(argv: list[str] | None = None) -> int:
    args = bench_parser().parse_args(argv)
    try:
        return _bench(args)
    except DFlashError as e:
        print(f"dflash-bench: error: {e}", file=sys.stderr)
        return 2


def parse_concurrency(text: str) -> list[int]:
    try:
        values = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise DFlashError(f"parameter '--concurrency' must be integers >= 1 separated by commas, got {text!r}")
    return sorted(dict.fromkeys(values))


def _check(args: argparse.Namespace) -> None:
    if args.num_prompts < 1:
        raise DFlashError(f"parameter '--num-prompts' must be >= 1, got {args.num_prompts}")
    if args.max_tokens < 1:
        raise DFlashError(f"parameter '--max-tokens' must be >= 1, got {args.max_tokens}")
    if args.backend == "inprocess":
        if args.base_url or args.ar_base_url:
            raise DFlashError("parameter '--base-url' needs a server backend (--backend dflash, vllm or sglang)")
        if args.artifact and args.drafter:
            raise DFlashError("parameter '--drafter': --artifact holds the pair (--target names the AR baseline)")
    elif not args.base_url:
        raise DFlashError(f"parameter '--base-url' is required with --backend {args.backend}")


def _device_name(args) -> str:
    """The device the numbers come from: the GPU in process on CUDA, else the host's CPU count (or the server)."""
    if args.backend != "inprocess":
        return f"server at {args.base_url}"
    if str(args.device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores)"


def _bench(args: argparse.Namespace) -> int:
    from .clients import Sampling
    from .prompts import load_prompts
    from .report import add_speedups, print_table, write_json, write_plots
    from .runner import run_benchmark

    _check(args)
    concurrencies = parse_concurrency(args.concurrency)
    prompts = load_prompts(args.prompts, args.num_prompts)
    sampling = Sampling(args.max_tokens, args.temperature, args.top_p, args.top_k)
    modes = _in_process_modes(args, concurrencies) if args.backend == "inprocess" else _server_modes(args)
    rows = run_benchmark(modes, prompts, sampling, concurrencies, not args.no_warmup, not args.no_progress)
    add_speedups(rows)
    print_table(rows)
    doc = {
        "benchmark": "dflash-bench",
        "version": __version__,
        "date": datetime.date.today().isoformat(),
        "device": _device_name(args),
        "backend": args.backend,
        "model": _model_name(args),
        "prompts": args.prompts,
        "chat": args.chat,
        "num_prompts": len(prompts),
        "sampling": vars(sampling),
        "concurrency": concurrencies,
        "rows": rows,
    }
    if args.output:
        print(f"results: {write_json(args.output, doc)}", file=sys.stderr)
    plots = args.plots or (Path(args.output).parent if args.output else None)
    if plots is not None:
        stem = Path(args.output).stem if args.output else "dflash-bench"
        for path in write_plots(rows, plots, stem):
            print(f"plot: {path}", file=sys.stderr)
    return 0


def _pair(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """The in-process target and drafter: with no --target, the bundled tiny pair (its drafter unless named)."""
    from ..runtime.engine import DEFAULT_PAIR

    if args.target:
        return Path(args.target), Path(args.drafter) if args.drafter else None
    return DEFAULT_PAIR / "target", Path(args.drafter) if args.drafter else DEFAULT_PAIR / "drafter"


def _model_name(args: argparse.Namespace) -> str:
    if args.backend != "inprocess":
        return args.model or args.base_url
    if args.artifact:
        return args.artifact
    return " + ".join(str(p) for p in _pair(args) if p is not None)


def _in_process_modes(args: argparse.Namespace, concurrencies: list[int]):
    from ..runtime.engine import Engine
    from .clients import InProcessBackend

    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    load = dict(
        device=args.device,
        dtype=dtype,
        block_size=args.block_size,
        runtime=args.runtime,
        quant=args.quant,
        max_batch=max(concurrencies),
        max_seq_len=args.max_seq_len,
    )

    def backend(engine):
        return InProcessBackend(engine, args.chat, args.thinking)

    if args.artifact:
        # the autoregressive baseline is the target alone, named with --target
        modes = [("ar", lambda: backend(Engine.from_pretrained(args.target, None, **load)))] if args.target else []
        return [*modes, ("dflash", lambda: backend(Engine.from_artifact(args.artifact)))]
    target, drafter = _pair(args)
    if drafter is None and args.no_ar:
        raise DFlashError("parameter '--no-ar' leaves nothing to run: name a --drafter")
    modes = [] if args.no_ar else [("ar", lambda: backend(Engine.from_pretrained(target, None, **load)))]
    if drafter is not None:
        speculative = dict(load, verify_width=args.verify_width)
        modes.append(("dflash", lambda: backend(Engine.from_pretrained(target, drafter, **speculative))))
    return modes


def _server_modes(args: argparse.Namespace):
    from .clients import OpenAIBackend, SGLangBackend

    tokenizer = None
    if args.backend == "sglang" and args.chat:
        if not args.tokenizer:
            raise DFlashError("parameter '--tokenizer' is required with --backend sglang --chat (its chat template)")
        from ..runtime.engine import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)

    def backend(url: str):
        if args.backend == "sglang":
            return SGLangBackend(url, tokenizer, args.chat, args.thinking, args.timeout_s, args.api_key)
        return OpenAIBackend(
            url, args.model, args.api_key, args.chat, args.thinking, args.timeout_s, args.backend == "vllm"
        )

    modes = [("ar", lambda: backend(args.ar_base_url))] if args.ar_base_url else []
    return [*modes, ("dflash", lambda: backend(args.base_url))]


if __name__ == "__main__":
    sys.exit(bench_main())
