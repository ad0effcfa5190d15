"""Hardware profiles, the tuning database, search spaces and pruning, Optuna studies (resume, failures, a toy
optimum), the runtime study on the tiny pair, `choose` and `dflash-tune` end to end, all on the CPU (Triton's
interpreter in fp16/fp32)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch

from dflash_compiler import hw_profiles
from dflash_compiler.errors import DFlashError
from dflash_compiler.hw_profiles import list_profiles, load_profile, profile_for_device
from dflash_compiler.hw_profiles.database import Entry, TuningDB
from dflash_compiler.tuning import choose, untuned_fallbacks
from dflash_compiler.tuning.choice import Chooser, RecordedChoices, default_choice, recorded_rows
from dflash_compiler.tuning.measure import ConfigFailed, LinearCase, make_case
from dflash_compiler.tuning.spaces import (
    AcceptShape,
    AttentionShape,
    ConvShape,
    DraftAttentionShape,
    GDNChunkedShape,
    GDNShape,
    LinearShape,
    Space,
    parse_shape,
    space_for,
)
from dflash_compiler.tuning.study import best_trial, measured_points, open_storage, optimize

GPU_PROFILES = ("sm80", "sm90", "sm100", "sm120")
ROOT = Path(__file__).resolve().parents[1]


# ---- profiles ------------------------------------------------------------------------------------------------


def test_every_profile_loads_with_its_facts():
    assert set(list_profiles()) == {"cpu", *GPU_PROFILES}
    h200, h100 = load_profile("sm90"), load_profile("sm90", "H100")
    assert (h200.device.name, h200.memory_bandwidth_tbps, h200.sm_count) == ("NVIDIA H200", 4.25, 132)
    assert h100.memory_bandwidth_tbps == 3.0 and h100.device.bandwidth_source.startswith("measured")
    assert h200.smem_per_block == 232448 and h200.smem_per_sm == 233472
    assert load_profile("sm120").smem_per_block == 101376
    assert load_profile("sm120", "5090").sm_count == 170
    assert load_profile("sm100").memory_bandwidth_tbps == 8.0
    assert load_profile("sm100").device.bandwidth_source.startswith("spec")
    fp8 = {name: load_profile(name).fp8_tensor_cores for name in list_profiles()}
    fp4 = {name: load_profile(name).fp4_tensor_cores for name in list_profiles()}
    assert fp8 == {"cpu": False, "sm80": False, "sm90": True, "sm100": True, "sm120": True}
    assert fp4 == {"cpu": False, "sm80": False, "sm90": False, "sm100": True, "sm120": True}
    assert load_profile("cpu").activation_dtypes == ("fp32", "fp16")


def test_profile_errors_are_one_line():
    with pytest.raises(DFlashError, match=r"unknown hardware profile 'sm75' \(profiles: cpu, sm100"):
        load_profile("sm75")
    with pytest.raises(DFlashError, match="no device 'A10G' in profile sm80"):
        load_profile("sm80", "A10G")


def test_a_broken_profile_file_names_the_field(tmp_path, monkeypatch):
    text = (ROOT / "dflash_compiler/hw_profiles/sm90.toml").read_text()
    (tmp_path / "sm90.toml").write_text(text.replace("smem_per_block = 232448", "smem_per_block = 'big'"))
    (tmp_path / "cpu.toml").write_text(text.replace('name = "sm90"', 'name = "cpu"').replace("sm_count = 132", ""))
    monkeypatch.setattr(hw_profiles, "PROFILE_DIR", tmp_path)
    with pytest.raises(DFlashError, match=r"sm90.toml: field 'smem_per_block' must be int"):
        load_profile("sm90")
    with pytest.raises(DFlashError, match=r"cpu.toml: devices\[0\]: field 'sm_count' is missing"):
        load_profile("cpu")


def test_profile_for_device_reads_the_device_limits():
    props = SimpleNamespace(
        major=9, minor=0, name="NVIDIA H100 80GB HBM3", multi_processor_count=114,
        shared_memory_per_block_optin=232448, shared_memory_per_multiprocessor=233472, L2_cache_size=50 << 20,
    )  # fmt: skip
    p = profile_for_device(props)
    assert (p.name, p.sm_count, p.memory_bandwidth_tbps, p.l2_bytes) == ("sm90", 114, 3.0, 50 << 20)
    unlisted = profile_for_device(SimpleNamespace(major=12, minor=0, name="NVIDIA RTX 5080", multi_processor_count=84))
    assert (unlisted.name, unlisted.sm_count, unlisted.memory_bandwidth_tbps) == ("sm120", 84, None)
    with pytest.raises(DFlashError, match="Tesla T4: no hardware profile for compute capability 7.5"):
        profile_for_device(SimpleNamespace(major=7, minor=5, name="Tesla T4", multi_processor_count=40))
    assert load_profile("auto").name == "cpu"


# ---- search spaces and pruning ---------------------------------------------------------------------------------

# Qwen3.5-27B shapes: gate_up (SwiGLU), down (K 17408), lm_head, verify attention, GDN verify, greedy acceptance.
SHAPES_27B = [
    *(LinearShape(m, 34816, 5120, f, "swiglu") for m in (1, 16, 64) for f in ("bf16", "fp8_channel", "int4_sym")),
    *(LinearShape(16, 5120, 17408, f, "residual") for f in ("bf16", "fp8_block", "int4_asym")),
    LinearShape(256, 248320, 5120, "fp8_channel"),
    AttentionShape(1, 16, 24, 4, 256, 4096),
    AttentionShape(16, 16, 24, 4, 256, 4096),
    DraftAttentionShape(4, 16, 32, 8, 128, 4096),
    GDNShape(16, 16, 16, 48, 128, 128),
    GDNChunkedShape(1, 512, 16, 48, 128, 128),
    ConvShape(16, 16, 10240, 4),
    AcceptShape(4, 16, 248320),
]


@pytest.mark.parametrize("profile", GPU_PROFILES)
def test_the_default_runs_and_every_feasible_point_fits_the_profile(profile):
    prof = load_profile(profile)
    for shape in SHAPES_27B:
        space = space_for(shape, prof)
        default, choices = space.default(), space.choices()
        assert space.check(default) is None, (shape, default, space.check(default))
        assert all(v in choices[k] for k, v in default.items()), (shape, default)
        feasible = space.feasible()
        assert default in feasible
        if isinstance(shape, LinearShape):
            assert max(space._smem(p) for p in feasible if p["lowering"] == "triton") <= prof.smem_per_block


def test_the_chunked_prefill_space_follows_the_shared_memory():
    shape = GDNChunkedShape(1, 512, 16, 48, 128, 128)
    sm120, sm90 = space_for(shape, load_profile("sm120")), space_for(shape, load_profile("sm90"))
    assert sm120.default()["chunk_size"] == 32 and sm90.default()["chunk_size"] == 64
    assert "shared memory 131072 B over the 101376 B" in sm120.check({**sm120.default(), "chunk_size": 64})
    assert sm90.check({**sm90.default(), "chunk_size": 64}) is None
    assert sm90.default()["precision"] == "half" and sm90.check({**sm90.default(), "blocked_system": True}) is None
    for change in ({"chunk_size": 32}, {"precision": "tf32"}, {"system_precision": "tf32_refined"}):
        assert "blocked_system solves 64-token chunks" in sm90.check({**sm90.default(), "blocked_system": True,
                                                                       **change})  # fmt: skip


def test_pruning_follows_each_profiles_limits():
    shape = LinearShape(16, 5120, 17408, "bf16", "residual")
    big = {"lowering": "triton", "block_n": 128, "block_m": 16, "block_k": 128, "num_warps": 4, "num_stages": 4,
           "grid": "tile", "fp8_dot": False}  # fmt: skip
    # 4 stages of 128x128 bf16 weights + 128x16 activations: 147456 B
    assert space_for(shape, load_profile("sm90")).check(big) is None
    assert "shared memory 147456 B over the 101376 B" in space_for(shape, load_profile("sm120")).check(big)
    # the sm120 default (6 stages on sm90 for K > 5120) is shrunk to fit 99 KB
    sm90_default = space_for(shape, load_profile("sm90")).default()
    sm120 = space_for(shape, load_profile("sm120"))
    assert sm90_default["num_stages"] == 6 and sm120.default()["num_stages"] < 6
    assert sm120._smem(sm120.default()) <= 101376
    # FP8 dot only with FP8 tensor cores; quantized weights only with block_k 128
    fp8 = LinearShape(16, 5120, 6144, "fp8_channel", "residual")
    fp8_dot = {**big, "fp8_dot": True, "num_stages": 2}
    assert load_profile("sm90").fp8_tensor_cores and space_for(fp8, load_profile("sm90")).check(fp8_dot) is None
    assert "FP8 tensor cores" in space_for(fp8, load_profile("sm80")).check(fp8_dot)
    assert space_for(fp8, load_profile("sm80")).choices()["fp8_dot"] == [False]
    assert "block_k 128" in space_for(fp8, load_profile("sm90")).check({**fp8_dot, "block_k": 64})
    # x quantized by a pass before the GEMM: a variant of the FP8 dot
    sm90_fp8 = space_for(fp8, load_profile("sm90"))
    assert sm90_fp8.choices()["prequant_x"] == [False, True]
    assert sm90_fp8.check({**fp8_dot, "prequant_x": True}) is None
    assert "needs the FP8 dot" in sm90_fp8.check({**fp8_dot, "fp8_dot": False, "prequant_x": True})
    assert sm90_fp8.config({**fp8_dot, "prequant_x": True})[1]["prequant_x"] is True
    # and of INT4 weights (W4A8) where there are FP8 tensor cores
    int4 = LinearShape(16, 5120, 6144, "int4_sym")
    assert space_for(int4, load_profile("sm90")).choices()["prequant_x"] == [False, True]
    assert space_for(int4, load_profile("sm80")).choices()["prequant_x"] == [False]
    assert "FP8 tensor cores" in space_for(int4, load_profile("sm80")).check({**big, "prequant_x": True})
    assert space_for(LinearShape(16, 5120, 6144, "bf16"), load_profile("sm90")).choices()["prequant_x"] == [False]
    # per-token x scales (W8A8 per token and channel): FP8 per-channel weights with a pre-quantized x only
    assert sm90_fp8.choices()["x_per_token"] == [False, True]
    per_token = {**fp8_dot, "prequant_x": True, "x_per_token": True}
    assert sm90_fp8.check(per_token) is None
    assert sm90_fp8.config(per_token)[1]["x_per_token"] is True
    assert "x_per_token" not in sm90_fp8.config({**fp8_dot, "prequant_x": True})[1]
    assert "pre-quantized x" in sm90_fp8.check({**per_token, "prequant_x": False})
    fp8_block = space_for(LinearShape(16, 5120, 6144, "fp8_block"), load_profile("sm90"))
    assert fp8_block.choices()["x_per_token"] == [False] and fp8_block.check(per_token) is not None
    assert space_for(int4, load_profile("sm90")).choices()["x_per_token"] == [False]
    # one dot per INT4 chunk: a variant of the INT4 kernel on every profile
    assert space_for(int4, load_profile("sm80")).choices()["int4_chunk_dot"] == [False, True]
    assert space_for(int4, load_profile("sm90")).config({**big, "int4_chunk_dot": True})[1]["int4_chunk_dot"] is True
    assert "INT4" in sm90_fp8.check({**fp8_dot, "int4_chunk_dot": True})
    assert sm90_fp8.choices()["int4_chunk_dot"] == [False]
    # the TVM lowering competes on GPU profiles where TVM is installed (on the CPU it is tested, not tuned)
    from dflash_compiler.tuning.spaces import tvm_available

    assert tvm_available() and "tvm" in space_for(int4, load_profile("sm90")).choices()["lowering"]
    assert "tvm" not in space_for(int4, load_profile("cpu")).choices()["lowering"]
    assert space_for(int4, load_profile("sm90")).config({**big, "lowering": "tvm"}) == ("tvm", {})
    assert "TVM" in space_for(int4, load_profile("cpu")).check({**big, "lowering": "tvm"})
    # mma.sync in place of wgmma: a Hopper variant of every format's kernel, named only where chosen
    for profile, offered in (("sm80", [False]), ("sm90", [False, True]), ("sm100", [False]), ("sm120", [False])):
        assert space_for(int4, load_profile(profile)).choices()["mma_sync"] == offered, profile
    assert sm90_fp8.config({**fp8_dot, "mma_sync": True})[1]["mma_sync"] is True
    assert "mma_sync" not in sm90_fp8.config(fp8_dot)[1]
    assert "Hopper" in space_for(int4, load_profile("sm80")).check({**big, "mma_sync": True})
    # tiles past the dimension, registers, split-K past the K chunks
    small = LinearShape(1, 96, 64, "fp16", act="fp16")
    sp = space_for(small, load_profile("cpu"))
    assert sp.check({**big, "block_k": 256, "num_stages": 2}) == "block_k 256 over K=64"
    assert sp.check({**big, "block_m": 64}) == "block_m 64 over M=1"
    assert sp.default()["block_k"] == 128 and sp.check(sp.default()) is None  # the default is never waste
    wide = LinearShape(256, 8192, 8192, "bf16")
    assert "registers per thread" in space_for(wide, load_profile("sm90")).check(
        {**big, "block_n": 256, "block_m": 128, "num_warps": 2, "num_stages": 2}
    )
    assert "over the 1 K chunks" in sp.check({**big, "block_k": 64, "grid": "split2"})


def test_lowerings_and_the_vendor_crossover():
    sm90, sm80, cpu = load_profile("sm90"), load_profile("sm80"), load_profile("cpu")
    assert space_for(LinearShape(64, 5120, 6144, "bf16"), sm90).default() == {"lowering": "vendor"}
    assert space_for(LinearShape(32, 5120, 6144, "bf16"), sm90).default()["lowering"] == "triton"
    assert space_for(LinearShape(64, 5120, 6144, "fp8_channel"), sm90).default() == {"lowering": "vendor"}
    assert space_for(LinearShape(64, 5120, 6144, "fp8_channel"), sm80).default()["lowering"] == "triton"
    assert space_for(LinearShape(64, 5120, 6144, "int4_sym"), sm90).choices()["lowering"] == ["triton", "tvm"]
    assert space_for(LinearShape(64, 5120, 6144, "bf16"), sm90).choices()["lowering"] == ["triton", "vendor", "tvm"]
    assert space_for(LinearShape(64, 512, 256, "fp32", act="fp32"), cpu).choices()["lowering"] == [
        "triton",
        "reference",
    ]


def test_other_families_prune_what_cannot_run():
    cpu = load_profile("cpu")
    attn = space_for(AttentionShape(1, 16, 24, 4, 256, 512), cpu)
    ok = {**attn.default(), "num_splits": 4, "block_n": 32}
    assert attn.check(ok) is None
    assert "shorter than block_n 128" in attn.check({**ok, "num_splits": 8, "block_n": 128})
    gdn = space_for(GDNShape(1, 16, 16, 48, 128, 128), cpu)
    assert gdn.choices()["block_v"] == [16, 32, 64, 128]
    recurrent = {"lowering": "triton", "algorithm": "recurrent", "block_v": 128, "num_warps": 1, "unroll": False,
                 "precision": "tf32x3", "block_k": 128, "factor_warps": 4, "num_stages": 3,
                 "fused_commit": False}  # fmt: skip
    assert "registers per thread" in gdn.check(recurrent)
    chunked = {**recurrent, "algorithm": "chunked", "block_v": 32, "num_warps": 4}
    assert gdn.check(chunked) is None
    assert "option of the recurrent kernel" in gdn.check({**chunked, "unroll": True})
    assert "option of the chunked block" in gdn.check({**recurrent, "block_v": 16, "precision": "ieee"})
    assert "at most 64 positions" in space_for(GDNShape(1, 65, 16, 48, 128, 128), cpu).check(chunked)
    # each algorithm's config holds its own options; a recurrent one is what the database held before
    assert gdn.config({**chunked, "block_k": 32}) == (
        "triton",
        {"algorithm": "chunked", "block_v": 32, "num_warps": 4, "precision": "tf32x3", "block_k": 32},
    )
    assert "block_k is an option of the chunked block" in gdn.check({**recurrent, "block_v": 16, "block_k": 32})
    assert gdn.config({**recurrent, "block_v": 16}) == ("triton", {"block_v": 16, "num_warps": 1, "unroll": False})
    factored = {**chunked, "algorithm": "factored", "block_k": 32, "factor_warps": 2}
    assert gdn.check(factored) is None
    assert gdn.config(factored) == (
        "triton",
        {"algorithm": "factored", "block_v": 32, "num_warps": 4, "precision": "tf32x3", "block_k": 32,
         "factor_warps": 2},
    )  # fmt: skip
    assert "factor_warps is an option of the factored block" in gdn.check({**chunked, "factor_warps": 2})
    # the K loop's stages: named where they differ from the launcher's, an option of the chunked forms only
    assert gdn.config({**factored, "num_stages": 1})[1]["num_stages"] == 1
    assert "num_stages is an option of the chunked block" in gdn.check({**recurrent, "block_v": 16, "num_stages": 2})
    assert "option of the recurrent kernel" in gdn.check({**factored, "unroll": True})
    long_block = space_for(GDNShape(1, 64, 16, 48, 128, 128), cpu)
    assert "the factors launch needs" in long_block.check({**factored, "block_k": 128, "factor_warps": 1})
    # the pending block's commit inside the single-launch block: named in its config where set
    assert gdn.config({**chunked, "fused_commit": True})[1]["fused_commit"] is True
    assert "fused_commit" not in gdn.config(chunked)[1]
    assert "fused_commit is an option of the single-launch" in gdn.check({**factored, "fused_commit": True})
    alternatives = [(p["algorithm"], p["block_k"], p["block_v"], p["factor_warps"], p["fused_commit"])
                    for p in gdn.alternatives()]  # fmt: skip
    assert alternatives == [
        ("chunked", bk, bv, 4, fused) for fused in (False, True) for bk in (128, 32) for bv in (16, 32, 64, 128)
    ] + [("factored", 32, bv, 1, False) for _ in (2, 4) for bv in (16, 32, 64, 128)]
    conv = space_for(ConvShape(1, 16, 10240, 4), cpu)
    assert conv.default() == {"lowering": "triton", "block_t": 8, "block_c": 64, "num_warps": 2}
    assert conv.choices()["block_t"] == [1, 2, 4, 8, 16]
    assert "leaves threads of 8 warps idle" in conv.check({**conv.default(), "block_t": 1, "block_c": 64,
                                                           "num_warps": 8})  # fmt: skip
    assert parse_shape("causal_conv1d_update", "b16_t16_c10240_w4", "bf16") == ConvShape(16, 16, 10240, 4)
    acc = space_for(AcceptShape(2, 16, 4096), cpu)
    assert "not a multiple of block_v" in acc.check({"lowering": "triton", "block_v": 4096, "chunk": 2048})


def test_shape_keys_parse_back():
    for shape in [*SHAPES_27B, LinearShape(1, 96, 64, "fp32", act="fp32")]:
        assert parse_shape(shape.op, shape.key, shape.fmt) == shape
    with pytest.raises(DFlashError, match="'m16_n8' is not a linear shape key"):
        parse_shape("linear", "m16_n8", "bf16")


def test_the_calls_of_the_27b_pair():
    from dflash_compiler.models.config import DrafterConfig, TargetConfig
    from dflash_compiler.tuning.shapes import model_calls, preset_dirs, select

    target_dir, drafter_dir = preset_dirs("qwen3.5-27b")
    target, drafter = TargetConfig.from_dir(target_dir), DrafterConfig.from_dir(drafter_dir)
    calls = model_calls(target, drafter, "int4", "bf16", [1, 16], 4096, prefill_chunk=512)
    by_name = {(c.name, c.shape.key): c.shape for c in calls}
    assert by_name[("target.mlp.gate_up", "m16_n34816_k5120_swiglu_xbf16")].fmt == "int4_sym"
    assert ("target.gdn.in_proj", "m256_n16480_k5120_none_xbf16") in by_name  # qkv 10240 + z 6144 + b, a 48 each
    assert ("target.attn.qkv", "m16_n14336_k5120_none_xbf16") in by_name  # gated q 2 x 6144 + k, v 1024 each
    assert ("drafter.fc", "m16_n5120_k25600_none_xbf16") in by_name  # 5 tapped layers
    assert ("target.attn.verify", "b16_t16_hq24_hkv4_d256_ctx4096") in by_name
    assert ("prefill.gdn.chunked", "b1_t512_h16_hv48_k128_v128") in by_name
    assert by_name[("target.gdn.conv", "b16_t16_c10240_w4")].op == "causal_conv1d_update"  # q, k 2048 + v 6144
    assert ("prefill.mlp.gate_up", "m512_n34816_k5120_swiglu_xbf16") in by_name
    assert ("prefill.attn", "b1_t512_hq24_hkv4_d256_ctx4096") in by_name
    assert by_name[("drafter.attn", "b16_t16_hq32_hkv8_d128_ctx4096")].op == "draft_attention"
    # the drafter's lm_head (15 rows a request) shares the target's bucket at batch 1, not at batch 16 (240 rows)
    heads = sorted(c.shape.key for c in calls if c.name.endswith("lm_head"))
    assert heads == ["m16_n248320_k5120_none_xbf16", "m256_n248320_k5120_none_xbf16"]  # prefill: the last row only
    assert len({c.id for c in calls}) == len(calls)
    assert {c.op for c in select(calls, ["gdn_verify", "target.mlp.down"])} == {"gdn_verify", "linear"}
    with pytest.raises(DFlashError, match="parameter 'quant' must be one of bf16, fp8, int4"):
        model_calls(target, drafter, "fp4", "bf16", [1], 4096)


# ---- the database ---------------------------------------------------------------------------------------------


def _entry(op="linear", key="m16_n96_k64_none_xfp32", fmt="fp32", **kw):
    fields = dict(
        lowering="triton", config={"block_n": 32, "num_stages": 2}, tuned=True, time_us=12.5,
        default_time_us=20.0, torch_time_us=15.0, device="cpu (x86_64)", platform="cpu", trials=4,
        versions={"torch": torch.__version__}, date="2026-12-01",
    )  # fmt: skip
    fields.update(kw)
    return Entry(op=op, shape_key=key, fmt=fmt, **fields)


def test_database_round_trip(tmp_path):
    db = TuningDB.load("cpu", tmp_path)
    assert len(db) == 0
    entries = [
        _entry(key="m16_n96_k64_none_xfp32"),
        _entry(key="m1_n96_k64_none_xfp32", lowering="reference", config={}),
        _entry(op="greedy_accept", key="b1_bs16_v4096", tuned=False, time_us=None),
    ]
    for e in entries:
        db.record(e)
    db.record(_entry(key="m16_n96_k64_none_xfp32", time_us=11.0))  # replaces the first
    written = db.save()
    assert sorted(p.name for p in written) == ["greedy_accept.jsonl", "linear.jsonl"]
    lines = (tmp_path / "cpu" / "linear.jsonl").read_text().splitlines()
    assert [json.loads(line)["shape_key"] for line in lines] == ["m16_n96_k64_none_xfp32", "m1_n96_k64_none_xfp32"]
    assert all(list(json.loads(line)) == sorted(json.loads(line)) for line in lines)
    assert not list((tmp_path / "cpu").glob(".*tmp"))
    back = TuningDB.load("cpu", tmp_path)
    assert back.entries() == db.entries()
    assert back.lookup("linear", "m16_n96_k64_none_xfp32", "fp32").time_us == 11.0
    assert back.lookup("linear", "m16_n96_k64_none_xfp32", "fp16") is None
    assert [e.op for e in back.untuned()] == ["greedy_accept"]


def test_database_save_is_atomic(tmp_path, monkeypatch):
    db = TuningDB.load("cpu", tmp_path)
    db.record(_entry())
    db.save()
    before = (tmp_path / "cpu" / "linear.jsonl").read_text()
    db.record(_entry(time_us=1.0))

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr("dflash_compiler.hw_profiles.database.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        db.save()
    assert (tmp_path / "cpu" / "linear.jsonl").read_text() == before
    assert sorted(p.name for p in (tmp_path / "cpu").iterdir()) == ["linear.jsonl"]


def test_database_errors_name_the_line(tmp_path):
    d = tmp_path / "cpu"
    d.mkdir()
    good = _entry().to_line()
    (d / "linear.jsonl").write_text(good + "\n" + good.replace('"triton"', '"cuda-magic"') + "\n")
    with pytest.raises(DFlashError, match=r"linear.jsonl:2: field 'lowering' must be one of triton, vendor"):
        TuningDB.load("cpu", tmp_path)
    (d / "linear.jsonl").write_text(good + "\n" + good + "\n")
    with pytest.raises(DFlashError, match=r"linear.jsonl:2: a second entry"):
        TuningDB.load("cpu", tmp_path)
    (d / "linear.jsonl").write_text("{not json\n")
    with pytest.raises(DFlashError, match=r"linear.jsonl:1: not valid JSON"):
        TuningDB.load("cpu", tmp_path)


# ---- choose: what the lowering pass reads -------------------------------------------------------------------


def test_choose_returns_the_database_entry_or_the_marked_default(tmp_path):
    db = TuningDB.load("sm90", tmp_path)
    tuned_key = LinearShape(16, 34816, 5120, "fp8_channel", "swiglu").key
    db.record(_entry(key=tuned_key, fmt="fp8_channel", platform="cuda", config={"block_n": 64}))
    marked = LinearShape(1, 5120, 6144, "bf16", "residual").key
    db.record(_entry(key=marked, fmt="bf16", platform="cuda", tuned=False, config={"block_n": 32}))
    db.save()
    assert choose("linear", tuned_key, "fp8_channel", "sm90", root=tmp_path) == ("triton", {"block_n": 64}, True)
    lowering, config, tuned = choose("linear", tuned_key, "bf16", "sm90", root=tmp_path)
    space = space_for(parse_shape("linear", tuned_key, "bf16"), load_profile("sm90"))
    assert (lowering, config, tuned) == (*space.config(space.default()), False)
    assert config["block_k"] == 128 and config["fp8_dot"] is False
    assert choose("linear", marked, "bf16", "sm90", root=tmp_path) == ("triton", {"block_n": 32}, False)
    assert default_choice("rms_norm", "t16_h5120", "bf16", load_profile("cpu")) == ("reference", {}, False)
    calls = [("linear", tuned_key, "fp8_channel"), ("linear", tuned_key, "bf16"), ("linear", marked, "bf16")]
    assert untuned_fallbacks(calls, "sm90", root=tmp_path) == calls[1:]
    chooser = Chooser("sm90", tmp_path)
    chooser.choose(*calls[0])
    assert chooser.fallbacks == []

    # an artifact records the tuned answers its lowering got, and a load answers with exactly those
    rows = recorded_rows(chooser)
    assert rows == [{"op": "linear", "shape_key": tuned_key, "fmt": "fp8_channel", "lowering": "triton",
                     "config": {"block_n": 64}}]  # fmt: skip
    replay = RecordedChoices(json.loads(json.dumps(rows)))
    assert replay.choose(*calls[0]) == ("triton", {"block_n": 64}, True)
    assert replay.choose(*calls[1]).tuned is False and replay.fallbacks == [calls[1]]
    with pytest.raises(DFlashError, match=r"manifest.json: tuning.lowered\[0\]: expected an object with op"):
        RecordedChoices([{"op": "linear"}], "manifest.json: tuning.lowered")


# ---- studies ---------------------------------------------------------------------------------------------------


class ToySpace(Space):
    """x, y in 0..4; the default (0, 0); (4, 4) cannot run."""

    op = "toy"

    def __init__(self):
        super().__init__(None, load_profile("cpu"))

    def choices(self):
        return {"lowering": ["triton"], "x": list(range(5)), "y": list(range(5))}

    def launcher_default(self):
        return {"lowering": "triton", "x": 0, "y": 0}

    def limits(self, params):
        return "too big" if (params["x"], params["y"]) == (4, 4) else None


def toy_time(params):
    return 1.0 + (params["x"] - 3) ** 2 + (params["y"] - 1) ** 2


def test_a_short_study_finds_the_known_best(tmp_path):
    storage = open_storage(tmp_path / "toy.journal")
    study = optimize(ToySpace(), toy_time, storage=storage, study_name="toy", n_trials=16, seed=0)
    best = best_trial(study)
    assert (best.params["x"], best.params["y"], best.value) == (3, 1, 1.0)
    assert len(measured_points(study)) == 16
    default = study.trials[0]
    assert default.params == {"lowering": "triton", "x": 0, "y": 0} and default.user_attrs["default"]
    assert all(t.params != {"lowering": "triton", "x": 4, "y": 4} for t in study.trials if t.value is not None)


class ToySpaceWithAlternatives(ToySpace):
    def alternatives(self):
        return [{"lowering": "triton", "x": 3, "y": 0}, {"lowering": "triton", "x": 0, "y": 1}]


def test_a_study_measures_the_spaces_alternatives_right_after_the_default(tmp_path):
    study = optimize(ToySpaceWithAlternatives(), toy_time, storage=open_storage(tmp_path / "toy.journal"),
                     study_name="toy", n_trials=4, seed=0)  # fmt: skip
    first = [(t.params["x"], t.params["y"]) for t in study.trials[:3]]
    assert first == [(0, 0), (3, 0), (0, 1)]
    assert [bool(t.user_attrs.get("alternative")) for t in study.trials[:3]] == [False, True, True]
    assert study.trials[1].value == 2.0 and len(measured_points(study)) == 4


def test_the_linear_alternatives_switch_each_variant_on_and_try_whole_64_row_tiles():
    qkv = LinearShape(16, 14336, 5120, "fp8_channel")
    sm90 = space_for(qkv, load_profile("sm90"))
    default = sm90.default()
    tiles = {"block_n": 64, "num_warps": 4, "num_stages": 6, "grid": "tile"}
    tma = {"tma": True, "fp8_dot": True}
    stream = {"block_n": 64, "block_k": 256, "num_warps": 4, "num_stages": 4}
    assert sm90.alternatives() == [
        {**default, "prequant_x": True}, {**default, **tma},
        {**default, **tiles}, {**default, **tiles, "prequant_x": True}, {**default, **tiles, **tma},
        {**default, **stream, "grid": "tile", **tma}, {**default, **stream, "grid": "split2", **tma},
    ]  # fmt: skip
    # no FP8 tensor cores nor TMA on sm80: no pre-quantized x, no TMA kernel
    sm80 = space_for(qkv, load_profile("sm80"))
    assert sm80.alternatives() == [{**sm80.default(), **tiles}]
    assert sm80.choices()["tma"] == [False] and sm80.choices()["block_k"] == [128]
    # dense bf16 on sm90: the TMA kernel in chunks of 128 inputs (256 bytes)
    dense = space_for(LinearShape(16, 5120, 6144, "bf16"), load_profile("sm90"))
    assert {**dense.default(), **stream, "grid": "tile", "block_k": 128, "tma": True} in dense.alternatives()
    assert dense.limits({**dense.default(), "tma": True, "block_k": 256}) == (
        "the TMA kernel fetches at most 256 bytes of a row per tile"
    )
    assert sm90.limits({**default, "tma": True, "prequant_x": True, "fp8_dot": True}) == (
        "the TMA kernel is its own variant (FP8 weights quantize x per token)"
    )
    int4 = space_for(LinearShape(16, 34816, 5120, "int4_sym", "swiglu"), load_profile("sm90"))
    changed = [{k for k in p if p[k] != int4.default()[k]} for p in int4.alternatives()]
    assert {"prequant_x"} in changed and {"int4_chunk_dot"} in changed
    for space in (sm90, sm80, int4):
        assert all(space.check(p) is None and p != space.default() for p in space.alternatives())
    # a call whose default is the vendor GEMM has no Triton alternatives
    assert space_for(LinearShape(256, 5120, 4096, "bf16", "residual"), load_profile("sm90")).alternatives() == []


def test_a_batched_study_prepares_every_point_before_it_is_measured(tmp_path):
    batches, measured = [], []

    def prepare(points):
        batches.append([(p["x"], p["y"]) for p in points])

    def measure(params):
        point = (params["x"], params["y"])
        assert batches and point in batches[-1], "measured a point its batch did not prepare"
        measured.append(point)
        return toy_time(params)

    study = optimize(ToySpace(), measure, storage=open_storage(tmp_path / "toy.journal"), study_name="toy",
                     n_trials=16, seed=0, prepare=prepare, batch=4)  # fmt: skip
    assert len(measured_points(study)) == 16 and len(measured) == len(set(measured)) == 16
    assert all(1 <= len(b) <= 4 and len(set(b)) == len(b) for b in batches)
    assert len(batches) < 16  # batched: fewer prepare calls than measurements
    best = best_trial(study)
    assert (best.params["x"], best.params["y"], best.value) == (3, 1, 1.0)
    with pytest.raises(DFlashError, match="parameter 'batch' must be >= 1"):
        optimize(ToySpace(), toy_time, storage=open_storage(tmp_path / "b.journal"), study_name="b", n_trials=2,
                 batch=0)  # fmt: skip


def test_a_sqlite_study_resumes(tmp_path):
    storage = open_storage(tmp_path / "toy.db")  # SQLite through RDBStorage
    first = optimize(ToySpace(), toy_time, storage=storage, study_name="toy", n_trials=2)
    assert len(measured_points(first)) == 2
    again = optimize(ToySpace(), toy_time, storage=open_storage(tmp_path / "toy.db"), study_name="toy", n_trials=4)
    assert len(measured_points(again)) == 4 and again.trials[0].params == first.trials[0].params


def test_failing_and_wrong_configs_are_never_chosen(tmp_path):
    def measure(params):
        point = (params["x"], params["y"])
        if point == (3, 1):
            raise ConfigFailed("launch failed: OutOfResources")
        if point == (3, 2):
            raise ConfigFailed("wrong result: relative error 0.5 over 0.01")
        return toy_time(params)

    study = optimize(ToySpace(), measure, storage=open_storage(tmp_path / "toy.journal"), study_name="toy",
                     n_trials=30, seed=1)  # fmt: skip
    assert len(measured_points(study)) == 24  # the whole feasible space: 25 points less (4, 4)
    failed = {(t.params["x"], t.params["y"]): t.user_attrs["error"] for t in study.trials if t.state.name == "FAIL"}
    assert failed[(3, 1)].startswith("launch failed") and failed[(3, 2)].startswith("wrong result")
    best = best_trial(study)
    assert (best.params["x"], best.params["y"]) in ((2, 1), (4, 1), (3, 0)) and best.value == 2.0


def test_resuming_an_interrupted_study(tmp_path):
    """A worker killed in the middle of its fourth trial; the next run fails that trial, measures its point again
    and stops at N measured points in all."""
    journal = tmp_path / "study.journal"
    script = tmp_path / "worker.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, sys
            sys.path[:0] = [{str(ROOT)!r}, {str(Path(__file__).parent)!r}]
            from test_tuning import ToySpace, toy_time
            from dflash_compiler.tuning.study import open_storage, optimize
            calls = []
            def measure(params):
                calls.append(params)
                if len(calls) == 4:
                    os._exit(9)  # killed mid-trial: the trial stays RUNNING in the storage
                return toy_time(params)
            optimize(ToySpace(), measure, storage=open_storage({str(journal)!r}), study_name="toy", n_trials=10)
            """
        )
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    storage = open_storage(journal)
    killed = optuna.load_study(study_name="toy", storage=storage)
    assert len(measured_points(killed)) == 3 and killed.trials[-1].state.name == "RUNNING"
    interrupted = killed.trials[-1]

    study = optimize(ToySpace(), toy_time, storage=storage, study_name="toy", n_trials=10)
    assert len(measured_points(study)) == 10
    trial = study.trials[interrupted.number]
    assert trial.state.name == "FAIL" and trial.user_attrs["interrupted"]
    (again,) = [t for t in study.trials if t.user_attrs.get("requeued_from") == interrupted.number]
    assert again.params == interrupted.params and again.state.name == "COMPLETE"
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials if t.state.name == "COMPLETE"}) == 10


