"""Gated DeltaNet kernels at Qwen3.5-27B shapes, one GDN layer (the model has 48): conv update, verify writing the
update rows (recurrent, chunked and factored), the commit from them, the layer commit, each verify over a pending
block (the step's GDN work with the layer commit: step_* rows), decode and chunked prefill, against
the PyTorch reference and against the floor (bytes / copy bandwidth). Everything is timed as CUDA-graph replays,
as the runtime runs it (an eager launch costs more than most of these kernels): ours as one graph of one call per
rotating input set, the reference as a graph of one call. The recurrent kernel's launch parameters are swept first
and the best per batch is used for the other rows (its config is recorded in each row).

    python bench/bench_gdn.py [--out bench/results/kernels-gdn-h100.json] [--no-sweep]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    copy_bandwidth_tbps,
    floor_us,
    graph_time_us,
    kernel_times,
    print_table,
    rotations_for,
    write_results,
)
from dflash_compiler.codegen.triton import gdn  # noqa: E402
from dflash_compiler.models import ops  # noqa: E402

HEADS, HV, DK, DV, WIDTH, BLOCK = 16, 48, 128, 128, 4, 16
CHANS = 2 * HEADS * DK + HV * DV  # 10240
STATE_BYTES = HV * DK * DV * 4  # one request's fp32 state of one layer, 3 MiB
TYPICAL_IDX = 7  # accepted index near the mean of the published acceptance profile (acceptance length about 8)
DEV = "cuda"
BATCHES = (1, 16)
PREFILL_T = (1024,)
PREFILL_REF_MAX_T = 8192
# (unroll, block_v, num_warps) of the recurrent kernel
SWEEP = [(True, 8, 1), (True, 16, 1), (True, 16, 2), (True, 32, 4), (False, 16, 1), (False, 32, 4)]


def _sets(batch: int, seq: int, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        y = torch.randn(batch, seq, CHANS, device=DEV, dtype=torch.bfloat16)
        ba = torch.randn(batch, seq, 2 * HV, device=DEV, dtype=torch.bfloat16)
        out.append(
            dict(
                x=torch.randn(batch, seq, CHANS, device=DEV, dtype=torch.bfloat16),
                window=torch.randn(batch, CHANS, WIDTH - 1, device=DEV, dtype=torch.bfloat16),
                q=y[..., : HEADS * DK].unflatten(-1, (HEADS, DK)),
                k=y[..., HEADS * DK : 2 * HEADS * DK].unflatten(-1, (HEADS, DK)),
                v=y[..., 2 * HEADS * DK :].unflatten(-1, (HV, DV)),
                b=ba[..., :HV],
                a=ba[..., HV:],
                state=torch.randn(batch, HV, DK, DV, device=DEV) * 0.3,
            )
        )
    return out


def _ref_us(fn) -> float:
    return graph_time_us(lambda _: fn(), 1, min_calls=1, rep_ms=100)


def _safe(fn) -> float | None:
    try:
        return fn()
    except Exception as e:  # one failing variant must not lose the rest of the run
        print(f"  failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
        return None


def _input_bytes(batch: int, seq: int, with_q: bool = True) -> int:
    qkv = (CHANS if with_q else CHANS - HEADS * DK) * 2
    return batch * seq * (qkv + 2 * HV * 2)


class _Rows(list):
    """Result rows with the floor and the ratio to it filled in; each row is printed as it is measured."""

    def __init__(self, bw_tbps: float, partial_path: str | None = None):
        super().__init__()
        self.bw = bw_tbps
        self.partial_path = partial_path

    def add(self, op, batch, ours, torch_us, nbytes, seq=BLOCK, **extra) -> dict:
        r = dict(
            op=op,
            shape=f"batch={batch} T={seq} HV={HV} K={DK} V={DV}",
            dtype="bf16",
            ours_us=ours,
            torch_us=torch_us,
            floor_us=floor_us(nbytes, self.bw),
            **extra,
        )
        r["x_floor"] = round(ours / r["floor_us"], 2) if ours else None
        self.append(r)
        print(f"  {op:30s} batch={batch:2d} ours={ours} torch={torch_us} floor={r['floor_us']:.1f}", flush=True)
        if self.partial_path:  # what was measured survives a run cut short
            write_results(self.partial_path, list(self), copy_bandwidth_TBps=self.bw, partial=True)
        return r


# the chunked and factored verify and the commit orientations beside the recurrent kernel: (name, options)
VERIFY_FORMS = [
    ("chunked", dict(algorithm="chunked", block_k=32, block_v=128, num_warps=4)),
    ("factored", dict(algorithm="factored", block_k=32, block_v=64, num_warps=2, factor_warps=1)),
]
COMMIT_FORMS = [("k_major", dict(block_k=32, block_v=128, num_warps=4)),
                ("v_major", dict(block_k=32, block_v=128, num_warps=4, v_major=True))]  # fmt: skip


def _bench_batch(rows: _Rows, batch: int, params: dict, sweep: bool) -> None:
    a_log, dt_bias, conv_w = params["a_log"], params["dt_bias"], params["conv_w"]
    n = rotations_for(batch * (STATE_BYTES + 2 * BLOCK * CHANS * 2))
    sets = _sets(batch, BLOCK, n)
    s0 = sets[0]
    o_buf = torch.empty(batch, BLOCK, HV, DV, device=DEV, dtype=torch.bfloat16)
    y_buf = torch.empty(batch, BLOCK, CHANS, device=DEV, dtype=torch.bfloat16)
    rows_buf = torch.empty(batch, BLOCK, HV, DV, device=DEV)  # the update rows the commit reads
    rows_bytes = rows_buf.numel() * 4
    state_rw = batch * STATE_BYTES
    io_bytes = _input_bytes(batch, BLOCK) + batch * BLOCK * HV * DV * 2  # q/k/v/a/b in, o out
    window_bytes = batch * CHANS * (WIDTH - 1) * 2
    conv_commit_bytes = 2 * window_bytes + batch * (WIDTH - 1) * CHANS * 2
    verify_floor = state_rw + io_bytes + rows_bytes

    def timed(fn, *args, **kw):
        return _safe(lambda: graph_time_us(lambda i: fn(i, *args, **kw), n, min_calls=1, rep_ms=100))

    def verify(i, **kw):
        s = sets[i]
        return gdn.gdn_verify(
            s["q"], s["k"], s["v"], s["a"], s["b"], a_log, dt_bias, s["state"], out=o_buf, deltas=rows_buf, **kw
        )

    # Commits and pending verifies write the state in place: harmless for timing (the values stay finite, the cost
    # does not depend on them).
    def commit(i, idx, **kw):
        s = sets[i]
        return gdn.gdn_commit_deltas(s["state"], idx, s["k"], rows_buf, s["a"], a_log, dt_bias, **kw)

    keys_buf = torch.empty(batch, BLOCK, HEADS, DK, device=DEV, dtype=torch.bfloat16)
    gates_buf = torch.empty(batch, BLOCK, HV, device=DEV, dtype=torch.bfloat16)

    def layer_commit(i, idx):
        s = sets[i]
        gdn.gdn_commit(s["window"], idx, s["x"], s["k"], s["a"], keys_buf, gates_buf)

    def pending_verify(i, idx, **kw):
        s = sets[i]
        return gdn.gdn_verify(
            s["q"], s["k"], s["v"], s["a"], s["b"], a_log, dt_bias, s["state"], out=o_buf, pending_keys=keys_buf,
            pending_gates=gates_buf, pending_rows=rows_buf, pending_idx=idx, **kw,
        )  # fmt: skip

    # the recurrent kernel's launch parameters
    best: dict = {}
    if sweep:
        scores = []
        for unroll, bv, warps in SWEEP:
            kw = dict(unroll=unroll, block_v=bv, num_warps=warps)
            us = timed(verify, **kw)
            rows.add(
                "sweep_verify", batch, us, None, verify_floor, config=f"unroll={unroll} block_v={bv} num_warps={warps}"
            )
            if us:
                scores.append((us, kw))
        best = min(scores, key=lambda x: x[0])[1] if scores else {}
    best_cfg = " ".join(f"{k}={v}" for k, v in best.items()) or "default"

    def conv(i):
        return gdn.causal_conv1d_update(sets[i]["x"], sets[i]["window"], conv_w, y_buf)

    def ref_conv():
        return ops.causal_conv1d(s0["x"].transpose(1, 2), s0["window"], conv_w)

    rows.add(
        "conv_update", batch, timed(conv), _safe(lambda: _ref_us(ref_conv)),
        2 * batch * BLOCK * CHANS * 2 + window_bytes + CHANS * WIDTH * 2,
    )  # fmt: skip

    # verify: o and the update rows of every position, by each algorithm
    def ref_verify():
        gg, beta = ops.gdn_gates(s0["a"], s0["b"], a_log, dt_bias)
        return ops.gated_delta_rule_recurrent(s0["q"], s0["k"], s0["v"], gg, beta, s0["state"], deltas=rows_buf)

    rows.add(
        "verify_recurrent", batch, timed(verify, **best), _safe(lambda: _ref_us(ref_verify)), verify_floor,
        config=best_cfg,
    )  # fmt: skip
    for name, kw in VERIFY_FORMS:
        cfg = " ".join(f"{k}={v}" for k, v in kw.items())
        rows.add(f"verify_{name}", batch, timed(verify, **kw), None, verify_floor, config=cfg)
    verify(0, **best)  # finite update rows for the commits below

    keys_buf.copy_(s0["k"])
    gates_buf.copy_(s0["a"])

    # the pending block's commit on its own (what the recurrent and chunked verifies launch first), the layer
    # commit (conv window, the block's keys and gates kept), and each verify over a pending block: a step's GDN work
    for label, last in (("last", BLOCK - 1), ("typical", TYPICAL_IDX)):
        idx = torch.full((batch,), last, device=DEV, dtype=torch.int32)

        def ref_commit(idx=idx):
            s0["state"].copy_(ops.gated_delta_commit(s0["state"], idx.long(), s0["k"], rows_buf,
                                                     ops.gdn_log_decay(s0["a"], a_log, dt_bias)))  # fmt: skip

        keys_bytes = batch * BLOCK * (HEADS * DK + HV) * 2
        commit_floor = 2 * state_rw + rows_bytes + keys_bytes
        for name, kw in COMMIT_FORMS:
            rows.add(
                f"commit_{name}_{label}", batch, timed(commit, idx, **kw), _safe(lambda f=ref_commit: _ref_us(f)),
                commit_floor, idx=last, config=" ".join(f"{k}={v}" for k, v in kw.items()),
            )  # fmt: skip
        layer = rows.add(
            f"layer_commit_{label}", batch, timed(layer_commit, idx), None, conv_commit_bytes + 2 * keys_bytes, idx=last
        )
        # the verify's bytes, the state written back, the pending rows and keys read
        pending_floor = verify_floor + state_rw + rows_bytes + keys_bytes
        for name, kw in [("recurrent", best), *VERIFY_FORMS]:
            cfg = " ".join(f"{k}={v}" for k, v in kw.items()) or "default"
            v_row = rows.add(
                f"pending_verify_{name}_{label}", batch, timed(pending_verify, idx, **kw), None, pending_floor,
                idx=last, config=cfg,
            )  # fmt: skip
            if v_row["ours_us"] and layer["ours_us"]:
                rows.append(
                    dict(
                        op=f"step_{name}_{label}",
                        shape=v_row["shape"],
                        dtype="bf16",
                        ours_us=v_row["ours_us"] + layer["ours_us"],
                        floor_us=v_row["floor_us"] + layer["floor_us"],
                        note=f"{v_row['op']} + {layer['op']}",
                    )
                )

    # decode: one token, the state updated in place
    dsets = _sets(batch, 1, n)
    o1 = torch.empty(batch, 1, HV, DV, device=DEV, dtype=torch.bfloat16)

    def decode(i):
        s = dsets[i]
        gdn.gdn_recurrent(
            s["q"], s["k"], s["v"], s["a"], s["b"], a_log, dt_bias, s["state"], out=o1, final_state=s["state"],
            **best,
        )  # fmt: skip

    def ref_decode():
        s = dsets[0]
        gg, beta = ops.gdn_gates(s["a"], s["b"], a_log, dt_bias)
        s["state"].copy_(ops.gated_delta_rule_recurrent(s["q"], s["k"], s["v"], gg, beta, s["state"])[1])

    rows.add(
        "decode_in_place", batch, timed(decode), _safe(lambda: _ref_us(ref_decode)),
        2 * state_rw + _input_bytes(batch, 1) + batch * HV * DV * 2, seq=1, config=best_cfg,
    )  # fmt: skip


PREFILL_KERNELS: dict[str, list[dict]] = {}  # GPU time per kernel of each chunked prefill row


# (chunk_size, block_v, precision, system_precision, fused_output, blocked_system) of the chunked prefill: the
# launcher's default first, then the default before "half"
PREFILL_CONFIGS = [
    (64, 64, "half", "tf32", False, False), (64, 32, "tf32", "tf32x3", False, False),
    (32, 64, "tf32", "tf32x3", False, False), (64, 32, "half", "tf32", False, False),
    (32, 64, "half", "tf32", False, False), (64, 64, "half", "tf32", True, False),
    (64, 32, "half", "tf32", True, False), (32, 64, "half", "tf32", True, False),
    (64, 16, "half", "tf32", True, False), (64, 64, "half", "tf32", False, True),
    (64, 32, "half", "tf32", False, True), (64, 64, "half", "tf32x3", False, True),
    (64, 64, "half", "tf32", True, True), (64, 32, "half", "tf32", True, True),
]  # fmt: skip


def _bench_prefill(rows: _Rows, seq: int, params: dict) -> None:
    a_log, dt_bias = params["a_log"], params["dt_bias"]
    (p,) = _sets(1, seq, 1)

    def ref_prefill():
        gg, beta = ops.gdn_gates(p["a"], p["b"], a_log, dt_bias)
        return ops.gated_delta_rule_chunked(p["q"], p["k"], p["v"], gg, beta, p["state"])

    # the reference's per-chunk loop makes a graph of thousands of launches at long prompts
    ref = _safe(lambda: _ref_us(ref_prefill)) if seq <= PREFILL_REF_MAX_T else None
    want = ref_prefill() if seq <= PREFILL_REF_MAX_T else None
    for chunk, block_v, precision, system, fused, blocked in PREFILL_CONFIGS:
        config = dict(chunk_size=chunk, block_v=block_v, precision=precision, system_precision=system,
                      fused_output=fused, blocked_system=blocked)  # fmt: skip
        name = f"prefill_c{chunk}_v{block_v}_{precision}_{system}" + "_fused" * fused + "_blocked" * blocked

        def prefill(_, config=config):
            return gdn.gdn_chunked(p["q"], p["k"], p["v"], p["a"], p["b"], a_log, dt_bias, p["state"], **config)

        errors = {}
        if want is not None:  # the largest error relative to the largest reference value, of o and the state
            got = prefill(0)
            for key, g, w in (("o_rel_err", got[0], want[0]), ("state_rel_err", got[1], want[1])):
                errors[key] = float((g.float() - w.float()).abs().max() / w.float().abs().max())
        rows.add(
            name, 1, _safe(lambda f=prefill: _ref_us(lambda: f(0))), ref,
            _input_bytes(1, seq) + seq * HV * DV * 2 + 2 * STATE_BYTES, seq=seq, config=config, **errors,
        )  # fmt: skip
        if DEV == "cuda":  # which of the three kernels (prepare, state scan, output) takes the time
            breakdown = _safe(lambda f=prefill: kernel_times(lambda: f(0), calls=8)) or []
            PREFILL_KERNELS[f"{name}_T{seq}"] = breakdown
            print(f"  {name} T={seq}: " + ", ".join(
                f"{r['kernel']} {r['gpu_us_per_call']} us" for r in breakdown) + f" {errors}", flush=True)  # fmt: skip


def run(
    bw_tbps: float,
    sweep: bool = True,
    partial_path: str | None = None,
    batches: tuple[int, ...] = BATCHES,
    prefill_t: tuple[int, ...] = PREFILL_T,
) -> list[dict]:
    params = dict(
        a_log=torch.rand(HV, device=DEV).mul(15).add(1).log(),
        dt_bias=torch.randn(HV, device=DEV) * 0.5,
        conv_w=(torch.randn(CHANS, WIDTH, device=DEV) * 0.5).to(torch.bfloat16),
    )
    rows = _Rows(bw_tbps, partial_path)
    for batch in batches:
        _bench_batch(rows, batch, params, sweep)
        if DEV == "cuda":
            torch.cuda.empty_cache()
    for seq in prefill_t:
        _bench_prefill(rows, seq, params)
    return list(rows)


def _kernel_resources() -> None:
    """Registers and spills of every compiled variant (Triton's per-device kernel caches)."""
    jitted = (gdn._gdn_recurrent_kernel, gdn._chunk_prepare_kernel, gdn._chunk_state_kernel, gdn._chunk_output_kernel,
              gdn._chunk_attention_kernel, gdn._chunk_prepare_blocked_kernel,
              gdn._conv_kernel)  # fmt: skip
    for fn in jitted:
        for cache in getattr(fn, "device_caches", {}).values():
            kernels = cache[0] if isinstance(cache, tuple) else cache
            for key, k in kernels.items():
                print(
                    f"{fn.__name__}: regs={k.n_regs} spills={k.n_spills} warps={k.metadata.num_warps} {str(key)[-240:]}"
                )


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernels-gdn-h100.json"))
    parser.add_argument("--no-sweep", action="store_true", help="skip the block_v/num_warps sweep")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="verify batches; '' for none")
    parser.add_argument("--prefill-t", default=",".join(map(str, PREFILL_T)), help="chunked prefill prompt lengths")
    args = parser.parse_args()
    bw = copy_bandwidth_tbps()
    print(f"copy bandwidth {bw:.2f} TB/s", flush=True)
    rows = run(
        bw, sweep=not args.no_sweep, partial_path=args.out,
        batches=_ints(args.batches), prefill_t=_ints(args.prefill_t),
    )  # fmt: skip
    write_results(args.out, rows, copy_bandwidth_TBps=bw, per="one GDN layer of 48", prefill_kernels=PREFILL_KERNELS)
    _safe(_kernel_resources)
    print_table(rows, ["op", "shape", "ours_us", "torch_us", "floor_us", "x_floor", "config"])


if __name__ == "__main__":
    main()
