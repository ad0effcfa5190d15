"""The target model: Qwen3.5 hybrid (Gated DeltaNet + gated attention), Qwen3 and Llama decoders, in one definition.

Step functions are functional. `TargetModel.forward` reads the cache and writes nothing: it returns the block's
logits, the tapped features, the block's K/V and, for every GDN layer, what rebuilds its state after each block
position. `TargetModel.commit` then makes the accepted position current (KV written, GDN state selected), so
rejected drafts never need a re-run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import ops
from .config import TargetConfig
from .paged import Pools, VerifyOut, dflash, project, token_rows


@dataclass
class TargetCache:
    """Per-request decoding state. KV: [B, Hkv, S, D] per attention layer; conv windows [B, C, W-1] and
    recurrent states [B, HV, Dk, Dv] (fp32) per GDN layer. Entries at positions >= a request's length are
    never read."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    conv: list[torch.Tensor]
    recurrent: list[torch.Tensor]


@dataclass
class GDNBlockStates:
    """What rebuilds a GDN layer's state after any block position: the block's conv input with the window in
    front ([B, C, W-1+T]) and the recurrent state after every position ([B, T, ...]) or after the last ([B, 1, ...])."""

    conv_extended: torch.Tensor
    recurrent: torch.Tensor


@dataclass
class TargetOutput:
    logits: torch.Tensor  # [B, T, V] (or [B, 1, V] with last_logits_only)
    features: torch.Tensor | None  # [B, T, len(taps) * H]: outputs of the tapped layers
    block_k: list[torch.Tensor]  # per attention layer [B, Hkv, T, D]
    block_v: list[torch.Tensor]
    gdn: list[GDNBlockStates]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, zero_centered: bool):
        super().__init__()
        self.eps, self.zero_centered = eps, zero_centered
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centered else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, self.zero_centered)


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))

    def paged(self, x: torch.Tensor) -> torch.Tensor:
        """The same over token rows [M, H] in the IR's ops."""
        return project(dflash.swiglu(project(x, self.gate_proj), project(x, self.up_proj)), self.down_proj)


def block_mask(positions: torch.Tensor, cache_len: int) -> torch.Tensor:
    """Causal mask [B, T, S+T] for a block at contiguous positions over a cache holding positions < positions[:, 0]."""
    start = positions[:, :1]
    cached = torch.arange(cache_len, device=positions.device).view(1, 1, -1) < start.unsqueeze(-1)
    t = positions.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=positions.device).tril()
    return torch.cat((cached.expand(-1, t, -1), causal.expand(positions.shape[0], -1, -1)), dim=-1)


class Attention(nn.Module):
    """Full attention; with `output_gate` the Qwen3.5 gated form (q_proj rows per head: [query | gate])."""

    def __init__(self, cfg: TargetConfig):
        super().__init__()
        self.cfg = cfg
        q_width = cfg.num_heads * cfg.head_dim * (2 if cfg.attn_output_gate else 1)
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, q_width, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.zero_centered_norm)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.zero_centered_norm)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        bsz, t, _ = x.shape
        d = cfg.head_dim
        qg = self.q_proj(x)
        if cfg.attn_output_gate:
            q, gate = qg.view(bsz, t, cfg.num_heads, 2 * d).chunk(2, dim=-1)
            gate = gate.reshape(bsz, t, -1)
        else:
            q, gate = qg.view(bsz, t, cfg.num_heads, d), None
        k = self.k_proj(x).view(bsz, t, cfg.num_kv_heads, d)
        v = self.v_proj(x).view(bsz, t, cfg.num_kv_heads, d).transpose(1, 2)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = ops.apply_rope(q.transpose(1, 2), cos, sin)
        k = ops.apply_rope(k.transpose(1, 2), cos, sin)
        keys = torch.cat((k_cache, k), dim=2)
        values = torch.cat((v_cache, v), dim=2)
        out = ops.attention(q, keys, values, mask, d**-0.5).transpose(1, 2).reshape(bsz, t, -1)
        if gate is not None:
            out = out * torch.sigmoid(gate)
        return self.o_proj(out), k, v

    def paged(self, x, cos, sin, k_cache, v_cache, lens, table, seq_idx, pos_flat, max_len) -> torch.Tensor:
        """Token rows x [N*T, H] of N requests' blocks at positions lens[n] + t: the block's K/V written into the
        paged caches, then attention over them. Returns the layer's output rows (before the residual)."""
        cfg = self.cfg
        n = lens.shape[0]
        hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, gate = dflash.qk_norm_rope_write(
            project(x, self.q_proj),
            project(x, self.k_proj),
            project(x, self.v_proj),
            self.q_norm.weight if cfg.qk_norm else None,
            self.k_norm.weight if cfg.qk_norm else None,
            cos,
            sin,
            k_cache,
            v_cache,
            seq_idx,
            pos_flat,
            table,
            hq,
            hkv,
            cfg.rms_norm_eps,
            cfg.attn_output_gate,
            cfg.zero_centered_norm,
        )
        o = dflash.verify_attention(q.view(n, -1, hq, d), k_cache, v_cache, lens, table, max_len)
        o = o.reshape(-1, hq * d)
        if cfg.attn_output_gate:
            o = o * torch.sigmoid(gate)
        return project(o, self.o_proj)


