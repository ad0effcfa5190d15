"""The models' paged forward run eagerly, outside any graph: a batch of requests over its own small `Pools`, every
row on its own pages sized for its positions. The eager runtime, drafter training and the tests drive the models
this way; the ops' default implementations run on any device, their registered Triton kernels on CUDA.
"""

from __future__ import annotations

import torch

from ..graph.compiler import new_pools
from .paged import PAGE_SIZE, Pools, VerifyOut
from .step import SpeculativeStep
from .target import TargetModel


def own_pages(rows: int, max_len: int, device) -> torch.Tensor:
    """A block table [rows, P] giving row n pages 1 + n*P .. (n+1)*P, P = ceil(max_len / PAGE_SIZE); page 0 stays
    the pools' scratch page."""
    per_row = max(1, -(-max_len // PAGE_SIZE))
    return (torch.arange(rows * per_row, dtype=torch.int32, device=device) + 1).view(rows, per_row)


def request_pools(target: TargetModel, rows: int, max_len: int, verify_width: int = 1) -> Pools:
    """The target's state for `rows` requests of up to max_len positions each, verifying blocks of up to
    verify_width tokens: every row active, cache length 0."""
    weight = target.embed_tokens.weight
    table = own_pages(rows, max_len, weight.device)
    step = SpeculativeStep(target, None, verify_width, max_len)
    pools = new_pools(step, rows, table.numel() + 1, table.shape[1], weight.device, weight.dtype)
    pools.block_table.copy_(table)
    pools.active.fill_(True)
    return pools


def capacity(pools: Pools) -> int:
    """Positions each row of the pools has pages for (the bound on cache length + block)."""
    return pools.block_table.shape[1] * PAGE_SIZE


def prefill(
    target: TargetModel, pools: Pools, tokens: torch.Tensor, taps: tuple[int, ...] = (), last_only: bool = False
) -> VerifyOut:
    """Appends tokens [N, T] to every row: K/V written, GDN states advanced, cache lengths + T."""
    lens = pools.cache_lens.clone()
    out = target.paged_forward(pools, tokens, lens, pools.block_table, "prefill", taps, capacity(pools), last_only)
    pools.cache_lens += tokens.shape[1]
    return out


def verify(target: TargetModel, pools: Pools, block: torch.Tensor, taps: tuple[int, ...] = ()) -> VerifyOut:
    """Runs block [N, T] after every row's cache (its K/V written, GDN states untouched); `commit` keeps a prefix."""
    lens = pools.cache_lens.clone()
    return target.paged_forward(pools, block, lens, pools.block_table, "verify", taps, capacity(pools))


def commit(target: TargetModel, pools: Pools, vout: VerifyOut, accepted: torch.Tensor) -> None:
    """Row n keeps the first accepted[n] + 1 positions of its verified block (accepted -1: the row stays)."""
    idx = accepted.to(torch.int32)
    target.paged_commit(pools, vout, idx)
    pools.cache_lens.copy_(torch.where(idx >= 0, vout.lens + idx + 1, pools.cache_lens))


def gdn_states(target: TargetModel, pools: Pools) -> torch.Tensor:
    """The GDN state rows [layers, R, HV, K, V] with their pending blocks made current: a copy (the pools keep
    them pending)."""
    from ..codegen import reference

    states = pools.gdn_state.clone()
    for j, i in enumerate(target.cfg.gdn_layers):
        gdn = target.layers[i].linear_attn
        reference.gdn_commit_deltas(states[j], pools.gdn_pending, pools.gdn_keys[j], pools.gdn_rows[j],
                                    pools.gdn_gates[j], gdn.A_log.float(), gdn.dt_bias.float())  # fmt: skip
    return states


def forward_rows(target: TargetModel, tokens: torch.Tensor, taps: tuple[int, ...] = ()) -> VerifyOut:
    """Sequences tokens [N, T] from empty state: the logits of every position [N, T, V] and the tapped layers'
    outputs [N*T, taps*H]."""
    return prefill(target, request_pools(target, tokens.shape[0], tokens.shape[1]), tokens, taps)
