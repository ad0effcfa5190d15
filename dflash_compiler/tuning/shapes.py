"""The tunable calls of a model pair: every (op, shape, format) the batched step runs, from the configs alone.

Rows per call follow runtime/step_model.py: the target verifies batch x block tokens (fused GDN in-projection,
q/k/v with the gated query, SwiGLU gate_up, residual out-projections, lm_head), the drafter projects the verified
tokens' tapped features (fc), runs its block (q/k/v, o, MLP) and its lm_head on block - 1 rows; the verify
attention, the GDN verify recurrence and greedy acceptance run per request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import DFlashError
from ..models.config import DrafterConfig, TargetConfig
from .spaces import (
    AcceptShape,
    AttentionShape,
    ConvShape,
    DraftAttentionShape,
    GDNChunkedShape,
    GDNShape,
    LinearShape,
    m_bucket,
)

MODELS_DIR = Path(__file__).resolve().parent / "models"
PRESETS = ("qwen3.5-27b", "tiny")
QUANT_FORMATS = {"bf16": "bf16", "fp8": "fp8_channel", "int4": "int4_sym"}


@dataclass(frozen=True)
class Call:
    """One tunable call: a name (where in the model it runs) and its shape."""

    name: str
    shape: LinearShape | AttentionShape | DraftAttentionShape | GDNShape | GDNChunkedShape | ConvShape | AcceptShape

    @property
    def op(self) -> str:
        return self.shape.op

    @property
    def id(self) -> tuple[str, str, str]:
        return (self.shape.op, self.shape.key, self.shape.fmt)


def preset_dirs(name: str) -> tuple[Path, Path]:
    """(target dir, drafter dir) of a preset: the Qwen3.5-27B shapes, or the tiny pair that ships."""
    if name == "tiny":
        from ..runtime.engine import DEFAULT_PAIR

        return DEFAULT_PAIR / "target", DEFAULT_PAIR / "drafter"
    if name not in PRESETS:
        raise DFlashError(f"parameter 'shapes': {name!r} is not one of {', '.join(PRESETS)}")
    return MODELS_DIR / name / "target", MODELS_DIR / name / "drafter"


def model_calls(
    target: TargetConfig,
    drafter: DrafterConfig | None,
    quant: str,
    act: str,
    batches: Sequence[int],
    context: int,
    block_size: int | None = None,
    prefill_chunk: int = 0,
) -> list[Call]:
    """The distinct calls of the batched step at each batch size (the first name of a shape is kept), and with
    prefill_chunk those of a prefill chunk of that many tokens (one request, its last position's logits)."""
    if quant not in QUANT_FORMATS:
        raise DFlashError(f"parameter 'quant' must be one of {', '.join(QUANT_FORMATS)}, got {quant!r}")
    block = block_size or (drafter.block_size if drafter is not None else 1)
    t = target
    calls: dict[tuple, Call] = {}

    def fmt_for(k: int) -> str:
        fmt = QUANT_FORMATS[quant]
        if fmt == "bf16" or (fmt.startswith("int4") and k % 128):  # no whole INT4 groups: kept dense
            return act
        return fmt

    def linear(name: str, rows: int, n: int, k: int, epilogue: str = "none") -> None:
        shape = LinearShape(m_bucket(rows), n, k, fmt_for(k), epilogue, act)
        calls.setdefault(("linear", shape.key, shape.fmt), Call(name, shape))

    h = t.hidden_size
    if prefill_chunk:
        rows = prefill_chunk
        if t.gdn_layers:
            hv = t.linear_num_value_heads
            linear("prefill.gdn.in_proj", rows, t.gdn_conv_dim + t.gdn_value_dim + 2 * hv, h)
            linear("prefill.gdn.out_proj", rows, h, t.gdn_value_dim, "residual")
            dims = (1, rows, t.linear_num_key_heads, hv, t.linear_key_head_dim, t.linear_value_head_dim, act)
            calls.setdefault(("gdn_chunked", dims), Call("prefill.gdn.chunked", GDNChunkedShape(*dims)))
        if t.attention_layers:
            qw = t.num_heads * t.head_dim * (2 if t.attn_output_gate else 1)
            linear("prefill.attn.qkv", rows, qw + 2 * t.num_kv_heads * t.head_dim, h)
            linear("prefill.attn.o_proj", rows, h, t.num_heads * t.head_dim, "residual")
            shape = AttentionShape(1, rows, t.num_heads, t.num_kv_heads, t.head_dim, context, act)
            calls.setdefault(("attn", shape.key), Call("prefill.attn", shape))
        linear("prefill.mlp.gate_up", rows, 2 * t.intermediate_size, h, "swiglu")
        linear("prefill.mlp.down", rows, h, t.intermediate_size, "residual")
        if drafter is not None and block > 1:
            linear("prefill.drafter.fc", rows, h, len(drafter.target_layer_ids) * h)
    for batch in batches:
        rows = batch * block
        if t.gdn_layers:
            hv = t.linear_num_value_heads
            linear("target.gdn.in_proj", rows, t.gdn_conv_dim + t.gdn_value_dim + 2 * hv, h)
            linear("target.gdn.out_proj", rows, h, t.gdn_value_dim, "residual")
            dims = (batch, block, t.linear_num_key_heads, hv, t.linear_key_head_dim, t.linear_value_head_dim, act)
            calls.setdefault(("gdn", dims), Call("target.gdn.verify", GDNShape(*dims)))
            conv = ConvShape(batch, block, t.gdn_conv_dim, t.linear_conv_kernel_dim, act)
            calls.setdefault(("conv", conv.key), Call("target.gdn.conv", conv))
        if t.attention_layers:
            qw = t.num_heads * t.head_dim * (2 if t.attn_output_gate else 1)
            linear("target.attn.qkv", rows, qw + 2 * t.num_kv_heads * t.head_dim, h)
            linear("target.attn.o_proj", rows, h, t.num_heads * t.head_dim, "residual")
            shape = AttentionShape(batch, block, t.num_heads, t.num_kv_heads, t.head_dim, context, act)
            calls.setdefault(("attn", shape.key), Call("target.attn.verify", shape))
        linear("target.mlp.gate_up", rows, 2 * t.intermediate_size, h, "swiglu")
        linear("target.mlp.down", rows, h, t.intermediate_size, "residual")
        linear("target.lm_head", rows, t.vocab_size, h)
        if block > 1:
            shape = AcceptShape(batch, block, t.vocab_size, act)
            calls.setdefault(("accept", shape.key), Call("greedy_accept", shape))
        if drafter is not None and block > 1:
            d = drafter
            linear("drafter.fc", rows, h, len(d.target_layer_ids) * h)
            linear("drafter.attn.qkv", rows, (d.num_heads + 2 * d.num_kv_heads) * d.head_dim, h)
            linear("drafter.attn.o_proj", rows, h, d.num_heads * d.head_dim, "residual")
            if not any(d.causal_layers):  # sliding (causal, windowed) drafter layers are not in the space yet
                shape = DraftAttentionShape(batch, block, d.num_heads, d.num_kv_heads, d.head_dim, context, act)
                calls.setdefault(("draft_attn", shape.key), Call("drafter.attn", shape))
            linear("drafter.mlp.gate_up", rows, 2 * d.intermediate_size, h, "swiglu")
            linear("drafter.mlp.down", rows, h, d.intermediate_size, "residual")
            linear("drafter.lm_head", batch * (block - 1), t.vocab_size, h)
    return list(calls.values())


def select(calls: Sequence[Call], ops: Sequence[str] | None) -> list[Call]:
    """The calls named by `ops`: an op family (linear, verify_attention, draft_attention, gdn_verify,
    gdn_chunked, causal_conv1d_update, greedy_accept) or a call name (target.mlp.down), each matching every batch
    size."""
    if not ops:
        return list(calls)
    known = {c.op for c in calls} | {c.name for c in calls}
    for item in ops:
        if item not in known:
            raise DFlashError(
                f"parameter 'ops': {item!r} names no op or call of this model ({', '.join(sorted(known))})"
            )
    return [c for c in calls if c.op in ops or c.name in ops]
