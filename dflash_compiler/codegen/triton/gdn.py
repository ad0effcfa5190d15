"""Gated DeltaNet kernels: the causal conv1d over a block, the gated delta rule over a verify block (with what a
rollback needs), the commit of an accepted position, and the chunked form for prefill.

References: models/ops.py causal_conv1d, conv_window_after, gdn_gates, gated_delta_rule_recurrent,
gated_delta_commit, gated_delta_rule_chunked.

Rollback. After a verify block of T tokens the engine keeps the state after accepted position idx[b]. The verify
writes each position's update row d_t = beta_t (v_t - (e^g_t S_t-1)^T k_t) ([B, T, HV, V] fp32, 16 x 24 KiB per
request and layer at Qwen3.5-27B), and the state after idx[b] is S e^c_idx + sum over t <= idx of
e^(c_idx - c_t) k_t d_t^T (gdn_commit_deltas): the initial state read once and written once, no step waiting for
the one before. The step does not launch that on its own: the block stays pending (its keys and gate inputs kept
by gdn_commit, its rows where the verify wrote them, idx[b] in the pools), and the next verify's state launch
applies it to each state slice it reads, writes the slice back and goes on with its products. The commit so costs
one write of the state on top of the read every verify does.

The conv commit reads the block's raw input x (kept by the caller until the commit) instead of a copy of it: the
extended input would write (W-1+T)*C values per block and per-position windows (W-1)*T*C, while the window after
any position lies in [window, x] already.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import gpu_facts
from .linear import DOT_DTYPES

# tl.sum's combine function. The kernels call tl.reduce with it rather than tl.sum (and write out sigmoid and
# cumsum): Triton's interpreter re-patches the language on every call of a library @jit function (about 5 ms each),
# which would make the CPU tests of the step-by-step loops below take minutes.
_add = tl.standard._sum_combine


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {msg}")


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@triton.jit
def _head_program(HV: tl.constexpr, G: tl.constexpr):
    """A (request, value head) program's indices from grid axis 0 (requests x heads there: the other axes stop at
    65535): (the program id, the request, its value head, that head's key head, the request as int64)."""
    pid_bh = tl.program_id(0)
    bb = pid_bh // HV
    h = pid_bh % HV
    return pid_bh, bb, h, h // G, bb.to(tl.int64)


@triton.jit
def _conv_kernel(
    x_ptr,
    win_ptr,
    w_ptr,
    y_ptr,
    T,
    C,
    sx_b,
    sx_t,
    sy_b,
    sy_t,
    W: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_c = pid_c * BC + tl.arange(0, BC)
    offs_t = pid_t * BT + tl.arange(0, BT)
    cmask = offs_c < C
    tmask = offs_t < T
    acc = tl.zeros((BT, BC), dtype=tl.float32)
    for j in tl.static_range(W):
        w_j = tl.load(w_ptr + offs_c * W + j, mask=cmask, other=0.0).to(tl.float32)
        # extended position t + j holds x[t + j - (W-1)], or window column t + j for the first W-1 positions
        src = offs_t + j - (W - 1)
        in_x = (src >= 0)[:, None] & tmask[:, None] & cmask[None, :]
        in_w = (src < 0)[:, None] & tmask[:, None] & cmask[None, :]
        xv = tl.load(x_ptr + b * sx_b + src[:, None] * sx_t + offs_c[None, :], mask=in_x, other=0.0)
        wv = tl.load(win_ptr + (b * C + offs_c[None, :]) * (W - 1) + (src[:, None] + W - 1), mask=in_w, other=0.0)
        acc += (xv.to(tl.float32) + wv.to(tl.float32)) * w_j[None, :]
    y = acc * 1.0 / (1.0 + tl.exp(-acc))
    tl.store(
        y_ptr + b * sy_b + offs_t[:, None] * sy_t + offs_c[None, :],
        y.to(y_ptr.dtype.element_ty),
        mask=tmask[:, None] & cmask[None, :],
    )


@triton.jit
def _conv_commit_tile(x_ptr, win_ptr, idx_ptr, pid_c, b, T, C, sx_b, sx_t, W1: tl.constexpr, W1P: tl.constexpr,
                      BC: tl.constexpr):  # fmt: skip
    """Channels [pid_c BC, +BC) of request b's conv window become the window after block position idx[b]."""
    b64 = b.to(tl.int64)
    last = tl.load(idx_ptr + b)
    offs_c = pid_c * BC + tl.arange(0, BC)
    offs_j = tl.arange(0, W1P)
    cmask = (offs_c < C)[:, None] & (offs_j < W1)[None, :] & ((offs_c * 0 + last) >= 0)[:, None]
    # new window column j is extended position last + 1 + j: a window column or an input row
    pos = last + 1 + offs_j
    from_w = (pos < W1)[None, :]
    wv = tl.load(win_ptr + (b64 * C + offs_c[:, None]) * W1 + pos[None, :], mask=cmask & from_w, other=0.0)
    xrow = pos - W1
    xv = tl.load(
        x_ptr + b64 * sx_b + xrow[None, :] * sx_t + offs_c[:, None],
        mask=cmask & (~from_w) & (xrow < T)[None, :],
        other=0.0,
    )
    val = tl.where(from_w, wv, xv.to(win_ptr.dtype.element_ty))
    # the window is updated in place: every thread must have read before any writes
    tl.debug_barrier()
    tl.store(win_ptr + (b64 * C + offs_c[:, None]) * W1 + offs_j[None, :], val, mask=cmask)


@triton.jit
def _conv_commit_kernel(
    x_ptr, win_ptr, idx_ptr, T, C, sx_b, sx_t, W1: tl.constexpr, W1P: tl.constexpr, BC: tl.constexpr
):
    _conv_commit_tile(x_ptr, win_ptr, idx_ptr, tl.program_id(0), tl.program_id(1), T, C, sx_b, sx_t, W1, W1P, BC)


@triton.jit
def _gdn_recurrent_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    a_ptr,
    b_ptr,
    a_log_ptr,
    dt_bias_ptr,
    state_ptr,
    final_ptr,
    o_ptr,
    delta_ptr,
    T,
    scale,
    sq_b,
    sq_t,
    sq_h,
    sk_b,
    sk_t,
    sk_h,
    sv_b,
    sv_t,
    sv_h,
    sa_b,
    sa_t,
    sa_h,
    sb_b,
    sb_t,
    sb_h,
    sd_b,
    HV: tl.constexpr,
    G: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BV: tl.constexpr,
    BT: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    UNROLL: tl.constexpr,
    DELTAS: tl.constexpr,
):
    """One (request, value head, V slice) per program; the [K, BV] state slice stays in registers.

    Runs positions 0..T-1 from state, writes o, the final state (STORE_FINAL) and each position's update row
    delta (DELTAS).
    """
    pid_bh, bb, h, hq, b64 = _head_program(HV, G)
    pid_v = tl.program_id(1)
    offs_k = tl.arange(0, K)
    offs_v = pid_v * BV + tl.arange(0, BV)
    offs_t = tl.arange(0, BT)
    tile = offs_k[:, None] * V + offs_v[None, :]
    head = (b64 * HV + h) * (K * V)
    S = tl.load(state_ptr + head + tile)
    neg_a = -tl.exp(tl.load(a_log_ptr + h).to(tl.float32))
    dtb = tl.load(dt_bias_ptr + h).to(tl.float32)
    k_base = k_ptr + b64 * sk_b + hq * sk_h
    q_base = q_ptr + b64 * sq_b + hq * sq_h
    a_base = a_ptr + b64 * sa_b + h * sa_h
    b_base = b_ptr + b64 * sb_b + h * sb_h
    v_base = v_ptr + b64 * sv_b + h * sv_h + offs_v
    if UNROLL:
        # BT steps unrolled with each step's own loads: none depends on the state, so the compiler can issue them
        # ahead of the sequential chain (the state update, two reductions over K) instead of waiting per step.
        # Steps past T re-read the last live row and leave the state unchanged (alpha 1, beta 0).
        for t0 in range(0, T, BT):
            for i in tl.static_range(BT):
                t = t0 + i
                live = t < T
                tc = tl.minimum(t, T - 1)
                kr = tl.load(k_base + tc * sk_t + offs_k).to(tl.float32)
                kr = kr * tl.rsqrt(tl.reduce(kr * kr, 0, _add) + 1e-6)
                xa = tl.load(a_base + tc * sa_t).to(tl.float32) + dtb
                alpha_i = tl.where(live, tl.exp(neg_a * tl.where(xa > 20.0, xa, tl.log(1.0 + tl.exp(xa)))), 1.0)
                beta_i = tl.where(live, 1.0 / (1.0 + tl.exp(-tl.load(b_base + tc * sb_t).to(tl.float32))), 0.0)
                vr = tl.load(v_base + tc * sv_t).to(tl.float32)
                ks = tl.reduce(S * kr[:, None], 0, _add)
                delta = beta_i * (vr - alpha_i * ks)
                if DELTAS:
                    tl.store(delta_ptr + b64 * sd_b + (t * HV + h) * V + offs_v, delta, mask=(offs_v * 0 + t) < T)
                qr = tl.load(q_base + tc * sq_t + offs_k).to(tl.float32)
                qr = qr * (tl.rsqrt(tl.reduce(qr * qr, 0, _add) + 1e-6) * scale)
                qs = tl.reduce(S * qr[:, None], 0, _add)
                o = alpha_i * qs + tl.reduce(kr * qr, 0, _add) * delta
                tl.store(
                    o_ptr + ((b64 * T + t) * HV + h) * V + offs_v,
                    o.to(o_ptr.dtype.element_ty),
                    mask=(offs_v * 0 + t) < T,
                )
                S = S * alpha_i + kr[:, None] * delta[None, :]
    else:
        for t0 in range(0, T, BT):
            # Everything that does not depend on the state is loaded for BT positions up front, so the sequential loop
            # below waits on no device-memory latency: the norms and gates as vectors, v as a tile, and the k/q rows
            # are re-read per step from L1 (the tile loads brought them in).
            rows = t0 + offs_t
            rmask = rows < T
            kt = tl.load(k_base + rows[:, None] * sk_t + offs_k[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
            rk = tl.rsqrt(tl.reduce(kt * kt, 1, _add) + 1e-6)
            qt = tl.load(q_base + rows[:, None] * sq_t + offs_k[None, :], mask=rmask[:, None], other=0.0)
            qt = qt.to(tl.float32)
            rq = tl.rsqrt(tl.reduce(qt * qt, 1, _add) + 1e-6) * scale
            xa = tl.load(a_base + rows * sa_t, mask=rmask, other=0.0).to(tl.float32) + dtb
            alpha = tl.exp(neg_a * tl.where(xa > 20.0, xa, tl.log(1.0 + tl.exp(xa))))
            beta = 1.0 / (
                1.0
                + tl.exp(-tl.load(b_ptr + b64 * sb_b + rows * sb_t + h * sb_h, mask=rmask, other=0.0).to(tl.float32))
            )
            vt = tl.load(
                v_ptr + b64 * sv_b + rows[:, None] * sv_t + h * sv_h + offs_v[None, :], mask=rmask[:, None], other=0.0
            ).to(tl.float32)
            for i in range(0, tl.minimum(BT, T - t0)):
                t = t0 + i
                sel = offs_t == i
                alpha_i = tl.reduce(tl.where(sel, alpha, 0.0), 0, _add)
                beta_i = tl.reduce(tl.where(sel, beta, 0.0), 0, _add)
                kr = tl.load(k_base + t * sk_t + offs_k).to(tl.float32) * tl.reduce(tl.where(sel, rk, 0.0), 0, _add)
                vr = tl.reduce(tl.where(sel[:, None], vt, 0.0), 0, _add)
                # u and o are read from the previous state: S_t^T k = a S^T k and S_t^T q = a S^T q + (k.q) delta,
                # so both reductions run over the same registers before the update
                ks = tl.reduce(S * kr[:, None], 0, _add)
                delta = beta_i * (vr - alpha_i * ks)
                if DELTAS:
                    tl.store(delta_ptr + b64 * sd_b + (t * HV + h) * V + offs_v, delta)
                qr = tl.load(q_base + t * sq_t + offs_k).to(tl.float32) * tl.reduce(tl.where(sel, rq, 0.0), 0, _add)
                qs = tl.reduce(S * qr[:, None], 0, _add)
                o = alpha_i * qs + tl.reduce(kr * qr, 0, _add) * delta
                tl.store(o_ptr + ((b64 * T + t) * HV + h) * V + offs_v, o.to(o_ptr.dtype.element_ty))
                S = S * alpha_i + kr[:, None] * delta[None, :]
    if STORE_FINAL:
        tl.debug_barrier()
        tl.store(final_ptr + head + tile, S)


_SYSTEM_PREC = tl.constexpr("tf32x3")  # the verify block's UT/WY system products


@triton.jit
def _mm(a, b, OP: tl.constexpr, PREC: tl.constexpr):
    """a @ b accumulated in fp32: on 16-bit operands of dtype OP, or for OP fp32 on fp32 operands at PREC."""
    if OP == tl.float32:  # noqa: SIM300 - a constexpr compares on the left
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)
    else:
        c = tl.dot(a.to(OP), b.to(OP))
    return c


@triton.jit
def _ut_inverse(a_mat, ri, SB: tl.constexpr, LEVELS: tl.constexpr, SYS_PREC: tl.constexpr):
    """(I + A)^-1 for A [BT, BT] strictly lower triangular (the UT/WY system of a chunk), BT = SB << LEVELS.

    The 16 x 16 diagonal blocks D, all at once, as (I + D)^-1 = (I - D)(I + D^2)(I + D^4)(I + D^8) (D^16 = 0): three
    squarings and three products on the tensor cores, where forward substitution takes 15 dependent steps of
    reductions (on the H200 at 27B shapes, the chunked verify block at batch 16 took 69.7 µs this way against 81.3).
    Then blocks are merged pairwise: with D the block diagonal part and E the off-diagonal blocks of the next level,
    (D + E)^-1 = D^-1 - D^-1 E D^-1 exactly, as E D^-1 E = 0. The products run at SYS_PREC: "tf32x3" (about fp32
    accuracy from 3 tf32 passes), "tf32", or "tf32_refined": tf32, then one Newton step X += X (I - (I + A) X) with
    the residual's product at tf32x3, which squares the relative error (two products at 3 passes instead of all
    of them)."""
    tl.static_assert(SB == 16, "the squarings invert 16-row blocks")
    REFINE: tl.constexpr = SYS_PREC == "tf32_refined"
    PASS: tl.constexpr = "tf32" if REFINE else SYS_PREC
    row0 = (ri // SB) * SB
    eye = tl.where(ri[:, None] == ri[None, :], 1.0, 0.0)
    d = tl.where(row0[:, None] == row0[None, :], a_mat, 0.0)
    inv = eye - d
    for _ in tl.static_range(3):
        d = tl.dot(d, d, input_precision=PASS)
        inv = inv + tl.dot(inv, d, input_precision=PASS)
    for lvl in tl.static_range(LEVELS):
        s = SB << lvl
        off = ((ri // (2 * s))[:, None] == (ri // (2 * s))[None, :]) & ((ri // s)[:, None] != (ri // s)[None, :])
        e = tl.where(off, a_mat, 0.0)
        inv = inv - tl.dot(tl.dot(inv, e, input_precision=PASS), inv, input_precision=PASS)
    if REFINE:
        residual = eye - inv - tl.dot(a_mat, inv, input_precision="tf32x3")
        inv = inv + tl.dot(inv, residual, input_precision="tf32")
    return inv


@triton.jit
def _chunk_log_decays(xa, live, a_log_ptr, dt_bias_ptr, h):
    """The log decays g = -e^a_log softplus(a + dt_bias) of a chunk's rows (0 where not `live`)."""
    xa = xa.to(tl.float32) + tl.load(dt_bias_ptr + h).to(tl.float32)
    g = -tl.exp(tl.load(a_log_ptr + h).to(tl.float32)) * tl.where(xa > 20.0, xa, tl.log(1.0 + tl.exp(xa)))
    return tl.where(live, g, 0.0)


@triton.jit
def _chunk_gates(xa, xb, live, a_log_ptr, dt_bias_ptr, h):
    """The log decays g, beta = sigmoid(b) and the running sum of g of a chunk's rows (0 where not `live`)."""
    g = _chunk_log_decays(xa, live, a_log_ptr, dt_bias_ptr, h)
    beta = tl.where(live, 1.0 / (1.0 + tl.exp(-xb.to(tl.float32))), 0.0)
    return g, beta, tl.associative_scan(g, 0, _add)


@triton.jit
def _chunk_wy(kt, xa, xb, live, a_log_ptr, dt_bias_ptr, h, ri, SB: tl.constexpr, LEVELS: tl.constexpr,
              OP: tl.constexpr, PREC: tl.constexpr, SYS_PREC: tl.constexpr):  # fmt: skip
    """One chunk's UT/WY form from its raw keys kt [BT, K] and gate inputs xa, xb [BT] (rows not `live` are no
    step: gate 0, beta 0): (the l2-normed keys, the log decays g, their running sum cum, beta, (I + A)^-1 and
    W = (I + A)^-1 (beta e^cum k)) with A the strictly lower (beta k k^T) * decay; U = (I + A)^-1 (beta v).
    The system's products run on fp32 operands at SYS_PREC, W's on operands of dtype OP (_mm)."""
    kt = kt.to(tl.float32)
    kt = kt * tl.rsqrt(tl.reduce(kt * kt, 1, _add) + 1e-6)[:, None]
    g, beta, cum = _chunk_gates(xa, xb, live, a_log_ptr, dt_bias_ptr, h)
    lower = ri[:, None] > ri[None, :]
    decay = tl.exp(tl.where(lower, cum[:, None] - cum[None, :], float("-inf")))
    # the system is where conditioning matters: its products stay on fp32 operands (a plain fp32 FMA product of
    # this size spills registers) whatever the products' precision elsewhere
    KK_PREC: tl.constexpr = "tf32x3" if SYS_PREC == "tf32_refined" else SYS_PREC
    a_mat = tl.where(lower, tl.dot(kt * beta[:, None], tl.trans(kt), input_precision=KK_PREC) * decay, 0.0)
    inv = _ut_inverse(a_mat, ri, SB, LEVELS, SYS_PREC)
    w = _mm(inv, kt * (beta * tl.exp(cum))[:, None], OP, PREC)
    return kt, g, cum, beta, inv, w


@triton.jit
def _commit_weights(k_rows, xa, live, a_log_ptr, dt_bias_ptr, h, K: tl.constexpr, BK: tl.constexpr,
                    BT: tl.constexpr):  # fmt: skip
    """A committed block's per-position weights and its total log decay c_last: the state after its last `live`
    position is S e^c_last + sum_t weight_t k_raw_t d_t^T, weight_t = e^(c_last - c_t) / |k_t| (0 where not live).
    k_rows [BT, 1]: pointers to each position's raw keys (K contiguous values); xa [BT]: raw gate inputs a."""
    offs_c = tl.arange(0, BK)
    ksq = tl.zeros((BT,), tl.float32)
    for c in range(K // BK):
        kc = tl.load(k_rows + c * BK + offs_c[None, :], mask=live[:, None], other=0.0).to(tl.float32)
        ksq += tl.reduce(kc * kc, 1, _add)
    g = _chunk_log_decays(xa, live, a_log_ptr, dt_bias_ptr, h)
    c_last = tl.reduce(g, 0, _add)
    weight = tl.where(live, tl.rsqrt(ksq + 1e-6) * tl.exp(c_last - tl.associative_scan(g, 0, _add)), 0.0)
    return weight, c_last


@triton.jit
def _pending_positions(pidx_ptr, bb, TP, BTP: tl.constexpr):
    """The pending block's accepted position pidx[b] clamped to its TP positions, the positions rp [BTP], and
    those up to the accepted one (none when pidx[b] = -1)."""
    last = tl.minimum(tl.load(pidx_ptr + bb), TP - 1)
    rp = tl.arange(0, BTP)
    return last, rp, rp <= last


@triton.jit
def _pending_commit(pk_ptr, pa_ptr, pidx_ptr, bb, b64, hq, h, TP, spk_b, spk_t, spk_h, spa_b, spa_t, spa_h,
                    a_log_ptr, dt_bias_ptr, K: tl.constexpr, BK: tl.constexpr, BTP: tl.constexpr):  # fmt: skip
    """_pending_positions, the pointers [BTP, 1] to the pending raw keys of key head hq, and the block's commit
    weights and total log decay for value head h (_commit_weights)."""
    last, rp, plive = _pending_positions(pidx_ptr, bb, TP, BTP)
    p_rows = pk_ptr + b64 * spk_b + rp[:, None] * spk_t + hq * spk_h
    pxa = tl.load(pa_ptr + b64 * spa_b + rp * spa_t + h * spa_h, mask=plive, other=0.0)
    weight, c_last = _commit_weights(p_rows, pxa, plive, a_log_ptr, dt_bias_ptr, h, K, BK, BTP)
    return last, rp, plive, p_rows, weight, c_last


@triton.jit
def _block_products(q_rows, k_rows, live, K: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, RAW_PREC: tl.constexpr):
    """The raw products over K of a block's keys and queries (rows not `live` read as 0): k k^T, q k^T and the
    keys' and queries' inverse l2 norms. RAW_PREC: tf32 is exact for 16-bit inputs."""
    offs_c = tl.arange(0, BK)
    kk = tl.zeros((BT, BT), tl.float32)
    qk = tl.zeros((BT, BT), tl.float32)
    ksq = tl.zeros((BT,), tl.float32)
    qsq = tl.zeros((BT,), tl.float32)
    for c in range(K // BK):
        kc = tl.load(k_rows + c * BK + offs_c[None, :], mask=live[:, None], other=0.0).to(tl.float32)
        kk += tl.dot(kc, tl.trans(kc), input_precision=RAW_PREC)
        ksq += tl.reduce(kc * kc, 1, _add)
        qc = tl.load(q_rows + c * BK + offs_c[None, :], mask=live[:, None], other=0.0).to(tl.float32)
        qk += tl.dot(qc, tl.trans(kc), input_precision=RAW_PREC)
        qsq += tl.reduce(qc * qc, 1, _add)
    return kk, qk, tl.rsqrt(ksq + 1e-6), tl.rsqrt(qsq + 1e-6)


@triton.jit
def _block_system(kk, rk, xa, xb, live, a_log_ptr, dt_bias_ptr, h, ri, SB: tl.constexpr, LEVELS: tl.constexpr,
                  SYS_PREC: tl.constexpr):  # fmt: skip
    """A block's gates (beta, the running sum cum of the log decays) and (I + A)^-1, A the strictly lower
    (beta k_hat k_hat^T) * decay, from the raw k k^T and the keys' inverse norms rk (the inverse's products at
    SYS_PREC)."""
    _, beta, cum = _chunk_gates(xa, xb, live, a_log_ptr, dt_bias_ptr, h)
    lower = ri[:, None] > ri[None, :]
    decay = tl.exp(tl.where(lower, cum[:, None] - cum[None, :], float("-inf")))
    a_mat = tl.where(lower, kk * (beta * rk)[:, None] * rk[None, :] * decay, 0.0)
    return beta, cum, _ut_inverse(a_mat, ri, SB, LEVELS, SYS_PREC)


@triton.jit
def _verify_mixes(qk, rq, rk, beta, cum, inv, ri, scale, PREC: tl.constexpr):
    """The [BT, BT] factors of a verify block, none of which depends on the state or the values:
    U = m_u v, W = w_of_k k_raw, o = attn U + (diag(q_scale) q_raw - k_mix k_raw) S, and the update rows U - W S.
    (o = (q e^cum) S + attn (U - W S) folded into one product with the state.)"""
    w_of_k = inv * (rk * beta * tl.exp(cum))[None, :]
    m_u = inv * beta[None, :]
    rq = rq * scale
    incl = ri[:, None] >= ri[None, :]
    attn = qk * rq[:, None] * rk[None, :] * tl.exp(tl.where(incl, cum[:, None] - cum[None, :], float("-inf")))
    k_mix = tl.dot(attn, w_of_k, input_precision=PREC)
    return w_of_k, m_u, attn, k_mix, rq * tl.exp(cum)


@triton.jit
def _gdn_block_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    a_ptr,
    b_ptr,
    a_log_ptr,
    dt_bias_ptr,
    state_ptr,
    o_ptr,
    delta_ptr,
    T,
    scale,
    sq_b,
    sq_t,
    sq_h,
    sk_b,
    sk_t,
    sk_h,
    sv_b,
    sv_t,
    sv_h,
    sa_b,
    sa_t,
    sa_h,
    sb_b,
    sb_t,
    sb_h,
    sd_b,
    pk_ptr,
    pa_ptr,
    pidx_ptr,
    TP,
    spk_b,
    spk_t,
    spk_h,
    spa_b,
    spa_t,
    spa_h,
    HV: tl.constexpr,
    G: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BV: tl.constexpr,
    BT: tl.constexpr,
    SB: tl.constexpr,
    LEVELS: tl.constexpr,
    BK: tl.constexpr,
    PREC: tl.constexpr,
    RAW_PREC: tl.constexpr,
    DELTAS: tl.constexpr,
    PENDING: tl.constexpr,
    BTP: tl.constexpr,
):
    """A whole verify block as one chunk of the UT/WY form, for one (request, value head, V slice): no step waits
    for the one before, the products run on the tensor cores.

    With A the strictly lower (beta k k^T) * decay, W = (I + A)^-1 (beta e^cum k) and U = (I + A)^-1 (beta v), the
    block's corrected values are v_new = U - W S: o = (q e^cum) S + ((q k^T) * decay) v_new, and with DELTAS the
    rows v_new themselves (each position's update row, from which gdn_commit_deltas builds the state after any
    position).

    K is walked in chunks of BK, so that no [BT, K] operand is held (each warp of a product holds all of its rows
    and their tf32x3 parts: at BK = K = 128 the kernel took 231-255 registers per thread on sm90). The l2 norms
    are applied to the [BT, BT] products of the raw keys and queries, and W and the queries' correction are row
    scalings and [BT, BT] products applied to each chunk.

    PENDING: the state slice is first advanced to the pending block's position pidx[b] (its raw keys pk, gate
    inputs pa and update rows in delta_ptr, which this program then overwrites with the block's own), chunk by
    chunk as it is read, S e^c_last + k_raw^T (diag(w) d), and written back (pidx[b] >= 0): the commit in the
    block's own launch, as the factored form's state launch does it."""
    pid_bh, bb, h, hq, b64 = _head_program(HV, G)
    pid_v = tl.program_id(1)
    offs_c = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    ri = tl.arange(0, BT)
    live = ri < T
    k_rows = k_ptr + b64 * sk_b + ri[:, None] * sk_t + hq * sk_h
    q_rows = q_ptr + b64 * sq_b + ri[:, None] * sq_t + hq * sq_h
    s_tile = state_ptr + (b64 * HV + h) * (K * V) + offs_c[:, None] * V + offs_v[None, :]
    vt = tl.load(v_ptr + b64 * sv_b + ri[:, None] * sv_t + h * sv_h + offs_v[None, :], mask=live[:, None], other=0.0)
    xa = tl.load(a_ptr + b64 * sa_b + ri * sa_t + h * sa_h, mask=live, other=0.0)
    xb = tl.load(b_ptr + b64 * sb_b + ri * sb_t + h * sb_h, mask=live, other=0.0)
    if PENDING:
        last, rp, plive, p_rows, weight, c_last = _pending_commit(
            pk_ptr, pa_ptr, pidx_ptr, bb, b64, hq, h, TP, spk_b, spk_t, spk_h, spa_b, spa_t, spa_h, a_log_ptr,
            dt_bias_ptr, K, BK, BTP,
        )  # fmt: skip
        d_w = tl.load(delta_ptr + b64 * sd_b + (rp[:, None] * HV + h) * V + offs_v[None, :], mask=plive[:, None],
                      other=0.0) * weight[:, None]  # fmt: skip
        decay = tl.exp(c_last)
        keep = (offs_c[:, None] * 0 + offs_v[None, :] * 0 + last) >= 0
    kk, qk, rk, rq = _block_products(q_rows, k_rows, live, K, BK, BT, RAW_PREC)
    beta, cum, inv = _block_system(kk, rk, xa, xb, live, a_log_ptr, dt_bias_ptr, h, ri, SB, LEVELS, _SYSTEM_PREC)
    vt = vt.to(tl.float32)
    w_of_k, m_u, attn, k_mix, q_scale = _verify_mixes(qk, rq, rk, beta, cum, inv, ri, scale, PREC)
    u = tl.dot(m_u, vt, input_precision=PREC)
    o = tl.dot(attn, u, input_precision=PREC)
    ks = tl.zeros((BT, BV), tl.float32)  # k_raw S, for the update rows
    for c in range(K // BK):
        qc = tl.load(q_rows + c * BK + offs_c[None, :], mask=live[:, None], other=0.0).to(tl.float32)
        kc = tl.load(k_rows + c * BK + offs_c[None, :], mask=live[:, None], other=0.0).to(tl.float32)
        q_eff = qc * q_scale[:, None] - tl.dot(k_mix, kc, input_precision=PREC)
        s_c = tl.load(s_tile + c * BK * V)
        if PENDING:
            kp = tl.load(p_rows + c * BK + offs_c[None, :], mask=plive[:, None], other=0.0).to(tl.float32)
            s_c = s_c * decay + tl.dot(tl.trans(kp), d_w, input_precision=PREC)
            tl.store(s_tile + c * BK * V, s_c, mask=keep)
        o += tl.dot(q_eff, s_c, input_precision=PREC)
        if DELTAS:
            ks += tl.dot(kc, s_c, input_precision=PREC)
    rows_out = ((b64 * T + ri[:, None]) * HV + h) * V + offs_v[None, :]
    tl.store(o_ptr + rows_out, o.to(o_ptr.dtype.element_ty), mask=live[:, None])
    if DELTAS:
        rows_d = b64 * sd_b + (ri[:, None] * HV + h) * V + offs_v[None, :]
        if PENDING:
            # the pending rows are overwritten in place: every thread must have read its part first
            tl.debug_barrier()
        tl.store(delta_ptr + rows_d, u - tl.dot(w_of_k, ks, input_precision=PREC), mask=live[:, None])


@triton.jit
def _gdn_factors_kernel(
    q_ptr, k_ptr, a_ptr, b_ptr, a_log_ptr, dt_bias_ptr, fac_ptr, T, scale,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sa_b, sa_t, sa_h, sb_b, sb_t, sb_h,
    pk_ptr, pa_ptr, pidx_ptr, TP, spk_b, spk_t, spk_h, spa_b, spa_t, spa_h,
    HV: tl.constexpr, G: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, SB: tl.constexpr, LEVELS: tl.constexpr,
    BK: tl.constexpr, PREC: tl.constexpr, RAW_PREC: tl.constexpr, FAC: tl.constexpr, PENDING: tl.constexpr,
    BTP: tl.constexpr,
):  # fmt: skip
    """The factored verify's first launch, one program per (request, value head): the block's [BT, BT] factors
    (m_o = attn m_u, m_u, k_mix, w_of_k, then q_scale), which the state launch applies to each V slice. They
    depend on neither the state nor the values, so the chain of small products runs once per head rather than
    once per V slice, and the state launch is left its loads and products.
    PENDING: also the pending block's commit weights (positions <= pidx[b] of TP: the keys' inverse norms times
    e^(c_last - c_t), then e^c_last), with which the state launch first makes that block's position current."""
    pid_bh, bb, h, hq, b64 = _head_program(HV, G)
    ri = tl.arange(0, BT)
    live = ri < T
    k_rows = k_ptr + b64 * sk_b + ri[:, None] * sk_t + hq * sk_h
    q_rows = q_ptr + b64 * sq_b + ri[:, None] * sq_t + hq * sq_h
    xa = tl.load(a_ptr + b64 * sa_b + ri * sa_t + h * sa_h, mask=live, other=0.0)
    xb = tl.load(b_ptr + b64 * sb_b + ri * sb_t + h * sb_h, mask=live, other=0.0)
    kk, qk, rk, rq = _block_products(q_rows, k_rows, live, K, BK, BT, RAW_PREC)
    beta, cum, inv = _block_system(kk, rk, xa, xb, live, a_log_ptr, dt_bias_ptr, h, ri, SB, LEVELS, _SYSTEM_PREC)
    w_of_k, m_u, attn, k_mix, q_scale = _verify_mixes(qk, rq, rk, beta, cum, inv, ri, scale, PREC)
    m_o = tl.dot(attn, m_u, input_precision=PREC)
    base = fac_ptr + pid_bh.to(tl.int64) * FAC
    square = ri[:, None] * BT + ri[None, :]
    tl.store(base + square, m_o)
    tl.store(base + BT * BT + square, m_u)
    tl.store(base + 2 * BT * BT + square, k_mix)
    tl.store(base + 3 * BT * BT + square, w_of_k)
    tl.store(base + 4 * BT * BT + ri, q_scale)
    if PENDING:
        _, rp, _, _, weight, c_last = _pending_commit(
            pk_ptr, pa_ptr, pidx_ptr, bb, b64, hq, h, TP, spk_b, spk_t, spk_h, spa_b, spa_t, spa_h, a_log_ptr,
            dt_bias_ptr, K, BK, BTP,
        )  # fmt: skip
        tl.store(base + 4 * BT * BT + BT + rp, weight)
        tl.store(base + 4 * BT * BT + BT + BTP, tl.exp(c_last))


@triton.jit
def _state_dot(s_t, x_t, PREC: tl.constexpr, SPLIT: tl.constexpr):
    """s_t [BV, BK] fp32 times x_t [BK, N]. SPLIT (x exact in tf32, as 16-bit inputs are): two tf32 passes over
    s = hi + lo, hi its mantissa cut to tf32's 10 bits and lo = s - hi exact, which is as accurate as tf32x3's
    three (its third pass, lo(x) hi(s), is zero)."""
    if SPLIT:
        hi = (s_t.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
        return tl.dot(hi, x_t, input_precision="tf32") + tl.dot(s_t - hi, x_t, input_precision="tf32")
    return tl.dot(s_t, x_t, input_precision=PREC)


@triton.jit
def _gdn_state_products_kernel(
    q_ptr, k_ptr, v_ptr, state_ptr, fac_ptr, o_ptr, delta_ptr, T,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sd_b, pk_ptr, pidx_ptr, TP, spk_b, spk_t, spk_h,
    HV: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr, DELTAS: tl.constexpr, FAC: tl.constexpr,
    PENDING: tl.constexpr, BTP: tl.constexpr,
):  # fmt: skip
    """The factored verify's second launch, one program per (request, value head, V slice): with the factors of
    _gdn_factors_kernel, o = m_o v + diag(q_scale) (q_raw S) - k_mix (k_raw S) and the update rows
    m_u v - w_of_k (k_raw S). Computed transposed, S^T [BV, K] times q_raw^T and k_raw^T: the V slice is the
    products' M (a block has 16 positions, too few rows to fill the tensor cores), and the raw keys and queries
    enter the products unscaled, so that for 16-bit inputs they are exact in tf32 (SPLIT).

    PENDING: the state is first advanced to the pending block's position pidx[b] (its raw keys pk, its update
    rows in delta_ptr, which this program then overwrites with the block's own, and the factors launch's weights):
    S^T e^c_last + (d diag(w))^T k_raw per [BV, BK] chunk, written back (pidx[b] >= 0) and used for the products.
    The commit so costs the state one write on top of the verify's read."""
    pid_bh, bb, h, hq, b64 = _head_program(HV, G)
    pid_v = tl.program_id(1)
    offs_c = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    ri = tl.arange(0, BT)
    live = ri < T
    base = fac_ptr + pid_bh.to(tl.int64) * FAC
    q_cols = q_ptr + b64 * sq_b + ri[None, :] * sq_t + hq * sq_h + offs_c[:, None]
    k_cols = k_ptr + b64 * sk_b + ri[None, :] * sk_t + hq * sk_h + offs_c[:, None]
    s_rows = state_ptr + (b64 * HV + h) * (K * V) + offs_c[None, :] * V + offs_v[:, None]
    if PENDING:
        last, rp, plive = _pending_positions(pidx_ptr, bb, TP, BTP)
        weight = tl.load(base + 4 * BT * BT + BT + rp)
        d_t = tl.load(delta_ptr + b64 * sd_b + (rp[None, :] * HV + h) * V + offs_v[:, None], mask=plive[None, :],
                      other=0.0) * weight[None, :]  # fmt: skip
        decay = tl.load(base + 4 * BT * BT + BT + BTP)
        p_rows = pk_ptr + b64 * spk_b + rp[:, None] * spk_t + hq * spk_h + offs_c[None, :]
        keep = (offs_v[:, None] * 0 + offs_c[None, :] * 0 + last) >= 0
    qs = tl.zeros((BV, BT), tl.float32)  # (q_raw S)^T
    ks = tl.zeros((BV, BT), tl.float32)  # (k_raw S)^T
    for c in range(K // BK):
        qc = tl.load(q_cols + c * BK, mask=live[None, :], other=0.0).to(tl.float32)
        kc = tl.load(k_cols + c * BK, mask=live[None, :], other=0.0).to(tl.float32)
        s_t = tl.load(s_rows + c * BK * V)
        if PENDING:
            kp = tl.load(p_rows + c * BK, mask=plive[:, None], other=0.0).to(tl.float32)
            s_t = s_t * decay + _state_dot(d_t, kp, PREC, SPLIT)
            tl.store(s_rows + c * BK * V, s_t, mask=keep)
        qs += _state_dot(s_t, qc, PREC, SPLIT)
        ks += _state_dot(s_t, kc, PREC, SPLIT)
    square_t = ri[None, :] * BT + ri[:, None]  # a factor's transpose
    vt = tl.load(v_ptr + b64 * sv_b + ri[None, :] * sv_t + h * sv_h + offs_v[:, None], mask=live[None, :], other=0.0)
    vt = vt.to(tl.float32)
    o = tl.dot(vt, tl.load(base + square_t), input_precision=PREC) + qs * tl.load(base + 4 * BT * BT + ri)[None, :]
    o -= tl.dot(ks, tl.load(base + 2 * BT * BT + square_t), input_precision=PREC)
    rows_out = ((b64 * T + ri[None, :]) * HV + h) * V + offs_v[:, None]
    tl.store(o_ptr + rows_out, o.to(o_ptr.dtype.element_ty), mask=live[None, :])
    if DELTAS:
        rows = tl.dot(vt, tl.load(base + BT * BT + square_t), input_precision=PREC)
        rows -= tl.dot(ks, tl.load(base + 3 * BT * BT + square_t), input_precision=PREC)
        if PENDING:
            # the pending rows are overwritten in place: every thread must have read its part first
            tl.debug_barrier()
        tl.store(delta_ptr + b64 * sd_b + (ri[None, :] * HV + h) * V + offs_v[:, None], rows, mask=live[None, :])


@triton.jit
def _delta_commit_tile(
    k_ptr, delta_ptr, a_ptr, a_log_ptr, dt_bias_ptr, state_ptr, idx_ptr, pid_bh, pid_v, pid_k, T,
    sk_b, sk_t, sk_h, sa_b, sa_t, sa_h,
    HV: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    BT: tl.constexpr, PREC: tl.constexpr, V_MAJOR: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """One (request, value head, V slice, K slice): the state after position last = min(idx[b], T-1),
    S e^c_last + (k_hat e^(c_last - c))^T d over positions <= last, from the update rows d a verify wrote (c: the
    running sum of the log decays). One read and one write of the state slice and one [BK, BT] x [BT, BV] product:
    no step waits for the one before. idx[b] = -1 leaves the state as it was.
    V_MAJOR: the slice is computed transposed, S^T e^c_last + (d diag(w))^T k_raw, so that the V slice is the
    product's M and the raw keys enter unscaled (exact in tf32 for 16-bit keys: SPLIT, two passes over the
    weighted rows' hi and lo parts)."""
    bb = pid_bh // HV
    h = pid_bh % HV
    hq = h // G
    b64 = bb.to(tl.int64)
    last = tl.minimum(tl.load(idx_ptr + bb), T - 1)
    ri = tl.arange(0, BT)
    live = ri <= last
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    k_rows = k_ptr + b64 * sk_b + ri[:, None] * sk_t + hq * sk_h
    xa = tl.load(a_ptr + b64 * sa_b + ri * sa_t + h * sa_h, mask=live, other=0.0)
    # the keys' l2 norms over all of K; this program's K slice is read again (from cache) for the product
    weight, c_last = _commit_weights(k_rows, xa, live, a_log_ptr, dt_bias_ptr, h, K, BK, BT)
    kc = tl.load(k_rows + offs_k[None, :], mask=live[:, None], other=0.0).to(tl.float32)
    rows = delta_ptr + ((b64 * T + ri) * HV + h) * V
    state = state_ptr + (b64 * HV + h) * (K * V)
    if V_MAJOR:
        d_t = tl.load(rows[None, :] + offs_v[:, None], mask=live[None, :], other=0.0) * weight[None, :]
        s_tile = state + offs_k[None, :] * V + offs_v[:, None]
        keep = (offs_v[:, None] * 0 + last) >= 0
        s = tl.load(s_tile, mask=keep, other=0.0)
        s = s * tl.exp(c_last) + _state_dot(d_t, kc, PREC, SPLIT)
    else:
        d = tl.load(rows[:, None] + offs_v[None, :], mask=live[:, None], other=0.0)
        s_tile = state + offs_k[:, None] * V + offs_v[None, :]
        keep = (offs_k[:, None] * 0 + last) >= 0
        s = tl.load(s_tile, mask=keep, other=0.0)
        s = s * tl.exp(c_last) + tl.dot(tl.trans(kc * weight[:, None]), d, input_precision=PREC)
    # in place: every thread must have read its part of the old slice before any writes
    tl.debug_barrier()
    tl.store(s_tile, s, mask=keep)


@triton.jit
def _gdn_delta_commit_kernel(
    k_ptr, delta_ptr, a_ptr, a_log_ptr, dt_bias_ptr, state_ptr, idx_ptr, T, sk_b, sk_t, sk_h, sa_b, sa_t, sa_h,
    HV: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    BT: tl.constexpr, PREC: tl.constexpr, V_MAJOR: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    _delta_commit_tile(
        k_ptr, delta_ptr, a_ptr, a_log_ptr, dt_bias_ptr, state_ptr, idx_ptr, tl.program_id(0), tl.program_id(1),
        tl.program_id(2), T, sk_b, sk_t, sk_h, sa_b, sa_t, sa_h, HV, G, K, V, BK, BV, BT, PREC, V_MAJOR, SPLIT,
    )  # fmt: skip


@triton.jit
def _block_rows_copy(src_ptr, dst_ptr, b64, pid_n, T, N, ss_b, ss_t, P, BT: tl.constexpr, BN: tl.constexpr):
    """Columns [pid_n BN, +BN) of request b's T rows of src (each row N contiguous values) into dst [B, P, N]."""
    ri = tl.arange(0, BT)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask = (ri < T)[:, None] & (offs_n < N)[None, :]
    vals = tl.load(src_ptr + b64 * ss_b + ri[:, None] * ss_t + offs_n[None, :], mask=mask)
    tl.store(dst_ptr + (b64 * P + ri[:, None]) * N + offs_n[None, :], vals, mask=mask)


@triton.jit
def _gdn_commit_kernel(
    x_ptr, win_ptr, idx_ptr, k_ptr, a_ptr, keys_ptr, gates_ptr, T, C, KN, HV, P, CONV_TILES, KEY_TILES,
    sx_b, sx_t, sk_b, sk_t, sa_b, sa_t,
    W1: tl.constexpr, W1P: tl.constexpr, BC: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr,
    BHV: tl.constexpr,
):  # fmt: skip
    """One request (axis 1) of a GDN layer's commit: its conv window's channel tiles, then the tiles that keep
    the block's raw keys and gate inputs as the pending block (the next verify makes its accepted position
    current in the state)."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    if pid < CONV_TILES:
        _conv_commit_tile(x_ptr, win_ptr, idx_ptr, pid, b, T, C, sx_b, sx_t, W1, W1P, BC)
    elif pid < CONV_TILES + KEY_TILES:
        _block_rows_copy(k_ptr, keys_ptr, b.to(tl.int64), pid - CONV_TILES, T, KN, sk_b, sk_t, P, BT, BN)
    else:
        _block_rows_copy(a_ptr, gates_ptr, b.to(tl.int64), 0, T, HV, sa_b, sa_t, P, BT, BHV)


@triton.jit
def _chunk_prepare_kernel(
    k_ptr,
    v_ptr,
    a_ptr,
    b_ptr,
    a_log_ptr,
    dt_bias_ptr,
    w_ptr,
    u_ptr,
    ktail_ptr,
    cum_ptr,
    T,
    NC,
    sk_b,
    sk_t,
    sk_h,
    sv_b,
    sv_t,
    sv_h,
    sa_b,
    sa_t,
    sa_h,
    sb_b,
    sb_t,
    sb_h,
    HV: tl.constexpr,
    G: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    SB: tl.constexpr,
    LEVELS: tl.constexpr,
    OP: tl.constexpr,
    PREC: tl.constexpr,
    SYS_PREC: tl.constexpr,
):
    """Everything of one chunk that does not need the state, all chunks at once: with A the strictly lower
    (beta k k^T) * decay of the UT/WY form, W = (I + A)^-1 (beta e^cum k), U = (I + A)^-1 (beta v), the keys decayed
    to the chunk's end (k e^(last - cum)) and the cumulative log decay. W, U and the keys are stored in their
    buffers' dtype (OP's)."""
    pid_bh = tl.program_id(0)
    c = tl.program_id(1)
    bb = pid_bh // HV
    h = pid_bh % HV
    b64 = bb.to(tl.int64)
    offs_k = tl.arange(0, K)
    offs_v = tl.arange(0, V)
    ri = tl.arange(0, BT)
    rows = c * BT + ri
    rmask = rows < T
    kt = tl.load(
        k_ptr + b64 * sk_b + rows[:, None] * sk_t + (h // G) * sk_h + offs_k[None, :], mask=rmask[:, None], other=0.0
    )
    xa = tl.load(a_ptr + b64 * sa_b + rows * sa_t + h * sa_h, mask=rmask, other=0.0)
    xb = tl.load(b_ptr + b64 * sb_b + rows * sb_t + h * sb_h, mask=rmask, other=0.0)
    v_rows = v_ptr + b64 * sv_b + rows[:, None] * sv_t + h * sv_h + offs_v[None, :]
    if OP == tl.float32:  # noqa: SIM300 - a constexpr compares on the left
        kt, g, cum, beta, inv, w = _chunk_wy(kt, xa, xb, rmask, a_log_ptr, dt_bias_ptr, h, ri, SB, LEVELS, OP, PREC,
                                             SYS_PREC)  # fmt: skip
        last = tl.reduce(g, 0, _add)
        # v after the solve: held across it, a 64-token chunk's values spill registers (sm90, cross-compiled)
        vt = tl.load(v_rows, mask=rmask[:, None], other=0.0)
        u = _mm(inv, vt.to(tl.float32) * beta[:, None], OP, PREC)
        k_tail = kt * tl.exp(last - cum)[:, None]
    else:
        # the raw 16-bit keys and values are the products' operands, their norms and gates folded into the
        # [BT, BT] factors: no fp32 copy of a [BT, K] tile is held (k k^T of 16-bit keys is exact in fp32 products)
        kf = kt.to(tl.float32)
        rk = tl.rsqrt(tl.reduce(kf * kf, 1, _add) + 1e-6)
        kk = tl.dot(kt.to(OP), tl.trans(kt.to(OP)))
        beta, cum, inv = _block_system(kk, rk, xa, xb, rmask, a_log_ptr, dt_bias_ptr, h, ri, SB, LEVELS, SYS_PREC)
        last = tl.reduce(tl.where(ri == BT - 1, cum, 0.0), 0, _add)  # padded rows decay by nothing
        w = tl.dot((inv * (rk * beta * tl.exp(cum))[None, :]).to(OP), kt.to(OP))
        vt = tl.load(v_rows, mask=rmask[:, None], other=0.0)
        u = tl.dot((inv * beta[None, :]).to(OP), vt.to(OP))
        k_tail = kf * (rk * tl.exp(last - cum))[:, None]
    chunk = pid_bh.to(tl.int64) * NC + c
    idt = w_ptr.dtype.element_ty
    tl.store(w_ptr + (chunk * BT + ri[:, None]) * K + offs_k[None, :], w.to(idt))
    tl.store(ktail_ptr + (chunk * BT + ri[:, None]) * K + offs_k[None, :], k_tail.to(idt))
    tl.store(u_ptr + (chunk * BT + ri[:, None]) * V + offs_v[None, :], u.to(idt))
    tl.store(cum_ptr + chunk * BT + ri, cum)


@triton.jit
def _quarter_rows(k_ptr, v_ptr, a_ptr, b_ptr, a_log_ptr, dt_bias_ptr, b64, h, hk, r0, T, sk_b, sk_t, sk_h, sv_b,
                  sv_t, sv_h, sa_b, sa_t, sa_h, sb_b, sb_t, sb_h, K: tl.constexpr, V: tl.constexpr):  # fmt: skip
    """16 rows of a chunk from row r0: (raw keys, raw values, the keys' inverse norms, log decays, beta)."""
    rows = r0 + tl.arange(0, 16)
    live = rows < T
    kr = tl.load(k_ptr + b64 * sk_b + rows[:, None] * sk_t + hk * sk_h + tl.arange(0, K)[None, :], mask=live[:, None],
                 other=0.0)  # fmt: skip
    vr = tl.load(v_ptr + b64 * sv_b + rows[:, None] * sv_t + h * sv_h + tl.arange(0, V)[None, :], mask=live[:, None],
                 other=0.0)  # fmt: skip
    xa = tl.load(a_ptr + b64 * sa_b + rows * sa_t + h * sa_h, mask=live, other=0.0)
    xb = tl.load(b_ptr + b64 * sb_b + rows * sb_t + h * sb_h, mask=live, other=0.0)
    g, beta, _ = _chunk_gates(xa, xb, live, a_log_ptr, dt_bias_ptr, h)
    kf = kr.to(tl.float32)
    return kr, vr, tl.rsqrt(tl.reduce(kf * kf, 1, _add) + 1e-6), g, beta


@triton.jit
def _system_block(ki, kj, fi, rkj, cumi, cumj, OP: tl.constexpr, DIAG: tl.constexpr):
    """A's 16 x 16 block of rows i over rows j, (beta k_hat_i k_hat_j^T) * decay, from the raw keys (fi: beta_i
    times k_i's inverse norms); a diagonal block (DIAG) strictly lower, every other one whole (rows i all later)."""
    r16 = tl.arange(0, 16)
    gap = cumi[:, None] - cumj[None, :]
    if DIAG:
        gap = tl.where(r16[:, None] > r16[None, :], gap, float("-inf"))
    return tl.dot(ki.to(OP), tl.trans(kj.to(OP))) * fi[:, None] * rkj[None, :] * tl.exp(gap)


@triton.jit
def _scaled_sum(x0, x1, x2, x3, s0, s1, s2, s3, r0, r1, r2, r3, N: tl.constexpr, OP: tl.constexpr):
    """sum_j (X_j * s_j[None, :]) @ R_j over the blocks j given (an absent block: N = how many are given)."""
    acc = tl.dot((x0 * s0[None, :]).to(OP), r0.to(OP))
    if N > 1:
        acc = tl.dot((x1 * s1[None, :]).to(OP), r1.to(OP), acc)
    if N > 2:
        acc = tl.dot((x2 * s2[None, :]).to(OP), r2.to(OP), acc)
    if N > 3:
        acc = tl.dot((x3 * s3[None, :]).to(OP), r3.to(OP), acc)
    return acc


@triton.jit
def _store_quarter(w_ptr, u_ptr, ktail_ptr, cum_ptr, chunk, q: tl.constexpr, w, u, kr, rk, cum, last,
                   K: tl.constexpr, V: tl.constexpr):  # fmt: skip
    rows = chunk * 64 + q * 16 + tl.arange(0, 16)
    idt = w_ptr.dtype.element_ty
    tl.store(w_ptr + rows[:, None] * K + tl.arange(0, K)[None, :], w.to(idt))
    tl.store(u_ptr + rows[:, None] * V + tl.arange(0, V)[None, :], u.to(idt))
    k_tail = kr.to(tl.float32) * (rk * tl.exp(last - cum))[:, None]
    tl.store(ktail_ptr + rows[:, None] * K + tl.arange(0, K)[None, :], k_tail.to(idt))
    tl.store(cum_ptr + rows, cum)


@triton.jit
def _chunk_prepare_blocked_kernel(
    k_ptr, v_ptr, a_ptr, b_ptr, a_log_ptr, dt_bias_ptr, w_ptr, u_ptr, ktail_ptr, cum_ptr, T, NC,
    sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sa_b, sa_t, sa_h, sb_b, sb_t, sb_h,
    HV: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, OP: tl.constexpr, SYS_PREC: tl.constexpr,
):  # fmt: skip
    """_chunk_prepare_kernel's results for 64-token chunks on 16-bit operands, the system solved in 16-row blocks:
    A's ten 16 x 16 blocks from the raw keys, each diagonal block inverted by squarings (_ut_inverse), the inverse's
    blocks below the diagonal by X_ij = -X_ii sum_m A_im X_mj (three dependent levels, products at SYS_PREC), then W
    and U as sums of block products. Every product has 16 rows: none waits on a 64 x 64 one."""
    pid_bh = tl.program_id(0)
    c = tl.program_id(1)
    h = pid_bh % HV
    b64 = (pid_bh // HV).to(tl.int64)
    chunk = pid_bh.to(tl.int64) * NC + c
    r0 = c * 64
    # the four 16-row quarters of the chunk (a 64-row tile is never held)
    k0, v0, rk0, g0, be0 = _quarter_rows(k_ptr, v_ptr, a_ptr, b_ptr, a_log_ptr, dt_bias_ptr, b64, h, h // G, r0, T,
                                         sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sa_b, sa_t, sa_h, sb_b, sb_t, sb_h, K,
                                         V)  # fmt: skip
    k1, v1, rk1, g1, be1 = _quarter_rows(k_ptr, v_ptr, a_ptr, b_ptr, a_log_ptr, dt_bias_ptr, b64, h, h // G, r0 + 16,
                                         T, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sa_b, sa_t, sa_h, sb_b, sb_t, sb_h, K,
                                         V)  # fmt: skip
    k2, v2, rk2, g2, be2 = _quarter_rows(k_ptr, v_ptr, a_ptr, b_ptr, a_log_ptr, dt_bias_ptr, b64, h, h // G, r0 + 32,
                                         T, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sa_b, sa_t, sa_h, sb_b, sb_t, sb_h, K,
                                         V)  # fmt: skip
    k3, v3, rk3, g3, be3 = _quarter_rows(k_ptr, v_ptr, a_ptr, b_ptr, a_log_ptr, dt_bias_ptr, b64, h, h // G, r0 + 48,
                                         T, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sa_b, sa_t, sa_h, sb_b, sb_t, sb_h, K,
                                         V)  # fmt: skip
    t0, t1, t2 = tl.reduce(g0, 0, _add), tl.reduce(g1, 0, _add), tl.reduce(g2, 0, _add)
    cum0 = tl.associative_scan(g0, 0, _add)
    cum1 = tl.associative_scan(g1, 0, _add) + t0
    cum2 = tl.associative_scan(g2, 0, _add) + (t0 + t1)
    cum3 = tl.associative_scan(g3, 0, _add) + (t0 + t1 + t2)
    last = t0 + t1 + t2 + tl.reduce(g3, 0, _add)  # padded rows decay by nothing
    f0, f1, f2, f3 = be0 * rk0, be1 * rk1, be2 * rk2, be3 * rk3
    r16 = tl.arange(0, 16)
    x00 = _ut_inverse(_system_block(k0, k0, f0, rk0, cum0, cum0, OP, True), r16, 16, 0, SYS_PREC)
    x11 = _ut_inverse(_system_block(k1, k1, f1, rk1, cum1, cum1, OP, True), r16, 16, 0, SYS_PREC)
    x22 = _ut_inverse(_system_block(k2, k2, f2, rk2, cum2, cum2, OP, True), r16, 16, 0, SYS_PREC)
    x33 = _ut_inverse(_system_block(k3, k3, f3, rk3, cum3, cum3, OP, True), r16, 16, 0, SYS_PREC)
    a10 = _system_block(k1, k0, f1, rk0, cum1, cum0, OP, False)
    a20 = _system_block(k2, k0, f2, rk0, cum2, cum0, OP, False)
    a21 = _system_block(k2, k1, f2, rk1, cum2, cum1, OP, False)
    a30 = _system_block(k3, k0, f3, rk0, cum3, cum0, OP, False)
    a31 = _system_block(k3, k1, f3, rk1, cum3, cum1, OP, False)
    a32 = _system_block(k3, k2, f3, rk2, cum3, cum2, OP, False)
    x10 = -tl.dot(x11, tl.dot(a10, x00, input_precision=SYS_PREC), input_precision=SYS_PREC)
    x21 = -tl.dot(x22, tl.dot(a21, x11, input_precision=SYS_PREC), input_precision=SYS_PREC)
    x32 = -tl.dot(x33, tl.dot(a32, x22, input_precision=SYS_PREC), input_precision=SYS_PREC)
    x20 = -tl.dot(x22, tl.dot(a20, x00, input_precision=SYS_PREC) + tl.dot(a21, x10, input_precision=SYS_PREC),
                  input_precision=SYS_PREC)  # fmt: skip
    x31 = -tl.dot(x33, tl.dot(a31, x11, input_precision=SYS_PREC) + tl.dot(a32, x21, input_precision=SYS_PREC),
                  input_precision=SYS_PREC)  # fmt: skip
    x30 = -tl.dot(x33, tl.dot(a30, x00, input_precision=SYS_PREC) + tl.dot(a31, x10, input_precision=SYS_PREC)
                  + tl.dot(a32, x20, input_precision=SYS_PREC), input_precision=SYS_PREC)  # fmt: skip
    # W_i = sum_j X_ij (beta_j e^cum_j k_hat_j), U_i = sum_j X_ij (beta_j v_j): the scalings on X's columns
    s0, s1, s2, s3 = f0 * tl.exp(cum0), f1 * tl.exp(cum1), f2 * tl.exp(cum2), f3 * tl.exp(cum3)
    w0 = _scaled_sum(x00, x00, x00, x00, s0, s0, s0, s0, k0, k0, k0, k0, 1, OP)
    w1 = _scaled_sum(x10, x11, x11, x11, s0, s1, s1, s1, k0, k1, k1, k1, 2, OP)
    w2 = _scaled_sum(x20, x21, x22, x22, s0, s1, s2, s2, k0, k1, k2, k2, 3, OP)
    w3 = _scaled_sum(x30, x31, x32, x33, s0, s1, s2, s3, k0, k1, k2, k3, 4, OP)
    u0 = _scaled_sum(x00, x00, x00, x00, be0, be0, be0, be0, v0, v0, v0, v0, 1, OP)
    u1 = _scaled_sum(x10, x11, x11, x11, be0, be1, be1, be1, v0, v1, v1, v1, 2, OP)
    u2 = _scaled_sum(x20, x21, x22, x22, be0, be1, be2, be2, v0, v1, v2, v2, 3, OP)
    u3 = _scaled_sum(x30, x31, x32, x33, be0, be1, be2, be3, v0, v1, v2, v3, 4, OP)
    _store_quarter(w_ptr, u_ptr, ktail_ptr, cum_ptr, chunk, 0, w0, u0, k0, rk0, cum0, last, K, V)
    _store_quarter(w_ptr, u_ptr, ktail_ptr, cum_ptr, chunk, 1, w1, u1, k1, rk1, cum1, last, K, V)
    _store_quarter(w_ptr, u_ptr, ktail_ptr, cum_ptr, chunk, 2, w2, u2, k2, rk2, cum2, last, K, V)
    _store_quarter(w_ptr, u_ptr, ktail_ptr, cum_ptr, chunk, 3, w3, u3, k3, rk3, cum3, last, K, V)


@triton.jit
def _chunk_qk(q_ptr, k_ptr, cum_ptr, pid_bh, c, T, NC, scale, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, HV: tl.constexpr,
              G: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, OP: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """Chunk c's attention (q_hat k_hat^T) * decay of value head pid_bh % HV, its diagonal included, with what the
    outputs also take: (attn, the raw q in fp32, q's inverse norms times scale, the running log decay)."""
    hq = (pid_bh % HV) // G
    b64 = (pid_bh // HV).to(tl.int64)
    offs_k = tl.arange(0, K)
    ri = tl.arange(0, BT)
    rows = c * BT + ri
    rmask = rows < T
    kr = tl.load(k_ptr + b64 * sk_b + rows[:, None] * sk_t + hq * sk_h + offs_k[None, :], mask=rmask[:, None],
                 other=0.0)  # fmt: skip
    qr = tl.load(q_ptr + b64 * sq_b + rows[:, None] * sq_t + hq * sq_h + offs_k[None, :], mask=rmask[:, None],
                 other=0.0)  # fmt: skip
    kf = kr.to(tl.float32)
    qf = qr.to(tl.float32)
    rk = tl.rsqrt(tl.reduce(kf * kf, 1, _add) + 1e-6)
    rq = tl.rsqrt(tl.reduce(qf * qf, 1, _add) + 1e-6) * scale
    chunk = pid_bh.to(tl.int64) * NC + c
    cum = tl.load(cum_ptr + chunk * BT + ri)
    incl = ri[:, None] >= ri[None, :]
    decay = tl.exp(tl.where(incl, cum[:, None] - cum[None, :], float("-inf")))
    if OP == tl.float32:  # noqa: SIM300 - a constexpr compares on the left
        attn = _mm(qf * rq[:, None], tl.trans(kf * rk[:, None]), OP, PREC) * decay
    else:  # the raw 16-bit q and k as the operands, their norms applied to the product
        attn = tl.dot(qr.to(OP), tl.trans(kr.to(OP))) * (rq[:, None] * rk[None, :]) * decay
    return attn, qf, rq, cum


@triton.jit
def _chunk_attention_kernel(
    q_ptr,
    k_ptr,
    cum_ptr,
    attn_ptr,
    T,
    NC,
    scale,
    sq_b,
    sq_t,
    sq_h,
    sk_b,
    sk_t,
    sk_h,
    HV: tl.constexpr,
    G: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    OP: tl.constexpr,
    PREC: tl.constexpr,
):
    """Each chunk's attention (q_hat k_hat^T) * decay, its diagonal included, all chunks at once, for a scan that
    computes the outputs itself: stored in its buffer's dtype (OP's)."""
    pid_bh = tl.program_id(0)
    c = tl.program_id(1)
    chunk = pid_bh.to(tl.int64) * NC + c
    ri = tl.arange(0, BT)
    attn, _, _, _ = _chunk_qk(q_ptr, k_ptr, cum_ptr, pid_bh, c, T, NC, scale, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h,
                              HV, G, K, BT, OP, PREC)  # fmt: skip
    tl.store(attn_ptr + (chunk * BT + ri[:, None]) * BT + ri[None, :], attn.to(attn_ptr.dtype.element_ty))


@triton.jit
def _chunk_state_kernel(
    w_ptr,
    u_ptr,
    ktail_ptr,
    cum_ptr,
    state_ptr,
    final_ptr,
    h_ptr,
    vnew_ptr,
    q_ptr,
    attn_ptr,
    o_ptr,
    T,
    NC,
    scale,
    sq_b,
    sq_t,
    sq_h,
    HV: tl.constexpr,
    G: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BV: tl.constexpr,
    BT: tl.constexpr,
    OP: tl.constexpr,
    PREC: tl.constexpr,
    FUSED: tl.constexpr,
):
    """The chunks in order for one (request, value head, V slice), carrying the [K, BV] state in registers (fp32):
    the state at each chunk's start and the chunk's corrected values v_new = U - W S are written, in their buffers'
    dtype (OP's), for the output kernel; or with FUSED the chunk's outputs o = (q_hat e^cum) S + attn v_new are
    computed here instead, from _chunk_attention_kernel's attention, and nothing else is written."""
    pid_bh = tl.program_id(0)
    pid_v = tl.program_id(1)
    bb = pid_bh // HV
    h = pid_bh % HV
    b64 = bb.to(tl.int64)
    offs_k = tl.arange(0, K)
    offs_v = pid_v * BV + tl.arange(0, BV)
    ri = tl.arange(0, BT)
    tile = offs_k[:, None] * V + offs_v[None, :]
    head = (b64 * HV + h) * (K * V)
    S = tl.load(state_ptr + head + tile)
    for c in range(0, NC):
        chunk = pid_bh.to(tl.int64) * NC + c
        if not FUSED:
            tl.store(h_ptr + chunk * (K * V) + tile, S.to(h_ptr.dtype.element_ty))
        w = tl.load(w_ptr + (chunk * BT + ri[:, None]) * K + offs_k[None, :])
        u = tl.load(u_ptr + (chunk * BT + ri[:, None]) * V + offs_v[None, :])
        v_new = (u.to(tl.float32) - _mm(w, S, OP, PREC)).to(w_ptr.dtype.element_ty)
        if FUSED:
            rows = c * BT + ri
            live = rows < T
            qr = tl.load(q_ptr + b64 * sq_b + rows[:, None] * sq_t + (h // G) * sq_h + offs_k[None, :],
                         mask=live[:, None], other=0.0).to(tl.float32)  # fmt: skip
            cum = tl.load(cum_ptr + chunk * BT + ri)
            qs = qr * (tl.rsqrt(tl.reduce(qr * qr, 1, _add) + 1e-6) * scale * tl.exp(cum))[:, None]
            attn = tl.load(attn_ptr + (chunk * BT + ri[:, None]) * BT + ri[None, :])
            o = _mm(qs, S, OP, PREC) + _mm(attn, v_new, OP, PREC)
            tl.store(o_ptr + ((b64 * T + rows[:, None]) * HV + h) * V + offs_v[None, :], o.to(o_ptr.dtype.element_ty),
                     mask=live[:, None])  # fmt: skip
        else:
            tl.store(vnew_ptr + (chunk * BT + ri[:, None]) * V + offs_v[None, :], v_new)
        k_tail = tl.load(ktail_ptr + (chunk * BT + ri[:, None]) * K + offs_k[None, :])
        last = tl.load(cum_ptr + chunk * BT + BT - 1)  # padded rows decay by nothing: the last row's is the chunk's
        S = S * tl.exp(last) + _mm(tl.trans(k_tail), v_new, OP, PREC)
    tl.store(final_ptr + head + tile, S)


@triton.jit
def _chunk_output_kernel(
    q_ptr,
    k_ptr,
    cum_ptr,
    h_ptr,
    vnew_ptr,
    o_ptr,
    T,
    NC,
    scale,
    sq_b,
    sq_t,
    sq_h,
    sk_b,
    sk_t,
    sk_h,
    HV: tl.constexpr,
    G: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BV: tl.constexpr,
    BT: tl.constexpr,
    OP: tl.constexpr,
    PREC: tl.constexpr,
):
    """o = (q e^cum) S_start + ((q k^T) * decay) v_new for one chunk and V slice, all chunks at once (products as in
    _mm)."""
    pid_bh = tl.program_id(0)
    c = tl.program_id(1)
    pid_v = tl.program_id(2)
    h = pid_bh % HV
    b64 = (pid_bh // HV).to(tl.int64)
    offs_k = tl.arange(0, K)
    offs_v = pid_v * BV + tl.arange(0, BV)
    ri = tl.arange(0, BT)
    rows = c * BT + ri
    rmask = rows < T
    chunk = pid_bh.to(tl.int64) * NC + c
    S = tl.load(h_ptr + chunk * (K * V) + offs_k[:, None] * V + offs_v[None, :])
    v_new = tl.load(vnew_ptr + (chunk * BT + ri[:, None]) * V + offs_v[None, :])
    attn, qf, rq, cum = _chunk_qk(q_ptr, k_ptr, cum_ptr, pid_bh, c, T, NC, scale, sq_b, sq_t, sq_h, sk_b, sk_t,
                                  sk_h, HV, G, K, BT, OP, PREC)  # fmt: skip
    o = _mm(qf * (rq * tl.exp(cum))[:, None], S, OP, PREC)
    o += _mm(attn, v_new, OP, PREC)
    tl.store(
        o_ptr + ((b64 * T + rows[:, None]) * HV + h) * V + offs_v[None, :],
        o.to(o_ptr.dtype.element_ty),
        mask=rmask[:, None],
    )


CONV_BLOCK_T, CONV_BLOCK_C, CONV_WARPS = 8, 64, 2  # the conv update's tile: positions, channels; its warps


def conv_config(seq: int) -> dict:
    """causal_conv1d_update's launch defaults for a block of seq positions."""
    return dict(block_t=min(CONV_BLOCK_T, triton.next_power_of_2(seq)), block_c=CONV_BLOCK_C, num_warps=CONV_WARPS)


def causal_conv1d_update(
    x: torch.Tensor,
    window: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    block_t: int | None = None,
    block_c: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """silu(depthwise causal conv1d) of x [B, T, C] continuing from window [B, C, W-1]; weight [C, W].

    Returns y [B, T, C] in x's dtype. The window is not modified (see conv_window_commit). block_t x block_c:
    positions x channels per program (powers of two), on num_warps warps.
    """
    _check(x.dim() == 3 and x.stride(2) == 1, "x", f"expected [B, T, C] with contiguous channels, got {tuple(x.shape)}")
    bsz, seq, chans = x.shape
    _check(weight.dim() == 2 and weight.shape[0] == chans and weight.is_contiguous(), "weight", "expected [C, W]")
    width = weight.shape[1]
    _check(width >= 2, "weight", f"conv width {width} < 2")
    _check(
        tuple(window.shape) == (bsz, chans, width - 1) and window.is_contiguous(),
        "window",
        f"expected contiguous {(bsz, chans, width - 1)}, got {tuple(window.shape)}",
    )
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _check(tuple(out.shape) == tuple(x.shape) and out.stride(2) == 1, "out", "expected x's shape")
    if seq == 0:
        return out
    # 8 positions x 64 channels on 2 warps: on the H200 at 27B shapes (16 positions, 10240 channels) 3.8 µs at
    # batch 1 and 10.8 at batch 16 against 4.4 and 15.1 for 16 x 128 on 4 (CUDA-graph replays)
    cfg = conv_config(seq)
    bt, bc = block_t or cfg["block_t"], block_c or cfg["block_c"]
    _check(_pow2(bt) and bt <= 64, "block_t", f"{bt} must be a power of two <= 64")
    _check(_pow2(bc) and bc >= 16, "block_c", f"{bc} must be a power of two >= 16")
    grid = (triton.cdiv(chans, bc), triton.cdiv(seq, bt), bsz)
    _conv_kernel[grid](
        x,
        window,
        weight,
        out,
        seq,
        chans,
        x.stride(0),
        x.stride(1),
        out.stride(0),
        out.stride(1),
        W=width,
        BT=bt,
        BC=bc,
        num_warps=num_warps or cfg["num_warps"],
    )
    return out


CONV_COMMIT_BLOCK = 128  # channels per program of a conv window commit


def _check_window(window: torch.Tensor, x: torch.Tensor, bsz: int) -> None:
    _check(x.dim() == 3 and x.stride(2) == 1, "x", f"expected [B, T, C] with contiguous channels, got {tuple(x.shape)}")
    chans = x.shape[2]
    _check(
        window.dim() == 3 and window.shape[:2] == (bsz, chans) and window.is_contiguous(),
        "window",
        f"expected contiguous [{bsz}, {chans}, W-1], got {tuple(window.shape)}",
    )


def conv_window_commit(window: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """In place: window[b] becomes the conv window after block position idx[b] of x [B, T, C] (-1 keeps it)."""
    bsz, seq, chans = x.shape
    _check_window(window, x, bsz)
    _check(tuple(idx.shape) == (bsz,) and not idx.is_floating_point(), "idx", "expected [B] integer indices")
    w1 = window.shape[2]
    bc = CONV_COMMIT_BLOCK
    _conv_commit_kernel[(triton.cdiv(chans, bc), bsz)](
        x,
        window,
        idx.to(torch.int32),
        seq,
        chans,
        x.stride(0),
        x.stride(1),
        W1=w1,
        W1P=triton.next_power_of_2(w1),
        BC=bc,
    )
    return window


def _check_gdn_inputs(q, k, v, a, b, a_log, dt_bias, state):
    _check(k.dim() == 4 and k.stride(3) == 1, "k", f"expected [B, T, H, K] with contiguous K, got {tuple(k.shape)}")
    bsz, seq, heads, dk = k.shape
    if q is not None:
        _check(tuple(q.shape) == tuple(k.shape) and q.stride(3) == 1, "q", f"expected k's shape {tuple(k.shape)}")
    _check(v.dim() == 4 and v.shape[:2] == (bsz, seq) and v.stride(3) == 1, "v", f"expected [{bsz}, {seq}, HV, V]")
    hv, dv = v.shape[2], v.shape[3]
    _check(hv % heads == 0, "v", f"{hv} value heads are not a multiple of {heads} qk heads")
    _check(_pow2(dk) and _pow2(dv), "k", f"head dims must be powers of two, got K={dk} V={dv}")
    _check_gates_and_state({"a": a, "b": b}, a_log, dt_bias, state, bsz, seq, hv, dk, dv)
    return bsz, seq, heads, hv, dk, dv


def _check_gates_and_state(gates: dict, a_log, dt_bias, state, bsz, seq, hv, dk, dv) -> None:
    """The per-position gate inputs [B, T, HV], the per-head a_log / dt_bias [HV] and the fp32 state rows."""
    for name, t in gates.items():
        _check(tuple(t.shape) == (bsz, seq, hv), name, f"expected {(bsz, seq, hv)}, got {tuple(t.shape)}")
    for name, t in (("a_log", a_log), ("dt_bias", dt_bias)):
        _check(tuple(t.shape) == (hv,) and t.is_contiguous(), name, f"expected contiguous [{hv}]")
    _check(
        tuple(state.shape) == (bsz, hv, dk, dv) and state.dtype == torch.float32 and state.is_contiguous(),
        "state",
        f"expected contiguous fp32 {(bsz, hv, dk, dv)}, got {tuple(state.shape)} {state.dtype}",
    )


def _check_deltas(deltas: torch.Tensor | None, v: torch.Tensor) -> None:
    """deltas [B, T, HV, V] fp32, each request's rows contiguous (the batch stride may be larger: the first T
    positions of a wider buffer)."""
    if deltas is not None:
        _, _, hv, dv = v.shape
        _check(
            tuple(deltas.shape) == tuple(v.shape) and deltas.dtype == torch.float32
            and deltas.stride()[1:] == (hv * dv, dv, 1),
            "deltas",
            f"expected fp32 {tuple(v.shape)} with contiguous rows, got {tuple(deltas.shape)} {deltas.dtype}",
        )  # fmt: skip


def _gdn_out(out: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
    """The output o [B, T, HV, V] in v's dtype: `out` checked, or a new tensor."""
    if out is None:
        return torch.empty(v.shape, dtype=v.dtype, device=v.device)
    _check(tuple(out.shape) == tuple(v.shape) and out.is_contiguous(), "out", f"expected {tuple(v.shape)}")
    return out


def _recurrent_config(seq: int, dv: int, block_v: int | None, num_warps: int | None, unroll: bool | None) -> dict:
    """Launch parameters of the recurrent kernel; what the caller leaves as None comes from the H100 sweep
    (bench/results/kernels-gdn-h100.json, sweep_* rows): the block-prefetch loop beat the unrolled form by 1.3x to
    3x, and one warp on a 16-wide V slice was fastest."""
    bv = block_v or min(dv, 16)
    _check(_pow2(bv) and dv % bv == 0, "block_v", f"{bv} must be a power of two dividing V={dv}")
    bt = min(16, triton.next_power_of_2(max(seq, 1)))
    return dict(BV=bv, BT=bt, UNROLL=bool(unroll), num_warps=num_warps or 1)


def gdn_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    a_log: torch.Tensor,
    dt_bias: torch.Tensor,
    state: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    final_state: torch.Tensor | None = None,
    deltas: torch.Tensor | None = None,
    block_v: int | None = None,
    num_warps: int | None = None,
    unroll: bool | None = None,
) -> torch.Tensor:
    """The gated delta rule over T positions with the gates, q/k l2norm and q scale fused.

    q/k [B, T, H, K] (post-conv, any strides with contiguous K), v [B, T, HV, V], raw a/b [B, T, HV], a_log and
    dt_bias [HV], state [B, HV, K, V] fp32 (read, left unchanged unless final_state is state).
    Returns o [B, T, HV, V] in v's dtype. final_state [B, HV, K, V] fp32 receives the state after position T-1
    (decode passes state itself); deltas [B, T, HV, V] fp32 each position's update row (gdn_commit_deltas).
    Tuning (None: the measured defaults): block_v, the V slice per program; num_warps; unroll, whether the steps
    are unrolled with per-step loads (True) or run as a loop over inputs loaded a block at a time (False).
    """
    bsz, seq, heads, hv, dk, dv = _check_gdn_inputs(q, k, v, a, b, a_log, dt_bias, state)
    out = _gdn_out(out, v)
    if final_state is not None:
        _check(
            final_state.shape == state.shape and final_state.dtype == torch.float32 and final_state.is_contiguous(),
            "final_state",
            f"expected contiguous fp32 {tuple(state.shape)}",
        )
    _check_deltas(deltas, v)
    if seq == 0:
        if final_state is not None and final_state.data_ptr() != state.data_ptr():
            final_state.copy_(state)
        return out
    cfg = _recurrent_config(seq, dv, block_v, num_warps, unroll)
    _gdn_recurrent_kernel[(bsz * hv, dv // cfg["BV"])](
        q,
        k,
        v,
        a,
        b,
        a_log,
        dt_bias,
        state,
        final_state if final_state is not None else state,
        out,
        deltas if deltas is not None else state,
        seq,
        dk**-0.5,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *a.stride(),
        *b.stride(),
        deltas.stride(0) if deltas is not None else 0,
        HV=hv,
        G=hv // heads,
        K=dk,
        V=dv,
        STORE_FINAL=final_state is not None,
        DELTAS=deltas is not None,
        **cfg,
    )
    return out


# recurrent: position by position; chunked: the block as one UT/WY chunk in one launch; factored: the same chunk
# with its state-free [T, T] factors built once per head in a first launch and applied per V slice in a second
ALGORITHMS = ("recurrent", "chunked", "factored")
PRECISIONS = ("tf32x3", "ieee")  # the chunked block's products: about fp32 (3 tf32 passes), or fp32 FMAs


def _raw_precision(k: torch.Tensor, precision: str) -> str:
    """The precision of the raw q/k products: one tf32 pass is exact for 16-bit inputs (10 mantissa bits)."""
    return "tf32" if k.element_size() == 2 else precision


BLOCK_STAGES = 3  # software-pipelining stages of the chunked block's and the state products' K loop (Triton's own)


def _gdn_block(q, k, v, a, b, a_log, dt_bias, state, out, *, block_v, block_k, num_warps, precision, scale,
               deltas=None, factored=False, factor_warps=None, pending=None, num_stages=None):  # fmt: skip
    """The chunked verify block: one launch of _gdn_block_kernel, or, factored, the factors' launch and the state
    products' launch; either applies pending = (keys, gates, idx) first, its rows in deltas. Writes out, and
    deltas if given."""
    bsz, seq, hv, dv = v.shape
    dk = k.shape[-1]
    bt = max(16, triton.next_power_of_2(seq))
    bv = block_v or min(dv, 32)
    _check(seq <= 64, "k", f"the chunked block takes at most 64 positions, got {seq}")
    _check(dk >= 16, "k", f"head dim {dk} < 16 (tl.dot minimum)")
    _check(_pow2(bv) and bv >= 16 and dv % bv == 0, "block_v", f"{bv} must be a power of two >= 16 dividing V={dv}")
    _check(precision in PRECISIONS, "precision", f"{precision!r} not in {'/'.join(PRECISIONS)}")
    bk = block_k or dk
    _check(_pow2(bk) and bk >= 16 and dk % bk == 0, "block_k", f"{bk} must be a power of two >= 16 dividing K={dk}")
    raw_precision = _raw_precision(k, precision)
    levels = (bt // 16).bit_length() - 1
    sd_b = deltas.stride(0) if deltas is not None else 0
    keys, gates, idx = pending if pending is not None else (k, a, state)
    width = keys.shape[1] if pending is not None else 1
    btp = max(16, triton.next_power_of_2(width))
    if factored:
        fac = 4 * bt * bt + bt + (btp + 1 if pending is not None else 0)
        factors = torch.empty(bsz * hv, fac, dtype=torch.float32, device=v.device)
        _gdn_factors_kernel[(bsz * hv,)](
            q, k, a, b, a_log, dt_bias, factors, seq, scale,
            *q.stride()[:3], *k.stride()[:3], *a.stride(), *b.stride(),
            keys, gates, idx, width, *keys.stride()[:3], *gates.stride(),
            HV=hv, G=hv // k.shape[2], K=dk, BT=bt, SB=16, LEVELS=levels, BK=bk, PREC=precision,
            RAW_PREC=raw_precision, FAC=fac, PENDING=pending is not None, BTP=btp, num_warps=factor_warps or 4,
        )  # fmt: skip
        _gdn_state_products_kernel[(bsz * hv, dv // bv)](
            q, k, v, state, factors, out, deltas if deltas is not None else state, seq,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], sd_b, keys, idx, width, *keys.stride()[:3],
            HV=hv, G=hv // k.shape[2], K=dk, V=dv, BV=bv, BT=bt, BK=bk, PREC=precision,
            SPLIT=precision == "tf32x3" and raw_precision == "tf32", DELTAS=deltas is not None, FAC=fac,
            PENDING=pending is not None, BTP=btp, num_warps=num_warps or 4, num_stages=num_stages or BLOCK_STAGES,
        )  # fmt: skip
        return
    _gdn_block_kernel[(bsz * hv, dv // bv)](
        q, k, v, a, b, a_log, dt_bias, state, out, deltas if deltas is not None else state, seq, scale,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *a.stride(), *b.stride(), sd_b,
        keys, gates, idx, width, *keys.stride()[:3], *gates.stride(),
        HV=hv, G=hv // k.shape[2], K=dk, V=dv, BV=bv, BT=bt, SB=16, LEVELS=levels,
        BK=bk, PREC=precision, RAW_PREC=raw_precision, DELTAS=deltas is not None, PENDING=pending is not None,
        BTP=btp, num_warps=num_warps or 4, num_stages=num_stages or BLOCK_STAGES,
    )  # fmt: skip


def _check_pending(keys, gates, rows, idx, k, a, bsz, seq, hv, dv):
    """The pending block's buffers (all or none): raw keys [B, P, H, K] in k's dtype, gate inputs [B, P, HV] in
    a's, update rows [B, P, HV, V] fp32, all contiguous, P >= T, and idx [B] (-1: no pending block)."""
    given = [t is not None for t in (keys, gates, rows, idx)]
    _check(all(given) or not any(given), "pending_keys", "pending_keys, _gates, _rows and _idx go together")
    if keys is None:
        return None
    width = keys.shape[1] if keys.dim() == 4 else -1
    expect = {
        "pending_keys": (keys, (bsz, width, *k.shape[2:]), k.dtype),
        "pending_gates": (gates, (bsz, width, hv), a.dtype),
        "pending_rows": (rows, (bsz, width, hv, dv), torch.float32),
    }
    for name, (t, shape, dtype) in expect.items():
        _check(
            tuple(t.shape) == shape and t.dtype == dtype and t.is_contiguous(),
            name,
            f"expected contiguous {dtype} {shape}, got {tuple(t.shape)} {t.dtype}",
        )
    _check(seq <= width <= 64, "pending_keys", f"the pending block holds {width} positions, the verify {seq} (<= 64)")
    _check(tuple(idx.shape) == (bsz,) and not idx.is_floating_point(), "pending_idx", f"expected [{bsz}] integers")
    return keys, gates, rows, idx.to(torch.int32)


def gdn_verify(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    a_log: torch.Tensor,
    dt_bias: torch.Tensor,
    state: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    deltas: torch.Tensor | None = None,
    pending_keys: torch.Tensor | None = None,
    pending_gates: torch.Tensor | None = None,
    pending_rows: torch.Tensor | None = None,
    pending_idx: torch.Tensor | None = None,
    block_v: int | None = None,
    num_warps: int | None = None,
    unroll: bool | None = None,
    algorithm: str = "recurrent",
    precision: str | None = None,
    block_k: int | None = None,
    factor_warps: int | None = None,
    num_stages: int | None = None,
    fused_commit: bool = False,
) -> torch.Tensor:
    """A verify block: o [B, T, HV, V] in v's dtype. deltas [B, T, HV, V] fp32, if given, receives each position's
    update row, from which gdn_commit_deltas builds the state after the accepted position.

    With a pending block (the last verified block, not yet in the state: its raw keys, gate inputs, update rows and
    accepted position pending_idx[b], -1 for none) state[b] first becomes the state after that position, in place,
    and this block's update rows replace the pending rows' first T positions (deltas must then be None). The
    factored algorithm does it inside its state launch, the chunked one inside its launch with fused_commit; the
    others launch gdn_commit_deltas first.
    Without one, state is left unchanged.

    algorithm: "recurrent" (position by position, the decode step's arithmetic; block_v, num_warps, unroll),
    "chunked" (the block as one UT/WY chunk on the tensor cores, products in `precision`, default tf32x3, K walked
    in chunks of block_k, default all of K) or "factored" (the chunked block in two launches: its state-free [T, T]
    factors once per head with factor_warps warps, then the state products per V slice; both chunked forms
    pipeline their K loop over num_stages stages): the same function, rounded differently.
    """
    _check(algorithm in ALGORITHMS, "algorithm", f"{algorithm!r} not in {'/'.join(ALGORITHMS)}")
    if algorithm != "factored":
        _check(factor_warps is None, "factor_warps", "only the factored algorithm has a factors launch")
    _check(not fused_commit or algorithm == "chunked", "fused_commit", "an option of the chunked algorithm (the "
           "factored one always commits in its state launch)")  # fmt: skip
    if algorithm == "recurrent":
        _check(precision is None, "precision", "only the chunked algorithm takes a dot precision")
        _check(block_k is None, "block_k", "only the chunked algorithm walks K in chunks")
        _check(num_stages is None, "num_stages", "only the chunked algorithms pipeline a K loop")
    else:
        _check(not unroll, "unroll", "unrolling is an option of the recurrent algorithm")
    bsz, seq, heads, hv, dk, dv = _check_gdn_inputs(q, k, v, a, b, a_log, dt_bias, state)
    pending = _check_pending(pending_keys, pending_gates, pending_rows, pending_idx, k, a, bsz, seq, hv, dv)
    if pending is not None:
        _check(deltas is None, "deltas", "with a pending block the update rows go to pending_rows")
        keys, gates, rows, idx = pending
        deltas = rows[:, :seq]
        if not (algorithm == "factored" or fused_commit) or seq == 0:
            gdn_commit_deltas(state, idx, keys, rows, gates, a_log, dt_bias)
            pending = None
    if algorithm == "recurrent":
        return gdn_recurrent(
            q, k, v, a, b, a_log, dt_bias, state, out=out, deltas=deltas, block_v=block_v, num_warps=num_warps,
            unroll=unroll,
        )  # fmt: skip
    out = _gdn_out(out, v)
    _check_deltas(deltas, v)
    if seq > 0:
        _gdn_block(
            q, k, v, a, b, a_log, dt_bias, state, out, block_v=block_v, block_k=block_k, num_warps=num_warps,
            precision=precision or PRECISIONS[0], scale=dk**-0.5, deltas=deltas, factored=algorithm == "factored",
            factor_warps=factor_warps, pending=None if pending is None else (keys, gates, idx), num_stages=num_stages,
        )  # fmt: skip
    return out


def commit_config(dk: int, dv: int) -> dict:
    """gdn_commit_deltas's launch defaults: the whole V row per program and K in slices of 32, 4 warps (every state
    element is read and written once whatever the split; slices keep a program's registers low and give a
    batch-1 commit 48 x 4 programs at Qwen3.5-27B's 48 heads)."""
    return dict(block_k=min(dk, 32), block_v=dv, num_warps=4)


def gdn_commit_deltas(
    state: torch.Tensor,
    idx: torch.Tensor,
    k: torch.Tensor,
    deltas: torch.Tensor,
    a: torch.Tensor,
    a_log: torch.Tensor,
    dt_bias: torch.Tensor,
    *,
    block_k: int | None = None,
    block_v: int | None = None,
    num_warps: int | None = None,
    precision: str | None = None,
    v_major: bool | None = None,
) -> torch.Tensor:
    """In place: state[b] becomes the state after block position min(idx[b], T-1) (-1 keeps it), per request, from
    the block's initial state, its raw keys k [B, T, H, K], the update rows deltas [B, T, HV, V] fp32 its verify
    wrote and raw gate inputs a [B, T, HV]: one launch that reads and writes each state once, replaying nothing.
    block_k / block_v: the state slice per program; precision: the product's (as the chunked block's); v_major:
    the slice computed transposed (the V slice as the product's M)."""
    _check(k.dim() == 4 and k.stride(3) == 1, "k", f"expected [B, T, H, K] with contiguous K, got {tuple(k.shape)}")
    bsz, seq, heads, dk = k.shape
    _check(
        deltas.dim() == 4 and deltas.shape[:2] == (bsz, seq) and deltas.dtype == torch.float32
        and deltas.is_contiguous(),
        "deltas",
        f"expected contiguous fp32 [{bsz}, {seq}, HV, V], got {tuple(deltas.shape)} {deltas.dtype}",
    )  # fmt: skip
    hv, dv = deltas.shape[2], deltas.shape[3]
    _check(hv % heads == 0, "deltas", f"{hv} value heads are not a multiple of {heads} key heads")
    _check(
        _pow2(dk) and _pow2(dv) and dk >= 16 and dv >= 16,
        "k",
        f"head dims must be powers of two >= 16, got K={dk} V={dv}",
    )
    _check_gates_and_state({"a": a}, a_log, dt_bias, state, bsz, seq, hv, dk, dv)
    _check(tuple(idx.shape) == (bsz,) and not idx.is_floating_point(), "idx", f"expected [{bsz}] integer indices")
    _check(seq <= 64, "k", f"a commit takes at most 64 positions, got {seq}")
    cfg = commit_config(dk, dv)
    bk, bv = block_k or cfg["block_k"], block_v or cfg["block_v"]
    _check(_pow2(bk) and bk >= 16 and dk % bk == 0, "block_k", f"{bk} must be a power of two >= 16 dividing K={dk}")
    _check(_pow2(bv) and bv >= 16 and dv % bv == 0, "block_v", f"{bv} must be a power of two >= 16 dividing V={dv}")
    prec = precision or PRECISIONS[0]
    _check(prec in PRECISIONS, "precision", f"{prec!r} not in {'/'.join(PRECISIONS)}")
    if seq == 0:
        return state
    _gdn_delta_commit_kernel[(bsz * hv, dv // bv, dk // bk)](
        k, deltas, a, a_log, dt_bias, state, idx.to(torch.int32), seq, *k.stride()[:3], *a.stride(),
        HV=hv, G=hv // heads, K=dk, V=dv, BK=bk, BV=bv, BT=max(16, triton.next_power_of_2(seq)), PREC=prec,
        V_MAJOR=bool(v_major), SPLIT=prec == "tf32x3" and _raw_precision(k, prec) == "tf32",
        num_warps=num_warps or cfg["num_warps"],
    )  # fmt: skip
    return state


COMMIT_KEY_BLOCK = 256  # key values per position and program of a commit's pending copy


def gdn_commit(
    window: torch.Tensor,
    idx: torch.Tensor,
    x: torch.Tensor,
    k: torch.Tensor,
    a: torch.Tensor,
    keys: torch.Tensor,
    gates: torch.Tensor,
) -> None:
    """A GDN layer's commit after its verify, in one launch: window [B, C, W-1] becomes the conv window after block
    position idx[b] of the raw conv input x [B, T, C] (-1 keeps it), and the block's raw keys k [B, T, H, K] and
    gate inputs a [B, T, HV] go to the pending block's keys [B, P, H, K] and gates [B, P, HV] (P >= T), whose
    update rows the verify wrote: the next verify makes position idx[b] current in the state."""
    bsz, seq, chans = x.shape
    _check_window(window, x, bsz)
    _check(tuple(idx.shape) == (bsz,) and not idx.is_floating_point(), "idx", "expected [B] integer indices")
    _check(k.dim() == 4 and k.shape[:2] == (bsz, seq) and k.stride(3) == 1 and k.stride(2) == k.shape[3], "k",
           f"expected [{bsz}, {seq}, H, K] with contiguous heads, got {tuple(k.shape)}")  # fmt: skip
    _check(a.dim() == 3 and a.shape[:2] == (bsz, seq) and a.stride(2) == 1, "a", f"expected [{bsz}, {seq}, HV]")
    width = keys.shape[1] if keys.dim() == 4 else -1
    _check(
        keys.is_contiguous() and tuple(keys.shape) == (bsz, width, *k.shape[2:]) and keys.dtype == k.dtype
        and width >= seq,
        "keys",
        f"expected contiguous {k.dtype} [{bsz}, P >= {seq}, {k.shape[2]}, {k.shape[3]}], got {tuple(keys.shape)}",
    )  # fmt: skip
    _check(
        gates.is_contiguous() and tuple(gates.shape) == (bsz, width, a.shape[2]) and gates.dtype == a.dtype,
        "gates",
        f"expected contiguous {a.dtype} [{bsz}, {width}, {a.shape[2]}], got {tuple(gates.shape)}",
    )
    if seq == 0:
        return
    key_values = k.shape[2] * k.shape[3]
    conv_tiles, key_tiles = triton.cdiv(chans, CONV_COMMIT_BLOCK), triton.cdiv(key_values, COMMIT_KEY_BLOCK)
    w1 = window.shape[2]
    _gdn_commit_kernel[(conv_tiles + key_tiles + 1, bsz)](
        x, window, idx.to(torch.int32), k, a, keys, gates, seq, chans, key_values, a.shape[2], width, conv_tiles,
        key_tiles, *x.stride()[:2], *k.stride()[:2], *a.stride()[:2],
        W1=w1, W1P=triton.next_power_of_2(w1), BC=CONV_COMMIT_BLOCK, BT=triton.next_power_of_2(seq),
        BN=COMMIT_KEY_BLOCK, BHV=triton.next_power_of_2(a.shape[2]),
    )  # fmt: skip


CHUNKED_PRECISIONS = ("tf32", "tf32x3", "ieee", "half")
SYSTEM_PRECISIONS = ("tf32x3", "tf32", "tf32_refined")
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def default_chunked_precision(dtype: torch.dtype) -> str:
    return "half" if dtype in _HALF_DTYPES else "tf32"


def default_chunked_block_v(precision: str) -> int:
    """64-wide V slices in "half", 32 with fp32 chunks (whose 64-wide scan takes 106 KB of shared memory at 32-token
    chunks, over sm120's 99 KB)."""
    return 64 if precision == "half" else 32


def prepare_shared_bytes(chunk_size: int, dk: int) -> int:
    """Shared memory of the chunked prefill's prepare kernel (its largest), as cross-compiled for sm90 and sm120
    at K = 128: 131072 bytes at 64-token chunks, 65536 at 32."""
    return 16 * chunk_size * dk


def default_chunk_size(device: torch.device, dk: int) -> int:
    """64-token chunks, or 32 where the GPU's shared memory per block does not hold a 64-token prepare (sm120's
    99 KB at K = 128)."""
    facts = gpu_facts(device)
    fits = facts is None or facts.shared_memory is None or prepare_shared_bytes(64, dk) <= facts.shared_memory
    return 64 if fits else 32


def gdn_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    a_log: torch.Tensor,
    dt_bias: torch.Tensor,
    state: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    final_state: torch.Tensor | None = None,
    chunk_size: int | None = None,
    block_v: int | None = None,
    precision: str | None = None,
    system_precision: str = "tf32",
    fused_output: bool = False,
    blocked_system: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked (UT/WY) gated delta rule for prefill: same inputs as gdn_recurrent.

    Returns (o [B, T, HV, V] in v's dtype, the final state). final_state may be state itself (in place); by default
    a new tensor. precision: the products outside each chunk's UT/WY system, with the chunks' W, U, keys, starting
    states and corrected values kept between the kernels in fp32, on fp32 operands at tl.dot's input precision
    "tf32", "tf32x3" (about fp32 accuracy from three tf32 products) or "ieee" (fp32 FMA products: exact, but they
    spill registers at K = 128); or "half": kept in v's 16-bit dtype (bf16 or fp16), the products on 16-bit
    operands, the running state in fp32 (half the bytes between the kernels, the tensor cores at full rate).
    By default "half" for 16-bit v, else "tf32": on the H200 at Qwen3.5-27B's 48 value heads, "half" took 4.8 ms
    for 32768 tokens against 18.2 with "tf32" (and the old tf32x3 system), its errors those of bf16 rounding.
    system_precision: the system's products (its matrix and inverse) on fp32 operands, as in _ut_inverse: "tf32x3",
    "tf32" or "tf32_refined" (at these shapes all three gave the same errors with "half").
    chunk_size: tokens per chunk (default: default_chunk_size for the device). block_v: the scan's V slice (default:
    default_chunked_block_v for the precision). fused_output: the outputs are
    computed in the state scan from each chunk's attention (a chunk-parallel launch writes it), so that neither the
    chunks' starting states nor their corrected values go through memory. blocked_system: with "half" and 64-token
    chunks, the UT/WY system is solved in 16-row blocks (_chunk_prepare_blocked_kernel) instead of by products of
    whole 64 x 64 matrices.
    """
    bsz, seq, heads, hv, dk, dv = _check_gdn_inputs(q, k, v, a, b, a_log, dt_bias, state)
    if chunk_size is None:
        chunk_size = default_chunk_size(q.device, dk)
    _check(dk >= 16, "k", f"head dim {dk} < 16 (tl.dot minimum)")
    _check(chunk_size in (16, 32, 64, 128), "chunk_size", f"{chunk_size} not in 16/32/64/128")
    if precision is None:
        precision = default_chunked_precision(v.dtype)
    if block_v is None:
        block_v = default_chunked_block_v(precision)
    _check(
        not blocked_system or (precision == "half" and chunk_size == 64 and system_precision != "tf32_refined"),
        "blocked_system", f"solves 64-token chunks in 'half' at tf32 or tf32x3; got chunk_size {chunk_size}, "
        f"precision {precision!r}, system_precision {system_precision!r}",
    )  # fmt: skip
    bv = min(block_v, dv)
    _check(_pow2(bv) and bv >= 16, "block_v", f"{bv} must be a power of two >= 16 dividing V={dv}")
    _check(precision in CHUNKED_PRECISIONS, "precision", f"{precision!r} not in {'/'.join(CHUNKED_PRECISIONS)}")
    _check(
        precision != "half" or v.dtype in _HALF_DTYPES,
        "precision", f"'half' keeps the chunks in v's 16-bit dtype; v is {v.dtype}",
    )  # fmt: skip
    _check(
        system_precision in SYSTEM_PRECISIONS, "system_precision",
        f"{system_precision!r} not in {'/'.join(SYSTEM_PRECISIONS)}",
    )  # fmt: skip
    out = _gdn_out(out, v)
    if final_state is None:
        final_state = torch.empty_like(state)
    _check(
        final_state.shape == state.shape and final_state.dtype == torch.float32 and final_state.is_contiguous(),
        "final_state",
        f"expected contiguous fp32 {tuple(state.shape)}",
    )
    if seq == 0:
        if final_state.data_ptr() != state.data_ptr():
            final_state.copy_(state)
        return out, final_state
    nc = triton.cdiv(seq, chunk_size)
    chunks = bsz * hv * nc
    # chunk-parallel prepare, a sequential state scan of two products per chunk, chunk-parallel outputs
    kept = v.dtype if precision == "half" else torch.float32
    op, prec = (DOT_DTYPES[kept], "ieee") if precision == "half" else (tl.float32, precision)
    w = torch.empty(chunks, chunk_size, dk, dtype=kept, device=k.device)
    k_tail = torch.empty_like(w)
    u = torch.empty(chunks, chunk_size, dv, dtype=kept, device=k.device)
    cum = torch.empty(chunks, chunk_size, dtype=torch.float32, device=k.device)
    if fused_output:
        attn = torch.empty(chunks, chunk_size, chunk_size, dtype=kept, device=k.device)
        v_new = starts = u  # not written: the scan computes the outputs itself
    else:
        attn = w  # not written
        v_new = torch.empty_like(u)
        starts = torch.empty(chunks, dk, dv, dtype=kept, device=k.device)
    sb = min(16, chunk_size)
    if blocked_system:
        _chunk_prepare_blocked_kernel[(bsz * hv, nc)](
            k, v, a, b, a_log, dt_bias, w, u, k_tail, cum, seq, nc,
            *k.stride()[:3], *v.stride()[:3], *a.stride(), *b.stride(),
            HV=hv, G=hv // heads, K=dk, V=dv, OP=op, SYS_PREC=system_precision, num_warps=4,
        )  # fmt: skip
    else:
        _chunk_prepare_kernel[(bsz * hv, nc)](
            k, v, a, b, a_log, dt_bias, w, u, k_tail, cum, seq, nc,
            *k.stride()[:3], *v.stride()[:3], *a.stride(), *b.stride(),
            HV=hv, G=hv // heads, K=dk, V=dv, BT=chunk_size, SB=sb, LEVELS=(chunk_size // sb).bit_length() - 1,
            OP=op, PREC=prec, SYS_PREC=system_precision, num_warps=8,
        )  # fmt: skip
    if fused_output:
        _chunk_attention_kernel[(bsz * hv, nc)](
            q, k, cum, attn, seq, nc, dk**-0.5, *q.stride()[:3], *k.stride()[:3],
            HV=hv, G=hv // heads, K=dk, BT=chunk_size, OP=op, PREC=prec, num_warps=4,
        )  # fmt: skip
    # two stages: the third buffer of the prefetched W, U and key tiles takes the scan over sm90's 227 KB of shared
    # memory at K = V = 128 (240 KB, cross-compiled)
    _chunk_state_kernel[(bsz * hv, dv // bv)](
        w, u, k_tail, cum, state, final_state, starts, v_new, q, attn, out, seq, nc, dk**-0.5, *q.stride()[:3],
        HV=hv, G=hv // heads, K=dk, V=dv, BV=bv, BT=chunk_size, OP=op, PREC=prec, FUSED=fused_output, num_warps=8,
        num_stages=2,
    )  # fmt: skip
    if fused_output:
        return out, final_state
    _chunk_output_kernel[(bsz * hv, nc, dv // bv)](
        q, k, cum, starts, v_new, out, seq, nc, dk**-0.5, *q.stride()[:3], *k.stride()[:3],
        HV=hv, G=hv // heads, K=dk, V=dv, BV=bv, BT=chunk_size, OP=op, PREC=prec, num_warps=4,
    )  # fmt: skip
    return out, final_state
