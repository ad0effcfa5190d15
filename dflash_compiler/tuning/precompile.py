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


def _compile_point(shape, profile: HardwareProfile, device: str, seed: int, lowering: str, config: dict) -> str | None:
    from .measure import make_case

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
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


class Precompiler:
    """A pool of `workers` processes that compile the Triton points of one call's batch (its other lowerings need
    no compile). Use as a context manager; `prepare(shape, space, points)` returns each Triton point's error in a
    worker (None where it compiled and ran)."""

    def __init__(self, workers: int, profile: HardwareProfile, device: torch.device | str, seed: int = 0):
        # spawned, not forked: a forked child of a process that initialised CUDA cannot use it
        self.pool = multiprocessing.get_context("spawn").Pool(workers)
        self.workers, self.profile, self.device, self.seed = workers, profile, str(device), seed

    def prepare(self, shape, space: Space, points: list[Params]) -> list[str | None]:
        configs = [space.config(p) for p in points]
        pending = [
            self.pool.apply_async(_compile_point, (shape, self.profile, self.device, self.seed, lowering, config))
            for lowering, config in configs
            if lowering == "triton"
        ]
        return [p.get() for p in pending]

    def close(self) -> None:
        # terminated, not joined: an interrupted run must not leave workers holding GPU memory
        self.pool.terminate()
        self.pool.join()

    def __enter__(self) -> Precompiler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