def test_a_shared_study_leaves_live_workers_trials_alone(tmp_path):
    from dflash_compiler.tuning.study import WORKER, fail_dead_trials

    storage = open_storage(tmp_path / "shared.journal")
    study = optuna.create_study(study_name="toy", storage=storage)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    workers = {"live here": WORKER, "dead here": f"{WORKER.rpartition(':')[0]}:{dead.pid}", "elsewhere": "gpu-7:1"}
    trials = {}
    for name, worker in workers.items():
        trials[name] = study.ask({"x": optuna.distributions.CategoricalDistribution([1, 2])})
        trials[name].set_user_attr("worker", worker)
    assert fail_dead_trials(study, storage) == 1
    states = {name: study.trials[t.number].state.name for name, t in trials.items()}
    assert states == {"live here": "RUNNING", "dead here": "FAIL", "elsewhere": "RUNNING"}
    assert [t.state.name for t in study.trials[3:]] == ["WAITING"]  # the dead worker's point, queued again


def test_a_winner_by_noise_is_not_chosen():
    from dflash_compiler.tuning.kernels import _confirm

    space = ToySpace()
    best, default = {"lowering": "triton", "x": 3, "y": 1}, space.default()
    again = {"best": [9.0, 8.0, 30.0], "default": [5.0, 6.0, 4.0]}  # the study's winner, timed again, is slower
    case = SimpleNamespace(measure=lambda lowering, config: again["best" if config["x"] == 3 else "default"].pop(0))
    assert _confirm(case, space, best, default, "cuda") == (default, 5.0, 5.0)
    again = {"best": [2.0], "default": [5.0]}
    assert _confirm(case, space, best, default, "cpu") == (best, 2.0, 5.0)

    def fails(lowering, config):
        if config["x"] == 3:
            raise ConfigFailed("launch failed: flaky")
        return 5.0

    assert _confirm(SimpleNamespace(measure=fails), space, best, default, "cpu") == (default, 5.0, 5.0)


