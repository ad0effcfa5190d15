"""The IR: a traced step phase as an FX graph whose nodes are `torch.ops.dflash.*` ops plus ATen glue, and the
recipes of the weights it reads.

Graphs are weight-free: a weight is a `get_attr` node naming an entry of `Weights`, whose recipe says how to
build it from the model's own tensors (as loaded, concatenated by a fusion, quantized, or folded from other
weights). Passes rewrite graphs and add recipes; `Weights.materialize` builds the tensors once for every graph of
a step, releasing each source as soon as nothing else needs it.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx

DFLASH_NAMESPACE = "dflash"


@dataclass(frozen=True)
class Recipe:
    """How to build one weight: fn(*source tensors) -> tensor, with the shape and dtype it will have."""

    sources: tuple[str, ...]
    fn: Callable[..., torch.Tensor]
    shape: tuple[int, ...]
    dtype: torch.dtype
    describe: str  # for the manifest: "param", "cat", "fp8_channel.qweight", "fold aten.select.int", ...


@dataclass
class Weights:
    """Named weights of a compiled step: the model's own tensors and the recipes derived from them."""

    sources: dict[str, torch.Tensor]  # the model's parameters and buffers by qualified name (may be on meta)
    recipes: dict[str, Recipe] = field(default_factory=dict)

    def add(self, recipe: Recipe, name: str | None = None) -> str:
        """Registers a recipe under a name derived from its content, so the same weight built by two graphs'
        passes is one tensor."""
        if name is None:
            digest = hashlib.sha1(f"{recipe.describe}|{'|'.join(recipe.sources)}".encode()).hexdigest()[:12]
            name = f"w_{digest}"
        self.recipes.setdefault(name, recipe)
        return name

    def source_recipe(self, source: str) -> str:
        t = self.sources[source]
        return self.add(Recipe((source,), lambda x: x, tuple(t.shape), t.dtype, "param"), name=_attr_name(source))

    def placeholder(self, name: str, device: torch.device | str = "meta") -> torch.Tensor:
        r = self.recipes[name]
        return torch.empty(r.shape, dtype=r.dtype, device=device)

    def materialize(self, names, device: torch.device) -> dict[str, torch.Tensor]:
        """Builds the named weights on device. Every source and intermediate result is dropped as soon as nothing
        left to build reads it (sources leave `sources` too), so converting a model never holds two copies."""
        names = list(dict.fromkeys(names))
        wanted = set(names)
        uses: Counter = Counter()
        seen: set[str] = set()
        stack = list(names)
        while stack:
            n = stack.pop()
            if n in seen or n not in self.recipes:
                continue
            seen.add(n)
            for s in self.recipes[n].sources:
                uses[s] += 1
                stack.append(s)
        memo: dict[str, torch.Tensor] = {}

        def build(name: str) -> torch.Tensor:
            if name in memo:
                return memo[name]
            if name not in self.recipes:
                return self.sources[name]
            r = self.recipes[name]
            args = [build(s) for s in r.sources]
            memo[name] = r.fn(*args).to(device)
            for s in r.sources:
                uses[s] -= 1
                if uses[s] == 0:
                    if s not in wanted:
                        memo.pop(s, None)
                    if s not in self.recipes and s not in wanted:
                        self.sources.pop(s, None)
            return memo[name]

        return {name: build(name) for name in names}


def _attr_name(qualified: str) -> str:
    return "p_" + qualified.replace(".", "_")


def op_arguments(node: fx.Node) -> dict:
    """An op node's arguments by name (from its schema), defaults filled in."""
    out = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        else:
            out[arg.name] = arg.default_value
    return out


def is_dflash(node: fx.Node, op: str | None = None) -> bool:
    """Whether node calls torch.ops.dflash.<op> (any dflash op when op is None)."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    if target.namespace != DFLASH_NAMESPACE:
        return False
    return op is None or target._opname == op


def op_counts(gm: fx.GraphModule) -> Counter:
    """Calls per op in a graph: dflash ops by name, ATen glue as "aten.<name>"."""
    counts: Counter = Counter()
    for node in gm.graph.nodes:
        if node.meta.get("glue") == "inductor":  # a region of glue lowered by TorchInductor (codegen/inductor.py)
            counts["inductor_region"] += 1
        if node.op != "call_function":
            continue
        t = node.target
        if "lowering" in node.meta:  # lowered: the node calls its implementation of a dflash op
            counts[node.meta["lowering"]["op"]] += 1
        elif isinstance(t, torch._ops.OpOverload):
            counts[t._opname if t.namespace == DFLASH_NAMESPACE else f"{t.namespace}.{t._opname}"] += 1
        else:
            counts[getattr(t, "__name__", str(t))] += 1
    return counts


def kernel_launches(gm: fx.GraphModule) -> int:
    """dflash op calls (lowered or not) plus ATen compute calls (views and getitems launch nothing); an Inductor
    region of glue counts as one (its generated code may hold more than one kernel)."""
    launches = 0
    for node in gm.graph.nodes:
        launches += node.meta.get("glue") == "inductor"
        if node.op != "call_function":
            continue
        if "lowering" in node.meta:
            launches += 1
        elif isinstance(node.target, torch._ops.OpOverload):
            launches += node.target.namespace == DFLASH_NAMESPACE or not _is_view(node.target)
    return launches


_VIEW_OPS = {
    "view",
    "reshape",
    "_unsafe_view",
    "slice",
    "select",
    "unsqueeze",
    "squeeze",
    "expand",
    "transpose",
    "t",
    "permute",
    "alias",
    "split",
    "chunk",
    "unbind",
    "sym_size",
    "detach",
}


def _is_view(target: torch._ops.OpOverload) -> bool:
    return target._opname in _VIEW_OPS
