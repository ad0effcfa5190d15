"""The benchmark loop: for each mode (autoregressive, DFlash) and each concurrency, every prompt sent once with at
most `concurrency` requests in flight, after an optional warm-up that is not counted."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed

from tqdm import tqdm

from ..errors import DFlashError
from .clients import Backend, RequestResult, Sampling
from .prompts import Prompt
from .report import summarize

WARMUP_TOKENS = 16


def run_requests(
    backend: Backend,
    prompts: Sequence[Prompt],
    sampling: Sampling,
    concurrency: int,
    desc: str | None = None,
    progress: bool = True,
) -> tuple[list[RequestResult], float]:
    """Every prompt once, `concurrency` at a time; the results in prompt order and the wall time of them all."""
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        t0 = time.perf_counter()
        futures = [pool.submit(backend.send, p, sampling) for p in prompts]
        try:
            for future in tqdm(as_completed(futures), total=len(futures), desc=desc, disable=not progress):
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        seconds = time.perf_counter() - t0
    return [f.result() for f in futures], seconds


def run_benchmark(
    modes: Sequence[tuple[str, Callable[[], Backend]]],
    prompts: Sequence[Prompt],
    sampling: Sampling,
    concurrencies: Sequence[int],
    warmup: bool = True,
    progress: bool = True,
) -> list[dict]:
    """One summary row per (mode, concurrency). Each mode's backend is made when its turn comes and closed after
    (an in-process engine's weights are freed before the next mode loads)."""
    rows = []
    for mode, make_backend in modes:
        backend = make_backend()
        try:
            limit = backend.max_concurrency
            if limit is not None and max(concurrencies) > limit:
                raise DFlashError(
                    f"parameter '--concurrency' {max(concurrencies)} is above what this backend serves at once "
                    f"({limit}; the eager runtime runs one request at a time, use --runtime batched)"
                )
            for concurrency in concurrencies:
                if warmup:  # first requests at this batch size (CUDA graph capture, allocator growth)
                    short = dataclasses.replace(sampling, max_tokens=min(WARMUP_TOKENS, sampling.max_tokens))
                    batch = [prompts[i % len(prompts)] for i in range(concurrency)]
                    run_requests(backend, batch, short, concurrency, None, False)
                backend.begin_run()  # after the warm-up: a server's caches and counters start from the run
                results, seconds = run_requests(
                    backend, prompts, sampling, concurrency, f"{mode} c={concurrency}", progress
                )
                rows.append(summarize(mode, concurrency, results, seconds, backend.end_run()))
        finally:
            backend.close()
    return rows