# ---- measurement on the real kernels (Triton interpreter) --------------------------------------------------------


def test_measurement_checks_every_config_against_the_reference():
    case = LinearCase(LinearShape(5, 48, 256, "int4_sym", "residual", "fp16"), load_profile("cpu"), "cpu")
    space = space_for(case.shape, case.profile)
    lowering, config = space.config(space.default())
    assert case.measure(lowering, config) > 0
    with pytest.raises(ConfigFailed, match="launch failed: ValueError: config: block_k must be 128"):
        case.measure("triton", {**config, "block_k": 64})

    run = case.run

    def drops_a_row(lowering, config, i):  # a kernel that leaves its last output row unwritten
        out = run(lowering, config, i)
        if lowering == "triton" and config["block_n"] == 16:
            out[-1] = float("nan")
        return out

    case.run = drops_a_row
    with pytest.raises(ConfigFailed, match="wrong result: relative error inf"):
        case.measure("triton", {**config, "block_n": 16})
    assert case.measure("triton", {**config, "block_n": 32}) > 0

    # the verify makes a pending block current first: its output, the state and the new update rows are checked
    verify = make_case(GDNShape(3, 5, 2, 4, 16, 32, "fp32"), load_profile("cpu"), "cpu")
    for config in ({"block_v": 16, "num_warps": 1}, {"algorithm": "chunked", "block_v": 16, "precision": "ieee"},
                   {"algorithm": "factored", "block_v": 32, "precision": "tf32x3", "factor_warps": 1},
                   {"algorithm": "factored", "block_v": 32, "precision": "tf32x3", "num_stages": 1}):  # fmt: skip
        assert verify.measure("triton", config) > 0
    run_verify = verify.run

    def loses_a_state(lowering, config, i):
        o, state, rows = run_verify(lowering, config, i)
        if lowering == "triton":
            state[2] = 0.0
        return o, state, rows

    verify.run = loses_a_state
    with pytest.raises(ConfigFailed, match="wrong result: state: relative error"):
        verify.measure("triton", {"block_v": 32, "num_warps": 2})
    with pytest.raises(ConfigFailed, match="launch failed: ValueError: block_v: 64 must be a power of two"):
        verify.measure("triton", {"block_v": 64, "num_warps": 2})
    draft = make_case(DraftAttentionShape(2, 4, 4, 2, 16, 70, "fp16"), load_profile("cpu"), "cpu")
    space = space_for(draft.shape, draft.profile)
    assert draft.measure(*space.config({**space.default(), "num_splits": 2})) > 0
    conv = make_case(ConvShape(3, 5, 100, 4, "fp32"), load_profile("cpu"), "cpu")
    conv_space = space_for(conv.shape, conv.profile)
    assert conv.measure(*conv_space.config(conv_space.default())) > 0
    assert conv.measure("triton", {"block_t": 2, "block_c": 128, "num_warps": 4}) > 0
    with pytest.raises(ConfigFailed, match="launch failed: ValueError: block_c: 24 must be a power of two"):
        conv.measure("triton", {"block_t": 2, "block_c": 24, "num_warps": 1})
    chunked = make_case(GDNChunkedShape(1, 40, 2, 4, 16, 32, "fp32"), load_profile("cpu"), "cpu")
    assert chunked.measure("triton", {"chunk_size": 16, "block_v": 32, "precision": "ieee"}) > 0
    with pytest.raises(ConfigFailed, match="launch failed: ValueError: chunk_size: 8 not in 16/32/64/128"):
        chunked.measure("triton", {"chunk_size": 8, "block_v": 32, "precision": "ieee"})


