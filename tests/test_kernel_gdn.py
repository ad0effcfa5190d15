"""Gated DeltaNet kernels (codegen/triton/gdn.py) against the reference ops in models/ops.py.

CPU: Triton's interpreter at small head dims (2 qk heads, 6 value heads, dims 16/32) in fp32/fp16. GPU (marked):
the real Qwen3.5-27B dims in bf16.
"""

from __future__ import annotations

import pytest
import torch

from dflash_compiler.codegen import reference
from dflash_compiler.codegen.triton import gdn
from dflash_compiler.models import ops

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _nan(*shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


def _gdn_inputs(bsz, seq, heads, hv, dk, dv, dtype, gen):
    """Post-conv q/k/v as views into one [B, T, C] conv output and a/b as views into one projection, as in the
    model, with fresh random values."""

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(DEV)

    y = rnd(bsz, seq, 2 * heads * dk + hv * dv).to(dtype)
    q = y[..., : heads * dk].unflatten(-1, (heads, dk))
    k = y[..., heads * dk : 2 * heads * dk].unflatten(-1, (heads, dk))
    v = y[..., 2 * heads * dk :].unflatten(-1, (hv, dv))
    ba = rnd(bsz, seq, 2 * hv).to(dtype)
    b, a = ba[..., :hv], ba[..., hv:]
    a_log = torch.rand(hv, generator=gen).mul(15).add(1).log().to(DEV)
    dt_bias = rnd(hv) * 0.5
    state = rnd(bsz, hv, dk, dv) * 0.3
    return q, k, v, a, b, a_log, dt_bias, state


def _reference(q, k, v, a, b, a_log, dt_bias, state):
    g, beta = ops.gdn_gates(a, b, a_log, dt_bias)
    return ops.gated_delta_rule_recurrent(q, k, v, g, beta, state, all_states=True)


def _close(name, got, want, tol):
    assert got.shape == want.shape, name
    assert torch.isfinite(got).all(), f"{name}: unwritten (NaN) elements"
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    assert err <= tol * max(scale, 1.0), f"{name}: max error {err:.3g} (scale {scale:.3g})"


def _accepted(bsz, seq, gen):
    """Different accepted indices per request, one of them -1 (keep the state) when the batch has room."""
    idx = torch.randint(0, seq, (bsz,), generator=gen)
    if bsz > 2:
        idx[1] = -1
    return idx.to(DEV)


def _ref_after(ref_states, state, idx):
    return torch.stack([state[i] if j < 0 else ref_states[i, j] for i, j in enumerate(idx.tolist())])


# ---------------------------------------------------------------------------------------------------- conv1d


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("bsz", "seq"), [(1, 1), (3, 3), (2, 7), (3, 16), (1, 37)])
def test_conv_update_and_commit(dtype, bsz, seq):
    gen = torch.Generator().manual_seed(seq * 10 + bsz)
    chans, width = 200, 4
    x = torch.randn(bsz, seq, chans, generator=gen).to(DEV, dtype)
    window = torch.randn(bsz, chans, width - 1, generator=gen).to(DEV, dtype)
    weight = torch.randn(chans, width, generator=gen).to(DEV, dtype)
    y = gdn.causal_conv1d_update(x, window, weight, out=_nan(bsz, seq, chans, dtype=dtype))
    y_ref, extended = ops.causal_conv1d(x.transpose(1, 2), window, weight)
    _close("y", y.float(), y_ref.transpose(1, 2).float(), 1e-5 if dtype == torch.float32 else 2e-3)

    idx = _accepted(bsz, seq, gen)
    committed = window.clone()
    gdn.conv_window_commit(committed, x, idx)
    assert torch.equal(committed, ops.conv_window_after(extended, idx, width))


@pytest.mark.parametrize("tile", [{}, {"block_t": 1, "block_c": 16, "num_warps": 1},
                                  {"block_t": 4, "block_c": 256, "num_warps": 4}])  # fmt: skip
def test_conv_update_strided_input(tile):
    """x as a strided slice of a wider projection output, at the default tile and at tuning points."""
    gen = torch.Generator().manual_seed(5)
    wide = torch.randn(2, 5, 300, generator=gen).to(DEV)
    x = wide[..., 50:250]
    window = torch.randn(2, 200, 3, generator=gen).to(DEV)
    weight = torch.randn(200, 4, generator=gen).to(DEV)
    y = gdn.causal_conv1d_update(x, window, weight, out=_nan(2, 5, 200), **tile)
    y_ref, _ = ops.causal_conv1d(x.transpose(1, 2), window, weight)
    _close("y", y, y_ref.transpose(1, 2), 1e-5)


# ------------------------------------------------------------------------------------------ verify / commit

SMALL = dict(heads=2, hv=6, dk=16, dv=16)


