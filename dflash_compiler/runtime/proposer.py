"""Draft proposers: what the speculative loop asks for a block of guesses. DFlash is the one that ships; the
interface keeps the loop independent of how drafts are made."""

from __future__ import annotations

from typing import Protocol

import torch

from ..models.drafter import DFlashDrafter, DrafterCache
from ..models.target import TargetModel
from .sampling import SamplingParams, probabilities, sample_from


class Proposer(Protocol):
    block_size: int
    target_layer_ids: tuple[int, ...]

    def reset(self, batch: int, max_len: int) -> None: ...

    def add_context(self, features: torch.Tensor, positions: torch.Tensor) -> None: ...

    def propose(
        self, anchor: torch.Tensor, start: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draft tokens [B, block_size-1] following anchor [B] at positions start+1.., and their draft
        distributions [B, block_size-1, V] when sampling (None when greedy)."""
        ...


class DFlashProposer:
    def __init__(self, drafter: DFlashDrafter, target: TargetModel, block_size: int | None = None):
        self.drafter, self.target = drafter, target
        self.block_size = block_size or drafter.cfg.block_size
        self.target_layer_ids = drafter.cfg.target_layer_ids
        self.cache: DrafterCache | None = None

    def reset(self, batch: int, max_len: int) -> None:
        self.cache = self.drafter.new_cache(batch, max_len)

    def add_context(self, features: torch.Tensor, positions: torch.Tensor) -> None:
        self.cache = self.drafter.append_context(self.cache, features, positions)

    def propose(self, anchor, start, params, uniforms):
        bsz, b = anchor.shape[0], self.block_size
        mask_id = self.drafter.cfg.mask_token_id
        block = torch.full((bsz, b), mask_id, dtype=torch.long, device=anchor.device)
        block[:, 0] = anchor
        positions = start.view(-1, 1) + torch.arange(b, device=anchor.device)
        hidden = self.drafter(self.target.embed_tokens(block), positions, self.cache)
        logits = self.target.lm_head(hidden[:, 1:])
        if params.greedy:
            return logits.argmax(-1), None
        q = probabilities(logits, params)
        return sample_from(q, uniforms), q
