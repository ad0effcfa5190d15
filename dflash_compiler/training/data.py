"""Drafter training data: prompts, and the target's own continuations of them.

The drafter learns to predict the target, not a corpus, so every training sequence is a prompt followed by the
target's greedy (or sampled) continuation, generated here in batches through the target's paged forward.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DFlashError
from ..models import eager
from ..models.target import TargetModel
from ..runtime.sampling import SamplingParams, probabilities, sample_from

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".c", ".h", ".js", ".json", ".html")


def read_prompts(source: str | Path, tokenizer, prompt_tokens: int, chat: bool = False) -> list[list[int]]:
    """Prompts as token ids, from a .jsonl file (one {"prompt": str} or {"messages": [...]} per line), a .npy
    file of token ids already tokenized ([N, P] integers, one prompt per row), or a directory of text files (each
    cut into prompts of `prompt_tokens` tokens)."""
    source = Path(source)
    if source.suffix == ".npy" and source.is_file():
        import numpy as np

        try:
            rows = np.load(source, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DFlashError(f"{source}: cannot read token ids ({e})") from None
        if rows.ndim != 2 or rows.dtype.kind not in "iu" or rows.shape[0] == 0:
            raise DFlashError(f"{source}: expected a non-empty [N, P] integer array of token ids, got {rows.shape}")
        return [row[-prompt_tokens:].tolist() for row in rows.astype(np.int64)]
    if source.is_dir():
        prompts = []
        for path in sorted(p for p in source.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file()):
            ids = tokenizer.encode(path.read_text(errors="replace"), add_special_tokens=False)
            prompts += [ids[i : i + prompt_tokens] for i in range(0, len(ids) - prompt_tokens + 1, prompt_tokens)]
        if not prompts:
            raise DFlashError(f"{source}: no text files with at least {prompt_tokens} tokens")
        return prompts
    if not source.is_file():
        raise DFlashError(f"parameter 'prompts': {source} is neither a file nor a directory")
    prompts = []
    for n, line in enumerate(source.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            raise DFlashError(f"{source}: line {n} is not valid JSON") from None
        if isinstance(item, dict) and isinstance(item.get("messages"), list):
            ids = tokenizer.apply_chat_template(item["messages"], add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
            if chat:
                messages = [{"role": "user", "content": item["prompt"]}]
                ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
                ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            else:
                ids = tokenizer.encode(item["prompt"], add_special_tokens=False)
        else:
            raise DFlashError(f"{source}: line {n} needs a 'prompt' string or a 'messages' list")
        if ids:
            prompts.append(ids[-prompt_tokens:])
    if not prompts:
        raise DFlashError(f"{source}: no prompts")
    return prompts


@torch.inference_mode()
def continue_batch(
    target: TargetModel, prompts: torch.Tensor, new_tokens: int, params: SamplingParams, generator: torch.Generator
) -> torch.Tensor:
    """The target's continuations [B, new_tokens] of equal-length prompts [B, P]."""
    bsz, plen = prompts.shape
    device = prompts.device
    pools = eager.request_pools(target, bsz, plen + new_tokens)
    logits = eager.prefill(target, pools, prompts, last_only=True).logits[:, -1]
    tokens = []
    for step in range(new_tokens):
        if params.greedy:
            nxt = logits.argmax(-1)
        else:
            u = torch.rand(bsz, generator=generator).to(device)
            nxt = sample_from(probabilities(logits, params), u)
        tokens.append(nxt)
        if step == new_tokens - 1:
            break
        out = eager.verify(target, pools, nxt.view(bsz, 1))  # decoding: a verify of one token, always kept
        eager.commit(target, pools, out, torch.zeros(bsz, dtype=torch.long, device=device))
        logits = out.logits[:, 0]
    return torch.stack(tokens, dim=1)


