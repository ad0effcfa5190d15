"""Builds the tiny trained target + drafter pair that ships as the default model.

    python scripts/tiny_pair.py corpus  --out .cache/tiny                  # stdlib sources -> tokenizer + tokens
    python scripts/tiny_pair.py target  --corpus .cache/tiny --out OUT/target --minutes 5
    python scripts/tiny_pair.py prompts --corpus .cache/tiny --out .cache/tiny/prompts.npy --count 200000
    python scripts/tiny_pair.py varied  --out .cache/varied.jsonl --count 200000   # openings, snippets, windows
    python scripts/tiny_pair.py prompts --corpus .cache/tiny --out .cache/mixed.jsonl --count 80000 \
        --mix .cache/varied.jsonl                                            # token windows as text, shuffled in
    dflash-train-drafter --target OUT/target --prompts .cache/tiny/prompts.npy -o OUT/drafter ...
    python scripts/tiny_pair.py evaluate --pair OUT --prompts dflash_compiler/assets/tiny-pair/heldout_prompts.jsonl

The corpus is the Python standard library of the interpreter that runs `corpus`: no network needed. Files are
split into train and held-out by a hash of their path, so held-out prompts come from files never trained on.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import sysconfig
import textwrap
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DEPENDENCY_SOURCES = ("numpy", "torch", "transformers")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TARGET_CONFIG = {
    "architectures": ["Qwen3_5ForCausalLM"],
    "model_type": "qwen3_5_text",
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "linear_num_key_heads": 4,
    "linear_num_value_heads": 8,
    "linear_key_head_dim": 32,
    "linear_value_head_dim": 32,
    "linear_conv_kernel_dim": 4,
    "full_attention_interval": 4,
    "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"] * 2,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 2048,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    "attention_bias": False,
    "attn_output_gate": True,
    "tie_word_embeddings": False,
    "bos_token_id": None,
    "eos_token_id": 0,
    "pad_token_id": 0,
    "dtype": "bfloat16",
}


def held_out(rel: str) -> bool:
    return zlib.crc32(rel.encode()) % 20 == 0


def source_files() -> list[tuple[str, Path]]:
    """Python sources on every machine that has this package: the standard library and the installed
    dependencies (numpy, torch, transformers). Paths are keyed relative to their root."""
    import importlib.util

    roots = [("stdlib", Path(sysconfig.get_paths()["stdlib"]))]
    for name in DEPENDENCY_SOURCES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            roots.append((name, Path(list(spec.submodule_search_locations)[0])))
    files = []
    for label, root in roots:
        for path in sorted(root.rglob("*.py")):
            rel = f"{label}/{path.relative_to(root)}"
            if "site-packages" in rel or "/tests/" in rel or rel.startswith(("stdlib/test/", "stdlib/idlelib/")):
                continue
            files.append((rel, path))
    return files


def build_corpus(args: argparse.Namespace) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_texts, held_texts = [], []
    budget = args.max_chars
    # a hash order, so a capped corpus still mixes every source
    for rel, path in sorted(source_files(), key=lambda f: zlib.crc32(f[0].encode()) // 20):
        text = path.read_text(errors="replace")
        if held_out(rel):
            if rel.startswith("stdlib/"):
                held_texts.append(text)
        elif budget > 0:
            train_texts.append(text)
            budget -= len(text)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_CONFIG["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", mask_token="<|mask|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out / "tokenizer")
    eos = tok.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for text in train_texts:
        ids += tok.encode(text).ids + [eos]
    np.save(out / "train_tokens.npy", np.asarray(ids, dtype=np.uint16))
    rng = random.Random(0)
    # drafter prompts: code from training files; held-out prompts: code from files never trained on
    with (out / "drafter_prompts.jsonl").open("w") as fh:
        for _ in range(args.drafter_prompts):
            start = rng.randrange(0, len(ids) - 80)
            fh.write(json.dumps({"prompt": tok.decode(ids[start : start + 72])}) + "\n")
    held_prompts = []
    held_ids = [tok.encode(text).ids for text in held_texts]
    held_ids = [h for h in held_ids if len(h) > 200]
    while len(held_prompts) < args.heldout_prompts:
        h = held_ids[len(held_prompts) % len(held_ids)]
        start = rng.randrange(0, len(h) - 120)
        held_prompts.append({"prompt": tok.decode(h[start : start + 48])})
    (out / "heldout_prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in held_prompts))
    meta = {
        "python": sys.version.split()[0],
        "train_files": len(train_texts),
        "held_out_files": len(held_texts),
        "train_tokens": len(ids),
        "sources": ["stdlib", *DEPENDENCY_SOURCES],
        "held_out_rule": "crc32('<source>/<path in it>') % 20 == 0; held-out prompts come from such stdlib files",
    }
    (out / "corpus.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps(meta))


def sample_prompts(args: argparse.Namespace) -> None:
    """Drafter prompts as token ids ([count, tokens] uint16 .npy, read by dflash-train-drafter): random windows of
    the corpus's training split, so any number of them come without re-tokenizing."""
    ids = np.load(Path(args.corpus) / "train_tokens.npy")
    rng = np.random.default_rng(args.seed)
    starts = rng.integers(0, len(ids) - args.tokens, size=args.count)
    rows = ids[starts[:, None] + np.arange(args.tokens)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix != ".jsonl":
        np.save(out, rows.astype(np.uint16))
        print(json.dumps({"prompts": int(rows.shape[0]), "tokens": int(rows.shape[1]), "out": str(out)}))
        return
    # .jsonl: the windows as text, shuffled together with the prompts of --mix files (the trainer re-tokenizes)
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(Path(args.corpus) / "tokenizer")
    lines = [json.dumps({"prompt": text}) + "\n" for text in tok.batch_decode(rows.tolist())]
    for extra in args.mix:
        lines += [line if line.endswith("\n") else line + "\n" for line in Path(extra).read_text().splitlines()]
    random.Random(args.seed).shuffle(lines)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(lines))
    tmp.replace(out)
    print(json.dumps({"prompts": len(lines), "windows": int(rows.shape[0]), "mixed_in": args.mix, "out": str(out)}))


