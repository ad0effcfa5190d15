"""The IR's vocabulary: the project's ops as `torch.ops.dflash.*` custom ops.

Each op is one node in an exported graph. Its default implementation is the PyTorch lowering in
`codegen/reference.py` (any device), and its fake implementation gives shapes on the meta device, so the step
functions of `models/` trace weight-free. On CUDA the Triton kernels are registered as the op's CUDA kernel; the
lowering pass (graph/lower.py) may pick another implementation per node.

Ops never return an input or a view of one; the ones that write caches or states in place declare it
(`mutates_args`) and return nothing. Weight formats travel as their tensors plus a format name (`fmt`):
"dense" (weight), "fp8_channel" (qweight, scale), "fp8_block" (qweight, scale_inv) and "int4" (qweight, scales,
qzeros or None, group_size).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..codegen import reference
from ..codegen.weight_formats import DenseWeight, FP8BlockWeight, FP8ChannelWeight, Int4Weight
from ..errors import DFlashError

LINEAR_FORMATS = ("dense", "fp8_channel", "fp8_block", "int4")
# Rows from which a CUDA linear goes to the vendor GEMM instead of the Triton kernel (codegen/vendor_gemm.py): below
# it a step reads weights, from about here on it is compute-bound. A default until the tuning database measures
# the crossover per shape.
VENDOR_GEMM_MIN_ROWS = 64


def weight_format(fmt: str, weight: Tensor, scale: Tensor | None, zeros: Tensor | None, in_features: int, group: int):
    """The codegen weight object of a linear node's tensors."""
    if fmt == "dense":
        return DenseWeight(weight)
    if fmt == "fp8_channel":
        return FP8ChannelWeight(weight, scale)
    if fmt == "fp8_block":
        return FP8BlockWeight(weight, scale)
    if fmt == "int4":
        return Int4Weight(weight, scale, zeros, in_features, group)
    raise ValueError(f"fmt: expected one of {', '.join(LINEAR_FORMATS)}, got {fmt!r}")


def linear_args(w) -> dict:
    """The linear op's weight arguments of a codegen weight object (the inverse of weight_format)."""
    if isinstance(w, DenseWeight):
        return {"weight": w.weight, "fmt": "dense"}
    if isinstance(w, FP8ChannelWeight):
        return {"weight": w.qweight, "scale": w.scale, "fmt": "fp8_channel"}
    if isinstance(w, FP8BlockWeight):
        return {"weight": w.qweight, "scale": w.scale_inv, "fmt": "fp8_block"}
    if isinstance(w, Int4Weight):
        return {"weight": w.qweight, "scale": w.scales, "zeros": w.qzeros, "fmt": "int4", "group_size": w.group_size}
    raise TypeError(f"no linear format for {type(w).__name__}")


def _linear_epilogue(y: Tensor, bias: Tensor | None, residual: Tensor | None) -> Tensor:
    if bias is not None:
        y = y + bias
    return y if residual is None else y + residual


def _run_linear(impl, x, weight, scale, zeros, bias, residual, fmt, group_size, swiglu, norm_weight=None,
                norm_eps=0.0, norm_zero_centered=False, x_gate=None, residual_in_place=False) -> Tensor:  # fmt: skip
    """impl(x, W, ...) of a linear node's arguments. residual_in_place: the residual is dead after this call
    (graph/ir.dead_after), so a lowering that would add it in a launch of its own may accumulate into its memory
    instead (the vendor GEMM with beta = 1); the others ignore it."""
    from ..codegen.triton.linear import RowNorm

    w = weight_format(fmt, weight, scale, zeros, x.shape[1], group_size)
    norm = None if norm_weight is None else RowNorm(norm_weight, norm_eps, norm_zero_centered)
    if x_gate is not None and norm is not None:  # one prologue per launch: the gate goes first, apart
        x, x_gate = x * torch.sigmoid(x_gate), None
    if bias is None:
        extra = {"residual_in_place": True} if residual_in_place and residual is not None else {}
        return impl(x, w, residual=residual, swiglu=swiglu, norm=norm, gate=x_gate, **extra)
    return _linear_epilogue(impl(x, w, swiglu=swiglu, norm=norm, gate=x_gate), bias, residual)


