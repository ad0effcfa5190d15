"""Tiny-shape launches of the project's Triton kernels, for ahead-of-time compilation (tests/test_aot.py) and for
running the precompiled kernels on the GPU (tests/test_gpu_aot.py).

Each family function launches on `device` and returns (name, output, reference) triples: the reference is the
PyTorch computation the output must match (None where the kernel's own test holds the reference, e.g. attention).
The per-arch sets keep the CPU cross-compilation test short; `every_family` is the whole set.
"""

from __future__ import annotations

import torch

from dflash_compiler.codegen import weight_formats as wf
from dflash_compiler.codegen.triton import accept, attention, fused_ops, gdn, linear
from dflash_compiler.models import ops

DTYPE = torch.bfloat16
FORMATS = ("dense", "fp8_channel", "fp8_block", "int4_sym", "int4_asym")


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _weight(fmt: str, n: int, k: int, gen: torch.Generator, device) -> linear.Weight:
    w = torch.randn(n, k, generator=gen) * 0.05
    if fmt == "dense":
        return wf.DenseWeight(w.to(DTYPE)).to(device)
    if fmt == "fp8_channel":
        return wf.quantize_fp8_channel(w).to(device)
    if fmt == "fp8_block":
        return wf.quantize_fp8_block(w).to(device)
    return wf.quantize_int4(w, symmetric=fmt == "int4_sym").to(device)


def linears(device="cpu", formats=FORMATS):
    """y = x @ W^T for 9 tokens, one weight of 256 x 384 per format (the FP8 dot from sm89: its reference
    quantizes x the same way), and the dense SwiGLU epilogue."""
    gen = _gen()
    x = (torch.randn(9, 384, generator=gen)).to(DTYPE).to(device)
    out = []
    for fmt in formats:
        w = _weight(fmt, 256, 384, gen, device)
        y = linear.linear(x, w)
        xf = x.float()
        if isinstance(w, (wf.FP8ChannelWeight, wf.FP8BlockWeight)) and linear._fp8_hardware(x.device):
            xf = wf.dequantize_fp8_activations(*wf.quantize_fp8_activations(x))
        out.append((f"linear_{fmt}", y, xf @ w.dequantize().float().T))
    if "dense" in formats:
        w = _weight("dense", 512, 384, gen, device)
        gate, up = (x.float() @ w.dequantize().float().T).chunk(2, dim=-1)
        out.append(("linear_swiglu", linear.linear(x, w, swiglu=True), ops.swiglu(gate, up)))
    return out


def norms(device="cpu"):
    gen = _gen()
    x = torch.randn(5, 320, generator=gen).to(DTYPE).to(device)
    w = (1 + 0.1 * torch.randn(320, generator=gen)).to(DTYPE).to(device)
    return [("rms_norm", fused_ops.rms_norm(x, w, 1e-6), ops.rms_norm(x.float(), w.float(), 1e-6))]


def qk_rope(device="cpu"):
    gen = _gen()
    t, hq, hkv, d = 7, 4, 2, 64
    q = torch.randn(t, hq * 2 * d, generator=gen).to(DTYPE).to(device)
    k = torch.randn(t, hkv * d, generator=gen).to(DTYPE).to(device)
    qw = torch.ones(d, dtype=DTYPE, device=device)
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, d // 2, 2).float() / (d // 2))
    cos, sin = ops.rope_cos_sin(inv_freq, torch.arange(t), 1.0, DTYPE)
    q_out, _, gate = fused_ops.qk_norm_rope(
        q, k, qw, qw, cos.to(device), sin.to(device),
        num_q_heads=hq, num_kv_heads=hkv, eps=1e-6, gated=True, zero_centered=False,
    )  # fmt: skip
    return [("qk_norm_rope_gate", gate, q.view(t, hq, 2, d)[:, :, 1].reshape(t, hq * d).float()), ("qk", q_out, None)]


def attentions(device="cpu"):
    """Paged verify attention of 2 requests over 40 cached keys."""
    gen = _gen()
    n, t, hq, hkv, d, page = 2, 16, 4, 2, 64, 16
    q = torch.randn(n, t, hq, d, generator=gen).to(DTYPE).to(device)
    k_cache = torch.randn(8, hkv, page, d, generator=gen).to(DTYPE).to(device)
    v_cache = torch.randn(8, hkv, page, d, generator=gen).to(DTYPE).to(device)
    table = torch.arange(8, dtype=torch.int32).view(n, 4).to(device)
    lens = torch.tensor([40, 17], dtype=torch.int32, device=device)
    return [("verify_attention", attention.verify_attention(q, k_cache, v_cache, lens, block_table=table), None)]


def gdns(device="cpu"):
    """Two verify blocks of 16 tokens, 2 requests, as the step runs them: the first writes the update rows of the
    pending block, the second (factored) makes its accepted position current first, and the layer commit keeps the
    block's keys and gates and moves the conv window."""
    gen = _gen()
    b, t, h, hv, dk, dv = 2, 16, 2, 4, 64, 64
    q, k = (torch.randn(b, t, h, dk, generator=gen).to(DTYPE).to(device) for _ in range(2))
    v = torch.randn(b, t, hv, dv, generator=gen).to(DTYPE).to(device)
    a, bb = (torch.randn(b, t, hv, generator=gen).to(DTYPE).to(device) for _ in range(2))
    a_log = torch.randn(hv, generator=gen).to(device)
    dt_bias = torch.randn(hv, generator=gen).to(device)
    state = torch.randn(b, hv, dk, dv, generator=gen).to(device)
    rows = torch.empty(b, t, hv, dv, device=device)
    gdn.gdn_verify(q, k, v, a, bb, a_log, dt_bias, state, deltas=rows)
    keys, gates = k.clone(), a.clone()
    pending = dict(pending_keys=keys, pending_gates=gates, pending_rows=rows,
                   pending_idx=torch.tensor([3, -1], device=device))  # fmt: skip
    o = gdn.gdn_verify(q, k, v, a, bb, a_log, dt_bias, state, **pending, algorithm="factored")
    window = torch.randn(b, 160, 3, generator=gen).to(DTYPE).to(device)
    x = torch.randn(b, t, 160, generator=gen).to(DTYPE).to(device)
    idx = torch.tensor([3, 15], device=device)
    window_ref = ops.conv_window_after(torch.cat((window, x.transpose(1, 2)), -1), idx, 4)
    gdn.gdn_commit(window, idx, x, k, a, keys, gates)  # as the step commits
    return [("gdn_verify", o, None), ("gdn_verify state", state, None), ("gdn_commit", window, window_ref)]


def accepts(device="cpu"):
    gen = _gen()
    logits = torch.randn(3, 16, 1000, generator=gen).to(device)
    draft = logits[:, :15].argmax(-1)
    draft_ref = draft.clone()
    draft[1, 4] = (draft[1, 4] + 1) % 1000
    res = accept.greedy_accept(draft, logits)
    expected = torch.tensor([15, 4, 15], device=device)
    return [("greedy_accept", res.num_accepted, expected), ("argmax", accept.argmax(logits[:, :15]), draft_ref)]


def every_family(device="cpu"):
    return linears(device) + norms(device) + qk_rope(device) + attentions(device) + gdns(device) + accepts(device)


# Per-arch sets for the CPU test: every family on some arch, linear in every format across them.
def sm80():
    linears(formats=("dense", "int4_asym"))
    accepts()


def sm90():
    linears(formats=("fp8_channel",))
    norms()
    qk_rope()
    gdns()


def sm100():
    linears(formats=("fp8_block",))
    attentions()


def sm120():
    linears(formats=("int4_sym",))
    norms()
