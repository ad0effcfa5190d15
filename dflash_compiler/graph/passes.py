"""Passes: functions from IR to IR (graph module + weights), each returning how many rewrites it made.

fold_weights       ATen glue that reads only weights (a conv weight's slice, fp32 casts of gate parameters, the
                   drafter's stacked k-norms) becomes a weight, computed once when the weights are built
fuse_parallel      linears that read the same input (q/k/v and the gated query, gate/up, the GDN input
                   projections, every drafter layer's context k/v) become one GEMM over the concatenated weight
merge_slices       a concatenation of adjacent slices of one tensor is that range of it
fuse_swiglu        silu(gate) * up of a fused [gate; up] linear moves into that linear's epilogue
fuse_residual      `h + linear(x)` moves into the linear's epilogue
fuse_norm          an RMSNorm read only by linears moves into their prologue
fuse_gate          `x * sigmoid(gate)` read only by linears moves into their prologue
fuse_attention_gate  `attention * sigmoid(gate)` (the gated attention's output) moves into the verify attention's
                   epilogue
quantize           dense linears take FP8 (per channel or 128x128 block) or INT4 (group 128) weights, by
                   round-to-nearest
eliminate_dead     nodes whose results nothing reads, and the weights nothing reads
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch import fx

from ..codegen import weight_formats as wf
from . import ops as _ops  # noqa: F401  (registers torch.ops.dflash)
from .calibrate import moments_digest
from .ir import Recipe, Weights, is_dflash, op_arguments

aten = torch.ops.aten
dflash_linear = torch.ops.dflash.linear.default
_VERIFY_ATTENTION = torch.ops.dflash.verify_attention.default


def _set_weight(gm: fx.GraphModule, weights: Weights, recipe: Recipe, anchor: fx.Node) -> fx.Node:
    name = weights.add(recipe)
    if name not in gm._buffers:
        gm.register_buffer(name, weights.placeholder(name))
    with gm.graph.inserting_before(anchor):
        return gm.graph.get_attr(name)


def _set_linear(node: fx.Node, **changes) -> None:
    kw = op_arguments(node)
    kw.update(changes)
    node.args = (kw.pop("x"), kw.pop("weight"))
    node.kwargs = kw


def _weight_node(node: fx.Node) -> fx.Node | None:
    w = op_arguments(node)["weight"]
    return w if isinstance(w, fx.Node) and w.op == "get_attr" else None


# ---- fold_weights --------------------------------------------------------------------------------------------------

_NONDETERMINISTIC = {"rand", "randn", "randint", "rand_like", "randn_like", "bernoulli", "normal", "uniform"}


def fold_weights(gm: fx.GraphModule, weights: Weights) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        if target.namespace != "aten" or target._schema.is_mutable or target._opname in _NONDETERMINISTIC:
            continue
        inputs = node.all_input_nodes
        if not inputs or any(n.op != "get_attr" for n in inputs):
            continue
        names = tuple(dict.fromkeys(n.target for n in inputs))
        args, kwargs = node.args, node.kwargs

        def fn(*tensors, _args=args, _kwargs=kwargs, _names=names, _target=target):
            env = dict(zip(_names, tensors))
            resolve = lambda a: env[a.target] if isinstance(a, fx.Node) else a
            return _target(*fx.node.map_aggregate(_args, resolve), **fx.node.map_aggregate(_kwargs, resolve))

        example = fn(*(weights.placeholder(n) for n in names))
        if not isinstance(example, torch.Tensor):
            continue
        recipe = Recipe(names, lambda *t, _fn=fn: _fn(*t).contiguous(), tuple(example.shape), example.dtype,
                        f"fold {target}({', '.join(names)}) {fx.node.map_aggregate(args, str)}")  # fmt: skip
        new = _set_weight(gm, weights, recipe, node)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    return count


# ---- fuse_parallel -------------------------------------------------------------------------------------------------


def _cat_rows(*tensors: torch.Tensor) -> torch.Tensor:
    return torch.cat(tensors, dim=0)


def fuse_parallel(gm: fx.GraphModule, weights: Weights) -> int:
    groups: dict[tuple, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not dflash_linear:
            continue
        kw = op_arguments(node)
        w = _weight_node(node)
        if w is None or kw["fmt"] != "dense" or kw["residual"] is not None or kw["swiglu"]:
            continue
        bias = kw["bias"]
        if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
            continue
        dtype = weights.recipes[w.target].dtype
        groups.setdefault((kw["x"], bias is None, dtype), []).append(node)
    count = 0
    for (x, no_bias, dtype), nodes in groups.items():
        if len(nodes) < 2:
            continue
        ws = [_weight_node(n).target for n in nodes]
        rows = [weights.recipes[w].shape[0] for w in ws]
        k = weights.recipes[ws[0]].shape[1]
        if any(weights.recipes[w].shape[1] != k for w in ws):
            continue
        first = nodes[0]
        weight = _set_weight(gm, weights, Recipe(tuple(ws), _cat_rows, (sum(rows), k), dtype, "cat"), first)
        bias = None
        if not no_bias:
            bs = [op_arguments(n)["bias"].target for n in nodes]
            bias = _set_weight(gm, weights, Recipe(tuple(bs), _cat_rows, (sum(rows),), dtype, "cat"), first)
        with gm.graph.inserting_before(first):
            fused = gm.graph.call_function(dflash_linear, (x, weight), {"bias": bias})
            start = 0
            for node, n in zip(nodes, rows):
                part = gm.graph.call_function(aten.slice.Tensor, (fused, 1, start, start + n))
                node.replace_all_uses_with(part)
                start += n
        for node in nodes:
            gm.graph.erase_node(node)
        count += 1
    gm.graph.lint()
    return count


# ---- merge_slices --------------------------------------------------------------------------------------------------


def _column_slice(node) -> tuple[fx.Node, int, int] | None:
    """(base, start, stop) of a column slice of a 2-D tensor, else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target is not aten.slice.Tensor:
        return None
    base, dim, start, stop = (list(node.args) + [None, None, None])[:4]
    if dim not in (1, -1) or not isinstance(start, int) or not isinstance(stop, int):
        return None
    return base, start, stop