@pytest.mark.parametrize(
    ("dtype", "bsz", "seq", "unroll"),
    [
        (torch.float32, 3, 1, True),
        (torch.float32, 3, 3, False),
        (torch.float32, 3, 3, True),
        (torch.float32, 2, 7, False),
        (torch.float32, 2, 16, True),
        (torch.float32, 2, 16, False),
        (torch.float16, 1, 7, True),
        (torch.float16, 3, 16, True),
    ],
)
def test_recurrent_verify_both_loop_forms(dtype, bsz, seq, unroll):
    """Both loop forms of the recurrent kernel (unroll): o and the update rows (into NaN-filled buffers), the state
    left as it was, then the commit built from the rows."""
    gen = torch.Generator().manual_seed(100 + seq * 4 + bsz)
    q, k, v, a, b, a_log, dt_bias, state = _gdn_inputs(bsz, seq, **SMALL, dtype=dtype, gen=gen)
    o_ref, states_ref = _reference(q, k, v, a, b, a_log, dt_bias, state)
    hv, dv = SMALL["hv"], SMALL["dv"]
    live = state.clone()
    deltas = _nan(bsz, seq, hv, dv)
    o = gdn.gdn_verify(
        q, k, v, a, b, a_log, dt_bias, live, out=_nan(bsz, seq, hv, dv, dtype=dtype), deltas=deltas, unroll=unroll
    )
    _close("o", o.float(), o_ref.float(), 1e-5 if dtype == torch.float32 else 2e-3)
    assert torch.equal(live, state), "verify must leave the state unchanged"
    idx = _accepted(bsz, seq, gen)
    gdn.gdn_commit_deltas(live, idx, k, deltas, a, a_log, dt_bias)
    _close("committed state", live, _ref_after(states_ref, state, idx), 1e-5)


@pytest.mark.parametrize(("seq", "unroll"), [(1, True), (5, True), (5, False)])
def test_recurrent_final_state_in_place(seq, unroll):
    """Decode (and any plain run): the state after the last position written over the state itself."""
    bsz = 2
    gen = torch.Generator().manual_seed(20 + seq)
    q, k, v, a, b, a_log, dt_bias, state = _gdn_inputs(bsz, seq, **SMALL, dtype=torch.float32, gen=gen)
    o_ref, states_ref = _reference(q, k, v, a, b, a_log, dt_bias, state)
    live = state.clone()
    o = gdn.gdn_recurrent(
        q, k, v, a, b, a_log, dt_bias, live, out=_nan(bsz, seq, 6, 16), final_state=live, unroll=unroll
    )
    _close("o", o, o_ref, 1e-5)
    _close("final state", live, states_ref[:, -1], 1e-5)


# ---------------------------------------------------------------------------------------------------- chunked


@pytest.mark.parametrize(
    ("bsz", "seq", "dtype", "block_v", "block_k"),
    [(3, 1, torch.float32, 16, None), (3, 7, torch.float32, 16, 16), (2, 16, torch.float32, 32, None),
     (3, 16, torch.float16, 16, 16), (2, 23, torch.float32, 16, 16)],
)  # fmt: skip
def test_chunked_verify(bsz, seq, dtype, block_v, block_k):
    """The verify block as one UT/WY chunk (shorter than 16, 16, and over 16: two 16-row blocks merged), K whole
    or in chunks: its output against the position-by-position reference, the state left as it was."""
    gen = torch.Generator().manual_seed(300 + seq * 4 + bsz)
    q, k, v, a, b, a_log, dt_bias, state = _gdn_inputs(bsz, seq, heads=2, hv=6, dk=32, dv=32, dtype=dtype, gen=gen)
    o_ref, _ = _reference(q, k, v, a, b, a_log, dt_bias, state)
    live = state.clone()
    o = gdn.gdn_verify(
        q, k, v, a, b, a_log, dt_bias, live, out=_nan(bsz, seq, 6, 32, dtype=dtype), block_v=block_v,
        block_k=block_k, algorithm="chunked", precision="ieee",
    )  # fmt: skip
    _close("o", o.float(), o_ref.float(), 1e-4 if dtype == torch.float32 else 2e-3)
    assert torch.equal(live, state), "verify must leave the state unchanged"


@pytest.mark.parametrize(
    ("bsz", "seq", "dtype", "algorithm", "block_v", "block_k"),
    [(3, 1, torch.float32, "recurrent", 16, None), (3, 7, torch.float16, "recurrent", 32, None),
     (2, 16, torch.float32, "chunked", 16, None), (3, 5, torch.float16, "chunked", 32, 16),
     (3, 16, torch.float32, "recurrent", 16, None), (3, 11, torch.float16, "factored", 16, 16),
     (2, 23, torch.float32, "factored", 32, None)],
)  # fmt: skip
def test_verify_deltas_then_commit_from_them(bsz, seq, dtype, algorithm, block_v, block_k):
    """Each verify form writes the update rows of every position (into a NaN-filled buffer) as the reference
    recurrence forms them; the commit builds from them, in one step, the state after each request's accepted
    position (one keeps its state bit for bit) as the position-by-position reference reaches it, in K and V
    slices, either precision and either orientation."""
    gen = torch.Generator().manual_seed(700 + seq * 4 + bsz)
    heads, hv, dk, dv = 2, 6, 32, 32
    q, k, v, a, b, a_log, dt_bias, state = _gdn_inputs(bsz, seq, heads, hv, dk, dv, dtype=dtype, gen=gen)
    g, beta = ops.gdn_gates(a, b, a_log, dt_bias)
    deltas_ref = torch.empty(bsz, seq, hv, dv, device=DEV)
    _, states_ref = ops.gated_delta_rule_recurrent(q, k, v, g, beta, state, all_states=True, deltas=deltas_ref)
    deltas = _nan(bsz, seq, hv, dv)
    live = state.clone()
    options = {"algorithm": algorithm, "block_v": block_v}
    if algorithm != "recurrent":
        options.update(block_k=block_k, precision="ieee")
    if algorithm == "factored":
        # fp16 inputs with tf32x3: the state products' two-pass split
        options.update(factor_warps=2, precision="tf32x3" if dtype == torch.float16 else "ieee")
    o_ref = ops.gated_delta_rule_recurrent(q, k, v, g, beta, state)[0]
    o = gdn.gdn_verify(
        q, k, v, a, b, a_log, dt_bias, live, deltas=deltas, out=_nan(bsz, seq, hv, dv, dtype=dtype),
        **options,
    )  # fmt: skip
    _close("o", o.float(), o_ref.float(), 1e-4 if dtype == torch.float32 else 2e-3)
    _close("deltas", deltas, deltas_ref, 1e-4)
    assert torch.equal(live, state), "verify must leave the state unchanged"
    idx = _accepted(bsz, seq, gen)
    idx[0] = seq + 3  # past the block: the block's last position
    last = idx.clamp(max=seq - 1)
    for slices, precision in (
        ({"block_k": 16, "block_v": 32}, "ieee"), ({"block_k": 32, "block_v": 16}, "tf32x3"),
        ({"block_k": 16, "block_v": 32, "v_major": True}, "ieee"),
        ({"block_k": 32, "block_v": 16, "v_major": True}, "tf32x3"),
    ):  # fmt: skip
        got = state.clone()
        gdn.gdn_commit_deltas(got, idx, k, deltas, a, a_log, dt_bias, precision=precision, **slices)
        _close(f"committed state {slices} {precision}", got, _ref_after(states_ref, state, last), 1e-4)
        if bsz > 2:
            assert torch.equal(got[1], state[1]), "idx -1 keeps the state bit for bit"