class GatedDeltaNet(nn.Module):
    """Qwen3.5 linear-attention mixer: causal conv1d, gated delta rule, gated RMSNorm, out projection."""

    def __init__(self, cfg: TargetConfig):
        super().__init__()
        self.cfg = cfg
        h, hv = cfg.hidden_size, cfg.linear_num_value_heads
        self.in_proj_qkv = nn.Linear(h, cfg.gdn_conv_dim, bias=False)
        self.in_proj_z = nn.Linear(h, cfg.gdn_value_dim, bias=False)
        self.in_proj_b = nn.Linear(h, hv, bias=False)
        self.in_proj_a = nn.Linear(h, hv, bias=False)
        self.conv1d = nn.Conv1d(
            cfg.gdn_conv_dim, cfg.gdn_conv_dim, cfg.linear_conv_kernel_dim, groups=cfg.gdn_conv_dim, bias=False
        )
        self.dt_bias = nn.Parameter(torch.ones(hv))
        self.A_log = nn.Parameter(torch.zeros(hv))
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.ones(cfg.linear_value_head_dim))
        self.out_proj = nn.Linear(cfg.gdn_value_dim, h, bias=False)

    def forward(
        self, x: torch.Tensor, conv_window: torch.Tensor, state: torch.Tensor, per_position: bool
    ) -> tuple[torch.Tensor, GDNBlockStates]:
        cfg = self.cfg
        bsz, t, _ = x.shape
        mixed, extended = ops.causal_conv1d(self.in_proj_qkv(x).transpose(1, 2), conv_window, self.conv1d.weight[:, 0])
        q, k, v = mixed.transpose(1, 2).split([cfg.gdn_key_dim, cfg.gdn_key_dim, cfg.gdn_value_dim], dim=-1)
        q = q.reshape(bsz, t, cfg.linear_num_key_heads, cfg.linear_key_head_dim)
        k = k.reshape(bsz, t, cfg.linear_num_key_heads, cfg.linear_key_head_dim)
        v = v.reshape(bsz, t, cfg.linear_num_value_heads, cfg.linear_value_head_dim)
        g, beta = ops.gdn_gates(self.in_proj_a(x), self.in_proj_b(x), self.A_log, self.dt_bias)
        if per_position:
            o, states = ops.gated_delta_rule_recurrent(q, k, v, g, beta, state, all_states=True)
        else:
            o, final = ops.gated_delta_rule_chunked(q, k, v, g, beta, state)
            states = final.unsqueeze(1)
        z = self.in_proj_z(x).view(bsz, t, cfg.linear_num_value_heads, cfg.linear_value_head_dim)
        o = ops.gated_rms_norm(o, z, self.norm.weight, cfg.rms_norm_eps)
        return self.out_proj(o.reshape(bsz, t, -1)), GDNBlockStates(extended, states)

    def paged(self, x, state, window, n: int, mode: str, saved: list) -> torch.Tensor:
        """Token rows x [N*T, H] of N requests' blocks over their state rows (state [N, HV, K, V], window
        [N, C, W-1]). mode "verify" leaves both as they are and appends what the replay commit needs to saved;
        "prefill" advances them in place. Returns the mixer's output rows (before the residual)."""
        cfg = self.cfg
        hv, kd = cfg.linear_num_value_heads, cfg.gdn_key_dim
        mixed = project(x, self.in_proj_qkv).view(n, -1, cfg.gdn_conv_dim)
        t = mixed.shape[1]
        z = project(x, self.in_proj_z)
        b = project(x, self.in_proj_b).view(n, t, hv)
        a = project(x, self.in_proj_a).view(n, t, hv)
        y = dflash.causal_conv1d_update(mixed, window, self.conv1d.weight[:, 0].contiguous())
        q = y[..., :kd].view(n, t, cfg.linear_num_key_heads, cfg.linear_key_head_dim)
        k = y[..., kd : 2 * kd].view(n, t, cfg.linear_num_key_heads, cfg.linear_key_head_dim)
        v = y[..., 2 * kd :].view(n, t, hv, cfg.linear_value_head_dim)
        a_log, dt_bias = self.A_log.float(), self.dt_bias.float()
        if mode == "verify":
            o = dflash.gdn_verify(q, k, v, a, b, a_log, dt_bias, state)
            saved.append((k, v, a, b, mixed))
        else:
            o = dflash.gdn_prefill(q, k, v, a, b, a_log, dt_bias, state, window, mixed)
        o = dflash.gated_rms_norm(o.reshape(n * t, hv, -1), z.view(n * t, hv, -1), self.norm.weight, cfg.rms_norm_eps)
        return project(o.view(n * t, cfg.gdn_value_dim), self.out_proj)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TargetConfig, layer_type: str):
        super().__init__()
        self.is_gdn = layer_type == "linear_attention"
        if self.is_gdn:
            self.linear_attn = GatedDeltaNet(cfg)
        else:
            self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.zero_centered_norm)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.zero_centered_norm)


