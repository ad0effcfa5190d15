"""The compiler on CPU: the IR of a step, each pass alone preserving the step's result, quantization against the
dequantized weights, and the lowering of every op node."""

import copy
import operator

import pytest
import torch
from checkpoints import VOCAB, write_drafter, write_qwen35
from torch import fx

from dflash_compiler.errors import DFlashError
from dflash_compiler.graph import ops as dflash_ops
from dflash_compiler.graph import passes as P
from dflash_compiler.graph.compiler import CompiledStep, StepGraphs, compile_step, new_pools
from dflash_compiler.graph.ir import dead_after, op_arguments, op_counts
from dflash_compiler.graph.trace import weight_sources
from dflash_compiler.models.loader import load_drafter, load_target
from dflash_compiler.models.paged import PAGE_SIZE
from dflash_compiler.models.step import SpeculativeStep
from dflash_compiler.runtime.engine import DEFAULT_PAIR

BLOCK, MAX_LEN = 8, 128


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("pair")
    write_qwen35(d / "t", seed=3, multimodal=False)
    write_drafter(d / "d", layout="nested", sliding_window=4, target_layer_ids=[1, 2])
    target = load_target(d / "t")
    return target, load_drafter(d / "d", target.cfg)


def _run(compiled: CompiledStep, seed: int = 0) -> list[torch.Tensor]:
    """Two requests prefilled, then two steps; returns every pool buffer the step writes."""
    step = compiled.step
    gen = torch.Generator().manual_seed(seed)
    pools = new_pools(step, 3, 2 * MAX_LEN // PAGE_SIZE + 1, MAX_LEN // PAGE_SIZE, "cpu", torch.float32)
    for row in range(2):
        pools.block_table[row] = torch.arange(MAX_LEN // PAGE_SIZE, dtype=torch.int32) + 1 + row * 2
        ids = torch.randint(0, VOCAB - 2, (1, 9 + 4 * row), generator=gen)
        view = pools.rows(slice(row, row + 1))
        view.draft_probs = None
        logits = compiled.graph("prefill")(view, ids, torch.zeros(1, dtype=torch.int32))
        pools.cache_lens[row] = ids.shape[1]
        compiled.graph("join")(view, logits.argmax(-1))
        pools.active[row] = True
    for _ in range(2):
        view = pools.rows(slice(0, 2))
        view.draft_probs = None
        compiled.graph("step")(view)
    return [pools.tokens, pools.out_tokens, pools.out_count, pools.cache_lens, pools.gdn_state, pools.conv_window,
            pools.gdn_keys, pools.gdn_rows, pools.gdn_pending, *pools.k_cache, pools.ctx_k]  # fmt: skip


class EagerStep:
    """The step's phases run eagerly on the real models, as graphs are called: what the traced graphs compute."""

    def __init__(self, target, drafter):
        self.step = SpeculativeStep(target, drafter, BLOCK, MAX_LEN)

    def graph(self, name):
        step = self.step
        phases = {"prefill": step.prefill, "join": lambda p, a: step.draft(p, a, p.block_table, False), "step": step}
        return phases[name]


def _compile(target, drafter, passes) -> CompiledStep:
    real = SpeculativeStep(target, drafter, BLOCK, MAX_LEN)
    key = (repr(target.cfg), repr(drafter.cfg))
    if key not in _TRACED:  # one trace per pair; each pipeline derives from it
        _TRACED[key] = StepGraphs(real)
    graphs = _TRACED[key].with_passes("bf16", passes)
    return CompiledStep(graphs, weight_sources(real), "reference", torch.device("cpu"))


_TRACED = {}


@pytest.fixture(scope="module")
def unpassed(pair):
    return _run(_compile(*pair, passes=[]))


def test_the_traced_step_computes_what_the_eager_step_does(pair, unpassed):
    """torch.export traces the models' step functions as they are (no data-dependent control flow lost): before
    any pass the graphs write exactly what the eager phases write, cache and state writes included."""
    for got, want in zip(unpassed, _run(EagerStep(*pair))):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("p", [P.fold_weights, P.fuse_parallel, P.eliminate_dead], ids=lambda p: p.__name__)
def test_each_pass_alone_preserves_the_step(pair, unpassed, p):
    compiled = _compile(*pair, passes=[p])
    assert compiled.graphs_def.template("step").passes[p.__name__] > 0 or p is P.eliminate_dead
    for got, want in zip(_run(compiled), unpassed):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "p",
    [P.merge_slices, P.fuse_swiglu, P.fuse_residual, P.fuse_norm, P.fuse_gate, P.fuse_attention_gate],
    ids=lambda p: p.__name__,
)
def test_each_epilogue_pass_preserves_the_step(pair, unpassed, p):
    """These rewrite what fuse_parallel leaves (slices of one GEMM) or a linear's neighbours: measured after it."""
    base = _run(_compile(*pair, passes=[P.fuse_parallel]))
    compiled = _compile(*pair, passes=[P.fuse_parallel, p])
    assert compiled.graphs_def.template("step").passes[p.__name__] > 0
    for got, want, ref in zip(_run(compiled), base, unpassed):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_the_full_pipeline_preserves_the_step_and_removes_launches(pair, unpassed):
    compiled = _compile(*pair, passes=None)
    for got, want in zip(_run(compiled), unpassed):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    g = compiled.graph("step")
    assert g.launches < g.launches_before


def test_linears_whose_residual_is_dead_add_into_its_memory(pair, unpassed, monkeypatch):
    """The lowering lets a linear accumulate into its residual's memory where nothing reads that memory later: in
    the step every residual linear but those whose residual is a tapped layer output (read again by the drafter's
    context features). The reference lowering then writes in place, and the step's results are bit for bit those
    of the lowering without it."""
    from dflash_compiler.graph import compiler as C

    compiled = _compile(*pair, passes=None)
    in_place = _run(compiled)
    gm = compiled.graph("step").gm
    schema = torch.ops.dflash.linear.default._schema
    linears = [n for n in gm.graph.nodes if n.meta.get("lowering", {}).get("op") == "linear"]
    residual_linears = [n for n in linears if op_arguments(n, schema)["residual"] is not None]
    kept = [n for n in residual_linears if not n.meta["lowering"].get("residual_in_place")]
    assert len(residual_linears) > len(kept) > 0
    taps = {a for n in gm.graph.nodes if n.target is torch.ops.aten.cat.default for a in n.args[0]}
    assert all(op_arguments(n, schema)["residual"] in taps for n in kept)
    assert len(kept) == len(pair[1].cfg.target_layer_ids)
    assert any(isinstance(n.target, dflash_ops.TunedLinear) and n.target.residual_in_place for n in residual_linears)
    monkeypatch.setattr(C, "_residual_dead_after", lambda node, args: False)
    for got, want in zip(_run(_compile(*pair, passes=None)), in_place):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for got, want in zip(in_place, unpassed):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_dead_after_sees_views_later_readers_graph_inputs_and_shared_inputs():
    aten = torch.ops.aten
    g = fx.Graph()
    a, w = g.placeholder("a"), g.placeholder("w")
    h = g.call_function(aten.add.Tensor, (a, a))
    hv = g.call_function(aten.view.default, (h, [-1]))
    halves = g.call_function(aten.split.Tensor, (h, 1))
    half = g.call_function(operator.getitem, (halves, 0))
    x = g.call_function(aten.mul.Tensor, (a, 2.0))
    lin = g.call_function(torch.ops.dflash.linear.default, (x, w), {"residual": h})
    reader = g.call_function(aten.mul.Tensor, (hv, 3.0))
    g.output((lin, reader, half))
    assert not dead_after(h, lin)  # a view of it is read after the linear
    reader.replace_all_uses_with(lin)
    g.erase_node(reader)
    assert not dead_after(h, lin)  # an element of its split is a graph output
    g.output_node().args = ((lin,),)
    g.erase_node(half)
    g.erase_node(halves)
    assert dead_after(h, lin) and dead_after(hv, lin)
    assert not dead_after(h, lin, besides=(hv,))  # the linear reads it through another argument
    assert not dead_after(a, lin)  # a graph input's memory is not the graph's to overwrite
    to = g.call_function(aten.to.dtype, (h, torch.float32))
    to.prepend(lin)
    assert not dead_after(to, lin)  # to() may return its input itself


@pytest.mark.parametrize("quant", ["fp8", "fp8_block", "int4"])
def test_quantize_equals_the_step_on_dequantized_weights(pair, quant):
    """The quantized step computes what the unquantized step computes with each linear's weight replaced by its
    quantize -> dequantize round trip."""
    target, drafter = (copy.deepcopy(m) for m in pair)
    quantized = _compile(target, drafter, passes=[P.quantize(quant)])
    n_quantized = quantized.graphs_def.template("step").passes[f"quantize_{quant}"]
    rounded = 0
    for module in (*target.modules(), *drafter.modules()):
        converted = P.quantize_weight(module.weight.data, quant) if isinstance(module, torch.nn.Linear) else None
        if converted is not None:
            module.weight.data = converted.dequantize().to(module.weight.dtype)
            rounded += 1
    assert n_quantized > 0 and rounded > 0
    for got, want in zip(_run(quantized), _run(_compile(target, drafter, passes=[]))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quant", ["fp8", "int4"])
def test_the_full_quantized_pipeline_equals_quantization_alone(pair, quant):
    """Every fusion composed with the quantization pass (norm and gate prologues on FP8 and INT4 linears
    included) computes what quantization alone computes."""
    alone = _run(_compile(*pair, passes=[P.quantize(quant)]))
    full = _compile(*pair, passes=P.default_passes(quant, prologues=True))
    counts = full.graphs_def.template("step").passes
    assert counts["fuse_norm"] > 0 and counts["fuse_gate"] > 0 and counts[f"quantize_{quant}"] > 0
    for got, want in zip(_run(full), alone):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_prologue_fusions_are_in_the_fp8_pipeline_by_default():
    """FP8 quantizes x in front of its GEMMs, and that launch applies the norm and gate; elsewhere they run in the
    GEMM's loop and stay out unless asked for."""

    def names(**kw):
        return [p.__name__ for p in P.default_passes(**kw)]

    assert {"fuse_norm", "fuse_gate"} <= set(names(quant="fp8"))
    for quant in ("bf16", "fp8_block", "int4"):
        assert not {"fuse_norm", "fuse_gate"} & set(names(quant=quant)), quant
    assert "fuse_norm" not in names(quant="fp8", prologues=False)
    assert "fuse_norm" in names(quant="bf16", prologues=True)
    ordered = names(quant="fp8")
    assert ordered.index("fuse_gate") < ordered.index("eliminate_dead") < ordered.index("quantize_fp8")
    # the gate goes to the linear's prologue where the pipeline has one, else to the attention's epilogue
    assert ordered.index("fuse_gate") < ordered.index("fuse_attention_gate")


def test_ir_of_the_tiny_pair():
    """The step graph of the shipped pair: its op nodes counted before and after the passes, from the configs."""
    target = load_target(DEFAULT_PAIR / "target")
    drafter = load_drafter(DEFAULT_PAIR / "drafter", target.cfg)
    cfg, dc = target.cfg, drafter.cfg
    compiled = compile_step(target, drafter, 16, max_len=256)
    step = compiled.graph("step")
    n_gdn, n_attn, n_dr = len(cfg.gdn_layers), len(cfg.attention_layers), dc.num_layers
    before = step.ops_before
    # per GDN layer 4 input projections + out; per attention layer q, k, v, o; 3 MLP linears everywhere; the head
    # twice (verify and draft); the drafter's fc, 2 context projections and q, k, v, o per layer
    assert before["linear"] == 5 * n_gdn + 4 * n_attn + 3 * (n_gdn + n_attn) + 2 + 1 + 2 * n_dr + 4 * n_dr + 3 * n_dr
    after = step.ops
    # fused: one input GEMM + out per GDN layer, qkv + o per attention layer, gate_up + down per MLP; the drafter's
    # context projections of every layer in one GEMM
    assert after["linear"] == 2 * n_gdn + 2 * n_attn + 2 * (n_gdn + n_attn) + 2 + 1 + 1 + 2 * n_dr + 2 * n_dr
    assert after["gdn_verify"] == after["gdn_commit"] == n_gdn
    assert after["verify_attention"] == after["qk_norm_rope_write"] == n_attn
    # the gated attention's output gate: a sigmoid and a multiply per attention layer before the passes, then the
    # attention's own argument
    assert before.get("aten.sigmoid", 0) >= n_attn and "aten.sigmoid" not in after
    assert step.passes["fuse_attention_gate"] == n_attn
    assert after["draft_attention"] == after["qk_norm_rope"] == n_dr
    assert after["context_kv_write"] == 1 and after["greedy_accept"] == 1
    assert (
        "swiglu" not in after
        and "aten.add" not in op_counts(step.gm)
        or after.get("aten.add", 0) < before.get("aten.add", 0)
    )
    plan = compiled.plan()
    assert plan and all(e["impl"] == "reference" for e in plan)
    assert {e["op"] for e in plan if e["graph"] == "step"} >= {"linear", "gdn_verify", "verify_attention"}


def test_the_lowering_takes_the_tuning_databases_linear_choices(pair, unpassed, tmp_path, monkeypatch):
    """On the Triton backend (its interpreter here) every linear node asks the profile's database for each row
    bucket; a tuned entry gives the node that lowering and config (recorded in the plan and passed to the kernel),
    the rest run the launchers' defaults and are reported untuned. The step computes what the reference does."""
    from dflash_compiler.codegen.triton import linear as t_linear
    from dflash_compiler.graph.compiler import linear_calls
    from dflash_compiler.graph.ir import is_dflash
    from dflash_compiler.hw_profiles.database import Entry, TuningDB
    from dflash_compiler.tuning.choice import Chooser
    from dflash_compiler.tuning.spaces import m_bucket

    target, drafter = pair
    real = SpeculativeStep(target, drafter, BLOCK, MAX_LEN)
    graphs = _TRACED.setdefault((repr(target.cfg), repr(drafter.cfg)), StepGraphs(real)).with_passes("bf16")
    gm = graphs.template("step").gm
    node = next(n for n in gm.graph.nodes if is_dflash(n, "linear"))
    weights = CompiledStep(graphs, weight_sources(real), "reference", torch.device("cpu")).weights
    calls = linear_calls(node, weights, torch.float32)  # the 16-row bucket: 2 requests x block 8 in _run
    op, key, fmt = next(c for c in calls if c[1].startswith("m16_"))
    config = {"block_n": 32, "block_m": 16, "block_k": 32, "num_warps": 2, "num_stages": 2, "split_k": 2,
              "programs": None, "fp8_dot": False}  # fmt: skip
    db = TuningDB("cpu", tmp_path / "cpu")
    db.record(Entry(op, key, fmt, "triton", config, True, time_us=1.0, platform="cpu"))
    db.save()

    used = []
    launcher = t_linear.linear

    def spy(x, w, **kwargs):
        used.append((x.shape[0], kwargs.get("config")))
        return launcher(x, w, **kwargs)

    monkeypatch.setattr(t_linear, "linear", spy)
    chooser = Chooser("cpu", root=tmp_path)
    compiled = CompiledStep(graphs, weight_sources(real), "triton", torch.device("cpu"), tuning=chooser)
    for got, want in zip(_run(compiled), unpassed):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    same_shape = [n.name for n in gm.graph.nodes if is_dflash(n, "linear") and (op, key, fmt) in
                  linear_calls(n, weights, torch.float32)]  # fmt: skip
    tuned = [row for row in compiled.plan() if row["graph"] == "step" and "tuned" in row]
    assert node.name in same_shape and [row["node"] for row in tuned] == same_shape
    assert all(row["tuned"] == {"16": {"lowering": "triton", "config": config}} for row in tuned)
    expected = t_linear.LinearConfig(**{k: v for k, v in config.items() if k != "fp8_dot"})
    # the calls of 2..16 rows (the verify, the 9- and 13-token prefills) ran the tuned config, no other did
    assert {rows for rows, cfg in used if cfg == expected} == {rows for rows, _ in used if m_bucket(rows) == 16}
    assert (16, expected) in used
    untuned = compiled.untuned()
    assert (op, key, fmt) not in untuned and len(untuned) >= len(calls) - 1
    assert chooser.chosen[(op, key, fmt)].config == config


def test_a_linear_tuned_to_tvm_runs_a_tvm_kernel_of_its_shapes(pair, unpassed, tmp_path, monkeypatch):
    """A database entry whose lowering is TVM gives the linears of that shape a TVM kernel (LLVM here) built for
    each exact row count of the bucket and shared by the layers that have the shape; the step computes what the
    reference does."""
    from dflash_compiler.codegen.tvm import linear as tvm_linear
    from dflash_compiler.graph.compiler import linear_calls
    from dflash_compiler.graph.ir import is_dflash, op_arguments
    from dflash_compiler.hw_profiles.database import Entry, TuningDB
    from dflash_compiler.tuning.choice import Chooser

    target, drafter = pair
    real = SpeculativeStep(target, drafter, BLOCK, MAX_LEN)
    graphs = _TRACED.setdefault((repr(target.cfg), repr(drafter.cfg)), StepGraphs(real)).with_passes("bf16")
    gm = graphs.template("step").gm
    weights = CompiledStep(graphs, weight_sources(real), "reference", torch.device("cpu")).weights
    nodes = [n for n in gm.graph.nodes if is_dflash(n, "linear")]
    node = next(n for n in nodes if op_arguments(n)["swiglu"])  # a gate_up: the SwiGLU epilogue through TVM
    op, key, fmt = next(c for c in linear_calls(node, weights, torch.float32) if c[1].startswith("m16_"))
    db = TuningDB("cpu", tmp_path / "cpu")
    db.record(Entry(op, key, fmt, "tvm", {}, True, time_us=1.0, platform="cpu"))
    db.save()
    monkeypatch.setattr(tvm_linear, "_KERNELS", {})
    built = []
    build = tvm_linear.build_linear_for
    monkeypatch.setattr(tvm_linear, "build_linear_for", lambda *a, **kw: built.append((a[1], a[4])) or build(*a, **kw))
    compiled = CompiledStep(
        graphs, weight_sources(real), "triton", torch.device("cpu"), tuning=Chooser("cpu", root=tmp_path)
    )
    for got, want in zip(_run(compiled), unpassed):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    tuned = [row for row in compiled.plan() if row["graph"] == "step" and "tuned" in row]
    assert tuned and all(row["tuned"] == {"16": {"lowering": "tvm", "config": {}}} for row in tuned)
    same_shape = sum((op, key, fmt) in linear_calls(n, weights, torch.float32) for n in nodes)
    # one build per row count of the bucket that ran (the verify's 16 rows, the prefills' 9 and 13), not per layer
    rows = sorted(m for m, _ in built)
    assert same_shape > 1 and rows == sorted(set(rows)) and 16 in rows and all(2 <= m <= 16 for m in rows)
    assert all(epilogue == "swiglu" for _, epilogue in built)


@pytest.mark.parametrize(
    "config",
    [
        {"block_v": 16, "num_warps": 1, "unroll": True},
        {"algorithm": "chunked", "block_v": 16, "num_warps": 4, "precision": "ieee"},
        {"algorithm": "factored", "block_v": 16, "num_warps": 2, "precision": "ieee", "factor_warps": 1},
    ],
    ids=["recurrent", "chunked", "factored"],
)
def test_the_lowering_takes_the_databases_gdn_configs_by_batch(pair, unpassed, tmp_path, monkeypatch, config):
    """A tuned GDN verify entry (the recurrent kernel's V slice, warps, unrolling, the chunked or the factored
    block) at the step's batch size: the verify nodes call the kernel with that config, the plan records it (the
    layer commits have nothing to tune), and the step computes what the reference does."""
    from dflash_compiler.codegen.triton import gdn as t_gdn
    from dflash_compiler.graph.ops import triton_implementations
    from dflash_compiler.hw_profiles.database import Entry, TuningDB
    from dflash_compiler.tuning.choice import Chooser
    from dflash_compiler.tuning.spaces import GDNShape

    triton_implementations()  # the untuned nodes' default: the Triton launcher (registered on first use here)
    target, drafter = pair
    cfg = target.cfg
    real = SpeculativeStep(target, drafter, BLOCK, MAX_LEN)
    graphs = _TRACED.setdefault((repr(target.cfg), repr(drafter.cfg)), StepGraphs(real)).with_passes("bf16")
    dims = (BLOCK, cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
            cfg.linear_value_head_dim, "fp32")  # fmt: skip
    db = TuningDB("cpu", tmp_path / "cpu")
    shape = GDNShape(2, *dims)
    db.record(Entry(shape.op, shape.key, shape.fmt, "triton", config, True, time_us=1.0, platform="cpu"))
    db.save()
    used = []
    launcher = t_gdn.gdn_verify

    def spy(*args, **kwargs):
        used.append((args[0].shape[0], {k: kwargs.get(k) for k in config}, kwargs.get("pending_idx") is not None))
        return launcher(*args, **kwargs)

    monkeypatch.setattr(t_gdn, "gdn_verify", spy)
    compiled = CompiledStep(
        graphs, weight_sources(real), "triton", torch.device("cpu"), tuning=Chooser("cpu", root=tmp_path)
    )
    for got, want in zip(_run(compiled), unpassed):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    tuned = [
        row for row in compiled.plan() if row["graph"] == "step" and row["op"].startswith("gdn_") and "tuned" in row
    ]
    assert len(tuned) == len(cfg.gdn_layers)
    assert all(row["op"] == "gdn_verify" and row["tuned"] == {"2": {"lowering": "triton", "config": config}}
               for row in tuned)  # fmt: skip
    assert used and all(call == (2, config, True) for call in used)


def test_the_prefill_takes_the_databases_chunked_config_by_prompt_length(pair, unpassed, tmp_path, monkeypatch):
    """Tuned chunked-rule entries at two prompt lengths: the prefill's GDN nodes launch a prompt with the entry of
    the shortest tuned length at or over it, the plan records both, and the step computes what the reference
    does."""
    from dflash_compiler.codegen.triton import gdn as t_gdn
    from dflash_compiler.graph.ops import triton_implementations
    from dflash_compiler.hw_profiles.database import Entry, TuningDB
    from dflash_compiler.tuning.choice import Chooser
    from dflash_compiler.tuning.spaces import GDNChunkedShape

    triton_implementations()
    target, drafter = pair
    cfg = target.cfg
    real = SpeculativeStep(target, drafter, BLOCK, MAX_LEN)
    graphs = _TRACED.setdefault((repr(target.cfg), repr(drafter.cfg)), StepGraphs(real)).with_passes("bf16")
    dims = (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim)
    configs = {128: {"chunk_size": 16, "block_v": 16, "precision": "ieee"},
               512: {"chunk_size": 32, "block_v": 16, "precision": "tf32x3"}}  # fmt: skip
    db = TuningDB("cpu", tmp_path / "cpu")
    for t, config in configs.items():
        shape = GDNChunkedShape(1, t, *dims, "fp32")
        db.record(Entry(shape.op, shape.key, shape.fmt, "triton", config, True, time_us=1.0, platform="cpu"))
    db.save()
    used = []
    launcher = t_gdn.gdn_chunked

    def spy(q, *args, **kwargs):
        used.append((q.shape[1], {k: kwargs.get(k) for k in configs[128]}))
        return launcher(q, *args, **kwargs)

    monkeypatch.setattr(t_gdn, "gdn_chunked", spy)
    compiled = CompiledStep(
        graphs, weight_sources(real), "triton", torch.device("cpu"), tuning=Chooser("cpu", root=tmp_path)
    )
    for got, want in zip(_run(compiled), unpassed):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    tuned = [row for row in compiled.plan() if row["graph"] == "prefill" and "tuned" in row]
    assert len(tuned) == len(cfg.gdn_layers)
    want = {str(t): {"lowering": "triton", "config": c} for t, c in configs.items()}
    assert all(row["op"] == "gdn_prefill" and row["tuned"] == want for row in tuned)
    # _run prefills prompts of 9 and 13 tokens, in every GDN layer
    assert sorted(used) == sorted([(9, configs[128]), (13, configs[128])] * len(cfg.gdn_layers))


def test_the_lowering_takes_the_databases_attention_and_conv_configs_by_batch(pair, unpassed, tmp_path, monkeypatch):
    """Tuned verify and draft attention entries (a tile and a split count, at the context the lowering reads) and a
    conv update entry (its tile and warps) at the step's batch size: the nodes launch with them, the plan records
    them, and the step computes what the reference does."""
    from dflash_compiler.codegen.triton import attention as t_attention
    from dflash_compiler.codegen.triton import gdn as t_gdn
    from dflash_compiler.graph.ops import triton_implementations
    from dflash_compiler.hw_profiles.database import Entry, TuningDB
    from dflash_compiler.tuning.choice import Chooser
    from dflash_compiler.tuning.spaces import ATTENTION_CONTEXT, AttentionShape, ConvShape, DraftAttentionShape

    triton_implementations()
    target, drafter = pair
    t, d = target.cfg, drafter.cfg
    real = SpeculativeStep(target, drafter, BLOCK, MAX_LEN)
    graphs = _TRACED.setdefault((repr(target.cfg), repr(drafter.cfg)), StepGraphs(real)).with_passes("bf16")
    db = TuningDB("cpu", tmp_path / "cpu")
    configs = {
        "verify_attention": {"block_m": 16, "block_n": 16, "num_warps": 4, "num_stages": 1, "num_splits": 3},
        "draft_attention": {"block_m": 16, "block_n": 32, "num_warps": 2, "num_stages": 1, "num_splits": 2},
        "causal_conv1d_update": {"block_t": 2, "block_c": 32, "num_warps": 1},
    }  # fmt: skip
    shapes = (
        AttentionShape(2, BLOCK, t.num_heads, t.num_kv_heads, t.head_dim, ATTENTION_CONTEXT, "fp32"),
        DraftAttentionShape(2, BLOCK, d.num_heads, d.num_kv_heads, d.head_dim, ATTENTION_CONTEXT, "fp32"),
        ConvShape(2, BLOCK, t.gdn_conv_dim, t.linear_conv_kernel_dim, "fp32"),
        ConvShape(1, BLOCK, t.gdn_conv_dim, t.linear_conv_kernel_dim, "fp32"),  # batch 1: the step's, not prefill's
    )
    for shape in shapes:
        db.record(Entry(shape.op, shape.key, shape.fmt, "triton", configs[shape.op], True, time_us=1.0,
                        platform="cpu"))  # fmt: skip
    db.save()
    used = []
    for module, name in ((t_attention, "verify_attention"), (t_attention, "draft_attention"),
                         (t_gdn, "causal_conv1d_update")):  # fmt: skip
        launcher = getattr(module, name)

        def spy(*args, _name=name, _launcher=launcher, **kwargs):
            cfg = kwargs.get("config")
            tile = kwargs.get("block_c") if _name == "causal_conv1d_update" else cfg and cfg.block_n
            used.append((_name, args[0].shape[0], kwargs.get("num_splits"), tile))
            return _launcher(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    compiled = CompiledStep(
        graphs, weight_sources(real), "triton", torch.device("cpu"), tuning=Chooser("cpu", root=tmp_path)
    )
    for got, want in zip(_run(compiled), unpassed):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    tuned = {}
    for row in compiled.plan():
        if row["graph"] == "step" and row["op"] in configs:
            tuned.setdefault(row["op"], []).append(row.get("tuned"))
    assert len(tuned["verify_attention"]) == len(t.attention_layers)
    assert len(tuned["causal_conv1d_update"]) == len(t.gdn_layers) and all(tuned["causal_conv1d_update"])
    draft_full = sum(not c for c in d.causal_layers) if d.causal_layers else d.num_hidden_layers
    assert len([r for r in tuned["draft_attention"] if r]) == draft_full > 0
    conv_tuned = {"lowering": "triton", "config": configs["causal_conv1d_update"]}
    assert all(r == {"1": conv_tuned, "2": conv_tuned} for r in tuned.pop("causal_conv1d_update"))
    for op, rows in tuned.items():
        assert all(r == {"2": {"lowering": "triton", "config": configs[op]}} for r in rows if r)
    # the prefill graph runs a chunk's shapes, which the by-batch entries do not describe
    prefill = [row for row in compiled.plan() if row["graph"] == "prefill" and row["op"] in configs]
    assert prefill and not any("tuned" in row for row in prefill)
    # every verify and conv at batch 2 launches as tuned; the drafter's full layers do, its sliding ones keep the
    # default
    assert {c for c in used if c[:2] == ("verify_attention", 2)} == {("verify_attention", 2, 3, 16)}
    assert {c for c in used if c[:2] == ("causal_conv1d_update", 2)} == {("causal_conv1d_update", 2, None, 32)}
    assert ("draft_attention", 2, 2, 32) in used


def test_a_tvm_lowering_without_tvm_installed_is_a_one_line_error(monkeypatch):
    from dflash_compiler.graph.ops import _tuned_impl
    from dflash_compiler.tuning import spaces

    monkeypatch.setattr(spaces, "tvm_available", lambda: False)
    with pytest.raises(
        DFlashError, match="chosen lowering is TVM, which is not installed here .pip install apache-tvm"
    ):
        _tuned_impl("tvm", {})


def test_a_tuned_config_out_of_resources_falls_back_to_the_default(monkeypatch):
    """A tuned config measured without a call's prologue may not fit with it: the launcher's default runs."""
    from triton.runtime.errors import OutOfResources

    from dflash_compiler.codegen.triton import linear as t_linear
    from dflash_compiler.graph.ops import _tuned_impl

    calls = []

    def launcher(x, w, config=None, **kwargs):
        calls.append(config)
        if config is not None:
            raise OutOfResources(200000, 232448, "shared memory")
        return "default ran"

    monkeypatch.setattr(t_linear, "linear", launcher)
    config = {"block_n": 256, "block_m": 64, "block_k": 128, "num_warps": 8, "num_stages": 6, "split_k": 1,
              "programs": None, "fp8_dot": False}  # fmt: skip
    assert _tuned_impl("triton", config)(torch.zeros(1, 4), None) == "default ran"
    assert calls[0] == t_linear.LinearConfig(**{k: v for k, v in config.items() if k != "fp8_dot"})
    assert calls[1] is None
