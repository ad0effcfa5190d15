"""Models of a configuration with seeded random weights, built directly on the device: for benchmarks and tuning
at real shapes (Qwen3.5-27B needs 51 GB of BF16 weights) where no checkpoint is at hand.

The model is constructed on the meta device and every parameter is then materialized on the device one at a time
from a seeded generator, so the weights exist exactly once. The values keep activations finite through 64 layers;
they decode nothing meaningful (benchmarks pair them with a simulated acceptance profile).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import DrafterConfig, TargetConfig
from .drafter import DFlashDrafter
from .target import TargetModel


def _init_(name: str, t: torch.Tensor, gen: torch.Generator, zero_centered: bool) -> None:
    """Linear/embedding weights N(0, 0.02), norms at unit scale (weight 0 in zero-centred norms, 1 otherwise), the
    conv N(0, 0.25), HF's GDN defaults for A_log and dt_bias."""
    if name.endswith("A_log"):
        t.copy_(torch.empty(t.shape, device=t.device).uniform_(1.0, 16.0, generator=gen).log_())
    elif name.endswith("dt_bias"):
        t.fill_(1.0)
    elif t.dim() == 1:
        plain = name.endswith("linear_attn.norm.weight") or not zero_centered
        t.fill_(1.0 if plain else 0.0)
    elif name.endswith("conv1d.weight"):
        t.normal_(0.0, 0.25, generator=gen)
    else:
        t.normal_(0.0, 0.02, generator=gen)


def assign_parameter(module: nn.Module, name: str, value: nn.Parameter) -> None:
    """Sets the parameter at dotted `name` of module."""
    owner, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(owner) if owner else module, leaf, value)


def materialize(module: nn.Module, device: torch.device, dtype: torch.dtype, seed: int, zero_centered: bool) -> None:
    """Replaces every meta parameter of module by a seeded random tensor on device, one at a time."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in list(module.named_parameters()):
        t = torch.empty(p.shape, device=device, dtype=dtype)
        _init_(name, t, gen, zero_centered)
        assign_parameter(module, name, nn.Parameter(t, requires_grad=False))
    if hasattr(module, "inv_freq"):  # non-persistent RoPE buffer, created on meta
        module.inv_freq = module.cfg.rope.inv_freq()[0].to(device)
    module.eval()


def random_target(
    cfg: TargetConfig, device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> TargetModel:
    device = torch.device(device)
    with torch.device("meta"):
        model = TargetModel(cfg)
    materialize(model, device, dtype, seed, zero_centered=True)
    return model


def random_drafter(
    cfg: DrafterConfig,
    target_hidden: int,
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 1,
) -> DFlashDrafter:
    device = torch.device(device)
    with torch.device("meta"):
        model = DFlashDrafter(cfg, target_hidden)
    materialize(model, device, dtype, seed, zero_centered=False)
    return model


def random_pair(
    target_cfg: TargetConfig,
    drafter_cfg: DrafterConfig | None,
    seed: int,
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[TargetModel, DFlashDrafter | None]:
    """A target (seed) and its drafter (seed + 1) of seeded random weights: what a random-weight artifact names."""
    target = random_target(target_cfg, device, dtype, seed)
    drafter = None
    if drafter_cfg is not None:
        drafter = random_drafter(drafter_cfg, target_cfg.hidden_size, device, dtype, seed + 1)
    return target, drafter
