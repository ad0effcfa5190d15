"""Random-weight models at real shapes for the end-to-end benchmark, built directly on the device.

The target (Qwen3.5-27B shapes: 64 layers, 48 Gated DeltaNet + 16 gated attention, H 5120) and the drafter
(z-lab/Qwen3.5-27B-DFlash shapes: 5 layers, H 5120, 32/8 heads of 128, I 17408, taps [1,16,31,46,61], block 16)
are built with seeded random weights on the device (models/random_init.py), so the 51 GB of BF16 target weights
exist exactly once. `transformers_model` wraps the same
tensors in transformers' own Qwen3_5ForCausalLM (its parameters are ours, no copy) for the generate() baseline.

Three sizes: "27b" (the real shapes), "small" (4 layers, hidden 1024: every code path in seconds on a GPU) and
"tiny" (hidden 64: CPU tests of the plumbing).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dflash_compiler.models import eager
from dflash_compiler.models.config import DrafterConfig, TargetConfig
from dflash_compiler.models.random_init import assign_parameter, random_drafter, random_target
from dflash_compiler.models.target import TargetModel
from dflash_compiler.tuning.shapes import preset_dirs

MASK_TOKEN_ID = 248070


def _qwen35_text(**kw: Any) -> dict[str, Any]:
    """The Qwen3.5-27B text config the package ships for tuning (tuning/models/), with overrides; the layer
    types follow the (possibly overridden) layer count."""
    target_dir, _ = preset_dirs("qwen3.5-27b")
    d = json.loads((target_dir / "config.json").read_text())
    d.update(kw)
    d["layer_types"] = [
        "linear_attention" if (i + 1) % d["full_attention_interval"] else "full_attention"
        for i in range(d["num_hidden_layers"])
    ]
    return d


def _drafter(
    target: dict[str, Any],
    layers: int,
    taps: list[int],
    heads: int,
    kv_heads: int,
    head_dim: int,
    intermediate: int,
    block_size: int = 16,
) -> dict[str, Any]:
    """An upstream DFlashDraftModel config.json dict (spec/dflash.md §1.2) for the given target dict."""
    return {
        "architectures": ["DFlashDraftModel"],
        "model_type": "qwen3",
        "hidden_size": target["hidden_size"],
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e7,
        "max_position_embeddings": target["max_position_embeddings"],
        "vocab_size": target["vocab_size"],
        "block_size": block_size,
        "num_target_layers": target["num_hidden_layers"],
        "dflash_config": {"mask_token_id": min(MASK_TOKEN_ID, target["vocab_size"] - 2), "target_layer_ids": taps},
        "layer_types": ["full_attention"] * layers,
    }


@dataclass(frozen=True)
class ModelSpec:
    """A target/drafter pair of config.json dicts and the parsed configs."""

    name: str
    target_json: dict[str, Any]
    drafter_json: dict[str, Any]

    @property
    def target(self) -> TargetConfig:
        return TargetConfig.from_dict(self.target_json, Path(f"<{self.name} target>"))

    @property
    def drafter(self) -> DrafterConfig:
        return DrafterConfig.from_dict(self.drafter_json, Path(f"<{self.name} drafter>"))


def spec(size: str = "27b") -> ModelSpec:
    if size == "27b":  # the configs the package ships (tuning/models/): one definition of the real shapes
        target_dir, drafter_dir = preset_dirs("qwen3.5-27b")
        t, d = (json.loads((p / "config.json").read_text()) for p in (target_dir, drafter_dir))
        return ModelSpec("qwen3.5-27b", t, d)
    if size == "small":
        t = _qwen35_text(
            vocab_size=32768,
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=128,
            linear_num_key_heads=4,
            linear_num_value_heads=12,
            eos_token_id=32767,
        )
        return ModelSpec("small", t, _drafter(t, 2, [0, 2], 8, 2, 128, 3072))
    if size == "tiny":
        t = _qwen35_text(
            vocab_size=96,
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
            max_position_embeddings=4096,
            eos_token_id=95,
        )
        return ModelSpec("tiny", t, _drafter(t, 2, [0, 2], 4, 2, 16, 96, block_size=16))
    raise ValueError(f"size: expected 27b, small or tiny, got {size!r}")


# ---- random weights, materialized one tensor at a time --------------------------------------------------------


def build_target(ms: ModelSpec, device: str | torch.device = "cuda", dtype=torch.bfloat16, seed: int = 0):
    return random_target(ms.target, device, dtype, seed)


def build_drafter(ms: ModelSpec, device: str | torch.device = "cuda", dtype=torch.bfloat16, seed: int = 1):
    return random_drafter(ms.drafter, ms.target_json["hidden_size"], device, dtype, seed)


def param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@torch.inference_mode()
def check_finite(target: TargetModel, prompt_len: int = 32, seed: int = 0) -> dict[str, Any]:
    """One prefill through the models' paged forward, run eagerly; the last logits must be finite (random weights,
    64 layers)."""
    device = target.embed_tokens.weight.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, target.cfg.vocab_size, (1, prompt_len), generator=gen).to(device)
    out = eager.prefill(target, eager.request_pools(target, 1, prompt_len), ids, last_only=True)
    logits = out.logits[0, -1].float()
    return {
        "finite": bool(torch.isfinite(logits).all()),
        "logits_std": float(logits.std()),
        "argmax": int(logits.argmax()),
        "ids": ids,
        "logits": logits,
    }


# ---- transformers on the same weights --------------------------------------------------------------------------


def transformers_model(target: TargetModel, ms: ModelSpec):
    """transformers' Qwen3_5ForCausalLM whose parameters ARE the target's tensors (shared storage, no copy).

    HF names are ours under `model.` (lm_head at the top level), as models/loader.py maps them the other way.
    """
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5TextRotaryEmbedding

    device = target.embed_tokens.weight.device
    fields = {k: v for k, v in ms.target_json.items() if k != "model_type"}
    cfg = Qwen3_5TextConfig(**fields)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = Qwen3_5ForCausalLM(cfg)
    ours = dict(target.named_parameters())
    for name, p in list(hf.named_parameters()):
        t = ours[name.removeprefix("model.")]
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{name}: ours {tuple(t.shape)} vs transformers {tuple(p.shape)}")
        assign_parameter(hf, name, nn.Parameter(t, requires_grad=False))
    with torch.device("cpu"):
        hf.model.rotary_emb = Qwen3_5TextRotaryEmbedding(cfg)
    hf.model.rotary_emb.to(device)
    left = [n for n, b in hf.named_buffers() if b.is_meta] + [n for n, p in hf.named_parameters() if p.is_meta]
    if left:
        raise ValueError(f"transformers model still has meta tensors: {left[:3]}")
    return hf.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def transformers_generate(
    target: TargetModel, ms: ModelSpec, prompt_len: int = 64, new_tokens: int = 32, seed: int = 0
) -> dict[str, Any]:
    """transformers' own greedy generate() on the target's weights (as users would run it: its torch GDN
    fallback when flash-linear-attention is absent). Times a full generate of `new_tokens` and one of a single
    token (prefill + first token), so decode tokens/s excludes the prefill."""
    model = transformers_model(target, ms)
    device = target.embed_tokens.weight.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, ms.target_json["vocab_size"], (1, prompt_len), generator=gen).to(device)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

    def run(n: int, model=model) -> tuple[float, torch.Tensor]:
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, **kw)
        _sync(device)
        return time.perf_counter() - t0, out

    run(2)  # warm-up
    t1, _ = run(1)
    tn, out = run(new_tokens)
    generated = out.shape[1] - prompt_len
    del model
    return {
        "prompt_tokens": prompt_len,
        "new_tokens": int(generated),
        "seconds": round(tn, 3),
        "tokens_per_s": round(generated / tn, 2),
        "prefill_s": round(t1, 3),
        "decode_tokens_per_s": round((generated - 1) / max(tn - t1, 1e-9), 2),
        "ms_per_token": round(1e3 * (tn - t1) / max(generated - 1, 1), 1),
        "first_tokens": out[0, prompt_len : prompt_len + 8].tolist(),
    }


@torch.inference_mode()
def compare_with_transformers(target: TargetModel, ms: ModelSpec, check: dict[str, Any]) -> dict[str, Any]:
    """Last-position logits of transformers' forward on the shared weights vs ours (the name mapping is right)."""
    hf = transformers_model(target, ms)
    ref = hf(check["ids"]).logits[0, -1].float()
    ours = check["logits"]
    del hf
    return {
        "rel_err": float((ours - ref).norm() / ref.norm()),
        "argmax_match": bool(int(ref.argmax()) == check["argmax"]),
    }