def test_a_point_that_faults_the_gpu_stops_the_study_and_is_never_run_again(tmp_path):
    """A measurement that faults the GPU (the CUDA context is lost) marks its point failed and stops the study with
    a one-line error naming it; the resumed study answers that point from its failed trial and finishes without it.
    A point that faulted in a compile worker is marked failed without being measured."""
    from dflash_compiler.tuning.measure import DeviceFault, is_device_fault

    assert is_device_fault("CUDA error: an illegal memory access was encountered") and not is_device_fault("OOM")
    storage, runs = open_storage(tmp_path / "toy.journal"), []

    def faulting(params):
        runs.append((params["x"], params["y"]))
        if (params["x"], params["y"]) == (3, 1):
            raise DeviceFault("launch faulted the GPU: AcceleratorError: CUDA error: an illegal memory access")
        return toy_time(params)

    with pytest.raises(DFlashError, match=r"^study toy: config .*'x': 3, 'y': 1.* launch faulted the GPU: .*resume"):
        optimize(ToySpace(), faulting, storage=storage, study_name="toy", n_trials=24, seed=0)
    failed = [t for t in measured_points(optuna.load_study(study_name="toy", storage=storage)).values()
              if t.state == optuna.trial.TrialState.FAIL]  # fmt: skip
    assert [(t.params["x"], t.params["y"]) for t in failed] == [(3, 1)]
    runs.clear()
    study = optimize(ToySpace(), faulting, storage=storage, study_name="toy", n_trials=24, seed=0)
    assert (3, 1) not in runs and len(measured_points(study)) == 24
    assert best_trial(study).value == 2.0  # the best point left: one step from (3, 1)

    measured = []

    def prepare(points):
        return ["AcceleratorError: CUDA error: an illegal memory access" if (p["x"], p["y"]) == (0, 0) else None
                for p in points]  # fmt: skip

    def measure(params):
        measured.append((params["x"], params["y"]))
        return toy_time(params)

    study = optimize(ToySpace(), measure, storage=open_storage(tmp_path / "b.journal"), study_name="b", n_trials=6,
                     seed=0, prepare=prepare, batch=3)  # fmt: skip
    default = next(t for t in study.trials if t.user_attrs.get("default"))
    assert default.state == optuna.trial.TrialState.FAIL and (0, 0) not in measured
    assert default.user_attrs["error"].startswith("faulted the GPU in a compile worker: AcceleratorError")


