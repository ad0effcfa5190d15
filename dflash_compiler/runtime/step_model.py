"""The batched speculative step over pooled device state, built from the kernel ops.

One step, for rows 0..n-1 of the pools at once: verify each row's block `[anchor, d1..d(B-1)]` on the target ->
accept on device -> commit (KV length; the GDN state of the accepted position, replayed from the block's saved
inputs) -> write the verified tokens' tapped features into the drafter's context K/V -> draft the next block.
Every input and output lives in fixed device buffers (`Pools`) and nothing reads a value back to the host, so a
step is captured once per batch-size bucket as a CUDA graph and replayed.

Rows whose `active` flag is off (free rows inside a bucket) compute on a scratch page and change nothing that a
live row reads. The last pool row is reserved for the request being prefilled, outside every bucket.

Ops come from a namespace with the kernel launchers' signatures: the Triton kernels on CUDA, or their PyTorch
lowering (`codegen/reference.py`) anywhere, which is how the CPU tests run this step.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from ..codegen.weight_formats import (
    DenseWeight,
    quantize_fp8_channel,
    quantize_int4,
)
from ..errors import DFlashError
from ..models import ops as ref
from ..models.drafter import DFlashDrafter
from ..models.target import TargetModel
from .sampling import row_probabilities, sample_from

PAGE_SIZE = 64
# Rows from which a linear goes to the vendor GEMM instead of the Triton kernel (see codegen/vendor_gemm.py). Below
# it the step reads weights (the Triton kernel streams them at up to the copy bandwidth); from about here on the
# step is compute-bound. A default until the tuning database measures the crossover per shape.
VENDOR_GEMM_MIN_ROWS = 64
QUANTS = ("bf16", "fp8", "int4")


def kernel_ops(name: str) -> SimpleNamespace:
    """The op namespace: "triton" (the kernels) or "reference" (PyTorch, any device)."""
    if name == "reference":
        from ..codegen import reference

        return SimpleNamespace(**{k: getattr(reference, k) for k in _OP_NAMES})
    if name == "triton":
        from ..codegen import vendor_gemm
        from ..codegen.triton import accept, attention, fused_ops, gdn, linear

        modules = (accept, attention, fused_ops, gdn, linear)
        ops = SimpleNamespace(**{k: next(getattr(m, k) for m in modules if hasattr(m, k)) for k in _OP_NAMES})
        kernel_linear = ops.linear

        def linear_by_rows(x, weight, **kwargs):
            if x.shape[0] >= VENDOR_GEMM_MIN_ROWS and vendor_gemm.supports(x, weight):
                return vendor_gemm.linear(x, weight, **kwargs)
            return kernel_linear(x, weight, **kwargs)

        ops.linear = linear_by_rows
        return ops
    raise DFlashError(f"parameter 'ops' must be 'triton' or 'reference', got {name!r}")


_OP_NAMES = (
    "linear",
    "rms_norm",
    "qk_norm_rope",
    "context_kv_project",
    "verify_attention",
    "draft_attention",
    "causal_conv1d_update",
    "conv_window_commit",
    "gdn_recurrent",
    "gdn_verify",
    "gdn_commit",
    "gdn_chunked",
    "greedy_accept",
    "rejection_accept",
)


def kernel_weight(w: torch.Tensor, quant: str):
    """A linear weight [N, K] in the kernels' format: bf16 (as loaded), FP8 per output channel, or INT4 group-128
    symmetric, both by round-to-nearest."""
    if quant == "bf16":
        return DenseWeight(w.contiguous())
    if quant == "fp8":
        return quantize_fp8_channel(w)
    if quant == "int4":
        if w.shape[1] % 128:
            return DenseWeight(w.contiguous())  # no whole groups: kept dense
        return quantize_int4(w, group_size=128)
    raise DFlashError(f"parameter 'quant' must be one of {', '.join(QUANTS)}, got {quant!r}")


def _cat_rows(*linears) -> torch.Tensor:
    return torch.cat([lin.weight.detach() for lin in linears], dim=0)


def _cat_bias(*linears) -> torch.Tensor | None:
    if linears[0].bias is None:
        return None
    return torch.cat([lin.bias.detach() for lin in linears], dim=0)


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
    gdn_state: torch.Tensor  # [layers, R, HV, K, V] fp32
    conv_window: torch.Tensor  # [layers, R, C, W-1]
    k_cache: list[torch.Tensor]  # per attention layer [pages, Hkv, PAGE, D]
    v_cache: list[torch.Tensor]
    ctx_k: torch.Tensor | None  # drafter context [layers, pages, Hkv, PAGE, D]
    ctx_v: torch.Tensor | None
    out_tokens: torch.Tensor  # [R, B] int64: committed tokens of the last step
    out_count: torch.Tensor  # [R] int32
    profile: torch.Tensor  # [B-1] fp32: simulated per-position acceptance
    draft_probs: torch.Tensor | None = None  # [R, B-1, V] fp32, for sampled rows

    def row_tensors(self) -> list[torch.Tensor]:
        """Every buffer indexed by row first (what moves when a request changes rows)."""
        rows = [self.tokens, self.cache_lens, self.active, self.block_table, self.temperature, self.top_k]
        rows += [self.top_p, self.out_tokens, self.out_count]
        return rows + ([self.draft_probs] if self.draft_probs is not None else [])

    def move_row(self, src: int, dst: int) -> None:
        for t in self.row_tensors():
            t[dst].copy_(t[src])
        self.gdn_state[:, dst].copy_(self.gdn_state[:, src])
        self.conv_window[:, dst].copy_(self.conv_window[:, src])


@dataclass
class VerifyOut:
    logits: torch.Tensor  # [N, T, V]
    features: torch.Tensor | None  # [N*T, taps*H]
    positions: torch.Tensor  # [N, T]
    saved: list  # per GDN layer: (k, v, a, b, x) for the replay commit
    table: torch.Tensor  # [N, P] the block table the block was written through
    lens: torch.Tensor  # [N] cache lengths before the block


class StepModel:
    """Weights in kernel formats and the step's phases over `Pools`.

    quant converts the linear layers at construction (FP8 per channel or INT4 group-128, round-to-nearest). With
    consume=True each layer's original weight is released as soon as it is converted, so converting never holds
    two copies of the model; the modules cannot run afterwards.
    """

    def __init__(
        self,
        target: TargetModel,
        drafter: DFlashDrafter | None,
        block_size: int,
        quant: str = "bf16",
        ops: str = "triton",
        consume: bool = False,
    ):
        cfg = target.cfg
        self.cfg, self.block_size, self.quant = cfg, block_size, quant
        self.max_len: int | None = None  # host bound on cache length + block; sizes attention splits
        self.ops = kernel_ops(ops)
        self.device = target.embed_tokens.weight.device
        self.dtype = target.embed_tokens.weight.dtype
        self.embed = target.embed_tokens.weight.detach()
        self.target_inv_freq, self.target_rope_scale = target.inv_freq, target.rope_scale
        self.taps = tuple(drafter.cfg.target_layer_ids) if drafter is not None and block_size > 1 else ()

        def convert(*linears):
            w = kernel_weight(_cat_rows(*linears), quant)
            if consume:
                for lin in linears:
                    lin.weight = None
            return w

        self.layers = []
        for layer in target.layers:
            entry = SimpleNamespace(
                is_gdn=layer.is_gdn,
                in_norm=layer.input_layernorm.weight.detach(),
                post_norm=layer.post_attention_layernorm.weight.detach(),
            )
            if layer.is_gdn:
                m = layer.linear_attn
                entry.w_in = convert(m.in_proj_qkv, m.in_proj_z, m.in_proj_b, m.in_proj_a)
                entry.conv_w = m.conv1d.weight.detach()[:, 0].contiguous()
                entry.a_log = m.A_log.detach().float().contiguous()
                entry.dt_bias = m.dt_bias.detach().float().contiguous()
                entry.norm = m.norm.weight.detach()
                entry.w_out = convert(m.out_proj)
            else:
                a = layer.self_attn
                entry.qkv_bias = _cat_bias(a.q_proj, a.k_proj, a.v_proj)
                entry.o_bias = a.o_proj.bias.detach() if a.o_proj.bias is not None else None
                entry.w_qkv = convert(a.q_proj, a.k_proj, a.v_proj)
                entry.w_o = convert(a.o_proj)
                entry.q_norm = a.q_norm.weight.detach() if cfg.qk_norm else None
                entry.k_norm = a.k_norm.weight.detach() if cfg.qk_norm else None
            mlp = layer.mlp
            entry.w_gate_up = convert(mlp.gate_proj, mlp.up_proj)
            entry.w_down = convert(mlp.down_proj)
            self.layers.append(entry)
        self.norm = target.norm.weight.detach()
        # lm_head stays in the checkpoint's precision unless quantized; a tied head shares the embedding.
        head = target.lm_head.weight.detach()
        self.lm_head = kernel_weight(head, quant)
        if consume and quant != "bf16" and head.data_ptr() != self.embed.data_ptr():
            target.lm_head.weight = None
        self.drafter = None
        if drafter is not None and block_size > 1:
            self.drafter = self._drafter_weights(drafter, convert)

    def _drafter_weights(self, drafter: DFlashDrafter, convert) -> SimpleNamespace:
        dc = drafter.cfg
        if dc.attention_bias:
            raise DFlashError(f"{dc.source}: drafters with attention biases are not supported by the batched runtime")
        # The context K/V projection of every layer at once, dense (context_kv_project multiplies in torch).
        w_ctx = torch.cat(
            [torch.cat((ly.self_attn.k_proj.weight, ly.self_attn.v_proj.weight)) for ly in drafter.layers]
        )
        layers = []
        for layer in drafter.layers:
            a = layer.self_attn
            layers.append(
                SimpleNamespace(
                    in_norm=layer.input_layernorm.weight.detach(),
                    post_norm=layer.post_attention_layernorm.weight.detach(),
                    w_qkv=convert(a.q_proj, a.k_proj, a.v_proj),
                    w_o=convert(a.o_proj),
                    q_norm=a.q_norm.weight.detach(),
                    k_norm=a.k_norm.weight.detach(),
                    w_gate_up=convert(layer.mlp.gate_proj, layer.mlp.up_proj),
                    w_down=convert(layer.mlp.down_proj),
                )
            )
        return SimpleNamespace(
            cfg=dc,
            fc=convert(drafter.fc),
            hidden_norm=drafter.hidden_norm.weight.detach(),
            layers=layers,
            norm=drafter.norm.weight.detach(),
            w_ctx=w_ctx.detach().contiguous(),
            ctx_k_norm=torch.stack([ly.self_attn.k_norm.weight.detach() for ly in drafter.layers]).contiguous(),
            inv_freq=drafter.inv_freq,
            rope_scale=drafter.rope_scale,
            causal=[bool(c) for c in dc.causal_layers],
            window=[dc.sliding_window if t == "sliding_attention" else 0 for t in dc.layer_types],
        )

    # ---- memory ------------------------------------------------------------------------------------------

    def page_bytes(self) -> int:
        """Bytes of one KV page over every target attention layer and drafter layer."""
        cfg, per = self.cfg, 0
        per += len(cfg.attention_layers) * 2 * cfg.num_kv_heads * cfg.head_dim
        if self.drafter is not None:
            dc = self.drafter.cfg
            per += dc.num_layers * 2 * dc.num_kv_heads * dc.head_dim
        return per * PAGE_SIZE * self.dtype.itemsize

    def row_bytes(self) -> int:
        """Bytes of one row's GDN state and conv window."""
        cfg = self.cfg
        state = cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * 4
        conv = cfg.gdn_conv_dim * max(cfg.linear_conv_kernel_dim - 1, 0) * self.dtype.itemsize
        return len(cfg.gdn_layers) * (state + conv)

    def new_pools(self, rows: int, pages: int, pages_per_row: int) -> Pools:
        cfg, dev, dt, b = self.cfg, self.device, self.dtype, self.block_size
        n_gdn = len(cfg.gdn_layers)
        kv = (pages, cfg.num_kv_heads, PAGE_SIZE, cfg.head_dim)
        ctx_k = ctx_v = None
        if self.drafter is not None:
            dc = self.drafter.cfg
            shape = (dc.num_layers, pages, dc.num_kv_heads, PAGE_SIZE, dc.head_dim)
            ctx_k, ctx_v = torch.zeros(shape, device=dev, dtype=dt), torch.zeros(shape, device=dev, dtype=dt)
        return Pools(
            tokens=torch.zeros(rows, b, dtype=torch.long, device=dev),
            cache_lens=torch.zeros(rows, dtype=torch.int32, device=dev),
            active=torch.zeros(rows, dtype=torch.bool, device=dev),
            block_table=torch.zeros(rows, pages_per_row, dtype=torch.int32, device=dev),
            temperature=torch.zeros(rows, device=dev),
            top_k=torch.zeros(rows, dtype=torch.long, device=dev),
            top_p=torch.ones(rows, device=dev),
            gdn_state=torch.zeros(
                n_gdn,
                rows,
                cfg.linear_num_value_heads,
                cfg.linear_key_head_dim,
                cfg.linear_value_head_dim,
                device=dev,
            ),
            conv_window=torch.zeros(
                n_gdn, rows, cfg.gdn_conv_dim, max(cfg.linear_conv_kernel_dim - 1, 0), device=dev, dtype=dt
            ),
            k_cache=[torch.zeros(kv, device=dev, dtype=dt) for _ in cfg.attention_layers],
            v_cache=[torch.zeros(kv, device=dev, dtype=dt) for _ in cfg.attention_layers],
            ctx_k=ctx_k,
            ctx_v=ctx_v,
            out_tokens=torch.zeros(rows, b, dtype=torch.long, device=dev),
            out_count=torch.zeros(rows, dtype=torch.int32, device=dev),
            profile=torch.zeros(max(b - 1, 0), device=dev),
        )

    # ---- the target ------------------------------------------------------------------------------------

    def _linear(self, x, w, *, bias=None, residual=None, swiglu=False):
        if bias is None:
            return self.ops.linear(x, w, residual=residual, swiglu=swiglu)
        y = self.ops.linear(x, w) + bias
        return y if residual is None else y + residual

    def target_forward(
        self,
        pools: Pools,
        rows: slice,
        tokens: torch.Tensor,
        lens: torch.Tensor,
        block_table: torch.Tensor,
        mode: str,
        last_only: bool = False,
    ) -> VerifyOut:
        """Runs tokens [N, T] of pool rows `rows` at positions lens[n] + t over their pages.

        mode "verify" leaves GDN states as they were and returns what the replay commit needs (autoregressive
        decoding is a verify of one token); "prefill" advances the GDN states in place. Attention K/V of every
        block position is written.
        """
        cfg, ops = self.cfg, self.ops
        n, t = tokens.shape
        positions = lens.long().unsqueeze(1) + torch.arange(t, device=tokens.device)
        pos_flat = positions.reshape(-1)
        seq_idx = torch.arange(n, device=tokens.device).repeat_interleave(t)
        cos, sin = ref.rope_cos_sin(self.target_inv_freq, pos_flat, self.target_rope_scale, self.dtype)
        h = self.embed[tokens.reshape(-1)]
        tapped, saved = {}, []
        eps, zc = cfg.rms_norm_eps, cfg.zero_centered_norm
        i_attn = i_gdn = 0
        for i, layer in enumerate(self.layers):
            x = ops.rms_norm(h, layer.in_norm, eps, zero_centered=zc)
            if layer.is_gdn:
                h = self._gdn(layer, x, h, pools, rows, i_gdn, n, t, mode, saved)
                i_gdn += 1
            else:
                h = self._attention(layer, x, h, pools, i_attn, n, t, cos, sin, lens, block_table, seq_idx, pos_flat)
                i_attn += 1
            x = ops.rms_norm(h, layer.post_norm, eps, zero_centered=zc)
            g = ops.linear(x, layer.w_gate_up, swiglu=True)
            h = ops.linear(g, layer.w_down, residual=h)
            if i in self.taps:
                tapped[i] = h
        features = torch.cat([tapped[i] for i in self.taps], dim=-1) if self.taps else None
        if last_only:
            h = h.view(n, t, -1)[:, -1]
        logits = ops.linear(ops.rms_norm(h, self.norm, eps, zero_centered=zc), self.lm_head)
        return VerifyOut(logits.view(n, -1, logits.shape[-1]), features, positions, saved, block_table, lens)

    def _gdn(self, layer, x, h, pools, rows, j, n, t, mode, saved):
        cfg, ops = self.cfg, self.ops
        c, kd, vd, hv = cfg.gdn_conv_dim, cfg.gdn_key_dim, cfg.gdn_value_dim, cfg.linear_num_value_heads
        proj = ops.linear(x, layer.w_in)
        mixed = proj[:, :c].view(n, t, c)
        z = proj[:, c : c + vd]
        b = proj[:, c + vd : c + vd + hv].view(n, t, hv)
        a = proj[:, c + vd + hv :].view(n, t, hv)
        state = pools.gdn_state[j, rows]
        window = pools.conv_window[j, rows]
        y = ops.causal_conv1d_update(mixed, window, layer.conv_w)
        q = y[..., :kd].view(n, t, cfg.linear_num_key_heads, cfg.linear_key_head_dim)
        k = y[..., kd : 2 * kd].view(n, t, cfg.linear_num_key_heads, cfg.linear_key_head_dim)
        v = y[..., 2 * kd :].view(n, t, hv, cfg.linear_value_head_dim)
        if mode == "verify":
            o, _ = ops.gdn_verify(q, k, v, a, b, layer.a_log, layer.dt_bias, state, capture=0)
            saved.append((k, v, a, b, mixed))
        else:
            o, _ = ops.gdn_chunked(q, k, v, a, b, layer.a_log, layer.dt_bias, state, final_state=state)
            ops.conv_window_commit(window, mixed, torch.full((n,), t - 1, dtype=torch.int32, device=x.device))
        o = ref.gated_rms_norm(o.reshape(n * t, hv, -1), z.reshape(n * t, hv, -1), layer.norm, cfg.rms_norm_eps)
        return ops.linear(o.reshape(n * t, vd), layer.w_out, residual=h)

    def _attention(self, layer, x, h, pools, j, n, t, cos, sin, lens, block_table, seq_idx, pos_flat):
        cfg, ops = self.cfg, self.ops
        hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qw = hq * d * (2 if cfg.attn_output_gate else 1)
        qkv = self._linear(x, layer.w_qkv, bias=layer.qkv_bias)
        q_proj, k_proj, v_proj = qkv[:, :qw], qkv[:, qw : qw + hkv * d], qkv[:, qw + hkv * d :]
        kc, vc = pools.k_cache[j], pools.v_cache[j]
        if layer.q_norm is not None:
            q, _, gate = ops.qk_norm_rope(
                q_proj,
                k_proj,
                layer.q_norm,
                layer.k_norm,
                cos,
                sin,
                num_q_heads=hq,
                num_kv_heads=hkv,
                eps=cfg.rms_norm_eps,
                gated=cfg.attn_output_gate,
                zero_centered=cfg.zero_centered_norm,
                v_proj=v_proj,
                k_cache=kc,
                v_cache=vc,
                seq_idx=seq_idx,
                positions=pos_flat,
                block_table=block_table,
            )
        else:  # no q/k norm (Llama): RoPE and the paged write in torch
            q, gate = self._rope_write(q_proj, k_proj, v_proj, cos, sin, kc, vc, seq_idx, pos_flat, block_table)
        o = ops.verify_attention(q.view(n, t, hq, d), kc, vc, lens, block_table=block_table, max_len=self.max_len)
        o = o.reshape(n * t, hq * d)
        if gate is not None:
            o = o * torch.sigmoid(gate)
        return self._linear(o, layer.w_o, bias=layer.o_bias, residual=h)

    def _rope_write(self, q_proj, k_proj, v_proj, cos, sin, kc, vc, seq_idx, pos_flat, block_table):
        cfg = self.cfg
        nt, d = q_proj.shape[0], cfg.head_dim
        q = ref.apply_rope(q_proj.reshape(nt, cfg.num_heads, 1, d).transpose(0, 2), cos[None], sin[None])
        k = ref.apply_rope(k_proj.reshape(nt, cfg.num_kv_heads, 1, d).transpose(0, 2), cos[None], sin[None])
        q, k = q.transpose(0, 2).reshape(nt, cfg.num_heads, d), k.transpose(0, 2).reshape(nt, cfg.num_kv_heads, d)
        page = block_table[seq_idx, pos_flat // PAGE_SIZE].long()
        slot = pos_flat % PAGE_SIZE
        kc[page, :, slot] = k.to(kc.dtype)
        vc[page, :, slot] = v_proj.reshape(nt, cfg.num_kv_heads, d).to(vc.dtype)
        return q.contiguous(), None

    # ---- the step's phases -------------------------------------------------------------------------------

    def verify(self, pools: Pools, n: int, active: torch.Tensor) -> VerifyOut:
        act = active[:n]
        lens = torch.where(act, pools.cache_lens[:n], 0)
        table = pools.block_table[:n] * act.unsqueeze(1).to(torch.int32)  # free rows write to scratch page 0
        return self.target_forward(pools, slice(0, n), pools.tokens[:n], lens, table, "verify")

    def accept_commit(
        self, pools: Pools, n: int, active: torch.Tensor, vout: VerifyOut, sampled: bool, simulated: bool
    ) -> torch.Tensor:
        """Accepts on device, writes the committed tokens to out_tokens/out_count, commits the GDN states and
        the cache lengths. Returns the bonus tokens [n] (the next anchors)."""
        b, act, logits = self.block_size, active[:n], vout.logits
        drafts = pools.tokens[:n, 1:]
        if b == 1:
            bonus = logits[:, 0].argmax(-1)
            if sampled:
                probs = self._probs(pools, slice(0, n), logits[:, 0])
                drawn = sample_from(probs, torch.rand(n, device=logits.device))
                bonus = torch.where(pools.temperature[:n] > 0, drawn, bonus)
            accepted = torch.zeros_like(bonus)
        else:
            res = self.ops.greedy_accept(drafts, logits)
            accepted, bonus = res.num_accepted, res.bonus
            if sampled:
                p = self._probs(pools, slice(0, n), logits)
                u_accept = torch.rand(n, b - 1, device=logits.device)
                u_sample = torch.rand(n, device=logits.device)
                rs = self.ops.rejection_accept(drafts, p, pools.draft_probs[:n], u_accept, u_sample)
                greedy_row = pools.temperature[:n] == 0
                accepted = torch.where(greedy_row, accepted, rs.num_accepted)
                bonus = torch.where(greedy_row, bonus, rs.bonus)
            if simulated:
                u = torch.rand(n, 1, device=logits.device)
                accepted = (u < pools.profile).sum(-1)
                bonus = logits.argmax(-1).gather(1, accepted.unsqueeze(1)).squeeze(1)
        idx = torch.where(act, accepted, -1).to(torch.int32)
        for j, (k, v, a, bb, x) in enumerate(vout.saved):
            layer = self.layers[self.cfg.gdn_layers[j]]
            self.ops.gdn_commit(
                pools.gdn_state[j, :n],
                idx,
                k,
                v,
                a,
                bb,
                layer.a_log,
                layer.dt_bias,
                window=pools.conv_window[j, :n],
                x=x,
            )
        out = torch.cat((drafts, drafts[:, :1]), dim=1) if b > 1 else bonus.unsqueeze(1).clone()
        out = out.scatter(1, accepted.unsqueeze(1), bonus.unsqueeze(1))
        pools.out_tokens[:n].copy_(out)
        pools.out_count[:n].copy_(torch.where(act, accepted + 1, 0).to(torch.int32))
        pools.cache_lens[:n].copy_(torch.where(act, vout.lens + accepted.to(torch.int32) + 1, pools.cache_lens[:n]))
        return bonus

    def draft(
        self,
        pools: Pools,
        rows: slice,
        act: torch.Tensor,
        anchor: torch.Tensor,
        table: torch.Tensor,
        sampled: bool,
        features: torch.Tensor | None = None,
        feature_positions: torch.Tensor | None = None,
    ) -> None:
        """Writes context K/V for verified features (if given), drafts the block after each row's anchor and
        stores [anchor, drafts] as the rows' next verify block (rows where act [N] is off keep theirs)."""
        if self.drafter is None:
            pools.tokens[rows].copy_(torch.where(act.unsqueeze(1), anchor.unsqueeze(1), pools.tokens[rows]))
            return
        if features is not None:
            self.append_context(pools, features, feature_positions, table)
        lens = torch.where(act, pools.cache_lens[rows], 0)
        drafts = self._draft_block(pools, rows, act, anchor, lens, table, sampled)
        block = torch.cat((anchor.unsqueeze(1), drafts), dim=1)
        pools.tokens[rows].copy_(torch.where(act.unsqueeze(1), block, pools.tokens[rows]))

    def append_context(self, pools: Pools, features: torch.Tensor, positions: torch.Tensor, table: torch.Tensor):
        """Drafter context K/V of target features [N*T, taps*H] at positions [N, T], written through table."""
        dr, ops = self.drafter, self.ops
        n, t = positions.shape
        c = ops.rms_norm(ops.linear(features, dr.fc), dr.hidden_norm, dr.cfg.rms_norm_eps)
        pos_flat = positions.reshape(-1)
        cos, sin = ref.rope_cos_sin(dr.inv_freq, pos_flat, dr.rope_scale, self.dtype)
        seq_idx = torch.arange(n, device=c.device).repeat_interleave(t)
        ops.context_kv_project(
            c,
            dr.w_ctx,
            dr.ctx_k_norm,
            cos,
            sin,
            pools.ctx_k,
            pools.ctx_v,
            seq_idx,
            pos_flat,
            eps=dr.cfg.rms_norm_eps,
            block_table=table,
        )

    def _draft_block(self, pools, rows, act, anchor, lens, table, sampled) -> torch.Tensor:
        dr, ops, b = self.drafter, self.ops, self.block_size
        dc = dr.cfg
        n = anchor.shape[0]
        hq, hkv, d = dc.num_heads, dc.num_kv_heads, dc.head_dim
        block = torch.full((n, b), dc.mask_token_id, dtype=torch.long, device=anchor.device)
        block[:, 0] = anchor
        pos_flat = (lens.long().unsqueeze(1) + torch.arange(b, device=anchor.device)).reshape(-1)
        cos, sin = ref.rope_cos_sin(dr.inv_freq, pos_flat, dr.rope_scale, self.dtype)
        h = self.embed[block.reshape(-1)]
        eps = dc.rms_norm_eps
        for li, layer in enumerate(dr.layers):
            x = ops.rms_norm(h, layer.in_norm, eps)
            qkv = ops.linear(x, layer.w_qkv)
            q_proj, k_proj, v_proj = qkv[:, : hq * d], qkv[:, hq * d : (hq + hkv) * d], qkv[:, (hq + hkv) * d :]
            q, k, _ = ops.qk_norm_rope(
                q_proj,
                k_proj,
                layer.q_norm,
                layer.k_norm,
                cos,
                sin,
                num_q_heads=hq,
                num_kv_heads=hkv,
                eps=eps,
                gated=False,
                zero_centered=False,
            )
            o = ops.draft_attention(
                q.view(n, b, hq, d),
                k.view(n, b, hkv, d),
                v_proj.view(n, b, hkv, d),
                pools.ctx_k[li],
                pools.ctx_v[li],
                lens,
                block_table=table,
                causal=dr.causal[li],
                window=dr.window[li],
                max_len=self.max_len,
            )
            h = ops.linear(o.reshape(n * b, hq * d), layer.w_o, residual=h)
            x = ops.rms_norm(h, layer.post_norm, eps)
            h = ops.linear(ops.linear(x, layer.w_gate_up, swiglu=True), layer.w_down, residual=h)
        h = ops.rms_norm(h.view(n, b, -1)[:, 1:].reshape(n * (b - 1), -1), dr.norm, eps)
        logits = ops.linear(h, self.lm_head).view(n, b - 1, -1)
        drafts = logits.argmax(-1)
        if sampled:
            q = self._probs(pools, rows, logits)
            drawn = sample_from(q, torch.rand(n, b - 1, device=logits.device))
            drafts = torch.where(pools.temperature[rows].unsqueeze(1) > 0, drawn, drafts)
            pools.draft_probs[rows].copy_(torch.where(act.view(-1, 1, 1), q, pools.draft_probs[rows]))
        return drafts

    def _probs(self, pools: Pools, rows: slice, logits: torch.Tensor) -> torch.Tensor:
        return row_probabilities(logits, pools.temperature[rows], pools.top_k[rows], pools.top_p[rows])

    def step(self, pools: Pools, n: int, active: torch.Tensor, sampled: bool, simulated: bool) -> None:
        vout = self.verify(pools, n, active)
        bonus = self.accept_commit(pools, n, active, vout, sampled, simulated)
        self.draft(pools, slice(0, n), active[:n], bonus, vout.table, sampled, vout.features, vout.positions)

    # ---- prefill -------------------------------------------------------------------------------------------

    def prefill_chunk(self, pools: Pools, row: int, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Prefills tokens ids [T] at positions start.. of pool row `row` (GDN state and conv window advance in
        place; K/V and drafter context written). Returns the last position's logits [V]."""
        rows = slice(row, row + 1)
        lens = torch.full((1,), start, dtype=torch.int32, device=ids.device)
        table = pools.block_table[rows]
        out = self.target_forward(pools, rows, ids.view(1, -1), lens, table, "prefill", last_only=True)
        if self.drafter is not None:
            self.append_context(pools, out.features, out.positions, table)
        return out.logits[0, -1]