@dataclass
class SequenceSet:
    """Training sequences [N, L]: a prompt then the target's continuation; loss only on the response.

    Every prompt is `prompt_len` tokens, or, with `prompt_lens` [N], row n's prompt is its first prompt_lens[n]
    tokens (at most prompt_len): shorter prompts got longer continuations, so all rows are L long."""

    tokens: torch.Tensor
    prompt_len: int
    prompt_lens: torch.Tensor | None = None

    def lens(self) -> torch.Tensor:
        """Each row's prompt length [N]."""
        if self.prompt_lens is not None:
            return self.prompt_lens
        return torch.full((self.tokens.shape[0],), self.prompt_len, dtype=torch.long)

    def rows(self, index: torch.Tensor) -> SequenceSet:
        lens = None if self.prompt_lens is None else self.prompt_lens[index]
        return SequenceSet(self.tokens[index], self.prompt_len, lens)

    def prompts(self, count: int) -> list[list[int]]:
        """The prompts of the first `count` rows."""
        return [row[:n].tolist() for row, n in zip(self.tokens[:count], self.lens()[:count].tolist())]

    def save(self, path: str | Path, meta: dict | None = None) -> None:
        """Writes the sequences (and what made them) for later runs to reuse, atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        state = {"tokens": self.tokens, "prompt_len": self.prompt_len, "meta": meta or {}}
        if self.prompt_lens is not None:
            state["prompt_lens"] = self.prompt_lens
        torch.save(state, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, meta: dict | None = None) -> SequenceSet:
        """Reads sequences written by `save`; `meta`, when given, must equal what they were made with."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, ValueError) as e:
            raise DFlashError(f"{path}: cannot read training sequences ({e})") from None
        if meta is not None and state.get("meta") != meta:
            diff = sorted(k for k in set(meta) | set(state.get("meta", {})) if meta.get(k) != state["meta"].get(k))
            raise DFlashError(f"{path}: the sequences were made with other settings ({', '.join(diff)}); delete it")
        return cls(state["tokens"], int(state["prompt_len"]), state.get("prompt_lens"))

    def batches(self, batch_size: int, generator: torch.Generator) -> Iterator[SequenceSet]:
        while True:
            order = torch.randperm(self.tokens.shape[0], generator=generator)
            for i in range(0, len(order) - batch_size + 1, batch_size):
                yield self.rows(order[i : i + batch_size])


def build_sequences(
    target: TargetModel,
    prompts: list[list[int]],
    prompt_len: int,
    response_len: int,
    batch_size: int,
    params: SamplingParams,
    seed: int,
    progress=None,
    min_prompt_len: int | None = None,
) -> SequenceSet:
    """Generates the target's continuations of every prompt, left-truncated to `prompt_len` tokens. Prompts
    shorter than that are skipped, or, with `min_prompt_len`, kept when at least that long and continued for
    longer, so every sequence is prompt_len + response_len tokens."""
    device = target.embed_tokens.weight.device
    shortest = prompt_len if min_prompt_len is None else min(min_prompt_len, prompt_len)
    usable = [p[-prompt_len:] for p in prompts if len(p) >= shortest]
    if not usable:
        raise DFlashError(f"parameter 'prompts': no prompt has at least {shortest} tokens")
    generator = torch.Generator().manual_seed(seed)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(usable):
        by_length.setdefault(len(p), []).append(i)
    total = prompt_len + response_len
    rows: list[torch.Tensor | None] = [None] * len(usable)
    for length in sorted(by_length):
        group = by_length[length]
        for i in range(0, len(group), batch_size):
            index = group[i : i + batch_size]
            chunk = torch.tensor([usable[j] for j in index], device=device)
            done = torch.cat((chunk, continue_batch(target, chunk, total - length, params, generator)), dim=1).cpu()
            for j, row in zip(index, done):
                rows[j] = row
            if progress is not None:
                progress(len(index))
    lens = None if min_prompt_len is None else torch.tensor([len(p) for p in usable], dtype=torch.long)
    return SequenceSet(torch.stack(rows), prompt_len, lens)