def test_the_precompiler_runs_each_triton_point_in_a_worker(tmp_path):
    """Workers run a batch's Triton points once on a one-set case (here through the interpreter) and report the
    failures; tune_call with them chooses what it chooses without them."""
    from dflash_compiler.tuning.kernels import tune_call
    from dflash_compiler.tuning.precompile import Precompiler

    profile = load_profile("cpu")
    shape = LinearShape(5, 48, 256, "int4_sym", "residual", "fp16")
    space = space_for(shape, profile)
    good = space.default()
    bad = {**good, "block_k": 64}  # int4 needs block_k 128: the launcher refuses it
    with Precompiler(2, profile, "cpu") as pre:
        errors = pre.prepare(shape, space, [good, bad, {"lowering": "reference"}])
        assert errors[0] is None and errors[1].startswith("ValueError: config: block_k must be 128")
        assert len(errors) == 3 and errors[2] is None  # the reference lowering compiles nothing
        entry, study = tune_call(shape, profile, open_storage(tmp_path / "t.journal"), 4, "cpu", precompiler=pre)
    assert entry.trials == 4 == len(measured_points(study)) and entry.tuned
    assert (
        make_case(shape, profile, "cpu").rotations == 2
        and make_case(shape, profile, "cpu", max_rotations=1).rotations == 1
    )


