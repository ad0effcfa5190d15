"""Sampling and acceptance rules (the PyTorch references the on-device kernels are tested against).

Randomness enters only as uniform tensors, so a result is a pure function of its inputs: the same uniforms give
the same tokens on CPU, GPU or inside a kernel.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..errors import DFlashError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0

    def __post_init__(self):
        if not (self.temperature >= 0.0):
            raise DFlashError(f"parameter 'temperature' must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise DFlashError(f"parameter 'top_p' must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise DFlashError(f"parameter 'top_k' must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampling distribution [..., V]: temperature, then top-k, then top-p (nucleus), renormalised, fp32."""
    full = functools.partial(torch.full, (1,), device=logits.device)
    return row_probabilities(logits, full(params.temperature), full(params.top_k, dtype=torch.long), full(params.top_p))


def row_probabilities(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """probabilities() with per-row settings: logits [N, ..., V], temperature/top_k/top_p [N] or [1] for every
    row (top_k 0 = off).
    Rows with temperature 0 (greedy) get their temperature-1 distribution. No host synchronisation."""
    shape = (-1,) + (1,) * (logits.dim() - 1)
    temp = torch.where(temperature > 0, temperature, 1.0).view(shape)
    logits = logits.float() / temp
    vocab = logits.shape[-1]
    sorted_logits = logits.sort(dim=-1, descending=True).values
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab).view(shape)
    kth = sorted_logits.gather(-1, (k - 1).expand(*sorted_logits.shape[:-1], 1))
    logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    # keep the smallest prefix whose mass reaches top_p (the first token always stays)
    drop_sorted = ((sorted_p.cumsum(-1) - sorted_p) >= top_p.view(shape)) & (top_p.view(shape) < 1.0)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    probs = probs.masked_fill(drop, 0.0)
    return probs / probs.sum(-1, keepdim=True)


def sample_from(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: one token per row of probs [..., V] for uniforms [...] in [0, 1)."""
    cdf = probs.float().cumsum(-1)
    target = uniform.unsqueeze(-1) * cdf[..., -1:]
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    # never land on a zero-probability token through rounding at the top end
    idx = idx.clamp(max=probs.shape[-1] - 1)
    last_nonzero = probs.shape[-1] - 1 - (probs.flip(-1) > 0).float().argmax(-1)
    return torch.minimum(idx, last_nonzero)


def greedy_accept(drafts: torch.Tensor, target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Longest prefix of drafts [B, n] equal to the target's argmax, and the bonus token after it.

    target_logits [B, n+1, V] are the verify logits at [anchor, d1..dn]. Returns (accepted [B], bonus [B]).
    """
    choice = target_logits.argmax(-1)
    match = (drafts == choice[:, : drafts.shape[1]]).long()
    accepted = match.cumprod(-1).sum(-1)
    return accepted, choice.gather(1, accepted.unsqueeze(1)).squeeze(1)


def rejection_accept(
    drafts: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    accept_uniforms: torch.Tensor,
    sample_uniforms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard speculative sampling over a chain: accept d_i iff u_i * q_i(d_i) < p_i(d_i), stop at the first
    rejection and draw the replacement from normalize(max(p_i - q_i, 0)) (p_i if that has no mass); when every
    draft is accepted, draw the bonus from p at the last position. The committed tokens then follow p exactly.

    drafts [B, n]; draft_probs q [B, n, V]; target_probs p [B, n+1, V]; accept_uniforms [B, n]; sample_uniforms [B].
    Returns (accepted [B], next token [B]).
    """
    n = drafts.shape[1]
    p_d = target_probs[:, :n].gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
    q_d = draft_probs.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
    ok = (accept_uniforms * q_d < p_d).long()
    accepted = ok.cumprod(-1).sum(-1)
    idx = accepted.view(-1, 1, 1).expand(-1, 1, target_probs.shape[-1])
    p = target_probs.gather(1, idx).squeeze(1)
    q_padded = torch.cat((draft_probs, draft_probs.new_zeros(drafts.shape[0], 1, target_probs.shape[-1])), dim=1)
    q = q_padded.gather(1, idx).squeeze(1)  # zero where every draft was accepted: the residual is p itself
    residual = (p - q).clamp(min=0.0)
    mass = residual.sum(-1, keepdim=True)
    dist = torch.where(mass > 0, residual, p)
    return accepted, sample_from(dist, sample_uniforms)
