"""`dflash-bench` in process against the same engine behind `dflash-serve`: what HTTP serving costs.

    python bench/serving.py [--concurrency 1,2,4,8,16,32] [--num-prompts 32] [--max-tokens 128] [--out PATH]
                            [-- extra engine options, e.g. --device cuda --quant fp8]

Runs `dflash-bench` in process (autoregressive and DFlash), then starts `dflash-serve` with the same engine options
on a free loopback port and runs `dflash-bench --backend dflash` against it (the OpenAI API, streamed). The table
gives, per concurrency, tokens/s in process and through the server and the server's overhead: 1 - server / in
process, in percent. Both runs use the same prompts, the same greedy sampling and the same warm-up. Plots
(acceptance per position, tokens/s against concurrency) go beside --out.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"dflash-serve exited with {server.returncode} before answering /health")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"dflash-serve did not answer /health within {timeout_s:.0f} s")


def bench(args: list[str], output: Path, plots: Path) -> dict:
    command = [sys.executable, "-m", "dflash_compiler.benchmark.cli", *args, "-o", str(output), "--plots", str(plots)]
    subprocess.run(command, check=True)
    return json.loads(output.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", default="1,2,4,8,16,32")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompts", default="humaneval")
    parser.add_argument("--startup-timeout-s", type=float, default=600)
    parser.add_argument("--out", default="bench/results/serving.json")
    parser.add_argument("engine", nargs=argparse.REMAINDER, help="options for both the engine and dflash-serve")
    args = parser.parse_args()
    engine = [a for a in args.engine if a != "--"]
    top = max(int(c) for c in args.concurrency.split(","))
    common = [
        "--prompts", args.prompts, "--num-prompts", str(args.num_prompts), "--max-tokens", str(args.max_tokens),
        "--concurrency", args.concurrency, "--no-progress",
    ]  # fmt: skip

    plots = Path(args.out).parent
    with tempfile.TemporaryDirectory() as tmp:
        in_process = bench([*common, *engine], Path(tmp) / "serving-inprocess.json", plots)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        serve = [sys.executable, "-m", "dflash_compiler.runtime.server", "--port", str(port), "--max-batch", str(top)]
        server = subprocess.Popen([*serve, *engine, "--log-level", "warning"], env=os.environ.copy())
        try:
            wait_healthy(url, server, args.startup_timeout_s)
            served = bench(
                [*common, "--backend", "dflash", "--base-url", url], Path(tmp) / "serving-server.json", plots
            )
        finally:
            server.terminate()
            server.wait(timeout=60)

    def by_concurrency(doc: dict, mode: str) -> dict[int, dict]:
        return {r["concurrency"]: r for r in doc["rows"] if r["mode"] == mode}

    ar, local, remote = (by_concurrency(in_process, "ar"), by_concurrency(in_process, "dflash"),
                         by_concurrency(served, "dflash"))  # fmt: skip
    rows = []
    for c in sorted(local):
        row = {
            "concurrency": c,
            "ar_tok_s": ar[c]["tokens_per_s"] if c in ar else None,
            "dflash_tok_s": local[c]["tokens_per_s"],
            "server_tok_s": remote[c]["tokens_per_s"] if c in remote else None,
            "tau": local[c]["acceptance_length"],
            "server_tau": remote[c]["acceptance_length"] if c in remote else None,
            "server_tpot_p50_ms": (remote[c].get("tpot_ms") or {}).get("p50") if c in remote else None,
        }
        if row["server_tok_s"] is not None:
            row["server_overhead_pct"] = 100 * (1 - row["server_tok_s"] / row["dflash_tok_s"])
        rows.append(row)
    print_table(rows, ["concurrency", "ar_tok_s", "dflash_tok_s", "server_tok_s", "server_overhead_pct", "tau"])
    write_results(
        args.out, rows, device=in_process["device"], engine_options=engine, prompts=args.prompts,
        num_prompts=args.num_prompts, max_tokens=args.max_tokens, in_process=in_process, server=served,
    )  # fmt: skip


if __name__ == "__main__":
    main()
