"""Every bad input gives one clear line naming the file, field, tensor or parameter."""

import json

import pytest
import torch
from checkpoints import write_char_tokenizer, write_drafter, write_qwen3, write_qwen35
from safetensors.torch import load_file, save_file

from dflash_compiler.errors import DFlashError
from dflash_compiler.models.loader import load_drafter, load_target, parse_dtype
from dflash_compiler.runtime import Engine
from dflash_compiler.runtime.engine import check_device
from dflash_compiler.runtime.speculative import SpeculativeDecoder


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    write_qwen3(root / "target")
    write_char_tokenizer(root / "target")
    write_drafter(root / "drafter", target_layer_ids=[1, 2])
    return root


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(d, fn):
    path = d / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


def _raises(match, fn, *args, **kwargs):
    with pytest.raises(DFlashError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_tensor(dirs, tmp_path):
    d = _copy(dirs / "target", tmp_path / "t")
    _edit_tensors(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    _raises(r"missing tensor 'layers.1.mlp.up_proj.weight'", load_target, d)


def test_unexpected_tensor(dirs, tmp_path):
    d = _copy(dirs / "target", tmp_path / "t")
    _edit_tensors(d, lambda t: t.update({"model.layers.0.extra.weight": torch.ones(2)}))
    _raises(r"model.safetensors: unexpected tensor 'model.layers.0.extra.weight'", load_target, d)


def test_misshaped_tensor(dirs, tmp_path):
    d = _copy(dirs / "target", tmp_path / "t")
    _edit_tensors(d, lambda t: t.update({"model.norm.weight": torch.ones(63)}))
    _raises(r"tensor 'model.norm.weight' has shape \[63\], expected \[64\]", load_target, d)


def test_truncated_and_corrupt_safetensors(dirs, tmp_path):
    d = _copy(dirs / "target", tmp_path / "t")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    _raises(r"model.safetensors: truncated or corrupt", load_target, d)
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + data[24:])
    _raises(r"model.safetensors: corrupt safetensors file", load_target, d)
    f.write_bytes(b"\x01\x02")
    _raises(r"model.safetensors: corrupt", load_target, d)


def test_missing_shard_of_index(tmp_path):
    write_qwen35(tmp_path / "t")
    shard = sorted((tmp_path / "t").glob("model-*.safetensors"))[0]
    shard.unlink()
    _raises(rf"shard '{shard.name}'.*missing", load_target, tmp_path / "t")


def test_unknown_model_type_and_bad_fields(dirs, tmp_path):
    d = _copy(dirs / "target", tmp_path / "t")
    _edit_config(d, model_type="gpt2")
    _raises(r"config.json: field 'model_type' is 'gpt2'", load_target, d)
    _edit_config(d, model_type="qwen3", hidden_size="wide")
    _raises(r"config.json: field 'hidden_size' must be an integer", load_target, d)
    (d / "config.json").write_text("{not json")
    _raises(r"config.json: not valid JSON", load_target, d)
    _raises(r"nowhere: does not exist \(expected a target checkpoint directory\)", load_target, tmp_path / "nowhere")
    _raises(
        r"nowhere: does not exist \(expected a drafter",
        load_drafter,
        tmp_path / "nowhere",
        load_target(dirs / "target").cfg,
    )
    (tmp_path / "a-file").write_text("")
    _raises(r"a-file: not a checkpoint directory", load_target, tmp_path / "a-file")


def test_swapped_target_and_drafter(dirs):
    _raises(r"drafter.config.json: looks like a DFlash drafter, not a target", load_target, dirs / "drafter")
    target = load_target(dirs / "target")
    _raises(
        r"target.config.json: looks like a target model, not a DFlash drafter",
        load_drafter,
        dirs / "target",
        target.cfg,
    )
    _raises(r"looks like a DFlash drafter, not a target", Engine.from_pretrained, dirs / "drafter", dirs / "target")


@pytest.mark.parametrize(
    "alias,dtype",
    [("bf16", torch.bfloat16), ("BFloat16", torch.bfloat16), ("fp16", torch.float16), ("half", torch.float16)]
    + [("float16", torch.float16), ("fp32", torch.float32), ("float", torch.float32), ("float32", torch.float32)],
)
def test_dtype_aliases(alias, dtype):
    assert parse_dtype(alias) is dtype


@pytest.mark.parametrize(
    "device,message",
    [
        ("gpu", r"parameter 'device': 'gpu' is not a torch device"),
        ("cuda:x", r"parameter 'device': 'cuda:x' is not a torch device"),
        pytest.param(
            "mps",
            r"parameter 'device' is 'mps' but MPS is not available here",
            marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="this host has MPS"),
        ),
        pytest.param(
            "xpu",
            r"parameter 'device' is 'xpu' but XPU is not available here",
            marks=pytest.mark.skipif(hasattr(torch, "xpu") and torch.xpu.is_available(), reason="this host has XPU"),
        ),
    ],
)
def test_unavailable_devices(dirs, device, message):
    _raises(message, check_device, device)
    _raises(message, Engine.from_pretrained, dirs / "target", device=device)


