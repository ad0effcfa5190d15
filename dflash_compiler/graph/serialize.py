"""Graphs of the IR to JSON and back: nodes, their targets and arguments, the graph's pytree signature and the
weights its `get_attr` nodes name.

A loaded graph runs no code but its nodes': targets are resolved by name from `torch.ops` (ATen and dflash ops)
and a few Python modules (operator, math, torch's symbolic-int helpers), never imported from the file. The input
guards torch.export adds (a `call_module` of a generated function) are not kept: a runtime calls its graphs with
the shapes they were compiled for. Weight placeholders come back on the meta device, to be bound to the weights.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.fx.immutable_collections import immutable_dict, immutable_list

from ..errors import DFlashError

FORMAT_VERSION = 1
# modules a call_function target may come from (besides torch.ops)
_TARGET_MODULES = ("_operator", "operator", "math", "torch", "builtins")
_NAMED = {
    torch.dtype: "dtype",
    torch.memory_format: "memory_format",
    torch.layout: "layout",
}


def _target_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"torch.ops.{target.namespace}.{target._opname}.{target._overloadname}"
    module = getattr(target, "__module__", None)
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    if module not in _TARGET_MODULES or name is None:
        raise DFlashError(f"graph: call target {target!r} cannot be serialised (not an op or an allowed builtin)")
    return f"{module}:{name}"


def _resolve_target(name: str, where: str):
    if name.startswith("torch.ops."):
        parts = name.split(".")
        if len(parts) != 5:
            raise DFlashError(f"{where}: malformed op name {name!r}")
        _, _, namespace, op, overload = parts
        try:
            return getattr(getattr(getattr(torch.ops, namespace), op), overload)
        except (AttributeError, RuntimeError):
            raise DFlashError(f"{where}: op {name} does not exist in this torch / project") from None
    module_name, _, qualname = name.partition(":")
    if module_name not in _TARGET_MODULES:
        raise DFlashError(f"{where}: call target {name!r} is not an op or an allowed builtin")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise DFlashError(f"{where}: call target {name!r} does not exist here")
    return obj


def _encode(value):
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return {"float": repr(value)} if not math.isfinite(value) else value
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, list):  # immutable_list too
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {"dict": [[k, _encode(v)] for k, v in value.items()]}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, slice):
        return {"slice": [_encode(value.start), _encode(value.stop), _encode(value.step)]}
    for kind, label in _NAMED.items():
        if isinstance(value, kind):
            return {label: str(value).removeprefix("torch.")}
    raise DFlashError(f"graph: argument {value!r} of type {type(value).__name__} cannot be serialised")


def _decode(value, nodes: dict[str, fx.Node], where: str):
    if isinstance(value, list):
        return immutable_list(_decode(v, nodes, where) for v in value)
    if not isinstance(value, dict):
        return value
    (kind, payload), *rest = value.items()
    if rest:
        raise DFlashError(f"{where}: malformed argument {value!r}")
    if kind == "node":
        if payload not in nodes:
            raise DFlashError(f"{where}: argument names node {payload!r} before it is defined")
        return nodes[payload]
    if kind == "float":
        return float(payload)
    if kind == "tuple":
        return tuple(_decode(v, nodes, where) for v in payload)
    if kind == "dict":
        return immutable_dict((k, _decode(v, nodes, where)) for k, v in payload)
    if kind == "device":
        return torch.device(payload)
    if kind == "slice":
        return slice(*(_decode(v, nodes, where) for v in payload))
    if kind in _NAMED.values():
        found = getattr(torch, payload, None)
        if not isinstance(found, tuple(k for k, label in _NAMED.items() if label == kind)):
            raise DFlashError(f"{where}: unknown torch {kind} {payload!r}")
        return found
    raise DFlashError(f"{where}: malformed argument {value!r}")


def graph_to_dict(gm: fx.GraphModule) -> dict:
    """The graph as JSON-ready data. Its get_attr nodes must name tensors of gm (their shapes and dtypes are kept,
    not their values)."""
    nodes = []
    dropped: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "call_module":  # torch.export's input guards
            if node.users:
                raise DFlashError(f"graph: module call {node.name} has users; only input guards can be dropped")
            dropped.add(node.name)
            continue
        entry: dict[str, Any] = {"name": node.name, "op": node.op}
        if node.op == "call_function":
            entry["target"] = _target_name(node.target)
        elif node.op in ("placeholder", "get_attr"):
            entry["target"] = node.target
        entry["args"] = _encode(node.args)
        entry["kwargs"] = _encode(dict(node.kwargs))
        nodes.append(entry)
    attrs = {}
    for node in gm.graph.find_nodes(op="get_attr"):
        t = getattr(gm, node.target)
        attrs[node.target] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    doc: dict[str, Any] = {"format_version": FORMAT_VERSION, "nodes": nodes, "attrs": attrs}
    codegen = gm.graph._codegen
    if isinstance(codegen, fx.graph._PyTreeCodeGen):
        info = codegen.pytree_info
        doc["pytree"] = {
            "orig_args": list(info.orig_args),
            "in_spec": pytree.treespec_dumps(info.in_spec) if info.in_spec is not None else None,
            "out_spec": pytree.treespec_dumps(info.out_spec) if info.out_spec is not None else None,
        }
    return doc


def graph_from_dict(doc: dict, where: str = "graph") -> fx.GraphModule:
    """The graph module of graph_to_dict's data, its weights meta placeholders. Malformed data raises a one-line
    DFlashError naming `where`."""
    if not isinstance(doc, dict) or doc.get("format_version") != FORMAT_VERSION:
        raise DFlashError(f"{where}: format_version is not {FORMAT_VERSION}")
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    try:
        for entry in doc["nodes"]:
            op, name = entry["op"], entry["name"]
            args = _decode(entry["args"], nodes, where)
            kwargs = _decode(entry["kwargs"], nodes, where)
            if op == "call_function":
                target = _resolve_target(entry["target"], where)
            elif op in ("placeholder", "get_attr"):
                target = entry["target"]
            elif op == "output":
                target = "output"
            else:
                raise DFlashError(f"{where}: node {name} has op {op!r}")
            node = graph.create_node(op, target, tuple(args), dict(kwargs), name=name)
            if node.name != name:
                raise DFlashError(f"{where}: node name {name!r} is repeated")
            nodes[name] = node
        root = nn.Module()
        for attr, spec in doc["attrs"].items():
            dtype = getattr(torch, spec["dtype"], None)
            if not isinstance(dtype, torch.dtype):
                raise DFlashError(f"{where}: attr {attr} has unknown dtype {spec['dtype']!r}")
            root.register_buffer(attr, torch.empty(spec["shape"], dtype=dtype, device="meta"))
        tree = doc.get("pytree")
        if tree is not None:
            in_spec = pytree.treespec_loads(tree["in_spec"]) if tree["in_spec"] else None
            out_spec = pytree.treespec_loads(tree["out_spec"]) if tree["out_spec"] else None
            graph._codegen = fx.graph._PyTreeCodeGen(fx.graph._PyTreeInfo(tree["orig_args"], in_spec, out_spec))
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, DFlashError):
            raise
        raise DFlashError(f"{where}: malformed graph ({type(e).__name__}: {e})") from None
    gm = fx.GraphModule(root, graph)
    try:
        gm.graph.lint()
    except RuntimeError as e:
        raise DFlashError(f"{where}: the graph does not check ({e})") from None
    return gm
