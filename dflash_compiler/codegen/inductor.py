"""TorchInductor for the ATen glue between the dflash ops of a lowered graph.

After lowering, a graph's dflash op nodes call their implementations; what is left between them is ATen glue:
views, dtype casts, RoPE tables, gates, residual adds, concatenations. Each run of glue that does some computation
(not views alone) and mutates nothing becomes one region, a submodule that TorchInductor compiles on its first
call (again when its input shapes change: each batch bucket of the step, each prefill length class), so the
elementwise chains in it run as fused kernels instead of one ATen launch per op. The dflash ops stay outside every
region: their kernels are chosen and tuned by the lowering.

Inductor compiles when a region first runs, so graphs lowered this way are for in-memory compiles (run them once
before a CUDA-graph capture); artifacts keep the ATen glue, whose kernels need no compilation at load.
"""

from __future__ import annotations

import functools
import inspect
import warnings

import torch
from torch import fx
from torch._dynamo.exc import BackendCompilerFailed
from torch._inductor.exc import InductorError
from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
from torch.fx.passes.operator_support import OperatorSupportBase

GLUE_LOWERINGS = ("aten", "inductor")

_NOT_IN_REGIONS = {"aten.sym_size.int", "aten.sym_stride.int", "aten.sym_numel.default"}


def _view_like(target) -> bool:
    schema = target._schema
    return any(r.alias_info is not None for r in schema.returns)


class _GlueSupport(OperatorSupportBase):
    """ATen calls that a region may hold: functional (no argument mutated), not a dflash op or its getitem."""

    def is_node_supported(self, submodules, node: fx.Node) -> bool:
        if node.op != "call_function" or "lowering" in node.meta:
            return False
        target = node.target
        if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
            return False
        return str(target) not in _NOT_IN_REGIONS and not target._schema.is_mutable


@functools.cache
def region_options() -> dict:
    """Inductor config for the regions. Releases whose Triton codegen cannot shape a load in a persistent
    reduction with one row per program (no_x_dim: torch 2.11 fails so on the draft's softmax over a vocabulary
    row) compile the regions with persistent reductions off; later releases handle such trees."""
    from torch._inductor.codegen.triton import TritonSymbols

    try:
        handles_no_x_dim = "tensor_dim is None" in inspect.getsource(TritonSymbols.get_block_shape)
    except (OSError, TypeError):  # no source to read: take the configuration that works on every release
        handles_no_x_dim = False
    return {} if handles_no_x_dim else {"triton.persistent_reductions": False}


_FALLBACKS: list[str] = []


def region_fallbacks() -> list[str]:
    """The regions (name and Inductor's error) that Inductor failed to compile in this process, which run as
    ATen instead."""
    return list(_FALLBACKS)


class InductorRegion(torch.nn.Module):
    """A glue submodule run through torch.compile's Inductor backend, compiled on first call. A region that
    Inductor fails to compile warns once, naming it and the error, and runs its ATen calls from then on: the
    glue is then as fast as without Inductor, never wrong or missing."""

    def __init__(self, gm: fx.GraphModule, name: str = "region"):
        super().__init__()
        self.gm = gm
        self.name = name
        self.compiled = torch.compile(gm, backend="inductor", fullgraph=True, options=region_options())
        self.fallback: str | None = None

    def forward(self, *args):
        if self.fallback is None:
            try:
                return self.compiled(*args)
            except (BackendCompilerFailed, InductorError) as e:
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                self.fallback = reason
                _FALLBACKS.append(f"{self.name}: {reason}")
                message = f"Inductor region {self.name} failed to compile ({reason}); it runs as ATen"
                warnings.warn(message, stacklevel=2)
        return self.gm(*args)


def lower_glue(gm: fx.GraphModule) -> int:
    """Groups gm's ATen glue into Inductor regions in place; returns how many regions it made. Runs of views
    alone stay ATen (they launch nothing)."""
    partitioner = CapabilityBasedPartitioner(gm, _GlueSupport(), allows_single_node_partition=True)
    partitions = [p for p in partitioner.propose_partitions() if not all(_view_like(n.target) for n in p.nodes)]
    if not partitions:
        return 0
    before = {n.target for n in gm.graph.nodes if n.op == "call_module"}  # e.g. torch.export's guard module
    partitioner.fuse_partitions(partitions)  # in place: each partition becomes a call of a submodule
    regions = 0
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in before:
            setattr(gm, node.target, InductorRegion(gm.get_submodule(node.target), node.target))
            node.meta["glue"] = "inductor"
            regions += 1
    gm.graph.lint()
    gm.recompile()
    return regions
