"""The IR: a traced step phase as an FX graph whose nodes are `torch.ops.dflash.*` ops plus ATen glue, and the
recipes of the weights it reads.

Graphs are weight-free: a weight is a `get_attr` node naming an entry of `Weights`, whose recipe says how to
build it from the model's own tensors (as loaded, concatenated by a fusion, quantized, or folded from other
weights). Passes rewrite graphs and add recipes; `Weights.materialize` builds the tensors once for every graph of
a step, releasing each source as soon as nothing else needs it.
"""

from __future__ import annotations

import hashlib
import operator
from collections import Counter
from collections.abc import Callable, Sequence
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


def op_arguments(node: fx.Node, schema=None) -> dict:
    """An op node's arguments by name (from its op's schema, or the given one once the node is lowered), defaults
    filled in."""
    out = {}
    for i, arg in enumerate((schema or node.target._schema).arguments):
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


# ATen ops whose result is always a new tensor (to, contiguous and the like may return their input itself)
_FRESH_ATEN = {"embedding", "add", "sub", "mul", "div", "cat", "clone", "_to_copy", "index_select", "where"}


def _views(node: fx.Node, source: fx.Node) -> bool:
    """Whether node is a view of source (a view op on it, or an element of a split of it)."""
    if node.op != "call_function" or not node.args or node.args[0] is not source:
        return False
    return node.target is operator.getitem or (isinstance(node.target, torch._ops.OpOverload) and _is_view(node.target))


def _alias_root(node: fx.Node) -> fx.Node:
    while node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and _is_view(node.target):
        node = node.args[0]
    return node


def _aliases(root: fx.Node) -> list[fx.Node]:
    """root and every node that is a view of it, through chains of views."""
    out, todo = [], [root]
    while todo:
        n = todo.pop()
        out.append(n)
        todo += [u for u in n.users if _views(u, n)]
    return out


def _owns_memory(root: fx.Node) -> bool:
    """Whether root's tensor is memory of its own that the graph made: a lowered linear's output or a fresh ATen
    result (not a graph input, a weight, or an op result that may alias its inputs)."""
    if root.op != "call_function":
        return False
    if is_dflash(root):
        return root.target._opname == "linear"
    if "lowering" in root.meta:
        return root.meta["lowering"]["op"] == "linear"
    return (
        isinstance(root.target, torch._ops.OpOverload)
        and root.target.namespace == "aten"
        and root.target._opname in _FRESH_ATEN
    )


def dead_after(value: fx.Node, node: fx.Node, *, besides: Sequence[fx.Node] = ()) -> bool:
    """Whether node may overwrite value's memory: the memory is the graph's own (_owns_memory), nothing reads it
    (through any view) after node, and none of the tensors in besides (node's other inputs) shares it."""
    root = _alias_root(value)
    if not _owns_memory(root):
        return False
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    aliases = _aliases(root)
    if any(order[u] > order[node] for a in aliases for u in a.users):
        return False
    return all(_alias_root(b) is not root for b in besides if isinstance(b, fx.Node))
