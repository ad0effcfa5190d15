"""`dflash-generate`: generate from a target (and DFlash drafter) checkpoint, streaming text, then tau and speed."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .. import __version__
from ..errors import DFlashError
from .options import add_calibration, add_glue, add_verify_width, calibration_texts

# Below this many bytes of checkpoint a model's matrices are too small for torch's intra-op threads to pay for
# their synchronisation (on a busy 2-core host the tiny pair ran 4-15x slower with the default thread count).
SMALL_MODEL_BYTES = 256 << 20


def generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dflash-generate", description=__doc__)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--target", help="target checkpoint directory (default: the bundled tiny pair)")
    p.add_argument(
        "--artifact",
        help="run a dflash-compile artifact directory instead of compiling a checkpoint (its device profile, weights, "
        "quantization and shapes are the artifact's)",
    )
    p.add_argument(
        "--no-strict",
        action="store_true",
        help="with --artifact: let Triton compile a kernel the artifact lacks instead of failing",
    )
    p.add_argument(
        "--drafter",
        help="DFlash drafter checkpoint directory, or 'none' to run the target alone "
        "(default: the bundled drafter when --target is omitted, else none)",
    )
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="prompt text")
    prompts.add_argument(
        "--prompts-file",
        help="several prompts for one model load: one prompt per line, or a .jsonl of {'prompt'} / {'messages'} lines",
    )
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--system", help="system prompt (with --chat)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--stop", action="append", default=[], metavar="STR", help="stop at this text (repeatable)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--block-size", type=int, default=None, help="draft block size (default: the drafter's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument(
        "--dtype",
        default=None,
        help="float32 (fp32), bfloat16 (bf16) or float16 (fp16, half) (default: float32 on CPU, else bfloat16)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default on CPU: 1 for models under 256 MB, else one per available core)",
    )
    p.add_argument("--seed", type=int, default=None, help="sampling seed (eager runtime)")
    p.add_argument(
        "--runtime",
        default="auto",
        choices=("auto", "eager", "batched"),
        help="batched: CUDA graphs and Triton kernels (the default on CUDA); eager: the reference loop",
    )
    p.add_argument(
        "--quant",
        default="none",
        choices=("none", "bf16", "fp8", "int4"),
        help="convert the weights at load (batched runtime); none (or bf16): the weights as loaded",
    )
    add_verify_width(p, "batched runtime: ")
    add_calibration(p)
    add_glue(p)
    p.add_argument("--baseline", action="store_true", help="also run the target alone and report the speedup")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of streaming text")
    return p


def generate_main(argv: list[str] | None = None) -> int:
    args = generate_parser().parse_args(argv)
    try:
        return _generate(args)
    except DFlashError as e:
        print(f"dflash-generate: error: {e}", file=sys.stderr)
        return 2


def read_prompts_file(path: str | Path, chat: bool, system: str | None) -> list[tuple[str | list[dict], bool]]:
    """(prompt, chat) pairs from a file: a .jsonl of {"prompt": str} or {"messages": [...]} lines, or any other
    file with one prompt per line (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise DFlashError(f"parameter 'prompts_file': {path} does not exist or is not a file")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            out.append(chat_prompt(line, chat, system))
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            raise DFlashError(f"{path}: line {n} is not valid JSON") from None
        if isinstance(item, dict) and isinstance(item.get("messages"), list) and item["messages"]:
            messages = item["messages"]
            has_system = any(isinstance(m, dict) and m.get("role") == "system" for m in messages)
            out.append(
                ([{"role": "system", "content": system}, *messages] if system and not has_system else messages, True)
            )
        elif isinstance(item, dict) and isinstance(item.get("prompt"), str) and item["prompt"]:
            out.append(chat_prompt(item["prompt"], chat, system))
        else:
            raise DFlashError(f"{path}: line {n} needs a non-empty 'prompt' string or 'messages' list")
    if not out:
        raise DFlashError(f"{path}: no prompts")
    return out


def chat_prompt(text: str, chat: bool, system: str | None) -> tuple[str | list[dict], bool]:
    """The prompt as the Engine takes it: the text itself, or chat messages with the system prompt first."""
    if not text:
        raise DFlashError("parameter 'prompt' is empty")
    if not chat:
        return text, False
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}], True


def default_threads(checkpoint_bytes: int, cores: int) -> int:
    return 1 if checkpoint_bytes < SMALL_MODEL_BYTES else max(1, cores)


def _available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _set_threads(requested: int | None, directories: list[Path]) -> None:
    import torch

    from ..models.loader import checkpoint_files

    if requested is None:
        size = sum(f.stat().st_size for d in directories for f in checkpoint_files(d))
        requested = default_threads(size, _available_cores())
    torch.set_num_threads(requested)


