"""Fused RMSNorm, q/k norm + RoPE + gate split (+ KV-cache write) and the drafter context K/V against ops."""

from __future__ import annotations

import pytest
import torch

from dflash_compiler.codegen.triton.fused_ops import (
    _token_head_rows,
    context_kv_project,
    gated_rms_norm,
    qk_norm_rope,
    rms_norm,
    swiglu,
)
from dflash_compiler.graph.ops import swiglu as swiglu_ref
from dflash_compiler.models.ops import apply_rope, rope_cos_sin
from dflash_compiler.models.ops import gated_rms_norm as gated_rms_norm_ref
from dflash_compiler.models.ops import rms_norm as rms_norm_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6


def _rand(*shape, dtype, gen, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)


def _tol(dtype):
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


def _close(out, ref, dtype):
    assert torch.isfinite(out).all(), "unwritten or NaN output"
    err = (out.float() - ref.float()).norm() / ref.float().norm()
    assert err < _tol(dtype), f"relative error {err:.2e}"


def _cos_sin(positions, rot, theta, dtype):
    inv_freq = 1.0 / theta ** (torch.arange(0, rot, 2, dtype=torch.float32, device=DEVICE) / rot)
    cos, sin = rope_cos_sin(inv_freq, positions[None], 1.0, dtype)
    return cos[0], sin[0]


