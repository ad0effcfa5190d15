"""Timing and checking one point of a search space on real inputs.

A case holds rotating input sets for one shape (enough of them that the working set is several times the L2, so
no timing is flattered by cache reuse), runs a (lowering, config) on set i, and checks its output on set 0 against
the PyTorch lowering (codegen/reference.py) with the output poisoned (NaN) first. On CUDA the time is the median
per-call time over replays of one CUDA graph of calls cycling through the sets; on the CPU (the Triton interpreter
and the PyTorch lowering) the median of timed calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..codegen import reference, vendor_gemm
from ..codegen import weight_formats as wf
from ..hw_profiles import HardwareProfile
from .spaces import (
    DTYPES,
    AcceptShape,
    AttentionShape,
    ConvShape,
    DraftAttentionShape,
    GDNChunkedShape,
    GDNShape,
    LinearShape,
)


class ConfigFailed(Exception):
    """A config that does not launch, or gives a wrong result: its trial is marked failed, never chosen."""


class DeviceFault(Exception):
    """A config whose launch faulted the GPU (an illegal address and the like): the CUDA context of the process that
    ran it is lost, so nothing can be measured in that process after it."""


# what the CUDA driver reports for a kernel that faulted (the error is sticky: every later call fails)
_DEVICE_FAULTS = ("illegal memory access", "misaligned address", "unspecified launch failure", "illegal instruction")


def is_device_fault(message: str) -> bool:
    return any(fault in message for fault in _DEVICE_FAULTS)


# ---- timing --------------------------------------------------------------------------------------------------


def rotations_for(bytes_per_set: int, profile: HardwareProfile) -> int:
    """Input sets to cycle through: the working set several times the L2 (2 on the CPU)."""
    if not profile.is_cuda:
        return 2
    l2 = profile.l2_bytes or 64 << 20
    return max(2, min(64, (4 * l2) // max(1, bytes_per_set) + 1))


def time_us(
    fn: Callable[[int], object],
    rotations: int,
    device: torch.device,
    repeats: int = 3,
    min_calls: int = 16,
    warmup_ms: float = 25,
    rep_ms: float = 100,
) -> float:
    """Median per-call time of fn(i), i cycling over the rotations, in microseconds. On CUDA: replays of one CUDA
    graph of at least `min_calls` calls (as the runtime runs kernels: an eager launch costs more than many of them);
    on the CPU: of `repeats` calls, after the caller's checked call compiled the kernel variant."""
    if device.type == "cuda":
        import triton.testing

        calls = rotations * max(1, -(-min_calls // rotations))
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for i in range(rotations):
                fn(i)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for c in range(calls):
                fn(c % rotations)
        ms = triton.testing.do_bench(graph.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        return ms * 1e3 / calls
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        fn(r % rotations)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e6


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


# ---- cases ---------------------------------------------------------------------------------------------------


class Case:
    """Inputs of one shape; `run(lowering, config, i)` launches on input set i and returns its output."""

    rotations: int

    def __init__(
        self, shape, profile: HardwareProfile, device: torch.device, seed: int = 0, max_rotations: int | None = None
    ):
        self.shape, self.profile, self.device = shape, profile, torch.device(device)
        self.gen = torch.Generator(self.device).manual_seed(seed)  # inputs made where they are used
        self._want = None  # the PyTorch lowering's output on input set 0
        self.max_rotations = max_rotations  # a case that only compiles needs one input set

    def _rotations(self, bytes_per_set: int) -> int:
        rotations = rotations_for(bytes_per_set, self.profile)
        return rotations if self.max_rotations is None else min(rotations, self.max_rotations)

    def rand(self, *shape, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=self.gen, device=self.device) * scale).to(dtype)

    def run(self, lowering: str, config: dict, i: int):
        raise NotImplementedError

    def compare(self, got, want) -> str | None:
        """Why got is wrong against want (None if it is right): by default, its relative error over the tolerance."""
        err = _relative_error(got, want)
        tol = self.tolerance("triton", {})
        return None if err <= tol else f"relative error {err:.3g} over {tol:g}"

    def poison(self, i: int) -> None:
        """Fills the outputs of set i with NaN, so that an output the launch leaves unwritten shows."""

    def tolerance(self, lowering: str, config: dict) -> float:
        return {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}[DTYPES[self.shape.fmt]]

    def measure(self, lowering: str, config: dict) -> float:
        """The checked time in microseconds; raises ConfigFailed for a launch error or a wrong result."""
        if self._want is None:
            self._want = self.run("reference", {}, 0)
        try:
            self.poison(0)
            got = self.run(lowering, config, 0)
            wrong = self.compare(got, self._want) if lowering != "reference" else None
            if wrong is None:
                return time_us(lambda i: self.run(lowering, config, i), self.rotations, self.device)
        except ConfigFailed:
            raise
        except Exception as e:  # a config that does not compile, launch or capture (OutOfResources, ValueError, ...)
            first_line = str(e).splitlines()[0] if str(e) else ""
            if is_device_fault(str(e)):
                raise DeviceFault(f"launch faulted the GPU: {type(e).__name__}: {first_line}") from None
            raise ConfigFailed(f"launch failed: {type(e).__name__}: {first_line}") from None
        raise ConfigFailed(f"wrong result: {wrong}")

    def torch_time_us(self) -> float:
        """The plain PyTorch implementation's time (the vendor library where it has one)."""
        return time_us(lambda i: self.run("reference", {}, i), self.rotations, self.device)


def format_weight(w: torch.Tensor, fmt: str):
    """A dense [n, k] weight in one of the linear's weight formats (on the meta device: only its shapes and bytes)."""
    if fmt in DTYPES:
        return wf.DenseWeight(w.to(DTYPES[fmt]).contiguous())
    if fmt == "fp8_channel":
        return wf.quantize_fp8_channel(w)
    if fmt == "fp8_block":
        return wf.quantize_fp8_block(w)
    return wf.quantize_int4(w, symmetric=fmt == "int4_sym")


class LinearCase(Case):
    def __init__(
        self, shape: LinearShape, profile: HardwareProfile, device, seed: int = 0, max_rotations: int | None = None
    ):
        super().__init__(shape, profile, device, seed, max_rotations)
        s = shape
        dense = self.rand(s.n, s.k, scale=0.02)
        base = format_weight(dense, s.fmt)
        self.rotations = self._rotations(base.nbytes + s.m * s.k * 2)
        others = [format_weight(self.rand(s.n, s.k, scale=0.02), s.fmt) for _ in range(self.rotations - 1)]
        self.weights = [base, *others]
        act = DTYPES[s.act]
        self.xs = [self.rand(s.m, s.k, dtype=act) for _ in range(self.rotations)]
        self.outs = [torch.empty(s.m, s.n_out, dtype=act, device=self.device) for _ in range(self.rotations)]
        residual = s.epilogue == "residual"
        self.residuals = [self.rand(s.m, s.n_out, dtype=act) if residual else None for _ in range(self.rotations)]

    def poison(self, i: int) -> None:
        self.outs[i].fill_(float("nan"))

    def run(self, lowering: str, config: dict, i: int):
        kwargs = dict(residual=self.residuals[i], swiglu=self.shape.epilogue == "swiglu")
        x, w = self.xs[i], self.weights[i]
        if lowering == "reference":
            return reference.linear(x, w, **kwargs)
        out = self.outs[i]
        if lowering == "vendor":
            return vendor_gemm.linear(x, w, out=out, **kwargs)
        if lowering == "tvm":  # the compiled step's TVM lowering, as it runs there (its kernels built once per shape)
            from ..codegen.tvm.linear import static_linear

            return static_linear(x, w, out=out, **kwargs, **config)
        if lowering != "triton":
            raise ConfigFailed(f"lowering {lowering!r} is not available for linear")
        from ..codegen.triton.linear import LinearConfig, linear

        cfg = LinearConfig(**{k: v for k, v in config.items() if k != "fp8_dot"})
        return linear(x, w, out=out, fp8_dot=config.get("fp8_dot", False), config=cfg, **kwargs)

    def tolerance(self, lowering: str, config: dict) -> float:
        # activations quantized to FP8 per token (the FP8 dot, _scaled_mm) add a few percent of error
        if (
            config.get("fp8_dot")
            or config.get("prequant_x")
            or (lowering == "vendor" and self.shape.fmt.startswith("fp8"))
        ):
            return 8e-2
        return {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}[DTYPES[self.shape.act]]

    def measure(self, lowering: str, config: dict) -> float:
        self._tol = self.tolerance(lowering, config)
        return super().measure(lowering, config)

    def compare(self, got, want) -> str | None:
        err = _relative_error(got, want)
        return None if err <= self._tol else f"relative error {err:.3g} over {self._tol:g}"

    def torch_time_us(self) -> float:
        """cuBLAS (torch.matmul, or _scaled_mm for FP8 per-channel weights) where the vendor GEMM takes the
        format, else torch.matmul on the weight dequantized to the activations' dtype; the PyTorch lowering on
        the CPU."""
        if not self.profile.is_cuda:
            return super().torch_time_us()
        kwargs = dict(residual=self.residuals, swiglu=self.shape.epilogue == "swiglu")
        if vendor_gemm.supports(self.xs[0], self.weights[0]):
            ws = self.weights
        else:
            act = DTYPES[self.shape.act]
            ws = [wf.DenseWeight(w.dequantize().to(act)) for w in self.weights]

        def fn(i):
            vendor_gemm.linear(self.xs[i], ws[i], out=self.outs[i], residual=kwargs["residual"][i],
                               swiglu=kwargs["swiglu"])  # fmt: skip

        return time_us(fn, self.rotations, self.device)


class AttentionCase(Case):
    PAGE = 64

    def __init__(
        self, shape: AttentionShape, profile: HardwareProfile, device, seed: int = 0, max_rotations: int | None = None
    ):
        super().__init__(shape, profile, device, seed, max_rotations)
        s = shape
        dtype = DTYPES[s.fmt]
        pages_per_req = -(-s.context // self.PAGE)
        kv_bytes = 2 * s.batch * pages_per_req * self.PAGE * s.hkv * s.d * dtype.itemsize
        self.rotations = self._rotations(kv_bytes)
        self.sets = []
        for _ in range(self.rotations):
            pages = s.batch * pages_per_req
            k = self.rand(pages + 1, s.hkv, self.PAGE, s.d, dtype=dtype)
            v = self.rand(pages + 1, s.hkv, self.PAGE, s.d, dtype=dtype)
            perm = torch.randperm(pages, generator=self.gen, device=self.device) + 1  # page 0 unused, as in the runtime
            table = perm.view(s.batch, pages_per_req).to(torch.int32)
            lens = torch.full((s.batch,), s.context - s.t, dtype=torch.int32, device=self.device)
            q = self.rand(s.batch, s.t, s.hq, s.d, dtype=dtype)
            self.sets.append((q, k, v, lens, table, torch.empty_like(q)))

    def poison(self, i: int) -> None:
        self.sets[i][-1].fill_(float("nan"))

    def run(self, lowering: str, config: dict, i: int):
        q, k, v, lens, table, out = self.sets[i]
        if lowering == "reference":
            return reference.verify_attention(q, k, v, lens, block_table=table)
        from ..codegen.triton.attention import tuned_config, verify_attention

        return verify_attention(
            q, k, v, lens, block_table=table, out=out, num_splits=config["num_splits"], max_len=self.shape.context,
            config=tuned_config(config),
        )  # fmt: skip


class DraftAttentionCase(AttentionCase):
    """The block's own keys and values beside the cached context (context - t keys, so that t + cached = context)."""

    def __init__(
        self,
        shape: DraftAttentionShape,
        profile: HardwareProfile,
        device,
        seed: int = 0,
        max_rotations: int | None = None,
    ):
        super().__init__(shape, profile, device, seed, max_rotations)
        dtype = DTYPES[shape.fmt]
        block = (shape.batch, shape.t, shape.hkv, shape.d)
        self.blocks = [(self.rand(*block, dtype=dtype), self.rand(*block, dtype=dtype)) for _ in self.sets]

    def run(self, lowering: str, config: dict, i: int):
        q, k, v, lens, table, out = self.sets[i]
        kb, vb = self.blocks[i]
        if lowering == "reference":
            return reference.draft_attention(q, kb, vb, k, v, lens, block_table=table)
        from ..codegen.triton.attention import draft_attention, tuned_config

        return draft_attention(
            q, kb, vb, k, v, lens, block_table=table, out=out, num_splits=config["num_splits"],
            max_len=self.shape.context, config=tuned_config(config),
        )  # fmt: skip


class ConvCase(Case):
    """The conv update over a verify block, its input a strided slice of the in-projection's rows (as in the
    step: the conv channels come first, the gate and value inputs follow)."""

    def __init__(
        self, shape: ConvShape, profile: HardwareProfile, device, seed: int = 0, max_rotations: int | None = None
    ):
        super().__init__(shape, profile, device, seed, max_rotations)
        s = shape
        dtype = DTYPES[s.fmt]
        self.rotations = self._rotations(2 * s.batch * s.t * s.channels * dtype.itemsize)
        self.weight = self.rand(s.channels, s.width, dtype=dtype, scale=0.5)
        self.sets = []
        for _ in range(self.rotations):
            rows = self.rand(s.batch, s.t, s.channels + 64, dtype=dtype)  # wider rows: x is a strided view
            window = self.rand(s.batch, s.channels, s.width - 1, dtype=dtype)
            self.sets.append((rows[..., : s.channels], window, torch.empty(s.batch, s.t, s.channels, dtype=dtype,
                                                                           device=self.device)))  # fmt: skip

    def poison(self, i: int) -> None:
        self.sets[i][-1].fill_(float("nan"))

    def run(self, lowering: str, config: dict, i: int):
        x, window, out = self.sets[i]
        if lowering == "reference":
            return reference.causal_conv1d_update(x, window, self.weight)
        from ..codegen.triton.gdn import causal_conv1d_update

        return causal_conv1d_update(x, window, self.weight, out=out, **config)


class GDNCase(Case):
    def __init__(
        self, shape: GDNShape, profile: HardwareProfile, device, seed: int = 0, max_rotations: int | None = None
    ):
        super().__init__(shape, profile, device, seed, max_rotations)
        s = shape
        dtype = DTYPES[s.fmt]
        state_bytes = s.batch * s.hv * s.dk * s.dv * 4
        self.rotations = self._rotations(state_bytes)
        self.sets = []
        for _ in range(self.rotations):
            y = self.rand(s.batch, s.t, 2 * s.heads * s.dk + s.hv * s.dv, dtype=dtype)
            q = y[..., : s.heads * s.dk].unflatten(-1, (s.heads, s.dk))
            k = y[..., s.heads * s.dk : 2 * s.heads * s.dk].unflatten(-1, (s.heads, s.dk))
            v = y[..., 2 * s.heads * s.dk :].unflatten(-1, (s.hv, s.dv))
            ba = self.rand(s.batch, s.t, 2 * s.hv, dtype=dtype)
            a_log = (torch.rand(s.hv, generator=self.gen, device=self.device) * 15 + 1).log()
            dt_bias = self.rand(s.hv, scale=0.5)
            state = self.rand(s.batch, s.hv, s.dk, s.dv, scale=0.3)
            out = torch.empty(s.batch, s.t, s.hv, s.dv, dtype=dtype, device=self.device)
            self.sets.append((q, k, v, ba[..., s.hv :], ba[..., : s.hv], a_log, dt_bias, state, out))
        self.pending, self.initial = [], []
        if shape.op != "gdn_verify":
            return
        # as in the step: a pending block (the previous verify's keys, gates and update rows, a random accepted
        # position per request, none for request 1) made current in the state, this block's rows replacing its own
        for q, k, v, a, b, a_log, dt_bias, state, _ in self.sets:
            keys, gates = k.clone(), a.clone()
            rows = torch.empty(s.batch, s.t, s.hv, s.dv, device=self.device)
            reference.gdn_verify(q, k, v, a, b, a_log, dt_bias, state, deltas=rows)
            idx = torch.randint(0, s.t, (s.batch,), generator=self.gen, device=self.device, dtype=torch.int32)
            idx = torch.where(torch.arange(s.batch, device=self.device) == 1, -1, idx)
            self.pending.append(dict(pending_keys=keys, pending_gates=gates, pending_rows=rows, pending_idx=idx))
            self.initial.append((state.clone(), rows.clone()))

    def poison(self, i: int) -> None:
        self.sets[i][-1].fill_(float("nan"))
        if self.initial:
            state, rows = self.initial[i]
            self.sets[i][7].copy_(state)
            self.pending[i]["pending_rows"].copy_(rows)

    def run(self, lowering: str, config: dict, i: int):
        *inputs, out = self.sets[i]
        pending = self.pending[i]
        if lowering == "reference":
            # from the set's initial state and rows, which the runs below advance
            state, rows = (t.clone() for t in self.initial[i])
            inputs[7] = state
            o = reference.gdn_verify(*inputs, **{**pending, "pending_rows": rows})
            return o, state, rows
        from ..codegen.triton.gdn import gdn_verify

        o = gdn_verify(*inputs, out=out, **pending, **config)
        return o, inputs[7], pending["pending_rows"]

    def compare(self, got, want) -> str | None:
        for name, g, w in zip(("o", "state", "update rows"), got, want):
            wrong = self._compare_tensor(g, w)
            if wrong:
                return f"{name}: {wrong}"
        return None

    def _compare_tensor(self, got, want) -> str | None:
        err = _relative_error(got, want)
        tol = self.tolerance("triton", {})
        return None if err <= tol else f"relative error {err:.3g} over {tol:g}"


class GDNChunkedCase(GDNCase):
    """The chunked prefill: its output and final state, both checked."""

    def __init__(
        self, shape: GDNChunkedShape, profile: HardwareProfile, device, seed: int = 0, max_rotations: int | None = None
    ):
        super().__init__(shape, profile, device, seed, max_rotations)
        self.finals = [torch.empty_like(inputs[7]) for inputs in self.sets]

    def poison(self, i: int) -> None:
        super().poison(i)
        self.finals[i].fill_(float("nan"))

    def run(self, lowering: str, config: dict, i: int):
        *inputs, out = self.sets[i]
        if lowering == "reference":
            return reference.gdn_chunked(*inputs)
        from ..codegen.triton.gdn import gdn_chunked

        return gdn_chunked(
            *inputs, out=out, final_state=self.finals[i], chunk_size=config["chunk_size"], block_v=config["block_v"],
            precision=config["precision"], system_precision=config.get("system_precision", "tf32x3"),
            fused_output=config.get("fused_output", False), blocked_system=config.get("blocked_system", False),
        )  # fmt: skip

    def compare(self, got, want) -> str | None:
        for name, g, w in (("output", got[0], want[0]), ("final state", got[1], want[1])):
            wrong = self._compare_tensor(g, w)
            if wrong is not None:
                return f"{name}: {wrong}"
        return None


class AcceptCase(Case):
    def __init__(
        self, shape: AcceptShape, profile: HardwareProfile, device, seed: int = 0, max_rotations: int | None = None
    ):
        super().__init__(shape, profile, device, seed, max_rotations)
        s = shape
        self.rotations = self._rotations(s.batch * s.bs * s.vocab * 4)
        self.sets = []
        for _ in range(self.rotations):
            logits = self.rand(s.batch, s.bs, s.vocab, dtype=DTYPES[s.fmt])
            # drafts that match the target's argmax for a random prefix, so acceptance lengths vary
            draft = logits.argmax(-1)[:, : s.bs - 1].clone()
            cut = torch.randint(0, s.bs, (s.batch,), generator=self.gen, device=self.device)
            wrong = torch.arange(s.bs - 1, device=self.device)[None, :] >= cut[:, None]
            draft = torch.where(wrong, (draft + 1) % s.vocab, draft)
            self.sets.append((draft, logits))

    def run(self, lowering: str, config: dict, i: int):
        draft, logits = self.sets[i]
        if lowering == "reference":
            return reference.greedy_accept(draft, logits)
        from ..codegen.triton.accept import greedy_accept

        return greedy_accept(draft, logits, block_v=config["block_v"], chunk=config["chunk"])

    def compare(self, got, want) -> str | None:
        for name, g, w in zip(got._fields, got, want):
            if not torch.equal(g, w):
                return f"{name} differs from the reference"
        return None


CASES = {
    "linear": LinearCase,
    "verify_attention": AttentionCase,
    "draft_attention": DraftAttentionCase,
    "gdn_verify": GDNCase,
    "gdn_chunked": GDNChunkedCase,
    "causal_conv1d_update": ConvCase,
    "greedy_accept": AcceptCase,
}


def make_case(shape, profile: HardwareProfile, device, seed: int = 0, max_rotations: int | None = None) -> Case:
    return CASES[shape.op](shape, profile, device, seed, max_rotations)
