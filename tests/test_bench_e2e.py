"""The end-to-end benchmark's plumbing on the CPU: floors, acceptance profiles, random models shared with
transformers, and the measuring loop and result JSON against a stand-in runtime."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import e2e  # noqa: E402
import e2e_models  # noqa: E402
from common import device_gaps, source_digest, write_results  # noqa: E402


def test_weight_bytes_match_the_27b_figures():
    sh = e2e.Shapes.of(e2e_models.spec("27b"))
    gb = {q: sh.target_weight_bytes(q, quantize_lm_head=False) / 1e9 for q in e2e.QUANTS}
    assert gb["bf16"] == pytest.approx(51.25, abs=0.01)
    assert gb["fp8"] == pytest.approx(26.9, abs=0.05)  # the project's figures, with a bf16 lm_head
    assert gb["int4"] == pytest.approx(15.1, abs=0.05)
    head = 248320 * 5120
    assert sh.target_weight_bytes("fp8", quantize_lm_head=True) == pytest.approx(26.9e9 - head, rel=0.002)
    assert sh.drafter_weight_bytes("bf16") / 1e9 == pytest.approx(3.46, abs=0.01)
    assert sh.gdn_state_bytes == 48 * 48 * 128 * 128 * 4


def test_floors():
    sh = e2e.Shapes.of(e2e_models.spec("27b"))
    ms, bound = e2e.floor_ms(e2e.step_cost(sh, "bf16", "ar", 1, 512, 1.0), 3.0, 700.0)
    assert bound == "memory" and 17.0 < ms < 17.6  # ~58 tokens/s autoregressive
    pp, _ = e2e.profile_slots("humaneval_bf16_vllm", 15)
    tau = e2e.expected_tokens_per_step(pp)
    one = e2e.step_cost(sh, "bf16", "dflash", 1, 512, tau)
    # a DFlash step reads the drafter and the lm_head again; the GDN state is read and written once
    assert one.bytes["draft_lm_head"] == 248320 * 5120 * 2  # bf16 row
    assert one.bytes["gdn_state"] == 2 * (sh.gdn_state_bytes + sh.gdn_conv_bytes)
    big, bound = e2e.floor_ms(e2e.step_cost(sh, "bf16", "dflash", 32, 512, tau), 3.0, 700.0)
    assert bound == "compute" and big > 2 * e2e.floor_ms(one, 3.0, 700.0)[0]
    assert e2e.floor_ms(e2e.step_cost(sh, "int4", "ar", 1, 512, 1.0), 3.0, 700.0)[0] < ms / 3
    # a narrower verify: the target's matmuls and the block's K/V shrink, the drafter still drafts its whole block
    narrow = e2e.step_cost(sh, "bf16", "dflash", 32, 512, tau, verify_width=8)
    wide = e2e.step_cost(sh, "bf16", "dflash", 32, 512, tau)
    assert narrow.flops["target_matmul"] * 2 == wide.flops["target_matmul"]
    assert narrow.bytes["kv"] == 32 * sh.kv_bytes_per_token * (512 + 8)
    for part in ("drafter_matmul", "draft_lm_head", "drafter_attention"):
        assert narrow.flops[part] == wide.flops[part]


def test_profiles():
    pp, note = e2e.profile_slots("gsm8k_fp8_h100_vllm", 15)
    assert len(pp) == 15 and pp[0] == 0.933 and "first 15 of 16" in note
    pp, note = e2e.profile_slots("humaneval_bf16_vllm", 15)
    assert note is None and e2e.expected_tokens_per_step(pp) == pytest.approx(8.09, abs=0.01)
    a = e2e.sample_accepted(pp, 200_000, torch.Generator().manual_seed(0))
    for i in (0, 7, 14):
        assert float((a >= i + 1).float().mean()) == pytest.approx(pp[i], abs=0.005)


def test_random_models_share_weights_with_transformers():
    ms = e2e_models.spec("tiny")
    target = e2e_models.build_target(ms, "cpu", torch.float32)
    drafter = e2e_models.build_drafter(ms, "cpu", torch.float32)
    assert drafter.fc.weight.shape == (64, 2 * 64)
    check = e2e_models.check_finite(target, prompt_len=8)
    assert check["finite"]
    hf = e2e_models.transformers_model(target, ms)
    assert hf.model.layers[0].mlp.up_proj.weight.data_ptr() == target.layers[0].mlp.up_proj.weight.data_ptr()
    cmp = e2e_models.compare_with_transformers(target, ms, check)
    assert cmp["rel_err"] < 1e-4 and cmp["argmax_match"]


@dataclass
class Event:
    request_id: int
    tokens: list[int]
    finished: bool


class FakeRunner:
    """Stands in for the batched runtime: one step prefills, then each step commits a+1 tokens per request."""

    def __init__(self, per_position):
        self.pp, self.reqs, self.gen = per_position, {}, torch.Generator().manual_seed(0)

    def add_request(self, prompt_ids, max_new_tokens, params=None, stop_token_ids=()):
        rid = len(self.reqs)
        self.reqs[rid] = [max_new_tokens, False]
        return rid

    @property
    def has_work(self):
        return bool(self.reqs)

    def step(self):
        events = []
        for rid, r in list(self.reqs.items()):
            if not r[1]:
                r[1] = True
                n = 1
            else:
                n = 1 + (int(e2e.sample_accepted(self.pp, 1, self.gen)[0]) if self.pp else 0)
            n = min(n, r[0])
            r[0] -= n
            events.append(Event(rid, [7] * n, r[0] == 0))
            if r[0] == 0:
                del self.reqs[rid]
        return events

    def cancel(self, rid):
        self.reqs.pop(rid, None)

    def phase_times_ms(self):
        return {"verify": 1.0, "accept_commit": 0.5, "draft": 0.25, "step": 2.0, "gaps": 0.25}


def test_measure_rows_and_json(tmp_path):
    sh = e2e.Shapes.of(e2e_models.spec("tiny"))
    pp, note = e2e.profile_slots("gsm8k_fp8_h100_vllm", sh.block_size - 1)
    runner = FakeRunner(pp)
    m = e2e.measure(runner, 4, sh.vocab, prompt_len=16, max_new=4000, warmup=2, steps=200, seed=0)
    assert m.prefill_steps == 1 and not m.finished_early
    assert m.tau == pytest.approx(e2e.expected_tokens_per_step(pp), rel=0.1)
    assert not runner.has_work  # measure cancels its requests when done
    row = e2e.make_row(sh, "bf16", "dflash", "gsm8k_fp8_h100_vllm", 4, m, 3.0, 700.0, 0, pp, note)
    # the row against its inputs: the measured figures, the fake runner's phase times, the floor at the profile's tau
    fl_ms, bound = e2e.floor_ms(
        e2e.step_cost(sh, "bf16", "dflash", 4, m.context, e2e.expected_tokens_per_step(pp)), 3.0, 700.0
    )
    floor_tps = 4 * e2e.expected_tokens_per_step(pp) / (fl_ms * 1e-3)
    assert row["tokens_per_s"] == round(m.tokens_per_s, 1) and m.tokens_per_s > 0
    assert row["floor_tokens_per_s"] == round(floor_tps, 1) and row["floor_bound"] == bound == "memory"
    assert row["ratio"] == round(fl_ms / m.step_ms, 3)
    tps_at_tau = 4 * e2e.expected_tokens_per_step(pp) / (m.step_ms * 1e-3)
    assert row["tokens_per_s_at_profile_tau"] == round(tps_at_tau, 1)
    assert (row["verify_ms"], row["accept_commit_ms"], row["draft_ms"], row["gaps_ms"]) == (1.0, 0.5, 0.25, 0.25)
    assert row["host_ms"] == round(m.step_ms - 2.0, 2) and row["graph_step_ms"] == 2.0
    assert (row["steps"], row["prefill_steps"]) == (200, 1) and row["committed"] == m.committed
    assert row["profile_note"] == note and "first 15 of 16" in note
    m_ar = e2e.measure(FakeRunner(None), 4, sh.vocab, prompt_len=16, max_new=400, warmup=1, steps=10, seed=0)
    ar = e2e.make_row(sh, "int4", "ar", None, 4, m_ar, 3.0, 700.0, 0, None)
    assert ar["tau"] == 1.0 and not ar["simulated"]
    out = tmp_path / "e2e.json"
    write_results(out, [row, ar], copy_bandwidth_TBps=3.0)
    doc = json.loads(out.read_text())
    assert {"device", "date", "commit", "copy_bandwidth_TBps", "rows"} <= set(doc)
    assert [r["mode"] for r in doc["rows"]] == ["dflash", "ar"]


def test_floors_only_cli(capsys):
    e2e.main(["--size", "tiny", "--floors-only", "--concurrency", "1,4", "--quant", "bf16,int4"])
    out = capsys.readouterr().out
    assert "gsm8k_fp8_h100_vllm" in out and "floor_tokens_per_s" in out
    e2e.main(["--size", "tiny", "--floors-only", "--concurrency", "1,4", "--quant", "bf16", "--no-ar",
              "--profiles", "humaneval_bf16_vllm", "--verify-width", "4,16"])  # fmt: skip
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("dflash")]
    assert [(r[3], r[4]) for r in rows] == [("1", "4"), ("4", "4"), ("1", "16"), ("4", "16")]  # concurrency, width
    with pytest.raises(SystemExit):
        e2e.main(["--size", "tiny", "--floors-only", "--verify-width", "1"])


def test_the_tuning_report_against_hand_computed_floors(tmp_path):
    import tuning_report

    from dflash_compiler.hw_profiles import load_profile
    from dflash_compiler.hw_profiles.database import Entry, TuningDB

    profile = load_profile("sm90", "H200")
    db = TuningDB.load(profile, tmp_path)
    common = dict(op="linear", tuned=True, device="NVIDIA H200", trials=8)
    db.record(Entry(shape_key="m16_n4096_k4096_residual_xbf16", fmt="bf16", lowering="triton", config={},
                    time_us=20.0, default_time_us=25.0, torch_time_us=30.0, **common))  # fmt: skip
    db.record(Entry(shape_key="m256_n8192_k4096_none_xbf16", fmt="fp8_channel", lowering="vendor", config={},
                    time_us=40.0, default_time_us=40.0, torch_time_us=44.0, **common))  # fmt: skip
    db.record(Entry(shape_key="m16_n64_k64_none_xbf16", fmt="bf16", lowering="triton", config={}, time_us=1.0,
                    **{**common, "device": "NVIDIA H100 80GB HBM3"}))  # fmt: skip
    db.save()
    doc = tuning_report.main(["--db", str(tmp_path), "--device", "H200", "--tflops", "700", "--out",
                              str(tmp_path / "report.json")])  # fmt: skip
    assert json.loads((tmp_path / "report.json").read_text())["rows"] == doc["rows"]
    small, big = doc["rows"]  # the H100 entry is left out
    # bf16 weight, x, y and the residual read, over 4.25 TB/s
    nbytes = 4096 * 4096 * 2 + 16 * 4096 * 2 + 2 * 16 * 4096 * 2
    assert small["bound"] == "memory" and small["floor_us"] == pytest.approx(nbytes / 4.25e6, abs=0.01)
    assert small["tuned_frac"] == pytest.approx(round(nbytes / 4.25e6 / 20.0, 3))
    assert (small["vs_default"], small["vs_torch"]) == (1.25, 1.5)
    # FP8 at 256 rows: compute-bound at twice the bf16 rate on Hopper's FP8 tensor cores
    flops_us = 2 * 256 * 8192 * 4096 / 1400e12 * 1e6
    assert big["bound"] == "compute" and big["floor_us"] == pytest.approx(flops_us, abs=0.01)
    assert big["vs_default"] == 1.0 and doc["copy_bandwidth_TBps"] == 4.25


def test_quant_quality_compares_the_int4_variants(tmp_path):
    import quant_quality

    doc = quant_quality.main(["--eval-prompts", "2", "--calibration-prompts", "2", "--max-new-tokens", "6",
                              "--device", "cpu", "--out", str(tmp_path / "q.json")])  # fmt: skip
    rows = {r["variant"]: r for r in doc["rows"]}
    assert list(rows) == ["unquantized", "int4 round-to-nearest", "int4 calibrated"]
    for name in ("int4 round-to-nearest", "int4 calibrated"):
        assert rows[name]["kl_mean"] > 0 and 0 < rows[name]["top1_agreement"] < 1 and rows[name]["tau"] >= 1
    assert rows["unquantized"]["tau"] >= 1 and doc["calibration_prompts"] == 2


def test_a_runner_through_an_artifact_of_random_weights(tmp_path, capsys):
    """--via-artifact: the pair compiled with --random-weights 0 (build_target's and build_drafter's seeds), loaded,
    and its runner decoding; the start-up figures name the build, the load and the artifact's size."""
    ms = e2e_models.spec("tiny")
    runner, startup = e2e.artifact_runner(ms, "bf16", "dflash", tmp_path, max_batch=2, max_seq_len=96,
                                          cuda_graphs=False)  # fmt: skip
    assert {"artifact_build_s", "artifact_load_s", "runner_start_s", "artifact_bytes"} <= set(startup)
    assert startup["artifact_kernels_compiled_at_load"] == 0  # a CPU artifact has no kernels to compile
    assert not list((tmp_path / "bf16-dflash").glob("*.safetensors")) and startup["artifact_bytes"] > 0
    rid = runner.add_request([1, 2, 3, 4], max_new_tokens=8)
    tokens = []
    while runner.has_work:
        tokens += [t for e in runner.step() if e.request_id == rid for t in e.tokens]
    assert len(tokens) == 8 and all(0 <= t < ms.target.vocab_size for t in tokens)
    with pytest.raises(SystemExit):
        e2e.main(["--size", "tiny", "--via-artifact", str(tmp_path), "--glue", "inductor", "--floors-only"])
    assert "--via-artifact: the artifact's graphs run as compiled" in capsys.readouterr().err