HEADER = re.compile(r"^\s*(?:async\s+def|def|class)\s+\w+")
IMPORT = re.compile(r"^(?:import|from)\s+[\w.]+")
VARIED_MIX = {"window": 0.4, "opening": 0.25, "docstring": 0.08, "snippet": 0.12, "header": 0.1, "imports": 0.05}


@dataclass
class SourceLines:
    lines: list[str]
    headers: list[int]  # indices of def/class lines
    imports: list[int]  # indices of top-level import lines


def _signature_end(lines: list[str], start: int) -> int:
    """Index of the line that closes the def/class header starting at `start` (its colon), at most 8 lines on."""
    for i in range(start, min(len(lines), start + 8)):
        if lines[i].split("#")[0].rstrip().endswith(":"):
            return i
    return start


def _docstring_end(lines: list[str], start: int) -> int | None:
    """Index of the line closing the docstring that opens at `start`, if there is one of at most 8 lines."""
    if start >= len(lines):
        return None
    first = lines[start].strip()
    quote = first[:3] if first[:3] in ('"""', "'''") else None
    if quote is None:
        return None
    if first.count(quote) >= 2:
        return start
    for i in range(start + 1, min(len(lines), start + 8)):
        if quote in lines[i]:
            return i
    return None


def varied_prompt(kind: str, src: SourceLines, rng: random.Random) -> str | None:
    """One prompt of a kind: `opening` (a def/class header, at times with its decorators or first body line),
    `docstring` (a header and its whole short docstring), `snippet` (1-8 lines), `header` (a file's first lines),
    `imports` (a run of imports, at times with what follows), `window` (250-450 characters from a line start, the
    kind the pair was first trained on; the trainer keeps its last --prompt-len tokens). Openings and snippets are
    dedented, so they start at column 0 as a fresh prompt does."""
    lines = src.lines
    if kind in ("opening", "docstring"):
        if not src.headers:
            return None
        start = rng.choice(src.headers)
        end = _signature_end(lines, start)
        if kind == "docstring":
            end = _docstring_end(lines, end + 1)
            if end is None:
                return None
        elif rng.random() < 0.4 and end + 1 < len(lines) and lines[end + 1].strip():
            end += 1
        while rng.random() < 0.5 and start > 0 and lines[start - 1].strip().startswith("@"):
            start -= 1
        return textwrap.dedent("\n".join(lines[start : end + 1])) + ("\n" if rng.random() < 0.5 else "")
    if kind == "imports":
        if not src.imports:
            return None
        start = rng.choice(src.imports)
        end = start
        while end + 1 < len(lines) and IMPORT.match(lines[end + 1]) and end - start < 6:
            end += 1
        end = min(len(lines) - 1, end + rng.choice((0, 0, 2, 4)))
        return "\n".join(lines[start : end + 1]) + "\n"
    if kind == "header":
        return "\n".join(lines[: rng.randint(1, 12)]) + "\n"
    start = rng.randrange(len(lines))
    if kind == "snippet":
        block = textwrap.dedent("\n".join(lines[start : start + rng.randint(1, 8)]))
        return block if block.strip() else None
    text = "\n".join(lines[start:])[: rng.randint(250, 450)]
    if rng.random() < 0.5:  # end at a word boundary half the time, mid-word otherwise
        text = text[: max(text.rfind(" "), text.rfind("\n")) + 1] or text
    return text if len(text) >= 200 else None


