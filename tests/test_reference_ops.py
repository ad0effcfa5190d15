"""codegen/reference.py against the Triton launchers (Triton's interpreter on CPU): same signatures, same results,
same writes. Every out= buffer starts as NaN; caches and states are compared whole, so a slot written by one side
and not the other, or written elsewhere, shows."""

from __future__ import annotations

import inspect

import pytest
import torch
from test_kernel_accept import _drafts_with_prefix

from dflash_compiler.codegen import reference as ref
from dflash_compiler.codegen import weight_formats as wf
from dflash_compiler.codegen.triton import accept, attention, fused_ops, gdn
from dflash_compiler.codegen.triton import linear as lin
from dflash_compiler.models import ops

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
EPS = 1e-6


def _rand(*shape, gen, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(DEV, dtype)


def _nan(*shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


def _twins(*xs):
    """Two independent copies of each tensor with the same strides: one for the kernel, one for the reference."""
    return [
        [torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device).copy_(x) for x in xs] for _ in "ab"
    ]


def _same(got, want, tol, name=""):
    """Same shape, dtype and NaN pattern (what is written and what is not); values within tol of the largest."""
    assert got.shape == want.shape and got.dtype == want.dtype, f"{name}: {got.shape} {got.dtype} vs {want.dtype}"
    assert torch.equal(got.isnan(), want.isnan()), f"{name}: written in different places"
    g, w = got.double().nan_to_num(), want.double().nan_to_num()
    err = (g - w).abs().max().item() if g.numel() else 0.0
    assert err <= tol * max(1.0, w.abs().max().item()), f"{name}: max error {err:.3g}"


@pytest.mark.parametrize("name", [n for n in ref.__all__ if n != "AcceptResult"])
def test_signatures_match_the_launchers(name):
    """Same parameter names, kinds and defaults: a runtime swaps one module for the other."""
    (launcher,) = [getattr(m, name) for m in (accept, attention, fused_ops, gdn, lin) if hasattr(m, name)]

    def params(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    assert params(getattr(ref, name)) == params(launcher)


# ---- linear ------------------------------------------------------------------------------------------------------


def _weight(fmt, n, k, gen, dtype=torch.float16):
    w = torch.randn(n, k, generator=gen) * 0.05
    if fmt == "dense":
        return wf.DenseWeight(w.to(dtype)).to(DEV)
    if fmt == "fp8_channel":
        return wf.quantize_fp8_channel(w).to(DEV)
    if fmt == "fp8_block":
        return wf.quantize_fp8_block(w).to(DEV)
    return wf.quantize_int4(w, symmetric=fmt == "int4_sym").to(DEV)


@pytest.mark.parametrize("epilogue", ["none", "residual", "swiglu"])
@pytest.mark.parametrize("fmt", ["dense", "fp8_channel", "fp8_block", "int4_sym", "int4_asym"])
def test_linear(fmt, epilogue):
    gen = torch.Generator().manual_seed(1)
    m, k, n = 5, 200, 38 if epilogue == "swiglu" else 37
    n_out = n // 2 if epilogue == "swiglu" else n
    weight = _weight(fmt, n, k, gen)
    x = _rand(m, k, gen=gen, dtype=torch.float16)
    residual = _rand(m, n_out, gen=gen, dtype=torch.float16) if epilogue == "residual" else None
    outs = _twins(_nan(m, n_out, dtype=torch.float16))
    cfg = lin.LinearConfig(block_n=64, block_m=16, block_k=128, num_stages=1)  # one program: fast in the interpreter
    kw = dict(residual=residual, swiglu=epilogue == "swiglu", fp8_dot=False, config=cfg)
    got = lin.linear(x, weight, out=outs[0][0], **kw)
    want = ref.linear(x, weight, out=outs[1][0], **kw)
    assert got is outs[0][0] and want is outs[1][0]
    _same(got, want, TOL[torch.float16])
    assert torch.isfinite(want).all()


@pytest.mark.parametrize("fmt", ["dense", "int4_asym"])
def test_linear_fp32_new_output(fmt):
    gen = torch.Generator().manual_seed(2)
    weight = _weight(fmt, 21, 136, gen, dtype=torch.float32)
    x = _rand(3, 136, gen=gen)
    got, want = lin.linear(x, weight), ref.linear(x, weight, config=lin.LinearConfig())
    assert want.is_contiguous()
    _same(got, want, 1e-5)


# ---- norms, RoPE, cache writes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("zero_centered", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm(dtype, zero_centered, residual):
    gen = torch.Generator().manual_seed(3)
    x = _rand(2, 3, 37, gen=gen, dtype=dtype)
    w = _rand(37, gen=gen, dtype=dtype, scale=0.3)
    r = _rand(2, 3, 37, gen=gen, dtype=dtype) if residual else None
    (ko, kro), (ro, rro) = _twins(_nan(2, 3, 37, dtype=dtype), _nan(2, 3, 37, dtype=dtype))
    got = fused_ops.rms_norm(x, w, EPS, zero_centered=zero_centered, residual=r, out=ko, residual_out=kro)
    want = ref.rms_norm(x, w, EPS, zero_centered=zero_centered, residual=r, out=ro, residual_out=rro)
    if residual:
        assert got[0] is ko and got[1] is kro and want[0] is ro and want[1] is rro
        _same(want[1], got[1], 0.0)
        got, want = got[0], want[0]
    _same(want, got, TOL[dtype])
    fresh = ref.rms_norm(x, w, EPS, zero_centered=zero_centered, residual=r)
    _same(fresh[0] if residual else fresh, got, TOL[dtype])


def _cos_sin(positions, rot, dtype):
    inv_freq = 1.0 / 1e4 ** (torch.arange(0, rot, 2, dtype=torch.float32, device=DEV) / rot)
    cos, sin = ops.rope_cos_sin(inv_freq, positions[None], 1.0, dtype)
    return cos[0], sin[0]


# Five tokens of three requests, out of request order, at scattered slots (request 0's span two pages).
SEQ = [0, 0, 2, 1, 2]
POS = [7, 8, 17, 3, 18]
S_MAX, PAGE = 21, 8


def _cache(lead, n_req, hkv, d, dtype, paged, gen):
    """A cache with random contents (NaN in one corner), and for paged ones a shuffled block table with garbage in
    the entries no token reaches."""
    per_req = -(-S_MAX // PAGE)
    rows = n_req * per_req + 2 if paged else n_req
    cache = _rand(*lead, rows, hkv, PAGE if paged else S_MAX, d, gen=gen, dtype=dtype)
    cache[..., -1, :, :2, :] = float("nan")
    if not paged:
        return cache, None
    bt = torch.randperm(rows, generator=gen)[: n_req * per_req].view(n_req, per_req).to(DEV, torch.int32)
    bt[1, 1:] = 9999  # request 1 only reaches its first page
    return cache, bt


def _check_writes(after, before, bt, seq_idx, positions):
    """Token i's slot (request seq_idx[i], position positions[i]) of a cache [(layers,) rows, Hkv, S, D] is written
    (finite) and every other element is bit for bit as before."""
    rows = bt[seq_idx.long(), positions.long() // PAGE].long() if bt is not None else seq_idx.long()
    slots = positions.long() % PAGE if bt is not None else positions.long()
    written = torch.zeros(before.shape[-4], before.shape[-2], dtype=torch.bool, device=DEV)
    written[rows, slots] = True
    written = written[:, None, :, None].expand(before.shape)
    assert torch.isfinite(after[written]).all()
    kept, old = after[~written], before[~written]
    assert torch.equal(kept.isnan(), old.isnan()) and torch.equal(kept.nan_to_num(), old.nan_to_num())


@pytest.mark.parametrize(
    "dtype,style,cache",
    [
        (torch.float32, "qwen35", "paged"),
        (torch.float16, "qwen35", "contiguous"),
        (torch.float16, "qwen35", "none"),
        (torch.float32, "qwen3", "contiguous"),
        (torch.float16, "qwen3", "paged"),
        (torch.float32, "qwen3", "none"),
    ],
)
def test_qk_norm_rope(dtype, style, cache):
    gen = torch.Generator().manual_seed(4)
    gated = zero_centered = style == "qwen35"
    hq, hkv, d, rot = 3, 1, 16, 8 if style == "qwen35" else 16
    tokens = len(SEQ)
    seq_idx, positions = torch.tensor(SEQ, device=DEV), torch.tensor(POS, device=DEV, dtype=torch.int32)
    q_proj = _rand(tokens, hq * d * (2 if gated else 1), gen=gen, dtype=dtype)
    k_proj = _rand(tokens, hkv * d, gen=gen, dtype=dtype)
    v_proj = _rand(tokens, hkv * d, gen=gen, dtype=dtype)
    qw, kw = _rand(d, gen=gen, dtype=dtype, scale=0.2), _rand(d, gen=gen, dtype=dtype, scale=0.2)
    cos, sin = _cos_sin(positions, rot, dtype)
    bufs = [_nan(tokens, hq, d, dtype=dtype), _nan(tokens, hkv, d, dtype=dtype), _nan(tokens, hq * d, dtype=dtype)]
    extra = {}
    if cache != "none":
        kc, bt = _cache((), 3, hkv, d, dtype, cache == "paged", gen)
        bufs += [kc, kc.clone()]
        extra = dict(v_proj=v_proj, seq_idx=seq_idx, positions=positions, block_table=bt)
    results = []
    for fn, b in zip((fused_ops.qk_norm_rope, ref.qk_norm_rope), _twins(*bufs)):
        caches = dict(k_cache=b[3], v_cache=b[4]) if cache != "none" else {}
        res = fn(
            q_proj, k_proj, qw, kw, cos, sin, num_q_heads=hq, num_kv_heads=hkv, eps=EPS, gated=gated,
            zero_centered=zero_centered, q_out=b[0], k_out=b[1], gate_out=b[2] if gated else None, **extra, **caches,
        )  # fmt: skip
        assert res[0] is b[0] and res[1] is b[1] and (res[2] is b[2] if gated else res[2] is None)
        results.append(b if gated else b[:2] + b[3:])
    for got, want in zip(*results):
        _same(want, got, TOL[dtype])
    if cache != "none":
        for after in results[1][-2:]:
            _check_writes(after, kc, bt, seq_idx, positions)
    if not gated:  # fresh outputs when no buffers are given
        q, k, g = ref.qk_norm_rope(
            q_proj, k_proj, qw, kw, cos, sin, num_q_heads=hq, num_kv_heads=hkv, eps=EPS, gated=False,
            zero_centered=False,
        )  # fmt: skip
        _same(q, results[0][0], TOL[dtype])
        assert g is None and k.shape == (tokens, hkv, d)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_context_kv_project(dtype, paged):
    gen = torch.Generator().manual_seed(5)
    layers, hkv, d, hidden = 2, 2, 16, 24
    tokens = len(SEQ)
    seq_idx, positions = torch.tensor(SEQ, device=DEV, dtype=torch.int32), torch.tensor(POS, device=DEV)
    c = _rand(tokens, hidden, gen=gen, dtype=dtype)
    w_kv = _rand(layers * 2 * hkv * d, hidden, gen=gen, dtype=dtype, scale=0.2)
    kw = _rand(layers, d, gen=gen, dtype=dtype, scale=0.2)
    cos, sin = _cos_sin(positions, d, dtype)
    kc, bt = _cache((layers,), 3, hkv, d, dtype, paged, gen)
    twins = _twins(kc, kc.clone())
    for fn, (k_cache, v_cache) in zip((fused_ops.context_kv_project, ref.context_kv_project), twins):
        assert fn(c, w_kv, kw, cos, sin, k_cache, v_cache, seq_idx, positions, eps=EPS, block_table=bt) is None
    for got, want in zip(*twins):
        _same(want, got, TOL[dtype])
    for after in twins[1]:
        _check_writes(after, kc, bt, seq_idx, positions)


# ---- attention -----------------------------------------------------------------------------------------------------

LENS = [0, 9, 22]  # cached keys per request


def _kv_caches(n_req, hkv, d, total, layout, dtype, gen):
    """Caches holding `total[n]` keys per request, NaN after them; paged: shuffled pages of 8, unused ones NaN,
    block-table entries past a request's keys garbage."""
    s_max = 29
    k, v = _rand(n_req, hkv, s_max, d, gen=gen, dtype=dtype), _rand(n_req, hkv, s_max, d, gen=gen, dtype=dtype)
    for n, length in enumerate(total):
        k[n, :, length:] = v[n, :, length:] = float("nan")
    if layout == "contiguous":
        return k, v, None
    page, per_req = 8, -(-s_max // 8)
    pool = n_req * per_req + 3
    perm = torch.randperm(pool, generator=gen)[: n_req * per_req].view(n_req, per_req).to(DEV)
    caches = []
    for c in (k, v):
        paged = _nan(pool, hkv, page, d, dtype=dtype)
        padded = torch.nn.functional.pad(c, (0, 0, 0, per_req * page - s_max), value=float("nan"))
        paged[perm.flatten()] = padded.view(n_req, hkv, per_req, page, d).transpose(1, 2).flatten(0, 1)
        if layout == "paged_nhd":  # an NHD pool [P, PAGE, Hkv, D] passed as its transposed view
            paged = paged.transpose(1, 2).contiguous().transpose(1, 2)
        caches.append(paged)
    bt = perm.to(torch.int32)
    for n, length in enumerate(total):
        bt[n, -(-length // page) :] = 12345
    return *caches, bt


def _attention_pair(kernel_fn, ref_fn, q, args, dtype, **kw):
    outs = _twins(_nan(*q.shape, dtype=dtype))
    got = kernel_fn(q, *args, out=outs[0][0], **kw)
    want = ref_fn(q, *args, out=outs[1][0], **kw)
    assert got is outs[0][0] and want is outs[1][0]
    assert torch.isfinite(want).all()
    _same(want, got, TOL[dtype])
    _same(ref_fn(q, *args, **{**kw, "num_splits": None}), got, TOL[dtype])


@pytest.mark.parametrize(
    "layout,splits,window", [("contiguous", 1, 0), ("contiguous", 1, 6), ("paged", 2, 6), ("paged_nhd", 1, 0)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_verify_attention(dtype, layout, splits, window):
    gen = torch.Generator().manual_seed(6)
    t, hq, hkv, d = 5, 4, 2, 16
    lens = torch.tensor(LENS, device=DEV, dtype=torch.int32)
    k, v, bt = _kv_caches(3, hkv, d, [n + t for n in LENS], layout, dtype, gen)
    q = _rand(3, t, hq, d, gen=gen, dtype=dtype)
    _attention_pair(
        attention.verify_attention, ref.verify_attention, q, (k, v, lens), dtype,
        block_table=bt, window=window, num_splits=splits,
    )  # fmt: skip


@pytest.mark.parametrize(
    "layout,causal,window",
    [("contiguous", False, 0), ("contiguous", True, 6), ("paged", False, 0), ("paged", True, 0)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_draft_attention(dtype, layout, causal, window):
    gen = torch.Generator().manual_seed(7)
    t, hq, hkv, d = 5, 4, 2, 16
    lens = torch.tensor(LENS, device=DEV)
    k, v, bt = _kv_caches(3, hkv, d, LENS, layout, dtype, gen)
    q = _rand(3, t, hq, d, gen=gen, dtype=dtype)
    kb, vb = _rand(3, t, hkv, d, gen=gen, dtype=dtype), _rand(3, t, hkv, d, gen=gen, dtype=dtype)
    _attention_pair(
        attention.draft_attention, ref.draft_attention, q, (kb, vb, k, v, lens), dtype,
        block_table=bt, causal=causal, window=window, scale=0.3, num_splits=2,
    )  # fmt: skip


# ---- Gated DeltaNet ------------------------------------------------------------------------------------------------

HEADS, HV, DK, DV = 1, 2, 16, 16  # two value heads share the qk head


def _gdn_inputs(bsz, seq, dtype, gen):
    """q/k/v as views into one conv output and a/b into one projection, as in the model."""
    y = _rand(bsz, seq, 2 * HEADS * DK + HV * DV, gen=gen, dtype=dtype)
    q = y[..., : HEADS * DK].unflatten(-1, (HEADS, DK))
    k = y[..., HEADS * DK : 2 * HEADS * DK].unflatten(-1, (HEADS, DK))
    v = y[..., 2 * HEADS * DK :].unflatten(-1, (HV, DV))
    ba = _rand(bsz, seq, 2 * HV, gen=gen, dtype=dtype)
    a_log = torch.rand(HV, generator=gen).mul(15).add(1).log().to(DEV)
    state = _rand(bsz, HV, DK, DV, gen=gen, scale=0.3)
    return q, k, v, ba[..., HV:], ba[..., :HV], a_log, _rand(HV, gen=gen, scale=0.5), state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_conv_update_and_window_commit(dtype):
    gen = torch.Generator().manual_seed(8)
    bsz, seq, chans, width = 4, 5, 37, 4
    x = _rand(bsz, seq, chans, gen=gen, dtype=dtype)
    window = _rand(bsz, chans, width - 1, gen=gen, dtype=dtype)
    weight = _rand(chans, width, gen=gen, dtype=dtype, scale=0.5)
    outs = _twins(_nan(bsz, seq, chans, dtype=dtype))
    got = gdn.causal_conv1d_update(x, window, weight, out=outs[0][0])
    want = ref.causal_conv1d_update(x, window, weight, out=outs[1][0])
    assert got is outs[0][0] and want is outs[1][0]
    _same(want, got, TOL[dtype])
    _same(ref.causal_conv1d_update(x, window, weight), got, TOL[dtype])
    idx = torch.tensor([2, -1, seq - 1, 0], device=DEV)
    (kw,), (rw,) = _twins(window)
    assert gdn.conv_window_commit(kw, x, idx) is kw and ref.conv_window_commit(rw, x, idx) is rw
    _same(rw, kw, 0.0)
    assert torch.equal(rw[1], window[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gdn_verify_and_commit_deltas(dtype):
    """Verify writing the update rows, then commit different positions per request (one keeping its state, one
    past the block); the layer commit (conv window, the block's keys and gates kept); and a verify over that
    pending block: the launchers and the references alike."""
    gen = torch.Generator().manual_seed(9)
    bsz, seq = 4, 5
    q, k, v, a, b, a_log, dt_bias, state = _gdn_inputs(bsz, seq, dtype, gen)
    runs = []
    for mod, (st, out, deltas) in zip(
        (gdn, ref), _twins(state, _nan(bsz, seq, HV, DV, dtype=dtype), _nan(bsz, seq, HV, DV))
    ):
        o = mod.gdn_verify(q, k, v, a, b, a_log, dt_bias, st, out=out, deltas=deltas)
        assert o is out and torch.equal(st, state), "verify leaves the state unchanged"
        runs.append((o, deltas, st))
    (ko, kd, kst), (ro, rd, rst) = runs
    _same(ro, ko, TOL[dtype])
    _same(rd, kd, 1e-5)

    idx = torch.tensor([4, -1, 1, 7], device=DEV)
    (kc,), (rc,) = _twins(state)
    assert gdn.gdn_commit_deltas(kc, idx, k, kd, a, a_log, dt_bias) is kc
    assert ref.gdn_commit_deltas(rc, idx, k, rd, a, a_log, dt_bias) is rc
    _same(rc, kc, 1e-5)
    assert torch.equal(rc[1], state[1])

    window = _rand(bsz, 40, 3, gen=gen, dtype=dtype)
    x = _rand(bsz, seq, 40, gen=gen, dtype=dtype)
    pending = []
    for mod, (win, keys, gates) in zip(
        (gdn, ref), _twins(window, _nan(*k.shape, dtype=dtype), _nan(*a.shape, dtype=dtype))
    ):
        mod.gdn_commit(win, idx, x, k, a, keys, gates)
        pending.append((win, keys, gates))
    for kt, rt in zip(*pending):
        _same(rt, kt, 0.0)
    # the next block over that pending one: the committed state, then this block's rows in place of the old
    q2, k2, v2, a2, b2, *_ = _gdn_inputs(bsz, seq, dtype, gen)
    outs = []
    for mod, (st, rows), (_, keys, gates) in zip((gdn, ref), _twins(state, kd), pending):
        o = mod.gdn_verify(q2, k2, v2, a2, b2, a_log, dt_bias, st, pending_keys=keys, pending_gates=gates,
                           pending_rows=rows, pending_idx=idx)  # fmt: skip
        outs.append((o, st, rows))
    for kt, rt, tol in zip(*outs, (TOL[dtype], 1e-5, 1e-5)):
        _same(rt, kt, tol)
    _same(outs[1][1], rc, 1e-5)
    with pytest.raises(ValueError, match="^pending_rows: holds 3 positions, the verify block 5"):
        ref.gdn_verify(q2, k2, v2, a2, b2, a_log, dt_bias, state.clone(), pending_keys=keys[:, :3],
                       pending_gates=gates[:, :3], pending_rows=kd[:, :3], pending_idx=idx)  # fmt: skip


def test_gdn_recurrent_final_state_in_place():
    gen = torch.Generator().manual_seed(10)
    bsz, seq = 3, 5
    q, k, v, a, b, a_log, dt_bias, state = _gdn_inputs(bsz, seq, torch.float32, gen)
    twins = _twins(state, _nan(bsz, seq, HV, DV))
    for mod, (st, out) in zip((gdn, ref), twins):
        assert mod.gdn_recurrent(q, k, v, a, b, a_log, dt_bias, st, out=out, final_state=st) is out
    for got, want in zip(*twins):
        _same(want, got, 1e-5)
    o = ref.gdn_recurrent(q, k, v, a, b, a_log, dt_bias, state)
    _same(o, twins[0][1], 1e-5)


@pytest.mark.parametrize("dtype,in_place", [(torch.float32, True), (torch.float16, False)])
def test_gdn_chunked(dtype, in_place):
    gen = torch.Generator().manual_seed(11)
    bsz, seq = 2, 21
    q, k, v, a, b, a_log, dt_bias, state = _gdn_inputs(bsz, seq, dtype, gen)
    results = []
    for mod, (st, out) in zip((gdn, ref), _twins(state, _nan(bsz, seq, HV, DV, dtype=dtype))):
        o, final = mod.gdn_chunked(
            q, k, v, a, b, a_log, dt_bias, st, out=out, final_state=st if in_place else None, chunk_size=16,
            precision="ieee",
        )  # fmt: skip
        assert o is out and (final is st) == in_place and (in_place or torch.equal(st, state))
        results.append((o, final))
    _same(results[1][0], results[0][0], 1e-4 if dtype == torch.float32 else TOL[dtype])
    _same(results[1][1], results[0][1], 1e-4)


# ---- acceptance ----------------------------------------------------------------------------------------------------


def _same_result(got, want):
    assert type(want) is accept.AcceptResult
    for g, w in zip(got, want):
        assert w.dtype == torch.int64 and torch.equal(g, w), (got, want)


@pytest.mark.parametrize("bs,vocab", [(5, 37), (1, 37)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_greedy_accept(dtype, bs, vocab):
    gen = torch.Generator().manual_seed(12 + bs)
    logits = _rand(4, bs, vocab, gen=gen, dtype=dtype)
    drafts = _drafts_with_prefix(logits.argmax(-1).cpu(), gen, vocab).to(DEV, torch.int32)
    _same_result(accept.greedy_accept(drafts, logits), ref.greedy_accept(drafts, logits, block_v=16, chunk=32))


@pytest.mark.parametrize("case", ["probs", "probs_q_rows_bs", "logits", "zero_residual"])
def test_rejection_accept(case):
    gen = torch.Generator().manual_seed(13)
    n_req, bs, vocab = 5, 6, 37
    t_logits = torch.randn(n_req, bs, vocab, generator=gen) * 2
    d_logits = t_logits[:, : bs - 1] + torch.randn(n_req, bs - 1, vocab, generator=gen)
    if case == "probs_q_rows_bs":
        d_logits = torch.cat((d_logits, t_logits[:, -1:]), 1)
    temperature = 0.7 if case == "logits" else None
    target, draft = t_logits, d_logits
    if temperature is None:
        target, draft = t_logits.softmax(-1), d_logits.softmax(-1)
    if case == "zero_residual":
        draft = 2 * target[:, : bs - 1]  # q >= p: a rejection leaves no residual mass, the bonus comes from p
    q = (draft / (temperature or 1)).softmax(-1) if temperature else draft
    drafts = torch.multinomial(q[:, : bs - 1].reshape(-1, vocab) + 1e-6, 1, generator=gen).view(n_req, bs - 1)
    u_acc = torch.rand(n_req, bs - 1, generator=gen)
    u_acc[0] = 0.0  # every draft accepted
    u_samp = torch.rand(n_req, generator=gen)
    args = [x.to(DEV) for x in (drafts, target, draft, u_acc, u_samp)]
    want = ref.rejection_accept(*args, temperature=temperature)
    _same_result(accept.rejection_accept(*args, temperature=temperature, block_v=16, chunk=32), want)
    assert int(want.num_accepted[0]) == bs - 1 and (want.num_accepted < bs - 1).any()