def _pending_block(bsz, width, heads, hv, dk, dv, dtype, gen, state):
    """A pending block as the step leaves it: a verified block of `width` positions (its raw keys, gate inputs and
    the update rows its verify wrote from `state`), each request's accepted position (one past the block, one -1
    when the batch has room), and the reference state after it."""
    q, k, v, a, b, a_log, dt_bias, _ = _gdn_inputs(bsz, width, heads, hv, dk, dv, dtype=dtype, gen=gen)
    g, beta = ops.gdn_gates(a, b, a_log, dt_bias)
    rows = torch.empty(bsz, width, hv, dv, device=DEV)
    _, states = ops.gated_delta_rule_recurrent(q, k, v, g, beta, state, all_states=True, deltas=rows)
    idx = _accepted(bsz, width, gen)
    idx[0] = width + 2
    after = _ref_after(states, state, idx.clamp(max=width - 1))
    pending = dict(pending_keys=k.contiguous(), pending_gates=a.contiguous(), pending_rows=rows, pending_idx=idx)
    return pending, after, (a_log, dt_bias)


@pytest.mark.parametrize(
    ("bsz", "seq", "width", "dtype", "options"),
    [(3, 5, 7, torch.float32, {}), (3, 16, 16, torch.float16, {"block_v": 32, "unroll": True}),
     (2, 9, 16, torch.float32, {"algorithm": "chunked", "block_v": 16, "precision": "ieee"}),
     (3, 7, 11, torch.float32, {"algorithm": "chunked", "block_v": 16, "block_k": 16, "fused_commit": True}),
     (3, 16, 16, torch.float16, {"algorithm": "chunked", "block_v": 32, "precision": "tf32x3", "fused_commit": True}),
     (3, 11, 11, torch.float16, {"algorithm": "factored", "block_v": 16, "block_k": 16, "factor_warps": 2}),
     (3, 6, 23, torch.float32, {"algorithm": "factored", "block_v": 32, "precision": "ieee"}),
     (4, 16, 16, torch.float16, {"algorithm": "factored", "block_v": 32, "precision": "tf32x3"})],
)  # fmt: skip
def test_verify_makes_the_pending_block_current_first(bsz, seq, width, dtype, options):
    """A verify over a pending block (the last verified one, `width` wide, up to each request's accepted
    position): the state becomes the reference's state after that position (bit for bit where there is none), o is
    the verify of the new block from it, and the new block's update rows replace the pending rows' first `seq`
    positions (the rest untouched), as the reference verify writes them. Outputs start as NaN."""
    gen = torch.Generator().manual_seed(40 + seq * 3 + width)
    heads, hv, dk, dv = 2, 6, 32, 32
    state0 = torch.randn(bsz, hv, dk, dv, generator=gen).to(DEV) * 0.3
    pending, after, (a_log, dt_bias) = _pending_block(bsz, width, heads, hv, dk, dv, dtype, gen, state0)
    q, k, v, a, b, _, _, _ = _gdn_inputs(bsz, seq, heads, hv, dk, dv, dtype=dtype, gen=gen)
    g, beta = ops.gdn_gates(a, b, a_log, dt_bias)
    rows_ref = torch.empty(bsz, seq, hv, dv, device=DEV)
    o_ref, _ = ops.gated_delta_rule_recurrent(q, k, v, g, beta, after, deltas=rows_ref)
    # rows past each request's accepted position are never read: NaN there would reach the state
    past = torch.arange(width, device=DEV)[None, :] > pending["pending_idx"][:, None]
    pending["pending_rows"][past] = float("nan")
    tail = pending["pending_rows"][:, seq:].clone()
    state = state0.clone()
    o = gdn.gdn_verify(q, k, v, a, b, a_log, dt_bias, state, out=_nan(bsz, seq, hv, dv, dtype=dtype), **pending,
                       **options)  # fmt: skip
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    _close("state", state, after, 1e-4)
    if bsz > 2:
        assert torch.equal(state[1], state0[1]), "no pending block: the state stays bit for bit"
    _close("o", o.float(), o_ref.float(), tol)
    _close("update rows", pending["pending_rows"][:, :seq], rows_ref, 1e-4)
    torch.testing.assert_close(pending["pending_rows"][:, seq:], tail, rtol=0, atol=0, equal_nan=True)


