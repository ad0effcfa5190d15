"""Block attention for verify and draft steps: GQA over a contiguous or paged KV cache, split-KV for long contexts.

Layouts (last dim contiguous, other strides free):
  q, out       [N, T, Hq, D]      N requests, T block queries each (token-major, as the projections produce them)
  contiguous   [N, Hkv, S_max, D] per-request cache
  paged        [P, Hkv, PAGE, D]  pages, with block_table [N, max_pages] (int32); an NHD pool [P, PAGE, Hkv, D]
                                  can be passed as pool.transpose(1, 2)
  block K/V    [N, T, Hkv, D]     the draft block's own keys and values (draft attention only)

One program owns one (request, KV head, query-row tile, KV split): the rows are every (query, head) pair of the
head's GQA group, so each KV byte is read once per request. With several splits each program writes a partial
output and its log-sum-exp, and a second kernel merges them (flash-decoding).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl

from dflash_compiler.codegen.triton.device import gpu_facts

_LOG2E = 1.4426950408889634


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def tuned_config(config: dict) -> AttentionConfig:
    """The AttentionConfig of a tuning database entry's config (its num_splits is the launch's own argument)."""
    return AttentionConfig(config["block_m"], config["block_n"], config["num_warps"], config["num_stages"])


@triton.jit
def _kv_rows(
    n,
    s0,
    BT,
    stride_btn,
    stride_p,
    stride_s,
    hi,
    PAGED: tl.constexpr,
    PAGE: tl.constexpr,
    MASKED: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Element offsets of the rows for keys s0 .. s0+BLOCK_N-1 (excluding the head and dim terms)."""
    offs = s0 + tl.arange(0, BLOCK_N)
    if PAGED:
        if PAGE % BLOCK_N == 0:
            # the whole tile lies in one page: one scalar lookup
            page = tl.load(BT + n * stride_btn + s0 // PAGE).to(tl.int64)
            rows = page * stride_p + (offs % PAGE) * stride_s
        else:
            if MASKED:
                page = tl.load(BT + n * stride_btn + offs // PAGE, mask=offs < hi, other=0).to(tl.int64)
            else:
                page = tl.load(BT + n * stride_btn + offs // PAGE).to(tl.int64)
            rows = page * stride_p + (offs % PAGE) * stride_s
    else:
        rows = n.to(tl.int64) * stride_p + offs * stride_s
    return offs, rows


@triton.jit
def _tile(
    acc,
    m_i,
    l_i,
    q,
    K,
    V,
    krows,
    vrows,
    offs,
    qpos,
    hi,
    qk_scale,
    d,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One online-softmax step over a tile of keys. Scores are in log2 units (qk_scale includes log2(e))."""
    if MASKED:
        valid = offs < hi
        k = tl.load(K + krows[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(V + vrows[:, None] + d[None, :], mask=valid[:, None], other=0.0)
    else:
        k = tl.load(K + krows[:, None] + d[None, :])
        v = tl.load(V + vrows[:, None] + d[None, :])
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        allowed = valid[None, :]
        if CAUSAL:
            allowed = allowed & (offs[None, :] <= qpos[:, None])
        if WINDOW > 0:
            allowed = allowed & (qpos[:, None] - offs[None, :] < WINDOW)
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        # a row may see no key yet (split boundary, window edge): keep exp2 away from -inf - -inf
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _output_gate(o, Gate, n, T, t, head, d, stride_gr, HEAD_DIM: tl.constexpr, row_ok):
    """o * sigmoid(gate) for rows (request n, position t, head) of o, the gate in rows [N*T, Hq*D] (the gated
    query's second half, as the q projection leaves it), in fp32 before o is rounded to its dtype."""
    g_ptrs = Gate + (n * T + t).to(tl.int64)[:, None] * stride_gr + head[:, None] * HEAD_DIM + d[None, :]
    g = tl.load(g_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    return o * (1.0 / (1.0 + tl.exp(-g)))


@triton.jit
def _attention_kernel(
    Q,
    K,
    V,
    KB,
    VB,
    Out,
    Gate,
    OP,
    LSE,
    LENS,
    BT,
    qk_scale,
    NUM_SPLITS,
    stride_qn,
    stride_qt,
    stride_qh,
    stride_kp,
    stride_kh,
    stride_ks,
    stride_vp,
    stride_vh,
    stride_vs,
    stride_kbn,
    stride_kbt,
    stride_kbh,
    stride_vbn,
    stride_vbt,
    stride_vbh,
    stride_on,
    stride_ot,
    stride_oh,
    stride_gr,
    stride_btn,
    T,
    GROUPS: tl.constexpr,
    HQ: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGED: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_KV: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    GATED: tl.constexpr,
):
    # T (queries per request) is a runtime value: a prefill chunk of any length reuses one compiled kernel
    NUM_M = tl.cdiv(T * GROUPS, BLOCK_M)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n = tl.program_id(2)
    kvh = pid // NUM_M
    rows = (pid % NUM_M) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T * GROUPS
    t_q = rows // GROUPS
    head = kvh * GROUPS + rows % GROUPS
    d = tl.arange(0, HEAD_DIM)

    q_ptrs = Q + n.to(tl.int64) * stride_qn + t_q[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)

    cache_len = tl.load(LENS + n)
    qpos = cache_len + t_q
    # keys in the cache: [lo, hi). Verify keeps the block's own keys in the cache after cache_len.
    if BLOCK_KV:
        hi = cache_len
    else:
        hi = cache_len + T
    if WINDOW > 0:
        lo = tl.maximum(cache_len - WINDOW + 1, 0)
        full_lo = tl.maximum(cache_len + T - WINDOW, 0)  # every query sees keys from here on
    else:
        lo = 0
        full_lo = 0
    if CAUSAL:
        full_hi = cache_len
    else:
        full_hi = hi

    lo_al = (lo // BLOCK_N) * BLOCK_N
    chunk = tl.cdiv(tl.cdiv(hi - lo_al, NUM_SPLITS), BLOCK_N) * BLOCK_N
    a = lo_al + split * chunk
    b = tl.minimum(a + chunk, hi)
    m1 = tl.minimum(tl.maximum(a, tl.cdiv(full_lo, BLOCK_N) * BLOCK_N), b)
    m2 = tl.maximum(tl.minimum(b, (full_hi // BLOCK_N) * BLOCK_N), m1)

    K_h = K + kvh.to(tl.int64) * stride_kh
    V_h = V + kvh.to(tl.int64) * stride_vh
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    if WINDOW > 0:
        for s0 in range(a, m1, BLOCK_N):
            offs, krows = _kv_rows(n, s0, BT, stride_btn, stride_kp, stride_ks, hi, PAGED, PAGE, True, BLOCK_N)
            offs, vrows = _kv_rows(n, s0, BT, stride_btn, stride_vp, stride_vs, hi, PAGED, PAGE, True, BLOCK_N)
            acc, m_i, l_i = _tile(
                acc, m_i, l_i, q, K_h, V_h, krows, vrows, offs, qpos, hi, qk_scale, d, True, CAUSAL, WINDOW, PRECISION
            )
    for s0 in range(m1, m2, BLOCK_N):
        offs, krows = _kv_rows(n, s0, BT, stride_btn, stride_kp, stride_ks, hi, PAGED, PAGE, False, BLOCK_N)
        offs, vrows = _kv_rows(n, s0, BT, stride_btn, stride_vp, stride_vs, hi, PAGED, PAGE, False, BLOCK_N)
        acc, m_i, l_i = _tile(
            acc, m_i, l_i, q, K_h, V_h, krows, vrows, offs, qpos, hi, qk_scale, d, False, CAUSAL, WINDOW, PRECISION
        )
    for s0 in range(m2, b, BLOCK_N):
        offs, krows = _kv_rows(n, s0, BT, stride_btn, stride_kp, stride_ks, hi, PAGED, PAGE, True, BLOCK_N)
        offs, vrows = _kv_rows(n, s0, BT, stride_btn, stride_vp, stride_vs, hi, PAGED, PAGE, True, BLOCK_N)
        acc, m_i, l_i = _tile(
            acc, m_i, l_i, q, K_h, V_h, krows, vrows, offs, qpos, hi, qk_scale, d, True, CAUSAL, WINDOW, PRECISION
        )

    # the draft block's own keys, held outside the cache, go to the last split; the constexpr test stays
    # separate so that verify kernels do not compile this block at all
    if BLOCK_KV:  # noqa: SIM102
        if split == NUM_SPLITS - 1:
            tk = tl.arange(0, BLOCK_T)
            tk_ok = tk < T
            kb_ptrs = KB + n.to(tl.int64) * stride_kbn + tk[:, None] * stride_kbt + kvh * stride_kbh + d[None, :]
            vb_ptrs = VB + n.to(tl.int64) * stride_vbn + tk[:, None] * stride_vbt + kvh * stride_vbh + d[None, :]
            kb = tl.load(kb_ptrs, mask=tk_ok[:, None], other=0.0)
            vb = tl.load(vb_ptrs, mask=tk_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(kb), input_precision=PRECISION) * qk_scale
            allowed = tk_ok[None, :]
            if CAUSAL:
                allowed = allowed & (tk[None, :] <= t_q[:, None])
            if WINDOW > 0:
                allowed = allowed & (t_q[:, None] - tk[None, :] < WINDOW)
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PRECISION)
            m_i = m_new

    if not SPLIT:
        o = acc / l_i[:, None]
        if GATED:
            o = _output_gate(o, Gate, n, T, t_q, head, d, stride_gr, HEAD_DIM, row_ok)
        o_ptrs = Out + n.to(tl.int64) * stride_on + t_q[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
        tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=row_ok[:, None])
    else:
        has = l_i > 0.0
        o = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        # partials are [N, T, Hq, NUM_SPLITS, D] and [N, T, Hq, NUM_SPLITS]
        prow = ((n.to(tl.int64) * T + t_q) * HQ + head) * NUM_SPLITS + split
        tl.store(OP + prow[:, None] * HEAD_DIM + d[None, :], o.to(OP.dtype.element_ty), mask=row_ok[:, None])
        tl.store(LSE + prow, lse, mask=row_ok)


@triton.jit
def _combine_kernel(
    OP,
    LSE,
    Out,
    Gate,
    stride_on,
    stride_ot,
    stride_oh,
    stride_gr,
    total_rows,
    NUM_SPLITS,
    T,
    HQ: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SPLITS_P2: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GATED: tl.constexpr,
):
    """Merge split partials: out = sum_s 2^(lse_s - max) * o_s / sum_s 2^(lse_s - max), BLOCK_R rows a program.
    All splits of a row are loaded at once: a loop over splits would serialise their load latencies."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # row = (n * T + t) * HQ + h
    row_ok = rows < total_rows
    s = tl.arange(0, SPLITS_P2)
    d = tl.arange(0, HEAD_DIM)
    ok = row_ok[:, None] & (s[None, :] < NUM_SPLITS)
    idx = rows.to(tl.int64)[:, None] * NUM_SPLITS + s[None, :]  # [R, S]
    lse = tl.load(LSE + idx, mask=ok, other=float("-inf"))
    mx = tl.max(lse, 1)
    w = tl.exp2(lse - tl.where(mx == float("-inf"), 0.0, mx)[:, None])  # splits that saw no key have lse = -inf
    w = w / tl.where(row_ok, tl.sum(w, 1), 1.0)[:, None]
    part = tl.load(OP + idx[:, :, None] * HEAD_DIM + d[None, None, :], mask=ok[:, :, None], other=0.0)
    o = tl.sum(part.to(tl.float32) * w[:, :, None], 1)
    n = rows // (T * HQ)
    t = (rows // HQ) % T
    h = rows % HQ
    if GATED:
        o = _output_gate(o, Gate, n, T, t, h, d, stride_gr, HEAD_DIM, row_ok)
    o_ptrs = Out + n.to(tl.int64)[:, None] * stride_on + t[:, None] * stride_ot + h[:, None] * stride_oh + d[None, :]
    tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=row_ok[:, None])


def _num_sms(device: torch.device) -> int:
    facts = gpu_facts(device)
    return 132 if facts is None else facts.sm_count


def default_config(rows: int, head_dim: int) -> AttentionConfig:
    """Tile shapes by query rows per KV head (T * groups) and head_dim, chosen so that sm_90 builds do not spill."""
    if head_dim >= 256:
        if rows <= 16:
            return AttentionConfig(16, 32, 4, 2)
        if rows <= 32:
            return AttentionConfig(32, 16, 4, 2)
        # a 64-row tile spills at head_dim 256; a 128-row tile with two warpgroups does not. Three stages measured
        # 20% faster than two on the H100 (N=16, 8k context).
        return AttentionConfig(128, 32, 8, 3)
    if rows <= 64:
        return AttentionConfig(max(16, triton.next_power_of_2(rows)), 32, 4, 3)
    return AttentionConfig(128, 32, 8, 3)


def default_num_splits(
    units: int,
    max_len: int,
    device: torch.device,
    ctas_per_sm: int = 1,
    min_chunk: int = 256,
) -> int:
    """The fewest splits whose programs fill at least 90% of the resident slots, with whole waves at least 90% busy,
    and no split shorter than min_chunk keys (shorter ones cost more in partial writes than they gain)."""
    slots = _num_sms(device) * ctas_per_sm
    limit = max(1, min(64, max_len // min_chunk))
    for splits in range(1, limit + 1):
        programs = units * splits
        if programs >= 0.9 * slots and programs / (math.ceil(programs / slots) * slots) >= 0.9:
            return splits
    return limit  # too little work to fill the GPU: as many splits as min_chunk allows


def _check_cache(name: str, cache: torch.Tensor, hkv: int, d: int, dtype: torch.dtype) -> None:
    if cache.dim() != 4 or cache.shape[1] != hkv or cache.shape[3] != d:
        raise ValueError(f"{name}: expected [N or pages, {hkv}, S, {d}], got {tuple(cache.shape)}")
    if cache.dtype != dtype or cache.stride(3) != 1:
        raise ValueError(f"{name}: expected dtype {dtype} with a contiguous last dim")


def _attention(
    q, k_cache, v_cache, lens, k_block, v_block, block_table, causal, window, scale, out, num_splits, max_len, config,
    gate=None,
):  # fmt: skip
    if q.dim() != 4 or q.stride(3) != 1:
        raise ValueError(f"q: expected [N, T, Hq, D] with a contiguous last dim, got {tuple(q.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q: unsupported dtype {q.dtype}")
    n_req, t, hq, d = q.shape
    if d & (d - 1) or d < 16:
        raise ValueError(f"q: head_dim {d} must be a power of two >= 16")
    hkv = k_cache.shape[1] if k_cache.dim() == 4 else -1
    if hkv <= 0 or hq % hkv:
        raise ValueError(f"k_cache: {hkv} KV heads do not divide {hq} query heads")
    _check_cache("k_cache", k_cache, hkv, d, q.dtype)
    _check_cache("v_cache", v_cache, hkv, d, q.dtype)
    if lens.shape != (n_req,) or lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cache_lens: expected int32/int64 [{n_req}], got {lens.dtype} {tuple(lens.shape)}")
    paged = block_table is not None
    if paged:
        if block_table.dim() != 2 or block_table.shape[0] != n_req or block_table.dtype != torch.int32:
            raise ValueError(f"block_table: expected int32 [{n_req}, max_pages], got {block_table.dtype}")
        if block_table.stride(1) != 1:
            raise ValueError("block_table: last dim must be contiguous")
        page = k_cache.shape[2]
        if v_cache.shape[2] != page or page & (page - 1):
            raise ValueError(f"v_cache: page size {v_cache.shape[2]} must equal k_cache's and be a power of two")
        capacity = block_table.shape[1] * page
    else:
        if k_cache.shape[0] != n_req or v_cache.shape[0] != n_req or k_cache.shape[2] != v_cache.shape[2]:
            raise ValueError(f"k_cache/v_cache: expected [{n_req}, {hkv}, S_max, {d}] each")
        page = 1
        capacity = k_cache.shape[2]
    has_block = k_block is not None
    if has_block:
        for name, x in (("k_block", k_block), ("v_block", v_block)):
            if x.shape != (n_req, t, hkv, d) or x.dtype != q.dtype or x.stride(3) != 1:
                raise ValueError(f"{name}: expected {q.dtype} [{n_req}, {t}, {hkv}, {d}], got {tuple(x.shape)}")
    if gate is not None and (
        gate.shape != (n_req * t, hq * d) or gate.dtype != q.dtype or gate.stride(1) != 1 or gate.stride(0) < hq * d
    ):
        raise ValueError(f"gate: expected {q.dtype} [{n_req * t}, {hq * d}] with contiguous rows, got {gate.dtype} "
                         f"{tuple(gate.shape)}")  # fmt: skip
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(3) != 1:
        raise ValueError(f"out: expected {q.dtype} {tuple(q.shape)} with a contiguous last dim")

    groups = hq // hkv
    cfg = config or default_config(t * groups, d)
    num_m = triton.cdiv(t * groups, cfg.block_m)
    if num_splits is None:
        ctas = 1 if cfg.num_warps >= 8 else 2  # tiles use most of the register file
        num_splits = default_num_splits(n_req * hkv * num_m, max_len or capacity, q.device, ctas)
    if not 1 <= num_splits <= 128:
        raise ValueError(f"num_splits: {num_splits} outside 1..128")
    if paged and page < cfg.block_n and cfg.block_n % page:
        raise ValueError(f"block_table: page size {page} must divide or be a multiple of block_n {cfg.block_n}")

    if num_splits > 1:
        part_dtype = torch.float32 if q.dtype == torch.float32 else q.dtype
        op = torch.empty((n_req, t, hq, num_splits, d), device=q.device, dtype=part_dtype)
        lse = torch.empty((n_req, t, hq, num_splits), device=q.device, dtype=torch.float32)
    else:
        op = lse = out  # unused
    kb = k_block if has_block else q
    vb = v_block if has_block else q
    bt = block_table if paged else lens
    grid = (hkv * num_m, num_splits, n_req)
    _attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        kb,
        vb,
        out,
        q if gate is None else gate,
        op,
        lse,
        lens,
        bt,
        scale * _LOG2E,
        num_splits,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        kb.stride(0),
        kb.stride(1),
        kb.stride(2),
        vb.stride(0),
        vb.stride(1),
        vb.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        0 if gate is None else gate.stride(0),
        bt.stride(0),
        T=t,
        GROUPS=groups,
        HQ=hq,
        HEAD_DIM=d,
        PAGED=paged,
        PAGE=page,
        BLOCK_KV=has_block,
        CAUSAL=causal,
        WINDOW=window,
        SPLIT=num_splits > 1,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_T=max(16, triton.next_power_of_2(t)),
        GATED=gate is not None,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if num_splits > 1:
        total_rows = n_req * t * hq
        splits_p2 = triton.next_power_of_2(num_splits)
        block_r = max(1, min(16, 4096 // (splits_p2 * d)))  # keep a program's tile near 4K elements
        _combine_kernel[(triton.cdiv(total_rows, block_r),)](
            op,
            lse,
            out,
            q if gate is None else gate,
            out.stride(0),
            out.stride(1),
            out.stride(2),
            0 if gate is None else gate.stride(0),
            total_rows,
            num_splits,
            T=t,
            HQ=hq,
            HEAD_DIM=d,
            SPLITS_P2=splits_p2,
            BLOCK_R=block_r,
            GATED=gate is not None,
            num_warps=4,
        )
    return out


def verify_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    *,
    block_table: torch.Tensor | None = None,
    scale: float | None = None,
    window: int = 0,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    max_len: int | None = None,
    config: AttentionConfig | None = None,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Target verify attention. Request n has cache_lens[n] = L cached keys and its T block keys already written
    at L..L+T-1; query t sits at position L+t and sees keys 0..L+t (and only the last `window` of them if set).

    max_len (a host bound on L+T, default the cache capacity) sizes the default split count without a device sync.
    gate [N*T, Hq*D] (a gated attention's output gate): the output is o * sigmoid(gate), applied before o is
    rounded to its dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _attention(
        q, k_cache, v_cache, cache_lens, None, None, block_table, True, window, scale, out, num_splits, max_len, config,
        gate,
    )  # fmt: skip


def draft_attention(
    q: torch.Tensor,
    k_block: torch.Tensor,
    v_block: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    ctx_lens: torch.Tensor,
    *,
    block_table: torch.Tensor | None = None,
    causal: bool = False,
    window: int = 0,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    max_len: int | None = None,
    config: AttentionConfig | None = None,
) -> torch.Tensor:
    """Drafter attention. Request n's block queries (position start+t, start = ctx_lens[n]) see the cached context
    keys 0..start-1 and the block's own keys k_block/v_block: all of them for full layers, causally and within
    `window` positions (query_pos - key_pos < window) for sliding layers (causal=True, window=W)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _attention(
        q,
        k_cache,
        v_cache,
        ctx_lens,
        k_block,
        v_block,
        block_table,
        causal,
        window,
        scale,
        out,
        num_splits,
        max_len,
        config,
    )
