"""Fused small ops: RMSNorm (+ residual add), the Gated DeltaNet's gated output RMSNorm, SwiGLU over a GEMM's
[gate | up] output, per-head q/k norm + partial RoPE + output-gate split with an optional KV-cache write, and the
drafter's context K/V for all layers in one pass.

RoPE is NeoX rotate-half on the first rot = cos.shape[-1] dims; cos/sin rows come from ops.rope_cos_sin (one row
per token), so any rotary scaling is the caller's. Rounding follows ops.rms_norm: the norm output is rounded to
the activation dtype before RoPE, and plain norms round before the weight multiply.

KV caches are [N, Hkv, S_max, D] per request, or [P, Hkv, PAGE, D] pages with a block_table [N, max_pages]
(int32); the drafter's caches carry a leading layer dim. Token i goes to request seq_idx[i], slot positions[i].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    X,
    R,
    W,
    Y,
    RO,
    stride_x,
    stride_r,
    stride_y,
    stride_ro,
    H,
    eps,
    HAS_RES: tl.constexpr,
    ZERO_CENTERED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < H
    x = tl.load(X + row * stride_x + offs, mask=ok, other=0.0)
    if HAS_RES:
        # the residual stream is kept in the activation dtype, as torch's x + residual would be
        x = x + tl.load(R + row * stride_r + offs, mask=ok, other=0.0)
        tl.store(RO + row * stride_ro + offs, x, mask=ok)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / H + eps)
    w = tl.load(W + offs, mask=ok, other=0.0).to(tl.float32)
    if ZERO_CENTERED:
        y = xf * rstd * (1.0 + w)
    else:
        y = (xf * rstd).to(X.dtype.element_ty).to(tl.float32) * w
    tl.store(Y + row * stride_y + offs, y.to(Y.dtype.element_ty), mask=ok)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    zero_centered: bool = False,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """ops.rms_norm over the last dim. With residual: s = x + residual, returns (rms_norm(s), s)."""
    h = x.shape[-1]
    if x.stride(-1) != 1 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x: expected a float tensor with a contiguous last dim, got {x.dtype}")
    if weight.shape != (h,):
        raise ValueError(f"weight: expected [{h}], got {tuple(weight.shape)}")
    x2 = x.reshape(-1, h)
    rows = x2.shape[0]
    if out is None:
        out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    elif out.shape != x.shape or out.dtype != x.dtype or out.stride(-1) != 1:
        raise ValueError(f"out: expected {x.dtype} {tuple(x.shape)} with a contiguous last dim")
    y2 = out.view(-1, h)
    has_res = residual is not None
    if has_res:
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(-1) != 1:
            raise ValueError(f"residual: expected {x.dtype} {tuple(x.shape)} with a contiguous last dim")
        if residual_out is None:
            residual_out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        elif residual_out.shape != x.shape or residual_out.dtype != x.dtype or residual_out.stride(-1) != 1:
            raise ValueError(f"residual_out: expected {x.dtype} {tuple(x.shape)} with a contiguous last dim")
        r2, ro2 = residual.reshape(-1, h), residual_out.view(-1, h)
    else:
        r2 = ro2 = x2
    block = triton.next_power_of_2(h)
    _rms_norm_kernel[(rows,)](
        x2,
        r2,
        weight,
        y2,
        ro2,
        x2.stride(0),
        r2.stride(0),
        y2.stride(0),
        ro2.stride(0),
        h,
        eps,
        HAS_RES=has_res,
        ZERO_CENTERED=zero_centered,
        BLOCK=block,
        num_warps=min(16, max(1, block // 512)),
    )
    return (out, residual_out) if has_res else out


@triton.jit
def _gated_rms_norm_kernel(
    X,
    G,
    W,
    Y,
    stride_xt,
    stride_xh,
    stride_gt,
    stride_gh,
    stride_y,
    rows,
    H,
    D,
    eps,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """ROWS rows of D per program: y = rms_norm(x) * w, then * silu(g), rounded where ops.gated_rms_norm rounds.
    Row r is head r % H of token r // H, so x and g may be column slices of wider rows (z of the fused input GEMM)."""
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
    t = r // H
    h = r - t * H
    offs = tl.arange(0, BLOCK)[None, :]
    ok = (r < rows) & (offs < D)
    x = tl.load(X + t * stride_xt + h * stride_xh + offs, mask=ok, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 1) / D + eps)[:, None]
    w = tl.load(W + offs, mask=offs < D, other=0.0).to(tl.float32)
    normed = (x * rstd).to(Y.dtype.element_ty).to(tl.float32)
    scaled = (normed * w).to(Y.dtype.element_ty).to(tl.float32)
    g = tl.load(G + t * stride_gt + h * stride_gh + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + r * stride_y + offs, (scaled * (g * tl.sigmoid(g))).to(Y.dtype.element_ty), mask=ok)


