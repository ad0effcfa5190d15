"""Pre-quantized checkpoints (Qwen FP8 block, GPTQ, AWQ) load straight into the compiled weight formats."""

import json

import pytest
import torch
from checkpoints import VOCAB, write_drafter, write_quantized, write_qwen3, write_qwen35
from safetensors.torch import load_file, save_file
from torch import nn

from dflash_compiler.codegen.weight_formats import FP8BlockWeight
from dflash_compiler.errors import DFlashError
from dflash_compiler.models import eager
from dflash_compiler.models.config import TargetConfig
from dflash_compiler.models.loader import load_drafter, load_target
from dflash_compiler.models.quantized import QuantizedLinear

# name -> write_quantized arguments; intermediate 160 gives the down projection two groups, the last one partial
VARIANTS = {
    "fp8": dict(method="fp8"),
    "gptq_sym_v1": dict(method="gptq", zero_bias=True),
    "gptq_asym_v2": dict(method="gptq", symmetric=False, gptq_format="gptq_v2"),
    "awq": dict(method="awq"),
}


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    d = tmp_path_factory.mktemp("dense")
    write_qwen35(d, seed=11, intermediate_size=160)
    return d


@pytest.fixture(scope="module", params=list(VARIANTS))
def quantized(request, dense, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    return d, write_quantized(dense, d, **VARIANTS[request.param])


def _module_name(ckpt_module: str) -> str:
    return ckpt_module.removeprefix("model.language_model.")


def _fields(fmt) -> list[torch.Tensor | None]:
    if isinstance(fmt, FP8BlockWeight):
        return [fmt.qweight.view(torch.uint8), fmt.scale_inv]
    return [fmt.qweight, fmt.scales, fmt.qzeros, torch.tensor([fmt.in_features, fmt.group_size])]


def test_loaded_formats_hold_the_tensors_written(quantized):
    d, written = quantized
    model = load_target(d)
    assert written and len(written) < sum(isinstance(m, nn.Linear | QuantizedLinear) for m in model.modules())
    for ckpt_module, fmt in written.items():
        module = model.get_submodule(_module_name(ckpt_module))
        assert isinstance(module, QuantizedLinear)
        assert type(module.weight_format) is type(fmt)
        for got, want in zip(_fields(module.weight_format), _fields(fmt), strict=True):
            if want is None:
                assert got is None
            else:
                assert got.dtype == want.dtype and torch.equal(got, want)
    # the layers kept dense in the file stay nn.Linear, the lm_head among them
    assert isinstance(model.lm_head, nn.Linear)
    assert isinstance(model.layers[0].linear_attn.in_proj_a, nn.Linear)


def _dequantized_dense(dense_dir, written):
    model = load_target(dense_dir)
    original = load_target(dense_dir)
    for ckpt_module, fmt in written.items():
        model.get_submodule(_module_name(ckpt_module)).weight.data = fmt.dequantize()
    return model, original


@torch.no_grad()
def test_logits_and_taps_equal_the_dense_model_of_the_dequantized_weights(quantized, dense):
    d, written = quantized
    model = load_target(d)
    reference, original = _dequantized_dense(dense, written)
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(3))
    taps = (1, 2)
    outs = [eager.forward_rows(m, ids, taps) for m in (model, reference, original)]
    torch.testing.assert_close(outs[0].logits, outs[1].logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[0].features, outs[1].features, rtol=1e-5, atol=1e-5)
    # the weights really were quantized: the original dense model gives other logits
    assert (outs[0].logits - outs[2].logits).abs().max() > 1e-3


@torch.no_grad()
def test_quantized_drafter_equals_its_dequantized_dense_form(tmp_path):
    write_qwen3(tmp_path / "target")
    target_cfg = TargetConfig.from_dir(tmp_path / "target")
    write_drafter(tmp_path / "dense", target_layer_ids=[1, 2])
    written = write_quantized(tmp_path / "dense", tmp_path / "fp8", "fp8", keep_dense=())
    drafter = load_drafter(tmp_path / "fp8", target_cfg)
    reference = load_drafter(tmp_path / "dense", target_cfg)
    assert isinstance(drafter.fc, QuantizedLinear) and "layers.0.self_attn.q_proj" in written
    for name, fmt in written.items():
        reference.get_submodule(name).weight.data = fmt.dequantize()
    features = torch.randn(1, 7, 2 * 64)
    positions = torch.arange(7).unsqueeze(0)
    for (k, v), (rk, rv) in zip(drafter.context_kv(features, positions), reference.context_kv(features, positions)):
        torch.testing.assert_close(k, rk, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, rv, rtol=1e-5, atol=1e-5)


