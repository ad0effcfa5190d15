"""Programmatic dependent launch (sm90 and later): a kernel launched with it may start while the kernel in front of
it is still running, once every program of that kernel has released its dependents.

The step is a chain of short kernels (about a thousand per verify step at Qwen3.5-27B shapes). Launched one after
another, each starts on an idle GPU: its launch, its programs' set-up and its first loads from device memory all
wait for the kernel in front to drain. With this, the linear launcher sets the launch attribute and its kernel
fetches its first weight chunks into L2 (weights are never written by the step) before it waits for the kernel in
front to finish (`gdc_wait`: that kernel's writes are then visible); the kernels that usually precede a linear
release their dependents as they start. A kernel launched without the attribute waits for everything in front of
it, as always, so releasing is safe in every kernel; waiting is needed only in those launched with the attribute,
and there before any read of an activation or any write.

DFLASH_PDL=0 turns it off (the launch attribute and the kernels' instructions): kernels compiled either way have
different cache keys, so an artifact records the setting it was built with (aot.record_versions).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .device import gpu_facts


def programmatic_launch(device: torch.device) -> bool:
    """Whether kernels for `device` use programmatic dependent launch: sm90+ and not turned off by DFLASH_PDL=0."""
    facts = gpu_facts(device)
    return facts is not None and facts.capability >= (9, 0) and pdl_setting()


def pdl_setting() -> bool:
    """The DFLASH_PDL setting (on unless "0")."""
    return os.environ.get("DFLASH_PDL", "1") != "0"


@triton.jit
def release_dependents(PDL: tl.constexpr):
    """Let the next kernel (if launched with the attribute) start: it waits for this one before reading."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def wait_for_producer(PDL: tl.constexpr):
    """Wait until the kernel in front has finished and its writes are visible, then release the next kernel. Every
    program calls it before its first read of an activation and its first write."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs, nbytes):
    """Bulk-prefetch nbytes (a multiple of 16) from each 16-byte aligned address of ptrs into L2."""
    tl.inline_asm_elementwise(
        "cp.async.bulk.prefetch.L2.global [$1], $2; // $0",
        "=r,l,r",
        [ptrs, nbytes],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )
