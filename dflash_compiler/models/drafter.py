"""The DFlash block-diffusion drafter (upstream `DFlashDraftModel`): Qwen3-style layers conditioned on the
target by KV injection.

The target's tapped features go through `fc` and `hidden_norm` once; every layer projects the result with its
own k/v projections into context K/V, kept in a cache. A draft block `[anchor, MASK x (B-1)]` (embedded with the
target's embedding) attends to that context and to itself; the target's lm_head reads slots 1..B-1.

Inference is `paged_context` (context K/V written into a paged cache) and `paged_draft`, in the IR's ops. Training
runs the same layers over many blocks packed into one sequence (`context_kv`, `layer_masks`, `run_blocks`) in
PyTorch ops, which autograd differentiates.
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from .config import DrafterConfig
from .paged import dflash, project, token_rows
from .target import MLP, RMSNorm


class DrafterAttention(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.cfg = cfg
        d, bias = cfg.head_dim, cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, zero_centered=False)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, zero_centered=False)

    def kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normed, rotated K and V [B, Hkv, T, D] of inputs x [B, T, H]."""
        bsz, t, _ = x.shape
        k = self.k_norm(self.k_proj(x).view(bsz, t, self.cfg.num_kv_heads, -1)).transpose(1, 2)
        v = self.v_proj(x).view(bsz, t, self.cfg.num_kv_heads, -1).transpose(1, 2)
        return ops.apply_rope(k, cos, sin), v

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        ctx_k: torch.Tensor,
        ctx_v: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        bsz, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(bsz, t, self.cfg.num_heads, -1)).transpose(1, 2)
        q = ops.apply_rope(q, cos, sin)
        k, v = self.kv(x, cos, sin)
        keys, values = torch.cat((ctx_k, k), dim=2), torch.cat((ctx_v, v), dim=2)
        out = ops.attention(q, keys, values, mask, self.cfg.head_dim**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, t, -1))


