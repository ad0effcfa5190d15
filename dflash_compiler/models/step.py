"""One speculative step over pooled state, for every running request at once, defined on the models.

verify each row's block `[anchor, d1..d(w-1)]` on the target -> accept on device -> commit (KV length; the GDN
state of the accepted position, built from the update rows the verify returned) -> write the verified tokens' tapped
features into the drafter's context K/V -> draft the next block. Every input and output lives in `Pools` and
nothing reads a value back to the host, so the compiler traces each phase (graph/) and the runtime captures the
compiled step as a CUDA graph per batch bucket.

The drafter always drafts its whole block (B - 1 tokens); the verify width w <= B says how many of them the
target checks, so a step of another width can follow without drafting again (the runtime picks w per batch size:
a wide verify pays at one request, a narrow one when the batch is compute-bound).

Rows whose `active` flag is off (free rows inside a bucket) compute on the scratch page 0 and change nothing that
a live row reads.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import DFlashError
from .drafter import DFlashDrafter
from .paged import Pools, VerifyOut, dflash, project
from .target import TargetModel


def _sampling():
    from ..runtime import sampling  # the acceptance and sampling rules (lazy: the runtime imports the models)

    return sampling


class SpeculativeStep(nn.Module):
    """The step's phases over `Pools` row views. block_size 1 (or no drafter) is autoregressive decoding; with a
    drafter, verify_width (2..block_size, default block_size) is the tokens verified per row."""

    def __init__(
        self,
        target: TargetModel,
        drafter: DFlashDrafter | None,
        block_size: int,
        max_len: int = 0,
        verify_width: int | None = None,
    ):
        super().__init__()
        self.target = target
        self.drafter = drafter if block_size > 1 else None
        self.block_size = block_size
        width = block_size if verify_width is None or self.drafter is None else verify_width
        if self.drafter is not None and not 2 <= width <= block_size:
            raise DFlashError(f"parameter 'verify_width' must be in 2..{block_size} (the draft block), got {width}")
        self.verify_width = width
        self.max_len = max_len  # host bound on cache length + block (sizes attention splits)
        self.taps = tuple(drafter.cfg.target_layer_ids) if self.drafter is not None else ()

    def forward(self, pools: Pools, sampled: bool = False, simulated: bool = False) -> None:
        """The whole step: verify -> accept -> commit -> context K/V of the verified tokens -> draft."""
        vout = self.verify(pools)
        bonus = self.accept_commit(pools, vout, sampled, simulated)
        self.draft(pools, bonus, vout.table, sampled, vout.features, vout.positions)

    def verify(self, pools: Pools) -> VerifyOut:
        act = pools.active
        lens = torch.where(act, pools.cache_lens, 0)
        table = pools.block_table * act.unsqueeze(1).to(torch.int32)  # free rows write to scratch page 0
        tokens = self._verified(pools.tokens)
        return self.target.paged_forward(pools, tokens, lens, table, "verify", self.taps, self.max_len)

    def _verified(self, per_block: torch.Tensor) -> torch.Tensor:
        """The first verify_width positions of a per-block buffer (the buffer itself when the step verifies the
        whole block)."""
        return per_block if self.verify_width == self.block_size else per_block[:, : self.verify_width]

    def accept_commit(self, pools: Pools, vout: VerifyOut, sampled: bool, simulated: bool) -> torch.Tensor:
        """Accepts on device, writes the committed tokens to out_tokens/out_count, commits the GDN states and
        the cache lengths. Returns the bonus tokens [N] (the next anchors)."""
        sampling = _sampling()
        b, act, logits = self.verify_width, pools.active, vout.logits
        n = act.shape[0]
        drafts = self._verified(pools.tokens)[:, 1:]
        if b == 1:
            bonus = dflash.argmax(logits[:, 0])
            if sampled:
                probs = self._probs(pools, logits[:, 0])
                drawn = sampling.sample_from(probs, torch.rand(n, device=logits.device))
                bonus = torch.where(pools.temperature > 0, drawn, bonus)
            accepted = torch.zeros_like(bonus)
        else:
            accepted, bonus = dflash.greedy_accept(drafts, logits)
            if sampled:
                p = self._probs(pools, logits)
                u_accept = torch.rand(n, b - 1, device=logits.device)
                u_sample = torch.rand(n, device=logits.device)
                q = pools.draft_probs if b == self.block_size else pools.draft_probs[:, : b - 1]
                rs_accepted, rs_bonus = dflash.rejection_accept(drafts, p, q, u_accept, u_sample)
                greedy_row = pools.temperature == 0
                accepted = torch.where(greedy_row, accepted, rs_accepted)
                bonus = torch.where(greedy_row, bonus, rs_bonus)
            if simulated:
                u = torch.rand(n, 1, device=logits.device)
                profile = pools.profile if b == self.block_size else pools.profile[: b - 1]
                accepted = (u < profile).sum(-1)
                bonus = dflash.argmax(logits).gather(1, accepted.unsqueeze(1)).squeeze(1)
        idx = torch.where(act, accepted, -1).to(torch.int32)
        self.target.paged_commit(pools, vout, idx)
        out = torch.cat((drafts, drafts[:, :1]), dim=1) if b > 1 else bonus.unsqueeze(1).clone()
        out = out.scatter(1, accepted.unsqueeze(1), bonus.unsqueeze(1))
        self._verified(pools.out_tokens).copy_(out)
        pools.out_count.copy_(torch.where(act, accepted + 1, 0).to(torch.int32))
        pools.cache_lens.copy_(torch.where(act, vout.lens + accepted.to(torch.int32) + 1, pools.cache_lens))
        return bonus

    def draft(
        self,
        pools: Pools,
        anchor: torch.Tensor,
        table: torch.Tensor,
        sampled: bool,
        features: torch.Tensor | None = None,
        feature_positions: torch.Tensor | None = None,
    ) -> None:
        """Writes context K/V for verified features (if given), drafts the block after each row's anchor and
        stores [anchor, drafts] as the rows' next verify block (rows whose active flag is off keep theirs)."""
        act = pools.active
        if self.drafter is None:
            pools.tokens.copy_(torch.where(act.unsqueeze(1), anchor.unsqueeze(1), pools.tokens))
            return
        if features is not None:
            self.drafter.paged_context(pools.ctx_k, pools.ctx_v, features, feature_positions, table)
        sampling = _sampling()
        n, b = anchor.shape[0], self.block_size
        lens = torch.where(act, pools.cache_lens, 0)
        block = torch.cat(
            (anchor.unsqueeze(1), torch.full((n, b - 1), self.drafter.cfg.mask_token_id, device=anchor.device)), dim=1
        )
        embeds = torch.nn.functional.embedding(block, self.target.embed_tokens.weight)
        hidden = self.drafter.paged_draft(pools.ctx_k, pools.ctx_v, embeds, lens, table, self.max_len)
        logits = project(hidden, self.target.lm_head).view(n, b - 1, -1)
        drafts = dflash.argmax(logits)
        if sampled:
            q = self._probs(pools, logits)
            drawn = sampling.sample_from(q, torch.rand(n, b - 1, device=logits.device))
            drafts = torch.where(pools.temperature.unsqueeze(1) > 0, drawn, drafts)
            pools.draft_probs.copy_(torch.where(act.view(-1, 1, 1), q, pools.draft_probs))
        block = torch.cat((anchor.unsqueeze(1), drafts), dim=1)
        pools.tokens.copy_(torch.where(act.unsqueeze(1), block, pools.tokens))

    def prefill(self, pools: Pools, ids: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """Prefills tokens ids [1, T] at positions start[0].. of the one row in `pools` (GDN state and conv window
        advance in place; K/V and drafter context written). Returns the last position's logits [1, V]."""
        table = pools.block_table
        out = self.target.paged_forward(pools, ids, start, table, "prefill", self.taps, self.max_len, last_only=True)
        if self.drafter is not None:
            self.drafter.paged_context(pools.ctx_k, pools.ctx_v, out.features, out.positions, table)
        return out.logits[:, -1]

    def _probs(self, pools: Pools, logits: torch.Tensor) -> torch.Tensor:
        return _sampling().row_probabilities(logits, pools.temperature, pools.top_k, pools.top_p)
