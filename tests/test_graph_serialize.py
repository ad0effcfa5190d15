"""Graphs to JSON and back (graph/serialize.py): a reloaded post-pass graph is the same program, and runs the
step to the same pools as the graph it was written from; malformed or unsafe files are refused."""

import json

import pytest
import torch
from checkpoints import VOCAB, write_drafter, write_qwen35

from dflash_compiler.errors import DFlashError
from dflash_compiler.graph.compiler import CompiledGraph, CompiledStep, PrebuiltGraphs, compile_step, new_pools
from dflash_compiler.graph.serialize import graph_from_dict, graph_to_dict
from dflash_compiler.models.loader import load_drafter, load_target
from dflash_compiler.models.paged import PAGE_SIZE

BLOCK, MAX_LEN = 4, 64


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> CompiledStep:
    d = tmp_path_factory.mktemp("pair")
    write_qwen35(d / "t", seed=5, multimodal=False)
    write_drafter(d / "d", layout="nested", target_layer_ids=[1, 2])
    target = load_target(d / "t")
    return compile_step(target, load_drafter(d / "d", target.cfg), BLOCK, quant="int4", max_len=MAX_LEN)


def _run(step: CompiledStep) -> list[torch.Tensor]:
    """A request prefilled, its first draft, two steps; every pool buffer the step writes."""
    gen = torch.Generator().manual_seed(0)
    pages = MAX_LEN // PAGE_SIZE
    pools = new_pools(step.step, 2, pages + 1, pages, "cpu", torch.float32)
    pools.block_table[0] = torch.arange(pages, dtype=torch.int32) + 1
    view = pools.rows(slice(0, 1))
    view.draft_probs = None
    ids = torch.randint(0, VOCAB - 2, (1, 11), generator=gen)
    logits = step.graph("prefill")(view, ids, torch.zeros(1, dtype=torch.int32))
    pools.cache_lens[0] = ids.shape[1]
    step.graph("join")(view, logits.argmax(-1))
    pools.active[0] = True
    for _ in range(2):
        step.graph("step")(view)
    return [logits, pools.tokens, pools.out_tokens, pools.out_count, pools.cache_lens, pools.gdn_state,
            pools.conv_window, pools.gdn_keys, pools.gdn_rows, pools.gdn_pending, *pools.k_cache,
            pools.ctx_k]  # fmt: skip


def _reloaded(compiled: CompiledStep) -> CompiledStep:
    templates = {}
    for name in CompiledStep.EAGER:
        template = compiled.graphs_def.template(name)
        gm = graph_from_dict(json.loads(json.dumps(graph_to_dict(template.gm))))
        templates[name] = CompiledGraph(name, gm, template.passes, template.ops_before, template.launches_before)
    graphs = PrebuiltGraphs(compiled.step, compiled.quant, templates)
    return CompiledStep(graphs, None, compiled.backend, compiled.device, weights=compiled.weights)


def test_reloaded_graphs_are_the_same_program_and_step(compiled):
    reloaded = _reloaded(compiled)
    for name in CompiledStep.EAGER:
        written = [line for line in compiled.graphs_def.template(name).gm.code.splitlines() if "_guards_fn" not in line]
        assert reloaded.graphs_def.template(name).gm.code.splitlines() == written
        assert reloaded.graph(name).ops == compiled.graph(name).ops
    assert reloaded.plan() == compiled.plan()
    for a, b in zip(_run(compiled), _run(reloaded), strict=True):
        assert torch.equal(a, b)
    assert any(t.abs().sum() > 0 for t in _run(reloaded)[5:])  # the step wrote states and caches


def test_malformed_and_unsafe_graphs_are_refused(compiled):
    doc = graph_to_dict(compiled.graphs_def.template("join").gm)
    node = next(n for n in doc["nodes"] if n["op"] == "call_function")
    for target, why in [
        ("os:system", "is not an op or an allowed builtin"),
        ("torch.ops.dflash.no_such_op.default", "does not exist"),
        ("builtins:no_such_function", "does not exist here"),
    ]:
        bad = json.loads(json.dumps(doc))
        next(n for n in bad["nodes"] if n["name"] == node["name"])["target"] = target
        with pytest.raises(DFlashError, match=why) as err:
            graph_from_dict(bad, "join.json")
        assert str(err.value).startswith("join.json: ")
    bad = json.loads(json.dumps(doc))
    bad["nodes"][-1]["args"] = {"node": "not_a_node"}
    with pytest.raises(DFlashError, match="names node 'not_a_node' before it is defined"):
        graph_from_dict(bad, "join.json")
    with pytest.raises(DFlashError, match="format_version"):
        graph_from_dict({**doc, "format_version": 0}, "join.json")
