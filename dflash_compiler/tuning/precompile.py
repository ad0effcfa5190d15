"""Compiling a batch of proposed configs in parallel before the tuner times them one by one.

A Triton compile of one config takes seconds of CPU; timing it takes a fraction of a second. So the tuner asks its
study for a batch of points, and a pool of worker processes runs each point once on a one-set case of the call's
shape, which fills Triton's on-disk cache. The main process then times the batch, loading every kernel from that
cache. The workers are idle while the main process times, so the timings see a quiet GPU. A point that fails in a
worker is not recorded there: the main process meets the same failure when it measures and marks the trial.
"""

from __future__ import annotations

import multiprocessing

import torch

from ..hw_profiles import HardwareProfile
from .spaces import Params, Space

_cases: dict = {}  # in a worker: the one-set case of the shape it compiled last
_faulted: list[str] = []  # in a worker: the fault that lost its CUDA context (every later call fails alike)


def _compile_point(shape, profile: HardwareProfile, device: str, seed: int, lowering: str, config: dict) -> str | None:
    from .measure import is_device_fault, make_case

    if _faulted:  # not run: the main process compiles and checks it itself
        return None
    if shape not in _cases:
        _cases.clear()  # one shape at a time: a 27B lm_head case holds gigabytes
        _cases[shape] = make_case(shape, profile, device, seed, max_rotations=1)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()  # the case's temporaries (fp32 weights before quantization) go back
    try:
        _cases[shape].run(lowering, config, 0)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:  # recorded by the main process's own measurement, not here
        error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if is_device_fault(str(e)):
            _faulted.append(error)
        return error
    return None


class Precompiler:
    """A pool of `workers` processes that compile the Triton points of one call's batch (its other lowerings need
    no compile). Use as a context manager; `prepare(shape, space, points)` returns each point's error in a worker
    (None where it compiled and ran, and for the other lowerings). A point that faults the GPU loses its worker's
    CUDA context, so the pool is replaced after such a batch."""

    def __init__(self, workers: int, profile: HardwareProfile, device: torch.device | str, seed: int = 0):
        self.workers, self.profile, self.device, self.seed = workers, profile, str(device), seed
        self.pool = self._new_pool()

    def prepare(self, shape, space: Space, points: list[Params]) -> list[str | None]:
        from .measure import is_device_fault

        configs = [space.config(p) for p in points]
        pending = [
            self.pool.apply_async(_compile_point, (shape, self.profile, self.device, self.seed, lowering, config))
            if lowering == "triton"
            else None
            for lowering, config in configs
        ]
        errors = [p.get() if p is not None else None for p in pending]
        if any(e is not None and is_device_fault(e) for e in errors):
            self.close()
            self.pool = self._new_pool()
        return errors

    def _new_pool(self):
        # spawned, not forked: a forked child of a process that initialised CUDA cannot use it
        return multiprocessing.get_context("spawn").Pool(self.workers)

    def close(self) -> None:
        # terminated, not joined: an interrupted run must not leave workers holding GPU memory
        self.pool.terminate()
        self.pool.join()

    def __enter__(self) -> Precompiler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