def _columns(node: fx.Node) -> int | None:
    """Columns of a dflash.linear result (its weight's rows, halved with swiglu)."""
    if node.op == "call_function" and node.target is dflash_linear:
        w = _weight_node(node)
        return None if w is None else node.graph.owning_module._buffers[w.target].shape[0]
    return None


def merge_slices(gm: fx.GraphModule, weights: Weights) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.cat.default:
            continue
        parts, dim = node.args[0], (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0))
        if dim not in (1, -1):
            continue
        slices = [_column_slice(p) for p in parts]
        if any(s is None for s in slices) or len({s[0] for s in slices}) != 1:
            continue
        if any(a[2] != b[1] for a, b in zip(slices, slices[1:])):
            continue
        base, start, stop = slices[0][0], slices[0][1], slices[-1][2]
        if start == 0 and stop == _columns(base):
            replacement = base
        else:
            with gm.graph.inserting_before(node):
                replacement = gm.graph.call_function(aten.slice.Tensor, (base, 1, start, stop))
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
        count += 1
    return count


# ---- epilogues -----------------------------------------------------------------------------------------------------


def fuse_swiglu(gm: fx.GraphModule, weights: Weights) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        if not is_dflash(node, "swiglu"):
            continue
        gate, up = (_column_slice(a) for a in node.args[:2])
        if gate is None or up is None or gate[0] is not up[0]:
            continue
        y = gate[0]
        half = gate[2] - gate[1]
        if y.target is not dflash_linear or gate[1] != 0 or up[1] != half or up[2] != 2 * half:
            continue
        if _columns(y) != 2 * half or len(y.users) != 2:
            continue
        kw = op_arguments(y)
        if kw["residual"] is not None or kw["bias"] is not None or kw["swiglu"]:
            continue
        _set_linear(y, swiglu=True)
        node.replace_all_uses_with(y)
        gm.graph.erase_node(node)
        count += 1
    eliminate_dead(gm, weights)
    return count


