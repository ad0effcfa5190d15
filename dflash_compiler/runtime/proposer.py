"""Draft proposers: what the speculative loop asks for a block of guesses. DFlash is the one that ships; the
interface keeps the loop independent of how drafts are made.

A proposer holds no per-request state: the loop owns each request's drafter context (`new_state`), passes it in
and takes the updated one back, so any number of requests can be decoded interleaved with one proposer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..graph.compiler import new_context
from ..models.drafter import DFlashDrafter
from ..models.eager import own_pages
from ..models.paged import PAGE_SIZE, project
from ..models.target import TargetModel
from .sampling import SamplingParams, probabilities, sample_from


class Proposer(Protocol):
    block_size: int
    target_layer_ids: tuple[int, ...]

    def new_state(self, batch: int, max_len: int) -> Any:
        """A fresh drafter context for `batch` sequences of at most `max_len` positions."""
        ...

    def add_context(self, state: Any, features: torch.Tensor, positions: torch.Tensor) -> Any:
        """The state with the target's tapped features [B, T, F] at positions [B, T] appended."""
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


@dataclass
class DraftContext:
    """A DFlash drafter's paged context K/V ([layers, pages, Hkv, PAGE, D]) for B sequences, each on its own
    pages of `table` [B, P]."""

    k: torch.Tensor
    v: torch.Tensor
    table: torch.Tensor


class DFlashProposer:
    def __init__(self, drafter: DFlashDrafter, target: TargetModel, block_size: int | None = None):
        self.drafter, self.target = drafter, target
        self.block_size = block_size if block_size is not None else drafter.cfg.block_size
        self.target_layer_ids = drafter.cfg.target_layer_ids

    def new_state(self, batch: int, max_len: int) -> DraftContext:
        weight = self.target.embed_tokens.weight
        table = own_pages(batch, max_len, weight.device)
        return DraftContext(*new_context(self.drafter.cfg, table.numel() + 1, weight.device, weight.dtype), table)

    def add_context(self, state: DraftContext, features: torch.Tensor, positions: torch.Tensor) -> DraftContext:
        flat = features.reshape(-1, features.shape[-1])
        self.drafter.paged_context(state.k, state.v, flat, positions, state.table)
        return state

    def propose(self, state: DraftContext, anchor, start, params, uniforms):
        bsz, b = anchor.shape[0], self.block_size
        block = torch.full((bsz, b), self.drafter.cfg.mask_token_id, dtype=torch.long, device=anchor.device)
        block[:, 0] = anchor
        embeds = torch.nn.functional.embedding(block, self.target.embed_tokens.weight)
        lens = start.view(-1).to(torch.int32)
        max_len = state.table.shape[1] * PAGE_SIZE
        hidden = self.drafter.paged_draft(state.k, state.v, embeds, lens, state.table, max_len)
        logits = project(hidden, self.target.lm_head).view(bsz, b - 1, -1)
        if params.greedy:
            return logits.argmax(-1), None
        q = probabilities(logits, params)
        return sample_from(q, uniforms), q