def test_layer_commit_keeps_the_block_and_moves_the_window():
    """gdn_commit: the conv window after each request's position (one past the block, one -1), and the block's raw
    keys (strided views into the conv output) and gate inputs in the pending buffers' first T positions, the rest
    untouched; at 300 channels (three conv tiles, the last partial) and 3 x 32 key values (a partial key tile)."""
    gen = torch.Generator().manual_seed(5)
    bsz, seq, width, heads, hv, dk, dv = 3, 5, 8, 3, 6, 32, 16
    q, k, v, a, b, *_ = _gdn_inputs(bsz, seq, heads, hv, dk, dv, dtype=torch.float16, gen=gen)
    window = torch.randn(bsz, 300, 3, generator=gen).to(DEV, torch.float16)
    x = torch.randn(bsz, seq, 300, generator=gen).to(DEV, torch.float16)
    idx = torch.tensor([seq + 4, -1, 2], device=DEV)
    window_ref = reference.conv_window_commit(window.clone(), x, idx)
    keys = torch.randn(bsz, width, heads, dk, generator=gen).to(DEV, torch.float16)
    gates = torch.randn(bsz, width, hv, generator=gen).to(DEV, torch.float16)
    keys_tail, gates_tail = keys[:, seq:].clone(), gates[:, seq:].clone()
    gdn.gdn_commit(window, idx, x, k, a, keys, gates)
    assert torch.equal(window, window_ref)
    assert torch.equal(keys[:, :seq], k) and torch.equal(keys[:, seq:], keys_tail)
    assert torch.equal(gates[:, :seq], a) and torch.equal(gates[:, seq:], gates_tail)
    with pytest.raises(ValueError, match="^keys: expected contiguous"):
        gdn.gdn_commit(window, idx, x, k, a, keys[:, :4].contiguous(), gates)
    with pytest.raises(ValueError, match="^gates: expected contiguous"):
        gdn.gdn_commit(window, idx, x, k, a, keys, gates.float())
    with pytest.raises(ValueError, match="^k: expected \\[3, 5, H, K\\] with contiguous heads"):
        gdn.gdn_commit(window, idx, x, k.transpose(2, 3), a, keys, gates)
    with pytest.raises(ValueError, match="^a: expected \\[3, 5, HV\\]"):
        gdn.gdn_commit(window, idx, x, k, a[:, :4], keys, gates)


def test_pending_block_inputs_name_what_is_wrong():
    gen = torch.Generator().manual_seed(6)
    q, k, v, a, b, a_log, dt_bias, state = _gdn_inputs(2, 4, 2, 6, 32, 32, dtype=torch.float32, gen=gen)
    pending, _, _ = _pending_block(2, 4, 2, 6, 32, 32, torch.float32, gen, state)
    with pytest.raises(ValueError, match="^pending_keys: pending_keys, _gates, _rows and _idx go together"):
        gdn.gdn_verify(q, k, v, a, b, a_log, dt_bias, state, pending_keys=pending["pending_keys"])
    with pytest.raises(ValueError, match="^deltas: with a pending block the update rows go to pending_rows"):
        gdn.gdn_verify(q, k, v, a, b, a_log, dt_bias, state, deltas=torch.empty(2, 4, 6, 32, device=DEV), **pending)
    with pytest.raises(ValueError, match="^pending_rows: expected contiguous torch.float32"):
        gdn.gdn_verify(
            q, k, v, a, b, a_log, dt_bias, state, **{**pending, "pending_rows": pending["pending_rows"].half()}
        )
    narrow = {name: t[:, :3].contiguous() if t.dim() > 1 else t for name, t in pending.items()}
    with pytest.raises(ValueError, match="^pending_keys: the pending block holds 3 positions, the verify 4"):
        gdn.gdn_verify(q, k, v, a, b, a_log, dt_bias, state, **narrow)
    with pytest.raises(ValueError, match="^num_stages: only the chunked algorithms pipeline a K loop"):
        gdn.gdn_verify(q, k, v, a, b, a_log, dt_bias, state, num_stages=2, **pending)
    with pytest.raises(ValueError, match="^fused_commit: an option of the chunked algorithm"):
        gdn.gdn_verify(q, k, v, a, b, a_log, dt_bias, state, algorithm="factored", fused_commit=True, **pending)
    with pytest.raises(ValueError, match="^pending_idx: expected \\[2\\] integers"):
        gdn.gdn_verify(
            q, k, v, a, b, a_log, dt_bias, state, **{**pending, "pending_idx": pending["pending_idx"].float()}
        )


