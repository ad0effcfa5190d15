"""Checkpoint loading from (sharded) safetensors, with every defect reported as one line naming file and tensor."""

from __future__ import annotations

import json
import struct
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..errors import DFlashError
from .config import DrafterConfig, TargetConfig, read_config_json
from .drafter import DFlashDrafter
from .quantized import LoadedTensor, QuantizedLinear, QuantSpec, quantized_format
from .target import TargetModel

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if not isinstance(dtype, str) or dtype.lower() not in _DTYPES:
        raise DFlashError(f"parameter 'dtype': {dtype!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype.lower()]


def _is_drafter_config(data: dict) -> bool:
    """What marks an upstream DFlash drafter's config.json (every layout has at least one of these)."""
    names = data.get("architectures") or []
    dflash_keys = ("dflash_config", "target_layer_ids", "mask_token_id", "num_target_layers")
    return any("DFlash" in str(n) for n in names) or any(k in data for k in dflash_keys)


def _checkpoint_config(directory: str | Path, kind: str) -> tuple[Path, dict]:
    """config.json of a target (kind "target") or drafter checkpoint, refusing a missing path or the other kind."""
    if not Path(directory).exists():
        raise DFlashError(f"{directory}: does not exist (expected a {kind} checkpoint directory)")
    path, data = read_config_json(directory)
    if kind == "target" and _is_drafter_config(data):
        raise DFlashError(f"{path}: looks like a DFlash drafter, not a target (pass this directory as the drafter)")
    if kind == "drafter" and not _is_drafter_config(data):
        raise DFlashError(
            f"{path}: looks like a target model, not a DFlash drafter (pass this directory as the target)"
        )
    return path, data


def _check_safetensors_file(path: Path) -> None:
    """Catches truncated or corrupt files up front: the header must parse and cover the file exactly."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise DFlashError(f"{path}: corrupt safetensors file (shorter than its 8-byte header length)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > size - 8:
                raise DFlashError(f"{path}: corrupt safetensors file (header length {header_len} exceeds file size)")
            header = json.loads(fh.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DFlashError(f"{path}: corrupt safetensors file (header is not valid JSON)") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise DFlashError(
            f"{path}: truncated or corrupt safetensors file ({size} bytes, header describes {8 + header_len + end})"
        )


def checkpoint_files(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DFlashError(f"{index}: field 'weight_map' is missing or the file is not valid JSON") from None
        files = sorted({directory / name for name in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise DFlashError(f"{index}: shard '{f.name}' listed in weight_map is missing")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise DFlashError(f"{directory}: no model.safetensors or model.safetensors.index.json")
    return files


def iter_tensors(directory: str | Path) -> Iterator[tuple[str, torch.Tensor, Path]]:
    for path in checkpoint_files(directory):
        _check_safetensors_file(path)
        try:
            with safe_open(str(path), framework="pt") as fh:
                for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    yield name, fh.get_tensor(name), path
        except DFlashError:
            raise
        except Exception as e:  # safetensors raises its own error types for malformed data
            raise DFlashError(f"{path}: cannot read safetensors file ({type(e).__name__}: {e})") from None


def _header_entries(directory: str | Path) -> Iterator[tuple[str, str]]:
    """(tensor name, safetensors dtype string) of every checkpoint tensor, from the headers alone."""
    for path in checkpoint_files(directory):
        _check_safetensors_file(path)
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, fh.get_slice(name).get_dtype()


def _quantized_linears(
    directory: str | Path, rename: Callable[[str], str | None], linears: dict[str, nn.Module], quant: QuantSpec
) -> set[str]:
    """Linear modules the checkpoint stores quantized: those with a method tensor (scale, qweight, ...) or an FP8
    weight beside them."""
    found = set()
    for ckpt_name, dtype in _header_entries(directory):
        name = rename(ckpt_name)
        if name is None:
            continue
        owner, _, leaf = name.rpartition(".")
        if owner in linears and (leaf in quant.tensor_names or (leaf == "weight" and dtype.startswith("F8"))):
            found.add(owner)
    return found


def load_weights(
    module: nn.Module,
    directory: str | Path,
    rename: Callable[[str], str | None],
    device: torch.device,
    dtype: torch.dtype,
    optional: tuple[str, ...] = (),
    quant: QuantSpec | None = None,
) -> set[str]:
    """Loads every checkpoint tensor into module (built on the meta device), checking names and shapes; returns the
    names of the parameters loaded. Tied parameters are expected under each of their names (`optional` lists those
    a checkpoint may leave out).

    rename maps a checkpoint name to a parameter name, or to None for tensors to skip. With quant, the linear layers
    the checkpoint stores quantized become QuantizedLinear modules holding their tensors as stored.
    """
    expected = dict(module.named_parameters(remove_duplicate=False))
    linears = {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear)}
    quantized = _quantized_linears(directory, rename, linears, quant) if quant is not None else set()
    parts: dict[str, dict[str, LoadedTensor]] = {n: {} for n in quantized}
    seen: set[str] = set()
    for ckpt_name, tensor, path in iter_tensors(directory):
        name = rename(ckpt_name)
        if name is None:
            continue
        owner, _, leaf = name.rpartition(".")
        if owner in quantized and (leaf != "bias" or linears[owner].bias is None):
            # GPTQ exporters save an all-zero bias for layers that have none
            if leaf == "bias" and bool(tensor.any()):
                raise DFlashError(f"{path}: unexpected tensor '{ckpt_name}' (a non-zero bias of a layer without one)")
            if leaf != "bias" and leaf not in (*quant.tensor_names, "weight"):
                raise DFlashError(f"{path}: unexpected tensor '{ckpt_name}' (not part of this model)")
            parts[owner][leaf] = LoadedTensor(tensor, path, ckpt_name)
            continue
        if name not in expected:
            raise DFlashError(f"{path}: unexpected tensor '{ckpt_name}' (not part of this model)")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise DFlashError(
                f"{path}: tensor '{ckpt_name}' has shape {list(tensor.shape)}, expected {list(expected[name].shape)}"
            )
        if tensor.element_size() == 1 and tensor.is_floating_point():
            # an FP8 tensor means nothing without its scale: never cast it as a dense weight
            where = "config.json has no quantization_config" if quant is None else "it is not a quantized linear layer"
            raise DFlashError(f"{path}: tensor '{ckpt_name}' is {tensor.dtype} but {where}")
        _assign(module, name, nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False))
        seen.add(name)
    for owner, found in parts.items():
        found.pop("bias", None)
        if quant.method != "fp8" and "weight" in found:
            raise DFlashError(f"{found['weight'].path}: unexpected tensor '{found['weight'].name}' beside 'qweight'")
        linear = linears[owner]
        fmt = quantized_format(quant, found, (linear.out_features, linear.in_features), device)
        _assign(module, owner, QuantizedLinear(fmt, linear.bias))
        seen.add(owner + ".weight")
    missing = [n for n in expected if n not in seen and n not in optional]
    if missing:
        raise DFlashError(f"{directory}: missing tensor '{missing[0]}' ({len(missing)} missing in all)")
    return seen


def _assign(module: nn.Module, name: str, value: nn.Parameter | nn.Module) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(owner) if owner else module, leaf, value)


def _finish(module: nn.Module, device: torch.device) -> None:
    """Rebuilds the non-persistent buffers (RoPE frequencies) that were created on the meta device."""
    if hasattr(module, "inv_freq"):
        cfg = module.cfg
        inv_freq, _ = cfg.rope.inv_freq()
        module.inv_freq = inv_freq.to(device)
    module.eval()


def _target_rename(cfg: TargetConfig) -> Callable[[str], str | None]:
    def rename(name: str) -> str | None:
        if name.startswith(("model.visual.", "mtp.", "model.mtp.")):
            return None
        for prefix in ("model.language_model.", "model."):
            if name.startswith(prefix):
                return name[len(prefix) :]
        return name

    return rename


def load_target(directory: str | Path, device: str | torch.device = "cpu", dtype="float32") -> TargetModel:
    path, data = _checkpoint_config(directory, "target")
    cfg = TargetConfig.from_dict(data, path)
    quant = QuantSpec.from_config(data, path)
    device, dtype = torch.device(device), parse_dtype(dtype)
    with torch.device("meta"):
        model = TargetModel(cfg)
    tied = ("embed_tokens.weight", "lm_head.weight") if cfg.tie_word_embeddings else ()
    loaded = load_weights(model, directory, _target_rename(cfg), device, dtype, optional=tied, quant=quant)
    if cfg.tie_word_embeddings:
        _tie_head(model, loaded, Path(directory))
    _finish(model, device)
    return model


def _tie_head(model: TargetModel, loaded: set[str], directory: Path) -> None:
    """tie_word_embeddings as transformers applies it on load: a checkpoint may ship the embedding, the head or both;
    one of them serves as both, unless both are present and differ, in which case each keeps its own."""
    has_embed, has_head = "embed_tokens.weight" in loaded, "lm_head.weight" in loaded
    if not (has_embed or has_head):
        raise DFlashError(f"{directory}: missing tensor 'embed_tokens.weight' (nor is there an lm_head.weight)")
    if isinstance(model.lm_head, QuantizedLinear):  # a quantized head is the checkpoint's own
        if not has_embed:
            raise DFlashError(f"{directory}: missing tensor 'embed_tokens.weight' (the lm_head is stored quantized)")
        return
    if not has_embed:
        model.embed_tokens.weight = model.lm_head.weight
    elif not has_head or torch.equal(model.lm_head.weight, model.embed_tokens.weight):
        model.lm_head.weight = model.embed_tokens.weight
    else:
        warnings.warn(
            f"{directory}: tie_word_embeddings is true but lm_head.weight differs from the embedding; "
            "using each as stored",
            stacklevel=3,
        )


def check_drafter_fits(cfg: DrafterConfig, target: TargetConfig, path: Path) -> None:
    if cfg.hidden_size != target.hidden_size:
        raise DFlashError(
            f"{path}: field 'hidden_size' is {cfg.hidden_size} but the target's hidden size is {target.hidden_size}"
        )
    if cfg.vocab_size != target.vocab_size:
        raise DFlashError(f"{path}: field 'vocab_size' is {cfg.vocab_size} but the target's is {target.vocab_size}")
    bad = [i for i in cfg.target_layer_ids if i >= target.num_layers]
    if bad:
        raise DFlashError(
            f"{path}: field 'target_layer_ids' has layer {bad[0]}, out of range for a {target.num_layers}-layer target"
        )
    if cfg.mask_token_id >= target.vocab_size:
        raise DFlashError(f"{path}: field 'mask_token_id' {cfg.mask_token_id} is outside the target vocabulary")


def load_drafter(
    directory: str | Path, target: TargetConfig, device: str | torch.device = "cpu", dtype="float32"
) -> DFlashDrafter:
    path, data = _checkpoint_config(directory, "drafter")
    cfg = DrafterConfig.from_dict(data, path)
    quant = QuantSpec.from_config(data, path)
    check_drafter_fits(cfg, target, path)
    device, dtype = torch.device(device), parse_dtype(dtype)
    with torch.device("meta"):
        model = DFlashDrafter(cfg, target.hidden_size)

    def rename(name: str) -> str | None:
        # Upstream drafters ship no embedding or head (the target's are shared); some add a `model.` prefix.
        name = name.removeprefix("model.")
        return None if name in ("embed_tokens.weight", "lm_head.weight") else name

    want = len(cfg.target_layer_ids) * target.hidden_size
    for path in checkpoint_files(directory):
        _check_safetensors_file(path)
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shape = fh.get_slice(name).get_shape() if rename(name) == "fc.weight" else None
                if shape is not None and len(shape) == 2 and shape[1] != want:
                    raise DFlashError(
                        f"{path}: tensor '{name}' has {shape[1]} input features, expected "
                        f"len(target_layer_ids) x hidden = {len(cfg.target_layer_ids)} x {target.hidden_size} = {want}"
                    )
    load_weights(model, directory, rename, device, dtype, quant=quant)
    _finish(model, device)
    return model
