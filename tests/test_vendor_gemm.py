"""The vendor-GEMM lowering of linear against the PyTorch reference."""

import pytest
import torch

from dflash_compiler.codegen import reference, vendor_gemm
from dflash_compiler.codegen.weight_formats import DenseWeight, quantize_fp8_channel


@pytest.mark.parametrize("epilogue", ["none", "residual", "swiglu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_dense_matches_reference(epilogue, dtype, device):
    """Into a given out (the GEMM's own output where there is no epilogue) and into a new tensor."""
    gen = torch.Generator().manual_seed(0)
    m, n, k = 37, 48, 80
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    w = DenseWeight((torch.randn(n, k, generator=gen) / k**0.5).to(device, dtype))
    kwargs = {"residual": torch.randn(m, n, generator=gen).to(device, dtype)} if epilogue == "residual" else {}
    kwargs["swiglu"] = epilogue == "swiglu"
    out = torch.full((m, n // 2 if kwargs["swiglu"] else n), float("nan"), dtype=dtype, device=device)
    got = vendor_gemm.linear(x, w, out=out, **kwargs)
    assert got is out
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    want = reference.linear(x, w, **kwargs)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(vendor_gemm.linear(x, w, **kwargs), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_residual_in_place_accumulates_into_the_residual(dtype, device):
    """A dead residual takes the sum in the GEMM (beta = 1): the result is the residual's tensor, the reference's
    values (rounded once), and x and the weight are left as they were."""
    gen = torch.Generator().manual_seed(2)
    m, n, k = 67, 40, 72
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    w = DenseWeight((torch.randn(n, k, generator=gen) / k**0.5).to(device, dtype))
    residual = torch.randn(m, n, generator=gen).to(device, dtype)
    want = reference.linear(x, w, residual=residual.clone())
    x0, w0 = x.clone(), w.weight.clone()
    got = vendor_gemm.linear(x, w, residual=residual, residual_in_place=True)
    assert got.data_ptr() == residual.data_ptr()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert torch.equal(x, x0) and torch.equal(w.weight, w0)
    # the reference lowering writes in place too (what the CPU step tests run)
    residual2 = want.clone()
    again = reference.linear(x, w, residual=residual2, residual_in_place=True)
    assert again.data_ptr() == residual2.data_ptr()
    torch.testing.assert_close(again, reference.linear(x, w, residual=want), rtol=0, atol=0)


def test_fp8_channel_matches_reference_within_activation_rounding():
    """On CUDA (where the runtime uses it) in bf16, else on CPU in fp32."""
    gen = torch.Generator().manual_seed(1)
    m, n, k = 64, 64, 128
    device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    w = quantize_fp8_channel(torch.randn(n, k, generator=gen).to(device) / k**0.5)
    if device == "cuda":
        assert vendor_gemm.supports(x, w)
    residual = torch.randn(m, n, generator=gen).to(device, dtype)
    for kwargs in ({}, {"residual": residual}, {"swiglu": True}):
        want = reference.linear(x, w, **kwargs).float()
        out = torch.full(want.shape, float("nan"), dtype=dtype, device=device)
        for got in (vendor_gemm.linear(x, w, **kwargs), vendor_gemm.linear(x, w, out=out, **kwargs)):
            # per-token FP8 activations: relative error of a dot product of k terms about 2^-4 / sqrt(k) per term,
            # which SwiGLU's product of two such outputs about adds up
            bound = 0.05 if kwargs.get("swiglu") else 0.03
            assert (got.float() - want).norm() / want.norm() < bound, kwargs
        assert out.isfinite().all()


def test_supports_only_half_precision_cuda():
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    assert not vendor_gemm.supports(x, DenseWeight(torch.randn(8, 16, dtype=torch.bfloat16)))