def test_delta_commit_names_what_is_wrong():
    gen = torch.Generator().manual_seed(9)
    q, k, v, a, b, a_log, dt_bias, state = _gdn_inputs(2, 4, 2, 6, 32, 32, dtype=torch.float32, gen=gen)
    deltas, idx = torch.zeros(2, 4, 6, 32, device=DEV), torch.tensor([1, 2], device=DEV)
    with pytest.raises(ValueError, match="deltas: expected contiguous fp32"):
        gdn.gdn_commit_deltas(state, idx, k, deltas.half(), a, a_log, dt_bias)
    with pytest.raises(ValueError, match="deltas: expected fp32 \\(2, 4, 6, 32\\) with contiguous rows"):
        gdn.gdn_verify(q, k, v, a, b, a_log, dt_bias, state, deltas=deltas[:, :3])
    with pytest.raises(ValueError, match="idx: expected \\[2\\] integer indices"):
        gdn.gdn_commit_deltas(state, idx.float(), k, deltas, a, a_log, dt_bias)
    with pytest.raises(ValueError, match="block_k: 48 must be a power of two"):
        gdn.gdn_commit_deltas(state, idx, k, deltas, a, a_log, dt_bias, block_k=48)
    with pytest.raises(ValueError, match="a: expected \\(2, 4, 6\\)"):
        gdn.gdn_commit_deltas(state, idx, k, deltas, a[:, :3], a_log, dt_bias)
    with pytest.raises(ValueError, match="state: expected contiguous fp32"):
        gdn.gdn_commit_deltas(state.half(), idx, k, deltas, a, a_log, dt_bias)
    with pytest.raises(ValueError, match="block_v: 64 must be a power of two >= 16 dividing V=32"):
        gdn.gdn_commit_deltas(state, idx, k, deltas, a, a_log, dt_bias, block_v=64)
    with pytest.raises(ValueError, match="precision: 'tf32' not in"):
        gdn.gdn_commit_deltas(state, idx, k, deltas, a, a_log, dt_bias, precision="tf32")
    with pytest.raises(ValueError, match="deltas: 5 value heads are not a multiple of 2 key heads"):
        gdn.gdn_commit_deltas(state, idx, k, deltas[:, :, :5].contiguous(), a, a_log, dt_bias)
    long_k = torch.zeros(2, 65, 2, 32, device=DEV)
    with pytest.raises(ValueError, match="k: a commit takes at most 64 positions, got 65"):
        gdn.gdn_commit_deltas(
            state, idx, long_k, torch.zeros(2, 65, 6, 32, device=DEV), torch.zeros(2, 65, 6, device=DEV), a_log,
            dt_bias,
        )  # fmt: skip
    with pytest.raises(ValueError, match="k: head dims must be powers of two >= 16, got K=8"):
        gdn.gdn_commit_deltas(state, idx, k[..., :8].contiguous(), deltas, a, a_log, dt_bias)


def test_chunked_block_options_are_its_own():
    gen = torch.Generator().manual_seed(5)
    q, k, v, a, b, a_log, dt_bias, state = _gdn_inputs(1, 3, **SMALL, dtype=torch.float32, gen=gen)
    with pytest.raises(ValueError, match="^algorithm:"):
        gdn.gdn_verify(q, k, v, a, b, a_log, dt_bias, state, algorithm="wy")
    with pytest.raises(ValueError, match="^unroll:"):
        gdn.gdn_verify(q, k, v, a, b, a_log, dt_bias, state, unroll=True, algorithm="chunked")
    with pytest.raises(ValueError, match="^precision:"):
        gdn.gdn_verify(q, k, v, a, b, a_log, dt_bias, state, precision="ieee")
    with pytest.raises(ValueError, match="^precision:"):
        gdn.gdn_verify(q, k, v, a, b, a_log, dt_bias, state, algorithm="chunked", precision="tf32")
    with pytest.raises(ValueError, match="^block_v:"):
        gdn.gdn_verify(q, k, v, a, b, a_log, dt_bias, state, block_v=8, algorithm="chunked")
    with pytest.raises(ValueError, match="^block_k:"):
        gdn.gdn_verify(q, k, v, a, b, a_log, dt_bias, state, block_k=8, algorithm="factored")
    with pytest.raises(ValueError, match="^block_k:"):
        gdn.gdn_verify(q, k, v, a, b, a_log, dt_bias, state, block_k=16)
    with pytest.raises(ValueError, match="^factor_warps: only the factored algorithm"):
        gdn.gdn_verify(q, k, v, a, b, a_log, dt_bias, state, algorithm="chunked", factor_warps=2)
    long = _gdn_inputs(1, 65, **SMALL, dtype=torch.float32, gen=gen)
    with pytest.raises(ValueError, match="^k: the chunked block takes at most 64 positions, got 65"):
        gdn.gdn_verify(*long, algorithm="chunked")
    narrow = _gdn_inputs(1, 3, heads=2, hv=6, dk=8, dv=16, dtype=torch.float32, gen=gen)
    with pytest.raises(ValueError, match="^k: head dim 8 < 16"):
        gdn.gdn_verify(*narrow, algorithm="chunked")


@pytest.mark.parametrize(
    ("bsz", "seq", "dtype", "precision", "chunk_size", "system", "fused"),
    [(2, 1, torch.float32, "ieee", None, "tf32x3", False), (1, 70, torch.float32, "ieee", None, "tf32x3", False),
     (2, 150, torch.float32, "ieee", 32, "tf32_refined", False), (2, 70, torch.float16, "ieee", None, "tf32x3", False),
     (2, 70, torch.float16, "half", 32, "tf32x3", False), (1, 150, torch.float16, "half", 64, "tf32_refined", False),
     (2, 45, torch.float16, "half", 16, "tf32", False), (2, 1, torch.float32, "ieee", None, "tf32x3", True),
     (2, 150, torch.float32, "ieee", 32, "tf32x3", True), (2, 70, torch.float16, "half", 32, "tf32", True),
     (1, 150, torch.float16, "half", 64, "tf32x3", True), (1, 200, torch.float16, "half", 64, "tf32", "blocked"),
     (2, 45, torch.float16, "half", 64, "tf32x3", "blocked"), (2, 130, torch.float16, "half", 64, "tf32", "both")],
)  # fmt: skip
def test_chunked(bsz, seq, dtype, precision, chunk_size, system, fused):
    """Against the chunked and the recurrent references; "half" keeps the chunks in fp16 between the kernels, which
    rounds each chunk's W, U, corrected values and starting state to 11 bits; fused computes the outputs in the
    state scan ("blocked": the system in 16-row blocks instead; "both": the two together)."""
    gen = torch.Generator().manual_seed(seq + bsz)
    q, k, v, a, b, a_log, dt_bias, state = _gdn_inputs(bsz, seq, heads=2, hv=6, dk=16, dv=32, dtype=dtype, gen=gen)
    g, beta = ops.gdn_gates(a, b, a_log, dt_bias)
    o_ref, s_ref = ops.gated_delta_rule_chunked(q, k, v, g, beta, state)
    _, s_rec = ops.gated_delta_rule_recurrent(q, k, v, g, beta, state)
    o, s = gdn.gdn_chunked(
        q, k, v, a, b, a_log, dt_bias, state, out=_nan(bsz, seq, 6, 32, dtype=dtype), final_state=_nan(*state.shape),
        chunk_size=chunk_size, block_v=16, precision=precision, system_precision=system,
        fused_output=fused in (True, "both"), blocked_system=fused in ("blocked", "both"),
    )  # fmt: skip
    half = precision == "half"
    _close("o", o.float(), o_ref.float(), 1e-4 if dtype == torch.float32 else 5e-3 if half else 2e-3)
    _close("final state", s, s_ref, 5e-3 if half else 1e-4)
    _close("final state vs recurrent", s, s_rec, 5e-3 if half else 1e-4)


