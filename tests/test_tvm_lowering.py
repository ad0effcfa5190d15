"""TVM lowerings (codegen/tvm/) against the PyTorch references: every linear weight format and epilogue, and the
RMSNorms, built for TVM's LLVM (CPU) target and run on fresh random inputs at odd sizes into NaN-filled outputs;
CUDA builds for every architecture (compiled, not run: no GPU here)."""

from __future__ import annotations

import functools
import json
import re
import shutil
import zlib

import pytest
import torch

from dflash_compiler.codegen import reference
from dflash_compiler.codegen import weight_formats as wf
from dflash_compiler.codegen.tvm.build import CUDA_ARCHS, TVMKernel, parse_target
from dflash_compiler.codegen.tvm.linear import FORMATS, build_linear, build_linear_for, linear
from dflash_compiler.codegen.tvm.norm import build_rms_norm, rms_norm
from dflash_compiler.errors import DFlashError

EPILOGUES = ("none", "residual", "swiglu")
# (m, activation dtype): the batch buckets around 16, fp32 and fp16 activations
CASES = ((1, torch.float16), (3, torch.float32), (16, torch.float16), (17, torch.float32))
N, K = 202, 300  # neither a power of two nor a multiple of 128: partial FP8 blocks and INT4 runs
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def make_weight(fmt: str, n: int, k: int, gen: torch.Generator, dense_dtype=torch.float16, group_size=128):
    w = torch.randn(n, k, generator=gen) * 0.05
    if fmt == "dense":
        return wf.DenseWeight(w.to(dense_dtype))
    if fmt == "fp8_channel":
        return wf.quantize_fp8_channel(w)
    if fmt == "fp8_block":
        return wf.quantize_fp8_block(w)
    return wf.quantize_int4(w, group_size=group_size, symmetric=fmt == "int4_sym")


@functools.cache
def cached_linear(fmt, m, n, k, dtype, target, epilogue, weight_dtype=None, group_size=128, low_batch=True):
    return build_linear(
        fmt, m, n, k, dtype, target, epilogue, weight_dtype=weight_dtype, group_size=group_size, low_batch=low_batch
    )


