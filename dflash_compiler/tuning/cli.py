"""dflash-tune: Optuna studies of a model's kernel calls (and optionally its runtime knobs) on this machine, with
the winners written to the hardware profile's tuning database.

    dflash-tune --gpu sm90 --quant fp8 --shapes qwen3.5-27b --trials 100 --storage tune-sm90.journal
    dflash-tune --gpu cpu --shapes tiny --ops target.mlp.down --trials 2 --storage /tmp/t.journal   (CI scale)

On the CPU the Triton kernels run through Triton's interpreter and the entries are marked as CPU timings.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import warnings
from pathlib import Path


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    from .spaces import ATTENTION_CONTEXT

    p = argparse.ArgumentParser(prog="dflash-tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", default="auto", help="hardware profile: sm80, sm90, sm100, sm120, cpu or auto")
    p.add_argument("--quant", default="bf16", choices=("bf16", "fp8", "int4"))
    p.add_argument("--target", help="target checkpoint directory (its config.json gives the shapes)")
    p.add_argument("--drafter", help="drafter checkpoint directory")
    p.add_argument("--shapes", choices=("qwen3.5-27b", "tiny"), help="a preset pair instead of --target/--drafter")
    p.add_argument("--trials", type=int, default=50, help="measured configs per call (default 50)")
    p.add_argument("--storage", required=True, help="Optuna storage: a journal file, or SQLite for .db/.sqlite")
    p.add_argument("--ops", nargs="*", help="op families or call names to tune (default: all)")
    p.add_argument("--batches", type=_int_list, default=[1, 16], help="batch sizes of the kernel calls (1,16)")
    p.add_argument(
        "--block-size", type=int, help="tokens per request in each call (default: the drafter's block; 1: the rows of "
        "autoregressive decoding)",
    )  # fmt: skip
    p.add_argument("--context", type=int, default=ATTENTION_CONTEXT,
                   help=f"context length of the attention calls (default {ATTENTION_CONTEXT}: the one the compiler "
                   "takes attention configs from)")  # fmt: skip
    p.add_argument("--prefill-chunk", type=int, default=512, help="prefill chunk of the prefill calls (0: none)")
    p.add_argument(
        "--runtime", action="store_true", help="also run the runtime study: on the checkpoints' weights and real "
        "acceptance, or on random weights at a preset's shapes with --acceptance-profile",
    )  # fmt: skip
    p.add_argument(
        "--acceptance-profile", help="simulate the acceptance of a published profile in the runtime study "
        "(humaneval_bf16_vllm, humaneval_fp8_vllm, gsm8k_fp8_h100_vllm)",
    )  # fmt: skip
    p.add_argument("--runtime-only", action="store_true", help="the runtime study alone, no kernel studies")
    p.add_argument("--runtime-trials", type=int, default=10)
    p.add_argument("--concurrency", type=_int_list, default=[1, 2], help="runtime study levels (1,2)")
    p.add_argument("--widths", type=_int_list, help="verify widths the runtime study tries (default 1,2,4,8,12,16)")
    p.add_argument(
        "--graph-buckets",
        type=lambda v: v.split(","),
        help="CUDA-graph bucket sets the runtime study tries, of default,pow2,fine (default: all)",
    )
    p.add_argument("--max-new-tokens", type=int, help="tokens per request in the runtime study (default 32; with "
                   "--steady-steps, enough for the warm-up and the timed steps at the whole block)")  # fmt: skip
    p.add_argument("--steady-steps", type=int, default=0, help="runtime study objective: the decoding rate of a full "
                   "batch over this many timed steps, without prefill or tail (default 0: requests served to "
                   "completion, prefill included)")  # fmt: skip
    p.add_argument("--db", help="directory holding the profiles' databases (default: the package's hw_profiles/)")
    p.add_argument("--plots", help="directory for the PNG plots (default: next to the storage)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--compile-workers", type=int, help="processes compiling each batch of configs before it is timed "
        "(default on a GPU: one per CPU core up to 8; 0: compile each config as it is timed)",
    )  # fmt: skip
    return p


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _save_study_plots(study, directory: Path) -> list[Path]:
    """Optimisation history and parameter importances of a study, as PNG; importances need two or more complete
    trials that differ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances

    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's matplotlib plots are marked experimental
        for suffix, plot in (("history", plot_optimization_history), ("importance", plot_param_importances)):
            try:
                ax = plot(study)
            except (ValueError, RuntimeError, ZeroDivisionError) as e:
                print(f"{study.study_name}: no {suffix} plot ({e})", file=sys.stderr)
                continue
            path = directory / f"{_slug(study.study_name)}-{suffix}.png"
            ax.figure.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(ax.figure)
            written.append(path)
    return written