# -------------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_name_the_parameter():
    gen = torch.Generator().manual_seed(0)
    q, k, v, a, b, a_log, dt_bias, state = _gdn_inputs(1, 3, **SMALL, dtype=torch.float32, gen=gen)
    with pytest.raises(ValueError, match="^state:"):
        gdn.gdn_verify(q, k, v, a, b, a_log, dt_bias, state.double())
    with pytest.raises(ValueError, match="^a:"):
        gdn.gdn_verify(q, k, v, a[:, :2], b, a_log, dt_bias, state)
    with pytest.raises(ValueError, match="^idx:"):
        gdn.gdn_commit_deltas(state, torch.zeros(2, dtype=torch.long, device=DEV), k, _nan(1, 3, 6, 16), a, a_log,
                              dt_bias)  # fmt: skip
    with pytest.raises(ValueError, match="^window:"):
        gdn.causal_conv1d_update(torch.randn(1, 3, 8, device=DEV), torch.randn(1, 8, 2, device=DEV), torch.randn(8, 4))
    with pytest.raises(ValueError, match="^chunk_size:"):
        gdn.gdn_chunked(q, k, v, a, b, a_log, dt_bias, state, chunk_size=48)
    with pytest.raises(ValueError, match="^precision: 'half' keeps the chunks in v's 16-bit dtype; v is torch.float32"):
        gdn.gdn_chunked(q, k, v, a, b, a_log, dt_bias, state, precision="half")
    with pytest.raises(ValueError, match="^system_precision: 'ieee' not in tf32x3/tf32/tf32_refined"):
        gdn.gdn_chunked(q, k, v, a, b, a_log, dt_bias, state, system_precision="ieee")
    with pytest.raises(ValueError, match="^blocked_system: solves 64-token chunks in 'half' at tf32 or tf32x3; got "
                                         "chunk_size 32, precision 'tf32'"):  # fmt: skip
        gdn.gdn_chunked(q, k, v, a, b, a_log, dt_bias, state, chunk_size=32, blocked_system=True)
    x, window, weight = torch.randn(1, 3, 32, device=DEV), torch.randn(1, 32, 3, device=DEV), torch.randn(32, 4)
    with pytest.raises(ValueError, match="^block_t: 3 must be a power of two <= 64"):
        gdn.causal_conv1d_update(x, window, weight.to(DEV), block_t=3)
    with pytest.raises(ValueError, match="^block_c: 8 must be a power of two >= 16"):
        gdn.causal_conv1d_update(x, window, weight.to(DEV), block_c=8)


# ------------------------------------------------------------------------------------------ GPU, real dims

