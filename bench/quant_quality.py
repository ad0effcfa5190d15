"""What INT4 costs in quality, rounded to nearest and with calibration, on a real pair (default: the shipped tiny
pair), on the CPU or a GPU.

    python bench/quant_quality.py [--calibration gsm8k] [--calibration-prompts 16] [--eval-prompts 24] [--out PATH]

For each variant of the target (INT4 round-to-nearest, INT4 calibrated on the named prompts) against the
unquantized one: the mean KL divergence of the next-token distributions over the evaluation prompts (teacher
forced, every position), the agreement of their top-1 tokens, and, on the batched runtime with the same drafter,
DFlash's mean acceptance length over greedy continuations of the evaluation prompts (a quantized target that moves
away from what the drafter learned accepts fewer drafts). The evaluation prompts are the pair's held-out prompts,
never the calibration ones.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402

from dflash_compiler.benchmark.prompts import load_prompts  # noqa: E402
from dflash_compiler.codegen import weight_formats as wf  # noqa: E402
from dflash_compiler.graph.calibrate import linear_input_moments  # noqa: E402
from dflash_compiler.models import eager  # noqa: E402
from dflash_compiler.models.loader import load_drafter, load_target  # noqa: E402
from dflash_compiler.runtime.batch import BatchRunner  # noqa: E402
from dflash_compiler.runtime.engine import DEFAULT_PAIR, calibration_ids, load_tokenizer  # noqa: E402
from dflash_compiler.runtime.speculative import GenerationStats  # noqa: E402


def dequantized(target, moments: dict | None):
    """The target with every linear weight of whole INT4 groups replaced by its INT4 conversion, dequantized (as
    the quantization pass converts it: rows are quantized independently, so fusing weights changes nothing)."""
    with torch.no_grad():
        for name, module in target.named_modules():
            if isinstance(module, torch.nn.Linear) and module.weight.shape[1] % 128 == 0:
                importance = moments.get(f"target.{name}.weight") if moments else None
                q = wf.quantize_int4(module.weight, importance=importance)
                module.weight.copy_(q.dequantize().to(module.weight.dtype))
    return target


@torch.inference_mode()
def next_token_logprobs(target, prompts: list[list[int]]) -> list[torch.Tensor]:
    out = []
    for p in prompts:
        pools = eager.request_pools(target, 1, len(p) + 1)
        logits = eager.prefill(target, pools, torch.tensor([p], device=target.embed_tokens.weight.device)).logits
        out.append(torch.log_softmax(logits[0].float(), -1))
    return out


def acceptance(target_dir, drafter_dir, device, dtype, prompts, max_new: int, quant: str, calibration) -> float:
    """DFlash's mean acceptance length over greedy continuations of the prompts on the batched runtime."""
    target = load_target(target_dir, device=device, dtype=dtype)
    drafter = load_drafter(drafter_dir, target.cfg, device=device, dtype=dtype)
    runner = BatchRunner(target, drafter, max_batch=4, max_seq_len=max(map(len, prompts)) + max_new + 40,
                         quant=quant, calibration=calibration)  # fmt: skip
    stats = [GenerationStats() for _ in prompts]
    for p, s in zip(prompts, stats):
        runner.add_request(p, max_new, stats=s)
    while runner.has_work:
        runner.step()
    lengths = [a for s in stats for a in s.acceptance_lengths]
    return sum(lengths) / len(lengths)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default=str(DEFAULT_PAIR / "target"))
    p.add_argument("--drafter", default=str(DEFAULT_PAIR / "drafter"))
    p.add_argument("--calibration", default="gsm8k", help="prompt set or .jsonl of the calibration prompts")
    p.add_argument("--calibration-prompts", type=int, default=16)
    p.add_argument("--eval-prompts", type=int, default=24, help="held-out prompts evaluated (the pair's)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="greedy tokens per prompt for the acceptance")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="bench/results/quant-quality-cpu.json")
    args = p.parse_args(argv)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    tok = load_tokenizer(args.target)
    lines = (Path(args.target).parent / "heldout_prompts.jsonl").read_text().splitlines()[: args.eval_prompts]
    evals = [tok.encode(json.loads(line)["prompt"], add_special_tokens=False)[:96] for line in lines]
    calibration = calibration_ids([q.text for q in load_prompts(args.calibration, args.calibration_prompts)], tok)

    def fresh():
        return load_target(args.target, device=args.device, dtype=dtype)

    reference = next_token_logprobs(fresh(), evals)
    moments = linear_input_moments(fresh(), calibration)
    tau = acceptance(args.target, args.drafter, args.device, dtype, evals, args.max_new_tokens, "bf16", None)
    rows = [{"variant": "unquantized", "kl_mean": 0.0, "top1_agreement": 1.0, "tau": round(tau, 3)}]
    for name, variant_moments, cal in (
        ("int4 round-to-nearest", None, None),
        ("int4 calibrated", moments, calibration),
    ):
        got = next_token_logprobs(dequantized(fresh(), variant_moments), evals)
        kl = torch.cat([(r.exp() * (r - g)).sum(-1) for r, g in zip(reference, got)])
        agree = torch.cat([r.argmax(-1) == g.argmax(-1) for r, g in zip(reference, got)]).float()
        tau = acceptance(args.target, args.drafter, args.device, dtype, evals, args.max_new_tokens, "int4", cal)
        rows.append(
            {"variant": name, "kl_mean": round(float(kl.mean()), 5), "top1_agreement": round(float(agree.mean()), 4),
             "tau": round(tau, 3), "positions": int(kl.numel())}
        )  # fmt: skip
    print(f"{args.target}: {len(evals)} held-out prompts, calibration {args.calibration} x {len(calibration)}")
    shown = [{k: f"{v:.4f}" if isinstance(v, float) else v for k, v in r.items()} for r in rows]
    print_table(shown, ["variant", "kl_mean", "top1_agreement", "tau", "positions"])
    return write_results(
        args.out, rows, model=args.target, calibration=args.calibration, calibration_prompts=len(calibration),
        eval_prompts=len(evals), max_new_tokens=args.max_new_tokens,
    )  # fmt: skip


if __name__ == "__main__":
    main()