def fuse_residual(gm: fx.GraphModule, weights: Weights) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (aten.add.Tensor, operator.add):
            continue
        if len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
            continue
        for y, h in (node.args, node.args[::-1]):
            if not isinstance(y, fx.Node) or y.target is not dflash_linear or len(y.users) != 1:
                continue
            if not isinstance(h, fx.Node) or op_arguments(y)["residual"] is not None:
                continue
            if op_arguments(y)["swiglu"]:
                continue
            if _is_before(y, h):  # the residual must exist before the linear runs
                continue
            _set_linear(y, residual=h)
            node.replace_all_uses_with(y)
            gm.graph.erase_node(node)
            count += 1
            break
    return count


def _prologue_readers(node: fx.Node) -> list[fx.Node]:
    """node's readers if every one is a linear reading it as its input only and with no prologue yet (a fused
    prologue replaces the node for all of them), else []."""
    readers = list(node.users)
    for r in readers:
        args = op_arguments(r) if r.target is dflash_linear else None
        if args is None or args["x"] is not node or args["norm_weight"] is not None or args["x_gate"] is not None:
            return []
        if any(a is node for a in (*r.args[1:], *r.kwargs.values())):
            return []
    return readers


def fuse_norm(gm: fx.GraphModule, weights: Weights) -> int:
    """An RMSNorm whose every reader is a linear taking it as input moves into those linears' prologue (each
    computes the norm of its input rows itself: the normed activations are never written)."""
    count = 0
    for node in list(gm.graph.nodes):
        if not is_dflash(node, "rms_norm") or not node.users:
            continue
        norm = op_arguments(node)
        x, weight, eps, zero_centered = norm["x"], norm["weight"], norm["eps"], norm["zero_centered"]
        readers = _prologue_readers(node)
        if not readers:
            continue
        for r in readers:
            _set_linear(r, x=x, norm_weight=weight, norm_eps=eps, norm_zero_centered=zero_centered)
        gm.graph.erase_node(node)
        count += 1
    return count


