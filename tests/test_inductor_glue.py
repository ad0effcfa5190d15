"""TorchInductor regions for the ATen glue between the dflash ops (codegen/inductor.py), on CPU: what a region may
hold, and the tiny pair's batched runtime with its glue compiled by Inductor against the eager loop."""

from __future__ import annotations

import json

import pytest
import torch
from test_batch import _eager, _serve, _tiny_pair

from dflash_compiler.codegen.inductor import InductorRegion, lower_glue, region_options
from dflash_compiler.errors import DFlashError
from dflash_compiler.graph.compiler import compile_step
from dflash_compiler.graph.ir import is_dflash
from dflash_compiler.runtime.batch import BatchRunner
from dflash_compiler.runtime.engine import DEFAULT_PAIR, load_tokenizer


@pytest.fixture(scope="module")
def compiled():
    target, drafter = _tiny_pair()
    return compile_step(target, drafter, 16, backend="reference", max_len=256, glue="inductor")


def test_regions_hold_functional_aten_glue_and_no_dflash_op(compiled):
    """Every region is computing ATen glue with nothing mutated; the dflash ops, the pool writes (copy_) and the
    shape queries stay in the graph; the step launches fewer kernels than with ATen glue."""
    for name in ("step", "join", "prefill"):
        gm = compiled.graph(name).gm
        calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.meta.get("glue") == "inductor"]
        assert calls, name
        for call in calls:
            region = gm.get_submodule(call.target)
            assert isinstance(region, InductorRegion)
            inner = [n for n in region.gm.graph.nodes if n.op == "call_function"]
            assert all(isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "aten" for n in inner)
            assert not any(n.target._schema.is_mutable or is_dflash(n) for n in inner)
        outside = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
        assert "aten.copy_.default" in outside or name == "prefill"
        assert compiled.graph(name).ops["inductor_region"] == len(calls)
    target, drafter = _tiny_pair()
    aten = compile_step(target, drafter, 16, backend="reference", max_len=256)
    assert compiled.graph("step").launches < aten.graph("step").launches


def test_a_graph_of_views_alone_gets_no_region():
    def views(x):
        return x.view(2, 6).transpose(0, 1)[1:]

    gm = torch.fx.experimental.proxy_tensor.make_fx(views)(torch.randn(3, 4))
    assert lower_glue(gm) == 0
    assert not any(n.op == "call_module" for n in gm.graph.nodes)
    x = torch.randn(3, 4)
    torch.testing.assert_close(gm(x), views(x))


def test_a_region_computes_what_its_aten_calls_compute():
    """Two chains around a mutating call: two regions, each compiled on first call, equal to the ATen graph on
    fresh inputs of the traced shape and of another shape."""

    def glue(x, y, buf):
        a = torch.sigmoid(x) * y + 1.0
        buf.copy_(a)  # stays outside: it mutates
        return (buf.sum(-1, keepdim=True) * x).to(torch.float16), a

    gm = torch.fx.experimental.proxy_tensor.make_fx(glue)(torch.randn(4, 8), torch.randn(4, 8), torch.empty(4, 8))
    assert lower_glue(gm) == 2
    assert sum(n.op == "call_module" for n in gm.graph.nodes) == 2
    assert any(str(n.target) == "aten.copy_.default" for n in gm.graph.nodes if n.op == "call_function")
    for shape in [(4, 8), (5, 3)]:
        x, y = torch.randn(*shape), torch.randn(*shape)
        want_buf, got_buf = torch.full(shape, float("nan")), torch.full(shape, float("nan"))
        want, got = glue(x, y, want_buf), gm(x, y, got_buf)
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w)
        torch.testing.assert_close(got_buf, want_buf)


def _draft_probs(flag, masked, logits, other):
    """The draft's sampling glue: masked logits normalised over the vocabulary row, or another row."""
    kept = torch.where(masked, 0.0, logits)
    return torch.where(flag, kept / kept.sum(-1, keepdim=True), other)


def test_regions_turn_persistent_reductions_off_where_inductor_cannot_compile_them(monkeypatch):
    """The installed Inductor handles one-row persistent reductions, so regions keep its defaults; a release
    whose load shaping lacks that case (torch 2.11) gets persistent reductions off."""
    from torch._inductor.codegen.triton import TritonSymbols

    assert region_options() == {}

    def get_block_shape(cls, expr):
        return ()

    monkeypatch.setattr(TritonSymbols, "get_block_shape", classmethod(get_block_shape))
    assert region_options.__wrapped__() == {"triton.persistent_reductions": False}


