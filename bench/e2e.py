"""End-to-end decoding throughput at Qwen3.5-27B shapes (random weights) against its floor, in one run.

For each weight format (bf16, fp8, int4: the runtime quantizes at load) and concurrency (1, 8, 16, 32 requests):
autoregressive tokens/s, and DFlash tokens/s with the real drafter's shapes (5 layers, H 5120, taps
[1,16,31,46,61], block 16). Random weights accept nothing, so DFlash rows draw each request's accepted count per
step from a published per-position acceptance profile, P(a >= i+1) = per_position[i], while every kernel of the
real step still runs; those rows say `"simulated": true`. The gsm8k profile has 16 entries; block 16 has 15 draft
slots, so its first 15 are used.

Each row has its floor: the bytes one step must read (target weights at the format's size, scales included, the
lm_head in the row's format as the runtime converts it; the drafter's weights, and the lm_head again for the
draft; K/V of every request at the measured context length; every request's GDN state, read and written once)
over the copy bandwidth measured in the same run, or,
where larger, the step's matmul FLOPs over the bf16 matmul rate measured in the same run. ratio = tokens/s over
the floor's tokens/s. A step-time breakdown (verify, accept+commit, draft, and the gaps between them) comes from
the runtime replaying each phase alone.
transformers' own generate() on the same BF16 weights (its torch fallback for the GDN layers, as users without
flash-linear-attention run it) is the baseline.

    python bench/e2e.py [--small] [--quant bf16,fp8,int4] [--concurrency 1,8,16,32]
                        [--profiles humaneval_bf16_vllm,gsm8k_fp8_h100_vllm] [--out bench/results/e2e-h100.json]
    python bench/e2e.py --floors-only      # the floor table alone (no GPU needed)
    python bench/e2e.py --via-artifact /tmp/artifacts ...   # each runner from a dflash-compile artifact of the
                                                             # random weights (build and load times recorded)

On the device machine the tree has no .git: set BENCH_COMMIT to the commit measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from common import copy_bandwidth_tbps, kernel_times, print_table, time_us, write_results  # noqa: E402
from e2e_models import ModelSpec, build_drafter, build_target, spec, transformers_generate  # noqa: E402
from torch import nn  # noqa: E402

from dflash_compiler.graph.compiler import graph_name  # noqa: E402
from dflash_compiler.models.drafter import DFlashDrafter  # noqa: E402
from dflash_compiler.models.target import TargetModel  # noqa: E402
from dflash_compiler.tuning.runtime import acceptance_profiles  # noqa: E402

# Per-position acceptance of the public Qwen3.5-27B-DFlash drafter as published (the package's
# assets/acceptance_profiles.json): entry i is the fraction of verify steps in which draft slot i was accepted.
PROFILES = acceptance_profiles()
DEFAULT_PROFILES = ("humaneval_bf16_vllm", "gsm8k_fp8_h100_vllm")
QUANTS = ("bf16", "fp8", "int4")
# The compiler's quantization pass (graph/passes.py) converts the lm_head with the other linears, so the floor
# counts it in the row's format; False gives the project's earlier figures (FP8 step 26.9 GB, INT4 15.1 GB, with
# a BF16 head). The embedding is only gathered (the rows of the step's tokens).
QUANTIZE_LM_HEAD = True
INT4_GROUP = 128


def profile_slots(name: str, slots: int) -> tuple[list[float], str | None]:
    """The first `slots` per-position rates of a profile, and a note when entries were dropped."""
    pp = PROFILES[name]["per_position"]
    note = f"first {slots} of {len(pp)} per-position rates (block {slots + 1} has {slots} draft slots)"
    return list(pp[:slots]), note if len(pp) > slots else None


def expected_tokens_per_step(per_position: list[float] | None) -> float:
    """Committed tokens per request and step: the bonus token plus the expected accepted drafts."""
    return 1.0 + sum(per_position or ())


def sample_accepted(per_position: list[float], n: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """Accepted draft counts a (0..len) with P(a >= i+1) = per_position[i]: one uniform u per draw,
    a = #{i : u < per_position[i]} (the rates are non-increasing, so this is exactly that law)."""
    u = torch.rand(n, generator=gen)
    return (u.unsqueeze(1) < torch.tensor(per_position).unsqueeze(0)).sum(1)


# ---- the floor ------------------------------------------------------------------------------------------------