def test_a_fresh_study_replaces_the_database_entry_and_a_finished_one_keeps_it(tmp_path):
    """The entry of a study that measured nothing new is the database's as it was; a new study of as many trials
    (another storage) is a new measurement and gives its own entry, even with the old entry's trial count."""
    import dataclasses

    from dflash_compiler.tuning.kernels import tune_call

    profile = load_profile("cpu")
    shape = LinearShape(3, 40, 128, "fp16", "none", "fp16")
    first, _ = tune_call(shape, profile, open_storage(tmp_path / "a.journal"), 3, "cpu")
    again, _ = tune_call(shape, profile, open_storage(tmp_path / "a.journal"), 3, "cpu", previous=first)
    assert again is first
    stale = dataclasses.replace(first, config={**first.config, "num_stages": 7}, time_us=1e-3)
    fresh, study = tune_call(shape, profile, open_storage(tmp_path / "b.journal"), 3, "cpu", previous=stale)
    assert fresh is not stale and fresh.trials == 3 == len(measured_points(study)) and fresh.time_us > 1e-3
    # a new study is seeded with the database's choice where the space holds it, beside the default
    space = space_for(shape, profile)
    known = next(p for p in space.feasible() if p != space.default() and p["lowering"] == "triton")
    lowering, config = space.config(known)
    assert space.point(lowering, config) == known and space.point(lowering, {**config, "num_stages": 7}) is None
    entry = dataclasses.replace(first, lowering=lowering, config=config)
    _, seeded = tune_call(shape, profile, open_storage(tmp_path / "c.journal"), 3, "cpu", previous=entry)
    assert [t.params for t in seeded.trials if t.user_attrs.get("seed")] == [known]


def test_an_entry_holding_the_default_is_confirmed_again_beside_the_studys_other_winner(tmp_path, monkeypatch):
    """A database entry that holds the default (an earlier confirmation's choice) does not stand for a finished
    study whose winner is another point: the winner is timed against the default again and chosen if faster; an
    entry holding the study's winner is kept as it is."""
    import dataclasses

    from dflash_compiler.tuning import kernels

    profile = load_profile("cpu")
    shape = LinearShape(3, 40, 128, "fp16", "none", "fp16")
    space = space_for(shape, profile)
    default = space.config(space.default())

    class TimedByConfig:  # every point but the default takes half its time
        def measure(self, lowering, config):
            return 1.0 if (lowering, config) == default else 0.5

        def torch_time_us(self):
            return 2.0

    monkeypatch.setattr(kernels, "make_case", lambda *args, **kwargs: TimedByConfig())
    first, _ = kernels.tune_call(shape, profile, open_storage(tmp_path / "a.journal"), 3, "cpu")
    assert (first.lowering, first.config) != default and first.time_us == 0.5
    held_default = dataclasses.replace(first, lowering=default[0], config=default[1], time_us=1.0)
    again, _ = kernels.tune_call(shape, profile, open_storage(tmp_path / "a.journal"), 3, "cpu", previous=held_default)
    assert again is not held_default and (again.lowering, again.config, again.time_us) == (
        first.lowering, first.config, 0.5,
    )  # fmt: skip
    kept, _ = kernels.tune_call(shape, profile, open_storage(tmp_path / "a.journal"), 3, "cpu", previous=first)
    assert kept is first


# ---- the runtime study on the tiny pair --------------------------------------------------------------------------


def test_runtime_study_three_trials_on_the_tiny_pair(tmp_path):
    from dflash_compiler.runtime.engine import DEFAULT_PAIR, load_tokenizer
    from dflash_compiler.tuning.runtime import (
        RuntimeSpace,
        checkpoint_models,
        pair_throughput,
        runtime_study,
        widths_table,
    )

    tok = load_tokenizer(DEFAULT_PAIR / "target")
    lines = (DEFAULT_PAIR / "heldout_prompts.jsonl").read_text().splitlines()[:2]
    prompts = [tok.encode(json.loads(line)["prompt"], add_special_tokens=False)[:8] for line in lines]
    models = checkpoint_models(DEFAULT_PAIR / "target", DEFAULT_PAIR / "drafter")
    throughput = pair_throughput(models, prompts, max_new_tokens=3, max_batch=2, max_seq_len=128)
    space = RuntimeSpace([1, 2], 16, widths=[4])  # each width's step graph is lowered once, on one runner
    study = runtime_study(space, throughput, storage=open_storage(tmp_path / "rt.journal"), study_name="rt",
                          n_trials=3)  # fmt: skip
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    default = study.trials[0]
    assert default.params == {"width_c1": 16, "width_c2": 16, "graph_buckets": "default", "prefill_chunk": 512}
    for t in study.trials:
        per_level = t.user_attrs["tokens_per_s"]
        assert set(per_level) == {"1", "2"} and min(per_level.values()) > 0
        assert t.value == pytest.approx(sum(per_level.values()) / 2)
    assert study.best_trial.value >= default.value
    table = widths_table(study, space)
    assert table[1][16] >= default.user_attrs["tokens_per_s"]["1"]
    config = space.config(study.best_params)
    assert config.width(1) == study.best_params["width_c1"] and config.width(9) == study.best_params["width_c2"]
    assert space.widths == [4, 16]
    with pytest.raises(DFlashError, match=r"parameter 'widths' must lie in 1..16 \(the drafter's block\), got \[32\]"):
        RuntimeSpace([1], 16, widths=[32])


def test_the_runtime_study_measures_every_width_then_composes_the_best_per_bucket(tmp_path):
    """A toy throughput in which each level's tokens/s depends on its own width alone, with a different best width
    per level: after the default and one trial per width, the chosen config holds each level's best."""
    from dflash_compiler.tuning.runtime import RuntimeSpace, chosen_config, runtime_study

    best_width = {1: 16, 8: 4, 16: 8, 3: 4, 4: 8}

    def throughput(config, concurrencies):
        return {c: 100.0 * c - abs(config.width(c) - best_width[c]) for c in concurrencies}

    space = RuntimeSpace([1, 8, 16], 16, widths=[4, 8], prefill_chunks=[512])
    study = runtime_study(space, throughput, storage=open_storage(tmp_path / "rt.journal"), study_name="rt",
                          n_trials=3)  # fmt: skip
    assert [sorted({v for k, v in t.params.items() if k.startswith("width")}) for t in study.trials] == [[16], [8], [4]]
    assert {t.params["prefill_chunk"] for t in study.trials} == {512}
    config, value = chosen_config(study, space, max_batch=16)
    assert [config.width(c) for c in (1, 8, 16)] == [16, 4, 8]  # no single trial held this point
    assert value == pytest.approx((100 + 800 + 1600) / 3) and value > study.best_value
    # levels 3 and 4 share bucket 4 (default buckets 1, 2, 4, ...): their best widths differ, so they keep the
    # best trial's
    shared = RuntimeSpace([3, 4], 16, widths=[4, 8], prefill_chunks=[512])
    study = runtime_study(shared, throughput, storage=open_storage(tmp_path / "rt2.journal"), study_name="rt2",
                          n_trials=3)  # fmt: skip
    config, value = chosen_config(study, shared, max_batch=4)
    assert config.width(3) == config.width(4) == study.best_params["width_c3"]
    assert value == pytest.approx(study.best_value)
    with pytest.raises(DFlashError, match=r"parameter 'prefill_chunks' must list chunk sizes >= 1, got \[0\]"):
        RuntimeSpace([1], 16, prefill_chunks=[0])