def test_a_region_inductor_fails_to_compile_runs_as_aten_and_says_so(monkeypatch):
    """Inductor failing on a region (as torch 2.11 does on some reduction trees) costs that region its fusion, not
    the step: a warning names the region and the error, the ATen calls give the result, and no compile is tried
    again."""
    import dflash_compiler.codegen.inductor as inductor

    def glue(x, y):
        return torch.sigmoid(x) * y + 1.0

    gm = torch.fx.experimental.proxy_tensor.make_fx(glue)(torch.randn(4, 8), torch.randn(4, 8))
    assert lower_glue(gm) == 1
    (region,) = [m for m in gm.modules() if isinstance(m, InductorRegion)]
    tries = []

    class Failing(torch.nn.Module):
        def forward(self, *args):
            tries.append(args)
            raise torch._inductor.exc.InductorError(TypeError("list indices must be integers, not NoneType"), None)

    monkeypatch.setattr(region, "compiled", Failing())
    monkeypatch.setattr(inductor, "_FALLBACKS", [])
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.warns(UserWarning, match=f"Inductor region {region.name} failed to compile .*TypeError.*runs as ATen"):
        got = gm(x, y)
    torch.testing.assert_close(got, glue(x, y))
    torch.testing.assert_close(gm(x * 2, y), glue(x * 2, y))
    assert len(tries) == 1
    assert region.fallback is not None and "TypeError" in region.fallback
    assert inductor.region_fallbacks() == [f"{region.name}: {region.fallback}"]


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [32768, 248320])
def test_gpu_region_of_a_softmax_over_a_vocabulary_row(vocab):
    """The draft sampler's glue ([1, 15, vocab] rows, one reduction per program) compiles and equals ATen."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    args = (
        torch.tensor(True, device="cuda"),
        torch.rand(1, 15, vocab, device="cuda", generator=gen) < 0.3,
        torch.rand(1, 15, vocab, device="cuda", generator=gen),
        torch.full((1, 15, vocab), float("nan"), device="cuda"),
    )
    gm = torch.fx.experimental.proxy_tensor.make_fx(_draft_probs)(*args)
    assert lower_glue(gm) == 1
    torch.testing.assert_close(gm(*args), _draft_probs(*args))


@pytest.mark.slow
def test_the_batched_runtime_with_inductor_glue_is_lossless():
    """The tiny pair through the batched runtime with its glue compiled by Inductor: the eager loop's tokens, with a
    request joining mid-batch and prefills in chunks (each new shape compiles its regions again)."""
    tok = load_tokenizer(DEFAULT_PAIR / "target")
    lines = (DEFAULT_PAIR / "heldout_prompts.jsonl").read_text().splitlines()[:3]
    prompts = [tok.encode(json.loads(line)["prompt"], add_special_tokens=False)[:48] for line in lines]
    requests = [(p, n, ()) for p, n in zip(prompts, [20, 9, 14])]
    expected = _eager(*_tiny_pair(), 16, requests)
    runner = BatchRunner(*_tiny_pair(), max_batch=2, max_seq_len=160, prefill_chunk=16, glue="inductor")
    got, _ = _serve(runner, requests, late_from=2)
    assert got == expected


def test_glue_names_its_parameter():
    target, drafter = _tiny_pair()
    with pytest.raises(DFlashError, match="parameter 'glue' must be one of aten, inductor, got 'tvm'"):
        compile_step(target, drafter, 16, max_len=64, glue="tvm")
    step = compile_step(target, drafter, 16, max_len=64)
    with pytest.raises(DFlashError, match="parameter 'glue': a prebuilt step runs its glue as compiled"):
        BatchRunner(None, None, compiled=step, glue="inductor")


def test_the_engine_passes_the_glue_lowering_to_its_runner():
    from dflash_compiler.runtime import Engine

    engine = Engine.from_pretrained(runtime="batched", max_batch=2, max_seq_len=64, glue="inductor")
    try:
        compiled = engine.serving.runner.model.compiled
        assert compiled.glue == "inductor" and compiled.graph("step").ops["inductor_region"] > 0
    finally:
        engine.close()