REAL = dict(heads=16, hv=48, dk=128, dv=128)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("bsz", "precision", "block_k"), [(3, "tf32x3", None), (16, "tf32x3", 32), (3, "ieee", 64), (3, "tf32x3", 16)]
)
def test_gpu_chunked_verify_real_dims(bsz, precision, block_k):
    """The chunked verify block at the real dims in bf16, against the position-by-position reference, and within
    bf16 rounding of the recurrent kernel."""
    seq = 16
    gen = torch.Generator().manual_seed(2)
    q, k, v, a, b, a_log, dt_bias, state = _gdn_inputs(bsz, seq, **REAL, dtype=torch.bfloat16, gen=gen)
    o_ref, _ = _reference(q, k, v, a, b, a_log, dt_bias, state)
    o = gdn.gdn_verify(
        q, k, v, a, b, a_log, dt_bias, state, out=_nan(bsz, seq, 48, 128, dtype=torch.bfloat16),
        algorithm="chunked", precision=precision, block_k=block_k,
    )  # fmt: skip
    _close("o", o.float(), o_ref.float(), 1e-2)
    recurrent = gdn.gdn_verify(q, k, v, a, b, a_log, dt_bias, state)
    assert (o.float() - recurrent.float()).abs().max().item() <= 2 * 2**-8 * o_ref.abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize(("bsz", "algorithm", "config"), [
    (1, "recurrent", {}), (16, "chunked", {"block_k": 32, "block_v": 128}), (3, "chunked", {"block_k": 16}),
    (16, "chunked", {"block_k": 64, "block_v": 64, "num_warps": 8, "precision": "ieee"}),
    (1, "factored", {"block_k": 32}), (16, "factored", {"block_k": 32, "block_v": 128}),
    (16, "factored", {"block_k": 64, "block_v": 64, "v_major": True}),
    (3, "chunked", {"block_k": 32, "block_v": 32, "num_warps": 2, "v_major": True}),
    (16, "factored", {"block_k": 128, "block_v": 128, "num_warps": 8, "v_major": True, "precision": "ieee"}),
])  # fmt: skip
def test_gpu_verify_deltas_then_commit_real_dims(bsz, algorithm, config):
    """The update rows at the real dims in bf16 and the state built from them, against the position-by-position
    reference to about fp32 accuracy."""
    seq = 16
    gen = torch.Generator().manual_seed(3)
    q, k, v, a, b, a_log, dt_bias, state = _gdn_inputs(bsz, seq, **REAL, dtype=torch.bfloat16, gen=gen)
    g, beta = ops.gdn_gates(a, b, a_log, dt_bias)
    deltas_ref = torch.empty(bsz, seq, 48, 128, device=DEV)
    _, states_ref = ops.gated_delta_rule_recurrent(q, k, v, g, beta, state, all_states=True, deltas=deltas_ref)
    deltas = _nan(bsz, seq, 48, 128)
    gdn.gdn_verify(q, k, v, a, b, a_log, dt_bias, state, deltas=deltas, algorithm=algorithm)
    _close("deltas", deltas, deltas_ref, 1e-4)
    idx = torch.randint(-1, seq, (bsz,), generator=gen).to(DEV)
    live = state.clone()
    gdn.gdn_commit_deltas(live, idx, k, deltas, a, a_log, dt_bias, **config)
    _close("committed state", live, _ref_after(states_ref, state, idx), 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize(("bsz", "config"), [
    (1, {"block_k": 128, "block_v": 32}), (16, {"block_k": 32, "block_v": 128, "factor_warps": 2}),
    (5, {"block_k": 64, "block_v": 64, "num_warps": 8, "factor_warps": 1, "precision": "ieee"}),
    (16, {"block_k": 16, "block_v": 16, "num_warps": 2, "factor_warps": 8}),
])  # fmt: skip
def test_gpu_factored_verify_real_dims(bsz, config):
    """The factored verify at the real dims in bf16: o and the update rows (into NaN-filled buffers) against the
    position-by-position reference, and o within bf16 rounding of the one-launch chunked block."""
    seq = 16
    gen = torch.Generator().manual_seed(11 + bsz)
    q, k, v, a, b, a_log, dt_bias, state = _gdn_inputs(bsz, seq, **REAL, dtype=torch.bfloat16, gen=gen)
    g, beta = ops.gdn_gates(a, b, a_log, dt_bias)
    deltas_ref = torch.empty(bsz, seq, 48, 128, device=DEV)
    o_ref, _ = ops.gated_delta_rule_recurrent(q, k, v, g, beta, state, deltas=deltas_ref)
    deltas = _nan(bsz, seq, 48, 128)
    o = gdn.gdn_verify(
        q, k, v, a, b, a_log, dt_bias, state, deltas=deltas, algorithm="factored",
        out=_nan(bsz, seq, 48, 128, dtype=torch.bfloat16), **config,
    )  # fmt: skip
    _close("o", o.float(), o_ref.float(), 1e-2)
    _close("deltas", deltas, deltas_ref, 1e-4)
    chunked = gdn.gdn_verify(q, k, v, a, b, a_log, dt_bias, state, algorithm="chunked")
    assert (o.float() - chunked.float()).abs().max().item() <= 2 * 2**-8 * o_ref.abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize(("bsz", "options"), [
    (16, {"algorithm": "factored", "block_k": 32, "block_v": 64, "num_warps": 2, "factor_warps": 1}),
    (16, {"algorithm": "factored", "block_k": 64, "block_v": 128, "num_warps": 4, "factor_warps": 2}),
    (3, {"algorithm": "factored", "block_k": 128, "block_v": 32}),
    (1, {"algorithm": "chunked", "block_k": 128, "block_v": 32, "num_warps": 4}),
    (1, {"algorithm": "chunked", "block_k": 128, "block_v": 32, "num_warps": 4, "fused_commit": True}),
    (1, {"algorithm": "chunked", "block_k": 32, "block_v": 16, "num_warps": 4, "fused_commit": True}),
    (3, {}),
])  # fmt: skip
def test_gpu_verify_over_a_pending_block_real_dims(bsz, options):
    """The verify over a pending block at the real dims in bf16 (16 positions each): the state after the pending
    block's accepted positions to about fp32 accuracy, o within bf16 rounding and the new update rows, against the
    position-by-position reference."""
    seq = 16
    gen = torch.Generator().manual_seed(21 + bsz)
    state0 = torch.randn(bsz, 48, 128, 128, generator=gen).to(DEV) * 0.3
    pending, after, (a_log, dt_bias) = _pending_block(bsz, seq, **REAL, dtype=torch.bfloat16, gen=gen, state=state0)
    q, k, v, a, b, _, _, _ = _gdn_inputs(bsz, seq, **REAL, dtype=torch.bfloat16, gen=gen)
    g, beta = ops.gdn_gates(a, b, a_log, dt_bias)
    rows_ref = torch.empty(bsz, seq, 48, 128, device=DEV)
    o_ref, _ = ops.gated_delta_rule_recurrent(q, k, v, g, beta, after, deltas=rows_ref)
    state = state0.clone()
    o = gdn.gdn_verify(q, k, v, a, b, a_log, dt_bias, state, out=_nan(bsz, seq, 48, 128, dtype=torch.bfloat16),
                       **pending, **options)  # fmt: skip
    _close("state", state, after, 1e-4)
    _close("o", o.float(), o_ref.float(), 1e-2)
    _close("update rows", pending["pending_rows"], rows_ref, 1e-4)


@pytest.mark.gpu
def test_gpu_conv_real_dims():
    bsz, seq, chans = 3, 16, 10240
    x = torch.randn(bsz, seq, chans, device=DEV, dtype=torch.bfloat16)
    window = torch.randn(bsz, chans, 3, device=DEV, dtype=torch.bfloat16)
    weight = torch.randn(chans, 4, device=DEV, dtype=torch.bfloat16) * 0.5
    y = gdn.causal_conv1d_update(x, window, weight, out=_nan(bsz, seq, chans, dtype=torch.bfloat16))
    y_ref, extended = ops.causal_conv1d(x.float().transpose(1, 2), window.float(), weight.float())
    _close("y", y.float(), y_ref.transpose(1, 2), 1e-2)
    idx = torch.tensor([0, 9, 15], device=DEV)
    gdn.conv_window_commit(window, x, idx)
    assert torch.equal(window.float(), ops.conv_window_after(extended, idx, 4))


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("precision", "system_precision", "fused", "blocked"),
    [(p, sp, fused, False) for p, sp in [("tf32", "tf32x3"), ("tf32x3", "tf32x3"), ("half", "tf32x3"), ("half", "tf32"),
                                         ("half", "tf32_refined")] for fused in (False, True)]
    + [("half", sp, fused, True) for sp in ("tf32", "tf32x3") for fused in (False, True)],
)  # fmt: skip
def test_gpu_chunked_real_dims(precision, system_precision, fused, blocked):
    """The chunked prefill at the real dims in bf16 against the chunked reference (fused: the outputs computed in
    the scan; blocked: the system in 16-row blocks, a "half" form)."""
    bsz, seq = 2, 300
    gen = torch.Generator().manual_seed(3)
    q, k, v, a, b, a_log, dt_bias, state = _gdn_inputs(bsz, seq, **REAL, dtype=torch.bfloat16, gen=gen)
    g, beta = ops.gdn_gates(a, b, a_log, dt_bias)
    o_ref, s_ref = ops.gated_delta_rule_chunked(q, k, v, g, beta, state)
    o, s = gdn.gdn_chunked(
        q, k, v, a, b, a_log, dt_bias, state, out=_nan(bsz, seq, 48, 128, dtype=torch.bfloat16),
        final_state=_nan(*state.shape), precision=precision, system_precision=system_precision,
        fused_output=fused, blocked_system=blocked, chunk_size=64,
    )  # fmt: skip
    _close("o", o.float(), o_ref.float(), 1e-2)
    _close("final state", s, s_ref, 1e-3 if precision == "tf32x3" else 1e-2)


