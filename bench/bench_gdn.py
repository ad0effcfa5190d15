"""Gated DeltaNet kernels at Qwen3.5-27B shapes, one GDN layer (the model has 48): conv update, verify recurrence
with every rollback strategy (captured states, replay, update rows), commit, decode and chunked prefill, against
the PyTorch reference and against the floor (bytes / copy bandwidth). Everything is timed as CUDA-graph replays,
as the runtime runs it (an eager launch costs more than most of these kernels): ours as one graph of one call per
rotating input set, the reference as a graph of one call. The recurrent kernel's launch parameters are swept first
and the best per (mode, batch) is used for the other rows (its config is recorded in each row).

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


def _bench_batch(rows: _Rows, batch: int, params: dict, sweep: bool) -> None:
    a_log, dt_bias, conv_w = params["a_log"], params["dt_bias"], params["conv_w"]
    n = rotations_for(batch * (STATE_BYTES + 2 * BLOCK * CHANS * 2))
    sets = _sets(batch, BLOCK, n)
    s0 = sets[0]
    o_buf = torch.empty(batch, BLOCK, HV, DV, device=DEV, dtype=torch.bfloat16)
    y_buf = torch.empty(batch, BLOCK, CHANS, device=DEV, dtype=torch.bfloat16)
    cap32 = torch.empty(batch, BLOCK, HV, DK, DV, device=DEV)
    cap16 = torch.empty(batch, BLOCK, HV, DK, DV, device=DEV, dtype=torch.bfloat16)
    cap8 = torch.empty(batch, 8, HV, DK, DV, device=DEV)
    rows_buf = torch.empty(batch, BLOCK, HV, DV, device=DEV)  # the update rows (the step's strategy)
    rows_bytes = rows_buf.numel() * 4
    idx_last = torch.full((batch,), BLOCK - 1, device=DEV, dtype=torch.int32)
    state_rw = batch * STATE_BYTES
    io_bytes = _input_bytes(batch, BLOCK) + batch * BLOCK * HV * DV * 2  # q/k/v/a/b in, o out
    window_bytes = batch * CHANS * (WIDTH - 1) * 2
    conv_commit_bytes = 2 * window_bytes + batch * (WIDTH - 1) * CHANS * 2
    floors = dict(
        capture=state_rw + BLOCK * state_rw + io_bytes,
        replay=state_rw + io_bytes,
        deltas=state_rw + io_bytes + rows_bytes,
        commit=2 * state_rw + _input_bytes(batch, BLOCK, with_q=False),
    )

    def timed(fn, *args, **kw):
        return _safe(lambda: graph_time_us(lambda i: fn(i, *args, **kw), n, min_calls=1, rep_ms=100))

    def verify(i, capture, states=None, **kw):
        s = sets[i]
        return gdn.gdn_verify(
            s["q"], s["k"], s["v"], s["a"], s["b"], a_log, dt_bias, s["state"], capture=capture, out=o_buf,
            states=states, **kw,
        )  # fmt: skip

    def commit_deltas(i, idx):
        s = sets[i]
        return gdn.gdn_commit_deltas(
            s["state"], idx, s["k"], rows_buf, s["a"], a_log, dt_bias, window=s["window"], x=s["x"]
        )

    # Commits write the state in place: harmless for timing (the values stay finite, the cost does not depend on
    # them). Without window/x this is the state commit alone.
    def commit(i, idx, states, conv=True, **kw):
        s = sets[i]
        return gdn.gdn_commit(
            s["state"], idx, s["k"], s["v"], s["a"], s["b"], a_log, dt_bias, states=states,
            window=s["window"] if conv else None, x=s["x"] if conv else None, **kw,
        )  # fmt: skip

    # the recurrent kernel's launch parameters, per mode
    best = {"capture": {}, "replay": {}, "commit": {}}
    if sweep:
        scores = {m: [] for m in best}
        for unroll, bv, warps in SWEEP:
            kw = dict(unroll=unroll, block_v=bv, num_warps=warps)
            cfg = f"unroll={unroll} block_v={bv} num_warps={warps}"
            for mode, us in (
                ("capture", timed(verify, BLOCK, cap32, **kw)),
                ("replay", timed(verify, 0, **kw)),
                ("commit", timed(commit, idx_last, None, conv=False, **kw)),
            ):
                rows.add(f"sweep_{mode}", batch, us, None, floors[mode], config=cfg)
                if us:
                    scores[mode].append((us, kw))
        best = {m: min(v, key=lambda x: x[0])[1] if v else {} for m, v in scores.items()}

    def cfg_of(mode):
        kw = best[mode]
        return " ".join(f"{k}={v}" for k, v in kw.items()) or "default"

    def conv(i):
        return gdn.causal_conv1d_update(sets[i]["x"], sets[i]["window"], conv_w, y_buf)

    def ref_conv():
        return ops.causal_conv1d(s0["x"].transpose(1, 2), s0["window"], conv_w)

    rows.add(
        "conv_update", batch, timed(conv), _safe(lambda: _ref_us(ref_conv)),
        2 * batch * BLOCK * CHANS * 2 + window_bytes + CHANS * WIDTH * 2,
    )  # fmt: skip

    # verify: the recurrence over the block with each rollback strategy
    def ref_verify():
        gg, beta = ops.gdn_gates(s0["a"], s0["b"], a_log, dt_bias)
        return ops.gated_delta_rule_recurrent(s0["q"], s0["k"], s0["v"], gg, beta, s0["state"], all_states=True)

    cap_kw, rep_kw, com_kw = best["capture"], best["replay"], best["commit"]
    v_rows = {
        "capture_fp32": rows.add(
            "verify_capture_fp32", batch, timed(verify, BLOCK, cap32, **cap_kw), _safe(lambda: _ref_us(ref_verify)),
            floors["capture"], config=cfg_of("capture"), note="target: <= 1.5x floor",
        ),
        "capture8_fp32": rows.add(
            "verify_capture8_fp32", batch, timed(verify, 8, cap8, **cap_kw), None, state_rw + 8 * state_rw + io_bytes,
            config=cfg_of("capture"),
        ),
        "replay": rows.add(
            "verify_replay", batch, timed(verify, 0, **rep_kw), None, floors["replay"], config=cfg_of("replay")
        ),
        "deltas": rows.add(
            "verify_deltas", batch, timed(verify, 0, deltas=rows_buf, **rep_kw), None, floors["deltas"],
            config=cfg_of("replay"), note="writes the update rows the delta commit reads",
        ),
    }  # fmt: skip
    verify(0, 0, deltas=rows_buf, **rep_kw)  # finite update rows for the delta commits below
    rows.add(
        "verify_capture_bf16", batch, timed(verify, BLOCK, cap16, **cap_kw), None,
        state_rw + BLOCK * state_rw // 2 + io_bytes, config=cfg_of("capture"),
        note="lossy: rounds the committed state to bf16",
    )  # fmt: skip

    # commit: the state and the conv window after accepted index idx[b]
    def ref_window(idx):
        ext = torch.cat((s0["window"], s0["x"].transpose(1, 2)), -1)
        s0["window"].copy_(ops.conv_window_after(ext, idx.long(), WIDTH))

    for label, last in (("last", BLOCK - 1), ("typical", TYPICAL_IDX)):
        idx = torch.full((batch,), last, device=DEV, dtype=torch.int32)
        steps = last + 1

        def ref_copy(idx=idx):
            s0["state"].copy_(cap32[torch.arange(batch, device=DEV), idx.long()])
            ref_window(idx)

        def ref_deltas(idx=idx):
            s0["state"].copy_(ops.gated_delta_commit(s0["state"], idx.long(), s0["k"], rows_buf,
                                                     ops.gdn_log_decay(s0["a"], a_log, dt_bias)))  # fmt: skip
            ref_window(idx)

        def ref_replay(steps=steps, idx=idx):
            gg, beta = ops.gdn_gates(s0["a"][:, :steps], s0["b"][:, :steps], a_log, dt_bias)
            kk, vv = s0["k"][:, :steps], s0["v"][:, :steps]
            s0["state"].copy_(ops.gated_delta_rule_recurrent(kk, kk, vv, gg, beta, s0["state"])[1])
            ref_window(idx)

        c_rows = {
            "capture_fp32": rows.add(
                f"commit_capture_{label}", batch, timed(commit, idx, cap32, **com_kw),
                _safe(lambda f=ref_copy: _ref_us(f)), 2 * state_rw + conv_commit_bytes, idx=last,
                config=cfg_of("commit"),
            ),
            "capture8_fp32": rows.add(
                f"commit_capture8_{label}", batch, timed(commit, idx, cap8, **com_kw), None,
                2 * state_rw + _input_bytes(batch, max(0, steps - 8), with_q=False) + conv_commit_bytes, idx=last,
                config=cfg_of("commit"),
            ),
            "replay": rows.add(
                f"commit_replay_{label}", batch, timed(commit, idx, None, **com_kw),
                _safe(lambda f=ref_replay: _ref_us(f)),
                2 * state_rw + _input_bytes(batch, steps, with_q=False) + conv_commit_bytes, idx=last,
                config=cfg_of("commit"),
            ),
            "deltas": rows.add(
                f"commit_deltas_{label}", batch, timed(commit_deltas, idx), _safe(lambda f=ref_deltas: _ref_us(f)),
                2 * state_rw + rows_bytes + batch * BLOCK * (HEADS * DK + HV) * 2 + conv_commit_bytes, idx=last,
                config="launcher default",
            ),
        }  # fmt: skip
        # per-step totals (verify + commit) of each strategy: what DEFAULT_CAPTURE is chosen by
        for name, v_row in v_rows.items():
            c_row = c_rows[name]
            if v_row["ours_us"] and c_row["ours_us"]:
                ref = v_row["torch_us"] + c_row["torch_us"] if v_row["torch_us"] and c_row["torch_us"] else None
                rows.append(
                    dict(
                        op=f"step_{name}_{label}",
                        shape=v_row["shape"],
                        dtype="bf16",
                        ours_us=v_row["ours_us"] + c_row["ours_us"],
                        torch_us=ref,
                        floor_us=v_row["floor_us"] + c_row["floor_us"],
                        note="verify + commit",
                    )
                )

    # decode: one token, the state updated in place
    dsets = _sets(batch, 1, n)
    o1 = torch.empty(batch, 1, HV, DV, device=DEV, dtype=torch.bfloat16)

    def decode(i):
        s = dsets[i]
        gdn.gdn_recurrent(
            s["q"], s["k"], s["v"], s["a"], s["b"], a_log, dt_bias, s["state"], out=o1, final_state=s["state"],
            **rep_kw,
        )  # fmt: skip

    def ref_decode():
        s = dsets[0]
        gg, beta = ops.gdn_gates(s["a"], s["b"], a_log, dt_bias)
        s["state"].copy_(ops.gated_delta_rule_recurrent(s["q"], s["k"], s["v"], gg, beta, s["state"])[1])

    rows.add(
        "decode_in_place", batch, timed(decode), _safe(lambda: _ref_us(ref_decode)),
        2 * state_rw + _input_bytes(batch, 1) + batch * HV * DV * 2, seq=1, config=cfg_of("replay"),
    )  # fmt: skip


PREFILL_KERNELS: dict[str, list[dict]] = {}  # GPU time per kernel of each chunked prefill row


def _bench_prefill(rows: _Rows, seq: int, params: dict) -> None:
    a_log, dt_bias = params["a_log"], params["dt_bias"]
    (p,) = _sets(1, seq, 1)

    def ref_prefill():
        gg, beta = ops.gdn_gates(p["a"], p["b"], a_log, dt_bias)
        return ops.gated_delta_rule_chunked(p["q"], p["k"], p["v"], gg, beta, p["state"])

    ref = _safe(lambda: _ref_us(ref_prefill))
    for precision in ("tf32", "tf32x3"):

        def prefill(_, precision=precision):
            gdn.gdn_chunked(p["q"], p["k"], p["v"], p["a"], p["b"], a_log, dt_bias, p["state"], precision=precision)

        rows.add(
            f"prefill_chunked_{precision}", 1, _safe(lambda f=prefill: _ref_us(lambda: f(0))), ref,
            _input_bytes(1, seq) + seq * HV * DV * 2 + 2 * STATE_BYTES, seq=seq,
        )  # fmt: skip
        if DEV == "cuda":  # which of the three kernels (prepare, state scan, output) takes the time
            breakdown = kernel_times(lambda f=prefill: f(0), calls=8)
            PREFILL_KERNELS[f"{precision}_T{seq}"] = breakdown
            print(f"  prefill_chunked_{precision} T={seq}: " + ", ".join(
                f"{r['kernel']} {r['gpu_us_per_call']} us" for r in breakdown), flush=True)  # fmt: skip


def run(bw_tbps: float, sweep: bool = True, partial_path: str | None = None) -> list[dict]:
    params = dict(
        a_log=torch.rand(HV, device=DEV).mul(15).add(1).log(),
        dt_bias=torch.randn(HV, device=DEV) * 0.5,
        conv_w=(torch.randn(CHANS, WIDTH, device=DEV) * 0.5).to(torch.bfloat16),
    )
    rows = _Rows(bw_tbps, partial_path)
    for batch in BATCHES:
        _bench_batch(rows, batch, params, sweep)
        if DEV == "cuda":
            torch.cuda.empty_cache()
    for seq in PREFILL_T:
        _bench_prefill(rows, seq, params)
    return list(rows)


def _kernel_resources() -> None:
    """Registers and spills of every compiled variant (Triton's per-device kernel caches)."""
    jitted = (gdn._gdn_recurrent_kernel, gdn._chunk_prepare_kernel, gdn._chunk_state_kernel, gdn._chunk_output_kernel,
              gdn._conv_kernel)  # fmt: skip
    for fn in jitted:
        for cache in getattr(fn, "device_caches", {}).values():
            kernels = cache[0] if isinstance(cache, tuple) else cache
            for key, k in kernels.items():
                print(
                    f"{fn.__name__}: regs={k.n_regs} spills={k.n_spills} warps={k.metadata.num_warps} {str(key)[-240:]}"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernels-gdn-h100.json"))
    parser.add_argument("--no-sweep", action="store_true", help="skip the block_v/num_warps sweep")
    args = parser.parse_args()
    bw = copy_bandwidth_tbps()
    print(f"copy bandwidth {bw:.2f} TB/s", flush=True)
    rows = run(bw, sweep=not args.no_sweep, partial_path=args.out)
    write_results(args.out, rows, copy_bandwidth_TBps=bw, per="one GDN layer of 48", prefill_kernels=PREFILL_KERNELS)
    _safe(_kernel_resources)
    print_table(rows, ["op", "shape", "ours_us", "torch_us", "floor_us", "x_floor", "config"])


if __name__ == "__main__":
    main()