def test_results_name_the_sources_that_ran(tmp_path):
    """Every result JSON carries a digest of the package's sources and databases: equal for equal files (as on a
    checkout of the commit that ran), different when one file differs, whatever commit a copied .git names."""
    doc = write_results(tmp_path / "r.json", [])
    assert doc["source_digest"] == source_digest() == json.loads((tmp_path / "r.json").read_text())["source_digest"]
    tree = tmp_path / "pkg"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.py").write_text("x = 1\n")
    (tree / "sub" / "db.jsonl").write_text("{}\n")
    (tree / "notes.md").write_text("not a source")
    first = source_digest(tree)
    (tree / "notes.md").write_text("changed, still not a source")
    assert source_digest(tree) == first
    (tree / "sub" / "db.jsonl").write_text('{"time_us": 1}\n')
    assert source_digest(tree) != first


def test_rows_name_the_gdn_configs_their_step_dispatched():
    """tuned_gdn reads the choices lower() recorded on the GDN verify nodes of a step graph."""
    import torch.fx as fx

    graph = fx.Graph()
    x = graph.placeholder("x")
    tuned = {"16": {"lowering": "triton", "config": {"algorithm": "chunked", "block_k": 32}}}
    for meta in ({"op": "gdn_verify", "impl": "triton", "tuned": tuned},
                 {"op": "gdn_verify", "impl": "triton", "tuned": tuned},
                 {"op": "gdn_commit", "impl": "triton"},
                 {"op": "linear", "impl": "triton", "tuned": {"16": {}}}):  # fmt: skip
        node = graph.call_function(torch.neg, (x,))
        node.meta["lowering"] = meta
    graph.output(x)
    gm = fx.GraphModule(torch.nn.Module(), graph)
    assert e2e.tuned_gdn(gm) == {"gdn_verify": tuned}


