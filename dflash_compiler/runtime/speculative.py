"""The eager speculative decoding loop: prefill, then draft -> verify -> accept -> commit until done.

Each request runs over its own small pools (models/eager.py) through the models' paged forward, the one the
compiler traces; acceptance runs on the host with the rules of sampling.py, from the request's own generator.

Block size 1 (or no proposer) is plain autoregressive decoding through the same path, the baseline every
speedup is measured against.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import DFlashError
from ..models import eager
from ..models.target import TargetModel
from .proposer import Proposer
from .sampling import SamplingParams, greedy_accept, probabilities, rejection_accept, sample_from


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    block_size: int = 1
    acceptance_lengths: list[int] = field(default_factory=list)  # committed tokens per verify step, bonus included
    time_to_first_token_s: float = 0.0
    decode_time_s: float = 0.0
    limit_note: str | None = None  # why, when the context leaves room for fewer tokens than were asked for

    @property
    def acceptance_length(self) -> float:
        """Mean acceptance length tau over verify steps (accepted drafts + the bonus token)."""
        return sum(self.acceptance_lengths) / len(self.acceptance_lengths) if self.acceptance_lengths else 0.0

    @property
    def per_position_acceptance(self) -> list[float]:
        """Fraction of verify steps in which draft slot i (1-based) was accepted, for i = 1..block_size-1."""
        steps = len(self.acceptance_lengths)
        if not steps:
            return []
        return [sum(a - 1 >= i for a in self.acceptance_lengths) / steps for i in range(1, self.block_size)]

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: tokens after the first over the time after the first token."""
        return (self.generated_tokens - 1) / self.decode_time_s if self.decode_time_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "block_size": self.block_size,
            "acceptance_lengths": self.acceptance_lengths,
            "acceptance_length": self.acceptance_length,
            "per_position_acceptance": self.per_position_acceptance,
            "time_to_first_token_s": self.time_to_first_token_s,
            "tokens_per_s": self.tokens_per_s,
            "limit_note": self.limit_note,
        }


def check_request(
    prompt_ids: Sequence[int], max_new_tokens: int, vocab_size: int, context: int, context_name: str
) -> list[int]:
    """The request checks both runtimes make; returns the prompt as a list."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise DFlashError(f"parameter 'max_new_tokens' must be an integer >= 1, got {max_new_tokens!r}")
    prompt = list(prompt_ids)
    if not prompt:
        raise DFlashError("parameter 'prompt' is empty")
    if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size for t in prompt):
        raise DFlashError(f"parameter 'prompt' holds a token id outside the vocabulary 0..{vocab_size - 1}")
    if len(prompt) >= context:
        raise DFlashError(f"parameter 'prompt' is {len(prompt)} tokens, longer than {context_name} ({context} - 1)")
    return prompt


def resolve_block_size(block_size: int | None, drafter_block_size: int | None) -> int:
    """The verify block size both runtimes use: the drafter's unless given; 1 without a drafter."""
    limit = drafter_block_size or 1
    if block_size is None:
        return limit
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not 1 <= block_size <= limit:
        why = " (no drafter: the target alone decodes one token per step)" if drafter_block_size is None else ""
        raise DFlashError(f"parameter 'block_size' must be in 1..{limit}{why}, got {block_size!r}")
    return block_size


PREFILL_CHUNK = 512  # prompt tokens per prefill call


