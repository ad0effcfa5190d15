"""Pooled decoding state for the batched step, and the helpers the models' paged forward shares.

The state of up to `rows` requests lives in fixed buffers: a paged KV cache (target and drafter context share the
page table; page 0 is scratch), GDN state and conv-window rows, per-row sampling settings and the step's outputs.

A row's GDN state is `gdn_state` advanced by its pending block: the last verified block's raw keys, gate inputs and
update rows (`gdn_keys`, `gdn_gates`, `gdn_rows`) up to its accepted position `gdn_pending` (-1: none). The step
commits by setting that position; the next verify makes it current while it reads the state (one write of the
state, not a read and a write of its own), and a prefill makes it current before it advances.
`Pools.rows(sl)` is the same state seen through a row range (views), which is what the step functions take.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from ..graph import ops as _ops  # noqa: F401  (registers torch.ops.dflash)

PAGE_SIZE = 64
dflash = torch.ops.dflash


@dataclass
class Pools:
    """Fixed device buffers of up to `rows` requests (row = request slot; the last row prefills)."""

    tokens: torch.Tensor  # [R, B] int64: the next verify block, anchor first
    cache_lens: torch.Tensor  # [R] int32: committed positions (the anchor's position)
    active: torch.Tensor  # [R] bool
    block_table: torch.Tensor  # [R, P] int32: pages of each row (target KV and drafter context share them)
    temperature: torch.Tensor  # [R] fp32, 0 = greedy
    top_k: torch.Tensor  # [R] int64, 0 = off
    top_p: torch.Tensor  # [R] fp32
    out_tokens: torch.Tensor  # [R, B] int64: committed tokens of the last step
    out_count: torch.Tensor  # [R] int32
    gdn_state: torch.Tensor  # [layers, R, HV, K, V] fp32
    conv_window: torch.Tensor  # [layers, R, C, W-1]
    gdn_keys: torch.Tensor  # [layers, R, P, H, K]: the pending block's raw keys (P: the widest verify)
    gdn_gates: torch.Tensor  # [layers, R, P, HV]: its raw gate inputs a
    gdn_rows: torch.Tensor  # [layers, R, P, HV, V] fp32: its update rows
    gdn_pending: torch.Tensor  # [R] int32: its accepted position, -1 = no pending block
    k_cache: list[torch.Tensor]  # per attention layer [pages, Hkv, PAGE, D]
    v_cache: list[torch.Tensor]
    ctx_k: torch.Tensor | None  # drafter context [layers, pages, Hkv, PAGE, D]
    ctx_v: torch.Tensor | None
    profile: torch.Tensor  # [B-1] fp32: simulated per-position acceptance
    draft_probs: torch.Tensor | None = None  # [R, B-1, V] fp32, for sampled rows

    _ROW_FIELDS = ("tokens", "cache_lens", "active", "block_table", "temperature", "top_k", "top_p", "out_tokens",
                   "out_count", "gdn_pending", "draft_probs")  # fmt: skip
    _LAYER_ROW_FIELDS = ("gdn_state", "conv_window", "gdn_keys", "gdn_gates", "gdn_rows")

    def row_tensors(self) -> list[torch.Tensor]:
        """Every buffer indexed by row first (what moves when a request changes rows)."""
        return [getattr(self, f) for f in self._ROW_FIELDS if getattr(self, f) is not None]

    def move_row(self, src: int, dst: int) -> None:
        for t in self.row_tensors():
            t[dst].copy_(t[src])
        for f in self._LAYER_ROW_FIELDS:
            t = getattr(self, f)
            t[:, dst].copy_(t[:, src])

    def clear_row(self, row: int) -> None:
        """Row `row` starts a request: zero GDN state and conv window, no pending block."""
        self.gdn_state[:, row].zero_()
        self.conv_window[:, row].zero_()
        self.gdn_pending[row] = -1

    def rows(self, sl: slice) -> Pools:
        """The pools seen through rows `sl` (views: writes reach the pools)."""
        changes = {f: getattr(self, f)[sl] for f in self._ROW_FIELDS if getattr(self, f) is not None}
        changes.update({f: getattr(self, f)[:, sl] for f in self._LAYER_ROW_FIELDS})
        return replace(self, **changes)

    def dynamic_shapes(self, rows, pages) -> list:
        """torch.export dynamic_shapes for these pools (fields that are None are not inputs): `rows` on the row dim
        of every row-indexed buffer, `pages` on the page dim of the caches (either may be None: static)."""
        spec = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name in self._ROW_FIELDS:
                spec.append({0: rows} if rows is not None else None)
            elif f.name in self._LAYER_ROW_FIELDS:
                spec.append({1: rows} if rows is not None else None)
            elif f.name in ("k_cache", "v_cache"):
                spec.append([{0: pages} if pages is not None else None] * len(value))
            elif f.name in ("ctx_k", "ctx_v"):
                spec.append({1: pages} if pages is not None else None)
            else:
                spec.append(None)
        return spec


@dataclass
class VerifyOut:
    logits: torch.Tensor  # [N, T, V]
    features: torch.Tensor | None  # [N*T, taps*H]
    positions: torch.Tensor  # [N, T]
    saved: list  # per GDN layer: (k, a, x) for the commit
    table: torch.Tensor  # [N, P] the block table the block was written through
    lens: torch.Tensor  # [N] cache lengths before the block


torch.export.register_dataclass(Pools, serialized_type_name="dflash_compiler.Pools")
torch.export.register_dataclass(VerifyOut, serialized_type_name="dflash_compiler.VerifyOut")


def project(x: torch.Tensor, module: nn.Module, residual: torch.Tensor | None = None) -> torch.Tensor:
    """A linear layer as the IR's linear op: x [M, K] -> [M, N] (+ bias, + residual). A QuantizedLinear (a
    pre-quantized checkpoint's layer) passes its format's tensors."""
    if not hasattr(module, "qweight"):
        return dflash.linear(x, module.weight, bias=module.bias, residual=residual)
    return dflash.linear(x, module.qweight, module.scale, module.zeros, module.bias, residual, module.fmt,
                         module.group_size)  # fmt: skip


def token_rows(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(request index, position) of every token of positions [N, T], flattened."""
    n, t = positions.shape
    seq_idx = torch.arange(n * t, device=positions.device) // t  # contiguous: kernels index it per token
    return seq_idx, positions.reshape(-1)
