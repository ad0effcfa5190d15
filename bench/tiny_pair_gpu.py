"""The shipped tiny pair on the batched runtime (real acceptance): autoregressive against DFlash, same kernels.

    python bench/tiny_pair_gpu.py [--prompts 32] [--max-new-tokens 128] [--concurrency 1,8,32] [--out PATH]

Every held-out prompt is served once per (mode, concurrency) after a warm-up pass that captures the graphs.
tokens/s is generated tokens over the wall time of serving them all, prefill included; tau is the mean over
prompts of each prompt's mean acceptance length. The floor is the weights read per step over the copy bandwidth
measured in the same run: at 25 MB the pair is far from it, bound by the step's kernel count instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_bandwidth_tbps, print_table, write_results  # noqa: E402

from dflash_compiler.models.loader import load_drafter, load_target  # noqa: E402
from dflash_compiler.runtime.batch import BatchRunner  # noqa: E402
from dflash_compiler.runtime.engine import DEFAULT_PAIR, load_tokenizer  # noqa: E402
from dflash_compiler.runtime.speculative import GenerationStats  # noqa: E402


def serve(runner: BatchRunner, prompts: list[list[int]], max_new: int) -> tuple[dict, float]:
    stats = [GenerationStats() for _ in prompts]
    ids = [runner.add_request(p, max_new, stats=s) for p, s in zip(prompts, stats)]
    out = {i: [] for i in ids}
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while runner.has_work:
        for event in runner.step():
            out[event.request_id].extend(event.tokens)
    torch.cuda.synchronize()
    return {i: (out[i], s) for i, s in zip(ids, stats)}, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default="bench/results/tiny-pair-h100-batched.json")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    tok = load_tokenizer(DEFAULT_PAIR / "target")
    lines = (DEFAULT_PAIR / "heldout_prompts.jsonl").read_text().splitlines()[: args.prompts]
    prompts = [tok.encode(json.loads(line)["prompt"], add_special_tokens=False) for line in lines]
    bandwidth = copy_bandwidth_tbps()
    rows, outputs = [], {}
    for conc in [int(c) for c in args.concurrency.split(",")]:
        for mode in ("ar", "dflash"):
            target = load_target(DEFAULT_PAIR / "target", device="cuda", dtype=dtype)
            drafter = load_drafter(DEFAULT_PAIR / "drafter", target.cfg, device="cuda", dtype=dtype)
            weight_bytes = sum(t.numel() * t.element_size() for t in target.parameters())
            if mode == "dflash":
                weight_bytes += sum(t.numel() * t.element_size() for t in drafter.parameters())
            runner = BatchRunner(target, drafter if mode == "dflash" else None, max_batch=conc, max_seq_len=1024)
            serve(runner, prompts[: min(conc, len(prompts))], 16)  # captures the graphs
            results, seconds = serve(runner, prompts, args.max_new_tokens)
            tokens = sum(len(toks) for toks, _ in results.values())
            steps = sum(len(st.acceptance_lengths) for _, st in results.values())
            taus = [st.acceptance_length for _, st in results.values()]
            outputs[(mode, conc)] = [toks for toks, _ in results.values()]
            floor_step_ms = weight_bytes / (bandwidth * 1e12) * 1e3
            rows.append(
                {
                    "mode": mode,
                    "dtype": args.dtype,
                    "concurrency": conc,
                    "prompts": len(prompts),
                    "tokens": tokens,
                    "seconds": round(seconds, 3),
                    "tokens_per_s": round(tokens / seconds, 1),
                    "tau": round(sum(taus) / len(taus), 3),
                    "steps_per_request": round(steps / len(prompts), 1),
                    "floor_step_ms": round(floor_step_ms, 4),
                    "simulated": False,
                }
            )
            print(rows[-1], flush=True)
        ar, df = outputs[("ar", conc)], outputs[("dflash", conc)]
        same = sum(a == d for a, d in zip(ar, df))
        ar_row, df_row = rows[-2], rows[-1]
        df_row["identical_to_ar"] = f"{same}/{len(ar)}"
        df_row["speedup"] = round(df_row["tokens_per_s"] / ar_row["tokens_per_s"], 2)
    print_table(rows, ["mode", "concurrency", "tokens_per_s", "tau", "speedup", "identical_to_ar", "seconds"])
    write_results(args.out, rows, copy_bandwidth_TBps=round(bandwidth, 3), max_new_tokens=args.max_new_tokens)


if __name__ == "__main__":
    main()
