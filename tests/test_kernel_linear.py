"""Weight formats (quantizers, GPTQ/AWQ converters, dequant) and the Triton linear kernel against its references.

CPU runs use Triton's interpreter with fp16/fp32 activations (FP8 weights take the bit-decode path there); bf16 and
the FP8 dot path are checked by the gpu-marked tests at real-ish shapes.
"""

from __future__ import annotations

import dataclasses
import itertools
import os

import pytest
import torch
import triton
import triton.language as tl

from dflash_compiler.codegen import weight_formats as wf
from dflash_compiler.codegen.triton import linear as linear_mod
from dflash_compiler.codegen.triton.linear import LinearConfig, linear
from dflash_compiler.errors import DFlashError
from dflash_compiler.models import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FORMATS = ("dense", "fp8_channel", "fp8_block", "int4_sym", "int4_asym")


def make_weight(fmt: str, n: int, k: int, gen: torch.Generator, dtype=torch.float16, device=DEVICE):
    w = torch.randn(n, k, generator=gen) * 0.05
    if fmt == "dense":
        return wf.DenseWeight(w.to(dtype)).to(device)
    if fmt == "fp8_channel":
        return wf.quantize_fp8_channel(w).to(device)
    if fmt == "fp8_block":
        return wf.quantize_fp8_block(w).to(device)
    return wf.quantize_int4(w, symmetric=fmt == "int4_sym").to(device)


def reference(x, weight, residual=None, swiglu=False, fp8_dot=False) -> torch.Tensor:
    """Dequantized weight, fp32 matmul, then the epilogue (with x quantized as the FP8 dot path does, if asked)."""
    xf = x.float()
    if fp8_dot:
        xf = wf.dequantize_fp8_activations(*wf.quantize_fp8_activations(x))
    y = xf @ weight.dequantize().T
    if swiglu:
        gate, up = y.chunk(2, dim=-1)
        y = ops.swiglu(gate, up)
    if residual is not None:
        y = y + residual.float()
    return y


def run_and_check(x, weight, *, residual=None, swiglu=False, config=None, fp8_dot=None, tol=None) -> torch.Tensor:
    n_out = weight.shape[0] // 2 if swiglu else weight.shape[0]
    out = torch.full((x.shape[0], n_out), float("nan"), dtype=x.dtype, device=x.device)
    y = linear(x, weight, residual=residual, swiglu=swiglu, out=out, config=config, fp8_dot=fp8_dot)
    assert y.data_ptr() == out.data_ptr()
    assert torch.isfinite(y).all(), "unwritten (NaN) outputs"
    if fp8_dot is None:  # the launcher's default: the FP8 dot on sm89+
        fp8_dot = x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9)
    quant_x = fp8_dot and isinstance(weight, (wf.FP8ChannelWeight, wf.FP8BlockWeight))
    ref = reference(x, weight, residual, swiglu, fp8_dot=quant_x)
    if tol is None:
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[x.dtype]
    err = ((y.float() - ref).norm() / ref.norm()).item()
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"
    return y


# ---- weight formats -------------------------------------------------------------------------------------------


