"""Triton GEMM y = x @ W^T for the small-M regime (x [M, K], M = 1..256), over the formats of weight_formats.py.

The product is computed transposed, acc[n, m] = sum_k W[n, k] x[m, k], so the many weight rows fill the tensor
cores' M side and the few tokens their N side (16 and up). Work is cut into tiles of BLOCK_N outputs by BLOCK_M
tokens and each tile's K into chunks of BLOCK_K; `programs` programs share all (tile, chunk) pairs in equal
contiguous ranges (stream-K), so the grid can match the machine and split K where N alone gives too few tiles. A
tile split between programs is finished by whichever of them arrives last: each writes its partial sum to a
workspace and bumps the tile's counter; the last sums the partials in a fixed order (deterministic), applies the
epilogue and resets the counter for the next launch.

Formats: dense (bf16/fp16/fp32), FP8 e4m3 with per-channel or 128x128 block scales, INT4 groups of 128 (packed as
in weight_formats.py). FP8 either quantizes the activations per token and 128-input group in registers and runs an
FP8 dot (sm89+), or decodes the FP8 bits to fp16 with integer ops (sm80, the interpreter) for a weight-only dot.
INT4 unpacks one nibble plane (16 inputs) at a time into exact fp16/bf16 values by the magic-exponent trick.
Epilogues: residual add, and SwiGLU over weight rows [gate; up] (output width N / 2).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dflash_compiler.codegen.weight_formats import DenseWeight, FP8BlockWeight, FP8ChannelWeight, Int4Weight

DENSE, FP8_CHANNEL, FP8_BLOCK, INT4 = 0, 1, 2, 3
EPI_NONE, EPI_RESIDUAL, EPI_SWIGLU = 0, 1, 2


@triton.jit
def _x_tile(x_ptr, stride_xm, stride_xk, offs_m, M, k0, K, BK: tl.constexpr):
    """Activations as x^T [BK, BLOCK_M], zero outside [M, K]."""
    ks = k0 + tl.arange(0, BK)
    mask = (ks[:, None] < K) & (offs_m[None, :] < M)
    return tl.load(x_ptr + ks[:, None] * stride_xk + offs_m[None, :] * stride_xm, mask=mask, other=0.0)


@triton.jit
def _chunk_scale(
    s_ptr, rows, row_ok, k0, stride_sg, FORMAT: tl.constexpr, FP8_DOT: tl.constexpr, GROUP_SIZE: tl.constexpr
):
    """The per-row factor of one chunk: the INT4 group scale, or the FP8 block scale (x256 when decoding to fp16)."""
    if FORMAT == 3:
        sc = tl.load(s_ptr + (k0 // GROUP_SIZE) * stride_sg + rows, mask=row_ok, other=0.0).to(tl.float32)
    elif FORMAT == 2:
        sc = tl.load(s_ptr + (rows // 128) * stride_sg + k0 // 128, mask=row_ok, other=0.0)
        if not FP8_DOT:
            sc = sc * 256.0
    else:
        sc = tl.zeros(rows.shape, tl.float32)
    return sc


@triton.jit
def _accumulate(
    acc,
    rows,
    row_ok,
    k0,
    scale,
    xt,
    xq,
    xs,
    w_ptr,
    z_ptr,
    x_ptr,
    offs_m,
    M,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_zg,
    FORMAT: tl.constexpr,
    FP8_DOT: tl.constexpr,
    ASYM: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """acc[BLOCK_N, BLOCK_M] += W[rows, k0 : k0 + BLOCK_K] @ x^T for one chunk, times `scale` (per row) if chunked."""
    if FORMAT == 0:
        ks = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(
            w_ptr + rows[:, None] * stride_wn + ks[None, :], mask=row_ok[:, None] & (ks[None, :] < K), other=0.0
        )
        acc = tl.dot(w.to(DOT_DTYPE), xt, acc, input_precision=INPUT_PRECISION)
    elif FORMAT == 3:
        g = k0 // GROUP_SIZE
        words = tl.load(w_ptr + rows[:, None] * stride_wn + (k0 // 8 + tl.arange(0, 16))[None, :], mask=row_ok[:, None])
        if ASYM:
            zw = tl.load(z_ptr + g * stride_zg + rows // 8, mask=row_ok, other=0)
            zero = (zw >> ((rows % 8) * 4)) & 0xF
        else:
            zero = tl.full(rows.shape, 8, tl.int32)
        # Nibble q becomes the float MAGIC + q by OR-ing it under the exponent of MAGIC (1024 in fp16, 128 in bf16,
        # 2^23 in fp32, where the last mantissa bit is 1); subtracting MAGIC + zero then gives q - zero exactly.
        if DOT_DTYPE == tl.float16:  # noqa: SIM300 - a constexpr compares on the left
            magic_bits = 0x6400
            magic = 1024.0
        elif DOT_DTYPE == tl.bfloat16:  # noqa: SIM300
            magic_bits = 0x4300
            magic = 128.0
        else:
            magic_bits = 0x4B000000
            magic = 8388608.0
        offset = (zero.to(tl.float32) + magic).to(DOT_DTYPE)
        part = tl.zeros(acc.shape, tl.float32)
        for j in tl.static_range(8):
            bits = ((words >> (4 * j)) & 0xF) | magic_bits
            if DOT_DTYPE == tl.float32:  # noqa: SIM300
                wj = bits.to(tl.float32, bitcast=True)
            else:
                wj = bits.to(tl.uint16).to(DOT_DTYPE, bitcast=True)
            wj = wj - offset[:, None]
            xj = _x_tile(x_ptr, stride_xm, stride_xk, offs_m, M, k0 + 16 * j, K, 16).to(DOT_DTYPE)
            part = tl.dot(wj, xj, part, input_precision=INPUT_PRECISION)
        acc += part * scale[:, None]
    else:
        ks = k0 + tl.arange(0, BLOCK_K)
        wmask = row_ok[:, None] & (ks[None, :] < K)
        wb = tl.load(w_ptr + rows[:, None] * stride_wn + ks[None, :], mask=wmask, other=0.0)
        if FP8_DOT:
            part = tl.dot(wb, xq) * xs[None, :]
        else:
            # e4m3 bits s.eeee.mmm placed as fp16 s.0eeee.mmm0000000 are the value / 256 (normals and subnormals
            # alike), so the decode is two masks and shifts; the 256 goes into the scale.
            b = wb.to(tl.int32)
            half = (((b & 0x80) << 8) | ((b & 0x7F) << 7)).to(tl.uint16).to(tl.float16, bitcast=True)
            part = tl.dot(half.to(DOT_DTYPE), xt, input_precision=INPUT_PRECISION)
        if FORMAT == 2:
            part = part * scale[:, None]
        acc += part
    return acc


@triton.jit
def _store(acc, acc_up, offs_n, n_ok, offs_m, M, r_ptr, y_ptr, stride_rm, stride_ym, EPILOGUE: tl.constexpr):
    out = acc
    if EPILOGUE == 2:
        out = acc * tl.sigmoid(acc) * acc_up
    mask = n_ok[:, None] & (offs_m[None, :] < M)
    if EPILOGUE == 1:
        out += tl.load(r_ptr + offs_m[None, :] * stride_rm + offs_n[:, None], mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], out.to(y_ptr.dtype.element_ty), mask=mask)


# Only K and the weight/activation row strides keep Triton's divisibility specialization (it makes the row loads
# 16-byte vectors); the other integers would otherwise multiply the compiled variants across shapes and grids.
@triton.jit(
    do_not_specialize=[
        "M", "N_OUT", "UP_ROW", "stride_sg", "stride_zg", "stride_rm", "stride_ym",
        "num_m_tiles", "chunks_per_tile", "total_chunks", "slots",
    ]
)  # fmt: skip
def _linear_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    r_ptr,
    y_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    N_OUT,
    K,
    UP_ROW,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_sg,
    stride_zg,
    stride_rm,
    stride_ym,
    num_m_tiles,
    chunks_per_tile,
    total_chunks,
    slots,
    FORMAT: tl.constexpr,
    FP8_DOT: tl.constexpr,
    ASYM: tl.constexpr,
    EPILOGUE: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    programs = tl.num_programs(0).to(tl.int64)
    c = pid * total_chunks // programs
    end = (pid + 1) * total_chunks // programs
    ROWS: tl.constexpr = 2 * BLOCK_N if EPILOGUE == 2 else BLOCK_N
    while c < end:
        tile = c // chunks_per_tile
        tile_start = tile * chunks_per_tile
        seg_end = tl.minimum(end, tile_start + chunks_per_tile)
        pid_n = tile // num_m_tiles
        pid_m = tile % num_m_tiles
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N_OUT
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        acc_up = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        lo = c - tile_start
        hi = seg_end - tile_start
        # Chunk scales are not operands of the dot, so the pipeliner leaves their loads in place: fetch each one
        # a chunk ahead by hand (index clamped to the segment). Two ahead makes the pipeliner give up on the loop.
        sc = _chunk_scale(s_ptr, offs_n, n_ok, lo * BLOCK_K, stride_sg, FORMAT, FP8_DOT, GROUP_SIZE)
        up = sc
        if EPILOGUE == 2:
            up = _chunk_scale(s_ptr, offs_n + UP_ROW, n_ok, lo * BLOCK_K, stride_sg, FORMAT, FP8_DOT, GROUP_SIZE)
        for kc in range(lo, hi):
            k0 = kc * BLOCK_K
            k1 = tl.minimum(kc + 1, hi - 1) * BLOCK_K
            sc_next = _chunk_scale(s_ptr, offs_n, n_ok, k1, stride_sg, FORMAT, FP8_DOT, GROUP_SIZE)
            up_next = up
            if EPILOGUE == 2:
                up_next = _chunk_scale(s_ptr, offs_n + UP_ROW, n_ok, k1, stride_sg, FORMAT, FP8_DOT, GROUP_SIZE)
            xt = tl.zeros((BLOCK_K, BLOCK_M), DOT_DTYPE)
            xq = xt
            xs = tl.zeros((BLOCK_M,), tl.float32)
            if FORMAT != 3:
                xt = _x_tile(x_ptr, stride_xm, stride_xk, offs_m, M, k0, K, BLOCK_K).to(DOT_DTYPE)
                if FP8_DOT:
                    xf = xt.to(tl.float32)
                    amax = tl.max(tl.abs(xf), axis=0)
                    inv = tl.where(amax > 0, tl.math.div_rn(tl.full(amax.shape, 448.0, tl.float32), amax), 0.0)
                    xq = (xf * inv[None, :]).to(tl.float8e4nv)
                    xs = tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))
            acc = _accumulate(
                acc, offs_n, n_ok, k0, sc, xt, xq, xs, w_ptr, z_ptr, x_ptr, offs_m, M, K,
                stride_xm, stride_xk, stride_wn, stride_zg,
                FORMAT, FP8_DOT, ASYM, GROUP_SIZE, BLOCK_K, DOT_DTYPE, INPUT_PRECISION,
            )  # fmt: skip
            if EPILOGUE == 2:
                acc_up = _accumulate(
                    acc_up, offs_n + UP_ROW, n_ok, k0, up, xt, xq, xs, w_ptr, z_ptr, x_ptr, offs_m, M, K,
                    stride_xm, stride_xk, stride_wn, stride_zg,
                    FORMAT, FP8_DOT, ASYM, GROUP_SIZE, BLOCK_K, DOT_DTYPE, INPUT_PRECISION,
                )  # fmt: skip
            sc = sc_next
            up = up_next
        if FORMAT == 1:
            # Per-channel scales are linear in the partial sums, so they apply once per segment.
            factor = 1.0 if FP8_DOT else 256.0
            acc *= tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)[:, None] * factor
            if EPILOGUE == 2:
                acc_up *= tl.load(s_ptr + offs_n + UP_ROW, mask=n_ok, other=0.0)[:, None] * factor
        if (c == tile_start) & (seg_end == tile_start + chunks_per_tile):
            _store(acc, acc_up, offs_n, n_ok, offs_m, M, r_ptr, y_ptr, stride_rm, stride_ym, EPILOGUE)
        else:
            # The programs holding chunks of this tile are those from first to last; prog(c) = ((c+1)P-1) // total.
            first = ((tile_start + 1) * programs - 1) // total_chunks
            last = ((tile_start + chunks_per_tile) * programs - 1) // total_chunks
            r = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
            base = ws_ptr + (tile * slots + (pid - first)) * (ROWS * BLOCK_M)
            tl.store(base + r, acc)
            if EPILOGUE == 2:
                tl.store(base + BLOCK_N * BLOCK_M + r, acc_up)
            # All threads' partial stores precede the release by the one thread that performs the atomic.
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
            if arrived == last - first:
                acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
                acc_up = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
                for s in range(0, last - first + 1):
                    src = ws_ptr + (tile * slots + s) * (ROWS * BLOCK_M)
                    acc += tl.load(src + r, cache_modifier=".cg")
                    if EPILOGUE == 2:
                        acc_up += tl.load(src + BLOCK_N * BLOCK_M + r, cache_modifier=".cg")
                _store(acc, acc_up, offs_n, n_ok, offs_m, M, r_ptr, y_ptr, stride_rm, stride_ym, EPILOGUE)
                tl.atomic_xchg(cnt_ptr + tile, 0)
        c = seg_end


# ---- launcher ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearConfig:
    """One explicit kernel configuration. programs: grid size (stream-K); None means split_k programs per tile."""

    block_n: int = 64
    block_m: int = 16
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 4
    split_k: int = 1
    programs: int | None = None


Weight = DenseWeight | FP8ChannelWeight | FP8BlockWeight | Int4Weight


def _m_bucket(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_config(
    weight: Weight, m: int, n_out: int, k: int, device: torch.device, swiglu: bool = False
) -> LinearConfig:
    """Heuristic table keyed on the format, the M bucket and the tile count (tuning DBs may override it)."""
    bm = _m_bucket(m)
    dense = isinstance(weight, DenseWeight)
    if bm >= 128:
        cfg = LinearConfig(block_n=128, block_m=bm, block_k=64 if dense else 128, num_warps=8, num_stages=3)
    elif isinstance(weight, Int4Weight):
        cfg = LinearConfig(block_n=128, block_m=bm, block_k=128, num_warps=4, num_stages=4)
    elif dense:
        cfg = LinearConfig(block_n=64, block_m=bm, block_k=128, num_warps=4, num_stages=4)
    else:
        cfg = LinearConfig(block_n=128, block_m=bm, block_k=128, num_warps=4, num_stages=5)
    tiles = triton.cdiv(n_out, cfg.block_n) * triton.cdiv(m, bm)
    sms = _sm_count(device)
    if bm < 128 and tiles < 8 * sms:
        # Too few tiles for whole waves: share the chunks among a fixed grid instead (stream-K).
        chunks = tiles * triton.cdiv(k, cfg.block_k)
        cfg = LinearConfig(**{**cfg.__dict__, "programs": min(chunks, 2 * sms)})
    return cfg


_WORKSPACES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, floats: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-device partial-sum buffer and tile counters (zero between launches: the last program resets them).

    Shared by every launch on the device, so launches that split tiles must not run concurrently on two streams.
    """
    ws, cnt = _WORKSPACES.get(device, (None, None))
    if ws is None or ws.numel() < floats:
        ws = torch.empty(max(floats, 1 << 16), dtype=torch.float32, device=device)
    if cnt is None or cnt.numel() < tiles:
        cnt = torch.zeros(max(tiles, 1 << 12), dtype=torch.int32, device=device)
    _WORKSPACES[device] = (ws, cnt)
    return ws, cnt