class DrafterLayer(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.self_attn = DrafterAttention(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, zero_centered=False)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, zero_centered=False)

    def forward(self, h, cos, sin, ctx_k, ctx_v, mask) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, ctx_k, ctx_v, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class DFlashDrafter(nn.Module):
    def __init__(self, cfg: DrafterConfig, target_hidden_size: int):
        super().__init__()
        self.cfg = cfg
        self.fc = nn.Linear(len(cfg.target_layer_ids) * target_hidden_size, cfg.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, zero_centered=False)
        self.layers = nn.ModuleList(DrafterLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, zero_centered=False)
        inv_freq, self.rope_scale = cfg.rope.inv_freq()
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.rope_cos_sin(self.inv_freq, positions, self.rope_scale, dtype)

    def context_kv(self, features: torch.Tensor, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Context K/V of every layer for target features [B, C, K*H_target] at positions [B, C]."""
        c = self.hidden_norm(self.fc(features))
        cos, sin = self.rope(positions, c.dtype)
        return [layer.self_attn.kv(c, cos, sin) for layer in self.layers]

    def layer_masks(
        self, positions: torch.Tensor, anchors: torch.Tensor, blocks: torch.Tensor, ctx_len: int
    ) -> list[torch.Tensor]:
        """Per-layer masks [B, T, S+T] for block queries at positions [B, T] over S context slots.

        A query sees context positions before its block's anchor (anchors [B, T]) and the queries of its own
        block (blocks [B, T]: block index of each query): both ways in full layers, only earlier ones in causal
        layers; sliding layers also drop keys `sliding_window` or more positions back (what draft_attention
        computes for a single block over the paged context).
        """
        device = positions.device
        bsz, t = positions.shape
        ctx_pos = torch.arange(ctx_len, device=device).view(1, 1, -1)
        q_pos = positions.unsqueeze(-1)
        key_pos = torch.cat((ctx_pos.expand(bsz, 1, -1), positions.unsqueeze(1)), dim=-1)
        base = torch.cat((ctx_pos < anchors.unsqueeze(-1), blocks.unsqueeze(-1) == blocks.unsqueeze(1)), dim=-1)
        masks = {}
        for key in zip(self.cfg.layer_types, self.cfg.causal_layers):
            if key in masks:
                continue
            kind, causal = key
            mask = base
            if causal:
                mask = mask & (key_pos <= q_pos)
            if kind == "sliding_attention":
                mask = mask & (q_pos - key_pos < self.cfg.sliding_window)
            masks[key] = mask
        return [masks[key] for key in zip(self.cfg.layer_types, self.cfg.causal_layers)]

    def run_blocks(
        self,
        block_embeds: torch.Tensor,
        positions: torch.Tensor,
        context: list[tuple[torch.Tensor, torch.Tensor]],
        masks: list[torch.Tensor],
    ) -> torch.Tensor:
        """The drafter's layers over block queries [B, T, H] with per-layer context K/V and masks; final-normed."""
        cos, sin = self.rope(positions, block_embeds.dtype)
        h = block_embeds
        for layer, mask, (k, v) in zip(self.layers, masks, context):
            h = layer(h, cos, sin, k, v, mask)
        return self.norm(h)

    # ---- inference: over paged state (the step and the eager runtime) ------------------------------------------

    def paged_context(self, ctx_k, ctx_v, features: torch.Tensor, positions: torch.Tensor, table: torch.Tensor):
        """Writes the context K/V of target features [N*T, taps*H] at positions [N, T] into the paged drafter
        context ctx_k/ctx_v [layers, pages, Hkv, PAGE, D], through table, for every layer at once."""
        cfg = self.cfg
        c = dflash.rms_norm(project(features, self.fc), self.hidden_norm.weight, cfg.rms_norm_eps, False)
        seq_idx, pos_flat = token_rows(positions)
        cos, sin = self.rope(pos_flat, c.dtype)
        kv = torch.cat(
            [torch.cat((project(c, ly.self_attn.k_proj), project(c, ly.self_attn.v_proj)), -1) for ly in self.layers],
            dim=-1,
        )
        k_norm = torch.stack([ly.self_attn.k_norm.weight for ly in self.layers])
        dflash.context_kv_write(kv, k_norm, cos, sin, ctx_k, ctx_v, seq_idx, pos_flat, table,
                                cfg.rms_norm_eps)  # fmt: skip

    def paged_draft(
        self, ctx_k, ctx_v, block_embeds: torch.Tensor, lens: torch.Tensor, table: torch.Tensor, max_len: int
    ) -> torch.Tensor:
        """Runs blocks [N, B, H] (each request's embedded [anchor, MASK x (B-1)] at positions lens[n] + t) over
        the paged context (positions < lens[n]). Returns the final-normed hidden states of slots 1..B-1,
        [N*(B-1), H]."""
        cfg = self.cfg
        n, b = block_embeds.shape[:2]
        hq, hkv, d, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
        positions = lens.long().unsqueeze(1) + torch.arange(b, device=lens.device)
        cos, sin = self.rope(positions.reshape(-1), block_embeds.dtype)
        h = block_embeds.reshape(n * b, -1)
        for li, layer in enumerate(self.layers):
            a = layer.self_attn
            x = dflash.rms_norm(h, layer.input_layernorm.weight, eps, False)
            q, k = dflash.qk_norm_rope(
                project(x, a.q_proj), project(x, a.k_proj), a.q_norm.weight, a.k_norm.weight, cos, sin, hq, hkv, eps
            )
            o = dflash.draft_attention(
                q.view(n, b, hq, d),
                k.view(n, b, hkv, d),
                project(x, a.v_proj).view(n, b, hkv, d),
                ctx_k[li],
                ctx_v[li],
                lens,
                table,
                bool(cfg.causal_layers[li]),
                cfg.sliding_window if cfg.layer_types[li] == "sliding_attention" else 0,
                max_len,
            )
            h = h + project(o.reshape(n * b, hq * d), a.o_proj)
            h = h + layer.mlp.paged(dflash.rms_norm(h, layer.post_attention_layernorm.weight, eps, False))
        h = h.view(n, b, -1)[:, 1:].reshape(n * (b - 1), -1)
        return dflash.rms_norm(h, self.norm.weight, eps, False)