def _gptq_pack_loops(q_kn: torch.Tensor, zeros_gn: torch.Tensor, v1: bool):
    """GPTQ packing written out word by word, as AutoGPTQ's pack() does (independent of weight_formats)."""
    k, n = q_kn.shape
    qweight = torch.zeros(k // 8, n, dtype=torch.int64)
    for r in range(k // 8):
        for j in range(8):
            qweight[r] |= q_kn[8 * r + j] << (4 * j)
    z = zeros_gn - (1 if v1 else 0)
    qzeros = torch.zeros(z.shape[0], n // 8, dtype=torch.int64)
    for c in range(n // 8):
        for j in range(8):
            qzeros[:, c] |= z[:, 8 * c + j] << (4 * j)
    return wf._to_int32(qweight), wf._to_int32(qzeros)


def _awq_pack_loops(values: torch.Tensor) -> torch.Tensor:
    """AWQ packing with its order map [0, 2, 4, 6, 1, 3, 5, 7], as AutoAWQ's WQLinear_GEMM does."""
    r, n = values.shape
    out = torch.zeros(r, n // 8, dtype=torch.int64)
    for c in range(n // 8):
        for i, col in enumerate(wf.AWQ_ORDER):
            out[:, c] |= values[:, 8 * c + col] << (4 * i)
    return wf._to_int32(out)


def test_int4_layout_bits():
    q = torch.randint(0, 16, (3, 300))
    w = wf.Int4Weight.from_unpacked(q, torch.ones(3, 3, dtype=torch.float16), None, 128)
    assert w.qweight.shape == (3, 48)
    words = w.qweight.to(torch.int64) & 0xFFFFFFFF
    for n, run, word, j, h in [(0, 0, 0, 0, 0), (1, 0, 5, 3, 1), (2, 1, 15, 2, 1), (0, 2, 2, 1, 0)]:
        k = 128 * run + 32 * j + 2 * word + h
        want = int(q[n, k]) if k < 300 else 0
        assert (int(words[n, 16 * run + word]) >> (16 * h + 4 * j)) & 0xF == want
    assert torch.equal(w.unpack(), q)


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_calibrated_clipping(symmetric):
    """With importance, each group takes the clipping (of CLIP_RATIOS) whose importance-weighted rounding error is
    smallest: never worse than round-to-nearest over the full range, better where outliers stretch the range."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(40, 392, generator=gen)
    w[::3, 5] *= 12  # an outlier in a third of the rows' first group
    importance = torch.rand(392, generator=gen) + 0.05
    importance[5] = 1e-4  # ... on an input the activations barely use

    def weighted_error(q):  # per (row, group)
        err = (q.dequantize() - w) ** 2 * importance
        return torch.nn.functional.pad(err, (0, 4 * 128 - 392)).view(40, 4, 128).sum(2)

    rtn = wf.quantize_int4(w, symmetric=symmetric)
    cal = wf.quantize_int4(w, symmetric=symmetric, importance=importance)
    assert (weighted_error(cal) <= weighted_error(rtn) * (1 + 1e-6)).all()
    assert weighted_error(cal)[::3, 0].sum() < 0.75 * weighted_error(rtn)[::3, 0].sum()
    for g in range(4):  # each group's scale is one of the clippings of its full range
        chunk = w[:, 128 * g : 128 * (g + 1)]
        low, high = chunk.amin(1).clamp_max(0), chunk.amax(1).clamp_min(0)
        full = 2 * torch.maximum(-low, high) / 15 if symmetric else (high - low) / 15
        ratios = torch.tensor(wf.CLIP_RATIOS)
        candidates = (full[:, None] * ratios[None, :]).half().float()
        assert (cal.scales[g].float()[:, None] == candidates).any(1).all()
    with pytest.raises(ValueError, match=r"importance: expected \[392\]"):
        wf.quantize_int4(w, importance=torch.ones(10))


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_quantizer(symmetric):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(24, 392, generator=gen)
    q = wf.quantize_int4(w, symmetric=symmetric)
    assert q.symmetric == symmetric and q.scales.shape == (4, 24) and q.scales.dtype == torch.float16
    # reference, group by group: the range [min(w, 0), max(w, 0)] in 15 steps of an fp16 scale, zero 8 when
    # symmetric (the step then covers [-amax, amax]), nearest level
    for g in range(4):
        chunk = w[:, 128 * g : 128 * (g + 1)]
        low, high = chunk.amin(1).clamp_max(0), chunk.amax(1).clamp_min(0)
        if symmetric:
            scale = (2 * torch.maximum(-low, high) / 15).half().float()
            zero = torch.full_like(scale, 8.0)
        else:
            scale = ((high - low) / 15).half().float()
            zero = torch.round(-low / scale).clamp(0, 15)
        levels = torch.round(chunk / scale[:, None] + zero[:, None]).clamp(0, 15)
        assert torch.equal(q.scales[g].float(), scale)
        assert torch.equal(q.unpack()[:, 128 * g : 128 * (g + 1)].float(), levels)
        deq = q.dequantize()[:, 128 * g : 128 * (g + 1)]
        torch.testing.assert_close(deq, (levels - zero[:, None]) * scale[:, None], rtol=1e-6, atol=1e-7)
        # round to nearest: within half a step, give or take the fp16 rounding of the scale (7.5 steps x 2^-11)
        err = (deq - chunk).abs() / scale[:, None]
        assert float(err.max()) <= 0.5 + 7.5 * 2**-11


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("v1", [True, False])
def test_gptq_round_trip(symmetric, v1):
    gen = torch.Generator().manual_seed(2)
    q = wf.quantize_int4(torch.randn(24, 256, generator=gen), symmetric=symmetric)
    packed = q.to_gptq(v1=v1)
    qweight, qzeros = _gptq_pack_loops(q.unpack().T, q.zeros(), v1)
    assert torch.equal(packed["qweight"], qweight) and torch.equal(packed["qzeros"], qzeros)
    back = wf.Int4Weight.from_gptq(qweight, qzeros, packed["scales"], None, v1=v1)
    assert back.symmetric == symmetric
    assert torch.equal(back.dequantize(), q.dequantize())
    trivial = torch.arange(256, dtype=torch.int32) // 128
    assert torch.equal(wf.Int4Weight.from_gptq(qweight, qzeros, packed["scales"], trivial, v1=v1).qweight, q.qweight)


def test_gptq_refuses_act_order_and_bad_zero():
    gen = torch.Generator().manual_seed(3)
    q = wf.quantize_int4(torch.randn(16, 256, generator=gen), symmetric=False)
    packed = q.to_gptq()
    g_idx = torch.randperm(256, generator=gen) // 128
    with pytest.raises(DFlashError, match="act-order"):
        wf.Int4Weight.from_gptq(packed["qweight"], packed["qzeros"], packed["scales"], g_idx)
    corrupt = packed["qzeros"].clone()
    corrupt[0, 0] |= 0xF  # stored -1: a v1 zero of 0
    with pytest.raises(DFlashError, match="qzeros"):
        wf.Int4Weight.from_gptq(packed["qweight"], corrupt, packed["scales"])
    with pytest.raises(DFlashError, match="scales"):
        wf.Int4Weight.from_gptq(packed["qweight"], packed["qzeros"], packed["scales"][:1])


def test_awq_round_trip():
    gen = torch.Generator().manual_seed(4)
    q = wf.quantize_int4(torch.randn(40, 384, generator=gen), symmetric=False)
    packed = q.to_awq()
    assert torch.equal(packed["qweight"], _awq_pack_loops(q.unpack().T.contiguous()))
    assert torch.equal(packed["qzeros"], _awq_pack_loops(q.zeros()))
    back = wf.Int4Weight.from_awq(packed["qweight"], packed["qzeros"], packed["scales"])
    assert torch.equal(back.dequantize(), q.dequantize())
    # The interleave matters: the same words read in natural nibble order are another matrix.
    natural = wf._unpack_nibbles(packed["qweight"], 1).flatten(1)
    assert not torch.equal(natural, q.unpack().T)


def test_fp8_formats():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(200, 300, generator=gen)
    ch = wf.quantize_fp8_channel(w)
    assert ch.scale.shape == (200,) and ((ch.dequantize() - w).norm() / w.norm()) < 0.04
    blk = wf.quantize_fp8_block(w)
    assert blk.scale_inv.shape == (2, 3) and ((blk.dequantize() - w).norm() / w.norm()) < 0.04
    # Block dequant is fp8 * scale_inv of the block.
    assert blk.dequantize()[130, 260] == blk.qweight[130, 260].float() * blk.scale_inv[1, 2]
    loaded = wf.FP8BlockWeight.from_checkpoint(blk.qweight, blk.scale_inv.to(torch.bfloat16))
    assert loaded.scale_inv.dtype == torch.float32
    with pytest.raises(DFlashError, match="weight_scale_inv"):
        wf.FP8BlockWeight.from_checkpoint(blk.qweight, blk.scale_inv[:1])
    xq, xs = wf.quantize_fp8_activations(torch.randn(3, 300, generator=gen))
    assert xq.dtype == torch.float8_e4m3fn and xs.shape == (3, 3)


@pytest.mark.parametrize("fmt", FORMATS[1:])
def test_quantizers_by_row_chunks_and_row_slices(fmt, monkeypatch):
    """Large matrices are quantized in row chunks with the same result; rows() slices every format consistently."""
    whole = make_weight(fmt, 300, 256, torch.Generator().manual_seed(6), device="cpu")
    monkeypatch.setattr(wf, "ROW_CHUNK", 128)
    chunked = make_weight(fmt, 300, 256, torch.Generator().manual_seed(6), device="cpu")
    assert torch.equal(whole.dequantize(), chunked.dequantize())
    assert torch.equal(whole.rows(128, 300).dequantize(), whole.dequantize()[128:])


# ---- kernel (interpreter on CPU) -------------------------------------------------------------------------------


def _config(fmt: str, split: bool, block_n: int = 16) -> LinearConfig:
    # Dense chunks of 64 give several chunks per tile; quantized formats chunk by 128 (their group).
    bk = 64 if fmt == "dense" else 128
    return LinearConfig(
        block_n=block_n, block_m=16, block_k=bk, num_warps=4, num_stages=2, programs=4 if split else None
    )


@pytest.mark.parametrize("split", [False, True], ids=["nosplit", "split"])
@pytest.mark.parametrize("m", [1, 3, 16, 33])
@pytest.mark.parametrize("fmt", FORMATS)
def test_linear(fmt, m, split):
    gen = torch.Generator().manual_seed(10 + m)
    weight = make_weight(fmt, 37, 328, gen)
    x = torch.randn(m, 328, generator=gen).to(DEVICE, torch.float16)
    run_and_check(x, weight, config=_config(fmt, split))


@pytest.mark.parametrize("split", [False, True], ids=["nosplit", "split"])
@pytest.mark.parametrize("epilogue", ["residual", "swiglu"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_epilogues(fmt, epilogue, split):
    gen = torch.Generator().manual_seed(20)
    n = 42 if epilogue == "swiglu" else 29
    weight = make_weight(fmt, n, 200, gen)
    x = torch.randn(3, 200, generator=gen).to(DEVICE, torch.float16)
    residual = torch.randn(3, n, generator=gen).to(DEVICE, torch.float16) if epilogue == "residual" else None
    run_and_check(x, weight, residual=residual, swiglu=epilogue == "swiglu", config=_config(fmt, split))


@pytest.mark.parametrize("config", [
    LinearConfig(block_n=16, block_m=16, num_stages=2),
    LinearConfig(block_n=16, block_m=16, num_stages=2, split_k=3),
    LinearConfig(block_n=16, block_m=16, block_k=128, num_stages=2, programs=7),
], ids=["tiles", "split", "shared_tiles"])  # fmt: skip
@pytest.mark.parametrize("fmt", ["dense", "fp8_block", "int4_asym"])
def test_residual_in_place_writes_into_the_residual(fmt, config):
    """residual_in_place: the residual's tensor holds x @ W^T + residual, whichever program finishes a tile."""
    gen = torch.Generator().manual_seed(23)
    weight = make_weight(fmt, 45, 1100, gen)
    x = torch.randn(5, 1100, generator=gen).to(DEVICE, torch.float16)
    residual = torch.randn(5, 45, generator=gen).to(DEVICE, torch.float16)
    quant_x = fmt == "fp8_block" and x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9)
    want = reference(x, weight, residual, fp8_dot=quant_x)
    got = linear(x, weight, residual=residual, config=config, residual_in_place=True)
    assert got.data_ptr() == residual.data_ptr()
    err = ((got.float() - want).norm() / want.norm()).item()
    assert err < 2e-3, f"relative error {err:.2e}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_whole_tiles(fmt):
    """N and K multiples of the tile: the launcher drops the edge masks."""
    gen = torch.Generator().manual_seed(25)
    weight = make_weight(fmt, 64, 256, gen)
    x = torch.randn(5, 256, generator=gen).to(DEVICE, torch.float16)
    run_and_check(x, weight, config=LinearConfig(block_n=16, block_m=16, block_k=128, num_stages=2, programs=3))
    run_and_check(x, weight, config=LinearConfig(block_n=32, block_m=16, block_k=128, num_stages=2))


@pytest.mark.parametrize("split", [False, True], ids=["nosplit", "split"])
@pytest.mark.parametrize("epilogue", ["none", "residual", "swiglu"])
@pytest.mark.parametrize("fmt", ["int4_sym", "int4_asym"])
def test_int4_one_dot_per_chunk(fmt, epilogue, split):
    """int4_chunk_dot: the four planes as one operand in input order (a permutation gone wrong pairs weights with
    the wrong inputs), K ending inside a chunk, fp16 and fp32 activations."""
    gen = torch.Generator().manual_seed(28)
    n = 42 if epilogue == "swiglu" else 37
    weight = make_weight(fmt, n, 328, gen)
    for dtype in (torch.float16, torch.float32):
        x = torch.randn(5, 328, generator=gen).to(DEVICE, dtype)
        n_out = n // 2 if epilogue == "swiglu" else n
        residual = torch.randn(5, n_out, generator=gen).to(DEVICE, dtype) if epilogue == "residual" else None
        config = dataclasses.replace(_config(fmt, split), int4_chunk_dot=True)
        run_and_check(x, weight, residual=residual, swiglu=epilogue == "swiglu", config=config)


def test_mma_sync_runs_every_format_and_leaves_the_environment_as_it_was(monkeypatch):
    """mma_sync compiles with Triton's DISABLE_MMA_V3 set for the launch only (the interpreter ignores it): the
    reference's result for each format, and the variable restored (unset, or its earlier value)."""
    gen = torch.Generator().manual_seed(70)
    x = torch.randn(5, 256, generator=gen).to(DEVICE, torch.float16)
    for before in (None, "0"):
        if before is None:
            monkeypatch.delenv("DISABLE_MMA_V3", raising=False)
        else:
            monkeypatch.setenv("DISABLE_MMA_V3", before)
        for fmt in FORMATS:
            config = LinearConfig(block_n=32, block_m=16, num_stages=2, mma_sync=True, split_k=2)
            run_and_check(x, make_weight(fmt, 96, 256, gen), config=config)
            assert os.environ.get("DISABLE_MMA_V3") == before


def test_int4_chunk_dot_is_for_int4_weights():
    x = torch.randn(4, 256).to(DEVICE, torch.float16)
    with pytest.raises(ValueError, match="int4_chunk_dot is a variant of the INT4 kernel"):
        linear(x, make_weight("dense", 32, 256, torch.Generator().manual_seed(29)),
               config=LinearConfig(block_n=16, int4_chunk_dot=True))  # fmt: skip


@pytest.mark.parametrize("epilogue", ["residual", "swiglu"])
@pytest.mark.parametrize("fmt", ["dense", "int4_asym"])
def test_linear_tiles_split_among_many_programs(fmt, epilogue):
    """One output tile shared by 7 programs (5 with SwiGLU): the last to arrive sums every parked partial (a loop
    the compiler unrolls four slots at a time, with a remainder)."""
    gen = torch.Generator().manual_seed(27)
    n = 32 if epilogue == "swiglu" else 16
    weight = make_weight(fmt, n, 1100, gen)
    x = torch.randn(4, 1100, generator=gen).to(DEVICE, torch.float16)
    residual = torch.randn(4, n, generator=gen).to(DEVICE, torch.float16) if epilogue == "residual" else None
    programs = 5 if epilogue == "swiglu" else 7
    config = LinearConfig(block_n=16, block_m=16, block_k=64 if fmt == "dense" else 128, num_stages=2,
                          programs=programs)  # fmt: skip
    run_and_check(x, weight, residual=residual, swiglu=epilogue == "swiglu", config=config)


@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_fp32_activations(fmt):
    gen = torch.Generator().manual_seed(30)
    weight = make_weight(fmt, 21, 136, gen, dtype=torch.float32)
    x = torch.randn(5, 136, generator=gen).to(DEVICE)
    run_and_check(x, weight, config=_config(fmt, True))


@pytest.mark.parametrize("split", [False, True], ids=["nosplit", "split"])
@pytest.mark.parametrize("epilogue", ["none", "residual", "swiglu"])
@pytest.mark.parametrize("zero_centered", [False, True])
@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_with_fused_rms_norm(fmt, zero_centered, epilogue, split):
    """y = rms_norm(x) @ W^T (+ epilogue): the norm weight scales the inputs, 1 / RMS the finished rows (shared
    tiles included); INT4 runs the norm kernel first. Checked against the norm, then the GEMM, in fp32."""
    gen = torch.Generator().manual_seed(70)
    n, k, m = (42 if epilogue == "swiglu" else 29), 200, 5
    weight = make_weight(fmt, n, k, gen)
    x = (torch.randn(m, k, generator=gen) * 4).to(DEVICE, torch.float16)  # far from unit RMS
    g = (torch.randn(k, generator=gen) * 0.3 + (0 if zero_centered else 1)).to(DEVICE, torch.float16)
    n_out = n // 2 if epilogue == "swiglu" else n
    residual = torch.randn(m, n_out, generator=gen).to(DEVICE, torch.float16) if epilogue == "residual" else None
    out = torch.full((m, n_out), float("nan"), dtype=x.dtype, device=x.device)
    norm = linear_mod.RowNorm(g, 1e-6, zero_centered)
    y = linear(x, weight, residual=residual, swiglu=epilogue == "swiglu", out=out, config=_config(fmt, split),
               fp8_dot=False, norm=norm)  # fmt: skip
    assert y.data_ptr() == out.data_ptr() and torch.isfinite(y).all()
    normed = ops.rms_norm(x, g, 1e-6, zero_centered)
    ref = reference(normed, weight, residual, epilogue == "swiglu")
    err = ((y.float() - ref).norm() / ref.norm()).item()
    assert err < 3e-3, f"relative error {err:.2e}"
    with pytest.raises(ValueError, match="norm:"):
        linear(x, weight, norm=linear_mod.RowNorm(g[:-1], 1e-6))


@pytest.mark.parametrize("split", [False, True], ids=["nosplit", "split"])
@pytest.mark.parametrize("epilogue", ["none", "residual"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_with_fused_sigmoid_gate(fmt, epilogue, split):
    """y = (x * sigmoid(gate)) @ W^T (+ residual), the gate read with its own (sliced) strides; INT4 applies the
    gate in front of its loop. Checked against the gated input, then the GEMM, in fp32."""
    gen = torch.Generator().manual_seed(71)
    n, k, m = 29, 200, 5
    weight = make_weight(fmt, n, k, gen)
    x = torch.randn(m, k, generator=gen).to(DEVICE, torch.float16)
    wide = (torch.randn(m, 2 * k, generator=gen) * 2).to(DEVICE, torch.float16)
    gate = wide[:, k:]  # a column slice, as the gated query's split leaves it
    residual = torch.randn(m, n, generator=gen).to(DEVICE, torch.float16) if epilogue == "residual" else None
    out = torch.full((m, n), float("nan"), dtype=x.dtype, device=x.device)
    y = linear(x, weight, residual=residual, out=out, config=_config(fmt, split), fp8_dot=False, gate=gate)
    assert y.data_ptr() == out.data_ptr() and torch.isfinite(y).all()
    ref = reference(x.float() * torch.sigmoid(gate.float()), weight, residual)
    err = ((y.float() - ref).norm() / ref.norm()).item()
    assert err < 3e-3, f"relative error {err:.2e}"
    with pytest.raises(ValueError, match="gate:"):
        linear(x, weight, gate=gate[:, :-1])


TMA_GRIDS = {"tile": {}, "split": {"split_k": 3}, "stream-k": {"programs": 7}}


@pytest.mark.parametrize("grid", TMA_GRIDS)
@pytest.mark.parametrize("epilogue", ["none", "residual", "swiglu"])
@pytest.mark.parametrize("m", [1, 5, 17])
def test_tma_linear_dense(m, epilogue, grid):
    """The TMA kernel (tiles fetched whole, zero-filled past N, M and K): odd N, K ending inside a chunk, M over
    one tile, every epilogue, whole, split and stream-K tiles; NaN-poisoned outputs must all be written."""
    gen = torch.Generator().manual_seed(80 + m)
    n = 42 if epilogue == "swiglu" else 37
    weight = make_weight("dense", n, 200, gen)
    x = torch.randn(m, 200, generator=gen).to(DEVICE, torch.float16)
    n_out = n // 2 if epilogue == "swiglu" else n
    residual = torch.randn(m, n_out, generator=gen).to(DEVICE, torch.float16) if epilogue == "residual" else None
    config = LinearConfig(block_n=16, block_m=16, block_k=64, num_stages=2, tma=True, **TMA_GRIDS[grid])
    run_and_check(x, weight, residual=residual, swiglu=epilogue == "swiglu", config=config)


@pytest.mark.parametrize("grid", TMA_GRIDS)
def test_tma_linear_with_fused_norm_and_gate(grid):
    """The TMA kernel scales its x tiles by the RMSNorm weight (1 / RMS on the finished rows, shared tiles
    included) or by sigmoid(gate), as the pointer kernel does."""
    gen = torch.Generator().manual_seed(85)
    n, k, m = 29, 200, 5
    weight = make_weight("dense", n, k, gen)
    x = (torch.randn(m, k, generator=gen) * 4).to(DEVICE, torch.float16)
    config = LinearConfig(block_n=16, block_m=16, block_k=64, num_stages=2, tma=True, **TMA_GRIDS[grid])
    for zero_centered in (False, True):
        g = (torch.randn(k, generator=gen) * 0.3 + (0 if zero_centered else 1)).to(DEVICE, torch.float16)
        out = torch.full((m, n), float("nan"), dtype=x.dtype, device=x.device)
        y = linear(x, weight, out=out, config=config, norm=linear_mod.RowNorm(g, 1e-6, zero_centered))
        ref = reference(ops.rms_norm(x, g, 1e-6, zero_centered), weight)
        err = ((y.float() - ref).norm() / ref.norm()).item()
        assert torch.isfinite(y).all() and err < 3e-3, f"norm (zero_centered={zero_centered}): {err:.2e}"
    gate = (torch.randn(m, 2 * k, generator=gen) * 2).to(DEVICE, torch.float16)[:, k:]
    out = torch.full((m, n), float("nan"), dtype=x.dtype, device=x.device)
    y = linear(x, weight, out=out, config=config, gate=gate)
    ref = reference(x.float() * torch.sigmoid(gate.float()), weight)
    err = ((y.float() - ref).norm() / ref.norm()).item()
    assert torch.isfinite(y).all() and err < 3e-3, f"gate: {err:.2e}"


@pytest.mark.parametrize("epilogue", ["none", "residual", "swiglu"])
def test_tma_linear_fp8_channel_quantizes_x_per_token(epilogue):
    """FP8 per-channel weights through the TMA kernel: x quantized in front with one scale per token, the row and
    token scales applied once per tile share; against the reference on x quantized the same way."""
    gen = torch.Generator().manual_seed(86)
    n, k, m = (42 if epilogue == "swiglu" else 37), 384, 5
    weight = make_weight("fp8_channel", n, k, gen)
    x = (torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 4).to(DEVICE, torch.float16)
    n_out = n // 2 if epilogue == "swiglu" else n
    residual = torch.randn(m, n_out, generator=gen).to(DEVICE, torch.float16) if epilogue == "residual" else None
    xq = wf.dequantize_fp8_activations(*wf.quantize_fp8_activations(x, group=k), group=k)
    ref = reference(xq, weight, residual, epilogue == "swiglu")
    for block_k, grid in itertools.product((128, 256), TMA_GRIDS.values()):
        config = LinearConfig(block_n=16, block_m=16, block_k=block_k, num_stages=2, tma=True, **grid)
        out = torch.full((m, n_out), float("nan"), dtype=x.dtype, device=DEVICE)
        y = linear(x, weight, residual=residual, swiglu=epilogue == "swiglu", out=out, fp8_dot=True, config=config)
        err = ((y.float() - ref).norm() / ref.norm()).item()
        assert torch.isfinite(y).all() and err < 3e-3, f"block_k {block_k}, {grid}: relative error {err:.2e}"


def test_tma_linear_refuses_what_it_cannot_fetch():
    gen = torch.Generator().manual_seed(87)
    x = torch.randn(4, 256, generator=gen).to(DEVICE, torch.float16)
    tma = LinearConfig(block_n=16, block_m=16, block_k=64, num_stages=2, tma=True)
    cases = [
        (make_weight("int4_sym", 32, 256, gen), dataclasses.replace(tma, block_k=128), "tma takes dense weights"),
        (make_weight("fp8_block", 32, 256, gen), dataclasses.replace(tma, block_k=128), "tma takes dense weights"),
        (make_weight("fp8_channel", 32, 256, gen), dataclasses.replace(tma, block_k=128, prequant_x=True),
         "tma is its own variant"),
        (make_weight("dense", 32, 256, gen, dtype=torch.float32), tma, "tma with dense weights needs bf16/fp16"),
        (make_weight("dense", 32, 256, gen), dataclasses.replace(tma, block_k=256), "at most 256 bytes"),
    ]  # fmt: skip
    for weight, config, message in cases:
        with pytest.raises(ValueError, match=f"^config: .*{message}"):
            linear(x, weight, fp8_dot=True, config=config)
    odd = torch.randn(4, 260, generator=gen).to(DEVICE, torch.float16)[:, :252]  # rows of 520 bytes
    with pytest.raises(ValueError, match="^x: tma needs 16-byte aligned rows"):
        linear(odd, make_weight("dense", 32, 252, gen), config=tma)
    x248 = torch.randn(4, 248, generator=gen).to(DEVICE, torch.float16)  # rows of 496 bytes
    sliced = wf.DenseWeight(make_weight("dense", 32, 252, gen).weight[:, :248])  # rows 504 bytes apart
    with pytest.raises(ValueError, match="^weight: tma needs 16-byte aligned rows"):
        linear(x248, sliced, config=tma)
    from dflash_compiler.codegen.triton.device import GpuFacts, compiling_for

    with compiling_for(GpuFacts((8, 0), 108)), pytest.raises(ValueError, match="^config: tma needs .* not sm80$"):
        linear(x, make_weight("dense", 32, 256, gen), config=tma)


# bf16 on the GPU only: Triton's interpreter mishandles bf16 casts
HALF_DTYPES = [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("per_row", [False, True], ids=["per_group", "per_row"])
@pytest.mark.parametrize("prologue", ["norm", "zero_centered_norm", "gate", "gate_then_norm"])
def test_quantize_x_applies_the_ops_in_front_of_the_gemm(prologue, per_row, dtype):
    """quantize_x_fp8 with norm / gate gives the values of those ops run in front and then quantized (one launch
    instead of two or three): nearly every FP8 byte equal, the rest one step apart where a sum's order differs."""
    from dflash_compiler.codegen.triton.fused_ops import rms_norm

    gen = torch.Generator().manual_seed(89)
    m, k = 5, 1352  # K over one 1024-wide block and not a multiple of 128
    x = (torch.randn(m, k, generator=gen) * 4).to(DEVICE, dtype)
    zero_centered = prologue == "zero_centered_norm"
    g = (torch.randn(k, generator=gen) * 0.3 + (0 if zero_centered else 1)).to(DEVICE, dtype)
    gate = (torch.randn(m, 2 * k, generator=gen) * 2).to(DEVICE, dtype)[:, k:] if "gate" in prologue else None
    norm = linear_mod.RowNorm(g, 1e-6, zero_centered) if "norm" in prologue else None
    want = x if gate is None else x * torch.sigmoid(gate)
    if norm is not None:
        want = rms_norm(want, g, 1e-6, zero_centered=zero_centered)
    q, scales = linear_mod.quantize_x_fp8(x, per_row, norm=norm, gate=gate)
    q0, scales0 = linear_mod.quantize_x_fp8(want, per_row)
    group = k if per_row else 128
    got = wf.dequantize_fp8_activations(q, scales, group=group)
    ref = wf.dequantize_fp8_activations(q0, scales0, group=group)
    same = (q.view(torch.uint8) == q0.view(torch.uint8)).float().mean().item()
    err = ((got - ref).norm() / ref.norm()).item()
    assert same > 0.99 and err < 1e-2, f"{same:.4f} of the bytes equal, relative error {err:.2e}"
    assert torch.allclose(scales, scales0, rtol=1e-3)


@pytest.mark.parametrize("variant", ["prequant", "tma"])
def test_fp8_linears_quantizing_x_in_front_apply_norm_and_gate_there(variant):
    """FP8 weights with x quantized in front (per group, or per token for the TMA kernel): the fused norm and gate
    give the product of the normed / gated x, as the ops run separately would."""
    gen = torch.Generator().manual_seed(90)
    m, n, k = 5, 37, 384
    weight = make_weight("fp8_channel", n, k, gen)
    x = (torch.randn(m, k, generator=gen) * 4).to(DEVICE, torch.float16)
    g = (torch.randn(k, generator=gen) * 0.3 + 1).to(DEVICE, torch.float16)
    gate = (torch.randn(m, k, generator=gen) * 2).to(DEVICE, torch.float16)
    extra = {"tma": True, "block_k": 256} if variant == "tma" else {"prequant_x": True}
    config = LinearConfig(block_n=16, block_m=16, num_stages=2, programs=5, **extra)
    per_token = variant == "tma"
    for kwargs, xin in (
        ({"norm": linear_mod.RowNorm(g, 1e-6)}, ops.rms_norm(x, g, 1e-6)),
        ({"gate": gate}, x * torch.sigmoid(gate)),
    ):
        xq = wf.dequantize_fp8_activations(*wf.quantize_fp8_activations(xin, group=k if per_token else 128),
                                           group=k if per_token else 128)  # fmt: skip
        ref = reference(xq, weight)
        out = torch.full((m, n), float("nan"), dtype=x.dtype, device=DEVICE)
        y = linear(x, weight, out=out, fp8_dot=True, config=config, **kwargs)
        err = ((y.float() - ref).norm() / ref.norm()).item()
        assert torch.isfinite(y).all() and err < 1e-2, f"{list(kwargs)}: relative error {err:.2e}"


def test_linear_default_config_and_repeat():
    """The heuristic config runs, and a split launch leaves its counters ready for the next (same result)."""
    gen = torch.Generator().manual_seed(40)
    weight = make_weight("int4_asym", 40, 512, gen)
    x = torch.randn(2, 512, generator=gen).to(DEVICE, torch.float16)
    run_and_check(x, weight)
    cfg = LinearConfig(block_n=16, block_m=16, block_k=128, num_stages=2, programs=5)
    first = run_and_check(x, weight, config=cfg)
    assert torch.equal(first, run_and_check(x, weight, config=cfg))


def test_linear_validation():
    gen = torch.Generator().manual_seed(50)
    weight = make_weight("int4_sym", 16, 256, gen)
    x = torch.randn(2, 256, generator=gen).to(DEVICE, torch.float16)
    with pytest.raises(ValueError, match="x:"):
        linear(x[:, :128], weight)
    with pytest.raises(ValueError, match="out:"):
        linear(x, weight, out=torch.empty(2, 15, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="config:"):
        linear(x, weight, config=LinearConfig(block_k=64))
    with pytest.raises(ValueError, match="residual:"):
        linear(x, weight, residual=torch.empty(2, 8, dtype=torch.float16, device=DEVICE))


# ---- GPU: bf16 and FP8 numerics at real-ish shapes --------------------------------------------------------------

GPU_SHAPES = [(1, 5120, 6144), (16, 2048, 17408), (64, 3072, 5120)]


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", GPU_SHAPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_bf16(fmt, m, n, k):
    gen = torch.Generator().manual_seed(60)
    weight = make_weight(fmt, n, k, gen, dtype=torch.bfloat16)
    x = torch.randn(m, k, generator=gen).to(DEVICE, torch.bfloat16)
    run_and_check(x, weight, fp8_dot=False)


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [*GPU_SHAPES, (256, 2048, 5200)])
@pytest.mark.parametrize("fmt", ["int4_sym", "int4_asym"])
def test_gpu_int4_one_dot_per_chunk_bf16(fmt, m, n, k):
    """int4_chunk_dot with bf16 activations on the tensor cores, from one row to 256 (64- and 128-row tiles), whole
    tiles and stream-K."""
    gen = torch.Generator().manual_seed(62)
    weight = make_weight(fmt, n, k, gen, dtype=torch.bfloat16)
    x = torch.randn(m, k, generator=gen).to(DEVICE, torch.bfloat16)
    bm = 16 if m <= 16 else 64 if m <= 64 else 128
    for grid in ({"programs": 132}, {}):
        cfg = LinearConfig(block_n=128 if bm < 128 else 64, block_m=bm, num_warps=4 if bm == 16 else 8, num_stages=3,
                           int4_chunk_dot=True, **grid)  # fmt: skip
        run_and_check(x, weight, config=cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("epilogue", ["none", "residual", "swiglu"])
@pytest.mark.parametrize("m,n,k", [(16, 2048, 5200), (40, 1024, 5120)])
@pytest.mark.parametrize("variant", ["dense", "fp8_channel", "fp8_block", "fp8_prequant", "int4_sym", "int4_asym",
                                     "int4_chunk_dot", "int4_w4a8"])  # fmt: skip
def test_gpu_mma_sync(variant, m, n, k, epilogue):
    """mma_sync (the dots as mma.sync instead of wgmma on Hopper) for every format and variant, through stream-K,
    split and whole tiles: the reference's result; the same config without it gives the same up to rounding."""
    gen = torch.Generator().manual_seed(69)
    fmt = {"fp8_prequant": "fp8_channel", "int4_chunk_dot": "int4_sym", "int4_w4a8": "int4_sym"}.get(variant, variant)
    fp8_dot = fmt.startswith("fp8") and torch.cuda.get_device_capability() >= (8, 9)
    if variant in ("fp8_prequant", "int4_w4a8") and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores: sm89+")
    weight = make_weight(fmt, 2 * n if epilogue == "swiglu" else n, k, gen, dtype=torch.bfloat16)
    x = torch.randn(m, k, generator=gen).to(DEVICE, torch.bfloat16)
    residual = torch.randn(m, n, generator=gen).to(DEVICE, torch.bfloat16) if epilogue == "residual" else None
    kw = {"residual": residual, "swiglu": epilogue == "swiglu"}
    bm = 16 if m <= 16 else 64
    for grid in ({"programs": 132}, {"split_k": 3}, {}):
        cfg = LinearConfig(block_n=64, block_m=bm, num_warps=4 if bm == 16 else 8, num_stages=3, mma_sync=True,
                           prequant_x=variant in ("fp8_prequant", "int4_w4a8"),
                           int4_chunk_dot=variant == "int4_chunk_dot", **grid)  # fmt: skip
        if variant == "int4_w4a8":
            y = linear(x, weight, config=cfg, **kw)
            ref = reference(x, weight, residual, epilogue == "swiglu", fp8_dot=True)
            assert torch.isfinite(y).all() and ((y.float() - ref).norm() / ref.norm()).item() < 1e-2
        else:
            y = run_and_check(x, weight, config=cfg, fp8_dot=fp8_dot, **kw)
        wgmma = linear(x, weight, config=dataclasses.replace(cfg, mma_sync=False), fp8_dot=fp8_dot, **kw)
        torch.testing.assert_close(y, wgmma, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("fp8_dot", [False, True])
@pytest.mark.parametrize("m", [1, 16, 64])
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_bf16_fused_rms_norm(fmt, m, fp8_dot):
    """The Qwen3.5 pre-attention norm (zero-centred, hidden 5120) fused into the q/k/v GEMM, at bf16, with the
    launcher's default configs (stream-K included) and the vendor GEMM's row counts."""
    if fp8_dot and not (fmt.startswith("fp8") and torch.cuda.get_device_capability() >= (8, 9)):
        pytest.skip("the FP8 dot applies to FP8 weights on sm89+")
    gen = torch.Generator().manual_seed(62)
    weight = make_weight(fmt, 14336, 5120, gen, dtype=torch.bfloat16)
    x = (torch.randn(m, 5120, generator=gen) * 3).to(DEVICE, torch.bfloat16)
    g = (torch.randn(5120, generator=gen) * 0.2).to(DEVICE, torch.bfloat16)
    y = linear(x, weight, fp8_dot=fp8_dot, norm=linear_mod.RowNorm(g, 1e-6, True))
    normed = ops.rms_norm(x, g, 1e-6, True)
    quant_x = fp8_dot and fmt.startswith("fp8")
    ref = reference(normed, weight, fp8_dot=quant_x)
    err = ((y.float() - ref).norm() / ref.norm()).item()
    assert torch.isfinite(y).all() and err < (3e-2 if quant_x else 1.5e-2), f"relative error {err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 64])
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_bf16_fused_sigmoid_gate(fmt, m):
    """The gated attention's output (24 heads of 256) through o_proj with the gate in the prologue, at bf16."""
    gen = torch.Generator().manual_seed(63)
    weight = make_weight(fmt, 5120, 6144, gen, dtype=torch.bfloat16)
    x = torch.randn(m, 6144, generator=gen).to(DEVICE, torch.bfloat16)
    gate = (torch.randn(m, 6144, generator=gen) * 2).to(DEVICE, torch.bfloat16)
    y = linear(x, weight, fp8_dot=False, gate=gate)
    ref = reference(x * torch.sigmoid(gate), weight)
    err = ((y.float() - ref).norm() / ref.norm()).item()
    assert torch.isfinite(y).all() and err < 1.5e-2, f"relative error {err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", GPU_SHAPES)
@pytest.mark.parametrize("fmt", ["fp8_channel", "fp8_block"])
def test_gpu_fp8_dot(fmt, m, n, k):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 dot needs sm89+")
    gen = torch.Generator().manual_seed(61)
    weight = make_weight(fmt, n, k, gen)
    x = torch.randn(m, k, generator=gen).to(DEVICE, torch.bfloat16)
    y = run_and_check(x, weight, fp8_dot=True, tol=5e-3)
    # Against unquantized activations the error is that of e4m3 (3 mantissa bits).
    ref = reference(x, weight)
    assert ((y.float() - ref).norm() / ref.norm()).item() < 5e-2


@pytest.mark.gpu
@pytest.mark.parametrize("epilogue", ["none", "residual", "swiglu"])
@pytest.mark.parametrize("m,n,k", [(1, 5120, 6144), (16, 2048, 17408), (40, 3072, 5200)])
@pytest.mark.parametrize("fmt", ["fp8_channel", "fp8_block"])
def test_gpu_fp8_prequantized_x_matches_the_in_loop_quantization(fmt, m, n, k, epilogue):
    """x quantized by the pass before the GEMM gives the in-loop quantization's result (same arithmetic), through
    stream-K and split tiles, with K ending inside a group; and a fused norm runs in front of it."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 dot needs sm89+")
    gen = torch.Generator().manual_seed(64)
    n_rows = 2 * n if epilogue == "swiglu" else n
    weight = make_weight(fmt, n_rows, k, gen)
    x = torch.randn(m, k, generator=gen).to(DEVICE, torch.bfloat16)
    residual = torch.randn(m, n, generator=gen).to(DEVICE, torch.bfloat16) if epilogue == "residual" else None
    kw = {"residual": residual, "swiglu": epilogue == "swiglu"}
    for grid in ({"programs": 132}, {"split_k": 3}, {}):
        in_loop = LinearConfig(block_n=64, block_m=16, num_stages=3, **grid)
        pre = dataclasses.replace(in_loop, prequant_x=True)
        y = run_and_check(x, weight, fp8_dot=True, config=pre, tol=5e-3, **kw)
        torch.testing.assert_close(y, linear(x, weight, fp8_dot=True, config=in_loop, **kw), rtol=1e-2, atol=1e-3)
    g = (torch.randn(k, generator=gen) * 0.2).to(DEVICE, torch.bfloat16)
    y = linear(x, weight, fp8_dot=True, config=pre, norm=linear_mod.RowNorm(g, 1e-6, True), **kw)
    ref = reference(ops.rms_norm(x, g, 1e-6, True), weight, residual, epilogue == "swiglu", fp8_dot=True)
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("epilogue", ["none", "residual", "swiglu"])
@pytest.mark.parametrize("m,n,k", [(1, 5120, 6144), (16, 2048, 17408), (40, 3072, 5200)])
def test_gpu_fp8_per_token_x(m, n, k, epilogue):
    """W8A8 per token and channel (x pre-quantized with one scale per token): the dots accumulate over all of K
    and the scales apply once per tile share, through stream-K, split and whole tiles, in chunks of 128 and 256
    inputs (no scale group bounds a chunk here); against the reference on x
    quantized the same way. Hopper's FP8 tensor cores add into the accumulator with fewer bits than fp32, so the
    error grows with the K one accumulator spans: on the H200 at K 17408, 3.7e-3 (5.1e-3 with SwiGLU) for whole
    tiles against 1.7e-3 for per-group scales, which fold each chunk into fp32 (bf16 rounding alone: 1.6e-3)."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 dot needs sm89+")
    gen = torch.Generator().manual_seed(66)
    weight = make_weight("fp8_channel", 2 * n if epilogue == "swiglu" else n, k, gen)
    x = (torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 4).to(DEVICE, torch.bfloat16)
    residual = torch.randn(m, n, generator=gen).to(DEVICE, torch.bfloat16) if epilogue == "residual" else None
    xq = wf.dequantize_fp8_activations(*wf.quantize_fp8_activations(x, group=k), group=k)
    ref = reference(xq, weight, residual, epilogue == "swiglu")
    for block_k, grid in itertools.product((128, 256), ({"programs": 132}, {"split_k": 3}, {})):
        config = LinearConfig(
            block_n=64, block_m=16, block_k=block_k, num_stages=3, prequant_x=True, x_per_token=True, **grid
        )
        out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEVICE)
        y = linear(x, weight, residual=residual, swiglu=epilogue == "swiglu", out=out, fp8_dot=True, config=config)
        err = ((y.float() - ref).norm() / ref.norm()).item()
        assert torch.isfinite(y).all() and err < 1e-2, f"block_k {block_k}, {grid}: relative error {err:.2e}"


def test_per_token_x_needs_a_prequantized_x_and_fp8_channel_weights():
    gen = torch.Generator().manual_seed(67)
    x = torch.randn(4, 256, generator=gen).to(DEVICE, torch.float16)
    per_token = LinearConfig(block_n=32, block_m=16, prequant_x=True, x_per_token=True)
    for weight, config in (
        (make_weight("fp8_channel", 64, 256, gen), dataclasses.replace(per_token, prequant_x=False)),
        (make_weight("fp8_block", 64, 256, gen), per_token),
        (make_weight("int4_sym", 64, 256, gen), per_token),
    ):
        with pytest.raises(ValueError, match="x_per_token needs prequant_x, FP8 per-channel weights and the FP8 dot"):
            linear(x, weight, fp8_dot=True, config=config)


def test_chunks_longer_than_a_scale_group_need_per_tile_scales():
    """block_k over 128 only where no scale group bounds a chunk (FP8 per channel, x per token); elsewhere and
    for lengths that are not whole groups, a one-line error before any launch."""
    gen = torch.Generator().manual_seed(68)
    x = torch.randn(4, 512, generator=gen).to(DEVICE, torch.float16)
    for fmt, config in (
        ("fp8_channel", LinearConfig(block_n=32, block_m=16, block_k=256, prequant_x=True)),
        ("fp8_block", LinearConfig(block_n=32, block_m=16, block_k=256)),
        ("int4_sym", LinearConfig(block_n=32, block_m=16, block_k=256)),
        ("fp8_channel", LinearConfig(block_n=32, block_m=16, block_k=192, prequant_x=True, x_per_token=True)),
    ):
        with pytest.raises(ValueError, match="config: block_k must be 128 for quantized weights"):
            linear(x, make_weight(fmt, 64, 512, gen), fp8_dot=True, config=config)


@triton.jit
def _round_product_to_e4m3_kernel(a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(a_ptr + offs, mask=offs < n) * tl.load(b_ptr + offs, mask=offs < n)  # as the kernels make x * inv
    tl.store(out_ptr + offs, linear_mod._round_to_e4m3(v), mask=offs < n)


def _product_ties(count: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 pairs (a, b) whose rounded product is an exact tie between two e4m3 values, subnormal and normal,
    while the exact product is not: an FMA that rounds the exact product would round them the other way."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    grid = grid[grid.isfinite() & (grid >= 0)].sort().values
    ties = ((grid[1:] + grid[:-1]) / 2).float()
    tie = ties[torch.randint(0, len(ties), (count * 8,), generator=gen)]
    b = (torch.rand(count * 8, generator=gen) * 60 + 1).float()
    a = (tie.double() / b.double()).float()
    exact = a.double() * b.double()
    keep = ((a * b) == tie) & (exact != tie.double())
    return a[keep][:count], b[keep][:count]


def test_fp8_quantization_rounds_to_nearest_even():
    """The kernels' rounding to e4m3 before the FP8 conversion is torch's round to nearest, ties to even, bit for
    bit (the sign of zero included): on every e4m3 value, every midpoint between two (exact ties) and the fp32
    values either side of it, in the subnormal range, on random values up to 448, and on products x * inv that
    round to a tie (as the quantization kernels make them)."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite() & (grid >= 0)].sort().values
    mids = (grid[1:] + grid[:-1]) / 2
    gen = torch.Generator().manual_seed(17)
    v = torch.cat([grid, mids, mids.nextafter(torch.zeros_like(mids)), mids.nextafter(torch.full_like(mids, 1e9)),
                   torch.rand(4000, generator=gen) * 448, torch.rand(1000, generator=gen) * 2**-6,
                   torch.rand(1000, generator=gen) * 2**-10])  # fmt: skip
    a, b = _product_ties(2000, gen)
    a = torch.cat([v, a, -v, -a]).to(DEVICE)
    b = torch.cat([torch.ones_like(v), b, torch.ones_like(v), b]).to(DEVICE)
    out = torch.full_like(a, float("nan"))
    _round_product_to_e4m3_kernel[(triton.cdiv(a.numel(), 1024),)](a, b, out, a.numel(), BLOCK=1024)
    want = (a * b).to(torch.float8_e4m3fn).float()
    bad = out.view(torch.int32) != want.view(torch.int32)
    assert not bad.any(), (bad.sum().item(), (a * b)[bad][:4], out[bad][:4], want[bad][:4])


@pytest.mark.gpu
@pytest.mark.parametrize("m,k", [(1, 5120), (37, 5200), (256, 17408)])
def test_gpu_quantize_x_fp8_is_the_reference_quantization(m, k):
    """One launch per quantization, bit for bit the arithmetic of weight_formats.quantize_fp8_activations: per
    token and 128-input group (the pre-quantized x), and per token (the vendor GEMM's scales); zero rows give zero
    scales."""
    gen = torch.Generator().manual_seed(68)
    x = (torch.randn(m, k, generator=gen) * 3).to(DEVICE, torch.bfloat16)
    zero = m // 2 if m > 1 else None
    if zero is not None:
        x[zero, :] = 0
    for per_row, group in ((False, 128), (True, k)):
        q, scales = linear_mod.quantize_x_fp8(x, per_row=per_row)
        want_q, want_scales = wf.quantize_fp8_activations(x, group=group)
        assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
        assert torch.equal(scales, want_scales)
        assert zero is None or scales[zero].eq(0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("epilogue", ["none", "residual", "swiglu"])
@pytest.mark.parametrize("m,n,k", [(1, 5120, 6144), (16, 2048, 17408), (40, 3072, 5200), (256, 1024, 5120)])
@pytest.mark.parametrize("fmt", ["int4_sym", "int4_asym"])
@pytest.mark.parametrize("chunk_dot", [False, True], ids=["planes", "chunk_dot"])
def test_gpu_int4_w4a8(fmt, m, n, k, epilogue, chunk_dot):
    """INT4 weights against x quantized to FP8 per token and group (prequant_x): the dequantized weights times the
    quantized x, through stream-K, split and whole tiles, with K ending inside a group; one dot per plane or per
    chunk."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores: sm89+")
    gen = torch.Generator().manual_seed(66)
    weight = make_weight(fmt, 2 * n if epilogue == "swiglu" else n, k, gen, dtype=torch.bfloat16)
    x = torch.randn(m, k, generator=gen).to(DEVICE, torch.bfloat16)
    residual = torch.randn(m, n, generator=gen).to(DEVICE, torch.bfloat16) if epilogue == "residual" else None
    bm = 16 if m <= 16 else 64
    for grid in ({"programs": 132}, {"split_k": 3}, {}):
        cfg = LinearConfig(block_n=64, block_m=bm, num_warps=4 if bm == 16 else 8, num_stages=3, prequant_x=True,
                           int4_chunk_dot=chunk_dot, **grid)  # fmt: skip
        out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEVICE)
        y = linear(x, weight, residual=residual, swiglu=epilogue == "swiglu", out=out, config=cfg)
        ref = reference(x, weight, residual, epilogue == "swiglu", fp8_dot=True)
        assert torch.isfinite(y).all(), "unwritten (NaN) outputs"
        assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2


def test_int4_w4a8_needs_fp8_tensor_cores():
    weight = make_weight("int4_sym", 32, 256, torch.Generator().manual_seed(67))
    x = torch.randn(2, 256).to(DEVICE, torch.float16)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="prequant_x with INT4 weights .W4A8. needs FP8 tensor cores"):
            linear(x, weight, config=LinearConfig(block_n=16, block_m=16, num_stages=2, prequant_x=True))
    with pytest.raises(ValueError, match="needs FP8 tensor cores and bf16/fp16 x"):
        linear(x.float(), weight, config=LinearConfig(block_n=16, block_m=16, num_stages=2, prequant_x=True))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_epilogues_and_determinism(fmt):
    """Real MLP shapes with the default (stream-K) configs: fused epilogues, and bit-identical repeats."""
    gen = torch.Generator().manual_seed(62)
    gate_up = make_weight(fmt, 2 * 4352, 5120, gen, dtype=torch.bfloat16)
    down = make_weight(fmt, 5120, 4352, gen, dtype=torch.bfloat16)
    x = torch.randn(16, 5120, generator=gen).to(DEVICE, torch.bfloat16)
    h = run_and_check(x, gate_up, swiglu=True)
    residual = torch.randn(16, 5120, generator=gen).to(DEVICE, torch.bfloat16)
    y = run_and_check(h, down, residual=residual)
    for _ in range(20):
        assert torch.equal(linear(h, down, residual=residual), y)


def test_an_outgrown_workspace_stays_allocated():
    """Graphs captured with a split-K workspace keep writing to it: growing it keeps the old buffer alive."""
    dev = torch.device("cpu")
    linear_mod._WORKSPACES.pop(dev, None)
    small, _ = linear_mod._workspace(dev, 1 << 16, 1 << 12)
    again, _ = linear_mod._workspace(dev, 100, 10)
    assert again.data_ptr() == small.data_ptr()
    large, _ = linear_mod._workspace(dev, (1 << 16) + 1, 1 << 12)
    assert large.numel() == (1 << 16) + 1 and any(t is small for t in linear_mod._RETIRED)
    linear_mod._WORKSPACES.pop(dev, None)


@pytest.mark.gpu
@pytest.mark.parametrize("epilogue", ["none", "residual", "swiglu"])
@pytest.mark.parametrize("m,n,k", [(1, 5120, 6144), (16, 2048, 17408), (40, 3072, 5200)])
@pytest.mark.parametrize("fmt", ["dense", "fp8_channel"])
def test_gpu_tma_linear(fmt, m, n, k, epilogue):
    """The TMA kernel at real shapes in bf16: dense weights against the fp32 product, FP8 per-channel weights
    against the reference on x quantized per token; stream-K, split and whole tiles, FP8 in chunks of 128 and 256;
    the fused RMSNorm for dense weights."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs sm90+")
    gen = torch.Generator().manual_seed(88)
    weight = make_weight(fmt, 2 * n if epilogue == "swiglu" else n, k, gen, dtype=torch.bfloat16)
    x = (torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 4).to(DEVICE, torch.bfloat16)
    residual = torch.randn(m, n, generator=gen).to(DEVICE, torch.bfloat16) if epilogue == "residual" else None
    fp8 = fmt == "fp8_channel"
    xq = wf.dequantize_fp8_activations(*wf.quantize_fp8_activations(x, group=k), group=k) if fp8 else x
    ref = reference(xq, weight, residual, epilogue == "swiglu")
    g = (torch.randn(k, generator=gen) * 0.3 + 1).to(DEVICE, torch.bfloat16)
    normed_ref = reference(ops.rms_norm(x, g, 1e-6, False), weight, residual, epilogue == "swiglu")
    for block_k, grid in itertools.product((128, 256) if fp8 else (128,), ({"programs": 264}, {"split_k": 3}, {})):
        config = LinearConfig(block_n=64, block_m=16, block_k=block_k, num_stages=4, tma=True, **grid)
        for norm, want in ((None, ref), *(() if fp8 else ((linear_mod.RowNorm(g, 1e-6), normed_ref),))):
            out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEVICE)
            y = linear(x, weight, residual=residual, swiglu=epilogue == "swiglu", out=out, config=config, norm=norm)
            err = ((y.float() - want).norm() / want.norm()).item()
            assert torch.isfinite(y).all() and err < 1e-2, f"{block_k}, {grid}, norm {norm is not None}: {err:.2e}"