# ---- bad files: one line naming the tensor or field ----------------------------------------------------------------

GATE = "model.language_model.layers.0.mlp.gate_proj"


def _variant(dense, tmp_path, name):
    d = tmp_path / name
    write_quantized(dense, d, **VARIANTS[name])
    return d


def _edit_tensors(d, edit):
    tensors = load_file(str(d / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(d / "model.safetensors"))


def _edit_quant_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def _fails(d, match):
    with pytest.raises(DFlashError, match=match) as info:
        load_target(d)
    assert "\n" not in str(info.value)


def test_missing_fp8_scale_is_named(dense, tmp_path):
    d = _variant(dense, tmp_path, "fp8")
    _edit_tensors(d, lambda t: t.pop(GATE + ".weight_scale_inv"))
    _fails(d, rf"missing tensor '{GATE}.weight_scale_inv'")


def test_fp8_scale_of_the_wrong_shape_is_named(dense, tmp_path):
    d = _variant(dense, tmp_path, "fp8")
    _edit_tensors(d, lambda t: t.update({GATE + ".weight_scale_inv": torch.ones(1, 1)}))
    _fails(d, rf"tensor '{GATE}.weight_scale_inv' has shape \[1, 1\], expected \[2, 1\]")


def test_fp8_scale_beside_a_dense_weight_is_named(dense, tmp_path):
    d = _variant(dense, tmp_path, "fp8")
    _edit_tensors(d, lambda t: t.update({GATE + ".weight": torch.zeros(160, 64, dtype=torch.bfloat16)}))
    _fails(d, rf"tensor '{GATE}.weight' is torch.bfloat16, expected float8_e4m3fn")


def test_missing_gptq_scales_and_wrong_qzeros_shape_are_named(dense, tmp_path):
    d = _variant(dense, tmp_path, "gptq_sym_v1")
    _edit_tensors(d, lambda t: t.pop(GATE + ".scales"))
    _fails(d, rf"missing tensor '{GATE}.scales'")
    d = _variant(dense, tmp_path, "awq")
    _edit_tensors(d, lambda t: t.update({GATE + ".qzeros": torch.zeros(2, 20, dtype=torch.int32)}))
    _fails(d, rf"tensor '{GATE}.qzeros' has shape \[2, 20\], expected \[1, 20\]")


def test_act_order_gptq_is_refused(dense, tmp_path):
    d = _variant(dense, tmp_path, "gptq_sym_v1")
    down = "model.language_model.layers.0.mlp.down_proj"
    act_order = (torch.arange(160, dtype=torch.int32) // 128)[torch.randperm(160)]
    _edit_tensors(d, lambda t: t.update({down + ".g_idx": act_order}))
    _fails(d, rf"module '{down}': g_idx: act-order")


def test_nonzero_bias_of_a_layer_without_bias_is_refused(dense, tmp_path):
    d = _variant(dense, tmp_path, "gptq_sym_v1")
    _edit_tensors(d, lambda t: t.update({GATE + ".bias": torch.ones(160, dtype=torch.float16)}))
    _fails(d, rf"unexpected tensor '{GATE}.bias'")


@pytest.mark.parametrize(
    "variant,field,value,match",
    [
        ("fp8", "quant_method", "bitsandbytes", r"field 'quantization_config.quant_method' is 'bitsandbytes'"),
        ("fp8", "weight_block_size", [64, 64], r"field 'quantization_config.weight_block_size' is \[64, 64\]"),
        ("fp8", "activation_scheme", "static", r"field 'quantization_config.activation_scheme' is 'static'"),
        ("gptq_sym_v1", "bits", 8, r"field 'quantization_config.bits' is 8; supported: 4"),
        ("gptq_sym_v1", "group_size", 64, r"field 'quantization_config.group_size' is 64"),
        ("gptq_sym_v1", "checkpoint_format", "marlin", r"field 'quantization_config.checkpoint_format' is 'marlin'"),
        ("awq", "version", "gemv", r"field 'quantization_config.version' is 'gemv'"),
    ],
)
def test_unsupported_quantization_config_fields_are_named(dense, tmp_path, variant, field, value, match):
    d = _variant(dense, tmp_path, variant)
    _edit_quant_config(d, **{field: value})
    _fails(d, match)


def test_gptq_sym_flag_disagreeing_with_the_zero_points_is_refused(dense, tmp_path):
    d = _variant(dense, tmp_path, "gptq_asym_v2")
    _edit_quant_config(d, sym=True)
    _fails(d, r"qzeros: symmetric=True but the zero points are not all 8")


def test_fp8_tensors_outside_a_quantized_linear_are_refused(dense, tmp_path):
    d = _variant(dense, tmp_path, "fp8")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["quantization_config"]
    (d / "config.json").write_text(json.dumps(cfg))
    _fails(d, r"tensor 'model.language_model.layers.\d+.\S+.weight' is torch.float8_e4m3fn but config.json has no")
    d = _variant(dense, tmp_path, "gptq_sym_v1")
    conv = "model.language_model.layers.0.linear_attn.conv1d.weight"
    _edit_tensors(d, lambda t: t.update({conv: t[conv].to(torch.float8_e4m3fn)}))
    _fails(d, rf"tensor '{conv}' is torch.float8_e4m3fn but it is not a quantized linear layer")


@torch.no_grad()
def test_tied_checkpoint_with_a_quantized_head_keeps_the_dense_embedding(tmp_path):
    from checkpoints import rewrite_tensors, write_llama

    write_llama(tmp_path / "dense", seed=2)
    rewrite_tensors(tmp_path / "dense", lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    written = write_quantized(tmp_path / "dense", tmp_path / "gptq", "gptq", keep_dense=())
    model = load_target(tmp_path / "gptq")
    assert isinstance(model.lm_head, QuantizedLinear) and isinstance(model.embed_tokens, nn.Embedding)
    reference = load_target(tmp_path / "dense")
    reference.lm_head.weight = nn.Parameter(written["lm_head"].dequantize())
    for name, fmt in written.items():
        reference.get_submodule(_module_name(name).removeprefix("model.")).weight.data = fmt.dequantize()
    ids = torch.randint(0, VOCAB, (1, 11), generator=torch.Generator().manual_seed(0))
    got, want = (eager.forward_rows(m, ids).logits for m in (model, reference))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    _edit_tensors(tmp_path / "gptq", lambda t: t.pop("model.embed_tokens.weight"))
    _fails(tmp_path / "gptq", r"missing tensor 'embed_tokens.weight' \(the lm_head is stored quantized\)")


@pytest.mark.parametrize("name", ["fp8", "gptq_asym_v2"])
def test_the_batched_runtime_runs_a_prequantized_checkpoint_in_its_formats(dense, tmp_path, name):
    """The compiled step keeps each pre-quantized layer's format (its tensors are the step's weights) and gives the
    eager loop's greedy tokens on the same checkpoint."""
    from dflash_compiler.runtime.batch import BatchRunner
    from dflash_compiler.runtime.speculative import SpeculativeDecoder

    d = _variant(dense, tmp_path, name)
    prompts = [[3, 5, 7, 11, 13, 17, 19], [2, 4, 8, 16, 32, 64]]
    expected = [SpeculativeDecoder(load_target(d)).generate(p, 12)[0] for p in prompts]
    target = load_target(d)
    fmt = {m.fmt for m in target.modules() if isinstance(m, QuantizedLinear)}
    runner = BatchRunner(target, None, max_batch=2, max_seq_len=64)
    linears = [
        n
        for n in runner.model.compiled.graph("step").gm.graph.nodes
        if n.meta.get("lowering", {}).get("op") == "linear"
    ]
    assert fmt and fmt <= {n.kwargs.get("fmt", n.args[6] if len(n.args) > 6 else "dense") for n in linears}
    ids = [runner.add_request(p, 12) for p in prompts]
    out = {i: [] for i in ids}
    while runner.has_work:
        for ev in runner.step():
            out[ev.request_id].extend(ev.tokens)
    assert [out[i] for i in ids] == expected
