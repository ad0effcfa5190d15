"""The compile pipeline for one speculative step: trace the models' step phases, run the passes, lower every op
node to an implementation, build the weights.

One graph per phase: the whole step (verify -> accept -> commit -> draft) per (sampled, simulated) with a dynamic
row count (one graph for every batch bucket), the first draft of a request joining (one row), and a prefill
chunk (dynamic length). Graphs are traced on the meta device, so compiling needs no weights; the weights are
built from the model's tensors by the recipes the passes left, shared by every graph.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx, nn

from ..codegen.inductor import GLUE_LOWERINGS, lower_glue
from ..errors import DFlashError
from ..models.config import DrafterConfig
from ..models.drafter import DFlashDrafter
from ..models.paged import PAGE_SIZE, Pools
from ..models.step import SpeculativeStep
from ..models.target import TargetModel
from . import ops as dflash_ops
from .cache import TraceCache
from .calibrate import linear_input_moments
from .ir import Weights, dead_after, is_dflash, kernel_launches, op_arguments, op_counts
from .passes import default_passes, run_passes
from .trace import bind_weights, trace, weight_names, weight_sources

log = logging.getLogger(__name__)

QUANTS = ("bf16", "fp8", "fp8_block", "int4")
MAX_ROWS = 65
# every graph a runtime may call: the step per (sampled, simulated), the first draft per sampled, a prefill chunk
PHASES = ("step", "step_sampled", "step_simulated", "step_sampled_simulated", "join", "join_sampled", "prefill")


def new_context(drafter_cfg: DrafterConfig, pages: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A drafter's zeroed paged context K/V, [layers, pages, Hkv, PAGE_SIZE, D] each."""
    shape = (drafter_cfg.num_layers, pages, drafter_cfg.num_kv_heads, PAGE_SIZE, drafter_cfg.head_dim)
    return torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)


def new_pools(
    step: SpeculativeStep, rows: int, pages: int, pages_per_row: int, device, dtype, sampled: bool = False
) -> Pools:
    """Zeroed pools for a step's models: `rows` request rows, `pages` KV pages of PAGE_SIZE tokens, no pending GDN
    block."""
    cfg, b = step.target.cfg, step.block_size
    n_gdn = len(cfg.gdn_layers)
    kv = (pages, cfg.num_kv_heads, PAGE_SIZE, cfg.head_dim)
    ctx_k, ctx_v = new_context(step.drafter.cfg, pages, device, dtype) if step.drafter is not None else (None, None)
    state = (n_gdn, rows, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim)
    pending = (n_gdn, rows, b)  # the pending block: as wide as the widest verify
    draft_probs = None
    if sampled and b > 1:
        draft_probs = torch.zeros(rows, b - 1, cfg.vocab_size, device=device)
    return Pools(
        tokens=torch.zeros(rows, b, dtype=torch.long, device=device),
        cache_lens=torch.zeros(rows, dtype=torch.int32, device=device),
        active=torch.zeros(rows, dtype=torch.bool, device=device),
        block_table=torch.zeros(rows, pages_per_row, dtype=torch.int32, device=device),
        temperature=torch.zeros(rows, device=device),
        top_k=torch.zeros(rows, dtype=torch.long, device=device),
        top_p=torch.ones(rows, device=device),
        out_tokens=torch.zeros(rows, b, dtype=torch.long, device=device),
        out_count=torch.zeros(rows, dtype=torch.int32, device=device),
        gdn_state=torch.zeros(state, device=device),
        conv_window=torch.zeros(
            n_gdn, rows, cfg.gdn_conv_dim, max(cfg.linear_conv_kernel_dim - 1, 0), device=device, dtype=dtype
        ),
        gdn_keys=torch.zeros(pending + (cfg.linear_num_key_heads, cfg.linear_key_head_dim), device=device, dtype=dtype),
        gdn_gates=torch.zeros(pending + (cfg.linear_num_value_heads,), device=device, dtype=dtype),
        gdn_rows=torch.zeros(pending + state[2:3] + state[4:], device=device),
        gdn_pending=torch.full((rows,), -1, dtype=torch.int32, device=device),
        k_cache=[torch.zeros(kv, device=device, dtype=dtype) for _ in cfg.attention_layers],
        v_cache=[torch.zeros(kv, device=device, dtype=dtype) for _ in cfg.attention_layers],
        ctx_k=ctx_k,
        ctx_v=ctx_v,
        profile=torch.zeros(max(b - 1, 0), device=device),
        draft_probs=draft_probs,
    )