def _shape(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _sigmoid_gates(gm: fx.GraphModule):
    """(node, x, sig, gate) for each `node = x * sig`, sig = sigmoid(gate), all of one shape (no broadcasting)."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (aten.mul.Tensor, operator.mul) or len(node.args) != 2:
            continue
        for x, sig in (node.args, node.args[::-1]):
            if not (isinstance(sig, fx.Node) and sig.target is aten.sigmoid.default and isinstance(x, fx.Node)):
                continue
            if _shape(x) is not None and _shape(x) == _shape(sig.args[0]) == _shape(node):
                yield node, x, sig, sig.args[0]
                break


def _erase_gate(gm: fx.GraphModule, node: fx.Node, sig: fx.Node) -> None:
    gm.graph.erase_node(node)
    if not sig.users:
        gm.graph.erase_node(sig)


def fuse_gate(gm: fx.GraphModule, weights: Weights) -> int:
    """`x * sigmoid(gate)` read only by linears as their input (the gated attention's output before o_proj) moves
    into those linears' prologue."""
    count = 0
    for node, x, sig, gate in _sigmoid_gates(gm):
        readers = _prologue_readers(node)
        if not readers:
            continue
        for r in readers:
            _set_linear(r, x=x, x_gate=gate)
        _erase_gate(gm, node, sig)
        count += 1
    return count


def fuse_attention_gate(gm: fx.GraphModule, weights: Weights) -> int:
    """`reshape(verify_attention(...)) * sigmoid(gate)` with gate the [N*T, Hq*D] rows the reshape gives (the gated
    attention's output gate) becomes the attention's own gate argument: its epilogue (or its splits' combine)
    applies it, and the two elementwise launches go. Runs after fuse_gate, which takes the gate into a linear's
    prologue where that pipeline has one."""
    count = 0
    for node, x, sig, gate in _sigmoid_gates(gm):
        if x.target not in (aten.reshape.default, aten.view.default) or len(x.users) != 1:
            continue
        att = x.args[0]
        if not (isinstance(att, fx.Node) and att.target is _VERIFY_ATTENTION and len(att.users) == 1):
            continue
        if len(att.args) != 6 or att.kwargs or not _is_before(gate, att):  # the gate must exist where it runs
            continue
        att.args = (*att.args, gate)
        node.replace_all_uses_with(x)
        _erase_gate(gm, node, sig)
        count += 1
    return count


def _is_before(a: fx.Node, b: fx.Node) -> bool:
    """Whether node a comes before node b in the graph."""
    for n in a.graph.nodes:
        if n is a:
            return True
        if n is b:
            return False
    return False


# ---- quantize ------------------------------------------------------------------------------------------------------

QUANT_FORMATS = {"fp8": "fp8_channel", "fp8_block": "fp8_block", "int4": "int4"}


def _quantizer(fmt: str) -> Callable[[torch.Tensor], object]:
    return {"fp8_channel": wf.quantize_fp8_channel, "fp8_block": wf.quantize_fp8_block,
            "int4": lambda w: wf.quantize_int4(w, group_size=128)}[fmt]  # fmt: skip


def quantize_weight(w: torch.Tensor, quant: str):
    """A dense weight [N, K] as the quantization pass converts it ("fp8", "fp8_block", "int4"), or None where the
    pass keeps it dense (INT4 without whole groups of 128 inputs)."""
    fmt = QUANT_FORMATS[quant]
    if fmt == "int4" and w.shape[1] % 128:
        return None
    return _quantizer(fmt)(w)


_COMPONENTS = {
    "fp8_channel": ("qweight", "scale", None),
    "fp8_block": ("qweight", "scale_inv", None),
    "int4": ("qweight", "scales", "qzeros"),
}


def _param_sources(weights: Weights, name: str) -> list[str]:
    """The model tensors a weight is built from (through concatenations and folds)."""
    if name in weights.recipes:
        return [src for part in weights.recipes[name].sources for src in _param_sources(weights, part)]
    return [name] if name in weights.sources else []


def quantize(quant: str, moments: dict[str, torch.Tensor] | None = None) -> Callable[[fx.GraphModule, Weights], int]:
    """The quantization pass for "fp8" (per output channel), "fp8_block" (128x128) or "int4" (group 128). INT4 with
    moments (graph/calibrate.py: mean squares of the linears' inputs by source weight) clips each group where the
    activation-weighted rounding error is smallest; weights without statistics are rounded to nearest."""
    fmt = QUANT_FORMATS[quant]
    quantizer = _quantizer(fmt)
    calibrated = moments is not None and fmt == "int4"
    digest = moments_digest(moments) if calibrated else ""

    def quantizer_for(weights: Weights, weight_name: str, k: int):
        """The quantizer of one weight and the name its recipe records."""
        if calibrated:
            importance = next((moments[src] for src in _param_sources(weights, weight_name) if src in moments), None)
            if importance is not None and importance.numel() == k:
                return (lambda w, imp=importance: wf.quantize_int4(w, group_size=128, importance=imp)), (
                    f"{fmt} calibrated {digest}"
                )
        return quantizer, fmt

    def run(gm: fx.GraphModule, weights: Weights) -> int:
        count = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target is not dflash_linear:
                continue
            kw = op_arguments(node)
            w = _weight_node(node)
            if w is None or kw["fmt"] != "dense":
                continue
            src = weights.recipes[w.target]
            example = quantize_weight(torch.zeros(src.shape, dtype=torch.float32, device="meta"), quant)
            if example is None:
                continue  # kept dense
            # the converted weight once, as an intermediate its tensors are read from
            convert, describe = quantizer_for(weights, w.target, src.shape[1])
            whole = weights.add(Recipe((w.target,), convert, tuple(src.shape), src.dtype, describe))
            parts = {}
            for field_name in _COMPONENTS[fmt]:
                if field_name is None or getattr(example, field_name) is None:
                    parts[field_name] = None
                    continue
                t = getattr(example, field_name)
                recipe = Recipe((whole,), lambda q, _f=field_name: getattr(q, _f).contiguous(), tuple(t.shape),
                                t.dtype, f"{fmt}.{field_name}")  # fmt: skip
                parts[field_name] = _set_weight(gm, weights, recipe, node)
            qweight, scale, zeros = (parts[f] if f else None for f in _COMPONENTS[fmt])
            _set_linear(node, weight=qweight, scale=scale, zeros=zeros, fmt=fmt, group_size=128)
            count += 1
        eliminate_dead(gm, weights)
        return count

    run.__name__ = f"quantize_{quant}" + (f"_calibrated_{digest}" if calibrated else "")
    return run


# ---- dead code -----------------------------------------------------------------------------------------------------


def eliminate_dead(gm: fx.GraphModule, weights: Weights) -> int:
    before = len(gm.graph.nodes)
    for node in list(gm.graph.nodes):  # export's dtype/device checks of `.to()` calls: nothing at run time
        if node.op == "call_function" and node.target is aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [b for b in gm._buffers if b not in used]:
        del gm._buffers[name]
    gm.recompile()
    return before - len(gm.graph.nodes)


FUSION_PASSES = (
    fold_weights,
    fuse_parallel,
    merge_slices,
    fuse_swiglu,
    fuse_residual,
    fuse_attention_gate,
    eliminate_dead,
)
# The prologue fusions remove the norm and gate launches in front of linears. Where the linear's kernel computes
# them in its loop they cost more than they save: on the H200 the Triton linear with these prologues took 21.3 ms of
# GPU time per Qwen3.5-27B BF16 AR step against 14.4 ms without them (the norm kernels they remove take 0.28 ms).
# Where x is quantized to FP8 in front of the GEMM (the tuned FP8 per-channel linears at decode sizes) the
# quantizing launch applies them: one launch instead of two (DFlash FP8 step at concurrency 1, 11.87 to 11.65 ms).
PROLOGUE_PASSES = (fuse_norm, fuse_gate)
PROLOGUE_QUANTS = ("fp8",)  # the quantizations whose pipeline has them by default


def default_passes(
    quant: str = "bf16", prologues: bool | None = None, moments: dict[str, torch.Tensor] | None = None
) -> list[Callable[[fx.GraphModule, Weights], int]]:
    """The pipeline: fusions (with the prologue fusions if asked, by default for PROLOGUE_QUANTS), then quantization
    of what is left dense (fused weights are quantized whole; moments: INT4's calibration statistics,
    graph/calibrate.py)."""
    passes = list(FUSION_PASSES)
    if prologues is None:
        prologues = quant in PROLOGUE_QUANTS
    if prologues:  # before the attention gate's fusion (the gate goes to a prologue first) and dead-code elimination
        at = next((i for i, p in enumerate(passes) if p in (fuse_attention_gate, eliminate_dead)), len(passes))
        passes[at:at] = PROLOGUE_PASSES
    if quant != "bf16":
        passes.append(quantize(quant, moments))
    return passes


def run_passes(gm: fx.GraphModule, weights: Weights, passes) -> dict[str, int]:
    """Runs passes in order; returns the rewrite count of each."""
    counts = {}
    for p in passes:
        counts[p.__name__] = p(gm, weights)
        gm.recompile()
    return counts