class SpeculativeDecoder:
    def __init__(self, target: TargetModel, proposer: Proposer | None = None, block_size: int | None = None):
        self.target, self.proposer = target, proposer
        self.block_size = resolve_block_size(block_size, proposer.block_size if proposer is not None else None)
        self.taps = proposer.target_layer_ids if proposer is not None and self.block_size > 1 else ()

    @torch.inference_mode()
    def stream(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        params: SamplingParams | None = None,
        stop_token_ids: Sequence[int] = (),
        seed: int | None = None,
        stats: GenerationStats | None = None,
    ) -> Iterator[list[int]]:
        """Yields the newly committed tokens of each step; ends after a stop token (included) or max_new_tokens."""
        target, device = self.target, self.target.embed_tokens.weight.device
        max_pos = target.cfg.max_position_embeddings
        prompt = check_request(prompt_ids, max_new_tokens, target.cfg.vocab_size, max_pos, "the model's context")
        params = params or SamplingParams()
        stats = stats if stats is not None else GenerationStats()
        stats.prompt_tokens, stats.block_size = len(prompt), self.block_size
        # a seedless request draws its seed from the OS, leaving torch's global generator to the caller
        gen = torch.Generator(device="cpu").manual_seed(seed if seed is not None else secrets.randbits(63))
        stops = set(stop_token_ids)
        budget = min(max_new_tokens, max_pos - len(prompt))
        cache_len = len(prompt) + budget + self.block_size
        bs = self.block_size

        def uniforms(*shape: int) -> torch.Tensor:
            return torch.rand(shape, generator=gen).to(device)

        t0 = time.perf_counter()
        n = len(prompt)
        pools = eager.request_pools(target, 1, cache_len, bs)  # this request's KV pages and GDN state row
        draft_state = self.proposer.new_state(1, cache_len) if self.taps else None  # this request's drafter context
        ids = torch.tensor([prompt], device=device)
        for i in range(0, n, PREFILL_CHUNK):  # in chunks, as the batched runtime prefills
            out = eager.prefill(target, pools, ids[:, i : i + PREFILL_CHUNK], self.taps, last_only=True)
            if self.taps:
                features = out.features.view(1, out.positions.shape[1], -1)
                draft_state = self.proposer.add_context(draft_state, features, out.positions)
        last = out.logits[:, -1]
        anchor = last.argmax(-1) if params.greedy else sample_from(probabilities(last, params), uniforms(1))
        first = int(anchor.item())
        stats.time_to_first_token_s = time.perf_counter() - t0
        stats.generated_tokens = 1
        yield [first]
        t1 = time.perf_counter()
        done = first in stops
        start = n
        while not done and stats.generated_tokens < budget:
            verify_len = min(bs, budget - stats.generated_tokens)
            start_t = torch.tensor([start], device=device)
            drafts = torch.empty(1, 0, dtype=torch.long, device=device)
            q = None
            if verify_len > 1:
                drafts, q = self.proposer.propose(draft_state, anchor, start_t, params, uniforms(1, bs - 1))
                drafts = drafts[:, : verify_len - 1]
                q = q[:, : verify_len - 1] if q is not None else None
            block = torch.cat((anchor.view(1, 1), drafts), dim=1)
            out = eager.verify(target, pools, block, self.taps)
            if params.greedy:
                accepted, bonus = greedy_accept(drafts, out.logits)
            else:
                p = probabilities(out.logits, params)
                q = q if q is not None else torch.zeros_like(p[:, :0])
                accepted, bonus = rejection_accept(drafts, q, p, uniforms(1, drafts.shape[1]), uniforms(1))
            eager.commit(target, pools, out, accepted)
            a = int(accepted.item())
            if self.taps:
                features = out.features.view(1, block.shape[1], -1)[:, : a + 1]
                draft_state = self.proposer.add_context(draft_state, features, out.positions[:, : a + 1])
            new = drafts[0, :a].tolist() + [int(bonus.item())]
            stats.acceptance_lengths.append(a + 1)
            for i, tok in enumerate(new):
                if tok in stops:
                    new, done = new[: i + 1], True
                    break
            new = new[: budget - stats.generated_tokens]
            stats.generated_tokens += len(new)
            stats.decode_time_s = time.perf_counter() - t1  # kept current: a consumer may stop at any chunk
            yield new
            start += a + 1
            anchor = bonus

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, **kwargs) -> tuple[list[int], GenerationStats]:
        stats = kwargs.pop("stats", None) or GenerationStats()
        tokens = [t for chunk in self.stream(prompt_ids, max_new_tokens, stats=stats, **kwargs) for t in chunk]
        return tokens, stats
