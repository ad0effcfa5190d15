"""Triton GEMM y = x @ W^T for the small-M regime (x [M, K], M = 1..256), over the formats of weight_formats.py.

The product is computed transposed, acc[n, m] = sum_k W[n, k] x[m, k], so the many weight rows fill the tensor
cores' M side and the few tokens their N side (16 and up). Work is cut into tiles of BLOCK_N outputs by BLOCK_M
tokens and each tile's K into chunks of BLOCK_K. `programs` programs share all (tile, chunk) pairs in equal
contiguous ranges (stream-K) and walk theirs in one flat loop that crosses tile boundaries, so the load pipeline
never drains and the grid can match the machine, splitting K where N alone gives too few tiles. A tile split
between programs is finished by whichever of them arrives last: each parks its partial sum in a workspace and bumps
the tile's counter; the last sums the partials in slot order (deterministic), applies the epilogue and resets the
counter for the next launch. With one program per tile (programs=None, split_k=1) this is a plain tiled GEMM.

Formats: dense (bf16/fp16/fp32), FP8 e4m3 with per-channel or 128x128 block scales, INT4 groups of 128 (packed as
in weight_formats.py). FP8 either quantizes the activations per token and 128-input group in registers and runs an
FP8 dot (sm89+), or decodes the FP8 bits to fp16 with integer ops (sm80, the interpreter) for a weight-only dot.
INT4 turns one plane of a 128-input run (32 inputs, a pair per word) at a time into exact fp16/bf16 values q - 8 by
the magic-exponent trick; asymmetric zeros are added back after the dot as (8 - zero) * sum(x). With prequant_x a
separate launch quantizes x to FP8 first (quantize_x_fp8): FP8 weights then skip the in-loop quantization (and with
x_per_token, one scale per token over all of K, per-channel weights accumulate their dots across chunks and scale
once per tile: W8A8 per token and channel), and INT4 weights (whose q - 8 is exact in e4m3) run their dots on the
FP8 tensor cores (W4A8). int4_chunk_dot puts a chunk's four planes side by side (joins and a permute that stay in
registers, in the dot operand's layout) for one dot per chunk instead of one per plane. mma_sync (Hopper) runs the
dots as warp-level mma.sync instead of warpgroup wgmma, which must finish before a register operand is replaced.
Scales are applied per chunk to the fp32 partial products. Epilogues: residual add, and SwiGLU over weight rows
[gate; up] (output width N / 2).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources
from triton.tools.tensor_descriptor import TensorDescriptor

from dflash_compiler.codegen.triton.device import gpu_facts
from dflash_compiler.codegen.weight_formats import DenseWeight, FP8BlockWeight, FP8ChannelWeight, Int4Weight

DENSE, FP8_CHANNEL, FP8_BLOCK, INT4 = 0, 1, 2, 3
EPI_NONE, EPI_RESIDUAL, EPI_SWIGLU = 0, 1, 2


@triton.jit
def _x_tile(x_chunk, x_offs, m_ok, k_left, BK: tl.constexpr, EVEN_K: tl.constexpr):
    """Activations x^T [BK, BLOCK_M] of one chunk: x_chunk points at x[m0, k0], x_offs holds k * sxk + m * sxm."""
    if EVEN_K:
        mask = m_ok[None, :]
    else:
        mask = (tl.arange(0, BK) < k_left)[:, None] & m_ok[None, :]
    return tl.load(x_chunk + x_offs, mask=mask, other=0.0)


@triton.jit
def _load_scales(
    s_ptr,
    z_ptr,
    row0,
    k0,
    N_OUT,
    stride_sg,
    stride_zg,
    FORMAT: tl.constexpr,
    ASYM: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The raw per-row scale (and packed INT4 zeros) of one chunk, as stored; _scales decodes them where used."""
    rows = row0 + tl.arange(0, BLOCK_N)
    row_ok = rows < N_OUT
    zw = tl.zeros((BLOCK_N,), tl.int32)
    if FORMAT == 3:
        g = k0 // GROUP_SIZE
        sc = tl.load(s_ptr + g * stride_sg + rows, mask=row_ok, other=0.0)
        if ASYM:
            zw = tl.load(z_ptr + g * stride_zg + rows // 8, mask=row_ok, other=0)
    elif FORMAT == 2:
        sc = tl.load(s_ptr + (rows // 128) * stride_sg + k0 // 128, mask=row_ok, other=0.0)
    elif FORMAT == 1:
        sc = tl.load(s_ptr + rows, mask=row_ok, other=0.0)
    else:
        sc = tl.zeros((BLOCK_N,), tl.float32)
    return sc, zw


@triton.jit
def _scales(sc, zw, row0, FORMAT: tl.constexpr, FP8_DOT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per-row factors of a chunk: the scale (x256 when FP8 is decoded to fp16) and, for asymmetric INT4, 8 - zero
    (the kernel subtracts 8 from every nibble and adds the zero back as (8 - zero) * sum(x))."""
    sc = sc.to(tl.float32)
    if (FORMAT == 1 or FORMAT == 2) and not FP8_DOT:
        sc = sc * 256.0
    corr = (8 - ((zw >> (((row0 + tl.arange(0, BLOCK_N)) % 8) * 4)) & 0xF)).to(tl.float32)
    return sc, corr


def _int4_decode_asm(magic: int, one: int, offset: int, packed: str) -> str:
    """PTX for one word's pair of nibbles as (MAGIC + q) * 1 - (MAGIC + 8) = q - 8 in a packed half type: the
    constants are the type's MAGIC, 1.0 and -(MAGIC + 8) in both halves."""
    return (
        f"{{ .reg .b32 t, one, off; lop3.b32 t, $2, 0x000F000F, {magic:#010X}, 0xEA; mov.b32 one, {one:#010X}; "
        f"mov.b32 off, {offset:#010X}; fma.rn.{packed} t, t, one, off; mov.b32 {{$0, $1}}, t; }}"
    ).replace("0X", "0x")


# bf16: MAGIC 128 (0x4300), 1.0 (0x3F80), -136 (0xC308); fp16: MAGIC 1024 (0x6400), 1.0 (0x3C00), -1032 (0xE408)
_INT4_DECODE_BF16 = tl.constexpr(_int4_decode_asm(0x43004300, 0x3F803F80, 0xC308C308, "bf16x2"))
_INT4_DECODE_F16 = tl.constexpr(_int4_decode_asm(0x64006400, 0x3C003C00, 0xE408E408, "f16x2"))


@triton.jit
def _int4_plane(words, j: tl.constexpr, F32: tl.constexpr, magic_bits, offset, half_dtype: tl.constexpr,
                operand_dtype: tl.constexpr, HW_DECODE: tl.constexpr):  # fmt: skip
    """Plane j of a run's words: W[rows, 32 j + c] - 8, c = 2 w + h, as exact values in the dot's operand dtype.
    HW_DECODE (compiled for a GPU): in PTX; elsewhere (the interpreter) the same steps in Triton."""
    if F32:
        lo = ((words >> (4 * j)) & 0xF).to(tl.float32) - 8.0
        hi = ((words >> (16 + 4 * j)) & 0xF).to(tl.float32) - 8.0
        return tl.reshape(tl.join(lo, hi), (words.shape[0], 32))
    if HW_DECODE:
        # mask, magic and the - (MAGIC + 8) as one LOP3 and one packed FMA per word, the pair unpacked as it lies
        # in the register (the split and join below cost a repack per pair)
        asm: tl.constexpr = _INT4_DECODE_BF16 if half_dtype == tl.bfloat16 else _INT4_DECODE_F16
        lo, hi = tl.inline_asm_elementwise(
            asm, "=h,=h,r", [words >> (4 * j)], dtype=(half_dtype.value, half_dtype.value), is_pure=True, pack=1
        )
        return tl.reshape(tl.join(lo, hi), (words.shape[0], 32)).to(operand_dtype)
    pair = ((words >> (4 * j)) & 0x000F000F) | magic_bits
    lo = pair.to(tl.uint16).to(half_dtype, bitcast=True)
    hi = (pair >> 16).to(tl.uint16).to(half_dtype, bitcast=True)
    wj = tl.reshape(tl.join(lo, hi), (words.shape[0], 32)) - tl.full((1, 1), offset, half_dtype)
    return wj.to(operand_dtype)


@triton.jit
def _accumulate(
    acc,
    w_chunk,
    w_offs,
    row_ok,
    k_left,
    scale,
    corr,
    xt,
    xq,
    xs,
    x_chunk,
    x_offs32,
    x_offs,
    m_ok,
    stride_xk,
    FORMAT: tl.constexpr,
    FP8_DOT: tl.constexpr,
    X_FP8: tl.constexpr,
    X_PER_TOKEN: tl.constexpr,
    CHUNK_DOT: tl.constexpr,
    ASYM: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    HW_DECODE: tl.constexpr,
):
    """acc[BLOCK_N, BLOCK_M] += W[rows, chunk] @ x^T[chunk] with the chunk's per-row scale. w_chunk points at the
    chunk's first weight element (word for INT4) of the tile's first row, w_offs holds the in-tile offsets."""
    if EVEN_N:
        row_mask = tl.full((acc.shape[0], 1), 1, tl.int1)
    else:
        row_mask = row_ok[:, None]
    if FORMAT == 3:
        words = tl.load(w_chunk + w_offs, mask=row_mask)
        # Nibble q becomes the float MAGIC + q by OR-ing it under the exponent of MAGIC (1024 in fp16, 128 in bf16,
        # where the last mantissa bit is 1), both halves of a word at once; subtracting MAGIC + 8 leaves q - 8
        # exactly. An asymmetric zero z is added back after the dot as (8 - z) * sum(x), a dot with ones.
        # X_FP8 (W4A8): q - 8, decoded in fp16, is exact in e4m3, and x comes quantized per token and group with
        # scales xs, so the dots run on the FP8 tensor cores.
        if DOT_DTYPE == tl.float16 or X_FP8:  # noqa: SIM300 - a constexpr compares on the left
            magic_bits = 0x64006400
            offset = 1032.0
            half_dtype = tl.float16
        else:
            magic_bits = 0x43004300
            offset = 136.0
            half_dtype = tl.bfloat16
        operand_dtype = tl.float8e4nv if X_FP8 else DOT_DTYPE
        part = tl.zeros(acc.shape, tl.float32)
        xsum = tl.zeros(acc.shape, tl.float32)
        F32: tl.constexpr = DOT_DTYPE == tl.float32 and not X_FP8  # noqa: SIM300
        if CHUNK_DOT:
            # The four planes side by side as one [rows, 128] operand in input order, one dot per chunk (the dots of
            # separate planes each wait for the one before).
            w0 = _int4_plane(words, 0, F32, magic_bits, offset, half_dtype, operand_dtype, HW_DECODE)
            w1 = _int4_plane(words, 1, F32, magic_bits, offset, half_dtype, operand_dtype, HW_DECODE)
            w2 = _int4_plane(words, 2, F32, magic_bits, offset, half_dtype, operand_dtype, HW_DECODE)
            w3 = _int4_plane(words, 3, F32, magic_bits, offset, half_dtype, operand_dtype, HW_DECODE)
            w01 = tl.join(w0, w1)
            w23 = tl.join(w2, w3)
            # [rows, c, a, b] holds plane 2 b + a at c: put (b, a, c) in that order, so column k is input k
            wk = tl.reshape(tl.permute(tl.join(w01, w23), (0, 3, 2, 1)), (words.shape[0], 128))
            xk = _x_tile(x_chunk, x_offs, m_ok, k_left, 128, EVEN_K)
            if not X_FP8:
                xk = xk.to(DOT_DTYPE)
            part = tl.dot(wk, xk, part, input_precision=INPUT_PRECISION)
            if ASYM:
                ones = tl.full((words.shape[0], 128), 1.0, half_dtype).to(operand_dtype)
                xsum = tl.dot(ones, xk, xsum, input_precision=INPUT_PRECISION)
        else:
            for j in tl.static_range(4):
                wj = _int4_plane(words, j, F32, magic_bits, offset, half_dtype, operand_dtype, HW_DECODE)
                xj = _x_tile(x_chunk + 32 * j * stride_xk, x_offs32, m_ok, k_left - 32 * j, 32, EVEN_K)
                if X_FP8:
                    part = tl.dot(wj, xj, part)
                else:
                    part = tl.dot(wj, xj.to(DOT_DTYPE), part, input_precision=INPUT_PRECISION)
                if ASYM:
                    ones = tl.full((words.shape[0], 32), 1.0, half_dtype).to(operand_dtype)
                    if X_FP8:
                        xsum = tl.dot(ones, xj, xsum)
                    else:
                        xsum = tl.dot(ones, xj.to(DOT_DTYPE), xsum, input_precision=INPUT_PRECISION)
        if ASYM:
            part += corr[:, None] * xsum
        if X_FP8:
            part = part * xs[None, :]
        acc += part * scale[:, None]
    else:
        if EVEN_K:
            wmask = row_mask
        else:
            wmask = row_mask & (tl.arange(0, BLOCK_K) < k_left)[None, :]
        if FORMAT == 0:
            w = tl.load(w_chunk + w_offs, mask=wmask, other=0.0)
            acc = tl.dot(w.to(DOT_DTYPE), xt, acc, input_precision=INPUT_PRECISION)
        else:
            wb = tl.load(w_chunk + w_offs, mask=wmask, other=0.0)
            if X_PER_TOKEN:
                # one scale per token and per row over all of K: the dots accumulate across chunks, and the scales
                # apply once, where the tile's share ends
                acc = tl.dot(wb, xq, acc)
            else:
                if FP8_DOT:
                    part = tl.dot(wb, xq) * xs[None, :]
                else:
                    # e4m3 bits s.eeee.mmm placed as fp16 s.0eeee.mmm0000000 are the value / 256 (normals and
                    # subnormals alike), so the decode is two masks and shifts; the 256 goes into the scale.
                    b = wb.to(tl.int32)
                    half = (((b & 0x80) << 8) | ((b & 0x7F) << 7)).to(tl.uint16).to(tl.float16, bitcast=True)
                    part = tl.dot(half.to(DOT_DTYPE), xt, input_precision=INPUT_PRECISION)
                acc += part * scale[:, None]
    return acc


@triton.jit
def _row_rstd(x_ptr, offs_m, M, K, stride_xm, stride_xk, eps, BLOCK_K: tl.constexpr):
    """1 / RMS of the x rows offs_m over all K (the RMSNorm fused in front of the GEMM scales the tile's rows)."""
    m_ok = offs_m < M
    ss = tl.zeros_like(offs_m).to(tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        ptrs = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + k[:, None] * stride_xk
        xv = tl.load(ptrs, mask=m_ok[None, :] & (k[:, None] < K), other=0.0).to(tl.float32)
        ss += tl.sum(xv * xv, 0)
    return tl.rsqrt(ss / K + eps)


@triton.jit
def _store(
    acc, acc_up, offs_n, n_ok, offs_m, M, r_ptr, y_ptr, stride_rm, stride_ym, rstd,
    EPILOGUE: tl.constexpr, NORM: tl.constexpr,
):  # fmt: skip
    """Stores a finished tile: its rows scaled by rstd (the fused RMSNorm's 1 / RMS, [BLOCK_M]) if NORM, then the
    epilogue."""
    if NORM != 0:
        acc = acc * rstd[None, :]
        acc_up = acc_up * rstd[None, :]
    out = acc
    if EPILOGUE == 2:
        out = acc * tl.sigmoid(acc) * acc_up
    mask = n_ok[:, None] & (offs_m[None, :] < M)
    if EPILOGUE == 1:
        out += tl.load(r_ptr + offs_m[None, :] * stride_rm + offs_n[:, None], mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _finish(
    tile, programs, total_chunks, chunks_per_tile, slots, num_m_tiles, ws_ptr, cnt_ptr,
    M, N_OUT, r_ptr, y_ptr, stride_rm, stride_ym, x_ptr, K, stride_xm, stride_xk, norm_eps,
    EPILOGUE: tl.constexpr, NORM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Arrive at a shared tile; the last of its programs sums the parked partials in slot order and stores it."""
    ROWS: tl.constexpr = 2 * BLOCK_N if EPILOGUE == 2 else BLOCK_N
    # Programs holding chunks of the tile run from prog(first chunk) to prog(last chunk), prog(c) = ((c+1)P-1) // total.
    first = ((tile.to(tl.int64) * chunks_per_tile + 1) * programs - 1) // total_chunks
    last = ((tile.to(tl.int64) + 1) * chunks_per_tile * programs - 1) // total_chunks
    # All threads' partial stores precede the release by the one thread that performs the atomic.
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
    if arrived == last - first:
        r = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        acc_up = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        for s in range(0, last - first + 1):
            src = ws_ptr + (tile.to(tl.int64) * slots + s) * (ROWS * BLOCK_M)
            acc += tl.load(src + r, cache_modifier=".cg")
            if EPILOGUE == 2:
                acc_up += tl.load(src + BLOCK_N * BLOCK_M + r, cache_modifier=".cg")
        pid_n = tile // num_m_tiles
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = (tile - pid_n * num_m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
        rstd = tl.zeros((BLOCK_M,), tl.float32)
        if NORM != 0:  # no program saw all of the rows' K: read them again (at most two shared tiles per program)
            rstd = _row_rstd(x_ptr, offs_m, M, K, stride_xm, stride_xk, norm_eps, BLOCK_K)
        _store(
            acc, acc_up, offs_n, offs_n < N_OUT, offs_m, M, r_ptr, y_ptr, stride_rm, stride_ym, rstd, EPILOGUE, NORM,
        )  # fmt: skip
        tl.atomic_xchg(cnt_ptr + tile, 0)


@triton.jit
def _park(
    acc, acc_up, tile, pid, programs, total_chunks, chunks_per_tile, slots, ws_ptr,
    EPILOGUE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """A program's share of a tile, parked in its workspace slot of the tile; _finish sums the slots."""
    ROWS: tl.constexpr = 2 * BLOCK_N if EPILOGUE == 2 else BLOCK_N
    first = ((tile.to(tl.int64) * chunks_per_tile + 1) * programs - 1) // total_chunks
    r = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
    base = ws_ptr + (tile.to(tl.int64) * slots + (pid - first)) * (ROWS * BLOCK_M)
    tl.store(base + r, acc)
    if EPILOGUE == 2:
        tl.store(base + BLOCK_N * BLOCK_M + r, acc_up)


@triton.jit
def _finish_shared_tiles(
    start, end, programs, total_chunks, chunks_per_tile, slots, num_m_tiles, ws_ptr, cnt_ptr,
    M, N_OUT, r_ptr, y_ptr, stride_rm, stride_ym, x_ptr, K, stride_xm, stride_xk, norm_eps,
    EPILOGUE: tl.constexpr, NORM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """After a program's chunks [start, end): arrive at the tiles it shares with others, at most two (the one it
    starts in and the one it ends in)."""
    tile_a = start // chunks_per_tile
    if (start != tile_a * chunks_per_tile) | (end < (tile_a + 1) * chunks_per_tile):
        _finish(
            tile_a, programs, total_chunks, chunks_per_tile, slots, num_m_tiles, ws_ptr, cnt_ptr,
            M, N_OUT, r_ptr, y_ptr, stride_rm, stride_ym, x_ptr, K, stride_xm, stride_xk, norm_eps,
            EPILOGUE, NORM, BLOCK_N, BLOCK_M, BLOCK_K,
        )  # fmt: skip
    tile_b = (end - 1) // chunks_per_tile
    if (tile_b != tile_a) & (end < (tile_b + 1) * chunks_per_tile):
        _finish(
            tile_b, programs, total_chunks, chunks_per_tile, slots, num_m_tiles, ws_ptr, cnt_ptr,
            M, N_OUT, r_ptr, y_ptr, stride_rm, stride_ym, x_ptr, K, stride_xm, stride_xk, norm_eps,
            EPILOGUE, NORM, BLOCK_N, BLOCK_M, BLOCK_K,
        )  # fmt: skip


# Only K and the weight/activation row strides keep Triton's divisibility specialization (it makes the row loads
# 16-byte vectors); the other integers would otherwise multiply the compiled variants across shapes and grids.
@triton.jit(
    do_not_specialize=[
        "M", "N_OUT", "UP_ROW", "stride_sg", "stride_zg", "stride_rm", "stride_ym", "stride_am", "stride_xsm",
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
    g_ptr,
    norm_eps,
    a_ptr,
    xs_ptr,
    stride_xsm,
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
    stride_am,
    stride_ak,
    num_m_tiles,
    chunks_per_tile,
    total_chunks,
    slots,
    FORMAT: tl.constexpr,
    FP8_DOT: tl.constexpr,
    X_FP8: tl.constexpr,
    X_PER_TOKEN: tl.constexpr,
    CHUNK_DOT: tl.constexpr,
    ASYM: tl.constexpr,
    MMA_SYNC: tl.constexpr,  # read by no code: it keys the variant compiled with wgmma off (_dots_as_mma_sync)
    HW_E4M3: tl.constexpr,
    HW_DECODE: tl.constexpr,
    EPILOGUE: tl.constexpr,
    NORM: tl.constexpr,
    GATE: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    start = (pid.to(tl.int64) * total_chunks // programs).to(tl.int32)
    end = ((pid + 1).to(tl.int64) * total_chunks // programs).to(tl.int32)
    # In-tile offsets, the same for every chunk: the loop only moves scalar base pointers.
    if FORMAT == 3:
        w_offs = tl.arange(0, BLOCK_N)[:, None] * stride_wn + tl.arange(0, 16)[None, :]
    else:
        w_offs = tl.arange(0, BLOCK_N)[:, None] * stride_wn + tl.arange(0, BLOCK_K)[None, :]
    x_offs = tl.arange(0, BLOCK_K)[:, None] * stride_xk + tl.arange(0, BLOCK_M)[None, :] * stride_xm
    x_offs32 = tl.arange(0, 32)[:, None] * stride_xk + tl.arange(0, BLOCK_M)[None, :] * stride_xm
    a_offs = tl.arange(0, BLOCK_K)[:, None] * stride_ak + tl.arange(0, BLOCK_M)[None, :] * stride_am
    # One flat loop over this program's chunks, crossing tile boundaries, so the load pipeline never drains.
    tile = start // chunks_per_tile
    kc = start - tile * chunks_per_tile
    pid_n = tile // num_m_tiles
    pid_m = tile - pid_n * num_m_tiles
    seg_first = kc
    # Chunk scales are not operands of the dot, so the pipeliner leaves their loads in place: fetch each one a
    # chunk ahead by hand. (Two ahead makes the pipeliner give up on the loop.)
    # (Carried raw: decoding them at once would make the loop wait for the load.)
    sc, zw = _load_scales(
        s_ptr, z_ptr, pid_n * BLOCK_N, kc * BLOCK_K, N_OUT, stride_sg, stride_zg, FORMAT, ASYM, GROUP_SIZE, BLOCK_N
    )
    up_sc, up_zw = sc, zw
    if EPILOGUE == 2:
        up_sc, up_zw = _load_scales(
            s_ptr, z_ptr, pid_n * BLOCK_N + UP_ROW, kc * BLOCK_K, N_OUT + UP_ROW, stride_sg, stride_zg,
            FORMAT, ASYM, GROUP_SIZE, BLOCK_N,
        )  # fmt: skip
    xs_cur = tl.zeros((BLOCK_M,), tl.float32)  # X_FP8: the scales of x's chunk, fetched a chunk ahead
    if X_FP8 and not X_PER_TOKEN:
        offs_m0 = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        xs_cur = tl.load(xs_ptr + offs_m0 * stride_xsm + kc, mask=offs_m0 < M)
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    ss = tl.zeros((BLOCK_M,), tl.float32)  # the fused RMSNorm's sum of squares of the tile's rows so far
    for c in range(start, end):
        row0 = pid_n * BLOCK_N
        n_ok = (row0 + tl.arange(0, BLOCK_N)) < N_OUT
        m0 = pid_m * BLOCK_M
        m_ok = (m0 + tl.arange(0, BLOCK_M)) < M
        k0 = kc * BLOCK_K
        k_left = K - k0
        # The next chunk's tile coordinates (m varies fastest across tiles) and its scales.
        tile_end = kc == chunks_per_tile - 1
        m_wrap = tile_end & (pid_m == num_m_tiles - 1)
        pid_n_nx = tl.where(m_wrap, pid_n + 1, pid_n)
        pid_m_nx = tl.where(tile_end, tl.where(m_wrap, 0, pid_m + 1), pid_m)
        kc_nx = tl.where(tile_end, 0, kc + 1)
        sc_nx, zw_nx = _load_scales(
            s_ptr, z_ptr, pid_n_nx * BLOCK_N, kc_nx * BLOCK_K, N_OUT, stride_sg, stride_zg,
            FORMAT, ASYM, GROUP_SIZE, BLOCK_N,
        )  # fmt: skip
        up_sc_nx, up_zw_nx = up_sc, up_zw
        if EPILOGUE == 2:
            up_sc_nx, up_zw_nx = _load_scales(
                s_ptr, z_ptr, pid_n_nx * BLOCK_N + UP_ROW, kc_nx * BLOCK_K, N_OUT + UP_ROW, stride_sg, stride_zg,
                FORMAT, ASYM, GROUP_SIZE, BLOCK_N,
            )  # fmt: skip
        x_chunk = x_ptr + m0.to(tl.int64) * stride_xm + k0 * stride_xk
        xt = tl.zeros((BLOCK_K, BLOCK_M), DOT_DTYPE)
        xq = xt
        xs = tl.zeros((BLOCK_M,), tl.float32)
        if X_FP8:  # x quantized in a pass before the GEMM: the loop only loads it (INT4 loads it by plane)
            if FORMAT != 3:
                xq = _x_tile(x_chunk, x_offs, m_ok, k_left, BLOCK_K, EVEN_K)
            if not X_PER_TOKEN:
                xs = xs_cur
                offs_m_nx = pid_m_nx * BLOCK_M + tl.arange(0, BLOCK_M)
                xs_cur = tl.load(xs_ptr + offs_m_nx * stride_xsm + kc_nx, mask=offs_m_nx < M)
        elif FORMAT != 3:
            xt = _x_tile(x_chunk, x_offs, m_ok, k_left, BLOCK_K, EVEN_K).to(DOT_DTYPE)
            if GATE:  # x * sigmoid(gate), elementwise (the gated attention's output in front of o_proj)
                a_chunk = a_ptr + m0.to(tl.int64) * stride_am + k0 * stride_ak
                at = _x_tile(a_chunk, a_offs, m_ok, k_left, BLOCK_K, EVEN_K).to(tl.float32)
                xt = (xt.to(tl.float32) * tl.sigmoid(at)).to(DOT_DTYPE)
            if NORM != 0:
                # the fused RMSNorm's weight scales the inputs; its 1 / RMS, from the same chunks, scales the
                # finished tile's rows
                xf = xt.to(tl.float32)
                ss += tl.sum(xf * xf, 0)
                k_ok = tl.arange(0, BLOCK_K) < k_left
                g = tl.load(g_ptr + k0 + tl.arange(0, BLOCK_K), mask=k_ok, other=0.0).to(tl.float32)
                if NORM == 2:
                    g = tl.where(k_ok, 1.0 + g, 0.0)
                xt = (xt.to(tl.float32) * g[:, None]).to(DOT_DTYPE)
            if FP8_DOT:
                xf = xt.to(tl.float32)
                amax = tl.max(tl.abs(xf), axis=0)
                inv = tl.where(amax > 0, tl.math.div_rn(tl.full(amax.shape, 448.0, tl.float32), amax), 0.0)
                xq = _to_e4m3(xf * inv[None, :], HW_E4M3)
                xs = tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))
        w_k = k0 // 8 if FORMAT == 3 else k0
        w_chunk = w_ptr + row0.to(tl.int64) * stride_wn + w_k
        scale, corr = _scales(sc, zw, row0, FORMAT, FP8_DOT, BLOCK_N)
        acc = _accumulate(
            acc, w_chunk, w_offs, n_ok, k_left, scale, corr, xt, xq, xs, x_chunk, x_offs32, x_offs, m_ok,
            stride_xk, FORMAT, FP8_DOT, X_FP8, X_PER_TOKEN, CHUNK_DOT, ASYM, EVEN_N, EVEN_K, BLOCK_K, DOT_DTYPE,
            INPUT_PRECISION, HW_DECODE,
        )  # fmt: skip
        if EPILOGUE == 2:
            up_scale, up_corr = _scales(up_sc, up_zw, row0 + UP_ROW, FORMAT, FP8_DOT, BLOCK_N)
            acc_up = _accumulate(
                acc_up, w_chunk + UP_ROW.to(tl.int64) * stride_wn, w_offs, n_ok, k_left, up_scale, up_corr,
                xt, xq, xs, x_chunk, x_offs32, x_offs, m_ok, stride_xk,
                FORMAT, FP8_DOT, X_FP8, X_PER_TOKEN, CHUNK_DOT, ASYM, EVEN_N, EVEN_K, BLOCK_K, DOT_DTYPE,
                INPUT_PRECISION, HW_DECODE,
            )  # fmt: skip
        if tile_end | (c == end - 1):
            offs_n = row0 + tl.arange(0, BLOCK_N)
            offs_m = m0 + tl.arange(0, BLOCK_M)
            if X_PER_TOKEN:  # the share's sums, in FP8 units until now, times the row and token scales
                xs_tok = tl.load(xs_ptr + offs_m * stride_xsm, mask=m_ok, other=0.0)
                acc = acc * scale[:, None] * xs_tok[None, :]
                if EPILOGUE == 2:
                    acc_up = acc_up * up_scale[:, None] * xs_tok[None, :]
            if tile_end & (seg_first == 0):  # the whole tile: its rows' sums of squares are complete
                rstd = tl.rsqrt(ss / K + norm_eps)
                _store(
                    acc, acc_up, offs_n, n_ok, offs_m, M, r_ptr, y_ptr, stride_rm, stride_ym, rstd, EPILOGUE, NORM,
                )  # fmt: skip
            else:
                _park(
                    acc, acc_up, pid_n * num_m_tiles + pid_m, pid, programs, total_chunks, chunks_per_tile, slots,
                    ws_ptr, EPILOGUE, BLOCK_N, BLOCK_M,
                )  # fmt: skip
            acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
            acc_up = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
            ss = tl.zeros((BLOCK_M,), tl.float32)
        seg_first = tl.where(tile_end, 0, seg_first)
        pid_n = pid_n_nx
        pid_m = pid_m_nx
        kc = kc_nx
        sc, zw, up_sc, up_zw = sc_nx, zw_nx, up_sc_nx, up_zw_nx
    _finish_shared_tiles(
        start, end, programs, total_chunks, chunks_per_tile, slots, num_m_tiles, ws_ptr, cnt_ptr,
        M, N_OUT, r_ptr, y_ptr, stride_rm, stride_ym, x_ptr, K, stride_xm, stride_xk, norm_eps,
        EPILOGUE, NORM, BLOCK_N, BLOCK_M, BLOCK_K,
    )  # fmt: skip


@triton.jit(
    do_not_specialize=[
        "M", "N_OUT", "UP_ROW", "stride_rm", "stride_ym", "stride_am", "stride_xsm", "num_m_tiles",
        "chunks_per_tile", "total_chunks", "slots",
    ]
)  # fmt: skip
def _linear_tma_kernel(
    w_desc,
    x_desc,
    s_ptr,
    xs_ptr,
    stride_xsm,
    r_ptr,
    y_ptr,
    ws_ptr,
    cnt_ptr,
    x_ptr,
    g_ptr,
    norm_eps,
    a_ptr,
    M,
    N_OUT,
    K,
    UP_ROW,
    stride_xm,
    stride_rm,
    stride_ym,
    stride_am,
    num_m_tiles,
    chunks_per_tile,
    total_chunks,
    slots,
    FP8: tl.constexpr,
    EPILOGUE: tl.constexpr,
    NORM: tl.constexpr,
    GATE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The stream-K GEMM of _linear_kernel with its weight and activation tiles fetched by the tensor memory
    accelerator (Hopper): one instruction per tile, zero-filled past the tensors' edges, no per-thread address or
    mask arithmetic. Dense weights, or FP8 per-channel weights against x quantized per token (W8A8), whose scales
    apply once per tile."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    start = (pid.to(tl.int64) * total_chunks // programs).to(tl.int32)
    end = ((pid + 1).to(tl.int64) * total_chunks // programs).to(tl.int32)
    # The program's chunks tile by tile: an inner loop over one tile's share with fixed coordinates, which the
    # pipeliner streams as a plain split-K loop (at most three tiles per program, so it drains rarely).
    seg = start
    while seg < end:
        tile = seg // chunks_per_tile
        tile_first = tile * chunks_per_tile
        seg_end = tl.minimum(end, tile_first + chunks_per_tile)
        pid_n = tile // num_m_tiles
        pid_m = tile - pid_n * num_m_tiles
        row0 = pid_n * BLOCK_N
        m0 = pid_m * BLOCK_M
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        acc_up = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        ss = tl.zeros((BLOCK_M,), tl.float32)  # the fused RMSNorm's sum of squares of the tile's rows so far
        for c in range(seg - tile_first, seg_end - tile_first):
            k0 = c * BLOCK_K
            xt = x_desc.load([m0, k0])  # [BLOCK_M, BLOCK_K]
            if GATE:  # x * sigmoid(gate), elementwise (the gated attention's output in front of o_proj)
                offs_m = m0 + tl.arange(0, BLOCK_M)
                offs_k = k0 + tl.arange(0, BLOCK_K)
                at = tl.load(
                    a_ptr + offs_m[:, None] * stride_am + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0,
                ).to(tl.float32)  # fmt: skip
                xt = (xt.to(tl.float32) * tl.sigmoid(at)).to(xt.dtype)
            if NORM != 0:
                xf = xt.to(tl.float32)
                ss += tl.sum(xf * xf, 1)
                k_ok = k0 + tl.arange(0, BLOCK_K) < K
                g = tl.load(g_ptr + k0 + tl.arange(0, BLOCK_K), mask=k_ok, other=0.0).to(tl.float32)
                if NORM == 2:
                    g = tl.where(k_ok, 1.0 + g, 0.0)
                xt = (xf * g[None, :]).to(xt.dtype)
            acc = tl.dot(w_desc.load([row0, k0]), tl.trans(xt), acc)
            if EPILOGUE == 2:
                acc_up = tl.dot(w_desc.load([row0 + UP_ROW, k0]), tl.trans(xt), acc_up)
        offs_n = row0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N_OUT
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        if FP8:  # the share's sums, in FP8 units, times the row and token scales
            xs_tok = tl.load(xs_ptr + offs_m * stride_xsm, mask=m_ok, other=0.0)
            acc = acc * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)[:, None] * xs_tok[None, :]
            if EPILOGUE == 2:
                up_scale = tl.load(s_ptr + UP_ROW + offs_n, mask=n_ok, other=0.0)
                acc_up = acc_up * up_scale[:, None] * xs_tok[None, :]
        if (seg == tile_first) & (seg_end == tile_first + chunks_per_tile):  # the whole tile
            rstd = ss
            if NORM != 0:  # its rows' sums of squares are complete
                rstd = tl.rsqrt(ss / K + norm_eps)
            _store(
                acc, acc_up, offs_n, n_ok, offs_m, M, r_ptr, y_ptr, stride_rm, stride_ym, rstd, EPILOGUE, NORM,
            )  # fmt: skip
        else:
            _park(
                acc, acc_up, tile, pid, programs, total_chunks, chunks_per_tile, slots, ws_ptr, EPILOGUE, BLOCK_N,
                BLOCK_M,
            )  # fmt: skip
        seg = seg_end
    _finish_shared_tiles(
        start, end, programs, total_chunks, chunks_per_tile, slots, num_m_tiles, ws_ptr, cnt_ptr,
        M, N_OUT, r_ptr, y_ptr, stride_rm, stride_ym, x_ptr, K, stride_xm, 1, norm_eps,
        EPILOGUE, NORM, BLOCK_N, BLOCK_M, BLOCK_K,
    )  # fmt: skip


@triton.jit
def _round_to_e4m3(v):
    """fp32 v, |v| <= 448 (x times 448 / amax), rounded to the nearest FP8 e4m3 value, ties to even, as an fp32
    that the FP8 conversion then holds exactly. Triton converts fp32 to e4m3 through fp16 on sm90, and that double
    rounding moves ties: 84.0000076 becomes 84.0, then 80, where 88 is nearest. Integer and exact float steps
    only: an add rounding v would be contracted with the product that made v into one FMA, rounding the exact
    product instead (a tie of v could then go either way)."""
    bits = v.to(tl.uint32, bitcast=True)
    magnitude = bits & 0x7FFFFFFF
    # normal e4m3 (|v| >= 2^-6): 3 mantissa bits kept, the 20 dropped rounded to nearest even
    normal = (magnitude + 0x7FFFF + ((magnitude >> 20) & 1)) & 0xFFF00000
    # subnormal e4m3 (|v| < 2^-6): multiples of 2^-9; t = |v| * 2^9 < 8 and t - floor(t) are exact
    t = magnitude.to(tl.float32, bitcast=True) * 512.0
    whole = tl.floor(t)
    frac = t - whole
    odd = (whole.to(tl.int32) & 1) == 1
    subnormal = ((whole + tl.where((frac > 0.5) | ((frac == 0.5) & odd), 1.0, 0.0)) * 0.001953125).to(
        tl.uint32, bitcast=True
    )
    rounded = tl.minimum(tl.where(magnitude < 0x3C800000, subnormal, normal), 0x43E00000)  # 2^-6; at most 448
    # the sign put back as a bit: Triton negates a float as 0 - x, which makes -0.0 into +0.0
    return (rounded | (bits & 0x80000000)).to(tl.float32, bitcast=True)


@triton.jit
def _to_e4m3(v, HW_E4M3: tl.constexpr):
    """fp32 v, |v| <= 448, as FP8 e4m3 rounded to nearest, ties to even. HW_E4M3 (sm89+): one cvt per two values,
    whose rounding is exact; elsewhere (the interpreter, older GPUs) the exact steps of _round_to_e4m3."""
    if HW_E4M3:
        # cvt packs its first source into the high byte: the pair's second element goes first
        bits = tl.inline_asm_elementwise(
            "cvt.rn.satfinite.e4m3x2.f32 $0, $2, $1;", "=h,f,f", [v], dtype=tl.uint8, is_pure=True, pack=2
        )
        return bits.to(tl.float8e4nv, bitcast=True)
    return _round_to_e4m3(v).to(tl.float8e4nv)


@triton.jit
def _x_prologue(xf, k, ok, g_ptr, a_row, stride_ak, rstd, NORM: tl.constexpr, GATE: tl.constexpr, DTYPE: tl.constexpr):
    """The values x would have after the prologue ops that run in front of a GEMM, with their roundings to x's
    dtype: x * sigmoid(gate) as torch computes it (fused_ops' callers), then fused_ops.rms_norm's arithmetic."""
    if GATE:
        a = tl.load(a_row + k * stride_ak, mask=ok, other=0.0).to(tl.float32)
        xf = (xf * tl.sigmoid(a).to(DTYPE).to(tl.float32)).to(DTYPE).to(tl.float32)
    if NORM != 0:
        w = tl.load(g_ptr + k, mask=ok, other=0.0).to(tl.float32)
        if NORM == 2:
            xf = (xf * rstd * (1.0 + w)).to(DTYPE).to(tl.float32)
        else:
            xf = ((xf * rstd).to(DTYPE).to(tl.float32) * w).to(DTYPE).to(tl.float32)
    return xf


@triton.jit
def _x_row_rstd(x_row, a_row, stride_ak, K, eps, GATE: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """1 / RMS of one row of x (gated first if GATE), for the norm in front of the quantization."""
    ss = tl.zeros((BLOCK,), tl.float32)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        xf = _x_prologue(
            tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32), k, k < K, x_row, a_row, stride_ak, 0.0,
            0, GATE, DTYPE,
        )  # fmt: skip
        ss += xf * xf
    return tl.rsqrt(tl.sum(ss, 0) / K + eps)


@triton.jit
def _quantize_x_kernel(x_ptr, q_ptr, s_ptr, g_ptr, a_ptr, eps, K, stride_xm, stride_qm, stride_sm, stride_am,
                       stride_ak, GROUPS: tl.constexpr, HW_E4M3: tl.constexpr, NORM: tl.constexpr,
                       GATE: tl.constexpr):  # fmt: skip
    """x [M, K] -> FP8 e4m3 per token and 128-input group (q [M, K], scales s [M, K / 128]), with the same
    arithmetic as the GEMM's in-loop quantization, so either path gives the same result; the gate and the norm in
    front of the GEMM applied first (NORM, GATE: as _x_prologue)."""
    m = tl.program_id(0).to(tl.int64)
    dtype = x_ptr.dtype.element_ty
    a_row = a_ptr + m * stride_am
    rstd = 0.0
    if NORM != 0:
        rstd = _x_row_rstd(x_ptr + m * stride_xm, a_row, stride_ak, K, eps, GATE, dtype, 1024)
    g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    k = g[:, None] * 128 + tl.arange(0, 128)[None, :]
    ok = k < K
    xf = tl.load(x_ptr + m * stride_xm + k, mask=ok, other=0.0).to(tl.float32)
    xf = _x_prologue(xf, k, ok, g_ptr, a_row, stride_ak, rstd, NORM, GATE, dtype)
    amax = tl.max(tl.abs(xf), axis=1)
    inv = tl.where(amax > 0, tl.math.div_rn(tl.full(amax.shape, 448.0, tl.float32), amax), 0.0)
    tl.store(q_ptr + m * stride_qm + k, _to_e4m3(xf * inv[:, None], HW_E4M3), mask=ok)
    tl.store(s_ptr + m * stride_sm + g, tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32)), mask=g * 128 < K)


@triton.jit
def _quantize_x_rows_kernel(x_ptr, q_ptr, s_ptr, g_ptr, a_ptr, eps, K, stride_xm, stride_qm, stride_am, stride_ak,
                            BLOCK: tl.constexpr, HW_E4M3: tl.constexpr, NORM: tl.constexpr,
                            GATE: tl.constexpr):  # fmt: skip
    """x [M, K] -> FP8 e4m3 with one scale per row (the vendor GEMM's per-token scales), as
    weight_formats.quantize_fp8_activations(x, group=K) computes it: the row's amax, then the values; the gate and
    the norm in front of the GEMM applied first."""
    m = tl.program_id(0).to(tl.int64)
    dtype = x_ptr.dtype.element_ty
    x_row = x_ptr + m * stride_xm
    a_row = a_ptr + m * stride_am
    rstd = 0.0
    if NORM != 0:
        rstd = _x_row_rstd(x_row, a_row, stride_ak, K, eps, GATE, dtype, BLOCK)
    amax = tl.zeros((BLOCK,), tl.float32)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        xf = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
        xf = _x_prologue(xf, k, k < K, g_ptr, a_row, stride_ak, rstd, NORM, GATE, dtype)
        amax = tl.maximum(amax, tl.abs(xf))
    top = tl.max(amax, 0)
    inv = tl.where(top > 0, tl.math.div_rn(448.0, top), 0.0)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        xf = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
        xf = _x_prologue(xf, k, k < K, g_ptr, a_row, stride_ak, rstd, NORM, GATE, dtype)
        tl.store(q_ptr + m * stride_qm + k, _to_e4m3(xf * inv, HW_E4M3), mask=k < K)
    tl.store(s_ptr + m, tl.math.div_rn(top, 448.0))


def quantize_x_fp8(
    x: torch.Tensor,
    per_row: bool = False,
    *,
    norm: RowNorm | None = None,
    gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (contiguous rows) -> (FP8 values [M, K], fp32 scales [M, ceil(K / 128)]), per token and group of
    128 inputs; per_row: one scale per token ([M, 1]). One launch either way, with the arithmetic of
    weight_formats.quantize_fp8_activations, applied to x * sigmoid(gate) (gate [M, K]) and then the RMSNorm `norm`
    where given: the same values as those ops run in front, without their launches."""
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    g = norm.weight if norm is not None else x
    a = gate if gate is not None else x
    prologue = dict(
        NORM=0 if norm is None else 2 if norm.zero_centered else 1, GATE=gate is not None,
        HW_E4M3=_fp8_hardware(x.device), num_warps=4,
    )  # fmt: skip
    eps = norm.eps if norm is not None else 0.0
    if per_row:
        scales = torch.empty(m, 1, dtype=torch.float32, device=x.device)
        _quantize_x_rows_kernel[(m,)](
            x, q, scales, g, a, eps, k, x.stride(0), q.stride(0), a.stride(0), a.stride(1), BLOCK=1024, **prologue
        )
        return q, scales
    groups = triton.cdiv(k, 128)
    scales = torch.empty(m, groups, dtype=torch.float32, device=x.device)
    per_program = 8
    _quantize_x_kernel[(m, triton.cdiv(groups, per_program))](
        x, q, scales, g, a, eps, k, x.stride(0), q.stride(0), scales.stride(0), a.stride(0), a.stride(1),
        GROUPS=per_program, **prologue,
    )  # fmt: skip
    return q, scales


# ---- launcher ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowNorm:
    """An RMSNorm over x's rows fused in front of the GEMM (ops.rms_norm's weight, eps, zero-centred form)."""

    weight: torch.Tensor
    eps: float
    zero_centered: bool = False


@contextlib.contextmanager
def _dots_as_mma_sync(enabled: bool):
    """Triton's compiler reads DISABLE_MMA_V3 when it compiles (and keys its cache with it): set around the launch
    that would compile an mma_sync variant, whose MMA_SYNC constexpr keeps it apart in the in-memory cache."""
    if not enabled:
        yield
        return
    before = os.environ.get("DISABLE_MMA_V3")
    os.environ["DISABLE_MMA_V3"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["DISABLE_MMA_V3"]
        else:
            os.environ["DISABLE_MMA_V3"] = before


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
    # x quantized to FP8 by a pass before the GEMM: for FP8 weights with the FP8 dot, instead of in its loop (the
    # same result); for INT4 weights, the W4A8 variant on the FP8 tensor cores (sm89+). The tuning study chooses.
    prequant_x: bool = False
    # With prequant_x and FP8 per-channel weights: one scale per token over all of K (W8A8 per token and channel,
    # as the vendor GEMM quantizes), so the FP8 dots accumulate across chunks instead of each chunk's product
    # waiting to be scaled; a coarser quantization of x than the default's per 128 inputs, and (on Hopper, whose FP8
    # tensor cores add with fewer bits than fp32) an accumulation error that grows with the K of one accumulator.
    x_per_token: bool = False
    # INT4: the four 32-input planes of a chunk as one operand, one dot per chunk instead of one per plane (each of
    # which waits for the one before it on the tensor cores).
    int4_chunk_dot: bool = False
    # Hopper: the dots as warp-level mma.sync (as on sm80/sm89) instead of warpgroup wgmma. A dot whose weight
    # operand is decoded in registers (INT4, FP8 scaled per chunk) waits for each wgmma to finish before the next
    # can start; mma.sync needs no such wait, at the cost of more instructions per product. No effect elsewhere.
    mma_sync: bool = False
    # Hopper: the weight and activation tiles fetched by the tensor memory accelerator (_linear_tma_kernel), for
    # dense bf16/fp16 weights, or FP8 per-channel weights against x quantized per token in front (W8A8, as
    # x_per_token). One instruction per tile instead of every thread's loads, address and mask arithmetic.
    tma: bool = False


Weight = DenseWeight | FP8ChannelWeight | FP8BlockWeight | Int4Weight


def _m_bucket(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128


def _sm_count(device: torch.device) -> int:
    facts = gpu_facts(device)
    return 4 if facts is None else facts.sm_count


def default_config(
    weight: Weight,
    m: int,
    n_out: int,
    k: int,
    device: torch.device,
    swiglu: bool = False,
) -> LinearConfig:
    """Heuristic table keyed on the format, the M bucket and the tile count; tuning databases may override it.

    From a sweep on the H100 (bench/bench_linear.py --sweep): bf16 streams best as 64-row tiles, one program per
    tile; FP8 and INT4 (whose loops do more per byte) as 128-row tiles shared by a fixed grid of programs
    (stream-K), except where the tiles come in many waves anyway (lm_head). Measured since
    (bench/results/kernels-linear-h100.json) and still to revisit: bf16 with the SwiGLU epilogue (two weight tiles
    per program, one program per SM) leaves a second partial wave; M=64 bf16 with few tiles did better in the
    sweep as one program per 128-row tile than stream-K.
    """
    bm = _m_bucket(m)
    dense = isinstance(weight, DenseWeight)
    if bm >= 128:
        cfg = LinearConfig(block_n=128, block_m=bm, block_k=64 if dense else 128, num_warps=8, num_stages=3)
    elif dense:
        if bm <= 32:
            cfg = LinearConfig(block_n=64, block_m=bm, block_k=128, num_warps=4, num_stages=4 if k <= 5120 else 6)
        else:
            cfg = LinearConfig(block_n=128, block_m=bm, block_k=128, num_warps=8, num_stages=4)
    elif bm > 32:  # 8 warps: with 4, 64 tokens of FP8 or INT4 work spill registers
        cfg = LinearConfig(block_n=128, block_m=bm, block_k=128, num_warps=8, num_stages=3)
    elif isinstance(weight, Int4Weight):
        cfg = LinearConfig(block_n=128, block_m=bm, block_k=128, num_warps=4, num_stages=4)
    else:
        cfg = LinearConfig(block_n=128, block_m=bm, block_k=128, num_warps=8, num_stages=4)
    # Programs that fit on an SM at once, from shared memory (stages of weight and activation tiles).
    w_bytes = 2 if dense else 0.5 if isinstance(weight, Int4Weight) else 1
    stage = cfg.block_n * cfg.block_k * w_bytes * (2 if swiglu else 1) + cfg.block_k * bm * 2
    per_sm = max(1, min(3, int((228 << 10) // (cfg.num_stages * stage + (8 << 10)))))
    slots = _sm_count(device) * per_sm
    tiles = triton.cdiv(n_out, cfg.block_n) * triton.cdiv(m, bm)
    if bm >= 128 or tiles >= 4 * slots or (dense and tiles >= slots // 2):
        return cfg
    return LinearConfig(**{**cfg.__dict__, "programs": slots})


_FITTED: dict[tuple, LinearConfig] = {}


def _smaller(cfg: LinearConfig, dense: bool) -> LinearConfig:
    """The next configuration down in shared memory: fewer stages, then narrower weight tiles, then shorter K."""
    if cfg.num_stages > 2:
        return dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
    if cfg.block_n > 32:
        return dataclasses.replace(cfg, block_n=cfg.block_n // 2)
    if dense and cfg.block_k > 32:
        return dataclasses.replace(cfg, block_k=cfg.block_k // 2)
    raise ValueError(f"config: no configuration below {cfg} to fall back to")


_RETIRED: list[torch.Tensor] = []  # outgrown workspaces that captured graphs may still use
_WORKSPACES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, floats: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-device partial-sum buffer and tile counters (zero between launches: the last program resets them).

    Shared by every launch on the device, so launches that split tiles must not run concurrently on two streams.
    A buffer that is outgrown stays allocated (`_RETIRED`): CUDA graphs captured with it keep writing to it. Growing
    during a capture is refused: size the workspace with a warm-up run first.
    """
    ws, cnt = _WORKSPACES.get(device, (None, None))
    grow_ws, grow_cnt = ws is None or ws.numel() < floats, cnt is None or cnt.numel() < tiles
    if (grow_ws or grow_cnt) and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"linear workspace: a launch needs {floats} floats / {tiles} counters during a CUDA-graph capture; "
            "run the step once before capturing"
        )
    if grow_ws:
        if ws is not None:
            _RETIRED.append(ws)
        ws = torch.empty(max(floats, 1 << 16), dtype=torch.float32, device=device)
    if grow_cnt:
        if cnt is not None:
            _RETIRED.append(cnt)
        cnt = torch.zeros(max(tiles, 1 << 12), dtype=torch.int32, device=device)
    _WORKSPACES[device] = (ws, cnt)
    return ws, cnt


def _check_tma(x: torch.Tensor, weight: Weight, fp8: bool, config: LinearConfig) -> None:
    """The TMA kernel's conditions on its operands and config (one-line errors naming what fails)."""
    facts = gpu_facts(x.device)
    if facts is not None and facts.capability < (9, 0):
        raise ValueError(f"config: tma needs the tensor memory accelerator (sm90+), not sm{facts.capability[0]}"
                         f"{facts.capability[1]}")  # fmt: skip
    if config.prequant_x or config.x_per_token or config.int4_chunk_dot or config.mma_sync:
        raise ValueError("config: tma is its own variant (FP8 weights quantize x per token); it takes no other")
    if isinstance(weight, DenseWeight):
        if x.dtype not in (torch.bfloat16, torch.float16) or weight.weight.dtype != x.dtype:
            raise ValueError(
                f"config: tma with dense weights needs bf16/fp16 x and weights alike, got x {x.dtype} and weight "
                f"{weight.weight.dtype}"
            )
    elif not (isinstance(weight, FP8ChannelWeight) and fp8 and x.dtype in (torch.bfloat16, torch.float16)):
        raise ValueError("config: tma takes dense weights, or FP8 per-channel weights with the FP8 dot and bf16/fp16 x")
    element = 1 if fp8 else x.element_size()
    if config.block_k * element > 256:
        raise ValueError(f"config: tma fetches at most 256 bytes of a row per tile, block_k {config.block_k} is more")


def _fp8_hardware(device: torch.device) -> bool:
    """Whether the GPU that kernels for `device` are built for has FP8 tensor cores and converts fp32 to e4m3 in
    hardware (sm89+)."""
    facts = gpu_facts(device)
    return facts is not None and facts.capability >= (8, 9)


DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def linear(
    x: torch.Tensor,
    weight: Weight,
    *,
    residual: torch.Tensor | None = None,
    swiglu: bool = False,
    out: torch.Tensor | None = None,
    fp8_dot: bool | None = None,
    config: LinearConfig | None = None,
    norm: RowNorm | None = None,
    gate: torch.Tensor | None = None,
    residual_in_place: bool = False,
) -> torch.Tensor:
    """y = x @ W^T (x [M, K] bf16/fp16/fp32), then + residual [M, N] or silu(gate) * up for W = [gate; up].

    fp8_dot: for FP8 weights, quantize x to FP8 per token and 128-input group and use an FP8 dot (default on
    sm89+), else decode the weights to x's dtype. Output dtype is x's; out, if given, must be [M, N_out] of it.
    norm: an RMSNorm of x's rows in front of the GEMM: its weight scales x's inputs in the prologue and 1 / RMS(x)
    the finished rows, before the epilogue (for INT4 weights the norm kernel runs first). gate [M, K]: the GEMM
    reads x * sigmoid(gate) (not together with norm). residual_in_place: the result is written into the residual's
    memory (each element of the residual is read by the program that then stores it).
    """
    if x.dim() != 2 or x.dtype not in DOT_DTYPES:
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
    fp8 = False
    if isinstance(weight, (FP8ChannelWeight, FP8BlockWeight)):
        fp8 = _fp8_hardware(x.device) if fp8_dot is None else fp8_dot
    # The INT4 loop reads x in planes and a pre-quantized x is read as it is: a prologue runs in front of them.
    tma = config is not None and config.tma
    if tma:
        _check_tma(x, weight, fp8, config)
    w4a8 = isinstance(weight, Int4Weight) and config is not None and config.prequant_x
    # x quantized to FP8 by a launch in front of the GEMM, which applies the gate and the norm on the way
    quantized_in_front = w4a8 or (fp8 and config is not None and (config.prequant_x or tma))
    prologue_in_front = isinstance(weight, Int4Weight) and not w4a8
    if config is not None and config.int4_chunk_dot and not isinstance(weight, Int4Weight):
        raise ValueError("config: int4_chunk_dot is a variant of the INT4 kernel, for INT4 weights")
    if (
        config is not None
        and config.x_per_token
        and not (config.prequant_x and fp8 and isinstance(weight, FP8ChannelWeight))
    ):
        raise ValueError("config: x_per_token needs prequant_x, FP8 per-channel weights and the FP8 dot")
    if w4a8 and (not _fp8_hardware(x.device) or x.dtype not in (torch.bfloat16, torch.float16)):
        raise ValueError("config: prequant_x with INT4 weights (W4A8) needs FP8 tensor cores and bf16/fp16 x")
    if gate is not None:
        if gate.shape != x.shape or gate.dtype != x.dtype or norm is not None:
            raise ValueError(
                f"gate: expected {x.dtype} {tuple(x.shape)} and no norm, got {gate.dtype} {tuple(gate.shape)}"
            )
        if prologue_in_front:
            x, gate = x * torch.sigmoid(gate), None
    if quantized_in_front and x.stride(1) != 1:
        x = x.contiguous()
    if norm is not None:
        if norm.weight.shape != (k,) or norm.weight.stride(0) != 1:
            raise ValueError(f"norm: expected a contiguous [{k}] weight, got {tuple(norm.weight.shape)}")
        if prologue_in_front:
            from .fused_ops import rms_norm

            x, norm = rms_norm(x, norm.weight, norm.eps, zero_centered=norm.zero_centered), None
    if out is None:
        out = residual if residual_in_place and residual is not None else x.new_empty(m, n_out)
    elif out.shape != (m, n_out) or out.dtype != x.dtype or out.stride(1) != 1:
        raise ValueError(
            f"out: expected {x.dtype} [{m}, {n_out}] with contiguous rows, got {out.dtype} {tuple(out.shape)}"
        )
    if m == 0 or n_out == 0:
        return out
    if config is None:
        # The default's shared-memory use depends on dtypes the table does not model (fp32 activations and
        # weights); a default that does not fit is shrunk until it does, once per shape class.
        key = (type(weight).__name__, _m_bucket(m), n_out, k, swiglu, x.dtype, x.device, gpu_facts(x.device))
        config = _FITTED.get(key) or default_config(weight, m, n_out, k, x.device, swiglu)
        while True:
            try:
                return linear(
                    x, weight, residual=residual, swiglu=swiglu, out=out, fp8_dot=fp8_dot, config=config, norm=norm,
                    gate=gate,
                )  # fmt: skip
            except OutOfResources:
                config = _FITTED[key] = _smaller(config, isinstance(weight, DenseWeight))

    s = z = None
    asym = False
    group = 128
    if isinstance(weight, DenseWeight):
        fmt, w = DENSE, weight.weight
    elif isinstance(weight, (FP8ChannelWeight, FP8BlockWeight)):
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
    # A chunk is one scale group, except for W8A8 per token and channel, whose scales apply once per tile.
    per_tile_scales = fmt == FP8_CHANNEL and (config.x_per_token or config.tma)
    if fmt != DENSE and not (config.block_k == 128 or (per_tile_scales and config.block_k % 128 == 0)):
        raise ValueError(
            f"config: block_k must be 128 for quantized weights (a multiple of 128 with x_per_token), "
            f"got {config.block_k}"
        )
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
    if tma:
        x_in = x
        xs = dummy
        if fp8:
            x, xs = quantize_x_fp8(x, per_row=True, norm=norm, gate=gate)
            norm = gate = None
        for name, t in (("x", x), ("weight", w)):  # what a TMA descriptor takes
            if t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
                raise ValueError(f"{name}: tma needs 16-byte aligned rows with contiguous columns, got strides "
                                 f"{t.stride()}")  # fmt: skip
        bm, bn, bk = config.block_m, config.block_n, config.block_k
        _linear_tma_kernel[(programs,)](
            TensorDescriptor(w, [n, k], [w.stride(0), 1], [bn, bk]),
            TensorDescriptor(x, [m, k], [x.stride(0), 1], [bm, bk]),
            s if s is not None else dummy, xs, xs.stride(0) if fp8 else 0,
            residual if residual is not None else dummy, out, ws, cnt,
            x_in, norm.weight if norm is not None else dummy, norm.eps if norm is not None else 0.0,
            gate if gate is not None else dummy,
            m, n_out, k, n_out if swiglu else 0,
            x_in.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
            gate.stride(0) if gate is not None else 0,
            m_tiles, chunks, total, slots,
            FP8=fp8, EPILOGUE=EPI_SWIGLU if swiglu else EPI_RESIDUAL if residual is not None else EPI_NONE,
            NORM=0 if norm is None else 2 if norm.zero_centered else 1, GATE=gate is not None,
            BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, num_warps=config.num_warps, num_stages=config.num_stages,
        )  # fmt: skip
        return out
    x_fp8 = config.prequant_x and (fp8 or fmt == INT4)
    xs = dummy
    dot_dtype = DOT_DTYPES[x.dtype]
    if x_fp8:
        x, xs = quantize_x_fp8(x, per_row=config.x_per_token, norm=norm, gate=gate)
        norm = gate = None
    with _dots_as_mma_sync(config.mma_sync):
        _linear_kernel[(programs,)](
            x, w, s if s is not None else dummy, z if z is not None else dummy,
            residual if residual is not None else dummy, out, ws, cnt,
            norm.weight if norm is not None else dummy, norm.eps if norm is not None else 0.0,
            gate if gate is not None else dummy, xs, xs.stride(0) if x_fp8 else 0,
            m, n_out, k, n_out if swiglu else 0,
            x.stride(0), x.stride(1), w.stride(0),
            s.stride(0) if s is not None else 0, z.stride(0) if z is not None else 0,
            residual.stride(0) if residual is not None else 0, out.stride(0),
            gate.stride(0) if gate is not None else 0, gate.stride(1) if gate is not None else 0,
            m_tiles, chunks, total, slots,
            FORMAT=fmt, FP8_DOT=fp8, X_FP8=x_fp8, X_PER_TOKEN=config.x_per_token,
            CHUNK_DOT=config.int4_chunk_dot, ASYM=asym, MMA_SYNC=config.mma_sync, HW_E4M3=_fp8_hardware(x.device),
            HW_DECODE=gpu_facts(x.device) is not None,
            EPILOGUE=EPI_SWIGLU if swiglu else EPI_RESIDUAL if residual is not None else EPI_NONE,
            NORM=0 if norm is None else 2 if norm.zero_centered else 1,
            GATE=gate is not None,
            GROUP_SIZE=group, DOT_DTYPE=dot_dtype,
            EVEN_N=n_out % config.block_n == 0, EVEN_K=k % config.block_k == 0,
            INPUT_PRECISION="ieee" if x.dtype == torch.float32 else None,
            BLOCK_N=config.block_n, BLOCK_M=config.block_m, BLOCK_K=config.block_k,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )  # fmt: skip
    return out