class TargetModel(nn.Module):
    def __init__(self, cfg: TargetConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, t) for t in cfg.layer_types)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.zero_centered_norm)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        inv_freq, self.rope_scale = cfg.rope.inv_freq()
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None) -> TargetCache:
        cfg = self.cfg
        device = device or self.embed_tokens.weight.device
        dtype = dtype or self.embed_tokens.weight.dtype
        n_attn, n_gdn = len(cfg.attention_layers), len(cfg.gdn_layers)
        kv_shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        state_shape = (batch, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim)
        conv_shape = (batch, cfg.gdn_conv_dim, max(cfg.linear_conv_kernel_dim - 1, 0))
        return TargetCache(
            k=[torch.zeros(kv_shape, device=device, dtype=dtype) for _ in range(n_attn)],
            v=[torch.zeros(kv_shape, device=device, dtype=dtype) for _ in range(n_attn)],
            conv=[torch.zeros(conv_shape, device=device, dtype=dtype) for _ in range(n_gdn)],
            recurrent=[torch.zeros(state_shape, device=device, dtype=torch.float32) for _ in range(n_gdn)],
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: TargetCache,
        taps: tuple[int, ...] = (),
        per_position_states: bool = True,
        last_logits_only: bool = False,
    ) -> TargetOutput:
        """Runs a block of T tokens at contiguous positions [B, T] on top of the cache, without changing it.

        per_position_states: keep every GDN state of the block (verify) instead of the last only (prefill).
        """
        h = self.embed_tokens(input_ids)
        cos, sin = ops.rope_cos_sin(self.inv_freq, positions, self.rope_scale, h.dtype)
        mask = block_mask(positions, cache.k[0].shape[2]) if cache.k else None
        tapped = []
        block_k, block_v, gdn = [], [], []
        for i, layer in enumerate(self.layers):
            x = layer.input_layernorm(h)
            if layer.is_gdn:
                j = len(gdn)
                x, states = layer.linear_attn(x, cache.conv[j], cache.recurrent[j], per_position_states)
                gdn.append(states)
            else:
                j = len(block_k)
                x, k, v = layer.self_attn(x, cos, sin, cache.k[j], cache.v[j], mask)
                block_k.append(k)
                block_v.append(v)
            h = h + x
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            if i in taps:
                tapped.append(h)
        features = torch.cat([tapped[sorted(taps).index(i)] for i in taps], dim=-1) if taps else None
        if last_logits_only:
            h = h[:, -1:]
        logits = self.lm_head(self.norm(h))
        return TargetOutput(logits, features, block_k, block_v, gdn)

    def paged_forward(
        self,
        pools: Pools,
        tokens: torch.Tensor,
        lens: torch.Tensor,
        table: torch.Tensor,
        mode: str,
        taps: tuple[int, ...] = (),
        max_len: int = 0,
        last_only: bool = False,
    ) -> VerifyOut:
        """Runs blocks tokens [N, T] of the requests in `pools` (a row view, Pools.rows) at positions lens[n] + t
        over their pages through `table`, in the IR's ops. Attention K/V of every block position is written.

        mode "verify" leaves the GDN states as they are and returns what the replay commit needs (autoregressive
        decoding is a verify of one token); "prefill" advances them in place. max_len bounds cache length + block.
        """
        cfg = self.cfg
        n, t = tokens.shape
        positions = lens.long().unsqueeze(1) + torch.arange(t, device=tokens.device)
        seq_idx, pos_flat = token_rows(positions)
        h = torch.nn.functional.embedding(tokens.reshape(-1), self.embed_tokens.weight)
        cos, sin = ops.rope_cos_sin(self.inv_freq, pos_flat, self.rope_scale, h.dtype)
        eps, zc = cfg.rms_norm_eps, cfg.zero_centered_norm
        tapped, saved = {}, []
        i_attn = i_gdn = 0
        for i, layer in enumerate(self.layers):
            x = dflash.rms_norm(h, layer.input_layernorm.weight, eps, zc)
            if layer.is_gdn:
                state, window = pools.gdn_state[i_gdn], pools.conv_window[i_gdn]
                h = h + layer.linear_attn.paged(x, state, window, n, mode, saved)
                i_gdn += 1
            else:
                kc, vc = pools.k_cache[i_attn], pools.v_cache[i_attn]
                h = h + layer.self_attn.paged(x, cos, sin, kc, vc, lens, table, seq_idx, pos_flat, max_len)
                i_attn += 1
            h = h + layer.mlp.paged(dflash.rms_norm(h, layer.post_attention_layernorm.weight, eps, zc))
            if i in taps:
                tapped[i] = h
        features = torch.cat([tapped[i] for i in taps], dim=-1) if taps else None
        if last_only:
            h = h.view(n, t, -1)[:, -1]
        logits = project(dflash.rms_norm(h, self.norm.weight, eps, zc), self.lm_head)
        return VerifyOut(logits.view(n, -1, logits.shape[-1]), features, positions, saved, table, lens)

    def commit(
        self, cache: TargetCache, out: TargetOutput, positions: torch.Tensor, index: torch.Tensor
    ) -> TargetCache:
        """Makes block position index[b] (per request) the last committed one: writes the block's K/V and
        selects the GDN state after that position. KV past it is written too but is never read."""
        if cache.k:
            slots = positions.view(positions.shape[0], 1, -1, 1).expand(
                -1, self.cfg.num_kv_heads, -1, self.cfg.head_dim
            )
            for kc, vc, k, v in zip(cache.k, cache.v, out.block_k, out.block_v):
                kc.scatter_(2, slots, k.to(kc.dtype))
                vc.scatter_(2, slots, v.to(vc.dtype))
        width = self.cfg.linear_conv_kernel_dim
        conv, recurrent = [], []
        for states in out.gdn:
            conv.append(ops.conv_window_after(states.conv_extended, index, width))
            rec_index = index if states.recurrent.shape[1] > 1 else torch.zeros_like(index)
            rec = states.recurrent.gather(1, rec_index.view(-1, 1, 1, 1, 1).expand(-1, 1, *states.recurrent.shape[2:]))
            recurrent.append(rec[:, 0])
        return TargetCache(cache.k, cache.v, conv, recurrent)


# Caches and step outputs cross torch.export and CUDA-graph boundaries as pytrees of tensors.
for _cls in (TargetCache, GDNBlockStates, TargetOutput):
    torch.export.register_dataclass(_cls)