def _save_runtime_plot(table: dict[int, dict[int, float]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for width in sorted({w for row in table.values() for w in row}):
        points = sorted((c, row[width]) for c, row in table.items() if width in row)
        ax.plot([c for c, _ in points], [v for _, v in points], marker="o", label=f"width {width}")
    ax.set_xlabel("concurrency")
    ax.set_ylabel("tokens/s")
    ax.set_title(title)
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _fmt_us(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _summary(rows) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="dflash-tune: time per call (us)")
    for col in ("call", "op", "shape", "fmt", "lowering", "default", "tuned", "torch", "vs default", "trials"):
        table.add_column(col, justify="right" if col in ("default", "tuned", "torch", "vs default") else "left")
    for name, e in rows:
        gain = f"{e.default_time_us / e.time_us:.2f}x" if e.time_us and e.default_time_us else "-"
        table.add_row(
            name, e.op, e.shape_key, e.fmt, e.lowering if e.tuned else f"{e.lowering} (untuned)",
            _fmt_us(e.default_time_us), _fmt_us(e.time_us), _fmt_us(e.torch_time_us), gain, str(e.trials),
        )  # fmt: skip
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        # the interpreter is chosen when a kernel is decorated: before any kernel module is imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from ..errors import DFlashError

    try:
        return _run(args)
    except DFlashError as e:
        print(f"dflash-tune: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import torch
    from tqdm import tqdm

    from ..errors import DFlashError
    from ..hw_profiles import load_profile, profile_for_device
    from ..hw_profiles.database import TuningDB
    from ..models.config import DrafterConfig, TargetConfig
    from .kernels import environment, tune_call
    from .precompile import Precompiler
    from .shapes import model_calls, preset_dirs, select
    from .study import open_storage

    profile = load_profile(args.gpu)
    if profile.is_cuda:
        if not torch.cuda.is_available():
            raise DFlashError(f"parameter 'gpu': profile {profile.name} needs its GPU, and CUDA is not available")
        here = profile_for_device(torch.cuda.get_device_properties(torch.cuda.current_device()))
        if here.name != profile.name:
            raise DFlashError(f"parameter 'gpu': this machine's {here.device.name} is profile {here.name}")
        profile = here
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if args.trials < 1:
        raise DFlashError(f"parameter 'trials' must be >= 1, got {args.trials}")
    if args.drafter and not args.target:
        raise DFlashError("parameter 'drafter': --drafter needs --target")
    if args.target is not None and args.shapes is not None:
        raise DFlashError("parameter 'shapes': give either --shapes or --target/--drafter, not both")
    target_dir, drafter_dir = (args.target, args.drafter) if args.target else preset_dirs(args.shapes or "tiny")
    if args.runtime and drafter_dir is None:
        raise DFlashError("parameter 'runtime': the runtime study needs a drafter (--drafter, or --shapes)")
    if args.runtime_only and not args.runtime:
        raise DFlashError("parameter 'runtime-only': it needs --runtime")
    if args.steady_steps < 0:
        raise DFlashError(f"parameter 'steady-steps' must be >= 0, got {args.steady_steps}")
    if args.acceptance_profile is not None:
        from .runtime import acceptance_profiles

        known = acceptance_profiles()
        if args.acceptance_profile not in known:
            raise DFlashError(
                f"parameter 'acceptance-profile': {args.acceptance_profile!r} is not one of {', '.join(known)}"
            )
    if args.runtime and not any(Path(target_dir).glob("*.safetensors")) and args.acceptance_profile is None:
        raise DFlashError(
            "parameter 'runtime': without checkpoint weights the study runs random weights, which need "
            "--acceptance-profile"
        )
    target_cfg = TargetConfig.from_dir(target_dir)
    drafter_cfg = DrafterConfig.from_dir(drafter_dir) if drafter_dir else None
    act = "bf16" if profile.is_cuda else "fp32"
    if args.block_size is not None and not 1 <= args.block_size <= (drafter_cfg.block_size if drafter_cfg else 1):
        limit = drafter_cfg.block_size if drafter_cfg else 1
        raise DFlashError(f"parameter 'block-size' must be in 1..{limit}, got {args.block_size}")
    calls = model_calls(
        target_cfg, drafter_cfg, args.quant, act, args.batches, args.context, block_size=args.block_size,
        prefill_chunk=args.prefill_chunk,
    )  # fmt: skip
    calls = [] if args.runtime_only else select(calls, args.ops)
    storage = open_storage(args.storage)
    plots = Path(args.plots) if args.plots else Path(args.storage).with_name(Path(args.storage).stem + "-plots")
    plots.mkdir(parents=True, exist_ok=True)
    db = TuningDB.load(profile, args.db)

    workers = args.compile_workers
    if workers is None:
        workers = min(8, (os.cpu_count() or 1) - 1) if profile.is_cuda else 0  # the interpreter compiles nothing
    if workers < 0:
        raise DFlashError(f"parameter 'compile-workers' must be >= 0, got {workers}")

    rows = []
    bar = tqdm(total=len(calls) * args.trials, desc="dflash-tune", unit="trial")
    with Precompiler(workers, profile, device, args.seed) if workers else contextlib.nullcontext() as precompiler:
        for call in calls:
            bar.set_postfix_str(f"{call.name} {call.shape.key} {call.shape.fmt}")
            entry, study = tune_call(
                call.shape, profile, storage, args.trials, device, seed=args.seed, progress=lambda t: bar.update(1),
                previous=db.lookup(*call.id), precompiler=precompiler,
            )  # fmt: skip
            db.record(entry)
            db.save()  # after every call: an interrupted run keeps the winners so far
            _save_study_plots(study, plots)
            rows.append((call.name, entry))
    bar.close()
    if rows:
        _summary(rows)

    if args.runtime:
        _runtime(args, profile, device, target_dir, drafter_dir, drafter_cfg, storage, plots, db, environment)
    print(f"database: {db.directory}; plots: {plots}")
    return 0


def _runtime(args, profile, device, target_dir, drafter_dir, drafter_cfg, storage, plots, db, environment) -> None:
    import json

    import torch

    from ..hw_profiles.database import Entry
    from ..models.config import TargetConfig
    from ..runtime.engine import DEFAULT_PAIR, load_tokenizer
    from .choice import runtime_model_key
    from .runtime import (
        DEFAULT_PREFILL_CHUNK,
        PREFILL_CHUNKS,
        STEADY_WARMUP,
        RuntimeSpace,
        acceptance_profiles,
        checkpoint_models,
        chosen_config,
        pair_throughput,
        random_models,
        runtime_study,
        widths_table,
    )

    dtype = "bfloat16" if profile.is_cuda else "float32"
    target_cfg = TargetConfig.from_dir(target_dir)
    profile_rates = None
    if args.acceptance_profile is not None:
        profile_rates = acceptance_profiles()[args.acceptance_profile]["per_position"]
    if any(Path(target_dir).glob("*.safetensors")):
        models = checkpoint_models(target_dir, drafter_dir, str(device), dtype)
        tok = load_tokenizer(target_dir)
        lines = (DEFAULT_PAIR / "heldout_prompts.jsonl").read_text().splitlines()
        prompts = [tok.encode(json.loads(line)["prompt"], add_special_tokens=False)[:64] for line in lines[:8]]
    else:  # random weights at the preset's shapes: random prompts (what they say does not matter)
        models = random_models(target_cfg, drafter_cfg, str(device), dtype)
        gen = torch.Generator().manual_seed(args.seed)
        prompts = [torch.randint(0, target_cfg.vocab_size, (64,), generator=gen).tolist() for _ in range(8)]
    max_new = args.max_new_tokens
    if max_new is None:
        max_new = (STEADY_WARMUP + args.steady_steps + 1) * drafter_cfg.block_size if args.steady_steps else 32
    throughput = pair_throughput(
        models, prompts, max_new_tokens=max_new, max_batch=max(args.concurrency), quant=args.quant,
        acceptance_profile=profile_rates, max_seq_len=64 + max_new + 2 * drafter_cfg.block_size,
        steady_steps=args.steady_steps,
    )  # fmt: skip
    # a steady measurement times no prefill: the chunk stays the default
    chunks = (DEFAULT_PREFILL_CHUNK,) if args.steady_steps else PREFILL_CHUNKS
    space = RuntimeSpace(args.concurrency, drafter_cfg.block_size, args.widths, args.graph_buckets, chunks)
    model = runtime_model_key(target_cfg)
    name = f"{profile.name}:runtime:{model}:{args.quant}"
    study = runtime_study(
        space, throughput, storage=storage, study_name=name, n_trials=args.runtime_trials, seed=args.seed
    )
    chosen, chosen_value = chosen_config(study, space, max(args.concurrency))
    default = next((t for t in study.trials if t.user_attrs.get("default") and t.value is not None), None)
    table = widths_table(study, space)
    db.record(
        Entry(
            op="runtime",
            shape_key=f"{model}_c{'-'.join(map(str, space.concurrencies))}",
            fmt=args.quant,
            lowering="triton" if profile.is_cuda else "reference",
            config=chosen.as_dict(),
            tuned=True,
            trials=len(study.trials),
            metrics={
                "tokens_per_s": chosen_value,
                "steady_steps": args.steady_steps,  # 0: requests served to completion
                **({"default_tokens_per_s": default.value} if default is not None else {}),
                **{f"tokens_per_s_c{c}_w{w}": v for c, row in table.items() for w, v in row.items()},
            },
            **environment(device),
        )
    )
    db.save()
    _save_study_plots(study, plots)
    _save_runtime_plot(table, plots / f"{_slug(name)}-tokens-per-s.png", name)
    for c, row in table.items():
        width = chosen.width(c)
        alts = ", ".join(f"width {w}: {v:.1f}" for w, v in sorted(row.items()))
        print(f"concurrency {c}: width {width} chosen; tokens/s {alts}")


def tune_main() -> None:
    sys.exit(main())


if __name__ == "__main__":  # python -m dflash_compiler.tuning.cli, where the console script is not installed
    tune_main()
