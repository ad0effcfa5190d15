"""What `dflash-bench` reports of a run: one summary row per (mode, concurrency), as a table, JSON and PNG plots.

tokens/s is every request's completion tokens over the wall time of the run (prefill and queueing included);
speedup is a DFlash row's tokens/s over the autoregressive row's at the same concurrency; tau is committed tokens
per verify step over every step of every request; per-position acceptance is the fraction of verify steps that
accepted draft slot i. TTFT and TPOT percentiles are over requests.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import DFlashError
from ..runtime.speculative import GenerationStats
from .clients import RequestResult, ServerAcceptance

PERCENTILES = (50, 90, 99)


def percentiles_ms(values: Sequence[float | None]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {f"p{q}": float(np.percentile(values, q)) * 1e3 for q in PERCENTILES}


def summarize(
    mode: str,
    concurrency: int,
    results: Sequence[RequestResult],
    seconds: float,
    server: ServerAcceptance | None = None,
) -> dict:
    tokens = sum(r.completion_tokens for r in results)
    tau = per_position = steps = None
    if results and all(r.stats is not None for r in results):
        # every verify step of every request, counted through GenerationStats itself
        merged = GenerationStats(
            block_size=max(r.stats.block_size for r in results),
            acceptance_lengths=[a for r in results for a in r.stats.acceptance_lengths],
        )
        tau, per_position = merged.acceptance_length, merged.per_position_acceptance
        steps = len(merged.acceptance_lengths)
    elif results and all(r.verify_steps for r in results):
        steps = sum(r.verify_steps for r in results)
        tau = sum(r.acceptance_length * r.verify_steps for r in results) / steps
    elif server is not None:
        tau, per_position, steps = server.acceptance_length, server.per_position_acceptance, server.verify_steps
    return {
        "mode": mode,
        "concurrency": concurrency,
        "requests": len(results),
        "completion_tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        "speedup": None,
        "acceptance_length": tau,
        "verify_steps": steps,
        "per_position_acceptance": per_position,
        "ttft_ms": percentiles_ms([r.ttft_s for r in results]),
        "tpot_ms": percentiles_ms([r.tpot_s for r in results]),
        "results": [r.as_dict() for r in results],
    }


def add_speedups(rows: list[dict], baseline: str = "ar") -> None:
    base = {r["concurrency"]: r["tokens_per_s"] for r in rows if r["mode"] == baseline}
    for r in rows:
        if r["mode"] != baseline and base.get(r["concurrency"]):
            r["speedup"] = r["tokens_per_s"] / base[r["concurrency"]]


def print_table(rows: Sequence[dict], console=None) -> None:
    """The summary, and each DFlash row's acceptance per draft position, as rich tables."""
    from rich.console import Console
    from rich.table import Table

    # a table wider than a pipe's default 80 columns stays readable in a log
    console = console or Console(width=None if sys.stdout.isatty() else 160)
    spread = "/".join(f"p{q}" for q in PERCENTILES)
    table = Table(title="dflash-bench")
    for name in ("mode", "conc", "requests", "tokens", "tokens/s", "speedup", "tau", f"TTFT ms {spread}"):
        table.add_column(name, justify="left" if name == "mode" else "right")
    table.add_column(f"TPOT ms {spread}", justify="right")
    for r in rows:
        table.add_row(
            r["mode"],
            str(r["concurrency"]),
            str(r["requests"]),
            str(r["completion_tokens"]),
            f"{r['tokens_per_s']:.1f}",
            "-" if r["speedup"] is None else f"{r['speedup']:.2f}x",
            "-" if r["acceptance_length"] is None else f"{r['acceptance_length']:.2f}",
            *[_spread(r[key]) for key in ("ttft_ms", "tpot_ms")],
        )
    console.print(table)
    positioned = [r for r in rows if r["per_position_acceptance"]]
    if positioned:
        accept = Table(title="acceptance per draft position (1, 2, ...)")
        for name in ("mode", "conc", "fraction of verify steps"):
            accept.add_column(name, justify="right" if name == "conc" else "left")
        for r in positioned:
            values = " ".join(f"{v:.2f}" for v in r["per_position_acceptance"])
            accept.add_row(r["mode"], str(r["concurrency"]), values)
        console.print(accept)


def _spread(ms: dict | None) -> str:
    return "-" if ms is None else "/".join(f"{ms[f'p{q}']:.1f}" for q in PERCENTILES)


def _replace_atomically(path: Path, write) -> None:
    """Writes through a temporary file beside `path`, so a failed write leaves nothing half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path: str | Path, doc: dict) -> Path:
    path = Path(path)
    try:
        _replace_atomically(path, lambda f: f.write((json.dumps(doc, indent=1) + "\n").encode()))
    except OSError as e:
        raise DFlashError(f"{path}: cannot write the results ({e.strerror})") from None
    return path


def write_plots(rows: Sequence[dict], directory: str | Path, stem: str = "dflash-bench") -> list[Path]:
    """`<stem>-acceptance.png` (acceptance per draft position, one line per DFlash row) where a row has
    per-position figures, and `<stem>-throughput.png` (tokens/s against concurrency, one line per mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    written = []

    def save(fig, name: str) -> None:
        path = directory / f"{stem}-{name}.png"
        try:
            _replace_atomically(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
        except OSError as e:
            raise DFlashError(f"{path}: cannot write the plot ({e.strerror})") from None
        finally:
            plt.close(fig)
        written.append(path)

    positioned = [r for r in rows if r["per_position_acceptance"]]
    if positioned:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for r in positioned:
            values = r["per_position_acceptance"]
            label = f"{r['mode']} c={r['concurrency']} (tau {r['acceptance_length']:.2f})"
            ax.plot(range(1, len(values) + 1), values, marker="o", label=label)
        ax.set(xlabel="draft position", ylabel="fraction of verify steps accepted", ylim=(0, 1.02))
        ax.set_title("Acceptance per draft position")
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, "acceptance")

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        points = sorted((r["concurrency"], r["tokens_per_s"]) for r in rows if r["mode"] == mode)
        ax.plot([c for c, _ in points], [t for _, t in points], marker="o", label=mode)
    concurrencies = sorted({r["concurrency"] for r in rows})
    if len(concurrencies) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
    ax.set(xlabel="concurrency", ylabel="tokens/s")
    ax.set_title("Throughput against concurrency")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "throughput")
    return written