@pytest.mark.parametrize("prologues", [None, True, False])
def test_ablation_sets_the_prologue_fusions_per_run(monkeypatch, prologues):
    """--prologues / --no-prologues put the prologue fusions in every quantization's pipeline or in none; without
    either the pipeline keeps its own choice. A pass left out is out of every pipeline."""
    from dflash_compiler.graph import compiler, passes

    for name in ("FUSION_PASSES", "PROLOGUE_QUANTS"):
        monkeypatch.setattr(passes, name, getattr(passes, name))
    monkeypatch.setattr(compiler, "chooser_for", compiler.chooser_for)
    changed = e2e._ablate("fuse_residual", prologues, untuned=False)
    with_norm = {q for q in compiler.QUANTS if passes.fuse_norm in passes.default_passes(q)}
    assert with_norm == {None: {"fp8"}, True: set(compiler.QUANTS), False: set()}[prologues]
    assert changed["prologue_quants"] == sorted(with_norm, key=compiler.QUANTS.index)
    assert all(passes.fuse_residual not in passes.default_passes(q) for q in compiler.QUANTS)
    with pytest.raises(SystemExit, match="--without-passes: unknown pass 'fuse_nothing'"):
        e2e._ablate("fuse_nothing", None, untuned=False)


def test_device_gaps_merge_overlaps_and_bin_the_idle_time():
    """Busy time is the union of the kernels' intervals (overlapping kernels count once); each gap between them
    lands in its length's bin."""
    spans = [(0.0, 10.0), (2.0, 6.0), (12.0, 20.0), (19.0, 25.0), (35.0, 40.0), (100.0, 101.0)]
    got = device_gaps(list(reversed(spans)))  # in any order
    assert got == {"busy_us": 29.0, "idle_under_5us": 2.0, "idle_5_to_20us": 10.0, "idle_over_20us": 60.0}
    assert device_gaps([]) == {"busy_us": 0.0, "idle_under_5us": 0.0, "idle_5_to_20us": 0.0, "idle_over_20us": 0.0}
