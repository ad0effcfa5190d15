"""Model configs, parsed from a checkpoint's config.json with one-line errors that name the file and field."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import DFlashError

TARGET_MODEL_TYPES = ("qwen3_5", "qwen3_5_text", "qwen3", "llama")


def read_config_json(directory: str | Path) -> tuple[Path, dict[str, Any]]:
    path = Path(directory) / "config.json"
    if not Path(directory).is_dir():
        raise DFlashError(f"{directory}: not a checkpoint directory")
    if not path.is_file():
        raise DFlashError(f"{path}: missing (a checkpoint directory needs config.json)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DFlashError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DFlashError(f"{path}: expected a JSON object at the top level")
    return path, data


class _Fields:
    """Typed access to a config dict; every failure names the file and the field."""

    def __init__(self, path: Path, data: dict[str, Any], prefix: str = ""):
        self.path, self.data, self.prefix = path, data, prefix

    def _fail(self, name: str, why: str) -> DFlashError:
        return DFlashError(f"{self.path}: field '{self.prefix}{name}' {why}")

    def int(self, name: str, default: int | None = None, minimum: int = 1) -> int:
        value = self.data.get(name, default)
        if value is None:
            raise self._fail(name, "is missing")
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self._fail(name, f"must be an integer >= {minimum}, got {value!r}")
        return value

    def float(self, name: str, default: float | None = None) -> float:
        value = self.data.get(name, default)
        if value is None:
            raise self._fail(name, "is missing")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._fail(name, f"must be a number, got {value!r}")
        return float(value)

    def bool(self, name: str, default: bool) -> bool:
        value = self.data.get(name, default)
        if not isinstance(value, bool):
            raise self._fail(name, f"must be true or false, got {value!r}")
        return value

    def kv_heads(self, heads: int) -> int:
        kv = self.int("num_key_value_heads", heads)
        if heads % kv:
            raise self._fail("num_key_value_heads", f"must divide num_attention_heads ({heads})")
        return kv

    def optional(self, name: str, default: Any = None) -> Any:
        return self.data.get(name, default)


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rotary_dim: int
    # Scaling dict as transformers defines it (rope_type llama3/yarn/linear/...); None for plain RoPE.
    scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096

    def inv_freq(self) -> tuple[torch.Tensor, float]:
        """Inverse frequencies [rotary_dim/2] and the cos/sin scaling factor."""
        if self.scaling is None or self.scaling.get("rope_type", "default") == "default":
            exps = torch.arange(0, self.rotary_dim, 2, dtype=torch.float64) / self.rotary_dim
            return (1.0 / (self.theta**exps)).float(), 1.0
        from transformers import PretrainedConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        params = {**self.scaling, "rope_theta": self.theta}
        hf = PretrainedConfig(
            hidden_size=self.rotary_dim,
            num_attention_heads=1,
            head_dim=self.rotary_dim,
            max_position_embeddings=self.max_position_embeddings,
        )
        hf.rope_parameters = params
        with torch.device("cpu"):  # models are built on the meta device; frequencies are real data
            inv_freq, scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf, torch.device("cpu"))
        return inv_freq.float(), float(scale)


def _rope(fields: _Fields, head_dim: int, default_partial: float = 1.0) -> RopeConfig:
    """Reads RoPE settings from either the newer `rope_parameters` or the legacy `rope_theta`/`rope_scaling`."""
    params = fields.optional("rope_parameters") or {}
    legacy = fields.optional("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(legacy, dict):
        raise fields._fail("rope_parameters", "must be an object")
    theta = params.get("rope_theta", fields.optional("rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", fields.optional("partial_rotary_factor", default_partial))
    merged = {**legacy, **{k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}}
    merged.pop("mrope_section", None)  # text-only positions: all M-RoPE streams are equal, so plain 1-D RoPE
    merged.pop("mrope_interleaved", None)
    if "type" in merged and "rope_type" not in merged:
        merged["rope_type"] = merged.pop("type")
    rope_type = merged.get("rope_type", "default")
    known = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")
    if rope_type not in known:
        raise fields._fail("rope_parameters.rope_type", f"'{rope_type}' is not supported (supported: {known})")
    return RopeConfig(
        theta=float(theta),
        rotary_dim=int(head_dim * float(partial)),
        scaling=None if rope_type == "default" else merged,
        max_position_embeddings=fields.int("max_position_embeddings", 4096),
    )


@dataclass(frozen=True)
class TargetConfig:
    """A decoder-only target: Qwen3.5 hybrid (GDN + gated attention), Qwen3 or Llama."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    layer_types: tuple[str, ...]  # "full_attention" | "linear_attention" per layer
    attention_bias: bool = False
    # Qwen3.5 specifics
    zero_centered_norm: bool = False
    attn_output_gate: bool = False
    qk_norm: bool = False
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 0
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @property
    def is_hybrid(self) -> bool:
        return "linear_attention" in self.layer_types

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "full_attention"]

    @property
    def gdn_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "linear_attention"]

    @property
    def gdn_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def gdn_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def gdn_conv_dim(self) -> int:
        return 2 * self.gdn_key_dim + self.gdn_value_dim

    @classmethod
    def from_dir(cls, directory: str | Path) -> TargetConfig:
        path, data = read_config_json(directory)
        return cls.from_dict(data, path)

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path) -> TargetConfig:
        model_type = data.get("model_type")
        if model_type not in TARGET_MODEL_TYPES:
            raise DFlashError(
                f"{path}: field 'model_type' is {model_type!r}; supported targets: {', '.join(TARGET_MODEL_TYPES)}"
            )
        top = _Fields(path, data)
        eos = data.get("eos_token_id")
        if model_type == "qwen3_5":
            text = data.get("text_config")
            if not isinstance(text, dict):
                raise DFlashError(f"{path}: field 'text_config' is missing or not an object")
            f = _Fields(path, text, "text_config.")
            tie = top.bool("tie_word_embeddings", bool(text.get("tie_word_embeddings", False)))
            eos = text.get("eos_token_id", eos)
        else:
            f = top
            tie = top.bool("tie_word_embeddings", False)
        hybrid = model_type in ("qwen3_5", "qwen3_5_text")
        hidden = f.int("hidden_size")
        heads = f.int("num_attention_heads")
        head_dim = f.int("head_dim", hidden // heads)
        layers = f.int("num_hidden_layers")
        if hybrid:
            interval = f.int("full_attention_interval", 4)
            default_types = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(layers)]
        else:
            default_types = ["full_attention"] * layers
        layer_types = f.optional("layer_types") or default_types
        allowed = ("full_attention", "linear_attention") if hybrid else ("full_attention",)
        if len(layer_types) != layers or any(t not in allowed for t in layer_types):
            raise f._fail("layer_types", f"must list {layers} entries from {allowed}")
        rope = _rope(f, head_dim, default_partial=0.25 if hybrid else 1.0)
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
        kwargs: dict[str, Any] = {}
        if hybrid:
            kwargs = dict(
                zero_centered_norm=True,
                attn_output_gate=f.bool("attn_output_gate", True),
                qk_norm=True,
                linear_num_key_heads=f.int("linear_num_key_heads"),
                linear_num_value_heads=f.int("linear_num_value_heads"),
                linear_key_head_dim=f.int("linear_key_head_dim"),
                linear_value_head_dim=f.int("linear_value_head_dim"),
                linear_conv_kernel_dim=f.int("linear_conv_kernel_dim", 4, minimum=2),
            )
            if kwargs["linear_num_value_heads"] % kwargs["linear_num_key_heads"]:
                raise f._fail("linear_num_value_heads", "must be a multiple of linear_num_key_heads")
        elif model_type == "qwen3":
            kwargs = dict(qk_norm=True)
        kv_heads = f.kv_heads(heads)
        return cls(
            model_type=model_type,
            vocab_size=f.int("vocab_size"),
            hidden_size=hidden,
            intermediate_size=f.int("intermediate_size"),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=f.float("rms_norm_eps", 1e-6),
            rope=rope,
            max_position_embeddings=f.int("max_position_embeddings", 4096),
            tie_word_embeddings=tie,
            layer_types=tuple(layer_types),
            attention_bias=f.bool("attention_bias", False),
            eos_token_ids=eos_ids,
            **kwargs,
        )


