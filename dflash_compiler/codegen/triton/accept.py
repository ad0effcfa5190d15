"""On-device acceptance of a verified block for a batch of requests: greedy and rejection sampling.

Block layout: [anchor, d_1 .. d_{Bs-1}]. Target row i (i = 0..Bs-1) is the target's distribution for the slot after
block[i]; draft row j (j = 0..Bs-2) is the drafter's distribution that produced draft_tokens[:, j]. The result per
request is the number a of accepted drafts, the bonus token (the target's token for slot a+1), and the committed
row: the a accepted drafts, the bonus, then -1.

The vocabulary is cut into chunks so that one request's work spreads over many programs; sampling is an inverse
CDF over chunk sums, then over the one chosen chunk, driven by uniforms passed in as tensors.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


class AcceptResult(NamedTuple):
    num_accepted: torch.Tensor  # [N] int64, drafts accepted (0 .. Bs-1)
    bonus: torch.Tensor  # [N] int64, the target's token after the accepted drafts
    tokens: torch.Tensor  # [N, Bs] int64, accepted drafts then the bonus, -1 after


@triton.jit
def _argmax_partial_kernel(
    LOGITS, PV, PI, stride_row, V, NCH: tl.constexpr, CHUNK: tl.constexpr, BLOCK_V: tl.constexpr
):
    """Per (row, chunk): the chunk's max and its first index."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    best = tl.full([], float("-inf"), dtype=tl.float32)
    best_i = tl.full([], 0, dtype=tl.int32)
    for v0 in range(c * CHUNK, c * CHUNK + CHUNK, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(LOGITS + row * stride_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m = tl.max(x, 0)
        i = tl.argmax(x, 0)  # first index of the max within the tile
        take = m > best  # strict, so earlier tiles win ties
        best_i = tl.where(take, v0 + i, best_i)
        best = tl.where(take, m, best)
    tl.store(PV + row * NCH + c, best)
    tl.store(PI + row * NCH + c, best_i)


@triton.jit
def _greedy_finalize_kernel(
    PV,
    PI,
    DRAFT,
    NACC,
    BONUS,
    TOKENS,
    stride_draft,
    BS: tl.constexpr,
    NCH: tl.constexpr,
    BS_P2: tl.constexpr,
    NCH_P2: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BS_P2)
    c = tl.arange(0, NCH_P2)
    ok = (j[:, None] < BS) & (c[None, :] < NCH)
    pv = tl.load(PV + (n * BS + j[:, None]) * NCH + c[None, :], mask=ok, other=float("-inf"))
    pi = tl.load(PI + (n * BS + j[:, None]) * NCH + c[None, :], mask=ok, other=0)
    row_max = tl.max(pv, 1)
    big = 2147483647
    target = tl.min(tl.where((pv == row_max[:, None]) & ok, pi, big), 1)  # ties: the smallest index
    draft = tl.load(DRAFT + n * stride_draft + j, mask=j < BS - 1, other=-1)
    match = (j < BS - 1) & (draft == target)
    a = tl.min(tl.where(match, BS_P2, j), 0)
    bonus = tl.sum(tl.where(j == a, target, 0), 0)
    tokens = tl.where(j < a, draft, tl.where(j == a, bonus, -1))
    tl.store(NACC + n, a.to(tl.int64))
    tl.store(BONUS + n, bonus.to(tl.int64))
    tl.store(TOKENS + n * BS + j, tokens.to(tl.int64), mask=j < BS)


@triton.jit
def _argmax_finalize_kernel(PV, PI, OUT, NCH: tl.constexpr, NCH_P2: tl.constexpr):
    """One row: the smallest index among its chunks' maxima."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, NCH_P2)
    ok = c < NCH
    pv = tl.load(PV + row * NCH + c, mask=ok, other=float("-inf"))
    pi = tl.load(PI + row * NCH + c, mask=ok, other=0)
    best = tl.max(pv, 0)
    idx = tl.min(tl.where((pv == best) & ok, pi, 2147483647), 0)
    tl.store(OUT + row, idx.to(tl.int64))


def _chunking(vocab: int, block_v: int | None, chunk: int | None) -> tuple[int, int]:
    block_v = block_v or min(2048, triton.next_power_of_2(vocab))
    chunk = chunk or max(block_v, min(16384, triton.cdiv(triton.cdiv(vocab, 32), block_v) * block_v))
    if chunk % block_v:
        raise ValueError(f"chunk: {chunk} must be a multiple of block_v {block_v}")
    return block_v, chunk


def _check_draft(draft_tokens: torch.Tensor, n_req: int, bs: int) -> None:
    if draft_tokens.shape != (n_req, bs - 1) or draft_tokens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"draft_tokens: expected int32/int64 [{n_req}, {bs - 1}], got {tuple(draft_tokens.shape)}")
    if draft_tokens.stride(1) != 1:
        raise ValueError("draft_tokens: last dim must be contiguous")


def _argmax_partials(rows: torch.Tensor, block_v: int | None, chunk: int | None):
    """Per (row, chunk of the vocabulary) of rows [R, V]: the chunk's max and its first index."""
    vocab = rows.shape[1]
    block_v, chunk = _chunking(vocab, block_v, chunk)
    nch = triton.cdiv(vocab, chunk)
    pv = torch.empty((rows.shape[0], nch), device=rows.device, dtype=torch.float32)
    pi = torch.empty((rows.shape[0], nch), device=rows.device, dtype=torch.int32)
    if rows.shape[0]:
        _argmax_partial_kernel[(rows.shape[0], nch)](
            rows, pv, pi, rows.stride(0), vocab, NCH=nch, CHUNK=chunk, BLOCK_V=block_v, num_warps=4
        )
    return pv, pi, nch


def argmax(logits: torch.Tensor, *, block_v: int | None = None, chunk: int | None = None) -> torch.Tensor:
    """The index of the first maximum over the last dim (int64; torch.argmax for logits without NaN), every row
    split over the vocabulary in chunks so that a few rows still fill the GPU."""
    if logits.dim() < 1 or logits.shape[-1] == 0 or not logits.is_floating_point():
        raise ValueError(f"logits: expected a float tensor with a non-empty last dim, got {tuple(logits.shape)}")
    rows = logits.reshape(-1, logits.shape[-1])
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    pv, pi, nch = _argmax_partials(rows, block_v, chunk)
    out = torch.empty(rows.shape[0], device=logits.device, dtype=torch.int64)
    if rows.shape[0]:
        _argmax_finalize_kernel[(rows.shape[0],)](pv, pi, out, NCH=nch, NCH_P2=triton.next_power_of_2(nch))
    return out.view(logits.shape[:-1])


def greedy_accept(
    draft_tokens: torch.Tensor, logits: torch.Tensor, *, block_v: int | None = None, chunk: int | None = None
) -> AcceptResult:
    """a = the longest prefix of draft_tokens [N, Bs-1] equal to argmax(logits [N, Bs, V]); bonus = argmax at a."""
    if logits.dim() != 3 or logits.stride(2) != 1 or not logits.is_floating_point():
        raise ValueError(f"logits: expected float [N, Bs, V] with a contiguous last dim, got {tuple(logits.shape)}")
    n_req, bs, vocab = logits.shape
    _check_draft(draft_tokens, n_req, bs)
    pv, pi, nch = _argmax_partials(logits.reshape(n_req * bs, vocab), block_v, chunk)
    out = AcceptResult(
        torch.empty(n_req, device=logits.device, dtype=torch.int64),
        torch.empty(n_req, device=logits.device, dtype=torch.int64),
        torch.empty((n_req, bs), device=logits.device, dtype=torch.int64),
    )
    _greedy_finalize_kernel[(n_req,)](
        pv,
        pi,
        draft_tokens,
        *out,
        draft_tokens.stride(0),
        BS=bs,
        NCH=nch,
        BS_P2=triton.next_power_of_2(bs),
        NCH_P2=triton.next_power_of_2(nch),
    )
    return out


@triton.jit
def _lse_partial_kernel(X, PM, PS, stride_row, V, scale, NCH: tl.constexpr, CHUNK: tl.constexpr, BLOCK_V: tl.constexpr):
    """Per (row, chunk): max and sum of 2^(x*scale - max), scale = log2(e) / temperature."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    m = tl.full([], float("-inf"), dtype=tl.float32)
    s = tl.zeros([], dtype=tl.float32)
    for v0 in range(c * CHUNK, c * CHUNK + CHUNK, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(X + row * stride_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * scale
        m_new = tl.maximum(m, tl.max(x, 0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp2(m - m_use) + tl.sum(tl.exp2(x - m_use), 0)
        m = m_new
    tl.store(PM + row * NCH + c, m)
    tl.store(PS + row * NCH + c, s)


@triton.jit
def _row_lse2(PM, PS, rows, row_ok, NCH: tl.constexpr, NCH_P2: tl.constexpr):
    """log2-sum-exp2 of each row from its chunk partials."""
    c = tl.arange(0, NCH_P2)
    ok = row_ok[:, None] & (c[None, :] < NCH)
    pm = tl.load(PM + rows[:, None] * NCH + c[None, :], mask=ok, other=float("-inf"))
    ps = tl.load(PS + rows[:, None] * NCH + c[None, :], mask=ok, other=0.0)
    mx = tl.max(pm, 1)
    mx_use = tl.where(mx == float("-inf"), 0.0, mx)
    total = tl.sum(ps * tl.exp2(pm - mx_use[:, None]), 1)
    return mx_use + tl.log2(tl.where(row_ok, total, 1.0))


@triton.jit
def _prob(X, row, idx, mask, lse2, scale, LOGITS: tl.constexpr):
    """Probabilities of entries idx of a row: given directly, or softmax(logits / T) through lse2."""
    x = tl.load(X + row + idx, mask=mask, other=0.0).to(tl.float32)
    if LOGITS:
        return tl.where(mask, tl.exp2(x * scale - lse2), 0.0)
    return x


@triton.jit
def _accept_count(
    DRAFT,
    UACC,
    P,
    Q,
    PM_P,
    PS_P,
    PM_Q,
    PS_Q,
    n,
    stride_draft,
    stride_ua,
    stride_p,
    stride_pr,
    stride_q,
    stride_qr,
    scale,
    BS: tl.constexpr,
    NCH: tl.constexpr,
    BS_P2: tl.constexpr,
    NCH_P2: tl.constexpr,
    LOGITS: tl.constexpr,
):
    """Accepted drafts a (accept d_j iff u_j * q_j(d_j) < p_j(d_j), stopping at the first rejection), and the
    log2-sum-exp2 of the target and draft rows at a (0 when probabilities are given)."""
    j = tl.arange(0, BS_P2)
    jd = j < BS - 1
    d = tl.load(DRAFT + n * stride_draft + j, mask=jd, other=0).to(tl.int64)
    u = tl.load(UACC + n * stride_ua + j, mask=jd, other=1.0)
    if LOGITS:
        lse_p = _row_lse2(PM_P, PS_P, n * BS + j, j < BS, NCH, NCH_P2)
        lse_q = _row_lse2(PM_Q, PS_Q, n * (BS - 1) + j, jd, NCH, NCH_P2)
    else:
        lse_p = tl.zeros([BS_P2], dtype=tl.float32)
        lse_q = tl.zeros([BS_P2], dtype=tl.float32)
    pd = _prob(P, n * stride_p + j * stride_pr, d, jd, lse_p, scale, LOGITS)
    qd = _prob(Q, n * stride_q + j * stride_qr, d, jd, lse_q, scale, LOGITS)
    accept = jd & (u * qd < pd)
    a = tl.min(tl.where(accept, BS_P2, j), 0)
    return a, tl.sum(tl.where(j == a, lse_p, 0.0), 0), tl.sum(tl.where(j == a, lse_q, 0.0), 0)


@triton.jit
def _residual_partial_kernel(
    DRAFT,
    UACC,
    P,
    Q,
    PM_P,
    PS_P,
    PM_Q,
    PS_Q,
    RSUM,
    PSUM,
    NACC,
    stride_draft,
    stride_ua,
    stride_p,
    stride_pr,
    stride_q,
    stride_qr,
    V,
    scale,
    BS: tl.constexpr,
    NCH: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BS_P2: tl.constexpr,
    NCH_P2: tl.constexpr,
    LOGITS: tl.constexpr,
):
    """Per (request, chunk): at the first rejected position a, the chunk sums of max(p_a - q_a, 0) and of p_a
    (the residual is empty when every draft was accepted: then the bonus comes from p at the last position)."""
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    a, lse_p, lse_q = _accept_count(
        DRAFT,
        UACC,
        P,
        Q,
        PM_P,
        PS_P,
        PM_Q,
        PS_Q,
        n,
        stride_draft,
        stride_ua,
        stride_p,
        stride_pr,
        stride_q,
        stride_qr,
        scale,
        BS,
        NCH,
        BS_P2,
        NCH_P2,
        LOGITS,
    )
    rejected = a < BS - 1
    q_len = tl.where(rejected, V, 0)  # row a of q exists only when a draft was rejected
    rs = tl.zeros([], dtype=tl.float32)
    ps = tl.zeros([], dtype=tl.float32)
    for v0 in range(c * CHUNK, c * CHUNK + CHUNK, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        ok = offs < V
        p = _prob(P, n * stride_p + a * stride_pr, offs, ok, lse_p, scale, LOGITS)
        q = _prob(Q, n * stride_q + a * stride_qr, offs, offs < q_len, lse_q, scale, LOGITS)
        rs += tl.sum(tl.where(rejected, tl.maximum(p - q, 0.0), 0.0), 0)
        ps += tl.sum(p, 0)
    tl.store(RSUM + n * NCH + c, rs)
    tl.store(PSUM + n * NCH + c, ps)
    if c == 0:
        tl.store(NACC + n, a.to(tl.int64))


@triton.jit
def _sample_kernel(
    DRAFT,
    UACC,
    USAMP,
    P,
    Q,
    PM_P,
    PS_P,
    PM_Q,
    PS_Q,
    RSUM,
    PSUM,
    NACC,
    BONUS,
    TOKENS,
    stride_draft,
    stride_ua,
    stride_p,
    stride_pr,
    stride_q,
    stride_qr,
    V,
    scale,
    BS: tl.constexpr,
    NCH: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BS_P2: tl.constexpr,
    NCH_P2: tl.constexpr,
    LOGITS: tl.constexpr,
):
    """Inverse-CDF sample of the bonus: pick the chunk from the chunk sums, then the token inside it."""
    n = tl.program_id(0).to(tl.int64)
    a, lse_p, lse_q = _accept_count(
        DRAFT,
        UACC,
        P,
        Q,
        PM_P,
        PS_P,
        PM_Q,
        PS_Q,
        n,
        stride_draft,
        stride_ua,
        stride_p,
        stride_pr,
        stride_q,
        stride_qr,
        scale,
        BS,
        NCH,
        BS_P2,
        NCH_P2,
        LOGITS,
    )
    ci = tl.arange(0, NCH_P2)
    rsum = tl.load(RSUM + n * NCH + ci, mask=ci < NCH, other=0.0)
    psum = tl.load(PSUM + n * NCH + ci, mask=ci < NCH, other=0.0)
    use_r = tl.sum(rsum, 0) > 0.0  # else sample p: all accepted, or no residual mass
    sums = tl.where(use_r, rsum, psum)
    x = tl.load(USAMP + n) * tl.sum(sums, 0)
    cum = tl.cumsum(sums, 0)
    last_pos = tl.max(tl.where(sums > 0.0, ci, 0), 0)
    chosen = tl.minimum(tl.min(tl.where(cum > x, ci, NCH_P2), 0), last_pos)  # x past the end: last chunk with mass
    base = tl.sum(tl.where(ci < chosen, sums, 0.0), 0)
    run = base
    token = tl.full([], -1, dtype=tl.int32)
    last_tok = tl.full([], 0, dtype=tl.int32)
    for v0 in range(chosen * CHUNK, chosen * CHUNK + CHUNK, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        ok = offs < V
        p = _prob(P, n * stride_p + a * stride_pr, offs, ok, lse_p, scale, LOGITS)
        if use_r:
            q = _prob(Q, n * stride_q + a * stride_qr, offs, ok, lse_q, scale, LOGITS)
            w = tl.maximum(p - q, 0.0)
        else:
            w = p
        c = run + tl.cumsum(w, 0)
        hit = tl.min(tl.where((c > x) & (w > 0.0), offs, 2147483647), 0)
        token = tl.where((token < 0) & (hit < 2147483647), hit, token)
        last_tok = tl.maximum(last_tok, tl.max(tl.where(w > 0.0, offs, 0), 0))
        run = run + tl.sum(w, 0)
    token = tl.where(token < 0, last_tok, token)  # rounding left x just past this chunk's sum
    j = tl.arange(0, BS_P2)
    draft = tl.load(DRAFT + n * stride_draft + j, mask=j < BS - 1, other=-1).to(tl.int64)
    tokens = tl.where(j < a, draft, tl.where(j == a, token.to(tl.int64), -1))
    tl.store(BONUS + n, token.to(tl.int64))
    tl.store(TOKENS + n * BS + j, tokens, mask=j < BS)


def rejection_accept(
    draft_tokens: torch.Tensor,
    target: torch.Tensor,
    draft: torch.Tensor,
    u_accept: torch.Tensor,
    u_sample: torch.Tensor,
    *,
    temperature: float | None = None,
    block_v: int | None = None,
    chunk: int | None = None,
) -> AcceptResult:
    """Speculative sampling. target [N, Bs, V] and draft [N, >= Bs-1, V] are probabilities, or logits when
    temperature is given (p = softmax(target / T), q = softmax(draft / T)). Draft j is accepted iff
    u_accept[:, j] * q_j(d_j) < p_j(d_j), up to the first rejection a; the bonus is drawn with u_sample [N] by
    inverse CDF from normalize(max(p_a - q_a, 0)), from p_a if that mass is 0, or from p at Bs-1 if all passed."""
    if target.dim() != 3 or target.stride(2) != 1 or not target.is_floating_point():
        raise ValueError(f"target: expected float [N, Bs, V] with a contiguous last dim, got {tuple(target.shape)}")
    n_req, bs, vocab = target.shape
    _check_draft(draft_tokens, n_req, bs)
    if draft.dim() != 3 or draft.shape[0] != n_req or draft.shape[1] < bs - 1 or draft.shape[2] != vocab:
        raise ValueError(f"draft: expected [{n_req}, >= {bs - 1}, {vocab}], got {tuple(draft.shape)}")
    if draft.stride(2) != 1 or not draft.is_floating_point():
        raise ValueError("draft: expected a float tensor with a contiguous last dim")
    if u_accept.shape != (n_req, bs - 1) or u_accept.dtype != torch.float32 or u_accept.stride(1) != 1:
        raise ValueError(f"u_accept: expected float32 [{n_req}, {bs - 1}]")
    if u_sample.shape != (n_req,) or u_sample.dtype != torch.float32:
        raise ValueError(f"u_sample: expected float32 [{n_req}]")
    if temperature is not None and not temperature > 0:
        raise ValueError(f"temperature: {temperature} must be > 0 (use greedy_accept for T = 0)")
    block_v, chunk = _chunking(vocab, block_v, chunk)
    nch = triton.cdiv(vocab, chunk)
    dev = target.device
    logits = temperature is not None
    scale = _LOG2E / temperature if logits else 1.0
    if logits:
        pm_p = torch.empty((n_req * bs, nch), device=dev, dtype=torch.float32)
        ps_p = torch.empty_like(pm_p)
        pm_q = torch.empty((n_req * (bs - 1), nch), device=dev, dtype=torch.float32)
        ps_q = torch.empty_like(pm_q)
        t_rows = target.reshape(n_req * bs, vocab)
        _lse_partial_kernel[(n_req * bs, nch)](
            t_rows, pm_p, ps_p, t_rows.stride(0), vocab, scale, NCH=nch, CHUNK=chunk, BLOCK_V=block_v, num_warps=4
        )
        if bs > 1:
            d_rows = draft[:, : bs - 1].reshape(n_req * (bs - 1), vocab)
            _lse_partial_kernel[(n_req * (bs - 1), nch)](
                d_rows, pm_q, ps_q, d_rows.stride(0), vocab, scale, NCH=nch, CHUNK=chunk, BLOCK_V=block_v, num_warps=4
            )
    else:
        pm_p = ps_p = pm_q = ps_q = target  # unused
    rsum = torch.empty((n_req, nch), device=dev, dtype=torch.float32)
    psum = torch.empty_like(rsum)
    out = AcceptResult(
        torch.empty(n_req, device=dev, dtype=torch.int64),
        torch.empty(n_req, device=dev, dtype=torch.int64),
        torch.empty((n_req, bs), device=dev, dtype=torch.int64),
    )
    strides = (
        draft_tokens.stride(0),
        u_accept.stride(0),
        target.stride(0),
        target.stride(1),
        draft.stride(0),
        draft.stride(1),
        vocab,
        scale,
    )
    meta = dict(
        BS=bs,
        NCH=nch,
        CHUNK=chunk,
        BLOCK_V=block_v,
        BS_P2=triton.next_power_of_2(bs),
        NCH_P2=triton.next_power_of_2(nch),
        LOGITS=logits,
        num_warps=4,
    )
    _residual_partial_kernel[(n_req, nch)](
        draft_tokens, u_accept, target, draft, pm_p, ps_p, pm_q, ps_q, rsum, psum, out.num_accepted, *strides, **meta
    )
    _sample_kernel[(n_req,)](
        draft_tokens,
        u_accept,
        u_sample,
        target,
        draft,
        pm_p,
        ps_p,
        pm_q,
        ps_q,
        rsum,
        psum,
        out.num_accepted,
        out.bonus,
        out.tokens,
        *strides,
        **meta,
    )
    return out