@functools.cache
def _fp8_dot_default(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


_DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def linear(
    x: torch.Tensor,
    weight: Weight,
    *,
    residual: torch.Tensor | None = None,
    swiglu: bool = False,
    out: torch.Tensor | None = None,
    fp8_dot: bool | None = None,
    config: LinearConfig | None = None,
) -> torch.Tensor:
    """y = x @ W^T (x [M, K] bf16/fp16/fp32), then + residual [M, N] or silu(gate) * up for W = [gate; up].

    fp8_dot: for FP8 weights, quantize x to FP8 per token and 128-input group and use an FP8 dot (default on
    sm89+), else decode the weights to x's dtype. Output dtype is x's; out, if given, must be [M, N_out] of it.
    """
    if x.dim() != 2 or x.dtype not in _DOT_DTYPES:
        raise ValueError(f"x: expected a 2-D bf16/fp16/fp32 tensor, got {x.dtype} {tuple(x.shape)}")
    n, k = weight.shape
    m = x.shape[0]
    if x.shape[1] != k:
        raise ValueError(f"x: expected {k} columns for a weight of shape {[n, k]}, got {x.shape[1]}")
    if swiglu and residual is not None:
        raise ValueError("residual: not supported together with swiglu")
    if swiglu and n % 2:
        raise ValueError(f"weight: swiglu needs an even number of rows [gate; up], got {n}")
    n_out = n // 2 if swiglu else n
    if residual is not None and (residual.shape != (m, n_out) or residual.dtype != x.dtype or residual.stride(1) != 1):
        raise ValueError(
            f"residual: expected {x.dtype} [{m}, {n_out}] with contiguous rows, "
            f"got {residual.dtype} {tuple(residual.shape)}"
        )
    if out is None:
        out = torch.empty(m, n_out, dtype=x.dtype, device=x.device)
    elif out.shape != (m, n_out) or out.dtype != x.dtype or out.stride(1) != 1:
        raise ValueError(
            f"out: expected {x.dtype} [{m}, {n_out}] with contiguous rows, got {out.dtype} {tuple(out.shape)}"
        )
    if m == 0 or n_out == 0:
        return out
    if config is None:
        config = default_config(weight, m, n_out, k, x.device, swiglu)

    s = z = None
    asym = False
    group = 128
    fp8 = False
    if isinstance(weight, DenseWeight):
        fmt, w = DENSE, weight.weight
    elif isinstance(weight, (FP8ChannelWeight, FP8BlockWeight)):
        fp8 = _fp8_dot_default(x.device) if fp8_dot is None else fp8_dot
        w = weight.qweight if fp8 else weight.qweight.view(torch.uint8)
        if isinstance(weight, FP8ChannelWeight):
            fmt, s = FP8_CHANNEL, weight.scale
        else:
            fmt, s = FP8_BLOCK, weight.scale_inv
    elif isinstance(weight, Int4Weight):
        fmt, w, s, z, asym, group = (
            INT4,
            weight.qweight,
            weight.scales,
            weight.qzeros,
            not weight.symmetric,
            weight.group_size,
        )
    else:
        raise ValueError(f"weight: unsupported format {type(weight).__name__}")
    if w.device != x.device or w.stride(1) != 1:
        raise ValueError(f"weight: expected contiguous rows on {x.device}, got {w.device}")
    if fmt != DENSE and config.block_k != 128:
        raise ValueError(f"config: block_k must be 128 for quantized weights, got {config.block_k}")
    if config.block_m < 16 or config.block_n < 16 or config.block_k < 16:
        raise ValueError(f"config: block sizes must be at least 16, got {config}")

    m_tiles = triton.cdiv(m, config.block_m)
    tiles = triton.cdiv(n_out, config.block_n) * m_tiles
    chunks = triton.cdiv(k, config.block_k)
    total = tiles * chunks
    programs = config.programs if config.programs is not None else tiles * config.split_k
    programs = max(1, min(programs, total))
    whole_tiles = total % programs == 0 and (total // programs) % chunks == 0
    rows = 2 * config.block_n if swiglu else config.block_n
    slots = 0 if whole_tiles else triton.cdiv(chunks, total // programs) + 1
    # With no split tile the workspace is never touched; the smallest one stands in.
    ws, cnt = _workspace(
        x.device, 0 if whole_tiles else tiles * slots * rows * config.block_m, 0 if whole_tiles else tiles
    )
    dummy = out
    _linear_kernel[(programs,)](
        x, w, s if s is not None else dummy, z if z is not None else dummy,
        residual if residual is not None else dummy, out, ws, cnt,
        m, n_out, k, n_out if swiglu else 0,
        x.stride(0), x.stride(1), w.stride(0),
        s.stride(0) if s is not None else 0, z.stride(0) if z is not None else 0,
        residual.stride(0) if residual is not None else 0, out.stride(0),
        m_tiles, chunks, total, slots,
        FORMAT=fmt, FP8_DOT=fp8, ASYM=asym,
        EPILOGUE=EPI_SWIGLU if swiglu else EPI_RESIDUAL if residual is not None else EPI_NONE,
        GROUP_SIZE=group, DOT_DTYPE=_DOT_DTYPES[x.dtype],
        INPUT_PRECISION="ieee" if x.dtype == torch.float32 else None,
        BLOCK_N=config.block_n, BLOCK_M=config.block_m, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out