def _rope_ref(x, cos, sin):
    """x [T, H, D] with per-token cos/sin [T, rot] through ops.apply_rope ([B, H, T, D] layout)."""
    return apply_rope(x.transpose(0, 1)[None], cos[None], sin[None])[0].transpose(0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("zero_centered", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, zero_centered, with_residual):
    gen = torch.Generator().manual_seed(3)
    rows, h = 7, 200
    x = _rand(rows, h, dtype=dtype, gen=gen)
    w = _rand(h, dtype=dtype, gen=gen, scale=0.3)
    out = torch.full_like(x, float("nan"))
    if with_residual:
        res = _rand(rows, h, dtype=dtype, gen=gen)
        res_out = torch.full_like(x, float("nan"))
        y, new_res = rms_norm(x, w, EPS, zero_centered=zero_centered, residual=res, out=out, residual_out=res_out)
        ref_res = x + res
        assert torch.equal(new_res, ref_res)
        _close(y, rms_norm_ref(ref_res, w, EPS, zero_centered), dtype)
    else:
        y = rms_norm(x, w, EPS, zero_centered=zero_centered, out=out)
        _close(y, rms_norm_ref(x, w, EPS, zero_centered), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens, heads, d", [(1, 3, 128), (7, 5, 96), (33, 2, 64)])
def test_gated_rms_norm(dtype, tokens, heads, d):
    gen = torch.Generator().manual_seed(tokens * 100 + d)
    x = _rand(tokens, heads, d, dtype=dtype, gen=gen, scale=3.0)
    gate = _rand(tokens, heads, d, dtype=dtype, gen=gen, scale=2.0)
    w = _rand(d, dtype=dtype, gen=gen) + 1.0
    out = torch.full_like(x, float("nan"))
    y = gated_rms_norm(x, gate, w, EPS, out=out)
    assert y.data_ptr() == out.data_ptr()
    _close(y, gated_rms_norm_ref(x, gate, w, EPS), dtype)
    # a strided gate (a slice of a wider projection) reads the same values
    wide = _rand(tokens, heads, 2 * d, dtype=dtype, gen=gen)
    _close(gated_rms_norm(x, wide[..., :d], w, EPS), gated_rms_norm_ref(x, wide[..., :d], w, EPS), dtype)
    # x and gate as head columns of wider token rows (z in the fused GDN input projection's output): read in place
    proj = _rand(tokens, 3 * heads * d + 5, dtype=dtype, gen=gen, scale=2.0)
    z = proj[:, heads * d + 3 : 2 * heads * d + 3].view(tokens, heads, d)
    xs = proj[:, 1 : heads * d + 1].view(tokens, heads, d)
    assert _token_head_rows(z, heads, d).data_ptr() == z.data_ptr()
    out = torch.full_like(x, float("nan"))
    _close(gated_rms_norm(xs, z, w, EPS, out=out), gated_rms_norm_ref(xs, z, w, EPS), dtype)
    with pytest.raises(ValueError, match="gate"):
        gated_rms_norm(x, gate[:, :1], w, EPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m, n", [(1, 1), (5, 37), (19, 2500)])
def test_swiglu_over_a_gemm_output(dtype, m, n):
    gen = torch.Generator().manual_seed(m * 1000 + n)
    wide = _rand(m, 2 * n + 3, dtype=dtype, gen=gen, scale=3.0)
    y = wide[:, : 2 * n]  # rows with a stride longer than their width
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    got = swiglu(y, out=out)
    assert got is out
    torch.testing.assert_close(got, swiglu_ref(y[:, :n], y[:, n:]), rtol=1e-3 if dtype == torch.float16 else 1e-5,
                               atol=1e-3 if dtype == torch.float16 else 1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="y:"):
        swiglu(wide[:, : 2 * n + 1])
    with pytest.raises(ValueError, match="out:"):
        swiglu(y, out=torch.empty(m, n + 1, dtype=dtype, device=DEVICE))


def test_rms_norm_3d_input():
    gen = torch.Generator().manual_seed(4)
    x = _rand(2, 3, 96, dtype=torch.float32, gen=gen)
    w = _rand(96, dtype=torch.float32, gen=gen)
    _close(rms_norm(x, w, EPS), rms_norm_ref(x, w, EPS), torch.float32)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, w[:5], EPS)


def _qk_ref(q_proj, k_proj, qw, kw, cos, sin, hq, hkv, d, gated, zero_centered):
    tokens = q_proj.shape[0]
    if gated:
        qg = q_proj.view(tokens, hq, 2 * d)
        query, gate = qg[..., :d], qg[..., d:].reshape(tokens, hq * d)
    else:
        query, gate = q_proj.view(tokens, hq, d), None
    q = _rope_ref(rms_norm_ref(query, qw, EPS, zero_centered), cos, sin)
    k = _rope_ref(rms_norm_ref(k_proj.view(tokens, hkv, d), kw, EPS, zero_centered), cos, sin)
    return q, k, gate


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("style", ["qwen35", "qwen3"])
def test_qk_norm_rope(dtype, style):
    gen = torch.Generator().manual_seed(5)
    tokens, hq, hkv, d = 5, 6, 2, 64
    gated, zero_centered, rot = (True, True, 16) if style == "qwen35" else (False, False, d)
    q_proj = _rand(tokens, hq * d * (2 if gated else 1), dtype=dtype, gen=gen, scale=2.0)
    k_proj = _rand(tokens, hkv * d, dtype=dtype, gen=gen, scale=2.0)
    qw = _rand(d, dtype=dtype, gen=gen, scale=0.2)
    kw = _rand(d, dtype=dtype, gen=gen, scale=0.2)
    positions = torch.tensor([0, 1, 17, 300, 4095], device=DEVICE)
    cos, sin = _cos_sin(positions, rot, 1e4, dtype)
    q_out = torch.full((tokens, hq, d), float("nan"), dtype=dtype, device=DEVICE)
    k_out = torch.full((tokens, hkv, d), float("nan"), dtype=dtype, device=DEVICE)
    gate_out = torch.full((tokens, hq * d), float("nan"), dtype=dtype, device=DEVICE) if gated else None
    q, k, gate = qk_norm_rope(
        q_proj,
        k_proj,
        qw,
        kw,
        cos,
        sin,
        num_q_heads=hq,
        num_kv_heads=hkv,
        eps=EPS,
        gated=gated,
        zero_centered=zero_centered,
        q_out=q_out,
        k_out=k_out,
        gate_out=gate_out,
    )
    q_ref, k_ref, gate_ref = _qk_ref(q_proj, k_proj, qw, kw, cos, sin, hq, hkv, d, gated, zero_centered)
    _close(q, q_ref, dtype)
    _close(k, k_ref, dtype)
    if gated:
        assert torch.equal(gate, gate_ref)
    else:
        assert gate is None


@pytest.mark.parametrize("paged", [False, True])
def test_qk_norm_rope_writes_cache(paged):
    dtype = torch.float16
    gen = torch.Generator().manual_seed(6)
    n_req, block, hq, hkv, d, s_max, page = 3, 4, 4, 2, 32, 40, 16
    tokens = n_req * block
    lens = torch.tensor([0, 13, 30], device=DEVICE)
    seq_idx = torch.arange(n_req, device=DEVICE).repeat_interleave(block)
    positions = lens.repeat_interleave(block) + torch.arange(block, device=DEVICE).repeat(n_req)
    q_proj = _rand(tokens, hq * 2 * d, dtype=dtype, gen=gen)
    k_proj = _rand(tokens, hkv * d, dtype=dtype, gen=gen)
    v_proj = _rand(tokens, hkv * d, dtype=dtype, gen=gen)
    qw = _rand(d, dtype=dtype, gen=gen, scale=0.2)
    kw = _rand(d, dtype=dtype, gen=gen, scale=0.2)
    cos, sin = _cos_sin(positions, 16, 1e7, dtype)
    k_ref_cache = torch.full((n_req, hkv, s_max, d), float("nan"), dtype=dtype, device=DEVICE)
    v_ref_cache = k_ref_cache.clone()
    _, k_ref, _ = _qk_ref(q_proj, k_proj, qw, kw, cos, sin, hq, hkv, d, True, True)
    k_ref_cache[seq_idx, :, positions] = k_ref
    v_ref_cache[seq_idx, :, positions] = v_proj.view(tokens, hkv, d)
    if paged:
        pages_per = -(-s_max // page)
        bt = torch.randperm(n_req * pages_per + 2, generator=gen)[: n_req * pages_per].view(n_req, pages_per)
        bt = bt.to(device=DEVICE, dtype=torch.int32)
        k_cache = torch.full((n_req * pages_per + 2, hkv, page, d), float("nan"), dtype=dtype, device=DEVICE)
    else:
        bt = None
        k_cache = torch.full((n_req, hkv, s_max, d), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = k_cache.clone()
    qk_norm_rope(
        q_proj,
        k_proj,
        qw,
        kw,
        cos,
        sin,
        num_q_heads=hq,
        num_kv_heads=hkv,
        eps=EPS,
        gated=True,
        zero_centered=True,
        v_proj=v_proj,
        k_cache=k_cache,
        v_cache=v_cache,
        seq_idx=seq_idx,
        positions=positions,
        block_table=bt,
    )
    if paged:
        # gather the pages back into the contiguous view
        k_cache = k_cache[bt.long()].permute(0, 2, 1, 3, 4).reshape(n_req, hkv, -1, d)[:, :, :s_max]
        v_cache = v_cache[bt.long()].permute(0, 2, 1, 3, 4).reshape(n_req, hkv, -1, d)[:, :, :s_max]
    for got, ref in ((k_cache, k_ref_cache), (v_cache, v_ref_cache)):
        assert torch.equal(torch.isnan(got), torch.isnan(ref)), "writes outside the token slots"
        written = ~torch.isnan(ref)
        torch.testing.assert_close(got[written], ref[written], rtol=2e-3, atol=2e-3)


def _context_ref(c, w_kv, kw, cos, sin, layers, hkv, d):
    kv = c @ w_kv.t()
    ks, vs = [], []
    for layer in range(layers):
        blk = kv[:, layer * 2 * hkv * d : (layer + 1) * 2 * hkv * d].view(-1, 2, hkv, d)
        k = _rope_ref(rms_norm_ref(blk[:, 0], kw[layer], EPS), cos, sin)
        ks.append(k)
        vs.append(blk[:, 1])
    return ks, vs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("paged", [False, True])
def test_context_kv_project(dtype, paged):
    gen = torch.Generator().manual_seed(8)
    layers, hkv, d, hidden, n_req, s_max, page = 3, 2, 32, 48, 2, 50, 16
    tokens = 7
    seq_idx = torch.tensor([0, 0, 0, 1, 1, 1, 1], device=DEVICE)
    positions = torch.tensor([10, 11, 12, 0, 1, 2, 49], device=DEVICE)
    c = _rand(tokens, hidden, dtype=dtype, gen=gen)
    w_kv = _rand(layers * 2 * hkv * d, hidden, dtype=dtype, gen=gen, scale=hidden**-0.5)
    kw = _rand(layers, d, dtype=dtype, gen=gen, scale=0.2) + 1
    cos, sin = _cos_sin(positions, d, 1e6, dtype)
    ks, vs = _context_ref(c, w_kv, kw, cos, sin, layers, hkv, d)
    if paged:
        pages_per = -(-s_max // page)
        num_pages = n_req * pages_per + 1
        bt = torch.randperm(num_pages, generator=gen)[: n_req * pages_per].view(n_req, pages_per)
        bt = bt.to(device=DEVICE, dtype=torch.int32)
        k_cache = torch.full((layers, num_pages, hkv, page, d), float("nan"), dtype=dtype, device=DEVICE)
    else:
        bt = None
        k_cache = torch.full((layers, n_req, hkv, s_max, d), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = k_cache.clone()
    context_kv_project(c, w_kv, kw, cos, sin, k_cache, v_cache, seq_idx, positions, eps=EPS, block_table=bt)
    for layer in range(layers):
        kc, vc = k_cache[layer], v_cache[layer]
        if paged:
            kc = kc[bt.long()].permute(0, 2, 1, 3, 4).reshape(n_req, hkv, -1, d)[:, :, :s_max]
            vc = vc[bt.long()].permute(0, 2, 1, 3, 4).reshape(n_req, hkv, -1, d)[:, :, :s_max]
        _close(kc[seq_idx, :, positions], ks[layer], dtype)
        _close(vc[seq_idx, :, positions], vs[layer], dtype)
        untouched = torch.ones(n_req, s_max, dtype=torch.bool, device=DEVICE)
        untouched[seq_idx, positions] = False
        assert torch.isnan(kc.transpose(1, 2)[untouched]).all(), "writes outside the token slots"


@pytest.mark.gpu
def test_bf16_qwen35_shapes():
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(9)
    tokens, hidden, hq, hkv, d = 48, 5120, 24, 4, 256
    x = _rand(tokens, hidden, dtype=dtype, gen=gen)
    res = _rand(tokens, hidden, dtype=dtype, gen=gen)
    w = _rand(hidden, dtype=dtype, gen=gen, scale=0.1)
    y, new_res = rms_norm(x, w, EPS, zero_centered=True, residual=res)
    assert torch.equal(new_res, x + res)
    _close(y, rms_norm_ref(x + res, w, EPS, True), dtype)
    q_proj = _rand(tokens, hq * 2 * d, dtype=dtype, gen=gen)
    k_proj = _rand(tokens, hkv * d, dtype=dtype, gen=gen)
    qw = _rand(d, dtype=dtype, gen=gen, scale=0.1)
    kw = _rand(d, dtype=dtype, gen=gen, scale=0.1)
    positions = torch.randint(0, 200000, (tokens,), generator=gen).to(DEVICE)
    cos, sin = _cos_sin(positions, 64, 1e7, dtype)
    q, k, gate = qk_norm_rope(
        q_proj, k_proj, qw, kw, cos, sin, num_q_heads=hq, num_kv_heads=hkv, eps=EPS, gated=True, zero_centered=True
    )
    q_ref, k_ref, gate_ref = _qk_ref(q_proj, k_proj, qw, kw, cos, sin, hq, hkv, d, True, True)
    _close(q, q_ref, dtype)
    _close(k, k_ref, dtype)
    assert torch.equal(gate, gate_ref)


@pytest.mark.gpu
def test_bf16_gated_rms_norm_qwen35_shapes():
    """The Gated DeltaNet output norm at Qwen3.5-27B shapes (48 value heads of 128, a verify block of 16):
    bf16 is rounded where the reference rounds, so almost every element is bit-equal."""
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(11)
    x = _rand(16, 48, 128, dtype=dtype, gen=gen, scale=0.3)
    gate = _rand(16, 48, 128, dtype=dtype, gen=gen, scale=2.0)
    w = _rand(128, dtype=dtype, gen=gen, scale=0.1) + 1
    out = torch.full_like(x, float("nan"))
    y = gated_rms_norm(x, gate, w, EPS, out=out)
    ref = gated_rms_norm_ref(x, gate, w, EPS)
    _close(y, ref, dtype)
    assert (y == ref).float().mean() > 0.99


@pytest.mark.gpu
def test_bf16_context_kv_drafter_shapes():
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(10)
    layers, hkv, d, hidden, tokens, s_max = 5, 8, 128, 5120, 33, 4096
    seq_idx = torch.zeros(tokens, dtype=torch.int64, device=DEVICE)
    positions = torch.arange(1000, 1000 + tokens, device=DEVICE)
    c = _rand(tokens, hidden, dtype=dtype, gen=gen)
    w_kv = _rand(layers * 2 * hkv * d, hidden, dtype=dtype, gen=gen, scale=hidden**-0.5)
    kw = _rand(layers, d, dtype=dtype, gen=gen, scale=0.1) + 1
    cos, sin = _cos_sin(positions, d, 1e7, dtype)
    k_cache = torch.full((layers, 1, hkv, s_max, d), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = k_cache.clone()
    context_kv_project(c, w_kv, kw, cos, sin, k_cache, v_cache, seq_idx, positions, eps=EPS)
    ks, vs = _context_ref(c, w_kv, kw, cos, sin, layers, hkv, d)
    for layer in range(layers):
        _close(k_cache[layer, 0, :, positions].transpose(0, 1), ks[layer], dtype)
        _close(v_cache[layer, 0, :, positions].transpose(0, 1), vs[layer], dtype)
