"""The PyTorch lowering of every kernel op the batched runtime calls.

Each function has the signature, defaults, return value and side effects (in-place cache and state writes, `out=`
buffers) of its Triton launcher in codegen/triton/, so a runtime runs on either by importing
`from dflash_compiler.codegen import reference as ops` or the Triton modules. It runs on CPU (fast: CI exercises the
batched runtime with it) and on CUDA. Tuning-only keyword arguments (config, num_splits, max_len, block_v, num_warps,
unroll, chunk, fp8_dot, precision) are accepted and ignored: with fp8_dot the kernel also quantizes activations to
FP8, the reference never does.

The math is models/ops.py and runtime/sampling.py, with the kernels' roundings: linear epilogues in fp32 before the
cast, q/k norms rounded to the activation dtype before an fp32 RoPE. No function syncs with the host or branches
on tensor values, so all of them can be captured in a CUDA graph.

Caches: contiguous [N, Hkv, S, D] (the drafter's with a leading layer dim), or pages [P, Hkv, PAGE, D] with a
block_table [N, max_pages]: key s of request n is row s % PAGE of page block_table[n, s // PAGE].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dflash_compiler.codegen.triton.accept import AcceptResult
from dflash_compiler.models import ops
from dflash_compiler.runtime import sampling

__all__ = [
    "AcceptResult",
    "argmax",
    "causal_conv1d_update",
    "context_kv_project",
    "context_kv_write",
    "conv_window_commit",
    "draft_attention",
    "gdn_chunked",
    "gdn_commit",
    "gdn_commit_deltas",
    "gdn_recurrent",
    "gdn_verify",
    "greedy_accept",
    "linear",
    "qk_norm_rope",
    "rejection_accept",
    "rms_norm",
    "verify_attention",
]


def _emit(y: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """The launchers' out= convention: write into out and return it, else return a new contiguous tensor."""
    return y.contiguous() if out is None else out.copy_(y)


# ---- linear ------------------------------------------------------------------------------------------------------


def linear(
    x, weight, *, residual=None, swiglu=False, out=None, fp8_dot=None, config=None, norm=None, gate=None,
    residual_in_place=False,
) -> torch.Tensor:  # fmt: skip
    """y = x @ W^T in fp32 for any weight format, then silu(gate) * up (W = [gate; up]) or + residual, in fp32,
    rounded once to x's dtype. norm (codegen/triton/linear.RowNorm): ops.rms_norm of x first, rounded to x's
    dtype, as the unfused norm would leave it; gate: x * sigmoid(gate) first, in x's dtype, likewise.
    residual_in_place: the result is written into the residual's memory (the vendor GEMM's in-place form)."""
    if residual_in_place and residual is not None and out is None:
        out = residual
    if gate is not None:
        x = x * torch.sigmoid(gate)
    if norm is not None:
        x = ops.rms_norm(x, norm.weight, norm.eps, norm.zero_centered).to(x.dtype)
    y = x.float() @ weight.dequantize().T
    if swiglu:
        y = ops.swiglu(*y.chunk(2, dim=-1))
    if residual is not None:
        y = y + residual.float()
    return _emit(y.to(x.dtype), out)


# ---- norms, RoPE, KV cache writes ----------------------------------------------------------------------------------


def rms_norm(x, weight, eps, *, zero_centered=False, residual=None, out=None, residual_out=None):
    """ops.rms_norm over the last dim. With residual: s = x + residual (in x's dtype), returns (rms_norm(s), s)."""
    s = x if residual is None else x + residual
    y = _emit(ops.rms_norm(s, weight, eps, zero_centered).to(x.dtype), out)
    return y if residual is None else (y, _emit(s, residual_out))


def _norm_rope(x, weight, cos, sin, eps, zero_centered, dtype) -> torch.Tensor:
    """Per-head ops.rms_norm of x [T, ..., D] rounded to dtype, then NeoX RoPE in fp32 with cos/sin [T, rot]."""
    y = ops.rms_norm(x, weight, eps, zero_centered).to(dtype).float()
    heads = y.reshape(y.shape[0], -1, 1, y.shape[-1])  # apply_rope's [B, H, T, D] with B = token, T = 1
    return ops.apply_rope(heads, cos.float()[:, None], sin.float()[:, None]).view(y.shape)


