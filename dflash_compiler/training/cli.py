"""`dflash-train-drafter`: train a DFlash drafter for a target checkpoint on the target's own continuations."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .. import __version__
from ..errors import DFlashError


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dflash-train-drafter", description=__doc__)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--target", required=True, help="target checkpoint directory (with its tokenizer)")
    p.add_argument("--prompts", required=True, help=".jsonl of {'prompt'} / {'messages'} lines, or a directory of text")
    p.add_argument("-o", "--output", required=True, help="output directory for the drafter (and checkpoint.pt)")
    p.add_argument("--drafter-config", help="JSON file of config.json fields to override (sizes, layer_types, ...)")
    p.add_argument(
        "--init",
        help="start from this drafter directory's weights and config (fine-tuning: after a change of the target's "
        "features, or on new prompts); its sizes replace --num-layers, --block-size and --target-layer-ids",
    )
    p.add_argument("--num-layers", type=int, default=5)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--target-layer-ids", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--mask-token-id", type=int, default=None, help="default: the tokenizer's <|mask|> or mask token")
    p.add_argument("--chat", action="store_true", help="wrap plain prompts in the chat template")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per training sequence")
    p.add_argument(
        "--min-prompt-len",
        type=int,
        default=None,
        help="also keep prompts of this many tokens up to --prompt-len as they are, continued for longer so every "
        "sequence has prompt-len + response-len tokens (default: only prompts of --prompt-len tokens)",
    )
    p.add_argument("--response-len", type=int, default=96, help="target-generated tokens per training sequence")
    p.add_argument("--max-prompts", type=int, default=None)
    p.add_argument(
        "--held-out", type=float, default=0.05, help="fraction of sequences kept for the tau estimate, in [0, 1)"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="sample continuations instead of greedy")
    p.add_argument("--sequences", help="file of generated training sequences: read if it exists, else written")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument(
        "--minutes", type=float, default=None, help="size the step count to this training time (overrides --steps)"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--gen-batch-size", type=int, default=128)
    p.add_argument("--anchors", type=int, default=8, help="blocks per sequence per step")
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--gamma", type=float, default=None, help="loss decay (default: 7 for B=16, 5 for 10, 4 for 8)")
    p.add_argument(
        "--distill",
        type=float,
        default=0.0,
        help="weight of KL(target || drafter) against the target's logits, mixed with the hard-label loss (0..1)",
    )
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument(
        "--eval-decode",
        type=int,
        default=0,
        help="at each evaluation, also decode this many held-out prompts for the real acceptance length",
    )
    p.add_argument("--eval-decode-tokens", type=int, default=None, help="tokens per decoded prompt (--response-len)")
    p.add_argument("--eval-prompts", help="prompts to decode instead of held-out ones (.jsonl or .npy)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="target dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true")
    return p


def default_gamma(block_size: int) -> float:
    return {16: 7.0, 10: 5.0, 8: 4.0}.get(block_size, max(1.0, block_size * 7 / 16))


def train_main(argv: list[str] | None = None) -> int:
    args = train_parser().parse_args(argv)
    try:
        train_drafter(args)
    except DFlashError as e:
        print(f"dflash-train-drafter: error: {e}", file=sys.stderr)
        return 2
    return 0


def mask_token_from(tokenizer, given: int | None, target_path: str) -> int:
    if given is not None:
        return given
    if getattr(tokenizer, "mask_token_id", None) is not None:
        return tokenizer.mask_token_id
    mask = tokenizer.convert_tokens_to_ids("<|mask|>")
    if isinstance(mask, int) and mask != tokenizer.unk_token_id and mask is not None:
        return mask
    raise DFlashError(f"{target_path}: the tokenizer has no mask token; pass --mask-token-id")


def train_drafter(args: argparse.Namespace) -> dict:
    from ..models.loader import load_target
    from ..runtime.engine import check_device, load_tokenizer
    from ..runtime.sampling import SamplingParams
    from .data import SequenceSet, build_sequences, read_prompts
    from .drafter import DrafterTrainer, TrainConfig, drafter_config_dict

    if not 0.0 <= args.held_out < 1.0:
        raise DFlashError(f"parameter 'held_out' must be a fraction in [0, 1), got {args.held_out}")
    check_device(args.device)
    torch.manual_seed(args.seed)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    target = load_target(args.target, device=args.device, dtype=dtype)
    for p in target.parameters():
        p.requires_grad_(False)
    tokenizer = load_tokenizer(args.target)
    overrides = {}
    if args.drafter_config:
        try:
            overrides = json.loads(Path(args.drafter_config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DFlashError(f"{args.drafter_config}: cannot read drafter config overrides ({e})") from None
    from ..models.config import DrafterConfig, read_config_json
    from ..models.loader import check_drafter_fits, load_drafter

    initial = None
    if args.init:
        if args.drafter_config:
            raise DFlashError("parameters 'init' and 'drafter_config' exclude each other: --init keeps its config")
        initial = load_drafter(args.init, target.cfg, device=args.device)
        cfg_dict = read_config_json(args.init)[1]
        cfg_dict.pop("quantization_config", None)
    else:
        cfg_dict = drafter_config_dict(
            target.cfg,
            mask_token_from(tokenizer, args.mask_token_id, args.target),
            args.block_size,
            args.num_layers,
            args.target_layer_ids,
            overrides,
        )
    drafter_cfg = DrafterConfig.from_dict(cfg_dict, Path("drafter config"))
    check_drafter_fits(drafter_cfg, target.cfg, Path("drafter config"))
    if args.min_prompt_len is not None and args.min_prompt_len < 1:
        raise DFlashError(f"parameter 'min_prompt_len' must be >= 1, got {args.min_prompt_len}")
    if not 0.0 <= args.distill <= 1.0:
        raise DFlashError(f"parameter 'distill' must be in [0, 1], got {args.distill}")
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    meta = {
        "target": str(Path(args.target).resolve()),
        "prompts": str(Path(args.prompts).resolve()),
        "max_prompts": args.max_prompts,
        "prompt_len": args.prompt_len,
        "response_len": args.response_len,
        "temperature": args.temperature,
        "chat": args.chat,
        "seed": args.seed,
    }
    if args.min_prompt_len is not None:
        meta["min_prompt_len"] = args.min_prompt_len
    if args.sequences and Path(args.sequences).is_file():
        seqs = SequenceSet.load(args.sequences, meta)
    else:
        prompts = read_prompts(args.prompts, tokenizer, args.prompt_len, args.chat)[: args.max_prompts]
        bar = tqdm(total=len(prompts), desc="target continuations", unit="seq", disable=args.no_progress)
        params = SamplingParams(args.temperature)
        seqs = build_sequences(
            target,
            prompts,
            args.prompt_len,
            args.response_len,
            args.gen_batch_size,
            params,
            args.seed,
            bar.update,
            args.min_prompt_len,
        )
        bar.close()
        if args.sequences:
            seqs.save(args.sequences, meta)
    data_seconds = time.perf_counter() - t0
    n = seqs.tokens.shape[0]
    n_held = max(1, int(n * args.held_out)) if n > 1 else 0
    order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))
    held, train = seqs.rows(order[:n_held]), seqs.rows(order[n_held:])
    if train.tokens.shape[0] < args.batch_size:
        raise DFlashError(
            f"parameter 'batch_size' is {args.batch_size} but only {train.tokens.shape[0]} training sequences exist"
        )
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        anchors_per_sequence=args.anchors,
        lr=args.lr,
        gamma=args.gamma or default_gamma(drafter_cfg.block_size),
        seed=args.seed,
        eval_every=args.eval_every,
        distill=args.distill,
        eval_decode=args.eval_decode,
        eval_decode_tokens=args.eval_decode_tokens or args.response_len,
        minutes=args.minutes,
    )
    eval_prompts = None
    if args.eval_prompts and args.eval_decode > 0:
        eval_prompts = read_prompts(args.eval_prompts, tokenizer, target.cfg.max_position_embeddings, args.chat)
    trainer = DrafterTrainer(target, cfg_dict, train, held, config, args.output, eval_prompts)
    if initial is not None:
        trainer.drafter.load_state_dict(initial.state_dict())
    if args.resume and trainer.resume():
        print(f"resumed at step {trainer.step}", file=sys.stderr)
    history = trainer.train(progress=not args.no_progress)
    evaluated = [h for h in history if "held_out_tau" in h]
    last = evaluated[-1] if evaluated else {}
    summary = {
        "target": str(args.target),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "drafter_params": sum(p.numel() for p in trainer.drafter.parameters()),
        "sequences": n,
        "held_out_sequences": n_held,
        "steps": trainer.step,
        "data_seconds": round(data_seconds, 1),
        "train_seconds": round(trainer.train_seconds, 1),
        "final_loss": history[-1]["loss"] if history else None,
        "held_out_tau": last.get("held_out_tau"),
        "held_out_decode_tau": last.get("decode_tau"),
        "held_out_decode_tau_pooled": last.get("decode_tau_pooled"),
        "history": evaluated,
        "args": {k: v for k, v in vars(args).items()},
    }
    Path(args.output).mkdir(parents=True, exist_ok=True)
    (Path(args.output) / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    raise SystemExit(train_main())