def read_sources(split: str, stdlib_only: bool) -> list[SourceLines]:
    sources = []
    for rel, path in source_files():
        if held_out(rel) != (split == "held-out") or (stdlib_only and not rel.startswith("stdlib/")):
            continue
        lines = path.read_text(errors="replace").splitlines()
        if len(lines) < 8:
            continue
        headers = [i for i, line in enumerate(lines) if HEADER.match(line)]
        imports = [i for i, line in enumerate(lines) if IMPORT.match(line)]
        sources.append(SourceLines(lines, headers, imports))
    return sources


def varied_prompts(args: argparse.Namespace) -> None:
    """Drafter prompts of many shapes (.jsonl) from the Python sources: short function and class openings,
    docstrings, imports, file headers and snippets, and mid-file windows, for the drafter to meet prompts that
    start a file as well as ones deep inside it. --split held-out draws from the held-out standard-library files."""
    rng = random.Random(args.seed)
    sources = read_sources(args.split, stdlib_only=args.split == "held-out")
    mix = {k: v for k, v in VARIED_MIX.items() if k in args.kinds}
    kinds, weights = list(mix), list(mix.values())
    seen: set[str] = set()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w") as fh:
        written, tries = 0, 0
        while written < args.count:
            tries += 1
            if tries > 50 * args.count:
                raise SystemExit(f"only {written} distinct prompts of kinds {kinds} in the {args.split} sources")
            prompt = varied_prompt(rng.choices(kinds, weights)[0], rng.choice(sources), rng)
            if not prompt or not prompt.strip():
                continue
            # distinct: by the first line that is not a decorator (one prompt per def or class at most)
            key = next((line for line in prompt.splitlines() if line.strip() and not line.startswith("@")), prompt)
            if args.distinct and key in seen:
                continue
            seen.add(key)
            fh.write(json.dumps({"prompt": prompt}) + "\n")
            written += 1
    tmp.replace(out)
    print(json.dumps({"prompts": args.count, "files": len(sources), "split": args.split, "out": str(out)}))


def init_target(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty_like(p).uniform_(1, 16).log())
            elif name.endswith("dt_bias"):
                p.copy_(torch.empty_like(p).uniform_(0.001, 0.1).expm1().clamp(min=1e-4).log())
            elif name.endswith("linear_attn.norm.weight"):
                p.fill_(1.0)
            elif p.ndim == 1:
                p.zero_()  # zero-centred norms: weight is an offset from 1
            else:
                p.normal_(0.0, 0.02)


