"""Tiny random checkpoints in the upstream formats, written by transformers' own classes where they exist."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

VOCAB = 96


def _init_random(model: torch.nn.Module, seed: int) -> None:
    """Random weights with enough spread that different tokens get different argmaxes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.rand(p.shape, generator=gen) * 2 - 1)
            elif name.endswith("dt_bias"):
                p.copy_(torch.rand(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if "linear_attn.norm" in name else 0.0))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / p.shape[-1] ** 0.5))


def qwen35_text_config(**overrides):
    from transformers import Qwen3_5TextConfig

    kw = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        eos_token_id=VOCAB - 1,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return Qwen3_5TextConfig(**kw)


def write_qwen35(directory: Path, seed: int = 0, multimodal: bool = True, **overrides) -> torch.nn.Module:
    """A Qwen3.5 target; multimodal=True writes the real layout (Qwen3_5ForConditionalGeneration with a tiny
    vision tower, weights under model.language_model.*)."""
    from transformers import Qwen3_5Config, Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration

    text = qwen35_text_config(**overrides)
    if multimodal:
        vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=text.hidden_size)
        cfg = Qwen3_5Config(text_config=text.to_dict(), vision_config=vision, tie_word_embeddings=False)
        model = Qwen3_5ForConditionalGeneration(cfg)
    else:
        model = Qwen3_5ForCausalLM(text)
    return _save(model, directory, seed, max_shard_size="200KB")


# Sizes every tiny dense target shares; each writer adds what its family needs.
DENSE_SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    eos_token_id=VOCAB - 1,
)


def _save(model: torch.nn.Module, directory: Path, seed: int, **save_kwargs) -> torch.nn.Module:
    _init_random(model, seed)
    model.save_pretrained(directory, **save_kwargs)
    return model.eval()


def write_qwen3(directory: Path, seed: int = 0, **overrides) -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    kw = {**DENSE_SIZES, "head_dim": 16, "rope_theta": 1e6, "tie_word_embeddings": False, **overrides}
    return _save(Qwen3ForCausalLM(Qwen3Config(**kw)), directory, seed)


def write_llama(directory: Path, seed: int = 0, **overrides) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    kw = {**DENSE_SIZES, "rope_parameters": rope, "tie_word_embeddings": True, **overrides}
    return _save(LlamaForCausalLM(LlamaConfig(**kw)), directory, seed)


def write_drafter(
    directory: Path,
    target_hidden: int = 64,
    target_layers: int = 4,
    layout: str = "legacy",
    num_layers: int = 2,
    target_layer_ids: list[int] | None = None,
    block_size: int = 8,
    mask_token_id: int = VOCAB - 2,
    seed: int = 0,
    sliding_window: int | None = None,
    model_prefix: bool = False,
    vocab: int = VOCAB,
) -> dict:
    """A DFlash drafter in the upstream format. layout='legacy': block_size at the top level, rope_theta;
    layout='nested': everything under dflash_config, rope_parameters, and (with sliding_window) a sliding layer."""
    directory.mkdir(parents=True, exist_ok=True)
    h, heads, kv_heads, hd, inter = target_hidden, 4, 2, 16, 96
    cfg: dict = {
        "architectures": ["DFlashDraftModel"],
        "model_type": "qwen3",
        "hidden_size": h,
        "intermediate_size": inter,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hd,
        "hidden_act": "silu",
        "attention_bias": False,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 512,
        "num_target_layers": target_layers,
        "vocab_size": vocab,
        "tie_word_embeddings": True,
        "dtype": "float32",
    }
    dflash: dict = {"mask_token_id": mask_token_id}
    if target_layer_ids is not None:
        dflash["target_layer_ids"] = target_layer_ids
    if layout == "legacy":
        cfg.update(block_size=block_size, rope_theta=1e6, rope_scaling=None, sliding_window=None)
        cfg["layer_types"] = ["full_attention"] * num_layers
    else:
        dflash["block_size"] = block_size
        cfg["rope_parameters"] = {"rope_theta": 1e6, "rope_type": "default"}
        if sliding_window is not None:
            cfg["layer_types"] = ["sliding_attention"] * (num_layers - 1) + ["full_attention"]
            cfg["sliding_window"] = sliding_window
    cfg["dflash_config"] = dflash
    n_taps = len(target_layer_ids) if target_layer_ids is not None else num_layers
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (
            torch.randn(*shape, generator=gen) * (0.5 / shape[-1] ** 0.5)
            if len(shape) > 1
            else (1.0 + 0.1 * torch.randn(*shape, generator=gen))
        )

    tensors = {"fc.weight": rnd(h, n_taps * h), "hidden_norm.weight": rnd(h), "norm.weight": rnd(h)}
    for i in range(num_layers):
        p = f"layers.{i}."
        tensors.update(
            {
                p + "input_layernorm.weight": rnd(h),
                p + "post_attention_layernorm.weight": rnd(h),
                p + "self_attn.q_proj.weight": rnd(heads * hd, h),
                p + "self_attn.k_proj.weight": rnd(kv_heads * hd, h),
                p + "self_attn.v_proj.weight": rnd(kv_heads * hd, h),
                p + "self_attn.o_proj.weight": rnd(h, heads * hd),
                p + "self_attn.q_norm.weight": rnd(hd),
                p + "self_attn.k_norm.weight": rnd(hd),
                p + "mlp.gate_proj.weight": rnd(inter, h),
                p + "mlp.up_proj.weight": rnd(inter, h),
                p + "mlp.down_proj.weight": rnd(h, inter),
            }
        )
    if model_prefix:
        tensors = {"model." + k: v for k, v in tensors.items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(cfg, indent=1))
    return cfg


CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def write_char_tokenizer(directory: Path, vocab_size: int = VOCAB) -> None:
    """A character-level tokenizer over printable ASCII: ids 0..vocab-3 are characters, vocab-2 is the mask
    token and vocab-1 the end-of-text token, with a chat template."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 32 + vocab_size - 2)]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab["<|mask|>"], vocab["<|endoftext|>"] = vocab_size - 2, vocab_size - 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|mask|>"]})
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)


def rewrite_tensors(directory: Path, edit) -> None:
    """Applies edit(dict of tensors) to a single-file checkpoint in place."""
    from safetensors.torch import load_file

    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def write_quantized(
    dense: Path,
    directory: Path,
    method: str,
    keep_dense: tuple[str, ...] = ("lm_head", "in_proj_a", "in_proj_b"),
    symmetric: bool = True,
    gptq_format: str = "gptq",
    zero_bias: bool = False,
) -> dict:
    """The dense checkpoint in `dense` re-written pre-quantized, as the upstream exporters lay it out: fp8 (128x128
    block scales, Qwen's FP8 releases), gptq or awq (INT4 group 128). Every 2-D linear weight is quantized except
    the embedding, the vision tower and modules whose name ends with one of `keep_dense`. zero_bias adds the all-zero
    biases GPTQ exporters save. Returns {checkpoint module name: the weight format written}."""
    from safetensors.torch import load_file

    from dflash_compiler.codegen.weight_formats import quantize_fp8_block, quantize_int4

    tensors = {}
    for f in sorted(dense.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    out, formats = {}, {}
    for name, t in tensors.items():
        module = name.removesuffix(".weight")
        linear = name.endswith(".weight") and t.dim() == 2 and "embed_tokens" not in name
        if not linear or "visual." in name or module.endswith(keep_dense):
            out[name] = t
            continue
        if method == "fp8":
            fmt = quantize_fp8_block(t)
            out.update({name: fmt.qweight, module + ".weight_scale_inv": fmt.scale_inv})
        else:
            fmt = quantize_int4(t, group_size=128, symmetric=symmetric and method == "gptq")
            packed = fmt.to_awq() if method == "awq" else fmt.to_gptq(v1=gptq_format == "gptq")
            out.update({f"{module}.{k}": v for k, v in packed.items()})
            if method == "gptq":
                out[module + ".g_idx"] = torch.arange(t.shape[1], dtype=torch.int32) // 128
            if zero_bias:
                out[module + ".bias"] = torch.zeros(t.shape[0], dtype=torch.float16)
        formats[module] = fmt
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(directory / "model.safetensors"))
    cfg = json.loads((dense / "config.json").read_text())
    cfg["quantization_config"] = {
        "fp8": {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
            "modules_to_not_convert": list(keep_dense),
        },
        "gptq": {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": 128,
            "desc_act": False,
            "sym": symmetric,
            "checkpoint_format": gptq_format,
        },
        "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
    }[method]
    (directory / "config.json").write_text(json.dumps(cfg, indent=1))
    return formats