@torch.library.custom_op("dflash::linear", mutates_args=())
def linear(
    x: Tensor,
    weight: Tensor,
    scale: Tensor | None = None,
    zeros: Tensor | None = None,
    bias: Tensor | None = None,
    residual: Tensor | None = None,
    fmt: str = "dense",
    group_size: int = 128,
    swiglu: bool = False,
    norm_weight: Tensor | None = None,
    norm_eps: float = 0.0,
    norm_zero_centered: bool = False,
    x_gate: Tensor | None = None,
) -> Tensor:
    """y = x [M, K] @ W^T in any weight format, then silu(gate) * up (W = [gate; up]) or + bias + residual. The
    input is first x * sigmoid(x_gate) with x_gate (graph/passes.py fuse_gate), then rms_norm(x, norm_weight,
    norm_eps, norm_zero_centered) with norm_weight (fuse_norm): the fused forms of those ops feeding the linear."""
    return _run_linear(reference.linear, x, weight, scale, zeros, bias, residual, fmt, group_size, swiglu,
                       norm_weight, norm_eps, norm_zero_centered, x_gate)  # fmt: skip


@linear.register_fake
def _(x, weight, scale=None, zeros=None, bias=None, residual=None, fmt="dense", group_size=128, swiglu=False,
      norm_weight=None, norm_eps=0.0, norm_zero_centered=False, x_gate=None):  # fmt: skip
    n = weight.shape[0]
    return x.new_empty(x.shape[0], n // 2 if swiglu else n)


@torch.library.custom_op("dflash::swiglu", mutates_args=())
def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up in fp32, rounded once (the linear epilogue's rounding)."""
    return (torch.nn.functional.silu(gate.float()) * up.float()).to(gate.dtype)


@swiglu.register_fake
def _(gate, up):
    return torch.empty_like(gate)


@torch.library.custom_op("dflash::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, eps: float, zero_centered: bool) -> Tensor:
    return reference.rms_norm(x, weight, eps, zero_centered=zero_centered)


@rms_norm.register_fake
def _(x, weight, eps, zero_centered):
    return torch.empty_like(x)


@torch.library.custom_op("dflash::gated_rms_norm", mutates_args=())
def gated_rms_norm(x: Tensor, gate: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The Gated DeltaNet output norm over the last dim of x [T, HV, V], gated by silu(gate)."""
    from ..models import ops as model_ops

    return model_ops.gated_rms_norm(x, gate, weight, eps).contiguous()


@gated_rms_norm.register_fake
def _(x, gate, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("dflash::qk_norm_rope_write", mutates_args=("k_cache", "v_cache"))
def qk_norm_rope_write(
    q_proj: Tensor,
    k_proj: Tensor,
    v_proj: Tensor,
    q_norm: Tensor | None,
    k_norm: Tensor | None,
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seq_idx: Tensor,
    positions: Tensor,
    block_table: Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    eps: float,
    gated: bool,
    zero_centered: bool,
) -> tuple[Tensor, Tensor]:
    """Per-head q/k RMSNorm (when the norm weights are given), RoPE, and the roped k and v written into the paged
    caches at (seq_idx, positions). Returns q [T, Hq, D] and the output gate [T, Hq*D] (empty when not gated)."""
    return _qk_norm_rope_write(reference.qk_norm_rope, q_proj, k_proj, v_proj, q_norm, k_norm, cos, sin, k_cache,
                               v_cache, seq_idx, positions, block_table, num_q_heads, num_kv_heads, eps, gated,
                               zero_centered)  # fmt: skip


def _qk_norm_rope_write(impl, q_proj, k_proj, v_proj, q_norm, k_norm, cos, sin, k_cache, v_cache, seq_idx,
                        positions, block_table, num_q_heads, num_kv_heads, eps, gated, zero_centered):  # fmt: skip
    tokens, d = q_proj.shape[0], k_cache.shape[-1]
    if q_norm is None:  # no q/k norm (Llama): RoPE and the paged write in PyTorch
        from ..models import ops as model_ops

        heads = q_proj.view(tokens, num_q_heads, 1, d).transpose(0, 2)  # apply_rope's [B, H, T, D], B = 1
        q = model_ops.apply_rope(heads, cos[None], sin[None]).transpose(0, 2).reshape(tokens, num_q_heads, d)
        heads = k_proj.view(tokens, num_kv_heads, 1, d).transpose(0, 2)
        k = model_ops.apply_rope(heads, cos[None], sin[None]).transpose(0, 2).reshape(tokens, num_kv_heads, d)
        page = k_cache.shape[2]
        rows = block_table[seq_idx.long(), positions.long() // page].long()
        slots = positions.long() % page
        k_cache[rows, :, slots] = k.to(k_cache.dtype)
        v_cache[rows, :, slots] = v_proj.view(tokens, num_kv_heads, d).to(v_cache.dtype)
        return q.contiguous(), q_proj.new_empty(0)
    q, _, gate = impl(
        q_proj,
        k_proj,
        q_norm,
        k_norm,
        cos,
        sin,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        eps=eps,
        gated=gated,
        zero_centered=zero_centered,
        v_proj=v_proj,
        k_cache=k_cache,
        v_cache=v_cache,
        seq_idx=seq_idx,
        positions=positions,
        block_table=block_table,
    )
    return q, (gate if gate is not None else q_proj.new_empty(0))


@qk_norm_rope_write.register_fake
def _(q_proj, k_proj, v_proj, q_norm, k_norm, cos, sin, k_cache, v_cache, seq_idx, positions, block_table,
      num_q_heads, num_kv_heads, eps, gated, zero_centered):  # fmt: skip
    d = k_cache.shape[-1]
    gate = q_proj.new_empty(q_proj.shape[0], num_q_heads * d) if gated else q_proj.new_empty(0)
    return q_proj.new_empty(q_proj.shape[0], num_q_heads, d), gate


@torch.library.custom_op("dflash::qk_norm_rope", mutates_args=())
def qk_norm_rope(
    q_proj: Tensor,
    k_proj: Tensor,
    q_norm: Tensor,
    k_norm: Tensor,
    cos: Tensor,
    sin: Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Per-head plain q/k RMSNorm then RoPE (the drafter's block queries and keys): q [T, Hq, D], k [T, Hkv, D]."""
    return _qk_norm_rope(reference.qk_norm_rope, q_proj, k_proj, q_norm, k_norm, cos, sin, num_q_heads,
                         num_kv_heads, eps)  # fmt: skip


def _qk_norm_rope(impl, q_proj, k_proj, q_norm, k_norm, cos, sin, num_q_heads, num_kv_heads, eps):
    q, k, _ = impl(q_proj, k_proj, q_norm, k_norm, cos, sin, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                   eps=eps, gated=False, zero_centered=False)  # fmt: skip
    return q, k


@qk_norm_rope.register_fake
def _(q_proj, k_proj, q_norm, k_norm, cos, sin, num_q_heads, num_kv_heads, eps):
    d = q_norm.shape[0]
    return q_proj.new_empty(q_proj.shape[0], num_q_heads, d), k_proj.new_empty(k_proj.shape[0], num_kv_heads, d)


@torch.library.custom_op("dflash::context_kv_write", mutates_args=("k_cache", "v_cache"))
def context_kv_write(
    kv: Tensor,
    k_norm: Tensor,
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seq_idx: Tensor,
    positions: Tensor,
    block_table: Tensor,
    eps: float,
) -> None:
    """The drafter's context K/V of every layer: kv [T, layers*2*Hkv*D] (per layer [k | v]), k normed per layer
    (k_norm [layers, D]) and roped, both written through the block table into [layers, pages, Hkv, PAGE, D]."""
    reference.context_kv_write(
        kv, k_norm, cos, sin, k_cache, v_cache, seq_idx, positions, eps=eps, block_table=block_table
    )


@context_kv_write.register_fake
def _(kv, k_norm, cos, sin, k_cache, v_cache, seq_idx, positions, block_table, eps):
    return None


@torch.library.custom_op("dflash::verify_attention", mutates_args=())
def verify_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_lens: Tensor,
    block_table: Tensor,
    max_len: int,
    gate: Tensor | None = None,
) -> Tensor:
    """Causal attention of a verify block q [N, T, Hq, D] over paged keys (its own already written); with gate
    [N*T, Hq*D] (graph/passes.py fuse_attention_gate), times sigmoid(gate)."""
    return reference.verify_attention(q, k_cache, v_cache, cache_lens, block_table=block_table, max_len=max_len,
                                      gate=gate)  # fmt: skip


@verify_attention.register_fake
def _(q, k_cache, v_cache, cache_lens, block_table, max_len, gate=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("dflash::draft_attention", mutates_args=())
def draft_attention(
    q: Tensor,
    k_block: Tensor,
    v_block: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    ctx_lens: Tensor,
    block_table: Tensor,
    causal: bool,
    window: int,
    max_len: int,
) -> Tensor:
    """Draft-block queries over the paged context and the block's own keys (full, or causal and windowed)."""
    return reference.draft_attention(q, k_block, v_block, k_cache, v_cache, ctx_lens, block_table=block_table,
                                     causal=causal, window=window, max_len=max_len)  # fmt: skip


@draft_attention.register_fake
def _(q, k_block, v_block, k_cache, v_cache, ctx_lens, block_table, causal, window, max_len):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("dflash::causal_conv1d_update", mutates_args=())
def causal_conv1d_update(x: Tensor, window: Tensor, weight: Tensor) -> Tensor:
    """silu(depthwise causal conv1d) of x [N, T, C] continuing from window [N, C, W-1]; the window is unchanged."""
    return reference.causal_conv1d_update(x, window, weight)


@causal_conv1d_update.register_fake
def _(x, window, weight):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("dflash::conv_window_commit", mutates_args=("window",))
def conv_window_commit(window: Tensor, x: Tensor, idx: Tensor) -> None:
    """window[n] becomes the conv window after block position idx[n] of x [N, T, C] (-1 keeps it)."""
    reference.conv_window_commit(window, x, idx)


@conv_window_commit.register_fake
def _(window, x, idx):
    return None


@torch.library.custom_op("dflash::gdn_verify", mutates_args=("state", "rows"))
def gdn_verify(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, a_log: Tensor, dt_bias: Tensor,
               state: Tensor, keys: Tensor, gates: Tensor, rows: Tensor, pending: Tensor) -> Tensor:  # fmt: skip
    """The gated delta rule over a verify block: o [N, T, HV, V]. The pending block (the last verified one: its raw
    keys [N, P, H, K], gate inputs [N, P, HV], update rows [N, P, HV, V] fp32 and accepted position pending[n], -1
    for none) is first made current in state, in place; this block's update rows then replace rows[:, :T], from
    which the next verify makes any of its positions current (gdn_commit keeps its keys and gates)."""
    return reference.gdn_verify(q, k, v, a, b, a_log, dt_bias, state, **_pending(keys, gates, rows, pending))


def _pending(keys: Tensor, gates: Tensor, rows: Tensor, pending: Tensor) -> dict:
    return dict(pending_keys=keys, pending_gates=gates, pending_rows=rows, pending_idx=pending)


@gdn_verify.register_fake
def _(q, k, v, a, b, a_log, dt_bias, state, keys, gates, rows, pending):
    return torch.empty_like(v, memory_format=torch.contiguous_format)


@torch.library.custom_op("dflash::gdn_commit", mutates_args=("window", "keys", "gates"))
def gdn_commit(window: Tensor, idx: Tensor, x: Tensor, k: Tensor, a: Tensor, keys: Tensor, gates: Tensor) -> None:
    """A GDN layer's commit after its verify: window[n] becomes the conv window after block position idx[n] (-1
    keeps it) of the block's conv input x, and the block's raw keys k and gate inputs a become the pending block's
    (its update rows are in place already); the step sets the pending position, and the next verify makes it
    current in the state. Nothing is replayed."""
    reference.gdn_commit(window, idx, x, k, a, keys, gates)


@gdn_commit.register_fake
def _(window, idx, x, k, a, keys, gates):
    return None


@torch.library.custom_op("dflash::gdn_prefill", mutates_args=("state", "window"))
def gdn_prefill(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, a_log: Tensor, dt_bias: Tensor,
                state: Tensor, window: Tensor, x: Tensor, keys: Tensor, gates: Tensor, rows: Tensor,
                pending: Tensor) -> Tensor:  # fmt: skip
    """The chunked gated delta rule over a prefill chunk: returns o; state (the pending block made current first)
    and the conv window advance in place to the chunk's last position. The caller then clears the pending
    position."""
    return _gdn_prefill(reference, q, k, v, a, b, a_log, dt_bias, state, window, x, keys, gates, rows, pending)


def _gdn_prefill(impl, q, k, v, a, b, a_log, dt_bias, state, window, x, keys, gates, rows, pending,
                 **chunked) -> Tensor:  # fmt: skip
    """chunked: the chunked rule's launch options (a tuned config)."""
    impl.gdn_commit_deltas(state, pending, keys, rows, gates, a_log, dt_bias)
    o, _ = impl.gdn_chunked(q, k, v, a, b, a_log, dt_bias, state, final_state=state, **chunked)
    last = torch.full((x.shape[0],), x.shape[1] - 1, dtype=torch.int32, device=x.device)
    impl.conv_window_commit(window, x, last)
    return o


@gdn_prefill.register_fake
def _(q, k, v, a, b, a_log, dt_bias, state, window, x, keys, gates, rows, pending):
    return torch.empty_like(v, memory_format=torch.contiguous_format)


@torch.library.custom_op("dflash::argmax", mutates_args=())
def argmax(logits: Tensor) -> Tensor:
    """The index of the first maximum over the last dim, int64 (the greedy token of each row of logits)."""
    return reference.argmax(logits)


@argmax.register_fake
def _(logits):
    return logits.new_empty(logits.shape[:-1], dtype=torch.long)


@torch.library.custom_op("dflash::greedy_accept", mutates_args=())
def greedy_accept(draft_tokens: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
    """(accepted [N], bonus [N]): the longest prefix of the drafts equal to the target's argmax, and the argmax
    after it."""
    res = reference.greedy_accept(draft_tokens, logits)
    return res.num_accepted.clone(), res.bonus.clone()


@greedy_accept.register_fake
def _(draft_tokens, logits):
    n = draft_tokens.shape[0]
    return draft_tokens.new_empty(n, dtype=torch.long), draft_tokens.new_empty(n, dtype=torch.long)


@torch.library.custom_op("dflash::rejection_accept", mutates_args=())
def rejection_accept(
    draft_tokens: Tensor, target_probs: Tensor, draft_probs: Tensor, u_accept: Tensor, u_sample: Tensor
) -> tuple[Tensor, Tensor]:
    """(accepted [N], bonus [N]) of speculative rejection sampling over probabilities."""
    res = reference.rejection_accept(draft_tokens, target_probs, draft_probs, u_accept, u_sample)
    return res.num_accepted.clone(), res.bonus.clone()


@rejection_accept.register_fake
def _(draft_tokens, target_probs, draft_probs, u_accept, u_sample):
    n = draft_tokens.shape[0]
    return draft_tokens.new_empty(n, dtype=torch.long), draft_tokens.new_empty(n, dtype=torch.long)


# ---- CUDA kernels -----------------------------------------------------------------------------------------------


# The Python functions behind the ops' CUDA kernels, by op name (what the lowering pass puts in a graph).
TRITON_IMPLEMENTATIONS: dict = {}


def _register_cuda_kernels() -> None:
    """The Triton kernels (and the vendor GEMM from VENDOR_GEMM_MIN_ROWS rows) as the ops' CUDA implementations."""
    from ..codegen.triton import accept as t_accept
    from ..codegen.triton import attention as t_attention
    from ..codegen.triton import fused_ops as t_fused
    from ..codegen.triton import gdn as t_gdn

    def kernel(op):
        def register(fn):
            op.register_kernel("cuda", fn)
            TRITON_IMPLEMENTATIONS[op._name] = fn
            return fn

        return register

    @kernel(linear)
    def _(x, weight, scale=None, zeros=None, bias=None, residual=None, fmt="dense", group_size=128, swiglu=False,
          norm_weight=None, norm_eps=0.0, norm_zero_centered=False, x_gate=None):  # fmt: skip
        return _run_linear(_linear_by_rows, x, weight, scale, zeros, bias, residual, fmt, group_size, swiglu,
                           norm_weight, norm_eps, norm_zero_centered, x_gate)  # fmt: skip

    @kernel(rms_norm)
    def _(x, weight, eps, zero_centered):
        return t_fused.rms_norm(x, weight, eps, zero_centered=zero_centered)

    @kernel(gated_rms_norm)
    def _(x, gate, weight, eps):
        return t_fused.gated_rms_norm(x, gate, weight, eps)

    @kernel(qk_norm_rope_write)
    def _(q_proj, k_proj, v_proj, q_norm, k_norm, cos, sin, k_cache, v_cache, seq_idx, positions, block_table,
          num_q_heads, num_kv_heads, eps, gated, zero_centered):  # fmt: skip
        return _qk_norm_rope_write(t_fused.qk_norm_rope, q_proj, k_proj, v_proj, q_norm, k_norm, cos, sin, k_cache,
                                   v_cache, seq_idx, positions, block_table, num_q_heads, num_kv_heads, eps, gated,
                                   zero_centered)  # fmt: skip

    @kernel(qk_norm_rope)
    def _(q_proj, k_proj, q_norm, k_norm, cos, sin, num_q_heads, num_kv_heads, eps):
        return _qk_norm_rope(t_fused.qk_norm_rope, q_proj, k_proj, q_norm, k_norm, cos, sin, num_q_heads,
                             num_kv_heads, eps)  # fmt: skip

    @kernel(context_kv_write)
    def _(kv, k_norm, cos, sin, k_cache, v_cache, seq_idx, positions, block_table, eps):
        t_fused.context_kv_write(kv, k_norm, cos, sin, k_cache, v_cache, seq_idx, positions, eps=eps,
                                 block_table=block_table)  # fmt: skip

    @kernel(verify_attention)
    def _(q, k_cache, v_cache, cache_lens, block_table, max_len, gate=None):
        return t_attention.verify_attention(q, k_cache, v_cache, cache_lens, block_table=block_table, max_len=max_len,
                                            gate=gate)  # fmt: skip

    @kernel(draft_attention)
    def _(q, k_block, v_block, k_cache, v_cache, ctx_lens, block_table, causal, window, max_len):
        return t_attention.draft_attention(q, k_block, v_block, k_cache, v_cache, ctx_lens, block_table=block_table,
                                           causal=causal, window=window, max_len=max_len)  # fmt: skip

    @kernel(causal_conv1d_update)
    def _(x, window, weight):
        return t_gdn.causal_conv1d_update(x, window, weight)

    @kernel(conv_window_commit)
    def _(window, x, idx):
        t_gdn.conv_window_commit(window, x, idx)

    @kernel(gdn_verify)
    def _(q, k, v, a, b, a_log, dt_bias, state, keys, gates, rows, pending):
        return t_gdn.gdn_verify(q, k, v, a, b, a_log, dt_bias, state, **_pending(keys, gates, rows, pending))

    @kernel(gdn_commit)
    def _(window, idx, x, k, a, keys, gates):
        t_gdn.gdn_commit(window, idx, x, k, a, keys, gates)

    @kernel(gdn_prefill)
    def _(q, k, v, a, b, a_log, dt_bias, state, window, x, keys, gates, rows, pending):
        return _gdn_prefill(t_gdn, q, k, v, a, b, a_log, dt_bias, state, window, x, keys, gates, rows, pending)

    @kernel(argmax)
    def _(logits):
        return t_accept.argmax(logits)

    @kernel(greedy_accept)
    def _(draft_tokens, logits):
        res = t_accept.greedy_accept(draft_tokens, logits)
        return res.num_accepted.clone(), res.bonus.clone()

    @kernel(rejection_accept)
    def _(draft_tokens, target_probs, draft_probs, u_accept, u_sample):
        res = t_accept.rejection_accept(draft_tokens, target_probs, draft_probs, u_accept, u_sample)
        return res.num_accepted.clone(), res.bonus.clone()


if torch.cuda.is_available():
    _register_cuda_kernels()


def triton_implementations() -> dict:
    """The Python functions of the ops' Triton kernels by op name; on a host without CUDA they are registered on
    first use (ahead-of-time compilation runs them on CPU tensors, codegen/triton/aot.py)."""
    if not TRITON_IMPLEMENTATIONS:
        _register_cuda_kernels()
    return TRITON_IMPLEMENTATIONS


# ---- implementations by name ------------------------------------------------------------------------------------

OPS = {
    op._name: op
    for op in (
        linear,
        swiglu,
        rms_norm,
        gated_rms_norm,
        qk_norm_rope_write,
        qk_norm_rope,
        context_kv_write,
        verify_attention,
        draft_attention,
        causal_conv1d_update,
        conv_window_commit,
        gdn_verify,
        gdn_commit,
        gdn_prefill,
        argmax,
        greedy_accept,
        rejection_accept,
    )  # fmt: skip
}
BACKENDS = ("reference", "triton")


def implementation(op: str, backend: str, tuned: dict[int, tuple[str, dict]] | None = None,
                   residual_in_place: bool = False):  # fmt: skip
    """The Python function implementing dflash op `op` with `backend`: "reference" (PyTorch, any device) or
    "triton" (the kernels; ops without a kernel use their reference). tuned: on the Triton backend, the tuning
    database's (lowering, config) by row bucket for a linear (tuning/spaces.py M_BUCKETS), by batch size for a
    GDN verify, a conv update or an attention (TunedByBatch). residual_in_place: a linear whose residual is dead
    after it (_run_linear)."""
    custom = OPS[op]
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if op == "linear" and (residual_in_place or (tuned and backend == "triton")):
        on_cuda = backend == "triton" and "linear" in TRITON_IMPLEMENTATIONS
        return TunedLinear(tuned if backend == "triton" else {}, _linear_by_rows if on_cuda else reference.linear,
                           residual_in_place)  # fmt: skip
    if backend == "reference":
        return custom._init_fn
    default = TRITON_IMPLEMENTATIONS.get(op, custom._init_fn)
    if tuned and op == "gdn_prefill":
        return TunedPrefill(tuned)
    for tuned_op in (TunedGDN, TunedAttention, TunedConv):
        if tuned and op in tuned_op.OPS:
            return tuned_op(op, tuned, default)
    return default


class TunedByBatch:
    """An op node's implementation with the tuning database's Triton configs by batch size (its first argument's
    leading dimension); batch sizes without a tuned entry run the launcher's default. The choice is made at
    dispatch, i.e. once per captured graph."""

    OPS: tuple[str, ...] = ()

    def __init__(self, op: str, tuned: dict[int, tuple[str, dict]], default):
        self.op, self.default = op, default
        self.configs = {batch: config for batch, (lowering, config) in tuned.items() if lowering == "triton"}
        self.__name__ = f"{op}_tuned"

    def __call__(self, first, *args):
        config = self.configs.get(first.shape[0])
        if config is None:
            return self.default(first, *args)
        return self.launch(config, first, *args)

    def launch(self, config: dict, *args):
        raise NotImplementedError


class TunedGDN(TunedByBatch):
    """A GDN verify with its tuned algorithm and launch parameters."""

    OPS = ("gdn_verify",)

    def launch(self, config, q, k, v, a, b, a_log, dt_bias, state, keys, gates, rows, pending):
        from ..codegen.triton import gdn as t_gdn

        pend = _pending(keys, gates, rows, pending)
        return t_gdn.gdn_verify(q, k, v, a, b, a_log, dt_bias, state, **pend, **config)


class TunedPrefill:
    """A GDN prefill whose chunked rule runs the tuning database's config of the shortest tuned prompt length at
    or over the call's (the longest tuned one past them all): a chunk's config is valid at any length."""

    def __init__(self, tuned: dict[int, tuple[str, dict]]):
        self.configs = sorted((t, config) for t, (lowering, config) in tuned.items() if lowering == "triton")
        self.__name__ = "gdn_prefill_tuned"

    def __call__(self, q, *args):
        from ..codegen.triton import gdn as t_gdn

        if not self.configs:
            return _gdn_prefill(t_gdn, q, *args)
        config = next((c for t, c in self.configs if t >= q.shape[1]), self.configs[-1][1])
        return _gdn_prefill(t_gdn, q, *args, **config)


class TunedAttention(TunedByBatch):
    """A verify or draft attention with its tuned tile and split count."""

    OPS = ("verify_attention", "draft_attention")

    def launch(self, config, q, *args):
        from ..codegen.triton import attention as t_attention

        launch = dict(num_splits=config["num_splits"], config=t_attention.tuned_config(config))
        if self.op == "verify_attention":
            k_cache, v_cache, cache_lens, block_table, max_len, *gate = args
            return t_attention.verify_attention(q, k_cache, v_cache, cache_lens, block_table=block_table,
                                                max_len=max_len, gate=gate[0] if gate else None, **launch)  # fmt: skip
        k_block, v_block, k_cache, v_cache, ctx_lens, block_table, causal, window, max_len = args
        return t_attention.draft_attention(q, k_block, v_block, k_cache, v_cache, ctx_lens, block_table=block_table,
                                           causal=causal, window=window, max_len=max_len, **launch)  # fmt: skip


class TunedConv(TunedByBatch):
    """A GDN conv update with its tuned tile and warps."""

    OPS = ("causal_conv1d_update",)

    def launch(self, config, x, window, weight):
        from ..codegen.triton import gdn as t_gdn

        return t_gdn.causal_conv1d_update(x, window, weight, **config)


class TunedLinear:
    """A linear node's implementation with the tuning database's choices: each call takes the (lowering, config)
    of its row count's bucket (the vendor GEMM, the Triton kernel with that config, or the PyTorch lowering);
    buckets without a tuned entry run the fallback (the backend's default dispatch). The choice is made at
    dispatch, i.e. once per captured graph. residual_in_place: the node's residual is dead after it (_run_linear)."""

    def __init__(self, tuned: dict[int, tuple[str, dict]], fallback, residual_in_place: bool = False):
        self.tuned, self.fallback, self.residual_in_place = dict(tuned), fallback, residual_in_place
        self.impls = {m: _tuned_impl(*choice) for m, choice in self.tuned.items()}
        self.__name__ = "linear_tuned"

    def choice(self, rows: int) -> tuple[str, dict] | None:
        from ..tuning.spaces import m_bucket

        return self.tuned.get(m_bucket(rows))

    def __call__(self, x, weight, scale=None, zeros=None, bias=None, residual=None, fmt="dense", group_size=128,
                 swiglu=False, norm_weight=None, norm_eps=0.0, norm_zero_centered=False, x_gate=None):  # fmt: skip
        from ..tuning.spaces import m_bucket

        impl = self.impls.get(m_bucket(x.shape[0]), self.fallback)
        return _run_linear(impl, x, weight, scale, zeros, bias, residual, fmt, group_size, swiglu, norm_weight,
                           norm_eps, norm_zero_centered, x_gate, self.residual_in_place)  # fmt: skip


def _linear_by_rows(x, w, **kwargs):
    """The CUDA default: the vendor GEMM from VENDOR_GEMM_MIN_ROWS rows, the Triton kernel below."""
    from ..codegen.triton import linear as t_linear

    if x.shape[0] >= VENDOR_GEMM_MIN_ROWS:
        return _vendor_or_triton(x, w, **kwargs)
    return t_linear.linear(x, w, **kwargs)


def _vendor_or_triton(x, w, **kwargs):
    """The vendor GEMM, or the Triton kernel's default for a format the vendor GEMM cannot take on this device."""
    from ..codegen import vendor_gemm
    from ..codegen.triton import linear as t_linear

    if vendor_gemm.supports(x, w):
        return vendor_gemm.linear(x, w, **kwargs)
    return t_linear.linear(x, w, **kwargs)


def _tuned_impl(lowering: str, config: dict):
    from triton.runtime.errors import OutOfResources

    from ..codegen.triton import linear as t_linear

    if lowering == "reference":
        return reference.linear
    if lowering == "vendor":
        return _vendor_or_triton
    if lowering == "tvm":
        from ..tuning.spaces import tvm_available

        if not tvm_available():
            raise DFlashError(
                "tuning database: a linear's chosen lowering is TVM, which is not installed here "
                "(pip install apache-tvm, or tune the profile without it)"
            )
        from ..codegen.tvm.linear import static_linear

        def tvm_linear(x, w, residual_in_place=False, **kw):  # its epilogue adds the residual as it writes
            return static_linear(x, w, **config, **kw)

        return tvm_linear
    if lowering == "triton":
        fields = dict(config)
        fp8_dot = fields.pop("fp8_dot", None)
        cfg = t_linear.LinearConfig(**fields)

        def tuned(x, w, **kw):
            try:
                return t_linear.linear(x, w, config=cfg, fp8_dot=fp8_dot, **kw)
            except OutOfResources:  # tuned without this call's prologue (norm, gate), which needs more resources
                return t_linear.linear(x, w, fp8_dot=fp8_dot, **kw)

        return tuned
    raise ValueError(f"lowering: a linear cannot be lowered to {lowering!r}")