@pytest.mark.gpu
def test_gpu_decode_in_place_real_dims():
    bsz = 16
    gen = torch.Generator().manual_seed(4)
    q, k, v, a, b, a_log, dt_bias, state = _gdn_inputs(bsz, 1, **REAL, dtype=torch.bfloat16, gen=gen)
    o_ref, states_ref = _reference(q, k, v, a, b, a_log, dt_bias, state)
    live = state.clone()
    o = gdn.gdn_recurrent(q, k, v, a, b, a_log, dt_bias, live, final_state=live)
    _close("o", o.float(), o_ref.float(), 1e-2)
    _close("state", live, states_ref[:, 0], 1e-4)


@pytest.mark.gpu
def test_gpu_more_requests_times_heads_than_a_grid_axis_holds():
    """Prefill and decode of 8200 requests x 8 value heads: over the 65535 programs of a CUDA grid's second axis."""
    bsz, seq = 8200, 3
    gen = torch.Generator().manual_seed(5)
    q, k, v, a, b, a_log, dt_bias, state = _gdn_inputs(bsz, seq, heads=4, hv=8, dk=16, dv=16, dtype=torch.float16,
                                                       gen=gen)  # fmt: skip
    g, beta = ops.gdn_gates(a, b, a_log, dt_bias)
    o_ref, s_ref = ops.gated_delta_rule_chunked(q, k, v, g, beta, state)
    o, s = gdn.gdn_chunked(q, k, v, a, b, a_log, dt_bias, state, final_state=_nan(*state.shape))
    _close("chunked o", o.float(), o_ref.float(), 1e-2)
    _close("chunked final state", s, s_ref, 1e-2)
    o = gdn.gdn_recurrent(q, k, v, a, b, a_log, dt_bias, state)
    _close("recurrent o", o.float(), o_ref.float(), 1e-2)


def test_the_default_chunk_follows_the_gpus_shared_memory():
    """64-token chunks where the prepare kernel's 128 KB fit (sm90, or no GPU named), 32 on sm120's 99 KB."""
    from dflash_compiler.codegen.triton.device import GpuFacts, compiling_for

    assert gdn.default_chunk_size(torch.device("cpu"), 128) == 64
    with compiling_for(GpuFacts((9, 0), 132, 232448)):
        assert gdn.default_chunk_size(torch.device("cpu"), 128) == 64
    with compiling_for(GpuFacts((12, 0), 188, 101376)):
        assert gdn.default_chunk_size(torch.device("cpu"), 128) == 32
        assert gdn.default_chunk_size(torch.device("cpu"), 64) == 64