def default_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """Taps spread evenly over layers 1..L-3 (the upstream rule), or the middle layer for a 1-layer drafter."""
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    start, end = 1, num_target_layers - 3
    span = end - start
    return [int(round(start + i * span / (num_draft_layers - 1))) for i in range(num_draft_layers)]


@dataclass(frozen=True)
class DrafterConfig:
    """A DFlash block-diffusion drafter (upstream `DFlashDraftModel`, Qwen3-style layers)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    vocab_size: int
    block_size: int
    mask_token_id: int
    target_layer_ids: tuple[int, ...]
    num_target_layers: int | None
    layer_types: tuple[str, ...]  # "full_attention" | "sliding_attention"
    sliding_window: int | None
    causal_layers: tuple[bool, ...]  # causal inside the block (sliding layers by default)
    attention_bias: bool = False

    @classmethod
    def from_dir(cls, directory: str | Path) -> DrafterConfig:
        path, data = read_config_json(directory)
        return cls.from_dict(data, path)

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path) -> DrafterConfig:
        f = _Fields(path, data)
        dflash = data.get("dflash_config") or {}
        if not isinstance(dflash, dict):
            raise f._fail("dflash_config", "must be an object")
        d = _Fields(path, dflash, "dflash_config.")

        def pick(name: str) -> tuple[_Fields, Any]:
            # Newer revisions nest the DFlash fields under dflash_config; older ones keep them at the top level.
            return (d, dflash[name]) if name in dflash else (f, data.get(name))

        hidden = f.int("hidden_size")
        heads = f.int("num_attention_heads")
        head_dim = f.int("head_dim", hidden // heads)
        layers = f.int("num_hidden_layers")
        src, _ = pick("block_size")
        block_size = src.int("block_size", 16)
        src, mask_id = pick("mask_token_id")
        if mask_id is None:
            raise DFlashError(f"{path}: field 'dflash_config.mask_token_id' is missing")
        mask_token_id = src.int("mask_token_id", minimum=0)
        num_target = data.get("num_target_layers")
        src, ids = pick("target_layer_ids")
        if ids is None:
            if num_target is None:
                raise DFlashError(
                    f"{path}: field 'dflash_config.target_layer_ids' is missing (and no num_target_layers)"
                )
            ids = default_target_layer_ids(f.int("num_target_layers"), layers)
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
            raise src._fail("target_layer_ids", f"must be a non-empty list of layer indices, got {ids!r}")
        layer_types = f.optional("layer_types") or ["full_attention"] * layers
        if len(layer_types) != layers or any(t not in ("full_attention", "sliding_attention") for t in layer_types):
            raise f._fail("layer_types", f"must list {layers} entries of full_attention/sliding_attention")
        window = f.optional("sliding_window")
        if "sliding_attention" in layer_types and (not isinstance(window, int) or window < 1):
            raise f._fail("sliding_window", "must be a positive integer when a layer is sliding_attention")
        is_causal = data.get("is_causal", dflash.get("causal"))
        if is_causal is not None and not isinstance(is_causal, bool):
            raise f._fail("is_causal", f"must be true or false, got {is_causal!r}")
        causal = tuple((t == "sliding_attention") if is_causal is None else is_causal for t in layer_types)
        kv_heads = f.kv_heads(heads)
        return cls(
            hidden_size=hidden,
            intermediate_size=f.int("intermediate_size"),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=f.float("rms_norm_eps", 1e-6),
            rope=_rope(f, head_dim),
            vocab_size=f.int("vocab_size"),
            block_size=block_size,
            mask_token_id=mask_token_id,
            target_layer_ids=tuple(ids),
            num_target_layers=num_target,
            layer_types=tuple(layer_types),
            sliding_window=window if "sliding_attention" in layer_types else None,
            causal_layers=causal,
            attention_bias=f.bool("attention_bias", False),
        )
