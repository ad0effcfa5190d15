"""The GPU facts the launchers choose configurations by: compute capability, SM count and shared memory per block.

On a CUDA device they come from the device. Inside `compiling_for(facts)` (ahead-of-time compilation, aot.py) they
are the named GPU's, whatever the tensors' device, so the launchers pick on CPU tensors exactly the configurations
they would pick on that GPU. Elsewhere on a CPU there are no facts (None) and each launcher uses its CPU default.
"""

from __future__ import annotations

import contextlib
import functools
from contextvars import ContextVar
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GpuFacts:
    capability: tuple[int, int]
    sm_count: int
    shared_memory: int | None = None  # bytes per block (opt-in maximum); None: not known, the launchers assume plenty


_TARGET: ContextVar[GpuFacts | None] = ContextVar("dflash_gpu_target", default=None)


@functools.cache
def _cuda_facts(device: torch.device) -> GpuFacts:
    props = torch.cuda.get_device_properties(device)
    return GpuFacts((props.major, props.minor), props.multi_processor_count, props.shared_memory_per_block_optin)


def gpu_facts(device: torch.device) -> GpuFacts | None:
    """The facts of the GPU that kernels for `device` are built for, or None on a CPU outside compiling_for."""
    target = _TARGET.get()
    if target is not None:
        return target
    if device.type == "cuda":
        return _cuda_facts(device)
    return None


@contextlib.contextmanager
def compiling_for(facts: GpuFacts):
    """Launchers called inside see `facts` as their device's."""
    token = _TARGET.set(facts)
    try:
        yield
    finally:
        _TARGET.reset(token)
