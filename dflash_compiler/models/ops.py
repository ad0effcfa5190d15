"""Reference PyTorch ops. The model definitions are built from these, and every kernel is tested against them.

Each op is a plain function of tensors with no data-dependent Python control flow, so the step functions that
use them can be traced by torch.export and captured in CUDA graphs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool = False) -> torch.Tensor:
    """RMSNorm in fp32. Zero-centred norms (Qwen3.5) store weight as an offset from 1."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if zero_centered:
        return (xf * (1.0 + weight.float())).to(x.dtype)
    # Plain norms (Qwen3, Llama) cast before scaling, as their reference implementations do.
    return weight * xf.to(x.dtype)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The Gated DeltaNet output norm: normalise first, then gate with silu(gate); plain weight."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * xf.to(x.dtype)
    return (out * F.silu(gate.float())).to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [B, T, rotary_dim] for integer positions [B, T] (NeoX layout: frequencies repeated twice)."""
    freqs = positions.float().unsqueeze(-1) * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX rotate-half RoPE on the first cos.shape[-1] dims of x [B, H, T, D]; the rest pass through."""
    rot = cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Masked GQA attention. q [B, Hq, T, D], k/v [B, Hkv, S, D], mask [B, T, S] (True = may attend).

    Returns [B, Hq, T, D]. Every query row must allow at least one key.
    """
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.float()).to(q.dtype)


def causal_conv1d(x: torch.Tensor, window: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv1d + SiLU over a block, continuing from a window of earlier inputs.

    x [B, C, T], window [B, C, W-1] (the W-1 previous inputs, zeros at the start), weight [C, W].
    Returns (y [B, C, T], extended [B, C, W-1+T]); the window after block position t is
    extended[..., t+1 : t+W] (see conv_window_after).
    """
    extended = torch.cat((window.to(x.dtype), x), dim=-1)
    y = F.conv1d(extended.to(weight.dtype), weight.unsqueeze(1), groups=x.shape[1])
    return F.silu(y).to(x.dtype), extended


def conv_window_after(extended: torch.Tensor, index: torch.Tensor, width: int) -> torch.Tensor:
    """The conv window after block position index[b] (per batch row), from causal_conv1d's extended input."""
    offsets = torch.arange(width - 1, device=extended.device)
    cols = (index.view(-1, 1) + 1 + offsets).view(extended.shape[0], 1, width - 1)
    return torch.gather(extended, 2, cols.expand(-1, extended.shape[1], -1))


