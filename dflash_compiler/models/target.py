"""The target model: Qwen3.5 hybrid (Gated DeltaNet + gated attention), Qwen3 and Llama decoders, in one definition.

The forward is `TargetModel.paged_forward`, written in the IR's ops (`torch.ops.dflash.*`) over pooled state
(`Pools`: a paged KV cache and GDN state rows). It runs eagerly on any device and is what the compiler traces:
prefill advances the state in place; verify writes the block's K/V and its GDN update rows, returning what
`paged_commit` needs to keep any block position (it becomes the rows' pending block, which the next verify makes
current while it reads the state), so rejected drafts never need a re-run.
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from .config import TargetConfig
from .paged import Pools, VerifyOut, dflash, project, token_rows


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
        """Over [..., H] in PyTorch ops (the drafter's training forward, which needs autograd)."""
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))

    def paged(self, x: torch.Tensor) -> torch.Tensor:
        """The same over token rows [M, H] in the IR's ops."""
        return project(dflash.swiglu(project(x, self.gate_proj), project(x, self.up_proj)), self.down_proj)


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

    def paged(self, x, pools: Pools, layer: int, n: int, mode: str, saved: list) -> torch.Tensor:
        """Token rows x [N*T, H] of N requests' blocks over their GDN rows of `layer` in pools (a row view): the state
        with its pending block, the conv window. mode "verify" makes the pending block current in the state, writes
        this block's update rows as the next pending block's and appends what the commit needs to saved; "prefill"
        advances state and window in place. Returns the mixer's output rows (before the residual)."""
        cfg = self.cfg
        hv, kd = cfg.linear_num_value_heads, cfg.gdn_key_dim
        mixed = project(x, self.in_proj_qkv).view(n, -1, cfg.gdn_conv_dim)
        t = mixed.shape[1]
        z = project(x, self.in_proj_z)
        b = project(x, self.in_proj_b).view(n, t, hv)
        a = project(x, self.in_proj_a).view(n, t, hv)
        state, window = pools.gdn_state[layer], pools.conv_window[layer]
        pending = (pools.gdn_keys[layer], pools.gdn_gates[layer], pools.gdn_rows[layer], pools.gdn_pending)
        y = dflash.causal_conv1d_update(mixed, window, self.conv1d.weight[:, 0].contiguous())
        q = y[..., :kd].view(n, t, cfg.linear_num_key_heads, cfg.linear_key_head_dim)
        k = y[..., kd : 2 * kd].view(n, t, cfg.linear_num_key_heads, cfg.linear_key_head_dim)
        v = y[..., 2 * kd :].view(n, t, hv, cfg.linear_value_head_dim)
        a_log, dt_bias = self.A_log.float(), self.dt_bias.float()
        if mode == "verify":
            o = dflash.gdn_verify(q, k, v, a, b, a_log, dt_bias, state, *pending)
            saved.append((k, a, mixed))
        else:
            o = dflash.gdn_prefill(q, k, v, a, b, a_log, dt_bias, state, window, mixed, *pending)
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

        mode "verify" leaves the GDN states as they are and returns what the commit needs (autoregressive
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
                h = h + layer.linear_attn.paged(x, pools, i_gdn, n, mode, saved)
                i_gdn += 1
            else:
                kc, vc = pools.k_cache[i_attn], pools.v_cache[i_attn]
                h = h + layer.self_attn.paged(x, cos, sin, kc, vc, lens, table, seq_idx, pos_flat, max_len)
                i_attn += 1
            h = h + layer.mlp.paged(dflash.rms_norm(h, layer.post_attention_layernorm.weight, eps, zc))
            if i in taps:
                tapped[i] = h
        if mode == "prefill" and cfg.gdn_layers:
            pools.gdn_pending.fill_(-1)  # every layer's prefill made it current
        last = len(self.layers) - 1
        if last in taps:
            # Upstream taps hidden_states[layer + 1], and transformers' last entry is after the final norm.
            h = tapped[last] = dflash.rms_norm(h, self.norm.weight, eps, zc)
        features = torch.cat([tapped[i] for i in taps], dim=-1) if taps else None
        if last_only:
            h = h.view(n, t, -1)[:, -1]
        if last not in taps:
            h = dflash.rms_norm(h, self.norm.weight, eps, zc)
        logits = project(h, self.lm_head)
        return VerifyOut(logits.view(n, -1, logits.shape[-1]), features, positions, saved, table, lens)

    def paged_commit(self, pools: Pools, vout: VerifyOut, idx: torch.Tensor) -> None:
        """Keeps block position idx[n] (int32, -1 keeps the row as it is) of the requests verified in vout: their conv
        windows move to it, and the block becomes their GDN rows' pending block up to it (its keys and gates kept
        here, its update rows by the verify), which the next verify or prefill makes current in the state. KV needs
        nothing: the verify wrote it, and positions past the cache length are never read."""
        for j, (k, a, x) in enumerate(vout.saved):
            dflash.gdn_commit(pools.conv_window[j], idx, x, k, a, pools.gdn_keys[j], pools.gdn_gates[j])
        if vout.saved:
            pools.gdn_pending.copy_(idx)