@dataclass
class CompiledGraph:
    name: str
    gm: fx.GraphModule
    passes: dict[str, int]
    ops_before: dict[str, int]
    launches_before: int

    @property
    def ops(self) -> dict[str, int]:
        return dict(op_counts(self.gm))

    @property
    def launches(self) -> int:
        return kernel_launches(self.gm)

    def __call__(self, *args):
        return self.gm(*args)


class StepGraphs:
    """The weight-free graphs of one step configuration, traced on demand once, and after the passes; with the
    recipes of the weights they read. Shared by every compile of the same models' configuration in a process
    (`with_passes` derives another pass pipeline from the same traces)."""

    def __init__(self, real_step: SpeculativeStep, quant: str = "bf16", passes=None, cache: TraceCache | None = None):
        self.quant = quant
        self.passes = default_passes(quant) if passes is None else list(passes)
        self.step = _meta_copy(real_step)
        self.traced_weights = Weights(sources=weight_sources(self.step))  # the traces' own sources, shared
        self.weights = Weights(self.traced_weights.sources)
        self.traced: dict[str, fx.GraphModule] = {}  # before any pass, shared with derived pipelines
        self.templates: dict[str, CompiledGraph] = {}
        self.derived: dict[tuple, StepGraphs] = {}
        self.cache = cache  # traces on disk, by the step's content hash

    def with_passes(self, quant: str, passes=None) -> StepGraphs:
        """The same traces under another pass pipeline (the default one of quant when passes is None)."""
        key = (quant, None if passes is None else tuple(p.__name__ for p in passes))
        if key not in self.derived:
            other = copy.copy(self)
            other.quant = quant
            other.passes = default_passes(quant) if passes is None else list(passes)
            other.weights = Weights(self.traced_weights.sources)
            other.templates, other.derived = {}, {}
            self.derived[key] = other
        return self.derived[key]

    def has(self, name: str) -> bool:
        base, width = split_width(name)
        if base not in PHASES or (self.step.drafter is None and ("simulated" in base or width is not None)):
            return False
        return width is None or (base.startswith("step") and 2 <= width < self.step.block_size)

    def template(self, name: str) -> CompiledGraph:
        if not self.has(name):
            raise DFlashError(f"graph {name!r}: this step has no such graph")
        if name not in self.templates:
            if name not in self.traced:
                self.traced[name] = self._cached_trace(name)
            for recipe_name, recipe in self.traced_weights.recipes.items():
                self.weights.recipes.setdefault(recipe_name, recipe)
            gm = copy.deepcopy(self.traced[name])
            before, launches = dict(op_counts(gm)), kernel_launches(gm)
            counts = run_passes(gm, self.weights, self.passes)
            self.templates[name] = CompiledGraph(name, gm, counts, before, launches)
        return self.templates[name]

    def _cached_trace(self, name: str) -> fx.GraphModule:
        gm = self.cache.load(name) if self.cache is not None else None
        if gm is not None:
            for node in gm.graph.find_nodes(op="get_attr"):
                self.traced_weights.source_recipe(self.cache.sources[node.target])
            return gm
        fn, args, dynamic, owner = self._phase(name)
        gm = trace(owner, fn, args, self.traced_weights, dynamic)
        if self.cache is not None:
            self.cache.save(name, gm)
        return gm

    def _phase(self, name: str):
        """(the phase's function, example inputs, their dynamic shapes, the module owning its weights)."""
        name, width = split_width(name)
        step, dtype = self.step, self.step.target.embed_tokens.weight.dtype
        if width is not None:  # the same models (the same weight names), verifying fewer tokens of the block
            step = SpeculativeStep(step.target, step.drafter, step.block_size, step.max_len, verify_width=width)
        sampled, simulated = "sampled" in name, "simulated" in name
        if simulated and step.drafter is None:
            raise DFlashError("simulated acceptance needs a drafter (block size > 1)")
        pages_per_row = -(-step.max_len // PAGE_SIZE)
        pages = torch.export.Dim("pages", min=2, max=1 << 24)
        # more pool rows than any graph sees, so no row count equals the pools' (their strides differ from a view's)
        pools = new_pools(step, MAX_ROWS + 1, 4, pages_per_row, "meta", dtype, sampled=sampled)
        one = pools.rows(slice(MAX_ROWS, MAX_ROWS + 1))
        if name.startswith("step"):

            def step_fn(p):
                step(p, sampled, simulated)

            view = pools.rows(slice(0, 2))
            rows = torch.export.Dim("rows", min=1, max=MAX_ROWS)
            return step_fn, (view,), (view.dynamic_shapes(rows, pages),), step
        if name.startswith("join"):
            anchor = torch.zeros(1, dtype=torch.long, device="meta")
            spec = (one.dynamic_shapes(None, pages), None)
            return (lambda p, a: step.draft(p, a, p.block_table, sampled)), (one, anchor), spec, step
        if name == "prefill":
            one.draft_probs = None
            ids = torch.zeros(1, 5, dtype=torch.long, device="meta")
            start = torch.zeros(1, dtype=torch.int32, device="meta")
            tokens = torch.export.Dim("tokens", min=1, max=max(step.max_len, 2))
            return step.prefill, (one, ids, start), (one.dynamic_shapes(None, pages), {1: tokens}, None), step
        raise KeyError(name)


class PrebuiltGraphs:
    """Graphs after the passes, loaded rather than traced (an artifact's): the same interface as StepGraphs for
    CompiledStep, holding only the graphs it was given."""

    def __init__(self, step: SpeculativeStep, quant: str, templates: dict[str, CompiledGraph]):
        self.step, self.quant, self.templates = step, quant, templates
        self.weights = Weights({})

    def has(self, name: str) -> bool:
        return name in self.templates

    def template(self, name: str) -> CompiledGraph:
        if not self.has(name):
            raise DFlashError(f"graph {name!r}: this step has no such graph")
        if name not in self.templates:
            raise DFlashError(f"graph {name!r}: not among the compiled graphs ({', '.join(self.templates)})")
        return self.templates[name]


def graph_name(phase: str, sampled: bool = False, simulated: bool = False, width: int | None = None) -> str:
    """The graph of a phase: "step", "step_sampled", "step_simulated", "step_sampled_simulated", "join",
    "join_sampled" or "prefill"; a step verifying `width` tokens of the drafted block (not all of it) is the step
    graph's name with "@w<width>" ("step_sampled@w8")."""
    return (
        phase + ("_sampled" if sampled else "") + ("_simulated" if simulated else "") + (f"@w{width}" if width else "")
    )


def split_width(name: str) -> tuple[str, int | None]:
    """(phase graph name, verify width or None) of a graph name."""
    base, sep, width = name.partition("@w")
    return (base, int(width)) if sep and width.isdigit() else (name if not sep else "", None)


class CompiledStep:
    """The compiled graphs of one step on a device, and their weights. Graphs are lowered on first use; the
    weights are built once, for the graphs every runtime needs, and shared by all."""

    EAGER = ("step", "join", "prefill")

    def __init__(
        self,
        graphs: StepGraphs | PrebuiltGraphs,
        sources: dict[str, torch.Tensor] | None,
        backend: str,
        device: torch.device,
        weights: dict[str, torch.Tensor] | None = None,
        tuning=None,
        glue: str = "aten",
    ):
        """weights: the built weights by name (an artifact's), instead of building them from sources. tuning: the
        chooser of the linears' tuned lowerings and configs (tuning/choice.py; None: the launchers' defaults).
        glue: the lowering of the ATen glue between the ops ("aten" or "inductor", see `lower`)."""
        if glue not in GLUE_LOWERINGS:
            raise DFlashError(f"parameter 'glue' must be one of {', '.join(GLUE_LOWERINGS)}, got {glue!r}")
        t0 = time.perf_counter()
        self.graphs_def, self.backend, self.device, self.tuning = graphs, backend, device, tuning
        self.glue = glue
        self.step = graphs.step  # the models on the meta device: configuration and shapes only
        self.act_dtype = self.step.target.embed_tokens.weight.dtype
        self.quant = graphs.quant
        self.graphs: dict[str, CompiledGraph] = {}
        eager = [g for g in self.EAGER if graphs.has(g)]
        if weights is None:
            names = [n for g in eager for n in weight_names(graphs.template(g).gm)]
            weights = Weights(sources, dict(graphs.weights.recipes)).materialize(names, device)
        self.weights = weights
        for name in eager:
            self.graph(name)
        self.compile_seconds = time.perf_counter() - t0

    def graph(self, name: str) -> CompiledGraph:
        if name not in self.graphs:
            template = self.graphs_def.template(name)
            gm = copy.deepcopy(template.gm)
            missing = [n for n in weight_names(gm) if n not in self.weights]
            if missing:
                raise DFlashError(f"graph {name}: weights {missing[:3]} were not built with the step")
            lower(gm, self.backend, self.device, self.tuning, self.weights, self.act_dtype, self.glue,
                  self._tuned_dims(name))  # fmt: skip
            bind_weights(gm, self.weights)
            self.graphs[name] = CompiledGraph(name, gm, template.passes, template.ops_before, template.launches_before)
        return self.graphs[name]

    def _tuned_dims(self, name: str) -> dict[str, tuple]:
        """The dims by op that graph `name`'s tuned ops are looked up with (lower's tuned_dims): in the step graphs
        the GDN verify's, the conv update's and the verify attention's at the graph's verify width, and the draft
        attention's at the drafter's block in the step and join graphs; in the prefill graph the GDN prefill's
        chunked rule, by prompt length (its other ops run a chunk's shapes, which the by-batch entries do not
        describe: they keep the launchers' defaults)."""
        cfg, width = self.step.target.cfg, split_width(name)[1] or self.step.block_size
        dims = {}
        if name.startswith("step"):
            dims["gdn_verify"] = (width, cfg.linear_num_key_heads, cfg.linear_num_value_heads,
                                  cfg.linear_key_head_dim, cfg.linear_value_head_dim)  # fmt: skip
            dims["causal_conv1d_update"] = (width, cfg.gdn_conv_dim, cfg.linear_conv_kernel_dim)
            dims["verify_attention"] = (width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        if name == "prefill" and cfg.gdn_layers:
            dims["gdn_prefill"] = (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                   cfg.linear_value_head_dim)  # fmt: skip
        if self.step.drafter is not None and name.startswith(("step", "join")):
            d = self.step.drafter.cfg
            dims["draft_attention"] = (self.step.block_size, d.num_heads, d.num_kv_heads, d.head_dim)
        return dims

    def plan(self) -> list[dict]:
        """Every op node of every lowered graph with its implementation."""
        return [
            {"graph": g.name, "node": node.name, **node.meta["lowering"]}
            for g in self.graphs.values()
            for node in g.gm.graph.nodes
            if "lowering" in node.meta
        ]

    def untuned(self) -> list[tuple[str, str, str]]:
        """The (op, shape key, format) calls the lowered graphs asked the database for and found no tuned entry."""
        return list(getattr(self.tuning, "fallbacks", []))

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.weights.values())


def lower(
    gm: fx.GraphModule,
    backend: str,
    device: torch.device,
    tuning=None,
    weights=None,
    act_dtype=None,
    glue="aten",
    tuned_dims: dict[str, tuple] | None = None,
) -> int:
    """Gives every dflash op node its implementation (the node calls that function from now on), and places the
    tensors the graph creates (traced on meta) on device. tuning: a chooser (tuning/choice.py) whose tuned
    entries give the Triton backend's linears their lowering and config per row bucket, looked up by the shapes
    of their weights (by name) and the activation dtype; the choices are recorded in meta["lowering"]["tuned"].
    glue: "aten" runs the glue between the ops as ATen calls, "inductor" as TorchInductor regions
    (codegen/inductor.py). tuned_dims: by op, the dims of the graph's ops whose tuned configs the chooser gives by
    batch size (batch_choices; ops without dims keep the launchers' defaults)."""
    count = 0
    linears = []
    for node in gm.graph.nodes:
        if isinstance(node.kwargs.get("device"), torch.device):
            node.update_kwarg("device", device)
        if not is_dflash(node):
            continue
        op = node.target._opname
        tuned = None
        if op == "linear" and backend == "triton" and tuning is not None:
            tuned = linear_choices(linear_calls(node, weights, act_dtype), tuning)
        elif backend == "triton" and tuning is not None and op in (tuned_dims or {}):
            args = op_arguments(node)
            # the drafter's sliding (causal, windowed) layers are not in the attention space
            if op != "draft_attention" or not (args["causal"] or args["window"]):
                tuned = batch_choices(op, tuned_dims[op], act_dtype, tuning)
        node.meta["lowering"] = {"op": op, "impl": backend}
        if tuned:
            node.meta["lowering"]["tuned"] = {str(m): {"lowering": lw, "config": c} for m, (lw, c) in tuned.items()}
        if op == "linear":
            linears.append((node, node.target._schema, tuned))
        node.target = dflash_ops.implementation(op, backend, tuned)
        count += 1
    if glue == "inductor":
        gm.recompile()
        lower_glue(gm)
    # after the glue's regions, which may move reads: the order of the final graph decides what is dead
    for node, schema, tuned in linears:
        if _residual_dead_after(node, op_arguments(node, schema)):
            node.meta["lowering"]["residual_in_place"] = True
            node.target = dflash_ops.implementation("linear", backend, tuned, residual_in_place=True)
    gm.recompile()
    return count


def _residual_dead_after(node: fx.Node, args: dict) -> bool:
    """Whether a linear node (its arguments by name: args) may take the sum into its residual's memory: no later
    node reads that memory and the node's other activations do not share it (ir.dead_after)."""
    residual = args["residual"]
    if residual is None or args["bias"] is not None:
        return False
    return dead_after(residual, node, besides=(args["x"], args["x_gate"]))


def linear_calls(node: fx.Node, weights: dict[str, torch.Tensor], act_dtype: torch.dtype) -> list[tuple]:
    """The tuning database's (op, shape key, format) of a linear node at every row bucket, from its weight
    tensors (get_attr nodes naming `weights`) and the activation dtype."""
    from ..tuning.spaces import DTYPES, M_BUCKETS, LinearShape

    args = op_arguments(node)
    weight = weights[args["weight"].target]
    swiglu, fmt = args["swiglu"], args["fmt"]
    act = next(name for name, dtype in DTYPES.items() if dtype == act_dtype)
    n, k = weight.shape[0], weight.shape[1]
    if fmt == "dense":  # dense weights are stored in the activations' dtype
        db_fmt = act
    elif fmt == "int4":  # packed: in_features from the scales' groups
        db_fmt = "int4_asym" if args["zeros"] is not None else "int4_sym"
        k = weights[args["scale"].target].shape[0] * args["group_size"]
    else:
        db_fmt = fmt
    epilogue = "swiglu" if swiglu else "residual" if args["residual"] is not None else "none"
    return [("linear", LinearShape(m, n, k, db_fmt, epilogue, act).key, db_fmt) for m in M_BUCKETS]


def linear_choices(calls: list[tuple], tuning) -> dict[int, tuple[str, dict]]:
    """The tuned (lowering, config) by row bucket of a linear's calls (buckets without a tuned entry: absent)."""
    from ..tuning.spaces import M_BUCKETS

    choices = {}
    for m, call in zip(M_BUCKETS, calls):
        choice = tuning.choose(*call)
        if choice.tuned:
            choices[m] = (choice.lowering, dict(choice.config))
    return choices


def batch_choices(op: str, dims: tuple, act_dtype, tuning) -> dict[int, tuple[str, dict]]:
    """The tuned (lowering, config) by batch size, for the runtime's batch buckets (sizes without a tuned entry:
    absent), of a GDN verify (dims: verify width, key heads, value heads, key dim, value dim), a conv update (verify
    width, channels, taps) or a verify or draft attention (block queries, query heads, KV heads, head dim; at the
    context the lowering's attention configs are tuned for, ATTENTION_CONTEXT: a captured step serves every context
    with one launch config); for a GDN prefill (dims: key heads, value heads, key dim, value dim), by prompt
    length instead, at the runtime study's prefill chunks."""
    from ..runtime.batch import BUCKETS
    from ..tuning import spaces

    act = next(name for name, dtype in spaces.DTYPES.items() if dtype == act_dtype)
    if op == "gdn_prefill":  # by prompt length, one request: the runtime study's prefill chunks
        from ..tuning.runtime import PREFILL_CHUNKS

        sizes, shape_at = PREFILL_CHUNKS, lambda t: spaces.GDNChunkedShape(1, t, *dims, act)
    else:
        sizes = BUCKETS
        shape_at = {
            "gdn_verify": lambda batch: spaces.GDNShape(batch, *dims, act),
            "causal_conv1d_update": lambda batch: spaces.ConvShape(batch, *dims, act),
            "verify_attention": lambda batch: spaces.AttentionShape(batch, *dims, spaces.ATTENTION_CONTEXT, act),
            "draft_attention": lambda batch: spaces.DraftAttentionShape(batch, *dims, spaces.ATTENTION_CONTEXT, act),
        }[op]
    choices = {}
    for size in sizes:
        shape = shape_at(size)
        choice = tuning.choose(shape.op, shape.key, shape.fmt)
        if choice.tuned:
            choices[size] = (choice.lowering, dict(choice.config))
    return choices


def compile_step(
    target: TargetModel,
    drafter: DFlashDrafter | None,
    block_size: int,
    *,
    quant: str = "bf16",
    backend: str = "reference",
    max_len: int,
    release_sources: bool = False,
    cache_dir: str | Path | None = None,
    profile=None,
    calibration: Sequence[Sequence[int]] | None = None,
    glue: str = "aten",
) -> CompiledStep:
    """Compiles the step of (target, drafter) at block_size for caches of up to max_len positions per row.

    The graphs are traced on meta copies of the models; the weights are built from the given models' tensors on
    their device. With release_sources, the given models' parameters are dropped as they are converted (the
    modules cannot run afterwards). cache_dir: where traces are kept between processes (graph/cache.py); None keeps
    them in this process only. profile: the hardware profile (name or HardwareProfile) whose tuning database the
    Triton lowering reads (default: the device's profile). calibration: token id lists whose prefill through the
    target gives INT4's quantizer its activation statistics (graph/calibrate.py); None rounds to nearest. glue:
    "inductor" lowers the ATen glue between the ops to TorchInductor regions (codegen/inductor.py), "aten" keeps
    it as ATen calls."""
    if quant not in QUANTS:
        raise DFlashError(f"parameter 'quant' must be one of {', '.join(QUANTS)}, got {quant!r}")
    if backend not in dflash_ops.BACKENDS:
        raise DFlashError(f"parameter 'backend' must be one of {', '.join(dflash_ops.BACKENDS)}, got {backend!r}")
    device = target.embed_tokens.weight.device
    real_step = SpeculativeStep(target, drafter, block_size, max_len)
    sources = weight_sources(real_step)
    key = (repr(target.cfg), repr(drafter.cfg) if drafter is not None else None, block_size, max_len,
           tuple((n, t.dtype, tuple(t.shape)) for n, t in sources.items()))  # fmt: skip
    traced = _STEP_GRAPHS.get(key)
    if traced is None:
        cache = TraceCache(cache_dir, real_step, sources) if cache_dir is not None else None
        traced = _STEP_GRAPHS[key] = StepGraphs(real_step, cache=cache)
    if calibration is not None and quant != "int4":
        raise DFlashError(f"parameter 'calibration': it applies to quant 'int4', not {quant!r}")
    if calibration is not None:
        moments = linear_input_moments(target, calibration)
        graphs = traced.with_passes(quant, default_passes(quant, moments=moments))
    else:
        graphs = traced.with_passes(quant)
    if release_sources:
        _release_parameters(target, drafter)
    return CompiledStep(graphs, sources, backend, device, tuning=chooser_for(backend, device, profile), glue=glue)


def chooser_for(backend: str, device: torch.device, profile=None):
    """The tuning database's chooser for the Triton lowering on device (None for the reference backend)."""
    if backend != "triton":
        return None
    from ..hw_profiles import profile_for_device
    from ..tuning.choice import Chooser

    if profile is None:
        if device.type != "cuda":
            profile = "cpu"
        else:
            try:
                profile = profile_for_device(torch.cuda.get_device_properties(device))
            except DFlashError as e:  # a GPU no profile describes runs the launchers' defaults
                log.warning("%s; the linears run their default configs", e)
                return None
    return Chooser(profile)


# Traced graphs by model configuration: a second engine of the same shapes in a process skips tracing.
_STEP_GRAPHS: dict[tuple, StepGraphs] = {}


def _meta_copy(step: SpeculativeStep) -> SpeculativeStep:
    """The same step on meta models (configuration and shapes, no weights)."""
    target = step.target
    with torch.device("meta"):
        meta_target = TargetModel(target.cfg).to(target.embed_tokens.weight.dtype)
        meta_drafter = None
        if step.drafter is not None:
            meta_drafter = DFlashDrafter(step.drafter.cfg, target.cfg.hidden_size).to(step.drafter.fc.weight.dtype)
    _copy_float_buffers(target, meta_target)
    if step.drafter is not None:
        _copy_float_buffers(step.drafter, meta_drafter)
    return SpeculativeStep(meta_target, meta_drafter, step.block_size, step.max_len)


def _copy_float_buffers(src, dst) -> None:
    # pre-quantized layers keep their format; buffers (inv_freq) and parameters keep the real module's dtypes
    from ..models.quantized import QuantizedLinear

    for name, module in src.named_modules():
        if isinstance(module, QuantizedLinear):
            parent, leaf = (
                (dst.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]) if "." in name else (dst, name)
            )
            meta = QuantizedLinear.__new__(QuantizedLinear)
            nn.Module.__init__(meta)
            meta.fmt, meta.group_size = module.fmt, module.group_size
            meta.out_features, meta.in_features = module.out_features, module.in_features
            for b in ("qweight", "scale", "zeros"):
                t = getattr(module, b)
                meta.register_buffer(b, None if t is None else torch.empty_like(t, device="meta"))
            meta.bias = None if module.bias is None else nn.Parameter(torch.empty_like(module.bias, device="meta"))
            setattr(parent, leaf, meta)
    for name, buf in src.named_buffers():
        module = dst.get_submodule(name.rsplit(".", 1)[0]) if "." in name else dst
        module._buffers[name.rsplit(".", 1)[-1]] = torch.empty_like(buf, device="meta")
    for name, p in src.named_parameters():
        module = dst.get_submodule(name.rsplit(".", 1)[0]) if "." in name else dst
        leaf = name.rsplit(".", 1)[-1]
        if module._parameters.get(leaf) is not None and module._parameters[leaf].dtype != p.dtype:
            module._parameters[leaf] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


def _release_parameters(*modules) -> None:
    for m in modules:
        if m is None:
            continue
        for sub in m.modules():
            for name in list(sub._parameters):
                sub._parameters[name] = None