def test_the_steady_objective_times_a_full_batch_and_cancels_it(monkeypatch):
    import itertools

    from dflash_compiler.runtime.engine import DEFAULT_PAIR
    from dflash_compiler.tuning import runtime
    from dflash_compiler.tuning.runtime import STEADY_WARMUP, RuntimeConfig, checkpoint_models, pair_throughput

    # one second between the timer's readings: the steady figure is then tokens per timed window
    clock = itertools.count()
    monkeypatch.setattr(runtime, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    models = checkpoint_models(DEFAULT_PAIR / "target", DEFAULT_PAIR / "drafter")
    steps, block = 3, 16
    budget = (STEADY_WARMUP + steps + 1) * block
    config = RuntimeConfig(((1, 4), (2, 4)), "default", 512)
    real = pair_throughput(models, [[5, 6, 7], [8, 9]], max_new_tokens=budget, max_batch=2, max_seq_len=128,
                           steady_steps=steps)  # fmt: skip
    per_level = real(config, [1, 2])
    # real acceptance: the tokens committed, between one and the width (4) per request and step
    assert set(per_level) == {1, 2}
    assert all(steps * c <= per_level[c] <= 4 * steps * c for c in (1, 2))
    simulated = pair_throughput(models, [[5, 6, 7], [8, 9]], max_new_tokens=budget, max_batch=2, max_seq_len=128,
                                steady_steps=steps, acceptance_profile=[0.5] * 15)  # fmt: skip
    # at the profile's mean for width 4: 1 + 3 x 0.5 tokens per request and step
    assert simulated(config, [1, 2]) == {1: 2.5 * steps, 2: 2 * 2.5 * steps}
    # a budget the timed steps can run out of is refused, not measured short
    short = pair_throughput(models, [[5, 6, 7]], max_new_tokens=4, max_batch=1, max_seq_len=64, steady_steps=steps)
    with pytest.raises(DFlashError, match=r"parameter 'max_new_tokens': 4 tokens per request ran out during the 2 \+ "
                       r"3 steady steps at concurrency 1"):  # fmt: skip
        short(RuntimeConfig(((1, 16),), "default", 512), [1])
    with pytest.raises(DFlashError, match=r"parameter 'steady_steps' must be >= 0, got -1"):
        pair_throughput(models, [[5]], max_new_tokens=4, max_batch=1, steady_steps=-1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_runtime_study_frees_each_runner_before_building_the_next(device):
    """Each runner is gone before the next one's models are built (a 27B study ran out of memory on its third
    runner while the earlier ones' weights were still held)."""
    import weakref

    from dflash_compiler.runtime.engine import DEFAULT_PAIR
    from dflash_compiler.tuning.runtime import RuntimeConfig, RuntimeSpace, checkpoint_models, pair_throughput

    load = checkpoint_models(DEFAULT_PAIR / "target", DEFAULT_PAIR / "drafter", device=device)
    built = []

    def models(drafter: bool = True):
        # what is still alive when the next runner's models are built: the study holds one runner at a time
        alive = [ref for ref in built if ref() is not None]
        assert not alive, f"{len(alive)} earlier targets still alive while a new runner is built"
        target, draft = load(drafter)
        built.append(weakref.ref(target))
        return target, draft

    throughput = pair_throughput(models, [[5, 6, 7]], max_new_tokens=3, max_batch=2, max_seq_len=64)
    speculative, autoregressive = ((1, 4), (2, 4)), ((1, 1), (2, 1))
    for widths, buckets in ((speculative, "default"), (autoregressive, "default"), (speculative, "pow2"),
                            (speculative, "pow2")):  # fmt: skip
        per_level = throughput(RuntimeConfig(widths, buckets, 256), [1, 2])
        assert set(per_level) == {1, 2} and min(per_level.values()) > 0
    assert len(built) == 3  # the last config reuses the third runner
    # the bucket sets a study may choose among, checked by name
    space = RuntimeSpace([1], 16, graph_bucket_sets=["pow2"])
    assert space.graph_bucket_sets == ["pow2"] and space.default()["graph_buckets"] == "pow2"
    with pytest.raises(DFlashError, match=r"parameter 'graph_buckets' must name sets among .*got \['coarse'\]"):
        RuntimeSpace([1], 16, graph_bucket_sets=["coarse"])


def test_the_engine_verifies_at_the_tuned_widths(tmp_path, monkeypatch):
    from dflash_compiler.hw_profiles import database
    from dflash_compiler.models.config import TargetConfig
    from dflash_compiler.runtime import Engine
    from dflash_compiler.runtime.engine import DEFAULT_PAIR
    from dflash_compiler.tuning.choice import runtime_model_key, tuned_verify_widths

    tiny = runtime_model_key(TargetConfig.from_dir(DEFAULT_PAIR / "target"))
    assert tiny == "qwen3_5_text-h256-l8-v4096"
    db = TuningDB.load("cpu", tmp_path)
    base = dict(op="runtime", lowering="reference", tuned=True, device="cpu (x86_64)", platform="cpu")
    db.record(Entry(shape_key=f"{tiny}_c1-2", fmt="bf16", config={"widths": {"1": 16, "2": 8}}, date="2026-11-30",
                    **base))  # fmt: skip
    db.record(Entry(shape_key=f"{tiny}_c2-4", fmt="bf16", config={"widths": {"2": 6, "4": 4}}, date="2026-12-01",
                    **base))  # fmt: skip
    db.record(Entry(shape_key=f"{tiny}_c1", fmt="fp8", config={"widths": {"1": 2}}, date="2026-12-01", **base))
    db.save()
    # the later study's answer for batch size 2 replaces the earlier one's
    assert tuned_verify_widths(tiny, "bf16", "cpu", tmp_path) == {1: 16, 2: 6, 4: 4}
    assert tuned_verify_widths(tiny, "int4", "cpu", tmp_path) is None
    monkeypatch.setattr(database, "PROFILE_DIR", tmp_path)
    engine = Engine.from_pretrained(runtime="batched", max_batch=4, max_seq_len=96, verify_width="tuned")
    try:
        assert engine.serving.runner.verify_widths == {1: 16, 2: 6, 4: 4}
    finally:
        engine.close()
    # the default on the batched runtime at the drafter's block; a block of the caller's own is verified whole
    for block, widths in ((None, {1: 16, 2: 6, 4: 4}), (16, {1: 16, 2: 6, 4: 4}), (8, {1: 8, 2: 8, 4: 8})):
        engine = Engine.from_pretrained(runtime="batched", max_batch=4, max_seq_len=96, block_size=block)
        try:
            assert engine.serving.runner.verify_widths == widths
        finally:
            engine.close()
    db.record(Entry(shape_key=f"{tiny}_c8", fmt="bf16", config={"widths": [8]}, date="2026-12-02", **base))
    db.save()
    with pytest.raises(DFlashError, match=rf"runtime.jsonl: entry {tiny}_c8 bf16: field 'config.widths' must be an"):
        tuned_verify_widths(tiny, "bf16", "cpu", tmp_path)


def test_missing_tuned_widths_warn_only_when_asked_for(tmp_path, caplog):
    import logging

    from dflash_compiler.models.config import TargetConfig
    from dflash_compiler.runtime.engine import DEFAULT_PAIR
    from dflash_compiler.tuning import choice

    cfg = TargetConfig.from_dir(DEFAULT_PAIR / "target")
    with caplog.at_level(logging.INFO, logger=choice.log.name):
        assert choice.tuned_widths_or_block(cfg, "bf16", "cpu", asked=False) is None
        assert choice.tuned_widths_or_block(cfg, "bf16", "cpu") is None
    assert [r.levelname for r in caplog.records] == ["INFO", "WARNING"]
    assert "no runtime study of qwen3_5_text-h256-l8-v4096 in bf16 on profile cpu" in caplog.records[1].getMessage()


def test_batch_runner_runs_at_its_bucket_set():
    from dflash_compiler.models.loader import load_target
    from dflash_compiler.runtime.batch import BatchRunner
    from dflash_compiler.runtime.engine import DEFAULT_PAIR

    target = load_target(DEFAULT_PAIR / "target", dtype=torch.float32)
    runner = BatchRunner(target, None, max_batch=6, max_seq_len=64, buckets=(1, 4, 8))
    assert runner.buckets == (1, 4, 6)
    with pytest.raises(DFlashError, match="parameter 'buckets' must be positive batch sizes"):
        BatchRunner(load_target(DEFAULT_PAIR / "target", dtype=torch.float32), None, max_seq_len=64, buckets=(0,))


# ---- dflash-tune end to end --------------------------------------------------------------------------------------


def test_dflash_tune_end_to_end_on_the_tiny_pair(tmp_path, capsys):
    from dflash_compiler.tuning.cli import main

    args = ["--gpu", "cpu", "--shapes", "tiny", "--ops", "target.mlp.down", "--batches", "1", "--trials", "2",
            "--storage", str(tmp_path / "tune.journal"), "--db", str(tmp_path / "db")]  # fmt: skip
    runtime = ["--runtime", "--runtime-trials", "1", "--concurrency", "1", "--max-new-tokens", "2"]
    assert main(args + runtime) == 0
    out = capsys.readouterr().out
    assert "target.mlp.down" in out and "m16_n256_k768_residual_xfp32" in out
    assert "concurrency 1: width 16 chosen; tokens/s width 16:" in out
    db = TuningDB.load("cpu", tmp_path / "db")
    (run,) = db.entries("runtime")
    assert (
        run.shape_key == "qwen3_5_text-h256-l8-v4096_c1"
        and run.config["widths"] == {"1": 16}
        and run.metrics["tokens_per_s"] > 0
    )
    (entry,) = db.entries("linear")
    assert (entry.op, entry.shape_key, entry.fmt, entry.platform) == (
        "linear",
        "m16_n256_k768_residual_xfp32",
        "fp32",
        "cpu",
    )
    assert entry.tuned and entry.trials == 2 and entry.time_us <= entry.default_time_us
    assert entry.torch_time_us > 0 and entry.versions["triton"]
    pngs = sorted(p.name for p in (tmp_path / "tune-plots").glob("cpu_linear*.png"))
    assert pngs == [f"cpu_linear_m16_n256_k768_residual_xfp32_fp32-{kind}.png" for kind in ("history", "importance")]
    assert (tmp_path / "tune-plots" / "cpu_runtime_qwen3_5_text-h256-l8-v4096_bf16-tokens-per-s.png").is_file()
    # a second run resumes the finished study: nothing new is measured
    assert main(args) == 0
    study = optuna.load_study(study_name="cpu:linear:m16_n256_k768_residual_xfp32:fp32",
                              storage=open_storage(tmp_path / "tune.journal"))  # fmt: skip
    assert len(measured_points(study)) == 2
    assert TuningDB.load("cpu", tmp_path / "db").entries("linear")[0].time_us == entry.time_us


def test_dflash_tune_at_the_rows_of_autoregressive_decoding(tmp_path, capsys):
    from dflash_compiler.tuning.cli import main

    args = ["--gpu", "cpu", "--shapes", "tiny", "--ops", "target.mlp.down", "--batches", "1", "--trials", "1",
            "--storage", str(tmp_path / "tune.journal"), "--db", str(tmp_path / "db")]  # fmt: skip
    assert main([*args, "--block-size", "1"]) == 0
    (entry,) = TuningDB.load("cpu", tmp_path / "db").entries("linear")
    assert entry.shape_key == "m1_n256_k768_residual_xfp32" and entry.tuned
    capsys.readouterr()
    assert main([*args, "--block-size", "17"]) == 2
    assert "parameter 'block-size' must be in 1..16, got 17" in capsys.readouterr().err
    assert main([*args, "--compile-workers", "-1"]) == 2
    assert "parameter 'compile-workers' must be >= 0, got -1" in capsys.readouterr().err


def test_the_runtime_study_on_random_weights_at_a_configs_shapes(tmp_path, capsys):
    """Config files alone (as the qwen3.5-27b preset ships them): the study builds seeded random weights and draws
    acceptance from a published profile."""
    import shutil

    from dflash_compiler.runtime.engine import DEFAULT_PAIR
    from dflash_compiler.tuning.cli import main

    for part in ("target", "drafter"):
        (tmp_path / part).mkdir()
        shutil.copy(DEFAULT_PAIR / part / "config.json", tmp_path / part / "config.json")
    args = ["--gpu", "cpu", "--target", str(tmp_path / "target"), "--drafter", str(tmp_path / "drafter"),
            "--ops", "target.mlp.down", "--batches", "1", "--trials", "1", "--storage", str(tmp_path / "t.journal"),
            "--db", str(tmp_path / "db"), "--runtime", "--runtime-trials", "2", "--concurrency", "1,2",
            "--widths", "4", "--max-new-tokens", "6"]  # fmt: skip
    assert main(args) == 2
    assert "without checkpoint weights the study runs random weights, which need --acceptance-profile" in (
        capsys.readouterr().err
    )
    assert main([*args, "--acceptance-profile", "humaneval_bf16_vllm", "--runtime-only"]) == 0
    assert not TuningDB.load("cpu", tmp_path / "db").entries("linear")  # the runtime study alone
    (run,) = TuningDB.load("cpu", tmp_path / "db").entries("runtime")
    assert run.shape_key == "qwen3_5_text-h256-l8-v4096_c1-2" and set(run.config["widths"]) == {"1", "2"}
    assert run.metrics["tokens_per_s"] > 0 and run.trials == 2 and run.metrics["steady_steps"] == 0
    # the steady objective, in a study of its own: the budget follows from the steps, the chunk stays 512
    steady = [a for a in args if a not in ("--max-new-tokens", "6")]
    steady[steady.index(str(tmp_path / "t.journal"))] = str(tmp_path / "steady.journal")
    assert main([*steady, "--acceptance-profile", "humaneval_bf16_vllm", "--runtime-only", "--steady-steps", "2"]) == 0
    runs = TuningDB.load("cpu", tmp_path / "db").entries("runtime")
    (run,) = [r for r in runs if r.metrics["steady_steps"] == 2]
    assert run.config["prefill_chunk"] == 512 and run.metrics["tokens_per_s"] > 0
    assert {k for k in run.metrics if k.startswith("tokens_per_s_c")} == {
        f"tokens_per_s_c{c}_w{w}" for c in (1, 2) for w in (4, 16)
    }
    assert main([*steady, "--acceptance-profile", "humaneval_bf16_vllm", "--runtime-only", "--steady-steps", "-1"]) == 2
    assert "parameter 'steady-steps' must be >= 0, got -1" in capsys.readouterr().err
    capsys.readouterr()
    assert main([*args, "--acceptance-profile", "mmlu"]) == 2
    assert "parameter 'acceptance-profile': 'mmlu' is not one of humaneval_bf16_vllm" in capsys.readouterr().err
    assert main([a for a in args if a != "--runtime"] + ["--runtime-only"]) == 2
    assert "parameter 'runtime-only': it needs --runtime" in capsys.readouterr().err


def test_dflash_tune_refuses_a_profile_without_its_gpu(tmp_path, capsys):
    from dflash_compiler.tuning.cli import main

    assert main(["--gpu", "sm90", "--storage", str(tmp_path / "s.journal")]) == 2
    assert capsys.readouterr().err.strip() == (
        "dflash-tune: parameter 'gpu': profile sm90 needs its GPU, and CUDA is not available"
    )
    assert main(["--gpu", "cpu", "--ops", "nothing", "--storage", str(tmp_path / "s.journal")]) == 2
    assert "parameter 'ops': 'nothing' names no op or call" in capsys.readouterr().err
    args = ["--gpu", "cpu", "--shapes", "qwen3.5-27b", "--runtime", "--storage", str(tmp_path / "s.journal")]
    assert main(args) == 2
    assert "without checkpoint weights the study runs random weights, which need --acceptance-profile" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "s.journal").exists()  # refused before anything ran


# ---- on the GPU --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_tuning_linears_on_the_gpu(tmp_path):
    from dflash_compiler.tuning.kernels import tune_call

    profile = load_profile("auto")
    storage = open_storage(tmp_path / "gpu.journal")
    formats = ["bf16", "int4_sym"] + (["fp8_channel"] if profile.fp8_tensor_cores else [])
    for fmt in formats:
        shape = LinearShape(16, 4096, 4096, fmt, "residual")
        entry, study = tune_call(shape, profile, storage, 6, torch.device("cuda"))
        assert entry.platform == "cuda" and entry.device == torch.cuda.get_device_name()
        assert entry.tuned and entry.trials == 6 and entry.time_us <= entry.default_time_us
        assert entry.torch_time_us > 0 and entry.versions["cuda"]


@pytest.mark.gpu
def test_dflash_tune_on_the_gpu(tmp_path):
    from dflash_compiler.tuning.cli import main

    args = ["--gpu", "auto", "--shapes", "tiny", "--quant", "fp8", "--ops", "linear", "verify_attention",
            "--batches", "1,4", "--trials", "4", "--storage", str(tmp_path / "t.journal"), "--db", str(tmp_path),
            "--runtime", "--runtime-trials", "3", "--concurrency", "1,4"]  # fmt: skip
    assert main(args) == 0
    db = TuningDB.load(load_profile("auto"), tmp_path)
    assert {e.platform for e in db.entries()} == {"cuda"} and db.entries("runtime")
    assert all(e.time_us <= e.default_time_us for e in db.entries("linear") if e.default_time_us)