def linear_bytes(n: int, k: int, quant: str) -> int:
    """Bytes of one linear weight [n, k] as the runtime stores it: bf16; fp8 e4m3 with an fp32 scale per output
    row; int4 symmetric in groups of 128 along k with fp16 scales (codegen/weight_formats.py layouts)."""
    if quant == "bf16":
        return 2 * n * k
    if quant == "fp8":
        return n * k + 4 * n
    if quant == "int4":
        groups = -(-k // INT4_GROUP)
        return 4 * n * 16 * -(-k // 128) + 2 * groups * n
    raise ValueError(f"quant: expected one of {QUANTS}, got {quant!r}")


def _linears(module: nn.Module) -> list[tuple[str, int, int]]:
    return [(name, m.out_features, m.in_features) for name, m in module.named_modules() if isinstance(m, nn.Linear)]


@dataclass
class Shapes:
    """What the floor needs from the configs (models built on meta, so the names follow the real modules)."""

    target_linears: list[tuple[str, int, int]]
    target_other_bytes: int  # norms, conv1d, A_log, dt_bias (bf16), embedding excluded
    drafter_linears: list[tuple[str, int, int]]
    drafter_other_bytes: int
    hidden: int
    vocab: int
    n_attn: int
    n_gdn: int
    kv_bytes_per_token: int  # target K+V, all attention layers, bf16
    attn_qk_dim: int  # num_heads * head_dim (FLOPs of attention per key)
    gdn_state_bytes: int  # per request, all GDN layers, fp32 [HV, Dk, Dv]
    gdn_conv_bytes: int  # per request, all GDN layers, bf16 [C, W-1]
    gdn_state_elems: int  # per layer HV * Dk * Dv
    drafter_layers: int
    drafter_kv_bytes_per_token: int
    drafter_qk_dim: int
    block_size: int

    @classmethod
    def of(cls, ms: ModelSpec) -> Shapes:
        tc, dc = ms.target, ms.drafter
        with torch.device("meta"):
            target = TargetModel(tc)
            drafter = DFlashDrafter(dc, tc.hidden_size)
        lin_params = {f"{n}.weight" for n, _, _ in _linears(target)} | {"embed_tokens.weight"}
        other = sum(2 * p.numel() for n, p in target.named_parameters() if n not in lin_params)
        d_lin = {f"{n}.weight" for n, _, _ in _linears(drafter)}
        d_other = sum(2 * p.numel() for n, p in drafter.named_parameters() if n not in d_lin)
        state = tc.linear_num_value_heads * tc.linear_key_head_dim * tc.linear_value_head_dim
        n_gdn = len(tc.gdn_layers)
        return cls(
            target_linears=_linears(target),
            target_other_bytes=other,
            drafter_linears=_linears(drafter),
            drafter_other_bytes=d_other,
            hidden=tc.hidden_size,
            vocab=tc.vocab_size,
            n_attn=len(tc.attention_layers),
            n_gdn=n_gdn,
            kv_bytes_per_token=len(tc.attention_layers) * 2 * tc.num_kv_heads * tc.head_dim * 2,
            attn_qk_dim=tc.num_heads * tc.head_dim,
            gdn_state_bytes=n_gdn * state * 4,
            gdn_conv_bytes=n_gdn * tc.gdn_conv_dim * (tc.linear_conv_kernel_dim - 1) * 2,
            gdn_state_elems=state,
            drafter_layers=dc.num_layers,
            drafter_kv_bytes_per_token=dc.num_layers * 2 * dc.num_kv_heads * dc.head_dim * 2,
            drafter_qk_dim=dc.num_heads * dc.head_dim,
            block_size=dc.block_size,
        )

    def target_weight_bytes(self, quant: str, quantize_lm_head: bool | None = None) -> int:
        head_quant = quant if (QUANTIZE_LM_HEAD if quantize_lm_head is None else quantize_lm_head) else "bf16"
        total = self.target_other_bytes
        for name, n, k in self.target_linears:
            total += linear_bytes(n, k, head_quant if name == "lm_head" else quant)
        return total

    def drafter_weight_bytes(self, quant: str) -> int:
        return self.drafter_other_bytes + sum(linear_bytes(n, k, quant) for _, n, k in self.drafter_linears)

    def lm_head_bytes(self, quant: str) -> int:
        return linear_bytes(self.vocab, self.hidden, quant if QUANTIZE_LM_HEAD else "bf16")


@dataclass
class StepCost:
    bytes: dict[str, float] = field(default_factory=dict)
    flops: dict[str, float] = field(default_factory=dict)

    @property
    def total_bytes(self) -> float:
        return sum(self.bytes.values())

    @property
    def total_flops(self) -> float:
        return sum(self.flops.values())


def step_cost(
    sh: Shapes, quant: str, mode: str, concurrency: int, context: float, tau: float, verify_width: int | None = None
) -> StepCost:
    """Fewest bytes and FLOPs of one decoding step of `concurrency` requests at mean KV length `context`.

    mode "ar": each request verifies 1 token. mode "dflash": each verifies verify_width tokens (default the block,
    block_size tokens), commits tau on average (the GDN state is read and written once either way), appends tau
    context features to the drafter and drafts one whole block (drafter layers on block_size queries, then the
    target's lm_head on block_size-1 slots). Activations are left out (MBs).
    """
    c = concurrency
    t = 1 if mode == "ar" else verify_width or sh.block_size
    tb = sh.block_size  # the drafted block
    cost = StepCost()
    b, f = cost.bytes, cost.flops
    b["target_weights"] = sh.target_weight_bytes(quant)
    b["embedding_rows"] = c * t * sh.hidden * 2
    b["kv"] = c * sh.kv_bytes_per_token * (context + t)  # read the context, write the block
    b["gdn_state"] = c * 2 * (sh.gdn_state_bytes + sh.gdn_conv_bytes)
    target_params = sum(n * k for _, n, k in sh.target_linears)
    f["target_matmul"] = 2 * target_params * c * t
    f["attention"] = sh.n_attn * 4 * sh.attn_qk_dim * (context + (t + 1) / 2) * c * t
    f["gdn_recurrence"] = sh.n_gdn * 8 * sh.gdn_state_elems * c * (t if mode == "ar" else t + tau)
    if mode == "dflash":
        b["drafter_weights"] = sh.drafter_weight_bytes(quant)
        b["draft_lm_head"] = sh.lm_head_bytes(quant)
        b["drafter_kv"] = c * sh.drafter_kv_bytes_per_token * (context + tau)
        ctx_params = sum(
            n * k for name, n, k in sh.drafter_linears if name == "fc" or name.endswith(("k_proj", "v_proj"))
        )
        layer_params = sum(n * k for name, n, k in sh.drafter_linears if name != "fc")
        f["drafter_matmul"] = 2 * (layer_params * tb + ctx_params * tau) * c
        f["draft_lm_head"] = 2 * sh.vocab * sh.hidden * c * (tb - 1)
        f["drafter_attention"] = sh.drafter_layers * 4 * sh.drafter_qk_dim * (context + tb) * c * tb
    return cost


def floor_ms(cost: StepCost, bw_tbps: float, tflops: float) -> tuple[float, str]:
    mem = cost.total_bytes / (bw_tbps * 1e12) * 1e3
    comp = cost.total_flops / (tflops * 1e12) * 1e3
    return (mem, "memory") if mem >= comp else (comp, "compute")


def matmul_tflops(n: int = 8192) -> float:
    """bf16 matmul rate (cuBLAS through torch.mm) on random n x n x n operands."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b_ = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    us = time_us(lambda _: torch.mm(a, b_, out=out), warmup_ms=100, rep_ms=500)
    return 2 * n**3 / (us * 1e-6) / 1e12


# ---- the runtime --------------------------------------------------------------------------------------------


@dataclass
class Measured:
    tokens_per_s: float
    step_ms: float
    steps: int
    committed: int
    tau: float  # committed tokens per request and step
    context: float  # mean KV length over the timed window
    phases_ms: dict[str, float]
    prefill_steps: int
    finished_early: int  # requests that finished inside the timed window (the batch shrank)
    launches: tuple[int, int] | None = None  # op calls of the compiled step graph before / after the passes
    op_profile: dict | None = None  # {kernels: [...], timeline_us_per_step: {...}}
    gdn_tuned: dict | None = None  # the step graph's GDN ops: their tuned (lowering, config) by batch size


def tuned_gdn(gm) -> dict:
    """The tuned choices by batch size that a lowered step graph's GDN verify nodes dispatch (graph/compiler.py's
    lower records them in each node's meta)."""
    found = {}
    for node in gm.graph.nodes:
        lowering = node.meta.get("lowering", {})
        if lowering.get("op") == "gdn_verify":
            found.setdefault(lowering["op"], lowering.get("tuned", {}))
    return found


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def op_profile(runner, steps: int = 4) -> dict:
    """GPU time per kernel per step (common.kernel_times over `steps` steps) and the device's busy and idle time
    per step (with CUDA graphs: the gaps between the graph's kernels)."""
    timeline: dict = {}
    rows = [
        {"kernel": r["kernel"], "gpu_us_per_step": r["gpu_us_per_call"], "calls_per_step": r["launches_per_call"]}
        for r in kernel_times(runner.step, steps, timeline)
    ]
    print(f"  kernel profile: {sum(r['gpu_us_per_step'] for r in rows) / 1e3:.2f} ms of GPU time per step; "
          f"timeline per step (µs): {timeline}", flush=True)  # fmt: skip
    for r in rows[:16]:
        print(f"    {r['kernel'][:48]:48s} {r['gpu_us_per_step'] / 1e3:7.3f} ms  {r['calls_per_step']:6.0f} calls")
    return {"kernels": rows, "timeline_us_per_step": timeline}


def measure(
    runner,
    concurrency: int,
    vocab: int,
    prompt_len: int,
    max_new: int,
    warmup: int,
    steps: int,
    seed: int,
    profile_ops: bool = False,
) -> Measured:
    """Adds `concurrency` requests of random prompts, steps until every one is decoding, warms up, then times
    `steps` steps (wall clock, synchronized at both ends) and counts the committed tokens. Every call to the
    runtime's API is in this function and in make_runner / drain."""
    from dflash_compiler.runtime.sampling import SamplingParams

    gen = torch.Generator().manual_seed(seed)
    rids = []
    for _ in range(concurrency):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=gen).tolist()
        rids.append(runner.add_request(prompt, max_new_tokens=max_new, params=SamplingParams(), stop_token_ids=()))
    produced = dict.fromkeys(rids, 0)
    prefill_steps = 0
    while any(n == 0 for n in produced.values()):
        for ev in runner.step():
            produced[ev.request_id] += len(ev.tokens)
        prefill_steps += 1
        if prefill_steps > 64 * concurrency + 64:
            raise RuntimeError("requests never started decoding")
    for _ in range(warmup):
        for ev in runner.step():
            produced[ev.request_id] += len(ev.tokens)
    ctx_start = prompt_len + sum(produced.values()) / concurrency
    _sync()
    t0 = time.perf_counter()
    committed, finished = 0, 0
    for _ in range(steps):
        for ev in runner.step():
            produced[ev.request_id] += len(ev.tokens)
            committed += len(ev.tokens)
            finished += bool(ev.finished)
    _sync()
    elapsed = time.perf_counter() - t0
    ctx_end = prompt_len + sum(produced.values()) / concurrency
    profiled = op_profile(runner) if profile_ops and not finished else None
    phases = {}
    if not finished:
        try:
            phases = dict(runner.phase_times_ms())
        except Exception as e:  # noqa: BLE001 - no CUDA graphs (CPU, --no-cuda-graphs): no breakdown
            print(f"  no phase breakdown: {type(e).__name__}: {e}", flush=True)
    drain(runner, rids)
    compiled = getattr(getattr(runner, "model", None), "compiled", None)
    graph = compiled.graph(graph_name("step", False, runner.simulated)) if compiled is not None else None
    return Measured(
        tokens_per_s=committed / elapsed,
        step_ms=1e3 * elapsed / steps,
        steps=steps,
        committed=committed,
        tau=committed / (steps * concurrency),
        context=(ctx_start + ctx_end) / 2,
        phases_ms=phases,
        prefill_steps=prefill_steps,
        finished_early=finished,
        launches=(graph.launches_before, graph.launches) if graph is not None else None,
        op_profile=profiled,
        gdn_tuned=tuned_gdn(graph.gm) if graph is not None else None,
    )


def artifact_runner(ms, quant: str, mode: str, folder: Path, max_batch: int, max_seq_len: int, cuda_graphs: bool):
    """dflash-compile of the spec's pair with seeded random weights (the seeds build_target and build_drafter use),
    then the runner of the loaded artifact; returns (runner, the start-up figures)."""
    from dflash_compiler.artifact.build import compile_artifact
    from dflash_compiler.artifact.load import load_artifact
    from dflash_compiler.hw_profiles import profile_for_device
    from dflash_compiler.runtime.batch import BatchRunner

    configs = folder / f"{ms.name}-configs"
    for name, doc in (("target", ms.target_json), ("drafter", ms.drafter_json)):
        (configs / name).mkdir(parents=True, exist_ok=True)
        (configs / name / "config.json").write_text(json.dumps(doc))
    out = folder / f"{quant}-{mode}"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = profile_for_device(torch.cuda.get_device_properties(0)).name if device == "cuda" else "cpu"
    t0 = time.perf_counter()
    compile_artifact(
        out, target=configs / "target", drafter=configs / "drafter" if mode == "dflash" else None, gpu=gpu,
        quant=quant, max_batch=max_batch, max_seq_len=max_seq_len, random_weights=0, force=True, progress=False,
    )  # fmt: skip
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    loaded = load_artifact(out, device, strict=True)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    runner = BatchRunner(
        None, None, max_batch=loaded.max_batch, max_seq_len=loaded.max_seq_len, compiled=loaded.compiled,
        verify_width=loaded.verify_widths, cuda_graphs=cuda_graphs,
    )  # fmt: skip
    startup = {
        "artifact_build_s": round(build_s, 1),
        "artifact_load_s": round(load_s, 1),
        "runner_start_s": round(time.perf_counter() - t0, 1),
        "artifact_kernels_compiled_at_load": len(loaded.watch.compiled) if loaded.watch is not None else 0,
        "artifact_bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
    }
    return runner, startup


def make_runner(
    target, drafter, quant: str, max_batch: int, max_seq_len: int, cuda_graphs: bool = True, glue: str = "aten"
):
    from dflash_compiler.runtime.batch import BatchRunner

    block = drafter.cfg.block_size if drafter is not None else 1
    return BatchRunner(
        target,
        drafter,
        block_size=block,
        max_batch=max_batch,
        max_seq_len=max_seq_len,
        quant=quant,
        cuda_graphs=cuda_graphs,
        glue=glue,
    )


def new_token_budget(per_position: list[float] | None, concurrency: int, prompt_len: int, steps: int, cap: int) -> int:
    """max_new_tokens per request: enough that none finishes before the timed steps end (allowing two prefill
    steps per request and 512 prompt tokens, and 1.5x the expected acceptance), few enough that draining is quick."""
    per_step = 1.0 if per_position is None else 1.5 * expected_tokens_per_step(per_position)
    prefill_steps = 2 * concurrency * -(-prompt_len // 512) + 8
    return int(min(cap, per_step * (prefill_steps + steps + 4)))


def drain(runner, request_ids=(), limit: int = 100000) -> None:
    """Ends the requests: cancels them where the runtime can, then steps until it has no work left."""
    if callable(getattr(runner, "cancel", None)):
        for rid in request_ids:
            runner.cancel(rid)
    n = 0
    while runner.has_work and n < limit:
        runner.step()
        n += 1


# ---- rows ------------------------------------------------------------------------------------------------------


def make_row(
    sh: Shapes,
    quant: str,
    mode: str,
    profile: str | None,
    concurrency: int,
    m: Measured | None,
    bw: float,
    tflops: float,
    context: float,
    per_position: list[float] | None,
    note: str | None = None,
    verify_width: int | None = None,
) -> dict:
    tau_exp = expected_tokens_per_step(per_position if mode == "dflash" else None)
    ctx = m.context if m else context
    width = (verify_width or sh.block_size) if mode == "dflash" else 1
    cost = step_cost(sh, quant, mode, concurrency, ctx, tau_exp, width)
    fl_ms, bound = floor_ms(cost, bw, tflops)
    floor_tps = concurrency * tau_exp / (fl_ms * 1e-3)
    row: dict[str, Any] = {
        "mode": mode,
        "quant": quant,
        "profile": profile,
        "simulated": mode == "dflash",
        "concurrency": concurrency,
        "verify_width": width,
        "tokens_per_s": round(m.tokens_per_s, 1) if m else None,
        "floor_tokens_per_s": round(floor_tps, 1),
        # judged by step time: tokens/s drawn from a short run swing with the luck of the draw
        "ratio": round(fl_ms / m.step_ms, 3) if m else None,
        "tokens_per_s_at_profile_tau": round(concurrency * tau_exp / (m.step_ms * 1e-3), 1) if m else None,
        "step_ms": round(m.step_ms, 2) if m else None,
        "floor_ms": round(fl_ms, 2),
        "floor_bound": bound,
        "floor_GB": round(cost.total_bytes / 1e9, 2),
        "floor_TFLOP": round(cost.total_flops / 1e12, 2),
        "floor_bytes_GB": {k: round(v / 1e9, 3) for k, v in cost.bytes.items()},
        "tau_expected": round(tau_exp, 3),
        "tau": round(m.tau, 3) if m else None,
        "context_len": round(ctx, 1),
    }
    if m:
        ph = m.phases_ms
        parts = {k: ph.get(k) for k in ("verify", "accept_commit", "draft")}
        row.update({f"{k}_ms": round(v, 2) if v is not None else None for k, v in parts.items()})
        # gaps: GPU time of the step graph outside the three phases; host: wall time per step beyond the graph
        row["gaps_ms"] = round(ph["gaps"], 2) if "gaps" in ph else None
        row["graph_step_ms"] = round(ph["step"], 2) if "step" in ph else None
        row["host_ms"] = round(m.step_ms - ph["step"], 2) if "step" in ph else None
        row.update(steps=m.steps, committed=m.committed, prefill_steps=m.prefill_steps)
        if m.launches is not None:  # kernel-launching op calls of the step graph (views excluded), not a trace count
            row["launches_per_step"] = {"before_passes": m.launches[0], "after_passes": m.launches[1]}
        if m.finished_early:
            row["finished_early"] = m.finished_early
        if m.op_profile is not None:
            row["op_profile"] = m.op_profile
        if m.gdn_tuned:
            row["gdn_tuned"] = m.gdn_tuned
    if note:
        row["profile_note"] = note
    return row


COLUMNS = (
    "mode",
    "quant",
    "profile",
    "concurrency",
    "verify_width",
    "tokens_per_s",
    "floor_tokens_per_s",
    "ratio",
    "step_ms",
    "floor_ms",
    "floor_bound",
    "tau",
    "verify_ms",
    "accept_commit_ms",
    "draft_ms",
    "gaps_ms",
)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _merge(path: Path, rows: list[dict]) -> list[dict]:
    """Rows of an earlier run (same file) that this run did not replace."""
    if not path.is_file():
        return rows
    key = ("mode", "quant", "profile", "concurrency", "verify_width")
    new = {tuple(r.get(k) for k in key) for r in rows}
    old = [r for r in json.loads(path.read_text()).get("rows", []) if tuple(r.get(k) for k in key) not in new]
    return old + rows


def _ablate(without_passes: str, prologues: bool | None, untuned: bool) -> dict:
    """Leaves fusion passes out of the default pipeline, puts the prologue fusions in it or leaves them out for
    every quantization (None: the pipeline's default, graph/passes.py PROLOGUE_QUANTS), or leaves the tuning
    database out of the lowering, for this process: what each buys, measured in the same run conditions. Returns
    what was changed, for the results."""
    from dflash_compiler.graph import compiler, passes

    names = [n for n in without_passes.split(",") if n]
    known = [p.__name__ for p in passes.FUSION_PASSES]
    for name in names:
        if name not in known:
            raise SystemExit(f"--without-passes: unknown pass {name!r} (known: {', '.join(known)})")
    passes.FUSION_PASSES = tuple(p for p in passes.FUSION_PASSES if p.__name__ not in names)
    if prologues is not None:
        passes.PROLOGUE_QUANTS = compiler.QUANTS if prologues else ()
    if untuned:
        compiler.chooser_for = lambda backend, device, profile=None: None
    return {"passes_left_out": names, "prologue_quants": list(passes.PROLOGUE_QUANTS), "untuned": untuned}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="4 layers, hidden 1024: every path in seconds")
    p.add_argument("--size", default=None, help="27b | small | tiny (overrides --small)")
    p.add_argument("--quant", default=",".join(QUANTS))
    p.add_argument("--concurrency", default="1,8,16,32")
    p.add_argument("--profiles", default=",".join(DEFAULT_PROFILES), help=f"any of {', '.join(PROFILES)}")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument(
        "--verify-width", default="", help="tokens the target verifies per request, comma-separated: each width is "
        "measured on the same runner (its graphs captured again); default: the whole block",
    )  # fmt: skip
    p.add_argument("--warmup-steps", type=int, default=4)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--no-ar", action="store_true")
    p.add_argument("--no-dflash", action="store_true")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument(
        "--op-profile", action="store_true", help="GPU time per op and the device's idle time per step (any graphs)"
    )
    p.add_argument("--skip-transformers", action="store_true", help="no transformers generate() baseline")
    p.add_argument("--hf-new-tokens", type=int, default=32)
    p.add_argument("--floors-only", action="store_true", help="print the floors (assumed bandwidth/rate, no GPU)")
    p.add_argument("--bandwidth", type=float, default=3.0, help="TB/s for --floors-only")
    p.add_argument("--tflops", type=float, default=700.0, help="bf16 TFLOP/s for --floors-only")
    p.add_argument("--append", action="store_true", help="keep rows of --out that this run does not replace")
    p.add_argument("--without-passes", default="", help="fusion passes to leave out, comma-separated (ablation)")
    p.add_argument(
        "--prologues",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the prologue fusions (fuse_norm, fuse_gate) for every quantization, or for none (default: the "
        "pipeline's choice per quantization)",
    )
    p.add_argument("--untuned", action="store_true", help="lower with the launchers' defaults, not the tuning database")
    from dflash_compiler.runtime.options import add_glue

    add_glue(p)
    p.add_argument(
        "--via-artifact",
        metavar="DIR",
        help="compile each runner's pair first (dflash-compile --random-weights into DIR/<quant>-<mode>) and run the "
        "loaded artifact: its build and load times and the kernels compiled during the load are recorded",
    )
    p.add_argument("--out", default="bench/results/e2e-h100.json")
    args = p.parse_args(argv)

    size = args.size or ("small" if args.small else "27b")
    ms = spec(size)
    sh = Shapes.of(ms)
    quants = [q for q in args.quant.split(",") if q]
    concs = [int(c) for c in args.concurrency.split(",") if c]
    profiles = [x for x in args.profiles.split(",") if x]
    for name in profiles:
        if name not in PROFILES:
            p.error(f"--profiles: unknown profile {name!r} (known: {', '.join(PROFILES)})")
    ablation = _ablate(args.without_passes, args.prologues, args.untuned)
    widths = [int(w) for w in args.verify_width.split(",") if w] or [sh.block_size]
    for w in widths:
        if not 2 <= w <= sh.block_size:
            p.error(f"--verify-width: each width must be in 2..{sh.block_size} (the draft block), got {w}")
    if args.via_artifact and (args.glue != "aten" or widths != [sh.block_size]):
        p.error("--via-artifact: the artifact's graphs run as compiled (no --glue inductor or --verify-width)")
    gen_ctx = args.prompt_len + args.warmup_steps + args.steps  # used only where nothing is measured

    if args.floors_only:
        rows = []
        modes = ([] if args.no_ar else [("ar", None)]) + ([] if args.no_dflash else [("dflash", x) for x in profiles])
        for quant in quants:
            for mode, prof in modes:
                for width in widths if mode == "dflash" else [None]:
                    # the draft positions the target verifies
                    pp, note = profile_slots(prof, width - 1) if prof else (None, None)
                    ctx = args.prompt_len + (args.warmup_steps + args.steps / 2) * expected_tokens_per_step(pp)
                    for c in concs:
                        row = make_row(
                            sh, quant, mode, prof, c, None, args.bandwidth, args.tflops, ctx, pp, note, width
                        )
                        rows.append(row)
        print(f"{ms.name}: floors at {args.bandwidth} TB/s, {args.tflops} TFLOP/s (assumed, nothing measured)")
        cols = [
            "mode",
            "quant",
            "profile",
            "concurrency",
            "verify_width",
            "floor_tokens_per_s",
            "floor_ms",
            "floor_bound",
        ]
        print_table(rows, [*cols, "tau_expected", "floor_GB", "floor_TFLOP"])
        return

    bw = copy_bandwidth_tbps()
    tflops = matmul_tflops()
    print(f"{ms.name} on {torch.cuda.get_device_name()}: copy {bw:.3f} TB/s, bf16 matmul {tflops:.0f} TFLOP/s")
    extra: dict[str, Any] = {
        "model": ms.name,
        "copy_bandwidth_TBps": round(bw, 3),
        "matmul_bf16_TFLOPs": round(tflops, 1),
        "prompt_len": args.prompt_len,
        "timed_steps": args.steps,
        "note": "random weights; dflash rows use simulated acceptance drawn from the named profile",
        "glue": args.glue,
        **ablation,
    }
    rows: list[dict] = []
    out = Path(args.out)

    def save(partial: bool) -> None:
        all_rows = _merge(out, rows) if args.append else rows
        write_results(out, all_rows, **extra, partial=partial)

    if not args.skip_transformers:
        target = build_target(ms, "cuda")
        hf = transformers_generate(target, ms, new_tokens=args.hf_new_tokens)
        extra["transformers_generate"] = hf
        print(f"transformers generate(): {hf}", flush=True)
        del target
        _free()
    max_batch = max(concs)
    cap = args.max_seq_len - args.prompt_len - 2 * sh.block_size
    groups: list[tuple[str, list[str | None]]] = [] if args.no_ar else [("ar", [None])]
    groups += [] if args.no_dflash or not profiles else [("dflash", list(profiles))]
    for quant in quants:
        for mode, profs in groups:
            if args.via_artifact:
                target = drafter = None
                runner, startup = artifact_runner(
                    ms, quant, mode, Path(args.via_artifact), max_batch, args.max_seq_len, not args.no_cuda_graphs
                )
                print(f"[{quant} {mode}] artifact runner ready ({startup})", flush=True)
            else:
                # The runtime takes the weights over (converting them to its formats): fresh ones for every runner.
                t0 = time.perf_counter()
                target = build_target(ms, "cuda")
                drafter = build_drafter(ms, "cuda") if mode == "dflash" else None
                torch.cuda.synchronize()
                print(f"[{quant} {mode}] built random {ms.name} weights in {time.perf_counter() - t0:.1f} s",
                      flush=True)  # fmt: skip
                t0 = time.perf_counter()
                runner = make_runner(
                    target, drafter, quant, max_batch, args.max_seq_len, cuda_graphs=not args.no_cuda_graphs,
                    glue=args.glue,
                )  # fmt: skip
                startup_s = time.perf_counter() - t0
                compiled = getattr(getattr(runner, "model", None), "compiled", None)
                # start-up: trace (or the trace cache), passes, weights, lowering, graph capture of every bucket
                startup = {"runner_start_s": round(startup_s, 1)}
                if compiled is not None:
                    startup["compile_s"] = round(compiled.compile_seconds, 1)  # passes' weights built + lowered
                print(f"[{quant} {mode}] runner ready in {startup_s:.1f} s ({startup})", flush=True)
            for prof, width in [(x, w) for x in profs for w in (widths if mode == "dflash" else [None])]:
                if width is not None:
                    runner.set_verify_width(width)
                pp, note = profile_slots(prof, width - 1) if prof else (None, None)
                runner.simulate_acceptance(pp)
                for c in concs:
                    max_new = new_token_budget(pp, c, args.prompt_len, args.warmup_steps + args.steps, cap)
                    m = measure(
                        runner,
                        c,
                        sh.vocab,
                        args.prompt_len,
                        max_new,
                        args.warmup_steps,
                        args.steps,
                        seed=c,
                        profile_ops=args.op_profile,
                    )
                    row = make_row(sh, quant, mode, prof, c, m, bw, tflops, gen_ctx, pp, note, width)
                    if args.glue == "inductor":  # regions Inductor failed to compile run as ATen
                        from dflash_compiler.codegen.inductor import region_fallbacks

                        startup["inductor_fallbacks"] = region_fallbacks()
                    rows.append({**row, **startup})
                    print("  ".join(f"{k}={rows[-1].get(k)}" for k in COLUMNS), flush=True)
                    save(partial=True)
            del runner, target, drafter
            _free()
    hf = extra.get("transformers_generate")
    if hf:
        print(
            f"transformers generate() bf16, concurrency 1: {hf['tokens_per_s']} tokens/s "
            f"({hf['decode_tokens_per_s']} decode-only, {hf['new_tokens']} new tokens)"
        )
    print_table(rows, COLUMNS)
    save(partial=False)


if __name__ == "__main__":
    main()
