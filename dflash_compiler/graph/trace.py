"""Tracing step phases into the IR with torch.export.

The models' step functions are exported as they are (training IR: custom ops stay one node each, in-place
writes to the pools stay in place). The graph is then made weight-free: every `get_attr` names a `Weights` recipe
and holds a meta placeholder until the weights are materialized.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx, nn

from .ir import Weights


class Phase(nn.Module):
    """A step phase as a module for torch.export: forward(*args) = fn(*args)."""

    def __init__(self, owner: nn.Module, fn: Callable):
        super().__init__()
        self.owner, self._fn = owner, fn

    def forward(self, *args):
        return self._fn(*args)


def trace(
    owner: nn.Module, fn: Callable, args: tuple, weights: Weights, dynamic_shapes=None, prefix: str = "owner."
) -> fx.GraphModule:
    """Exports fn(*args) (fn reads its weights from `owner`) and returns the weight-free graph module. The owner's
    parameters and buffers become `weights` sources under their qualified names."""
    phase = Phase(owner, fn)
    with torch.no_grad():
        dynamic = None if dynamic_shapes is None else (tuple(dynamic_shapes),)  # forward(*args)
        ep = torch.export.export(phase, args, dynamic_shapes=dynamic, strict=False)
    unlifted = ep.module()
    graph = unlifted.graph
    root = nn.Module()
    for node in graph.nodes:
        if node.op == "call_module":  # export's input guards
            root.add_module(node.target, _get_attr(unlifted, node.target))
            continue
        if node.op != "get_attr":
            continue
        qualified = node.target
        source = qualified[len(prefix) :] if qualified.startswith(prefix) else qualified
        if source not in weights.sources:
            weights.sources[source] = _get_attr(unlifted, qualified).detach()
        name = weights.source_recipe(source)
        node.target = name
        if not hasattr(root, name):
            root.register_buffer(name, weights.placeholder(name))
    gm = fx.GraphModule(root, graph)
    gm.graph.lint()
    return gm


def _get_attr(module: nn.Module, qualified: str) -> torch.Tensor:
    for part in qualified.split("."):
        module = getattr(module, part)
    return module


def weight_sources(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of module by qualified name (tied tensors under each of their names)."""
    out = {name: p.detach() for name, p in module.named_parameters(remove_duplicate=False)}
    out.update({name: b.detach() for name, b in module.named_buffers(remove_duplicate=False)})
    return out


def bind_weights(gm: fx.GraphModule, tensors: dict[str, torch.Tensor]) -> None:
    """Replaces the graph's weight placeholders with materialized tensors."""
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in tensors:
            gm._buffers[node.target] = tensors[node.target]


def weight_names(gm: fx.GraphModule) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "get_attr"]
