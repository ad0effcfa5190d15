"""Shared benchmark plumbing: the copy-bandwidth ceiling, timing with rotating inputs, tables and result JSON."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

PACKAGE = Path(__file__).resolve().parents[1] / "dflash_compiler"


def source_digest(root: Path = PACKAGE) -> str:
    """sha256 (16 hex digits) of the package's sources and tuning databases (.py, .toml, .jsonl under root, by
    relative path): what ran, where a copied tree's .git may name an older commit than its files. The same on a
    checkout of the commit that holds these files."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".toml", ".jsonl") and p.is_file()):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def git_commit() -> str:
    """The checked-out commit; BENCH_COMMIT names it where the tree travels without .git (the device machine)."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def time_us(fn: Callable[[int], object], rotations: int = 1, warmup_ms: float = 25, rep_ms: float = 200) -> float:
    """Median time of fn(i) in microseconds, cycling i over `rotations` input sets so L2 does not flatter."""
    import triton.testing

    counter = iter(range(1 << 62))
    ms = triton.testing.do_bench(
        lambda: fn(next(counter) % rotations), warmup=warmup_ms, rep=rep_ms, return_mode="median"
    )
    return ms * 1e3


def graph_time_us(
    fn: Callable[[int], object], rotations: int, min_calls: int = 16, warmup_ms: float = 25, rep_ms: float = 200
) -> float:
    """Per-call time of fn(i), i cycling over the rotations, from replays of one CUDA graph of at least
    `min_calls` calls: the tuner's measurement (tuning/measure.py), so benchmarks and studies time alike."""
    from dflash_compiler.tuning.measure import time_us as measured_us

    device = torch.device("cuda")
    return measured_us(fn, rotations, device, min_calls=min_calls, warmup_ms=warmup_ms, rep_ms=rep_ms)


def kernel_times(run: Callable[[], object], calls: int = 4, timeline: dict | None = None) -> list[dict]:
    """GPU time per kernel over `calls` calls of run, from torch.profiler's device events (Triton kernels under their
    own names, vendor and ATen kernels under theirs, cut to 80 characters): [{kernel, gpu_us_per_call,
    launches_per_call}], longest first. Eagerly every kernel is its own launch; under CUDA graph replay the profiler
    sees the graph's kernels too, with their real spacing. timeline, if given, receives device_gaps() per call."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else lambda: None
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            run()
        sync()
    kernels: dict[str, list[float]] = {}
    spans = []
    for e in prof.events():
        if e.device_type == DeviceType.CUDA and e.device_time_total > 0:
            entry = kernels.setdefault(e.name[:80], [0.0, 0])
            entry[0] += e.device_time_total
            entry[1] += 1
            spans.append((e.time_range.start, e.time_range.end))
    if timeline is not None:
        timeline.update({k: round(v / calls, 1) for k, v in device_gaps(spans).items()})
    return [
        {"kernel": name, "gpu_us_per_call": round(us / calls, 1), "launches_per_call": n / calls}
        for name, (us, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])
    ]


GAP_BINS_US = (5.0, 20.0)


def device_gaps(spans: Sequence[tuple[float, float]]) -> dict[str, float]:
    """The device's busy time (the union of the kernels' [start, end) in µs) and its idle time between kernels,
    binned by gap length: under 5 µs (a launch after the one before), 5-20 µs, and over 20 µs (the host between
    steps)."""
    busy, idle = 0.0, [0.0, 0.0, 0.0]
    end = None
    for start, stop in sorted(spans):
        if end is None or start >= end:
            if end is not None:
                gap = start - end
                idle[sum(gap >= b for b in GAP_BINS_US)] += gap
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    return {"busy_us": busy, "idle_under_5us": idle[0], "idle_5_to_20us": idle[1], "idle_over_20us": idle[2]}


def rotations_for(bytes_per_set: int, l2_bytes: int = 50 * 2**20) -> int:
    """How many input sets to cycle through so that the working set is several times the L2 cache."""
    return max(1, min(64, (4 * l2_bytes) // max(1, bytes_per_set) + 1))


def copy_bandwidth_tbps(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in TB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    src.random_(0, 255)
    us = time_us(lambda _: dst.copy_(src))
    return 2 * nbytes / (us * 1e-6) / 1e12


def floor_us(nbytes: int, bandwidth_tbps: float) -> float:
    return nbytes / (bandwidth_tbps * 1e12) * 1e6


def print_table(rows: Sequence[dict], columns: Sequence[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v: object) -> str:
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def write_results(path: str | Path, rows: list[dict], **extra: object) -> dict:
    doc = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "source_digest": source_digest(),
        **extra,
        "rows": rows,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return doc