def nan_out(m: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((m, n), float("nan"), dtype=dtype)


def check_linear(kernel, x, weight, epilogue, gen) -> None:
    n_out = weight.shape[0] // 2 if epilogue == "swiglu" else weight.shape[0]
    residual = torch.randn(x.shape[0], n_out, generator=gen).to(x.dtype) if epilogue == "residual" else None
    out = nan_out(x.shape[0], n_out, x.dtype)
    y = linear(kernel, x, weight, residual=residual, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert torch.isfinite(y).all(), "unwritten (NaN) outputs"
    ref = reference.linear(x, weight, residual=residual, swiglu=epilogue == "swiglu").float()
    err = ((y.float() - ref).norm() / ref.norm()).item()
    assert err < TOL[x.dtype], f"relative error {err:.2e}"


@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m,dtype", CASES)
def test_linear_matches_reference(fmt, epilogue, m, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{fmt}-{epilogue}-{m}".encode()))
    weight = make_weight(fmt, N, K, gen)
    kernel = cached_linear(fmt, m, N, K, dtype, "llvm", epilogue, torch.float16 if fmt == "dense" else None)
    check_linear(kernel, torch.randn(m, K, generator=gen).to(dtype), weight, epilogue, gen)


@pytest.mark.parametrize(
    "fmt,dtype,dense_dtype,group_size",
    [
        ("dense", torch.bfloat16, torch.bfloat16, 128),
        ("dense", torch.float32, torch.bfloat16, 128),  # weight dtype differs from the activations'
        ("fp8_block", torch.bfloat16, None, 128),
        ("int4_asym", torch.bfloat16, None, 256),
        ("int4_sym", torch.float16, None, 256),
    ],
)
def test_linear_other_dtypes_and_groups(fmt, dtype, dense_dtype, group_size):
    gen = torch.Generator().manual_seed(7)
    weight = make_weight(fmt, 130, 640, gen, dense_dtype=dense_dtype or torch.float16, group_size=group_size)
    kernel = build_linear_for(weight, 5, dtype, "llvm", "swiglu")
    assert kernel.spec.attrs.get("group_size", group_size) == group_size
    check_linear(kernel, torch.randn(5, 640, generator=gen).to(dtype), weight, "swiglu", gen)


def test_fp8_decode_is_exact_for_every_value():
    """x = I reads the dequantized weight back: every finite e4m3 bit pattern (the quantizers never emit NaN),
    subnormals and zero included, decodes to torch's value exactly."""
    bits = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8).view(2, 127)
    weight = wf.FP8ChannelWeight(bits.view(torch.float8_e4m3fn), torch.ones(2))
    kernel = cached_linear("fp8_channel", 127, 2, 127, torch.float32, "llvm", "none")
    y = linear(kernel, torch.eye(127), weight, out=nan_out(127, 2, torch.float32))
    want = bits.view(torch.float8_e4m3fn).float().T
    assert torch.equal(y, want)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("zero_centered", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rms_norm_matches_reference(dtype, zero_centered, residual):
    gen = torch.Generator().manual_seed(int(zero_centered) + 2 * int(residual) + 4 * (dtype.itemsize))
    rows, hidden, eps = 5, 300, 1e-6
    kernel = build_rms_norm(rows, hidden, dtype, "llvm", eps=eps, zero_centered=zero_centered, residual=residual)
    x = (torch.randn(rows, hidden, generator=gen) * 3).to(dtype)
    w = (torch.randn(hidden, generator=gen) * 0.2 + (0 if zero_centered else 1)).to(dtype)
    r = torch.randn(rows, hidden, generator=gen).to(dtype) if residual else None
    out = torch.full((rows, hidden), float("nan"), dtype=dtype)
    res_out = torch.full_like(out, float("nan")) if residual else None
    got = rms_norm(kernel, x, w, eps, residual=r, out=out, residual_out=res_out)
    want = reference.rms_norm(x, w, eps, zero_centered=zero_centered, residual=r)
    if residual:
        assert got[0].data_ptr() == out.data_ptr() and got[1].data_ptr() == res_out.data_ptr()
        assert torch.equal(got[1], want[1])  # x + residual rounded once, as the reference adds
        got, want = got[0], want[0]
    assert got.data_ptr() == out.data_ptr()
    assert torch.isfinite(got).all()
    # the fp32 statistics may differ in the last bit, which can move a rounding by one step of the output dtype
    ulp = {torch.float32: 2e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=ulp, atol=ulp)


def test_rms_norm_allocates_outputs_without_residual():
    kernel = build_rms_norm(1, 96, torch.float32, "llvm", eps=1e-5)
    x, w = torch.randn(1, 96), torch.randn(96)
    torch.testing.assert_close(rms_norm(kernel, x, w, 1e-5), reference.rms_norm(x, w, 1e-5))


def test_export_and_load_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(3)
    weight = make_weight("int4_asym", N, K, gen)
    kernel = cached_linear("int4_asym", 3, N, K, torch.float32, "llvm", "swiglu")
    path = tmp_path / "kernels" / "gate_up.so"
    kernel.export_library(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["gate_up.so", "gate_up.so.json"]
    loaded = TVMKernel.load(path)
    assert loaded.spec == kernel.spec
    x = torch.randn(3, K, generator=gen)
    torch.testing.assert_close(linear(loaded, x, weight), linear(kernel, x, weight), rtol=0, atol=0)
    torch.testing.assert_close(linear(loaded, x, weight), reference.linear(x, weight, swiglu=True))


def test_bad_input_gets_a_one_line_error(tmp_path):
    gen = torch.Generator().manual_seed(5)
    weight = make_weight("dense", N, K, gen)
    kernel = cached_linear("dense", 1, N, K, torch.float16, "llvm", "none", torch.float16)
    x = torch.randn(1, K, generator=gen).half()
    with pytest.raises(DFlashError, match="^target: "):
        parse_target("cuda -arch=sm_75")
    with pytest.raises(DFlashError, match="^fmt: "):
        build_linear("fp4", 1, 8, 8, torch.float16, "llvm")
    with pytest.raises(DFlashError, match="^n: SwiGLU"):
        build_linear("dense", 1, 7, 8, torch.float16, "llvm", "swiglu")
    with pytest.raises(DFlashError, match=r"^x: expected float16 \[1, 300\]"):
        linear(kernel, x.float(), weight)
    with pytest.raises(DFlashError, match="^weight: the kernel is built for dense"):
        linear(kernel, x, make_weight("fp8_channel", N, K, gen))
    with pytest.raises(DFlashError, match="^residual: "):
        linear(kernel, x, weight, residual=torch.zeros(1, N, dtype=torch.float16))
    with pytest.raises(DFlashError, match="^out: expected float16"):
        linear(kernel, x, weight, out=torch.empty(1, N))
    norm = build_rms_norm(1, 8, torch.float32, "llvm", eps=1e-6)
    with pytest.raises(DFlashError, match="^eps: "):
        rms_norm(norm, torch.randn(1, 8), torch.randn(8), 1e-5)
    with pytest.raises(DFlashError, match="missing TVM kernel file"):
        TVMKernel.load(tmp_path / "absent.so")
    cuda_kernel = cached_linear("dense", 1, N, K, torch.float16, "cuda -arch=sm_90", "none", torch.float16)
    with pytest.raises(DFlashError, match="^target: this kernel is built for cuda"):
        linear(cuda_kernel, x, weight)


# ---- CUDA builds (no GPU needed: the module carries CUDA source that NVRTC compiles when it is loaded) -----------

CUDA_KERNELS = {
    "dense_gemv": lambda t: cached_linear("dense", 1, 512, 768, torch.bfloat16, t, "residual"),
    "int4_sym_gemv": lambda t: cached_linear("int4_sym", 1, 512, 700, torch.bfloat16, t, "none"),
    "dense_low_batch": lambda t: cached_linear("dense", 16, 512, 768, torch.bfloat16, t, "swiglu"),
    "fp8_channel_low_batch": lambda t: cached_linear("fp8_channel", 3, 512, 768, torch.float16, t, "residual"),
    "dense_matmul": lambda t: cached_linear("dense", 16, 512, 768, torch.bfloat16, t, "none", low_batch=False),
    "fp8_block_matmul": lambda t: cached_linear("fp8_block", 16, 512, 768, torch.bfloat16, t, "swiglu"),
    "int4_asym_matmul": lambda t: cached_linear("int4_asym", 64, 512, 768, torch.float16, t, "none"),
    "rms_norm": lambda t: build_rms_norm(16, 640, torch.bfloat16, t, eps=1e-6, zero_centered=True, residual=True),
}


@pytest.mark.parametrize("arch", CUDA_ARCHS)
def test_cuda_builds_for_every_arch(arch, tmp_path):
    target = f"cuda -arch={arch}"
    kernels = {name: build(target) for name, build in CUDA_KERNELS.items()}
    schedules = {name: [s.schedule for s in k.spec.stages] for name, k in kernels.items()}
    assert schedules["dense_gemv"] == schedules["int4_sym_gemv"] == ["GEMV"]
    assert schedules["dense_low_batch"] == ["LowBatchGEMV", "Fallback"]
    assert schedules["fp8_channel_low_batch"] == ["LowBatchGEMV"]
    assert schedules["dense_matmul"] == ["Matmul"]
    assert schedules["fp8_block_matmul"] == ["Matmul", "Fallback"]
    assert schedules["int4_asym_matmul"] == ["Matmul"]
    assert schedules["rms_norm"] == ["Fallback", "GeneralReduction"]
    for kernel in kernels.values():
        assert kernel.arch == arch
        source = kernel.device_source()
        for stage in kernel.spec.stages:
            assert re.search(rf'extern "C" __global__ void .*\b{stage.function}_kernel\(', source), stage.function
    # FP8 decodes through cuda_fp8.h from sm_89 on; sm_80 decodes the bits arithmetically (the path the LLVM tests
    # check), with no float8 type in the source
    fp8_source = kernels["fp8_block_matmul"].device_source()
    assert ("cuda_fp8.h" in fp8_source) == ("__nv_fp8_e4m3" in fp8_source) == (arch != "sm_80")
    path = tmp_path / f"fp8_block_{arch}.so"
    kernels["fp8_block_matmul"].export_library(path)
    assert TVMKernel.spec_path(path).is_file() and path.stat().st_size > 0
    if not torch.cuda.is_available():  # the CUDA loader registers only where the CUDA runtime loads
        with pytest.raises(DFlashError, match=f"cannot load the TVM module built for cuda -arch={arch} here"):
            TVMKernel.load(path)


@pytest.mark.parametrize("arch", CUDA_ARCHS)
def test_cuda_source_compiles_for_the_named_arch(arch):
    """The generated source through nvcc to PTX for the architecture (the loader's NVRTC compiles the same source):
    the PTX names the architecture and holds both stages' entry points."""
    if shutil.which("nvcc") is None:
        pytest.skip("the CUDA toolkit (nvcc) is not installed")
    from tvm.support import nvcc
    from tvm.target import Target

    kernel = CUDA_KERNELS["fp8_block_matmul"](f"cuda -arch={arch}")
    with Target(parse_target(kernel.spec.target)):
        ptx = nvcc.compile_cuda(kernel.device_source(), target_format="ptx", arch=arch, compiler="nvcc").decode()
    assert re.findall(r"^\.target\s+(\S+)", ptx, re.M) == [arch]
    assert sorted(re.findall(r"\.entry\s+(\w+)\(", ptx)) == ["linear_kernel", "swiglu_kernel"]


@pytest.mark.gpu
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m,low_batch", [(1, True), (3, True), (16, True), (16, False), (64, True)])
def test_cuda_linear_matches_reference(fmt, epilogue, m, low_batch):
    major, minor = torch.cuda.get_device_capability()
    gen = torch.Generator().manual_seed(11)
    weight = make_weight(fmt, 1024, 768, gen, dense_dtype=torch.bfloat16).to("cuda")
    kernel = build_linear_for(weight, m, torch.bfloat16, f"cuda -arch=sm_{major}{minor}", epilogue, low_batch)
    x = torch.randn(m, 768, generator=gen).to("cuda", torch.bfloat16)
    n_out = 512 if epilogue == "swiglu" else 1024
    residual = torch.randn(m, n_out, device="cuda", dtype=torch.bfloat16) if epilogue == "residual" else None
    out = torch.full((m, n_out), float("nan"), device="cuda", dtype=torch.bfloat16)
    y = linear(kernel, x, weight, residual=residual, out=out)
    ref = reference.linear(x, weight, residual=residual, swiglu=epilogue == "swiglu").float()
    assert torch.isfinite(y).all()
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("residual", [False, True])
def test_cuda_rms_norm_matches_reference(residual):
    major, minor = torch.cuda.get_device_capability()
    rows, hidden, eps = 16, 5120, 1e-6
    kernel = build_rms_norm(
        rows, hidden, torch.bfloat16, f"cuda -arch=sm_{major}{minor}", eps=eps, zero_centered=True, residual=residual
    )
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(hidden, device="cuda", dtype=torch.bfloat16) * 0.1
    r = torch.randn_like(x) if residual else None
    got = rms_norm(kernel, x, w, eps, residual=r)
    want = reference.rms_norm(x, w, eps, zero_centered=True, residual=r)
    if residual:
        assert torch.equal(got[1], want[1])
        got, want = got[0], want[0]
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=2**-7)


@pytest.mark.gpu
def test_cuda_kernel_export_load_round_trip(tmp_path):
    major, minor = torch.cuda.get_device_capability()
    gen = torch.Generator().manual_seed(13)
    weight = make_weight("fp8_block", 512, 768, gen).to("cuda")
    kernel = build_linear_for(weight, 16, torch.bfloat16, f"cuda -arch=sm_{major}{minor}", "swiglu")
    kernel.export_library(tmp_path / "k.so")
    loaded = TVMKernel.load(tmp_path / "k.so")
    x = torch.randn(16, 768, generator=gen).to("cuda", torch.bfloat16)
    torch.testing.assert_close(linear(loaded, x, weight), linear(kernel, x, weight), rtol=0, atol=0)


def test_static_linear_builds_once_per_shape_and_an_artifacts_kernels_build_nothing(tmp_path, monkeypatch):
    """The compiled step's TVM lowering: one kernel per static shape (a second call of the shape builds nothing),
    the reference's result with the fused prologues run first; its kernels exported and installed again (as an
    artifact load does) serve the same shapes without a build, and in strict mode a shape they lack is refused."""
    from dflash_compiler.codegen.triton.linear import RowNorm
    from dflash_compiler.codegen.tvm import linear as tvm_linear

    monkeypatch.setattr(tvm_linear, "_KERNELS", {})
    monkeypatch.setattr(tvm_linear, "_LOADED_ONLY", set())
    builds = []
    build = tvm_linear.build_linear_for
    monkeypatch.setattr(tvm_linear, "build_linear_for", lambda *a, **kw: builds.append(a[1]) or build(*a, **kw))
    gen = torch.Generator().manual_seed(21)
    weight = make_weight("int4_asym", N, K, gen)
    x, gate = torch.randn(5, K, generator=gen), torch.randn(5, K, generator=gen)
    norm = RowNorm(torch.randn(K, generator=gen), 1e-6, True)
    residual = torch.randn(5, N, generator=gen)
    want = reference.linear(reference.rms_norm(x * torch.sigmoid(gate), norm.weight, 1e-6, zero_centered=True),
                            weight, residual=residual)  # fmt: skip
    for _ in range(2):
        got = tvm_linear.static_linear(x, weight, residual=residual, norm=norm, gate=gate)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert builds == [5]
    entries = tvm_linear.export_kernels("llvm", tmp_path)
    assert [e["file"] for e in entries] == ["000.so"] and entries[0]["key"][:4] == ["int4_asym", 5, N, K]
    monkeypatch.setattr(tvm_linear, "_KERNELS", {})
    assert tvm_linear.install_kernels(json.loads(json.dumps(entries)), tmp_path, strict=True) == 1
    got = tvm_linear.static_linear(x, weight, residual=residual, norm=norm, gate=gate)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert builds == [5]
    with pytest.raises(DFlashError, match="not among the artifact's TVM kernels and would be built .strict mode."):
        tvm_linear.static_linear(x[:3], weight, residual=residual[:3])


def test_building_for_another_target_builds_and_runs_nothing(monkeypatch):
    """An artifact's ahead-of-time pass: within building_for, a call builds the kernel of the named CUDA target
    for its shapes (here on a CPU machine) and returns an output of the call's shape without running it."""
    from dflash_compiler.codegen.tvm import linear as tvm_linear

    monkeypatch.setattr(tvm_linear, "_KERNELS", {})
    gen = torch.Generator().manual_seed(22)
    weight = make_weight("fp8_channel", N, K, gen)
    with tvm_linear.building_for("cuda -arch=sm_90"):
        y = tvm_linear.static_linear(torch.randn(16, K, generator=gen).to(torch.bfloat16), weight)
    assert y.shape == (16, N) and y.dtype == torch.bfloat16  # unwritten: the dry run's values come from elsewhere
    ((key, kernel),) = tvm_linear._KERNELS.items()
    assert key[7] == "cuda -arch=sm_90" and kernel.arch == "sm_90" and key[:4] == ("fp8_channel", 16, N, K)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_static_linear_in_a_captured_graph(fmt, monkeypatch):
    """The compiled step's TVM lowering on the GPU: warmed up eagerly (the build), then captured in a CUDA graph
    whose replays on new inputs give the reference's result (the kernels launch on the capturing stream)."""
    from dflash_compiler.codegen.tvm import linear as tvm_linear

    monkeypatch.setattr(tvm_linear, "_KERNELS", {})
    gen = torch.Generator().manual_seed(23)
    weight = make_weight(fmt, 512, 768, gen, dense_dtype=torch.bfloat16).to("cuda")
    x = torch.randn(16, 768, generator=gen).to("cuda", torch.bfloat16)
    residual = torch.randn(16, 512, generator=gen).to("cuda", torch.bfloat16)
    tvm_linear.static_linear(x, weight, residual=residual)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = tvm_linear.static_linear(x, weight, residual=residual)
    for _ in range(2):
        x.copy_(torch.randn(16, 768, generator=gen).to("cuda", torch.bfloat16))
        y.fill_(float("nan"))
        graph.replay()
        want = reference.linear(x, weight, residual=residual)
        torch.testing.assert_close(y.float(), want.float(), rtol=2**-7, atol=2**-7)