def save_sharded(state: dict[str, torch.Tensor], out: Path, max_bytes: int) -> None:
    """Sharded safetensors with model.safetensors.index.json, the layout of large upstream checkpoints."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    for name, tensor in state.items():
        if shards[-1] and sum(t.nbytes for t in shards[-1].values()) + tensor.nbytes > max_bytes:
            shards.append({})
        shards[-1][name] = tensor
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.nbytes for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")


def train_target(args: argparse.Namespace) -> None:
    # trained through transformers' implementation of the architecture (the project's forward is for inference:
    # its ops have no autograd); the checkpoint is the upstream layout either way, and tests/test_tiny_pair.py
    # checks that both give the same logits
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    corpus = Path(args.corpus)
    tokens = torch.from_numpy(np.load(corpus / "train_tokens.npy").astype(np.int64))
    model = Qwen3_5ForCausalLM(Qwen3_5TextConfig.from_dict(TARGET_CONFIG)).to(device)
    init_target(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    seq, bsz = args.seq_len, args.batch_size

    def step(lr: float) -> float:
        starts = torch.randint(0, len(tokens) - seq - 1, (bsz,), generator=gen)
        batch = torch.stack([tokens[s : s + seq + 1] for s in starts.tolist()]).to(device)
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    # size the run to the time budget: time a few warm steps, then a fixed step count with a cosine schedule
    t0 = time.perf_counter()
    for _ in range(3):
        step(args.lr * 0.01)
    t1 = time.perf_counter()
    for _ in range(10):
        step(args.lr * 0.05)
    per_step = (time.perf_counter() - t1) / 10
    steps = max(20, int((args.minutes * 60 - (time.perf_counter() - t0)) / per_step))
    warm = max(1, steps // 25)
    history = []
    for i in range(steps):
        lr = args.lr * min(1.0, (i + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / steps)))
        loss = step(lr)
        if i % 100 == 0 or i == steps - 1:
            history.append({"step": i, "loss": round(loss, 4), "seconds": round(time.perf_counter() - t0, 1)})
            print(json.dumps(history[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.bfloat16).cpu().contiguous() for k, v in model.state_dict().items()}
    save_sharded(state, out, args.shard_mb * 2**20)
    (out / "config.json").write_text(json.dumps(TARGET_CONFIG, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 0, "pad_token_id": 0}) + "\n")
    for f in (corpus / "tokenizer").iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    summary = {
        "params": sum(p.numel() for p in model.parameters()),
        "steps": steps,
        "batch_size": bsz,
        "seq_len": seq,
        "tokens_seen": steps * bsz * seq,
        "lr": args.lr,
        "seed": args.seed,
        "seconds": round(time.perf_counter() - t0, 1),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "history": history,
    }
    (out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}))


def evaluate(args: argparse.Namespace) -> None:
    """Greedy DFlash against the target alone on held-out prompts: equality, tau and its spread, speed; one summary
    per prompts file."""
    from dflash_compiler.runtime import Engine

    pair = Path(args.pair)
    drafter = Path(args.drafter) if args.drafter else pair / "drafter"
    engine = Engine.from_pretrained(pair / "target", drafter, device=args.device, dtype="float32", runtime="eager")
    alone = None
    if not args.batched:
        alone = Engine.from_pretrained(pair / "target", None, device=args.device, dtype="float32", runtime="eager")
    summaries = []
    for source in args.prompts:
        lines = Path(source).read_text().splitlines()
        prompts = [json.loads(line)["prompt"] for line in lines if line.strip()][: args.limit]
        summary = {
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "drafter": str(drafter),
            "prompts_file": str(source),
            **(_acceptance(engine, prompts, args) if alone is None else _comparison(engine, alone, prompts, args)),
        }
        print(json.dumps(summary, indent=1))
        summaries.append(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summaries, indent=1) + "\n")


def _acceptance(engine, prompts: list[str], args: argparse.Namespace) -> dict:
    """Acceptance only (no speed, no equality check): the runtime's steps on all prompts at once."""
    from dflash_compiler.training.drafter import decode_acceptance

    ids = [engine.encode(p) for p in prompts]
    got = decode_acceptance(engine.target, engine.drafter, ids, args.max_new_tokens)
    return {
        "prompts": len(ids),
        "tau_mean_over_prompts": got["tau"],
        "tau_overall": got["tau_pooled"],
        "per_position_acceptance": got["per_position"],
        "per_prompt_tau": got["per_prompt"],
    }