def test_fc_width_must_match_taps(dirs, tmp_path):
    target = load_target(dirs / "target")
    d = _copy(dirs / "drafter", tmp_path / "d")
    _edit_config(d, dflash_config={"mask_token_id": 94, "target_layer_ids": [0, 1, 2]})
    _raises(r"tensor 'fc.weight' has 128 input features, expected .* 3 x 64 = 192", load_drafter, d, target.cfg)


def test_layer_ids_out_of_range(dirs, tmp_path):
    target = load_target(dirs / "target")
    d = _copy(dirs / "drafter", tmp_path / "d")
    _edit_config(d, dflash_config={"mask_token_id": 94, "target_layer_ids": [1, 9]})
    _raises(r"field 'target_layer_ids' has layer 9, out of range for a 4-layer target", load_drafter, d, target.cfg)


def test_drafter_that_does_not_fit_the_target(dirs, tmp_path):
    target = load_target(dirs / "target")
    d = _copy(dirs / "drafter", tmp_path / "d")
    _edit_config(d, hidden_size=32)
    _raises(r"field 'hidden_size' is 32 but the target's hidden size is 64", load_drafter, d, target.cfg)
    _edit_config(d, hidden_size=64, vocab_size=1000)
    _raises(r"field 'vocab_size' is 1000 but the target's is 96", load_drafter, d, target.cfg)
    _edit_config(d, vocab_size=96, dflash_config={"target_layer_ids": [1, 2]})
    _raises(r"field 'dflash_config.mask_token_id' is missing", load_drafter, d, target.cfg)


def test_no_tokenizer_anywhere(dirs, tmp_path):
    d = tmp_path / "t"
    write_qwen3(d)
    _raises(r"no tokenizer found in .*t or .*drafter", Engine.from_pretrained, d, dirs / "drafter")


def test_bad_requests(dirs):
    engine = Engine.from_pretrained(dirs / "target", dirs / "drafter")
    _raises(r"parameter 'max_new_tokens' must be an integer >= 1, got 0", engine.generate, "abc", max_new_tokens=0)
    _raises(r"parameter 'prompt' is 600 tokens, longer than the model's context", engine.generate, "x" * 600)
    _raises(r"parameter 'prompt' holds a token id outside the vocabulary", engine.generate, [1, 500])
    _raises(r"parameter 'prompt' is empty", engine.generate, [])
    _raises(r"parameter 'temperature' must be >= 0", engine.generate, "abc", temperature=-1.0)
    _raises(r"parameter 'top_p' must be in \(0, 1\]", engine.generate, "abc", temperature=1.0, top_p=0.0)
    _raises(
        r"parameter 'block_size' must be in 1..8, got 9", SpeculativeDecoder, engine.target, engine.decoder.proposer, 9
    )
    _raises(r"parameter 'dtype': 'float8' is not one of", Engine.from_pretrained, dirs / "target", dtype="float8")
