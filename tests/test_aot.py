"""Ahead-of-time Triton (codegen/triton/aot.py) on a host without a GPU.

Cross-compilation needs Triton's compiler, not its interpreter, so it runs in a subprocess without TRITON_INTERPRET
(one for the four profiles, one for the load). The load runs on a stand-in for the GPU (Triton's driver answers for
sm_90, launches are left out): the preload, the disk-cache lookups and the in-memory keys are the real ones, which
is what "nothing is compiled at load" rests on; tests/test_gpu_aot.py runs the same on the GPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
from triton import knobs

from dflash_compiler.codegen.triton import aot
from dflash_compiler.errors import DFlashError

ROOT = Path(__file__).resolve().parents[1]
# arch: (hardware profile, the cubin's architecture)
PROFILES = {80: ("sm80", "sm_80"), 90: ("sm90", "sm_90a"), 100: ("sm100", "sm_100a"), 120: ("sm120", "sm_120a")}
KERNELS = "dflash_compiler.codegen.triton."


def _run_compiler(script: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """aot_launches.sm80 .. sm120 cross-compiled through the command line, one cache dir and records file each."""
    out = tmp_path_factory.mktemp("aot")
    calls = "\n".join(
        f"aot.main(['--launch', 'aot_launches:sm{arch}', '--gpu', '{gpu}', "
        f"'--cache-dir', r'{out / str(arch)}', '--records', r'{out / f'{arch}.json'}'{host_modules}])"
        for arch, (gpu, _) in PROFILES.items()
        for host_modules in [", '--no-host-modules'" if arch != 90 else ""]
    )
    # and sm120 on a GPU with less shared memory than the default INT4 configuration needs
    calls += (
        f"\nimport aot_launches\nsmall = aot.cross_compile(aot_launches.sm120, 120, r'{out / 'small'}', sm_count=188, "
        f"max_shared_memory=40000, host_modules=False)\naot.save_records(r'{out / 'small.json'}', small, {{}})"
    )
    # the process is left as it was: Triton's launch path, driver and cache directory
    _run_compiler(
        "import os\nfrom triton.runtime.driver import driver\nfrom triton.runtime.jit import JITFunction\n"
        "from dflash_compiler.codegen.triton import aot\n"
        "before = (JITFunction.run, driver._active, os.environ.get('TRITON_CACHE_DIR'))\n"
        f"{calls}\nassert (JITFunction.run, driver._active, os.environ.get('TRITON_CACHE_DIR')) == before\n"
    )
    return out


def _records(built: Path, arch: int | str) -> list[aot.KernelRecord]:
    return aot.load_records(built / f"{arch}.json")[0]


def _spec_constants(record: aot.KernelRecord) -> dict[str, object]:
    """The constexpr values of a record by parameter name."""
    spec = json.loads(record.spec)
    names = list(spec["signature"])
    return {names[key[0]]: val for key, val in zip(spec["constant_keys"], spec["constant_vals"])}


@pytest.mark.parametrize("arch", PROFILES)
def test_cubins_carry_the_profiles_architecture(built, arch):
    records = _records(built, arch)
    assert records and all(r.arch == arch for r in records)
    for r in records:
        assert aot.cubin_arch(built / str(arch) / r.binary) == PROFILES[arch][1]
        assert (built / str(arch) / r.entry / Path(r.binary).name).is_file()


def test_every_kernel_family_compiles_across_the_profiles(built):
    names = {arch: sorted({r.name.removeprefix(KERNELS) for r in _records(built, arch)}) for arch in PROFILES}
    assert names[80] == [
        "accept._argmax_finalize_kernel",
        "accept._argmax_partial_kernel",
        "accept._greedy_finalize_kernel",
        "linear._linear_kernel",
    ]
    assert names[90] == [
        "fused_ops._qk_norm_rope_kernel",
        "fused_ops._rms_norm_kernel",
        "gdn._gdn_commit_kernel",
        "gdn._gdn_factors_kernel",
        "gdn._gdn_recurrent_kernel",
        "gdn._gdn_state_products_kernel",
        "linear._linear_kernel",
    ]
    assert names[100] == ["attention._attention_kernel", "linear._linear_kernel"]
    assert names[120] == ["fused_ops._rms_norm_kernel", "linear._linear_kernel"]
    gdn = [_spec_constants(r) for r in _records(built, 90) if r.name.endswith("_gdn_recurrent_kernel")]
    assert [(c["DELTAS"], c["STORE_FINAL"]) for c in gdn] == [(True, False)]  # the verify, with its update rows


def test_launchers_see_the_profiles_gpu(built):
    """The launchers pick what the GPU would: the FP8 dot from sm89 on (a CPU launch would decode FP8 instead)."""
    formats = {}
    for arch in PROFILES:
        for r in _records(built, arch):
            if r.name.endswith("_linear_kernel"):
                c = _spec_constants(r)
                formats[(arch, c["FORMAT"], c["ASYM"], c["EPILOGUE"])] = c["FP8_DOT"]
    # sm80: dense, dense SwiGLU and asymmetric INT4; sm90: FP8 per channel; sm100: FP8 blocks; sm120: INT4
    assert formats == {
        (80, 0, False, 0): False,
        (80, 0, False, 2): False,
        (80, 3, True, 0): False,
        (90, 1, False, 0): True,
        (100, 2, False, 0): True,
        (120, 3, False, 0): False,
    }


def test_a_kernel_over_the_shared_memory_limit_takes_the_launchers_fallback(built):
    """As on the GPU, where the launch of a kernel needing more shared memory than the device has raises
    OutOfResources and the linear launcher retries with fewer pipeline stages."""
    full = [r for r in _records(built, 120) if r.name.endswith("_linear_kernel")]
    small = [r for r in _records(built, "small") if r.name.endswith("_linear_kernel")]
    assert [r.shared for r in full] == [small[0].shared] and small[0].shared > 40000
    assert len(small) == 2 and small[1].shared <= 40000
    stages = [json.loads(r.spec)["options"]["num_stages"] for r in small]
    assert stages == [4, 3]


def test_host_modules_are_built_against_libcuda(built):
    """Triton's C modules for the GPU host: the CUDA utilities and, where Triton builds one per kernel signature
    (3.6), the launchers; each needs libcuda.so.1 (the real one on the GPU host). Only sm90 was built with them."""
    from triton.backends.nvidia import driver as nvidia

    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    modules = sorted(built.glob(f"90/*/*{suffix}"))
    names = sorted(p.name.removesuffix(suffix) for p in modules)
    assert names[-1] == "cuda_utils"
    # a launcher per kind of signature (kernels whose arguments pass alike share one)
    launchers = names[:-1]
    assert set(launchers) <= {"__triton_launcher"}
    if hasattr(nvidia, "make_launcher"):
        assert 1 <= len(launchers) <= len(_records(built, 90))
    else:
        assert not launchers
    for module in modules:
        dynamic = subprocess.run(["readelf", "-d", module], capture_output=True, text=True, check=True).stdout
        assert "Shared library: [libcuda.so.1]" in dynamic
    assert not list(built.glob(f"80/*/*{suffix}"))


def test_records_round_trip(built, tmp_path):
    records, versions = aot.load_records(built / "90.json")
    assert versions == aot.record_versions(90)
    for r in records:
        assert "extern_libs" not in json.loads(r.spec)["options"]
        assert len(r.cache_hash) == 64 and r.entry == Path(r.binary).parent.name
    copy = tmp_path / "copy.json"
    aot.save_records(copy, records, versions)
    assert aot.load_records(copy) == (records, versions)
    assert not list(tmp_path.glob("*.tmp"))


def test_load_compiles_nothing_and_strict_refuses_a_new_specialization(built, tmp_path):
    """On a stand-in sm_90 in a fresh process, from a copy of the cache in another directory: every record is a
    disk-cache hit, the same launches then find every kernel in memory, and a shape outside the set is refused."""
    moved = tmp_path / "elsewhere"
    shutil.copytree(built / "90", moved)
    entries_before = sorted(p.name for p in moved.iterdir())
    out = _run_compiler(
        f"""
        import dataclasses
        import json
        import aot_launches
        from dflash_compiler.codegen.triton import aot
        from dflash_compiler.codegen.triton.device import GpuFacts, compiling_for
        from dflash_compiler.errors import DFlashError

        records, versions = aot.load_records(r"{built / "90.json"}")
        result = {{}}
        with aot.stand_in_gpu(90, private_caches=False), compiling_for(GpuFacts((9, 0), 132)):
            watch = aot.load_precompiled(r"{moved}", records, strict=True, versions=versions)
            result["preload"] = [list(watch.compiled), watch.cache_loads]
            aot_launches.sm90()
            result["run"] = [list(watch.compiled), watch.cache_loads]
            try:
                aot_launches.linears(formats=("dense",))
            except DFlashError as e:
                result["refused"] = str(e)
            result["after"] = [list(watch.compiled), watch.cache_loads]
            watch.close()
            # a record whose options differ from the compiled kernel's: its key finds no cache entry
            spec = json.loads(records[0].spec)
            spec["options"]["num_warps"] *= 2
            tampered = dataclasses.replace(records[0], spec=json.dumps(spec))
            try:
                aot.load_precompiled(r"{moved}", [tampered], strict=True)
            except DFlashError as e:
                result["tampered"] = str(e)
        print(json.dumps(result))
        """
    )
    result = json.loads(out.strip().splitlines()[-1])
    n = len(_records(built, 90))
    assert result["preload"] == [[], n]
    assert result["run"] == [[], n]
    # the refusal names the kernel and the variant's constants and 16-divisible arguments
    refused = result["refused"]
    assert refused.startswith(f"{KERNELS}linear._linear_kernel: this specialization (constants {{")
    assert (
        "'FORMAT': 0" in refused and "divisible by 16: x_ptr" in refused and "is not among the precompiled" in refused
    )
    assert result["after"] == [[], n]
    assert result["tampered"].startswith(f"{_records(built, 90)[0].name}: this specialization (")
    assert sorted(p.name for p in moved.iterdir()) == entries_before  # nothing was compiled into the cache
    for group in moved.glob("*/__grp__*.json"):
        assert all(p.startswith(str(moved)) for p in json.loads(group.read_text())["child_paths"].values())


@pytest.mark.parametrize("library", ["python", "triton", "ptxas", "torch"])
def test_version_mismatch_names_the_library(library):
    recorded = aot.record_versions(90)
    aot.check_versions(recorded)
    with pytest.raises(DFlashError, match=f"^{library}: the kernels were compiled with {library} '0.0'"):
        aot.check_versions({**recorded, library: "0.0"})


def test_triton_settings_mismatch_is_named():
    recorded = {**aot.record_versions(90), "triton_env": {"TRITON_DEFAULT_FP_FUSION": "0"}}
    with pytest.raises(DFlashError, match="^triton_env: "):
        aot.check_versions(recorded)


def test_load_refuses_another_gpu_and_missing_files(built, tmp_path):
    records = _records(built, 90)
    broken = tmp_path / "broken"
    shutil.copytree(built / "90", broken)
    with knobs.cache.scope():  # load_precompiled points this process's Triton at the cache
        with aot.stand_in_gpu(100), pytest.raises(DFlashError, match="compiled for sm_90, this GPU is sm_100"):
            aot.load_precompiled(broken, records)
        victim = broken / records[0].binary
        victim.unlink()
        with aot.stand_in_gpu(90), pytest.raises(DFlashError, match=f"^{victim}: missing from the precompiled"):
            aot.load_precompiled(broken, records)
        shutil.rmtree(broken / records[1].entry)
        with aot.stand_in_gpu(90), pytest.raises(DFlashError, match=f"{records[1].entry}: missing"):
            aot.load_precompiled(broken, records[1:2])


def test_bad_records_file(tmp_path, built):
    doc = json.loads((built / "80.json").read_text())
    del doc["kernels"][1]["spec"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(DFlashError, match=r"bad.json: kernels\[1\] lacks 'spec'"):
        aot.load_records(bad)
    doc["kernels"][1]["spec"] = "{}"
    doc["kernels"][0]["arch"] = "90"
    bad.write_text(json.dumps(doc))
    with pytest.raises(DFlashError, match=r"bad.json: kernels\[0\].arch is not of type int"):
        aot.load_records(bad)
    bad.write_text(json.dumps({**doc, "spec_version": 99}))
    with pytest.raises(DFlashError, match="spec_version 99 is not 1"):
        aot.load_records(bad)
    bad.write_text("{")
    with pytest.raises(DFlashError, match="cannot read kernel records"):
        aot.load_records(bad)


def test_cross_compile_refuses_bad_requests(tmp_path, monkeypatch):
    common = ["--launch", "aot_launches:sm90", "--cache-dir", str(tmp_path), "--records", str(tmp_path / "r.json")]
    with pytest.raises(DFlashError, match="^--gpu: profile cpu is not a GPU"):
        aot.main(["--gpu", "cpu", *common])
    with pytest.raises(DFlashError, match="no device 'V100' in profile sm90"):
        aot.main(["--gpu", "sm90", "--device", "V100", *common])
    with pytest.raises(DFlashError, match="^arch: 75 is not one of 80, 90, 100, 120"):
        aot.cross_compile(lambda: None, 75, tmp_path, sm_count=40)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(DFlashError, match="^TRITON_INTERPRET: "):
        aot.cross_compile(lambda: None, 90, tmp_path, sm_count=132)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(DFlashError, match="^launch: it launched no Triton kernel"):
        aot.cross_compile(lambda: None, 90, tmp_path, sm_count=132)


def test_cubin_arch_refuses_a_file_that_is_no_cubin(tmp_path):
    junk = tmp_path / "k.cubin"
    junk.write_bytes(b"\x7fELF not really")
    with pytest.raises(DFlashError, match=f"^{junk}: cuobjdump cannot read it"):
        aot.cubin_arch(junk)


@pytest.mark.parametrize("profile_name,arch", [("sm90", 90), ("sm120", 120)])
def test_the_chunked_prefill_fits_the_gpu_at_qwen35_dims(tmp_path, profile_name, arch):
    """The three kernels of the chunked GDN prefill, cross-compiled at the 27B head dims (K = V = 128, 48 value
    heads) in the 16-bit and two fp32 precisions with the launcher's default chunk and V slice for the GPU, each
    within the profile's shared memory per block (sm120's 99 KB takes 32-token chunks)."""
    out = _run_compiler(
        f"""
        import json, torch
        from dflash_compiler.codegen.triton import aot, gdn
        from dflash_compiler.hw_profiles import load_profile

        profile = load_profile("{profile_name}")

        def launch():
            q = torch.zeros(1, 512, 16, 128, dtype=torch.bfloat16)
            v = torch.zeros(1, 512, 48, 128, dtype=torch.bfloat16)
            a = torch.zeros(1, 512, 48, dtype=torch.bfloat16)
            for precision in ("half", "tf32", "tf32x3"):
                gdn.gdn_chunked(q, q.clone(), v, a, a.clone(), torch.zeros(48), torch.zeros(48),
                                torch.zeros(1, 48, 128, 128), precision=precision)

        records = aot.cross_compile(launch, {arch}, r"{tmp_path}", sm_count=profile.device.sm_count,
                                    max_shared_memory=profile.smem_per_block, host_modules=False)
        print(json.dumps([profile.smem_per_block, [[r.name.rsplit(".", 1)[1], r.shared] for r in records]]))
        """
    )
    limit, records = json.loads(out.strip().splitlines()[-1])
    kernels = ("_chunk_prepare_kernel", "_chunk_state_kernel", "_chunk_output_kernel")
    assert sorted({name for name, _ in records}) == sorted(kernels) and len(records) == 9
    assert limit == {"sm90": 232448, "sm120": 101376}[profile_name]
    assert all(0 < shared <= limit for _, shared in records)


def test_the_fp8_activation_variants_compile_for_sm90(tmp_path):
    """x quantized before the GEMM: the quantization kernel, FP8 weights with it (per token and group, or per token:
    W8A8), and INT4 weights on the FP8 tensor cores (W4A8, symmetric and asymmetric, 16 and 256 rows; one dot per
    plane or per chunk), cross-compiled for sm90 within its shared memory (their numerics are checked on the GPU:
    the interpreter mishandles FP8)."""
    out = _run_compiler(
        f"""
        import json, torch
        from dflash_compiler.codegen import weight_formats as wf
        from dflash_compiler.codegen.triton import aot
        from dflash_compiler.codegen.triton.linear import LinearConfig, linear, quantize_x_fp8

        def launch():
            x16, x256 = torch.randn(16, 640).to(torch.bfloat16), torch.randn(256, 640).to(torch.bfloat16)
            for sym in (True, False):
                w = wf.quantize_int4(torch.randn(256, 640) * 0.05, symmetric=sym)
                linear(x16, w, config=LinearConfig(block_n=64, block_m=16, num_stages=3, prequant_x=True,
                                                   programs=132))
                linear(x256, w, config=LinearConfig(block_n=128, block_m=128, num_warps=8, num_stages=3,
                                                    prequant_x=True))
                for prequant in (False, True):  # one dot per chunk, bf16 or FP8 x
                    linear(x256, w, config=LinearConfig(block_n=128, block_m=128, num_warps=8, num_stages=3,
                                                        prequant_x=prequant, int4_chunk_dot=True))
            w8 = wf.quantize_fp8_channel(torch.randn(256, 640) * 0.05)
            linear(x16, w8, fp8_dot=True, config=LinearConfig(block_n=64, block_m=16, num_stages=3, prequant_x=True))
            linear(x16, w8, fp8_dot=True, config=LinearConfig(block_n=64, block_m=16, num_stages=3))  # x in the loop
            for epilogue in ({{"residual": torch.randn(16, 256).to(torch.bfloat16)}}, {{"swiglu": True}}):
                # W8A8 per token and channel, through stream-K
                linear(x16, w8, fp8_dot=True, config=LinearConfig(block_n=64, block_m=16, num_stages=3,
                       prequant_x=True, x_per_token=True, programs=132), **epilogue)  # fmt: skip
            quantize_x_fp8(x256, per_row=True)  # the vendor GEMM's per-token scales

        records = aot.cross_compile(launch, 90, r"{tmp_path}", sm_count=132, max_shared_memory=232448,
                                    host_modules=False)
        print(json.dumps([[r.name.rsplit(".", 1)[1], r.shared] for r in records]))
        """
    )
    records = json.loads(out.strip().splitlines()[-1])
    names = [name for name, _ in records]
    assert names.count("_linear_kernel") == 12
    assert set(names) == {"_linear_kernel", "_quantize_x_kernel", "_quantize_x_rows_kernel"}
    assert all(0 <= shared <= 232448 for _, shared in records)
    # x is rounded to e4m3 by the hardware conversion (exact, ties to even), never through fp16, in the two
    # quantization kernels and in the loop that quantizes its own x (W4A8's fp16 nibbles convert exactly)
    converting = {}
    for ptx in tmp_path.rglob("*.ptx"):
        text = ptx.read_text()
        assert ptx.stem == "_linear_kernel" or "e4m3x2.f16x2" not in text, ptx
        if "cvt.rn.satfinite.e4m3x2.f32" in text:
            converting[ptx.stem] = converting.get(ptx.stem, 0) + 1
    assert converting == {"_linear_kernel": 1, "_quantize_x_kernel": 1, "_quantize_x_rows_kernel": 1}


def test_the_sm90_linear_loops_keep_the_tensor_cores_busy(tmp_path):
    """The wgmma waits of each linear variant's main loop (before its first branch), read from the sm90 TTGIR: BF16
    and W8A8 per token leave one MMA in flight across chunks (pendings = 1); a chunk scaled after its dot (FP8 per
    128 inputs) or an INT4 chunk as one dot waits once per chunk; INT4 dots per plane wait four times."""
    out = _run_compiler(
        f"""
        import glob, json, os, re, tempfile, torch
        from dflash_compiler.codegen import weight_formats as wf
        from dflash_compiler.codegen.triton import aot
        from dflash_compiler.codegen.triton.linear import LinearConfig, linear

        w = torch.randn(512, 1024) * 0.02
        x = torch.randn(16, 1024).to(torch.bfloat16)
        r = torch.randn(16, 512).to(torch.bfloat16)
        cases = {{
            "bf16": (wf.DenseWeight(w.to(torch.bfloat16)), None, dict(block_n=64, programs=132)),
            "fp8_group": (wf.quantize_fp8_channel(w), True, dict(block_n=128, num_warps=8, programs=132)),
            "fp8_token": (wf.quantize_fp8_channel(w), True, dict(block_n=128, num_warps=8, programs=132,
                                                                 prequant_x=True, x_per_token=True)),
            "int4_planes": (wf.quantize_int4(w), None, dict(block_n=128, programs=132)),
            "int4_chunk": (wf.quantize_int4(w), None, dict(block_n=128, programs=132, int4_chunk_dot=True)),
            "int4_sync": (wf.quantize_int4(w), None, dict(block_n=128, programs=132, mma_sync=True)),
            "fp8_group_sync": (wf.quantize_fp8_channel(w), True, dict(block_n=128, num_warps=8, programs=132,
                                                                      mma_sync=True)),
            "int4_planes_again": (wf.quantize_int4(w), None, dict(block_n=128, programs=132)),
        }}
        waits, mma, decodes = {{}}, {{}}, {{}}
        for name, (weight, fp8_dot, cfg) in cases.items():
            d = tempfile.mkdtemp(dir=r"{tmp_path}")
            config = LinearConfig(block_m=16, block_k=128, num_stages=3, **cfg)
            aot.cross_compile(lambda: linear(x, weight, residual=r, fp8_dot=fp8_dot, config=config), 90, d,
                              sm_count=132, max_shared_memory=232448, host_modules=False)
            ir = open(glob.glob(d + "/**/_linear_kernel.ttgir", recursive=True)[0]).read()
            loop = ir[ir.index("scf.for"):]
            body = loop[:loop.index("scf.if")]
            waits[name] = [int(p) for p in re.findall(r"warp_group_dot_wait.*?pendings = (\\d+)", body)]
            mma[name] = sorted(set(re.findall(r"nvidia_mma<{{versionMajor = (\\d)", ir)))
            ptx = open(glob.glob(d + "/**/_linear_kernel.ptx", recursive=True)[0]).read()
            decodes[name] = ptx.count("fma.rn.bf16x2")
            assert "DISABLE_MMA_V3" not in os.environ
        print(json.dumps([waits, mma, decodes]))
        """
    )
    waits, mma, decodes = json.loads(out.strip().splitlines()[-1])
    assert waits["bf16"] == [1] and waits["fp8_token"] == [1]
    assert waits["fp8_group"] == [0] and waits["int4_chunk"] == [0]
    assert waits["int4_planes"] == [0, 0, 0, 0]
    # mma_sync: warp-level mma.sync (MMA v2), no warpgroup waits; the wgmma variant compiled after it is unchanged
    assert mma["int4_sync"] == mma["fp8_group_sync"] == ["2"] and waits["int4_sync"] == waits["fp8_group_sync"] == []
    assert mma["int4_planes"] == mma["int4_planes_again"] == ["3"] and waits["int4_planes_again"] == [0, 0, 0, 0]
    # INT4 nibbles become bf16 q - 8 by one LOP3 and one packed FMA per word and plane, written in PTX: the four
    # planes of a 128-input run; no other format has it
    assert {name: n > 0 for name, n in decodes.items()} == {name: name.startswith("int4") for name in decodes}