def _generate(args: argparse.Namespace) -> int:
    from .engine import DEFAULT_PAIR, Engine, check_device

    if args.threads is not None and args.threads < 1:
        raise DFlashError(f"parameter 'threads' must be >= 1, got {args.threads}")
    if args.system is not None and not args.chat:
        raise DFlashError("parameter 'system' needs --chat (a system prompt goes into the chat template)")
    if args.prompts_file is not None:
        prompts = read_prompts_file(args.prompts_file, args.chat, args.system)
    else:
        prompts = [chat_prompt(args.prompt, args.chat, args.system)]
    device = check_device(args.device)
    if args.artifact is not None:
        return _run_prompts(_artifact_engine(args), prompts, args, None)
    target = Path(args.target) if args.target is not None else DEFAULT_PAIR / "target"
    if args.drafter == "none":
        drafter = None
    elif args.drafter is not None:
        drafter = Path(args.drafter)
    else:
        drafter = DEFAULT_PAIR / "drafter" if args.target is None else None
    dtype = args.dtype or ("float32" if device.type == "cpu" else "bfloat16")
    load = dict(device=args.device, dtype=dtype, runtime=args.runtime, quant=args.quant, glue=args.glue)
    load["calibration"] = calibration_texts(args)
    engine = Engine.from_pretrained(target, drafter, block_size=args.block_size, verify_width=args.verify_width, **load)
    if device.type == "cpu" or args.threads is not None:
        _set_threads(args.threads, [target] + ([drafter] if drafter is not None else []))
    baseline = (target, load) if args.baseline and drafter is not None else None
    return _run_prompts(engine, prompts, args, baseline)


def _artifact_engine(args: argparse.Namespace):
    import torch

    from .engine import Engine

    given = [f"--{n.replace('_', '-')}" for n in ("target", "drafter", "dtype", "block_size") if getattr(args, n)]
    given += [flag for flag, on in (("--baseline", args.baseline), ("--quant", args.quant != "none")) if on]
    given += ["--runtime"] if args.runtime != "auto" else []
    given += ["--glue"] if args.glue != "aten" else []
    if given:
        raise DFlashError(f"parameter 'artifact': {given[0]} does not apply (the artifact fixes the models and shapes)")
    engine = Engine.from_artifact(args.artifact, device=args.device, strict=not args.no_strict)
    if engine.artifact.compiled.device.type == "cpu" or args.threads is not None:
        weights = Path(args.artifact) / engine.artifact.manifest["weights"]["file"]
        torch.set_num_threads(args.threads or default_threads(weights.stat().st_size, _available_cores()))
    return engine


def _run_prompts(engine, prompts: list, args: argparse.Namespace, baseline: tuple | None) -> int:
    from .speculative import GenerationStats

    kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
    )
    results = []  # GenerationResult per prompt (--json), else the streamed request's stats
    for prompt, chat in prompts:
        if args.json:
            results.append(engine.generate(prompt, chat=chat, **kwargs))
            continue
        stats = GenerationStats()
        for piece in engine.stream(prompt, chat=chat, stats=stats, **kwargs):
            print(piece, end="", flush=True)
        print()
        results.append(stats)
    baselines = _baseline(engine, *baseline, prompts, kwargs) if baseline is not None else None
    for i, result in enumerate(results):
        base = baselines[i] if baselines else None
        if args.json:
            doc = {"prompt": prompts[i][0], "token_ids": result.token_ids, "text": result.text}
            doc.update(finish_reason=result.finish_reason, **result.stats.as_dict())
            if base is not None:
                doc["baseline_tokens_per_s"] = base.tokens_per_s
            print(json.dumps(doc))
            continue
        label = f"prompt {i + 1}: " if len(prompts) > 1 else ""
        print(_stats_line(label, result, base), file=sys.stderr)
        if result.limit_note:
            print(f"note: {label}{result.limit_note}", file=sys.stderr)
    engine.close()
    return 0


def _stats_line(label: str, stats, base) -> str:
    if not stats.acceptance_lengths:
        return f"[{label}{stats.generated_tokens} token: generation ended at the first token, no verify step ran]"
    line = (
        f"[{label}{stats.generated_tokens} tokens, block {stats.block_size}, acceptance length tau = "
        f"{stats.acceptance_length:.2f}, {stats.tokens_per_s:.1f} tokens/s"
    )
    if base is not None:
        speedup = stats.tokens_per_s / base.tokens_per_s if base.tokens_per_s else float("nan")
        line += f"; autoregressive {base.tokens_per_s:.1f} tokens/s, speedup {speedup:.2f}x"
    return line + "]"


def _baseline(engine, target: Path, load: dict, prompts: list, kwargs: dict) -> list:
    """The same requests with block size 1: plain autoregressive decoding, through the same loop (eager) or the
    same batched runtime on a fresh copy of the target (the batched engine owns its weights; it is closed first
    so that both never hold GPU memory at once). Returns each request's stats."""
    from .engine import Engine

    if engine.runtime == "eager":
        alone = Engine(engine.target, None, engine.tokenizer, runtime="eager")
    else:
        engine.close()
        alone = Engine.from_pretrained(target, None, **load)
    stats = [alone.generate(prompt, chat=chat, **kwargs).stats for prompt, chat in prompts]
    alone.close()
    return stats