def _comparison(engine, alone, prompts: list[str], args: argparse.Namespace) -> dict:
    rows, identical = [], 0
    all_lengths: list[int] = []
    for prompt in prompts:
        spec = engine.generate(prompt, max_new_tokens=args.max_new_tokens)
        base = alone.generate(prompt, max_new_tokens=args.max_new_tokens)
        identical += spec.token_ids == base.token_ids
        all_lengths += spec.stats.acceptance_lengths
        rows.append(
            {
                "tau": spec.stats.acceptance_length,
                "dflash_tokens_per_s": spec.stats.tokens_per_s,
                "ar_tokens_per_s": base.stats.tokens_per_s,
            }
        )
    taus = torch.tensor([r["tau"] for r in rows])
    block = engine.decoder.block_size
    steps = len(all_lengths)
    return {
        "prompts": len(rows),
        "max_new_tokens": args.max_new_tokens,
        "block_size": block,
        "identical_to_target": identical,
        "tau_overall": sum(all_lengths) / steps,
        "tau_mean_over_prompts": float(taus.mean()),
        "tau_std_over_prompts": float(taus.std()),
        "tau_min": float(taus.min()),
        "tau_max": float(taus.max()),
        "per_position_acceptance": [sum(a - 1 >= i for a in all_lengths) / steps for i in range(1, block)],
        "dflash_tokens_per_s": float(np.median([r["dflash_tokens_per_s"] for r in rows])),
        "ar_tokens_per_s": float(np.median([r["ar_tokens_per_s"] for r in rows])),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("corpus")
    c.add_argument("--out", required=True)
    c.add_argument("--drafter-prompts", type=int, default=40000)
    c.add_argument("--max-chars", type=int, default=60_000_000, help="cap on training text")
    c.add_argument("--heldout-prompts", type=int, default=64)
    r = sub.add_parser("prompts")
    r.add_argument("--corpus", required=True)
    r.add_argument("--out", required=True, help=".npy file of prompt token ids, or .jsonl of their text")
    r.add_argument("--mix", nargs="*", default=[], help=".jsonl prompt files shuffled in (with a .jsonl --out)")
    r.add_argument("--count", type=int, default=200_000)
    r.add_argument("--tokens", type=int, default=64)
    r.add_argument("--seed", type=int, default=1)
    v = sub.add_parser("varied", help="drafter prompts of many shapes (.jsonl)")
    v.add_argument("--out", required=True)
    v.add_argument("--count", type=int, default=200_000)
    v.add_argument("--split", choices=("train", "held-out"), default="train")
    v.add_argument("--kinds", type=lambda s: s.split(","), default=list(VARIED_MIX), help="comma-separated kinds")
    v.add_argument("--distinct", action="store_true", help="no two prompts from the same line")
    v.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("target")
    t.add_argument("--corpus", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--minutes", type=float, default=5.0)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--shard-mb", type=int, default=12)
    e = sub.add_parser("evaluate")
    e.add_argument("--pair", required=True)
    e.add_argument("--prompts", required=True, nargs="+", help="one or more .jsonl prompt files")
    e.add_argument("--device", default="cpu")
    e.add_argument("--limit", type=int, default=64)
    e.add_argument("--max-new-tokens", type=int, default=128)
    e.add_argument("--json")
    e.add_argument("--drafter", help="drafter directory (default: PAIR/drafter)")
    e.add_argument("--batched", action="store_true", help="acceptance only, all prompts decoded at once")
    args = p.parse_args()
    commands = {
        "corpus": build_corpus,
        "prompts": sample_prompts,
        "varied": varied_prompts,
        "target": train_target,
        "evaluate": evaluate,
    }
    commands[args.cmd](args)


if __name__ == "__main__":
    main()
