"""Draft proposers: what the speculative loop asks for a block of guesses. DFlash is the one that ships; the
interface keeps the loop independent of how drafts are made.

A proposer holds no per-request state: the loop owns each request's drafter context (`new_state`), passes it in
and takes the updated one back, so any number of requests can be decoded interleaved with one proposer."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ..models.drafter import DFlashDrafter, DrafterCache
from ..models.target import TargetModel
from .sampling import SamplingParams, probabilities, sample_from


class Proposer(Protocol):
    block_size: int
    target_layer_ids: tuple[int, ...]

    def new_state(self, batch: int, max_len: int) -> Any:
        """A fresh drafter context for `batch` sequences of at most `max_len` positions."""
        ...

    def add_context(self, state: Any, features: torch.Tensor, positions: torch.Tensor) -> Any:
        """The state with the target's tapped features at these positions appended."""
        ...

    def propose(
        self,
        state: Any,
        anchor: torch.Tensor,
        start: torch.Tensor,
        params: SamplingParams,
        uniforms: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draft tokens [B, block_size-1] following anchor [B] at positions start+1.., and their draft
        distributions [B, block_size-1, V] when sampling (None when greedy)."""
        ...


class DFlashProposer:
    def __init__(self, drafter: DFlashDrafter, target: TargetModel, block_size: int | None = None):
        self.drafter, self.target = drafter, target
        self.block_size = block_size if block_size is not None else drafter.cfg.block_size
        self.target_layer_ids = drafter.cfg.target_layer_ids

    def new_state(self, batch: int, max_len: int) -> DrafterCache:
        return self.drafter.new_cache(batch, max_len)

    def add_context(self, state: DrafterCache, features: torch.Tensor, positions: torch.Tensor) -> DrafterCache:
        return self.drafter.append_context(state, features, positions)

    def propose(self, state: DrafterCache, anchor, start, params, uniforms):
        bsz, b = anchor.shape[0], self.block_size
        mask_id = self.drafter.cfg.mask_token_id
        block = torch.full((bsz, b), mask_id, dtype=torch.long, device=anchor.device)
        block[:, 0] = anchor
        positions = start.view(-1, 1) + torch.arange(b, device=anchor.device)
        hidden = self.drafter(self.target.embed_tokens(block), positions, state)
        logits = self.target.lm_head(hidden[:, 1:])
        if params.greedy:
            return logits.argmax(-1), None
        q = probabilities(logits, params)
        return sample_from(q, uniforms), q