# ---- a device check of the build: python bench/e2e_models.py --check [--size 27b] ---------------------------


def _gib() -> dict[str, float]:
    return {
        "allocated_GiB": round(torch.cuda.memory_allocated() / 2**30, 2),
        "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }


def convert_linears(model: nn.Module, quant: str, skip: tuple[str, ...] = ("lm_head",)) -> dict[str, Any]:
    """Quantizes every linear weight of model one at a time, dropping each bf16 original as it goes (what a
    runtime converting at load must fit in), and reports bytes, time and peak memory."""
    from dflash_compiler.codegen import weight_formats as wf

    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    kept, total = {}, 0
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear) or name in skip:
            continue
        w = mod.weight
        q = wf.quantize_fp8_channel(w) if quant == "fp8" else wf.quantize_int4(w)
        mod.weight = nn.Parameter(torch.empty(0, device=w.device, dtype=w.dtype), requires_grad=False)
        del w
        kept[name] = q
        total += q.nbytes
    torch.cuda.synchronize()
    return {"quant": quant, "linear_GB": round(total / 1e9, 3), "seconds": round(time.perf_counter() - t0, 1), **_gib()}


def main(argv: list[str] | None = None) -> None:
    import argparse
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import copy_bandwidth_tbps, git_commit

    p = argparse.ArgumentParser(
        description="Build the random pair on the GPU and check it (finite logits, transformers on the same "
        "weights, quantization at load fits, generate() speed)."
    )
    p.add_argument("--check", action="store_true", required=True)
    p.add_argument("--size", default="27b")
    p.add_argument("--hf-new-tokens", type=int, default=32)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    ms = spec(args.size)
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "commit": git_commit(), "model": ms.name}

    def note(key: str, value: Any) -> None:
        report[key] = value
        print(f"{key}: {value}", flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")

    note("copy_bandwidth_TBps", round(copy_bandwidth_tbps(), 3))
    t0 = time.perf_counter()
    target = build_target(ms, "cuda")
    drafter = build_drafter(ms, "cuda")
    torch.cuda.synchronize()
    note(
        "build",
        {
            "seconds": round(time.perf_counter() - t0, 1),
            "target_GB": round(param_bytes(target) / 1e9, 2),
            "drafter_GB": round(param_bytes(drafter) / 1e9, 2),
            **_gib(),
        },
    )
    t0 = time.perf_counter()
    check = check_finite(target)
    note(
        "ours_prefill32",
        {
            "finite": check["finite"],
            "logits_std": round(check["logits_std"], 4),
            "seconds": round(time.perf_counter() - t0, 1),
        },
    )
    note("vs_transformers", compare_with_transformers(target, ms, check))
    note("transformers_generate", transformers_generate(target, ms, new_tokens=args.hf_new_tokens))
    note("memory_after_generate", _gib())
    del drafter
    note("convert_fp8", convert_linears(target, "fp8"))
    del target
    torch.cuda.empty_cache()
    target = build_target(ms, "cuda")
    note("convert_int4", convert_linears(target, "int4"))


if __name__ == "__main__":
    main()