def _token_head_rows(t: torch.Tensor, heads: int, d: int) -> torch.Tensor:
    """t as [tokens, heads, d] with unit stride over d, a view where the layout allows (a copy otherwise)."""
    t3 = t.reshape(-1, heads, d)
    return t3 if t3.stride(-1) == 1 else t3.contiguous()


def gated_rms_norm(
    x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """ops.gated_rms_norm over the last dim of x (the Gated DeltaNet output norm) into a contiguous tensor."""
    d = x.shape[-1]
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x: expected a float tensor, got {x.dtype}")
    if gate.shape != x.shape:
        raise ValueError(f"gate: expected {tuple(x.shape)}, got {tuple(gate.shape)}")
    if weight.shape != (d,):
        raise ValueError(f"weight: expected [{d}], got {tuple(weight.shape)}")
    heads = x.shape[-2] if x.dim() > 1 else 1
    x3 = _token_head_rows(x, heads, d)
    g3 = _token_head_rows(gate, heads, d)
    if out is None:
        out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    elif out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous {x.dtype} {tuple(x.shape)}")
    y2 = out.view(-1, d)
    rows = y2.shape[0]
    block = triton.next_power_of_2(d)
    per_program = max(1, min(16, 4096 // block))
    _gated_rms_norm_kernel[(triton.cdiv(rows, per_program),)](
        x3,
        g3,
        weight,
        y2,
        x3.stride(0),
        x3.stride(1),
        g3.stride(0),
        g3.stride(1),
        y2.stride(0),
        rows,
        heads,
        d,
        eps,
        ROWS=per_program,
        BLOCK=block,
        num_warps=4,
    )
    return out


@triton.jit
def _swiglu_kernel(Y, OUT, stride_y, stride_o, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    gate = tl.load(Y + row * stride_y + offs, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(Y + row * stride_y + N + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_o + offs, (gate * tl.sigmoid(gate) * up).to(OUT.dtype.element_ty), mask=ok)


def swiglu(y: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up for y = [gate | up] [M, 2N] -> [M, N], in fp32 and rounded once (ops.swiglu): the epilogue
    of a GEMM that cannot apply it, in one launch."""
    if y.dim() != 2 or y.shape[1] % 2 or y.stride(1) != 1 or y.dtype not in (torch.float16, torch.bfloat16,
                                                                              torch.float32):  # fmt: skip
        raise ValueError(f"y: expected a float [M, 2N] tensor with contiguous rows, got {y.dtype} {tuple(y.shape)}")
    m, n = y.shape[0], y.shape[1] // 2
    if out is None:
        out = torch.empty(m, n, device=y.device, dtype=y.dtype)
    elif out.shape != (m, n) or out.dtype != y.dtype or out.stride(1) != 1:
        raise ValueError(f"out: expected {y.dtype} [{m}, {n}] with contiguous rows, got {out.dtype} "
                         f"{tuple(out.shape)}")  # fmt: skip
    if m and n:
        block = min(2048, triton.next_power_of_2(n))
        _swiglu_kernel[(m, triton.cdiv(n, block))](y, out, y.stride(0), out.stride(0), n, BLOCK=block,
                                                   num_warps=4)  # fmt: skip
    return out


@triton.jit
def _norm_rope(
    base,
    W,
    cos_row,
    sin_row,
    eps,
    d,
    partner,
    rot_ok,
    sign,
    HEAD_DIM: tl.constexpr,
    ZERO_CENTERED: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
):
    """Per-head RMSNorm then NeoX RoPE of one head vector at `base`; returns fp32 values rounded like ops."""
    x = tl.load(base + d).to(tl.float32)
    xp = tl.load(base + partner).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 0) / HEAD_DIM + eps)
    w = tl.load(W + d).to(tl.float32)
    wp = tl.load(W + partner).to(tl.float32)
    if ZERO_CENTERED:
        y = (x * rstd * (1.0 + w)).to(OUT_DTYPE).to(tl.float32)
        yp = (xp * rstd * (1.0 + wp)).to(OUT_DTYPE).to(tl.float32)
    else:
        y = ((x * rstd).to(OUT_DTYPE).to(tl.float32) * w).to(OUT_DTYPE).to(tl.float32)
        yp = ((xp * rstd).to(OUT_DTYPE).to(tl.float32) * wp).to(OUT_DTYPE).to(tl.float32)
    c = tl.load(cos_row + d, mask=rot_ok, other=1.0).to(tl.float32)
    s = tl.load(sin_row + d, mask=rot_ok, other=0.0).to(tl.float32)
    return tl.where(rot_ok, y * c + sign * yp * s, y)


@triton.jit
def _cache_rows(seq, pos, BT, stride_btn, stride_p, stride_s, PAGED: tl.constexpr, PAGE: tl.constexpr):
    """Element offset of (request seq, slot pos) in a contiguous or paged cache, head and dim terms excluded."""
    if PAGED:
        page = tl.load(BT + seq.to(tl.int64) * stride_btn + pos // PAGE).to(tl.int64)
        return page * stride_p + (pos % PAGE).to(tl.int64) * stride_s
    else:
        return seq.to(tl.int64) * stride_p + pos.to(tl.int64) * stride_s


@triton.jit
def _qk_norm_rope_kernel(
    QP,
    KP,
    VP,
    QW,
    KW,
    COS,
    SIN,
    QO,
    KO,
    GO,
    KC,
    VC,
    SEQ,
    POS,
    BT,
    stride_qp,
    stride_kp,
    stride_vp,
    stride_cos,
    stride_sin,
    stride_qo,
    stride_ko,
    stride_go,
    stride_kcp,
    stride_kch,
    stride_kcs,
    stride_vcp,
    stride_vch,
    stride_vcs,
    stride_btn,
    eps,
    HQ: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROT: tl.constexpr,
    GATED: tl.constexpr,
    ZERO_CENTERED: tl.constexpr,
    WRITE_CACHE: tl.constexpr,
    PAGED: tl.constexpr,
    PAGE: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)  # token
    j = tl.program_id(1)  # head: query heads first, then KV heads
    d = tl.arange(0, HEAD_DIM)
    half: tl.constexpr = ROT // 2
    rot_ok = d < ROT
    partner = tl.where(rot_ok, tl.where(d < half, d + half, d - half), d)
    sign = tl.where(d < half, -1.0, 1.0)
    cos_row = COS + i * stride_cos
    sin_row = SIN + i * stride_sin
    if j < HQ:
        if GATED:
            base = QP + i * stride_qp + j * (2 * HEAD_DIM)
            g = tl.load(base + HEAD_DIM + d)
            tl.store(GO + i * stride_go + j * HEAD_DIM + d, g)
        else:
            base = QP + i * stride_qp + j * HEAD_DIM
        y = _norm_rope(
            base, QW, cos_row, sin_row, eps, d, partner, rot_ok, sign, HEAD_DIM, ZERO_CENTERED, QO.dtype.element_ty
        )
        tl.store(QO + i * stride_qo + j * HEAD_DIM + d, y.to(QO.dtype.element_ty))
    else:
        h = j - HQ
        y = _norm_rope(
            KP + i * stride_kp + h * HEAD_DIM,
            KW,
            cos_row,
            sin_row,
            eps,
            d,
            partner,
            rot_ok,
            sign,
            HEAD_DIM,
            ZERO_CENTERED,
            KO.dtype.element_ty,
        )
        tl.store(KO + i * stride_ko + h * HEAD_DIM + d, y.to(KO.dtype.element_ty))
        if WRITE_CACHE:
            seq = tl.load(SEQ + i)
            pos = tl.load(POS + i)
            krow = _cache_rows(seq, pos, BT, stride_btn, stride_kcp, stride_kcs, PAGED, PAGE)
            vrow = _cache_rows(seq, pos, BT, stride_btn, stride_vcp, stride_vcs, PAGED, PAGE)
            tl.store(KC + krow + h * stride_kch + d, y.to(KC.dtype.element_ty))
            v = tl.load(VP + i * stride_vp + h * HEAD_DIM + d)
            tl.store(VC + vrow + h * stride_vch + d, v.to(VC.dtype.element_ty))


def _check_rows(name: str, x: torch.Tensor, rows: int, width: int) -> None:
    if x.dim() != 2 or x.shape != (rows, width) or x.stride(1) != 1:
        raise ValueError(f"{name}: expected [{rows}, {width}] with a contiguous last dim, got {tuple(x.shape)}")


def _check_slots(seq_idx, positions, tokens, block_table, device):
    for name, x in (("seq_idx", seq_idx), ("positions", positions)):
        if x is None or x.shape != (tokens,) or x.dtype not in (torch.int32, torch.int64) or x.device != device:
            raise ValueError(f"{name}: expected an int32/int64 [{tokens}] tensor on {device}")
    if block_table is not None and (
        block_table.dim() != 2 or block_table.dtype != torch.int32 or block_table.stride(1) != 1
    ):
        raise ValueError("block_table: expected int32 [N, max_pages] with a contiguous last dim")


def qk_norm_rope(
    q_proj: torch.Tensor,
    k_proj: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    num_q_heads: int,
    num_kv_heads: int,
    eps: float,
    gated: bool,
    zero_centered: bool,
    q_out: torch.Tensor | None = None,
    k_out: torch.Tensor | None = None,
    gate_out: torch.Tensor | None = None,
    v_proj: torch.Tensor | None = None,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-head q/k RMSNorm, then RoPE on the first cos.shape[-1] dims, for T tokens.

    q_proj [T, Hq*2*D] laid out per head [q(D) | gate(D)] when gated (Qwen3.5), else [T, Hq*D]; k_proj [T, Hkv*D];
    cos/sin [T, rot]. Returns q [T, Hq, D], k [T, Hkv, D] and the gate [T, Hq*D] (None when not gated).
    With k_cache/v_cache, the roped k and v_proj [T, Hkv*D] are also written at (seq_idx[i], positions[i]).
    """
    tokens = q_proj.shape[0]
    d = q_norm_weight.shape[0]
    if d & (d - 1):
        raise ValueError(f"q_norm_weight: head_dim {d} must be a power of two")
    if q_proj.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q_proj: unsupported dtype {q_proj.dtype}")
    _check_rows("q_proj", q_proj, tokens, num_q_heads * d * (2 if gated else 1))
    _check_rows("k_proj", k_proj, tokens, num_kv_heads * d)
    if k_proj.dtype != q_proj.dtype:
        raise ValueError(f"k_proj: dtype {k_proj.dtype} differs from q_proj's {q_proj.dtype}")
    if k_norm_weight.shape != (d,):
        raise ValueError(f"k_norm_weight: expected [{d}], got {tuple(k_norm_weight.shape)}")
    rot = cos.shape[-1]
    if cos.dim() != 2 or cos.shape[0] != tokens or rot > d or rot % 2 or cos.stride(1) != 1:
        raise ValueError(f"cos: expected [{tokens}, rot <= {d}, even] with a contiguous last dim")
    if sin.shape != cos.shape or sin.stride(1) != 1:
        raise ValueError(f"sin: expected {tuple(cos.shape)} with a contiguous last dim")
    dt = q_proj.dtype
    q_out = torch.empty((tokens, num_q_heads, d), device=q_proj.device, dtype=dt) if q_out is None else q_out
    k_out = torch.empty((tokens, num_kv_heads, d), device=q_proj.device, dtype=dt) if k_out is None else k_out
    if q_out.shape != (tokens, num_q_heads, d) or q_out.dtype != dt or not q_out.is_contiguous():
        raise ValueError(f"q_out: expected contiguous {dt} [{tokens}, {num_q_heads}, {d}]")
    if k_out.shape != (tokens, num_kv_heads, d) or k_out.dtype != dt or not k_out.is_contiguous():
        raise ValueError(f"k_out: expected contiguous {dt} [{tokens}, {num_kv_heads}, {d}]")
    if gated:
        if gate_out is None:
            gate_out = torch.empty((tokens, num_q_heads * d), device=q_proj.device, dtype=dt)
        _check_rows("gate_out", gate_out, tokens, num_q_heads * d)
    write = k_cache is not None
    paged = write and block_table is not None
    if write:
        _check_slots(seq_idx, positions, tokens, block_table, q_proj.device)
        if v_proj is None or v_cache is None:
            raise ValueError("v_proj: v_proj and v_cache are needed with k_cache")
        _check_rows("v_proj", v_proj, tokens, num_kv_heads * d)
        for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
            if c.dim() != 4 or c.shape[1] != num_kv_heads or c.shape[3] != d or c.stride(3) != 1:
                raise ValueError(f"{name}: expected [N or pages, {num_kv_heads}, S, {d}], got {tuple(c.shape)}")
    kc = k_cache if write else k_out.view(tokens, num_kv_heads, 1, d)
    vc = v_cache if write else kc
    vp = v_proj if write else k_proj
    seq = seq_idx if write else k_proj
    pos = positions if write else k_proj
    bt = block_table if paged else k_proj
    go = gate_out if gated else q_out
    _qk_norm_rope_kernel[(tokens, num_q_heads + num_kv_heads)](
        q_proj,
        k_proj,
        vp,
        q_norm_weight,
        k_norm_weight,
        cos,
        sin,
        q_out,
        k_out,
        go,
        kc,
        vc,
        seq,
        pos,
        bt,
        q_proj.stride(0),
        k_proj.stride(0),
        vp.stride(0),
        cos.stride(0),
        sin.stride(0),
        q_out.stride(0),
        k_out.stride(0),
        go.stride(0),
        kc.stride(0),
        kc.stride(1),
        kc.stride(2),
        vc.stride(0),
        vc.stride(1),
        vc.stride(2),
        bt.stride(0),
        eps,
        HQ=num_q_heads,
        HEAD_DIM=d,
        ROT=rot,
        GATED=gated,
        ZERO_CENTERED=zero_centered,
        WRITE_CACHE=write,
        PAGED=paged,
        PAGE=kc.shape[2] if paged else 1,
        num_warps=1 if d <= 128 else 2,
    )
    return q_out, k_out, (gate_out if gated else None)


@triton.jit
def _context_kv_kernel(
    KV,
    KW,
    COS,
    SIN,
    KC,
    VC,
    SEQ,
    POS,
    BT,
    stride_kv,
    stride_kw,
    stride_cos,
    stride_sin,
    stride_kcl,
    stride_kcp,
    stride_kch,
    stride_kcs,
    stride_vcl,
    stride_vcp,
    stride_vch,
    stride_vcs,
    stride_btn,
    eps,
    HKV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROT: tl.constexpr,
    PAGED: tl.constexpr,
    PAGE: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)  # context token
    lh = tl.program_id(1)  # layer * HKV + head
    layer = lh // HKV
    h = lh % HKV
    d = tl.arange(0, HEAD_DIM)
    half: tl.constexpr = ROT // 2
    rot_ok = d < ROT
    partner = tl.where(rot_ok, tl.where(d < half, d + half, d - half), d)
    sign = tl.where(d < half, -1.0, 1.0)
    # the projection's columns are [layer][k | v][head][D]
    k_base = KV + i * stride_kv + (layer * 2 * HKV + h) * HEAD_DIM
    y = _norm_rope(
        k_base,
        KW + layer * stride_kw,
        COS + i * stride_cos,
        SIN + i * stride_sin,
        eps,
        d,
        partner,
        rot_ok,
        sign,
        HEAD_DIM,
        False,
        KC.dtype.element_ty,
    )
    v = tl.load(k_base + HKV * HEAD_DIM + d)
    seq = tl.load(SEQ + i)
    pos = tl.load(POS + i)
    krow = _cache_rows(seq, pos, BT, stride_btn, stride_kcp, stride_kcs, PAGED, PAGE)
    vrow = _cache_rows(seq, pos, BT, stride_btn, stride_vcp, stride_vcs, PAGED, PAGE)
    tl.store(KC + layer.to(tl.int64) * stride_kcl + krow + h * stride_kch + d, y.to(KC.dtype.element_ty))
    tl.store(VC + layer.to(tl.int64) * stride_vcl + vrow + h * stride_vch + d, v.to(VC.dtype.element_ty))


def context_kv_write(
    kv: torch.Tensor,
    k_norm_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_idx: torch.Tensor,
    positions: torch.Tensor,
    *,
    eps: float,
    block_table: torch.Tensor | None = None,
) -> None:
    """From the projected context features kv [T, layers*2*Hkv*D] (columns [layer][k|v][head][D]): apply each
    layer's plain k_norm (k_norm_weight [layers, D]) and RoPE (cos/sin [T, rot]) to k, and write k and v into
    k_cache/v_cache [layers, N or pages, Hkv, S or PAGE, D] at (seq_idx[i], positions[i])."""
    tokens = kv.shape[0]
    if k_cache.dim() != 5 or v_cache.shape != k_cache.shape or k_cache.stride(4) != 1 or v_cache.stride(4) != 1:
        raise ValueError(f"k_cache: expected [layers, N or pages, Hkv, S, D] pairs, got {tuple(k_cache.shape)}")
    layers, _, hkv, _, d = k_cache.shape
    if k_norm_weight.shape != (layers, d) or k_norm_weight.stride(1) != 1:
        raise ValueError(f"k_norm_weight: expected [{layers}, {d}], got {tuple(k_norm_weight.shape)}")
    _check_rows("kv", kv, tokens, layers * 2 * hkv * d)
    rot = cos.shape[-1]
    if cos.dim() != 2 or cos.shape[0] != tokens or rot > d or rot % 2 or cos.stride(1) != 1:
        raise ValueError(f"cos: expected [{tokens}, rot <= {d}, even] with a contiguous last dim")
    if sin.shape != cos.shape or sin.stride(1) != 1:
        raise ValueError(f"sin: expected {tuple(cos.shape)} with a contiguous last dim")
    _check_slots(seq_idx, positions, tokens, block_table, kv.device)
    paged = block_table is not None
    bt = block_table if paged else seq_idx.view(-1, 1)
    if tokens == 0:
        return
    _context_kv_kernel[(tokens, layers * hkv)](
        kv,
        k_norm_weight,
        cos,
        sin,
        k_cache,
        v_cache,
        seq_idx,
        positions,
        bt,
        kv.stride(0),
        k_norm_weight.stride(0),
        cos.stride(0),
        sin.stride(0),
        *k_cache.stride()[:4],
        *v_cache.stride()[:4],
        bt.stride(0),
        eps,
        HKV=hkv,
        HEAD_DIM=d,
        ROT=rot,
        PAGED=paged,
        PAGE=k_cache.shape[3] if paged else 1,
        num_warps=1 if d <= 128 else 2,
    )


def context_kv_project(
    c: torch.Tensor,
    w_kv: torch.Tensor,
    k_norm_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_idx: torch.Tensor,
    positions: torch.Tensor,
    *,
    eps: float,
    block_table: torch.Tensor | None = None,
) -> None:
    """The drafter's context K/V for every layer: kv = c @ w_kv.T with w_kv the k/v projections of all layers
    stacked [layers*2*Hkv*D, H] (per layer: k rows, then v rows), then context_kv_write."""
    if c.dim() != 2 or w_kv.dim() != 2 or w_kv.shape[1] != c.shape[1] or w_kv.dtype != c.dtype:
        raise ValueError(f"w_kv: expected {c.dtype} [rows, {c.shape[-1]}], got {w_kv.dtype} {tuple(w_kv.shape)}")
    kv = torch.matmul(c, w_kv.t())
    context_kv_write(
        kv, k_norm_weight, cos, sin, k_cache, v_cache, seq_idx, positions, eps=eps, block_table=block_table
    )
