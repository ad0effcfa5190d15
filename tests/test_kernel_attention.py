"""Verify and draft attention kernels against ops.attention, on contiguous and paged caches."""

from __future__ import annotations

import pytest
import torch

from dflash_compiler.codegen.triton.attention import AttentionConfig, draft_attention, verify_attention
from dflash_compiler.models.ops import attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rand(*shape, dtype, gen):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=DEVICE, dtype=dtype)


def _make_cache(n_req, hkv, s_max, d, lens_total, dtype, gen):
    """Contiguous caches whose slots past each request's length are NaN, so an unmasked read shows."""
    k = _rand(n_req, hkv, s_max, d, dtype=dtype, gen=gen)
    v = _rand(n_req, hkv, s_max, d, dtype=dtype, gen=gen)
    for n, length in enumerate(lens_total):
        k[n, :, length:] = float("nan")
        v[n, :, length:] = float("nan")
    return k, v


def _to_paged(k, v, page, gen, nhd=False):
    """Scatter contiguous caches into a shuffled page pool (NaN in unused pages)."""
    n_req, hkv, s_max, d = k.shape
    per_req = -(-s_max // page)
    num_pages = n_req * per_req + 3
    perm = torch.randperm(num_pages, generator=gen)[: n_req * per_req].view(n_req, per_req)
    kp = torch.full((num_pages, hkv, page, d), float("nan"), dtype=k.dtype, device=k.device)
    vp = torch.full_like(kp, float("nan"))
    pad = per_req * page - s_max
    kpad = torch.nn.functional.pad(k, (0, 0, 0, pad), value=float("nan"))
    vpad = torch.nn.functional.pad(v, (0, 0, 0, pad), value=float("nan"))
    for n in range(n_req):
        for j in range(per_req):
            kp[perm[n, j]] = kpad[n, :, j * page : (j + 1) * page]
            vp[perm[n, j]] = vpad[n, :, j * page : (j + 1) * page]
    bt = perm.to(device=k.device, dtype=torch.int32)
    if nhd:
        # store as [P, PAGE, Hkv, D] and hand the kernel the transposed view
        kp = kp.transpose(1, 2).contiguous().transpose(1, 2)
        vp = vp.transpose(1, 2).contiguous().transpose(1, 2)
    return kp, vp, bt


def _ref_verify(q, k, v, lens, window=0):
    n_req, t, _, d = q.shape
    outs = []
    for n in range(n_req):
        total = int(lens[n]) + t
        qpos = int(lens[n]) + torch.arange(t, device=q.device)
        kpos = torch.arange(total, device=q.device)
        mask = kpos[None, :] <= qpos[:, None]
        if window:
            mask &= qpos[:, None] - kpos[None, :] < window
        o = attention(
            q[n : n + 1].transpose(1, 2), k[n : n + 1, :, :total], v[n : n + 1, :, :total], mask[None], d**-0.5
        )
        outs.append(o.transpose(1, 2))
    return torch.cat(outs)


def _ref_draft(q, kb, vb, k, v, lens, causal, window):
    n_req, t, _, d = q.shape
    outs = []
    for n in range(n_req):
        start = int(lens[n])
        keys = torch.cat((k[n, :, :start], kb[n].transpose(0, 1)), dim=1)
        vals = torch.cat((v[n, :, :start], vb[n].transpose(0, 1)), dim=1)
        qpos = start + torch.arange(t, device=q.device)
        kpos = torch.arange(start + t, device=q.device)
        mask = torch.ones(t, start + t, dtype=torch.bool, device=q.device)
        if causal:
            mask &= kpos[None, :] <= qpos[:, None]
        if window:
            mask &= qpos[:, None] - kpos[None, :] < window
        o = attention(q[n : n + 1].transpose(1, 2), keys[None], vals[None], mask[None], d**-0.5)
        outs.append(o.transpose(1, 2))
    return torch.cat(outs)


def _check(out, ref, dtype):
    assert torch.isfinite(out).all(), "unwritten or NaN output"
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    err = (out.float() - ref.float()).norm() / ref.float().norm()
    assert err < tol, f"relative error {err:.2e}"


def _poisoned(q):
    return torch.full_like(q, float("nan"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t,num_splits", [(1, 1), (5, 1), (5, 3), (16, 4)])
def test_verify_contiguous(dtype, t, num_splits):
    gen = torch.Generator().manual_seed(t * 10 + num_splits)
    n_req, hq, hkv, d, s_max = 3, 6, 2, 32, 96
    lens = torch.tensor([0, 37, s_max - t], dtype=torch.int32, device=DEVICE)
    q = _rand(n_req, t, hq, d, dtype=dtype, gen=gen)
    k, v = _make_cache(n_req, hkv, s_max, d, (lens + t).tolist(), dtype, gen)
    out = verify_attention(q, k, v, lens, out=_poisoned(q), num_splits=num_splits)
    _check(out, _ref_verify(q, k, v, lens), dtype)


@pytest.mark.parametrize("page", [16, 64])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_verify_paged(page, num_splits):
    dtype = torch.float16
    gen = torch.Generator().manual_seed(page + num_splits)
    n_req, t, hq, hkv, d, s_max = 4, 7, 4, 2, 32, 150
    lens = torch.tensor([3, 80, 0, 143], dtype=torch.int32, device=DEVICE)
    q = _rand(n_req, t, hq, d, dtype=dtype, gen=gen)
    k, v = _make_cache(n_req, hkv, s_max, d, (lens + t).tolist(), dtype, gen)
    kp, vp, bt = _to_paged(k, v, page, gen, nhd=page == 16)
    out = verify_attention(q, kp, vp, lens, block_table=bt, out=_poisoned(q), num_splits=num_splits)
    _check(out, _ref_verify(q, k, v, lens), dtype)


@pytest.mark.parametrize("d,hq,hkv", [(128, 4, 1), (256, 6, 1)])
def test_verify_large_head_dim(d, hq, hkv):
    dtype = torch.float16
    gen = torch.Generator().manual_seed(d)
    n_req, t, s_max = 2, 3, 70
    lens = torch.tensor([40, 9], dtype=torch.int32, device=DEVICE)
    q = _rand(n_req, t, hq, d, dtype=dtype, gen=gen)
    k, v = _make_cache(n_req, hkv, s_max, d, (lens + t).tolist(), dtype, gen)
    out = verify_attention(q, k, v, lens, num_splits=2, out=_poisoned(q))
    _check(out, _ref_verify(q, k, v, lens), dtype)


def test_verify_window_and_strided_q():
    dtype = torch.float32
    gen = torch.Generator().manual_seed(7)
    n_req, t, hq, hkv, d, s_max = 2, 6, 4, 2, 16, 80
    lens = torch.tensor([50, 4], dtype=torch.int32, device=DEVICE)
    # q as a view into a wider projection output: rows are not contiguous
    q = _rand(n_req, t, hq, 2 * d, dtype=dtype, gen=gen)[..., :d]
    k, v = _make_cache(n_req, hkv, s_max, d, (lens + t).tolist(), dtype, gen)
    out = verify_attention(q, k, v, lens, window=20, num_splits=3, config=AttentionConfig(16, 16, 4, 1))
    _check(out, _ref_verify(q, k, v, lens, window=20), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal,window", [(False, 0), (True, 24), (True, 0)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_draft_contiguous(dtype, causal, window, num_splits):
    gen = torch.Generator().manual_seed(num_splits + window)
    n_req, t, hq, hkv, d, s_max = 3, 6, 8, 2, 32, 90
    lens = torch.tensor([61, 0, 17], dtype=torch.int32, device=DEVICE)
    q = _rand(n_req, t, hq, d, dtype=dtype, gen=gen)
    kb = _rand(n_req, t, hkv, d, dtype=dtype, gen=gen)
    vb = _rand(n_req, t, hkv, d, dtype=dtype, gen=gen)
    k, v = _make_cache(n_req, hkv, s_max, d, lens.tolist(), dtype, gen)
    out = draft_attention(q, kb, vb, k, v, lens, causal=causal, window=window, out=_poisoned(q), num_splits=num_splits)
    _check(out, _ref_draft(q, kb, vb, k, v, lens, causal, window), dtype)


@pytest.mark.parametrize("page,causal,window", [(16, False, 0), (64, True, 40)])
def test_draft_paged(page, causal, window):
    dtype = torch.float16
    gen = torch.Generator().manual_seed(page)
    n_req, t, hq, hkv, d, s_max = 2, 16, 4, 1, 32, 140
    lens = torch.tensor([133, 70], dtype=torch.int32, device=DEVICE)
    q = _rand(n_req, t, hq, d, dtype=dtype, gen=gen)
    kb = _rand(n_req, t, hkv, d, dtype=dtype, gen=gen)
    vb = _rand(n_req, t, hkv, d, dtype=dtype, gen=gen)
    k, v = _make_cache(n_req, hkv, s_max, d, lens.tolist(), dtype, gen)
    kp, vp, bt = _to_paged(k, v, page, gen)
    out = draft_attention(
        q, kb, vb, kp, vp, lens, block_table=bt, causal=causal, window=window, out=_poisoned(q), num_splits=2
    )
    _check(out, _ref_draft(q, kb, vb, k, v, lens, causal, window), dtype)


def _gated(o, gate):
    """The model's gated attention output, o * sigmoid(gate), gate in rows [N*T, Hq*D]."""
    return (o.float() * torch.sigmoid(gate.float()).view(o.shape)).to(o.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t,num_splits,page", [(1, 1, None), (5, 3, None), (7, 1, 16), (13, 2, 64)])
def test_verify_with_the_output_gate(dtype, t, num_splits, page):
    """The gate applied in the epilogue (one split) or in the splits' combine, from rows with a stride wider than
    Hq*D (the gate is a slice of the q projection's output)."""
    from dflash_compiler.codegen import reference

    gen = torch.Generator().manual_seed(t * 7 + num_splits)
    n_req, hq, hkv, d, s_max = 3, 6, 2, 32, 100
    lens = torch.tensor([0, 41, s_max - t], dtype=torch.int32, device=DEVICE)
    q = _rand(n_req, t, hq, d, dtype=dtype, gen=gen)
    k, v = _make_cache(n_req, hkv, s_max, d, (lens + t).tolist(), dtype, gen)
    gate = _rand(n_req * t, 3 * hq * d, dtype=dtype, gen=gen)[:, hq * d : 2 * hq * d]  # rows of stride 3 Hq D
    want = _gated(_ref_verify(q, k, v, lens), gate)
    if page is None:
        out = verify_attention(q, k, v, lens, out=_poisoned(q), num_splits=num_splits, gate=gate)
        ref = reference.verify_attention(q, k, v, lens, gate=gate)
    else:
        kp, vp, bt = _to_paged(k, v, page, gen)
        out = verify_attention(q, kp, vp, lens, block_table=bt, out=_poisoned(q), num_splits=num_splits, gate=gate)
        ref = reference.verify_attention(q, kp, vp, lens, block_table=bt, gate=gate)
    _check(out, want, dtype)
    _check(ref, want, dtype)
    assert (out.float() - _ref_verify(q, k, v, lens).float()).abs().max() > 0.1  # the gate did something
    with pytest.raises(ValueError, match=rf"gate: expected .*\[{n_req * t}, {hq * d}\] with contiguous rows"):
        verify_attention(q, k, v, lens, gate=gate[:, : hq * d - 1])


def test_rejects_bad_inputs():
    q = torch.randn(2, 3, 4, 16, device=DEVICE)
    k = torch.randn(2, 3, 20, 16, device=DEVICE)
    lens = torch.tensor([1, 2], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="k_cache"):
        verify_attention(q, k, k, lens)
    k = torch.randn(2, 2, 20, 16, device=DEVICE)
    with pytest.raises(ValueError, match="cache_lens"):
        verify_attention(q, k, k, lens[:1])
    with pytest.raises(ValueError, match="block_table"):
        verify_attention(q, k, k, lens, block_table=torch.zeros(2, 3, dtype=torch.int64, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("paged", [False, True])
def test_verify_bf16_qwen35_shapes(paged):
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(1)
    n_req, t, hq, hkv, d, s_max = 5, 16, 24, 4, 256, 3000
    lens = torch.tensor([2900, 1, 1234, 77, 2048], dtype=torch.int32, device=DEVICE)
    q = _rand(n_req, t, hq, d, dtype=dtype, gen=gen)
    k, v = _make_cache(n_req, hkv, s_max, d, (lens + t).tolist(), dtype, gen)
    if paged:
        kp, vp, bt = _to_paged(k, v, 64, gen)
        out = verify_attention(q, kp, vp, lens, block_table=bt, out=_poisoned(q))
    else:
        out = verify_attention(q, k, v, lens, out=_poisoned(q))
    _check(out, _ref_verify(q, k, v, lens), dtype)
    # every split count must give the same function
    out1 = verify_attention(q, k, v, lens, num_splits=1)
    _check(out1, _ref_verify(q, k, v, lens), dtype)
    # the output gate, in the epilogue and in the combine
    gate = _rand(n_req * t, hq * d, dtype=dtype, gen=gen)
    for splits in (1, None):
        gated = verify_attention(q, k, v, lens, num_splits=splits, gate=gate, out=_poisoned(q))
        _check(gated, _gated(_ref_verify(q, k, v, lens), gate), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("causal,window", [(False, 0), (True, 512)])
def test_draft_bf16_drafter_shapes(causal, window):
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(2)
    n_req, t, hq, hkv, d, s_max = 3, 16, 32, 8, 128, 4000
    lens = torch.tensor([3999, 600, 5], dtype=torch.int32, device=DEVICE)
    q = _rand(n_req, t, hq, d, dtype=dtype, gen=gen)
    kb = _rand(n_req, t, hkv, d, dtype=dtype, gen=gen)
    vb = _rand(n_req, t, hkv, d, dtype=dtype, gen=gen)
    k, v = _make_cache(n_req, hkv, s_max, d, lens.tolist(), dtype, gen)
    kp, vp, bt = _to_paged(k, v, 16, gen)
    out = draft_attention(q, kb, vb, kp, vp, lens, block_table=bt, causal=causal, window=window, out=_poisoned(q))
    _check(out, _ref_draft(q, kb, vb, k, v, lens, causal, window), dtype)