def _slots(seq_idx, positions, block_table, page):
    """(cache row, slot) of each token: (seq_idx, positions), or (page, offset) through the block table."""
    seq, pos = seq_idx.long(), positions.long()
    if block_table is None:
        return seq, pos
    return block_table[seq, pos // page].long(), pos % page


def qk_norm_rope(
    q_proj,
    k_proj,
    q_norm_weight,
    k_norm_weight,
    cos,
    sin,
    *,
    num_q_heads,
    num_kv_heads,
    eps,
    gated,
    zero_centered,
    q_out=None,
    k_out=None,
    gate_out=None,
    v_proj=None,
    k_cache=None,
    v_cache=None,
    seq_idx=None,
    positions=None,
    block_table=None,
):
    """Per-head q/k RMSNorm then RoPE on the first cos.shape[-1] dims: q [T, Hq, D], k [T, Hkv, D], gate [T, Hq*D]
    (q_proj per head [q | gate] when gated, else None). With k_cache/v_cache, the roped k and v_proj [T, Hkv*D] are
    written at slot positions[i] of request seq_idx[i] (through block_table when paged)."""
    tokens, d = q_proj.shape[0], q_norm_weight.shape[0]
    qp = q_proj.view(tokens, num_q_heads, 2 if gated else 1, d)
    q = _norm_rope(qp[:, :, 0], q_norm_weight, cos, sin, eps, zero_centered, q_proj.dtype)
    k = _norm_rope(k_proj.view(tokens, num_kv_heads, d), k_norm_weight, cos, sin, eps, zero_centered, q_proj.dtype)
    gate = _emit(qp[:, :, 1].reshape(tokens, num_q_heads * d), gate_out) if gated else None
    if k_cache is not None:
        rows, slots = _slots(seq_idx, positions, block_table, k_cache.shape[2])
        k_cache[rows, :, slots] = k.to(k_cache.dtype)
        v_cache[rows, :, slots] = v_proj.view(tokens, num_kv_heads, d).to(v_cache.dtype)
    return _emit(q.to(q_proj.dtype), q_out), _emit(k.to(q_proj.dtype), k_out), gate


def context_kv_write(kv, k_norm_weight, cos, sin, k_cache, v_cache, seq_idx, positions, *, eps, block_table=None):
    """kv [T, layers*2*Hkv*D] (columns [layer][k|v][head][D]): each layer's plain k_norm (k_norm_weight [layers, D])
    and RoPE on k, then k and v written into k_cache/v_cache [layers, N or pages, Hkv, S or PAGE, D] at
    (seq_idx[i], positions[i]). The norm is rounded to the cache dtype."""
    layers, _, hkv, page, d = k_cache.shape
    kv = kv.view(kv.shape[0], layers, 2, hkv, d)
    k = _norm_rope(kv[:, :, 0], k_norm_weight[:, None], cos, sin, eps, False, k_cache.dtype)
    rows, slots = _slots(seq_idx, positions, block_table, page)
    k_cache[:, rows, :, slots] = k.to(k_cache.dtype)  # advanced indices split by a slice: [T, layers, Hkv, D]
    v_cache[:, rows, :, slots] = kv[:, :, 1].to(v_cache.dtype)


def context_kv_project(
    c, w_kv, k_norm_weight, cos, sin, k_cache, v_cache, seq_idx, positions, *, eps, block_table=None
) -> None:
    """kv = c @ w_kv.T (the k/v projections of all layers stacked [layers*2*Hkv*D, H]), then context_kv_write."""
    kv = torch.matmul(c, w_kv.t())
    context_kv_write(
        kv, k_norm_weight, cos, sin, k_cache, v_cache, seq_idx, positions, eps=eps, block_table=block_table
    )


# ---- attention -----------------------------------------------------------------------------------------------------


def _cache_keys(cache: torch.Tensor, block_table: torch.Tensor | None) -> torch.Tensor:
    """Every request's cache rows [N, Hkv, S, D] in key order (S = the capacity: S_max or max_pages * PAGE)."""
    if block_table is None:
        return cache
    # entries past a request's pages may hold anything: clamp them to a real page (its keys are masked out)
    pages = cache[block_table.long().clamp(0, cache.shape[0] - 1)]  # [N, max_pages, Hkv, PAGE, D]
    return pages.transpose(1, 2).flatten(2, 3)


def _attend(q, k, v, kpos, valid, qpos, causal, window, scale, out):
    """q [N, T, Hq, D] over keys k/v [N, Hkv, S, D] at positions kpos [N, S] (valid [N, S]), queries at qpos [N, T]:
    causal means key position <= query position, window W means query position - key position < W."""
    mask = valid[:, None, :].expand(-1, qpos.shape[1], -1)
    if causal:
        mask = mask & (kpos[:, None, :] <= qpos[:, :, None])
    if window > 0:
        mask = mask & (qpos[:, :, None] - kpos[:, None, :] < window)
    v = v.masked_fill(~valid[:, None, :, None], 0)  # unwritten slots may hold NaN: keep them out of p @ v
    o = ops.attention(q.transpose(1, 2), k, v, mask, scale)
    return _emit(o.transpose(1, 2), out)


def verify_attention(
    q,
    k_cache,
    v_cache,
    cache_lens,
    *,
    block_table=None,
    scale=None,
    window=0,
    out=None,
    num_splits=None,
    max_len=None,
    config=None,
    gate=None,
) -> torch.Tensor:
    """Request n has L = cache_lens[n] cached keys and its T block keys already written at L..L+T-1; query t sits
    at position L+t and sees keys 0..L+t (the last `window` of them if set). q/out [N, T, Hq, D]. gate
    [N*T, Hq*D]: the output is o * sigmoid(gate)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k, v = _cache_keys(k_cache, block_table), _cache_keys(v_cache, block_table)
    lens = cache_lens.long()[:, None]
    kpos = torch.arange(k.shape[2], device=q.device).expand(q.shape[0], -1)
    qpos = lens + torch.arange(q.shape[1], device=q.device)
    o = _attend(q, k, v, kpos, kpos < lens + q.shape[1], qpos, True, window, scale, out if gate is None else None)
    if gate is None:
        return o
    return _emit((o.float() * torch.sigmoid(gate.float()).view(o.shape)).to(o.dtype), out)


def draft_attention(
    q,
    k_block,
    v_block,
    k_cache,
    v_cache,
    ctx_lens,
    *,
    block_table=None,
    causal=False,
    window=0,
    scale=None,
    out=None,
    num_splits=None,
    max_len=None,
    config=None,
) -> torch.Tensor:
    """Request n's block queries (position start+t, start = ctx_lens[n]) see the cached context keys 0..start-1
    and the block's own keys k_block/v_block [N, T, Hkv, D] (positions start+t): all of them, or causally and
    within `window` positions."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kc, vc = _cache_keys(k_cache, block_table), _cache_keys(v_cache, block_table)
    k = torch.cat((kc, k_block.transpose(1, 2).to(kc.dtype)), dim=2)
    v = torch.cat((vc, v_block.transpose(1, 2).to(vc.dtype)), dim=2)
    lens = ctx_lens.long()[:, None]
    cpos = torch.arange(kc.shape[2], device=q.device).expand(q.shape[0], -1)
    qpos = lens + torch.arange(q.shape[1], device=q.device)
    valid = torch.cat((cpos < lens, torch.ones_like(qpos, dtype=torch.bool)), dim=1)
    return _attend(q, k, v, torch.cat((cpos, qpos), dim=1), valid, qpos, causal, window, scale, out)


# ---- Gated DeltaNet ------------------------------------------------------------------------------------------------


def causal_conv1d_update(x, window, weight, out=None, *, block_t=None, block_c=None, num_warps=None) -> torch.Tensor:
    """silu(depthwise causal conv1d) of x [B, T, C] continuing from window [B, C, W-1]; weight [C, W]. In fp32,
    rounded to x's dtype. The window is not modified (see conv_window_commit)."""
    y, _ = ops.causal_conv1d(x.transpose(1, 2).float(), window.float(), weight.float())
    return _emit(y.transpose(1, 2).to(x.dtype), out)


def conv_window_commit(window, x, idx) -> torch.Tensor:
    """In place: window[b] becomes the conv window after block position idx[b] of x [B, T, C] (-1 keeps it;
    positions past the block read as zeros, as in the kernel)."""
    bsz, chans, w1 = window.shape
    zeros = window.new_zeros(bsz, chans, w1)
    extended = torch.cat((window, x.transpose(1, 2).to(window.dtype), zeros), dim=-1)
    index = idx.long().clamp(-1, x.shape[1] + w1 - 1)  # below -1 keeps too; far past the block: all zeros
    return window.copy_(ops.conv_window_after(extended, index, w1 + 1))


def gdn_recurrent(
    q,
    k,
    v,
    a,
    b,
    a_log,
    dt_bias,
    state,
    *,
    out=None,
    final_state=None,
    deltas=None,
    block_v=None,
    num_warps=None,
    unroll=None,
) -> torch.Tensor:
    """The gated delta rule over T positions (gates, q/k l2norm and the Dk^-0.5 q scale inside). Returns o
    [B, T, HV, V]; final_state receives the state after T-1 (it may be state itself), deltas [B, T, HV, V] fp32
    each position's update row (gdn_commit_deltas). state is otherwise left unchanged."""
    if k.shape[1] == 0:
        if final_state is not None:
            final_state.copy_(state)
        return _emit(v.new_empty(v.shape), out)
    g, beta = ops.gdn_gates(a, b, a_log, dt_bias)
    o, s = ops.gated_delta_rule_recurrent(q, k, v, g, beta, state, deltas=deltas)
    if final_state is not None:
        final_state.copy_(s)
    return _emit(o, out)


def gdn_verify(
    q, k, v, a, b, a_log, dt_bias, state, *, out=None, deltas=None, pending_keys=None, pending_gates=None,
    pending_rows=None, pending_idx=None, block_v=None, num_warps=None, unroll=None, algorithm="recurrent",
    precision=None, block_k=None, factor_warps=None, num_stages=None, fused_commit=False,
) -> torch.Tensor:  # fmt: skip
    """A verify block: o. deltas [B, T, HV, V] fp32, if given, receives each position's update row, from which
    gdn_commit_deltas makes the state after the accepted position current. With a pending block (keys, gates,
    update rows [B, P, ...] and accepted position pending_idx, -1 for none) the state first becomes the state
    after that position, in place, and this block's rows replace the pending rows' first T; without one the
    state is left unchanged."""
    if pending_keys is not None:
        if pending_rows.shape[1] < k.shape[1]:
            raise ValueError(f"pending_rows: holds {pending_rows.shape[1]} positions, the verify block {k.shape[1]}")
        gdn_commit_deltas(state, pending_idx, pending_keys, pending_rows, pending_gates, a_log, dt_bias)
        deltas = pending_rows[:, : k.shape[1]]
    return gdn_recurrent(q, k, v, a, b, a_log, dt_bias, state, out=out, deltas=deltas)


def gdn_commit_deltas(
    state, idx, k, deltas, a, a_log, dt_bias, *, block_k=None, block_v=None, num_warps=None, precision=None,
    v_major=None,
) -> torch.Tensor:  # fmt: skip
    """In place: state[b] becomes the state after block position min(idx[b], T-1) (-1 keeps it), from the block's
    initial state, raw keys k [B, T, H, K], the update rows deltas [B, T, HV, V] a verify wrote and raw gate inputs
    a [B, T, HV] (ops.gated_delta_commit: no step is replayed)."""
    seq = k.shape[1]
    if seq > 0:
        last = idx.long().clamp(max=seq - 1)
        g = ops.gdn_log_decay(a, a_log, dt_bias)
        s = ops.gated_delta_commit(state, last.clamp(min=0), k, deltas, g)
        state.copy_(torch.where((last >= 0)[:, None, None, None], s, state))
    return state


def gdn_commit(window, idx, x, k, a, keys, gates) -> None:
    """A GDN layer's commit: the conv window after block position idx[b] (conv_window_commit), and the block's raw
    keys and gate inputs kept as the pending block's (keys [B, P, H, K], gates [B, P, HV]; the verify wrote its
    update rows), which the next verify makes current in the state."""
    conv_window_commit(window, x, idx)
    keys[:, : k.shape[1]].copy_(k)
    gates[:, : a.shape[1]].copy_(a)


def gdn_chunked(
    q,
    k,
    v,
    a,
    b,
    a_log,
    dt_bias,
    state,
    *,
    out=None,
    final_state=None,
    chunk_size=None,
    block_v=None,
    precision=None,
    system_precision="tf32",
    fused_output=False,
    blocked_system=False,
):
    """The chunked gated delta rule for prefill: (o [B, T, HV, V], the final state). final_state may be state
    itself (in place); by default a new tensor."""
    final_state = torch.empty_like(state) if final_state is None else final_state
    if k.shape[1] == 0:
        return _emit(v.new_empty(v.shape), out), final_state.copy_(state)
    g, beta = ops.gdn_gates(a, b, a_log, dt_bias)
    # None: the launcher picks the chunk by the GPU; here it changes nothing but rounding
    o, s = ops.gated_delta_rule_chunked(q, k, v, g, beta, state, chunk_size or 64)
    return _emit(o, out), final_state.copy_(s)


# ---- acceptance ----------------------------------------------------------------------------------------------------


def _committed(draft_tokens: torch.Tensor, accepted: torch.Tensor, bonus: torch.Tensor) -> AcceptResult:
    """The AcceptResult: the committed row is the accepted drafts, the bonus, then -1."""
    drafts = F.pad(draft_tokens.long(), (0, 1), value=-1)
    j = torch.arange(drafts.shape[1], device=drafts.device)
    a = accepted[:, None]
    tokens = torch.where(j < a, drafts, torch.where(j == a, bonus[:, None], -1))
    return AcceptResult(accepted, bonus, tokens)


def argmax(logits, *, block_v=None, chunk=None) -> torch.Tensor:
    """The index of the first maximum over the last dim, int64 (torch.argmax)."""
    return logits.argmax(-1)


def greedy_accept(draft_tokens, logits, *, block_v=None, chunk=None) -> AcceptResult:
    """a = the longest prefix of draft_tokens [N, Bs-1] equal to argmax(logits [N, Bs, V]) (ties: the first index);
    bonus = argmax at a."""
    accepted, bonus = sampling.greedy_accept(draft_tokens.long(), logits)
    return _committed(draft_tokens, accepted, bonus)


def rejection_accept(
    draft_tokens, target, draft, u_accept, u_sample, *, temperature=None, block_v=None, chunk=None
) -> AcceptResult:
    """Speculative sampling: target [N, Bs, V] and draft [N, >= Bs-1, V] are probabilities, or logits when
    temperature is given (softmax(x / T)). Draft j is accepted iff u_accept[:, j] * q_j(d_j) < p_j(d_j), up to the
    first rejection a; the bonus is the inverse-CDF draw with u_sample of max(p_a - q_a, 0), of p_a if that has no
    mass, or of p at Bs-1 when every draft passed."""
    n = draft_tokens.shape[1]
    p, q = target.float(), draft[:, :n].float()
    if temperature is not None:
        p, q = torch.softmax(p / temperature, dim=-1), torch.softmax(q / temperature, dim=-1)
    accepted, bonus = sampling.rejection_accept(draft_tokens.long(), q, p, u_accept, u_sample)
    return _committed(draft_tokens, accepted, bonus)