def gdn_gates(
    a: torch.Tensor, b: torch.Tensor, a_log: torch.Tensor, dt_bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-decay g = -exp(A_log) * softplus(a + dt_bias) (<= 0) and beta = sigmoid(b), both fp32."""
    return gdn_log_decay(a, a_log, dt_bias), b.float().sigmoid()


def gdn_log_decay(a: torch.Tensor, a_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """g = -exp(A_log) * softplus(a + dt_bias) (<= 0), fp32."""
    return -a_log.float().exp() * F.softplus(a.float() + dt_bias.float())


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def _prepare_qk(q: torch.Tensor, k: torch.Tensor, num_v_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalise q/k in fp32, scale q by Dk^-0.5, and expand the qk heads to the value heads (head hv uses hv//G)."""
    groups = num_v_heads // q.shape[2]
    q = _l2norm(q.float()) * q.shape[-1] ** -0.5
    k = _l2norm(k.float())
    return q.repeat_interleave(groups, dim=2), k.repeat_interleave(groups, dim=2)


def gated_delta_rule_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    all_states: bool = False,
    deltas: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule, one token at a time.

    q/k [B, T, H, Dk], v [B, T, HV, Dv], g/beta [B, T, HV], state [B, HV, Dk, Dv] (fp32).
    Returns (o [B, T, HV, Dv] in v's dtype, states): states is [B, T, HV, Dk, Dv], the state after every
    position, when all_states, else the final state [B, HV, Dk, Dv]. deltas [B, T, HV, Dv] fp32, if given, receives
    each position's update row d_t = beta_t (v_t - (e^g_t S_t-1)^T k_t): S_t = e^g_t S_t-1 + k_t d_t^T
    (gated_delta_commit rebuilds any position's state from them).
    """
    qh, kh = _prepare_qk(q, k, v.shape[2])
    vf = v.float()
    s = state.float()
    outs, states = [], []
    for t in range(q.shape[1]):
        s = s * g[:, t].float().exp()[..., None, None]
        kt = kh[:, t]
        u = torch.einsum("bhkv,bhk->bhv", s, kt)
        delta = beta[:, t].float()[..., None] * (vf[:, t] - u)
        if deltas is not None:
            deltas[:, t] = delta
        s = s + kt[..., :, None] * delta[..., None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", s, qh[:, t]))
        if all_states:
            states.append(s)
    o = torch.stack(outs, dim=1).to(v.dtype)
    return o, (torch.stack(states, dim=1) if all_states else s)


def gated_delta_commit(
    state: torch.Tensor, last: torch.Tensor, k: torch.Tensor, deltas: torch.Tensor, g: torch.Tensor
) -> torch.Tensor:
    """The state after block position last[b] (0 <= last[b] < T) from the block's initial state [B, HV, Dk, Dv] and
    its per-position keys k [B, T, H, Dk] (raw), update rows deltas [B, T, HV, Dv] and log decays g [B, T, HV]:
    S e^(c_last) + sum over t <= last of e^(c_last - c_t) k_t d_t^T, with c the running sum of g (the recurrence
    unrolled: every update decays by the gates after it)."""
    kh = _l2norm(k.float()).repeat_interleave(deltas.shape[2] // k.shape[2], dim=2)
    t = torch.arange(k.shape[1], device=k.device)
    live = (t[None, :] <= last.long()[:, None])[..., None]  # [B, T, 1]
    cum = torch.where(live, g.float(), 0.0).cumsum(1)
    c_last = cum[:, -1]  # [B, HV]: gates past last are 0
    weight = torch.where(live, (c_last[:, None] - cum).exp(), 0.0)  # [B, T, HV]
    update = torch.einsum("bthk,bthv->bhkv", kh * weight[..., None], deltas.float())
    return state.float() * c_last.exp()[..., None, None] + update


def gated_delta_rule_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same function as gated_delta_rule_recurrent (final state only), in the chunked UT/WY form for prefill."""
    bsz, seq_len = q.shape[:2]
    qh, kh = _prepare_qk(q, k, v.shape[2])
    # [B, HV, T, D] layout, fp32
    qh, kh = qh.transpose(1, 2), kh.transpose(1, 2)
    vf = v.float().transpose(1, 2)
    gf, bf = g.float().transpose(1, 2), beta.float().transpose(1, 2)
    pad = (chunk_size - seq_len % chunk_size) % chunk_size
    qh, kh, vf = (F.pad(x, (0, 0, 0, pad)) for x in (qh, kh, vf))
    gf, bf = F.pad(gf, (0, pad)), F.pad(bf, (0, pad))
    n = (seq_len + pad) // chunk_size
    heads = qh.shape[1]

    def chunks(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(bsz, heads, n, chunk_size, *x.shape[3:])

    qc, kc, vc, gc, bc = chunks(qh), chunks(kh), chunks(vf), chunks(gf), chunks(bf)
    cum = gc.cumsum(-1)  # log of the decay from the chunk start through position i
    lower = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    decay = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(~lower, float("-inf")).exp()  # [.., i, j]
    k_beta = kc * bc.unsqueeze(-1)
    # (I + A) W = B with A the strictly lower part (unitriangular solve ignores the rest): the corrected
    # values and decayed keys of the WY representation
    system = (k_beta @ kc.transpose(-1, -2)) * decay
    u = torch.linalg.solve_triangular(system, vc * bc.unsqueeze(-1), upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, k_beta * cum.exp().unsqueeze(-1), upper=False, unitriangular=True)
    attn = (qc @ kc.transpose(-1, -2)) * decay
    s = state.float()
    out = torch.empty_like(vc)
    for c in range(n):
        v_new = u[:, :, c] - w[:, :, c] @ s
        out[:, :, c] = (qc[:, :, c] * cum[:, :, c].exp().unsqueeze(-1)) @ s + attn[:, :, c] @ v_new
        last = cum[:, :, c, -1]
        k_tail = kc[:, :, c] * (last.unsqueeze(-1) - cum[:, :, c]).exp().unsqueeze(-1)
        s = s * last.exp()[..., None, None] + k_tail.transpose(-1, -2) @ v_new
    out = out.reshape(bsz, heads, -1, vf.shape[-1])[:, :, :seq_len].transpose(1, 2)
    return out.to(v.dtype), s
