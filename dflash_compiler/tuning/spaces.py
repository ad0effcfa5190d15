"""Search spaces per kernel family, built from the launchers' own configs, with the configs that cannot run on a
profile pruned before they launch.

A shape (LinearShape, AttentionShape, DraftAttentionShape, GDNShape, GDNChunkedShape, ConvShape, AcceptShape)
is one tunable call: its `key` is the database's shape key and parses back (`parse_shape`). A space is discrete:
`choices` lists every parameter's values (always including the launcher's default), `suggest` draws a point from an
Optuna trial (the lowering first: only the Triton lowering has further parameters), `check` says why a point is
pruned (it cannot run on the profile, or its tiles overhang the dimension they cover; None if it is kept),
`default` is the point the launcher runs when given no config, and `config` turns a point into the (lowering,
config) that the database stores and the launchers take. The vendor GEMM is a lowering of the linear space at every
row count, so the crossover (graph/ops.py's VENDOR_GEMM_MIN_ROWS, the default) is measured per shape.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import itertools
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import triton

from ..codegen.triton import attention as attention_kernels
from ..codegen.triton import gdn as gdn_kernels
from ..codegen.triton import linear as linear_kernels
from ..codegen.triton.accept import _chunking
from ..codegen.triton.device import GpuFacts, compiling_for
from ..codegen.weight_formats import DenseWeight, FP8BlockWeight, FP8ChannelWeight, Int4Weight
from ..errors import DFlashError
from ..graph.ops import VENDOR_GEMM_MIN_ROWS
from ..hw_profiles import HardwareProfile

Params = dict[str, Any]

DENSE_FORMATS = ("bf16", "fp16", "fp32")
WEIGHT_FORMATS = (*DENSE_FORMATS, "fp8_channel", "fp8_block", "int4_sym", "int4_asym")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EPILOGUES = ("none", "residual", "swiglu")
# Row buckets a linear is tuned at (the verify rows of batch buckets x block 16, decode's 1, prefill chunks).
M_BUCKETS = (1, 16, 32, 64, 128, 256, 512, 1024)


def m_bucket(m: int) -> int:
    """The row bucket of an M: the smallest listed bucket >= m (the largest beyond them)."""
    return next((b for b in M_BUCKETS if b >= m), M_BUCKETS[-1])


def _p2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def _lowerings(profile: HardwareProfile, *extra: str) -> list[str]:
    """Triton everywhere; the PyTorch lowering competes on the CPU (where the batched runtime runs it)."""
    return ["triton", *extra] if profile.is_cuda else ["triton", "reference"]


def _accumulator_check(elements: int, num_warps: int, profile: HardwareProfile, what: str) -> str | None:
    regs = elements / (num_warps * profile.warp_size)
    if regs > profile.registers_per_thread:
        return f"{what} needs {regs:.0f} registers per thread, over the {profile.registers_per_thread} limit"
    if num_warps * profile.warp_size > profile.max_threads_per_block:
        return f"num_warps {num_warps} over {profile.max_threads_per_block} threads per block"
    return None


def _launcher_facts(profile: HardwareProfile):
    """Within it the launchers choose their defaults for the profile's GPU (on the CPU profile: their CPU ones)."""
    if not profile.is_cuda:
        return contextlib.nullcontext()
    return compiling_for(GpuFacts(profile.compute_capability, profile.sm_count, profile.smem_per_block))


def _upto(values: list[int], limit: int) -> list[int]:
    """The values up to limit (the smallest if none is): sizes past a dimension only waste work."""
    return [v for v in values if v <= limit] or [min(values)]


def _smem_check(nbytes: float, profile: HardwareProfile) -> str | None:
    if nbytes > profile.smem_per_block:
        return f"shared memory {int(nbytes)} B over the {profile.smem_per_block} B per block limit"
    return None


class Space:
    """The interface every family implements; see the module docstring."""

    op: str

    def __init__(self, shape, profile: HardwareProfile):
        self.shape, self.profile = shape, profile
        self._default: Params | None = None

    def choices(self) -> dict[str, list]:
        raise NotImplementedError

    def launcher_default(self) -> Params:
        raise NotImplementedError

    def limits(self, params: Params) -> str | None:
        """Why the point cannot run on the profile (over its limits, misaligned, an invalid combination)."""
        raise NotImplementedError

    def waste(self, params: Params) -> str | None:
        """Why the point can run but cannot pay (tiles past the dimension they cover)."""
        return None

    def alternatives(self) -> list[Params]:
        """Runnable points measured right after the default: structured alternatives (a kernel variant switched
        on, another grid family) that a short TPE run over the whole space can miss."""
        return []

    def default(self) -> Params:
        if self._default is None:
            self._default = self.launcher_default()
        return dict(self._default)

    def check(self, params: Params) -> str | None:
        """Why the point is pruned: over the limits, or waste (the default is never waste: it is what runs
        today, and the study is seeded with it)."""
        return self.limits(params) or (self.waste(params) if params != self.default() else None)

    def config(self, params: Params) -> tuple[str, dict[str, Any]]:
        """(lowering, the config the database stores)."""
        lowering = params["lowering"]
        return lowering, ({k: v for k, v in params.items() if k != "lowering"} if lowering == "triton" else {})

    def point(self, lowering: str, config: dict[str, Any]) -> Params | None:
        """The feasible point whose (lowering, config) this is (a database entry's), or None."""
        return next((p for p in self.feasible() if self.config(p) == (lowering, config)), None)

    def suggest(self, trial) -> Params:
        choices = self.choices()
        params = {"lowering": trial.suggest_categorical("lowering", choices["lowering"])}
        if params["lowering"] == "triton":
            for name, values in choices.items():
                if name != "lowering":
                    params[name] = trial.suggest_categorical(name, values)
        return params

    def points(self) -> list[Params]:
        """Every point of the space (runnable or not)."""
        choices = self.choices()
        names = [n for n in choices if n != "lowering"]
        out = [{"lowering": lw} for lw in choices["lowering"] if lw != "triton"]
        if "triton" in choices["lowering"]:
            for values in itertools.product(*(choices[n] for n in names)):
                out.append({"lowering": "triton", **dict(zip(names, values))})
        return out

    def feasible(self) -> list[Params]:
        return [p for p in self.points() if self.check(p) is None]

    def _with_default(self, choices: dict[str, list]) -> dict[str, list]:
        """Adds the default's values to the choices (the default is always a point of the space)."""
        for name, value in self.default().items():
            if value not in choices[name]:
                choices[name] = sorted([*choices[name], value], key=lambda v: (str(type(v)), v))
        return choices


# ---- linear --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearShape:
    """y [m, n_out] = x [m, k] @ W^T with W [n, k] (n = 2 n_out for swiglu), x in `act` (bf16/fp16/fp32)."""

    m: int
    n: int
    k: int
    fmt: str
    epilogue: str = "none"
    act: str = "bf16"
    op = "linear"

    def __post_init__(self):
        if self.fmt not in WEIGHT_FORMATS:
            raise DFlashError(f"parameter 'fmt': {self.fmt!r} is not one of {', '.join(WEIGHT_FORMATS)}")
        if self.epilogue not in EPILOGUES:
            raise DFlashError(f"parameter 'epilogue': {self.epilogue!r} is not one of {', '.join(EPILOGUES)}")
        if self.act not in DTYPES:
            raise DFlashError(f"parameter 'act': {self.act!r} is not one of {', '.join(DTYPES)}")

    @property
    def key(self) -> str:
        return f"m{self.m}_n{self.n}_k{self.k}_{self.epilogue}_x{self.act}"

    @property
    def n_out(self) -> int:
        return self.n // 2 if self.epilogue == "swiglu" else self.n

    @property
    def dense(self) -> bool:
        return self.fmt in DENSE_FORMATS

    @property
    def weight_bytes(self) -> float:
        return DTYPES[self.fmt].itemsize if self.dense else 0.5 if self.fmt.startswith("int4") else 1


_WEIGHT_TYPES = {
    "fp8_channel": FP8ChannelWeight,
    "fp8_block": FP8BlockWeight,
    "int4_sym": Int4Weight,
    "int4_asym": Int4Weight,
}


@functools.cache
def tvm_available() -> bool:
    """TVM's compiler is installed (apache-tvm): its linears can be built and timed here."""
    return importlib.util.find_spec("tvm") is not None


def tvm_supported(shape: LinearShape, profile: HardwareProfile) -> bool:
    """codegen/tvm/linear.py builds the call on this GPU: TVM installed and a CUDA profile (on the CPU the TVM
    lowering is tested, not tuned: its builds would dominate a short study)."""
    return profile.is_cuda and tvm_available()


def vendor_supported(shape: LinearShape, profile: HardwareProfile) -> bool:
    """What codegen/vendor_gemm.supports accepts, decided from the profile instead of live tensors."""
    if not profile.is_cuda or shape.act not in ("bf16", "fp16"):
        return False
    if shape.dense:
        return shape.fmt == shape.act
    return shape.fmt == "fp8_channel" and profile.fp8_tensor_cores and shape.n % 16 == 0 and shape.k % 16 == 0


class LinearSpace(Space):
    """codegen/triton/linear.py's LinearConfig (tiles, warps, stages, split-K or a stream-K grid of `sk` programs
    per SM), its FP8 variants (FP8 dot on FP8 tensor cores, or the weights decoded for a dot in the activations'
    dtype) and the vendor GEMM."""

    op = "linear"
    GRIDS = ("tile", "split2", "split4", "split8", "sk1", "sk2", "sk3")
    VARIANTS = ("prequant_x", "x_per_token", "int4_chunk_dot", "mma_sync", "tma")  # LinearConfig's kernel variants

    def _stand_in(self):
        # default_config dispatches on the weight's type only: an instance without tensors stands in for it
        cls = _WEIGHT_TYPES.get(self.shape.fmt, DenseWeight)
        return cls.__new__(cls)

    def _fp8(self) -> bool:
        return self.shape.fmt.startswith("fp8")

    def _prequant_possible(self) -> bool:
        """x quantized to FP8 before the GEMM: FP8 weights (with the FP8 dot) or INT4 weights (W4A8), on FP8
        tensor cores, from half-precision activations."""
        s = self.shape
        fp8_or_int4 = self._fp8() or s.fmt.startswith("int4")
        return fp8_or_int4 and self.profile.fp8_tensor_cores and s.act in ("bf16", "fp16")

    def _per_token_possible(self) -> bool:
        """W8A8 with one scale per token over all of K: FP8 per-channel weights, x pre-quantized."""
        return self.shape.fmt == "fp8_channel" and self._prequant_possible()

    def _tma_possible(self) -> bool:
        """The TMA kernel: sm90+, dense half-precision weights and activations alike, or FP8 per-channel weights on
        FP8 tensor cores (x quantized per token in front)."""
        s, p = self.shape, self.profile
        if not p.tensor_memory_accelerator or s.act not in ("bf16", "fp16"):
            return False
        return s.fmt == s.act or (s.fmt == "fp8_channel" and p.fp8_tensor_cores)

    def _tma_element_bytes(self) -> int:
        """Bytes per element of the rows the TMA kernel fetches (FP8 x is quantized in front)."""
        return 1 if self._fp8() else DTYPES[self.shape.act].itemsize

    def _block_k_choices(self) -> list[int]:
        s = self.shape
        if s.dense:
            return _upto([32, 64, 128, 256], max(16, _p2(s.k)))
        # chunks of 256 where no scale group bounds a chunk: FP8 per channel with per-tile scales
        per_tile = self._per_token_possible() or (s.fmt == "fp8_channel" and self._tma_possible())
        return [128, 256] if per_tile and s.k >= 256 else [128]

    def choices(self) -> dict[str, list]:
        s = self.shape
        choices = {
            "lowering": _lowerings(
                self.profile,
                *(["vendor"] if vendor_supported(s, self.profile) else []),
                *(["tvm"] if tvm_supported(s, self.profile) else []),
            ),
            "block_n": _upto([32, 64, 128, 256], max(16, _p2(s.n_out))),
            "block_m": _upto([16, 32, 64, 128], max(16, _p2(s.m))),
            "block_k": self._block_k_choices(),
            "num_warps": [2, 4, 8],
            "num_stages": [2, 3, 4, 5, 6],
            "grid": list(self.GRIDS),
            "fp8_dot": [False, True] if self._fp8() and self.profile.fp8_tensor_cores else [False],
            "prequant_x": [False, True] if self._prequant_possible() else [False],
            "x_per_token": [False, True] if self._per_token_possible() else [False],
            "int4_chunk_dot": [False, True] if s.fmt.startswith("int4") else [False],
            "mma_sync": [False, True] if self.profile.warpgroup_mma else [False],
            "tma": [False, True] if self._tma_possible() else [False],
        }
        return self._with_default(choices)

    def alternatives(self) -> list[Params]:
        """The Triton default with each variant the space offers switched on (x pre-quantized: FP8 weights'
        W8A8, INT4's W4A8; INT4's one dot per chunk), and the same for one program per 64-row tile with 4 warps
        and 6 stages: on the H200 that point with x pre-quantized took FP8 attn.qkv at 16 rows to 24.6 µs, where
        a 16-trial study had settled on 26.9 (bench/results/linear-variants-fp8-hwcvt-h200.json)."""
        default = self.default()
        if default["lowering"] != "triton":
            return []
        choices = self.choices()
        variants = [{name: True} for name in ("prequant_x", "int4_chunk_dot") if True in choices[name]]
        off = {name: False for name in self.VARIANTS}
        if True in choices["tma"]:
            variants.append({**off, "fp8_dot": self._fp8(), "tma": True})
        tiles = {"block_n": 64, "num_warps": 4, "num_stages": 6, "grid": "tile"}
        points = [{**default, **v} for v in variants] + [{**default, **tiles, **v} for v in [{}, *variants]]
        if True in choices["tma"]:
            # on the H200, 64-row tiles of 4 stages (FP8: chunks of 256), one program per tile or K split in two,
            # were the TMA kernel's best points for the 16-row gdn.out_proj and qkv in FP8 (17.0 and 25.3 µs with
            # x's quantization, bench/results/tma-linear-h200.json)
            bk = max(
                (b for b in choices["block_k"] if b * self._tma_element_bytes() <= 256), default=default["block_k"]
            )
            for grid in ("tile", "split2"):
                stream = {"block_n": 64, "block_k": bk, "num_warps": 4, "num_stages": 4, "grid": grid}
                points.append({**default, **off, **stream, "fp8_dot": self._fp8(), "tma": True})
        out = []
        for point in points:
            in_space = all(point[name] in choices[name] for name in point if name != "lowering")
            if point != default and point not in out and in_space and self.check(point) is None:
                out.append(point)
        return out

    def launcher_default(self) -> Params:
        s = self.shape
        if s.m >= VENDOR_GEMM_MIN_ROWS and vendor_supported(s, self.profile):
            return {"lowering": "vendor"}
        with _launcher_facts(self.profile):
            cfg = linear_kernels.default_config(
                self._stand_in(), s.m, s.n_out, s.k, torch.device("cpu"), s.epilogue == "swiglu"
            )
        params = self._params(cfg)
        # a default over the shared memory is shrunk, as the launcher does when its launch runs out of resources
        while self.limits(params) is not None and self._smem(params) > self.profile.smem_per_block:
            params = self._params(linear_kernels._smaller(self._config(params), s.dense))
        return params

    def _params(self, cfg: linear_kernels.LinearConfig) -> Params:
        if cfg.programs is not None:
            grid = f"sk{cfg.programs // self.profile.sm_count}"
        else:
            grid = "tile" if cfg.split_k == 1 else f"split{cfg.split_k}"
        fp8_dot = self._fp8() and self.profile.fp8_tensor_cores  # the launcher's default on sm89+
        return {
            "lowering": "triton",
            "block_n": cfg.block_n,
            "block_m": cfg.block_m,
            "block_k": cfg.block_k,
            "num_warps": cfg.num_warps,
            "num_stages": cfg.num_stages,
            "grid": grid,
            "fp8_dot": fp8_dot,
            "prequant_x": cfg.prequant_x,
            "x_per_token": cfg.x_per_token,
            "int4_chunk_dot": cfg.int4_chunk_dot,
            "mma_sync": cfg.mma_sync,
            "tma": cfg.tma,
        }

    def _config(self, params: Params) -> linear_kernels.LinearConfig:
        grid = params["grid"]
        programs = int(grid[2:]) * self.profile.sm_count if grid.startswith("sk") else None
        split = int(grid[5:]) if grid.startswith("split") else 1
        return linear_kernels.LinearConfig(
            block_n=params["block_n"],
            block_m=params["block_m"],
            block_k=params["block_k"],
            num_warps=params["num_warps"],
            num_stages=params["num_stages"],
            split_k=split,
            programs=programs,
            prequant_x=params.get("prequant_x", False),
            x_per_token=params.get("x_per_token", False),
            int4_chunk_dot=params.get("int4_chunk_dot", False),
            mma_sync=params.get("mma_sync", False),
            tma=params.get("tma", False),
        )

    def config(self, params: Params) -> tuple[str, dict[str, Any]]:
        if params["lowering"] != "triton":
            return params["lowering"], {}
        cfg = {**self._config(params).__dict__, "fp8_dot": params["fp8_dot"]}
        for variant in self.VARIANTS:  # named only where chosen (entries without them read as off)
            if not cfg[variant]:
                del cfg[variant]
        return "triton", cfg

    def _smem(self, params: Params) -> float:
        s = self.shape
        w_tile = params["block_n"] * params["block_k"] * s.weight_bytes * (2 if s.epilogue == "swiglu" else 1)
        x_tile = params["block_k"] * params["block_m"] * DTYPES[s.act].itemsize
        return params["num_stages"] * (w_tile + x_tile)

    def waste(self, params: Params) -> str | None:
        s = self.shape
        if params["lowering"] != "triton":
            return None
        if params["block_m"] > max(16, _p2(s.m)):
            return f"block_m {params['block_m']} over M={s.m}"
        if params["block_n"] > max(16, _p2(s.n_out)):
            return f"block_n {params['block_n']} over N={s.n_out}"
        if params["block_k"] > max(16, _p2(s.k)):
            return f"block_k {params['block_k']} over K={s.k}"
        return None

    def limits(self, params: Params) -> str | None:
        s, p = self.shape, self.profile
        lowering = params["lowering"]
        if lowering == "vendor":
            return None if vendor_supported(s, p) else f"the vendor GEMM does not take {s.fmt} weights here"
        if lowering == "tvm":
            return None if tvm_supported(s, p) else "the TVM lowering needs TVM installed and a CUDA profile"
        if lowering != "triton":
            return None
        per_tile_scales = s.fmt == "fp8_channel" and (params.get("x_per_token") or params.get("tma"))
        if not s.dense and params["block_k"] != 128 and not (per_tile_scales and params["block_k"] % 128 == 0):
            return "quantized weights need block_k 128 (one scale group per chunk) but with per-tile scales"
        if params.get("tma"):
            if not self._tma_possible():
                return "the TMA kernel needs sm90+ and dense bf16/fp16 or FP8 per-channel weights"
            if any(params.get(v) for v in self.VARIANTS if v != "tma"):
                return "the TMA kernel is its own variant (FP8 weights quantize x per token)"
            if self._fp8() and not params["fp8_dot"]:
                return "the TMA kernel runs FP8 weights on the FP8 dot"
            if params["block_k"] * self._tma_element_bytes() > 256:
                return "the TMA kernel fetches at most 256 bytes of a row per tile"
            if (s.k * self._tma_element_bytes()) % 16:
                return "the TMA kernel needs rows of 16-byte multiples"
        if params["fp8_dot"] and not (self._fp8() and p.fp8_tensor_cores):
            return "the FP8 dot needs FP8 weights and FP8 tensor cores"
        if params.get("prequant_x") and not self._prequant_possible():
            return "a pre-quantized x needs FP8 or INT4 weights, FP8 tensor cores and bf16/fp16 activations"
        if params.get("prequant_x") and self._fp8() and not params["fp8_dot"]:
            return "a pre-quantized x needs the FP8 dot"
        if params.get("x_per_token") and not (params.get("prequant_x") and self._per_token_possible()):
            return "per-token x scales need a pre-quantized x and FP8 per-channel weights"
        if params.get("int4_chunk_dot") and not s.fmt.startswith("int4"):
            return "one dot per chunk is a variant of the INT4 kernel"
        if params.get("mma_sync") and not p.warpgroup_mma:
            return "mma.sync in place of wgmma is a Hopper variant"
        grid = params["grid"]
        if grid.startswith("split") and int(grid[5:]) > triton.cdiv(s.k, params["block_k"]):
            return f"{grid} over the {triton.cdiv(s.k, params['block_k'])} K chunks"
        acc = params["block_n"] * params["block_m"] * (2 if s.epilogue == "swiglu" else 1)
        return _accumulator_check(acc, params["num_warps"], p, "the accumulator") or _smem_check(self._smem(params), p)


# ---- attention -------------------------------------------------------------------------------------------------

# the context length of the attention calls the lowering takes its tuned configs from (and the tuner's default)
ATTENTION_CONTEXT = 4096


@dataclass(frozen=True)
class AttentionShape:
    """Target verify attention over a paged KV cache: batch requests of t block queries, context keys each."""

    batch: int
    t: int
    hq: int
    hkv: int
    d: int
    context: int
    fmt: str = "bf16"  # q/K/V dtype
    op = "verify_attention"

    @property
    def key(self) -> str:
        return f"b{self.batch}_t{self.t}_hq{self.hq}_hkv{self.hkv}_d{self.d}_ctx{self.context}"

    @property
    def rows(self) -> int:
        return self.t * (self.hq // self.hkv)


@dataclass(frozen=True)
class DraftAttentionShape(AttentionShape):
    """The drafter's attention (full layers): t block queries over `context` cached context keys and the block's own
    keys."""

    op = "draft_attention"


class AttentionSpace(Space):
    """codegen/triton/attention.py's AttentionConfig and the split-KV count (verify and draft attention)."""

    op = "verify_attention"

    def _ctas(self, num_warps: int) -> int:
        return 1 if num_warps >= 8 else 2  # as the launcher sizes its default split count

    def choices(self) -> dict[str, list]:
        return self._with_default(
            {
                "lowering": _lowerings(self.profile),
                "block_m": _upto([16, 32, 64, 128], max(16, _p2(self.shape.rows))),
                "block_n": _upto([16, 32, 64, 128], max(16, _p2(self.shape.context))),
                "num_warps": [2, 4, 8],
                "num_stages": [1, 2, 3, 4],
                "num_splits": [1, 2, 4, 8, 16, 32, 64],
            }
        )

    def launcher_default(self) -> Params:
        s = self.shape
        cfg = attention_kernels.default_config(s.rows, s.d)
        units = s.batch * s.hkv * triton.cdiv(s.rows, cfg.block_m)
        with _launcher_facts(self.profile):
            splits = attention_kernels.default_num_splits(
                units, s.context, torch.device("cpu"), self._ctas(cfg.num_warps)
            )
        return {"lowering": "triton", **cfg.__dict__, "num_splits": splits}

    def waste(self, params: Params) -> str | None:
        s = self.shape
        if params["lowering"] == "triton" and params["block_m"] > max(16, _p2(s.rows)):
            return f"block_m {params['block_m']} over the {s.rows} query rows per KV head"
        return None

    def limits(self, params: Params) -> str | None:
        s, p = self.shape, self.profile
        if params["lowering"] != "triton":
            return None
        if params["num_splits"] > 1 and s.context / params["num_splits"] < params["block_n"]:
            return f"{params['num_splits']} splits of {s.context} keys are shorter than block_n {params['block_n']}"
        # the pipelined K and V tiles alone (a lower bound: a launch that still runs out fails as a trial)
        smem = 2 * params["num_stages"] * params["block_n"] * s.d * DTYPES[s.fmt].itemsize
        return _accumulator_check(params["block_m"] * s.d, params["num_warps"], p, "the output tile") or _smem_check(
            smem, p
        )


# ---- Gated DeltaNet verify -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GDNShape:
    """The gated delta rule over a verify block: batch requests of t positions, heads q/k heads, hv value heads."""

    batch: int
    t: int
    heads: int
    hv: int
    dk: int
    dv: int
    fmt: str = "bf16"  # q/k/v dtype (the state is fp32)
    op = "gdn_verify"

    @property
    def key(self) -> str:
        return f"b{self.batch}_t{self.t}_h{self.heads}_hv{self.hv}_k{self.dk}_v{self.dv}"


@dataclass(frozen=True)
class GDNChunkedShape(GDNShape):
    """The chunked (UT/WY) gated delta rule of a prefill chunk of t tokens."""

    op = "gdn_chunked"


class GDNSpace(Space):
    """codegen/triton/gdn.py's verify launch: the algorithm (position by position; the block as one UT/WY chunk on
    the tensor cores, in one launch or factored into a per-head factors launch and a per-V-slice state launch),
    the V slice per program, warps; for the recurrent kernel unrolled steps or the block-prefetch loop, for the
    chunked block its dot precision, K chunk and the K loop's pipeline stages, for the single-launch one whether
    the pending block's commit runs inside it (fused_commit) or in a launch of its own, for the factored one the
    factors launch's warps."""

    op = "gdn_verify"
    CHUNKED = ("chunked", "factored")
    FACTOR_WARPS = 4  # the value a point that has no factors launch carries

    def choices(self) -> dict[str, list]:
        return self._with_default(
            {
                "lowering": _lowerings(self.profile),
                "algorithm": list(gdn_kernels.ALGORITHMS),
                "block_v": _upto([16, 32, 64, 128], self.shape.dv),
                "num_warps": [1, 2, 4, 8],
                "unroll": [False, True],
                "precision": list(gdn_kernels.PRECISIONS),
                "block_k": _upto([16, 32, 64, 128], self.shape.dk),
                "factor_warps": [1, 2, 4, 8],
                "num_stages": [1, 2, 3, 4],
                "fused_commit": [False, True],
            }
        )

    def launcher_default(self) -> Params:
        s = self.shape
        cfg = gdn_kernels._recurrent_config(s.t, s.dv, None, None, None)
        return {
            "lowering": "triton", "algorithm": "recurrent", "block_v": cfg["BV"], "num_warps": cfg["num_warps"],
            "unroll": cfg["UNROLL"], "precision": gdn_kernels.PRECISIONS[0], "block_k": s.dk,
            "factor_warps": self.FACTOR_WARPS, "num_stages": gdn_kernels.BLOCK_STAGES, "fused_commit": False,
        }  # fmt: skip

    def alternatives(self) -> list[Params]:
        """The chunked block at each V slice with 4 warps, K whole and in chunks of 32 (at K = 128 on sm90, 231-255
        registers per thread against 95-125, cross-compiled), and the factored block at each V slice with K in
        chunks of 32, 2 or 4 warps, and one warp for its factors (the best on the H200 at batch 16): a TPE run
        over the recurrent kernel's larger share of the space may not reach them."""
        default = self.default()
        if default["lowering"] != "triton":
            return []
        choices = self.choices()
        base = {**default, "unroll": False, "num_warps": 4}
        bk32 = min(32, self.shape.dk)
        points = [
            {**base, "algorithm": "chunked", "block_v": bv, "block_k": bk, "fused_commit": fused}
            for fused in (False, True)
            for bk in dict.fromkeys([self.shape.dk, bk32])
            for bv in choices["block_v"]
        ] + [
            {**base, "algorithm": "factored", "block_v": bv, "block_k": bk32, "num_warps": nw, "factor_warps": 1}
            for nw in (2, 4)
            for bv in choices["block_v"]
        ]
        return [p for p in points if p["block_k"] in choices["block_k"] and self.check(p) is None]

    def config(self, params: Params) -> tuple[str, dict[str, Any]]:
        """The options of the chosen algorithm only (a recurrent config stores no algorithm, as before it had one)."""
        lowering, config = super().config(params)
        if lowering == "triton":
            algorithm = config.pop("algorithm")
            if not (algorithm == "chunked" and config["fused_commit"]):  # named only where it is set, as before
                del config["fused_commit"]
            if algorithm == "recurrent":
                del config["precision"], config["block_k"], config["factor_warps"], config["num_stages"]
            else:
                config = {**config, "algorithm": algorithm}
                del config["unroll"]
                if algorithm == "chunked":
                    del config["factor_warps"]
                if config["num_stages"] == gdn_kernels.BLOCK_STAGES:  # named only where it differs, as before
                    del config["num_stages"]
        return lowering, config

    def waste(self, params: Params) -> str | None:
        if params["lowering"] != "triton":
            return None
        if params["algorithm"] in self.CHUNKED and params["unroll"]:
            return "unroll is an option of the recurrent kernel (the same chunked point without it)"
        if params["algorithm"] == "recurrent" and params["precision"] != gdn_kernels.PRECISIONS[0]:
            return "precision is an option of the chunked block (the same recurrent point without it)"
        if params["algorithm"] == "recurrent" and params["block_k"] != self.shape.dk:
            return "block_k is an option of the chunked block (the same recurrent point without it)"
        if params["algorithm"] != "factored" and params["factor_warps"] != self.FACTOR_WARPS:
            return "factor_warps is an option of the factored block (the same point without it)"
        if params["algorithm"] == "recurrent" and params["num_stages"] != gdn_kernels.BLOCK_STAGES:
            return "num_stages is an option of the chunked block (the same recurrent point without it)"
        if params["algorithm"] != "chunked" and params["fused_commit"]:
            return "fused_commit is an option of the single-launch chunked block (the same point without it)"
        return None

    def limits(self, params: Params) -> str | None:
        s = self.shape
        if params["lowering"] != "triton":
            return None
        if params["block_v"] > s.dv or s.dv % params["block_v"]:
            return f"block_v {params['block_v']} does not divide V={s.dv}"
        if params["algorithm"] in self.CHUNKED:
            if s.t > 64 or s.dk < 16:
                return f"the chunked block takes at most 64 positions and K >= 16 (t={s.t}, K={s.dk})"
            if s.dk % params["block_k"]:
                return f"block_k {params['block_k']} does not divide K={s.dk}"
            # a K chunk of the state slice, and of the block's keys and queries (fp32), in registers
            rows = max(16, _p2(s.t))
            regs = params["block_k"] * params["block_v"] + 2 * rows * params["block_k"]
            state_check = _accumulator_check(regs, params["num_warps"], self.profile, "the chunked block")
            if state_check or params["algorithm"] == "chunked":
                return state_check
            # the factors launch: a K chunk of the keys and queries and a few [rows, rows] factors
            regs = 2 * rows * params["block_k"] + 6 * rows * rows
            return _accumulator_check(regs, params["factor_warps"], self.profile, "the factors launch")
        return _accumulator_check(s.dk * params["block_v"], params["num_warps"], self.profile, "the state slice")


class GDNChunkedSpace(Space):
    """codegen/triton/gdn.py's gdn_chunked: the chunk length, the V slice of the scan, its dot precision (with 16-bit
    q/k/v also "half": the chunks kept in that dtype), the UT/WY system's and its form (whole 64 x 64 products or
    16-row blocks), and whether the scan computes the outputs itself (the accuracy of each is checked against the
    reference like any result)."""

    op = "gdn_chunked"

    def choices(self) -> dict[str, list]:
        return self._with_default(
            {
                "lowering": _lowerings(self.profile),
                "chunk_size": [16, 32, 64, 128],
                "block_v": _upto([16, 32, 64, 128], self.shape.dv),
                "precision": [p for p in gdn_kernels.CHUNKED_PRECISIONS if p != "half" or self.shape.fmt != "fp32"],
                "system_precision": list(gdn_kernels.SYSTEM_PRECISIONS),
                "fused_output": [False, True],
                "blocked_system": [False, True],
            }
        )

    def launcher_default(self) -> Params:
        with _launcher_facts(self.profile):
            chunk = gdn_kernels.default_chunk_size(torch.device("cpu"), self.shape.dk)
        precision = gdn_kernels.default_chunked_precision(DTYPES[self.shape.fmt])
        block_v = min(gdn_kernels.default_chunked_block_v(precision), self.shape.dv)
        return {"lowering": "triton", "chunk_size": chunk, "block_v": block_v, "precision": precision,
                "system_precision": "tf32", "fused_output": False, "blocked_system": False}  # fmt: skip

    def waste(self, params: Params) -> str | None:
        if params["lowering"] == "triton" and params["chunk_size"] > max(16, _p2(self.shape.t)):
            return f"chunk_size {params['chunk_size']} over the {self.shape.t} tokens"
        return None

    def limits(self, params: Params) -> str | None:
        s = self.shape
        if params["lowering"] != "triton":
            return None
        if params["block_v"] > s.dv or s.dv % params["block_v"]:
            return f"block_v {params['block_v']} does not divide V={s.dv}"
        if params.get("blocked_system") and not (
            params["precision"] == "half"
            and params["chunk_size"] == 64
            and params["system_precision"] != "tf32_refined"
        ):
            return "blocked_system solves 64-token chunks in 'half' at tf32 or tf32x3"
        # the scan's state slice and one chunk's keys stay in registers (8 warps); the prepare kernel holds a
        # chunk's fp32 keys and products in shared memory
        acc = _accumulator_check(s.dk * params["block_v"] + params["chunk_size"] * s.dk, 8, self.profile, "the scan")
        return acc or _smem_check(gdn_kernels.prepare_shared_bytes(params["chunk_size"], s.dk), self.profile)


# ---- GDN causal conv ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvShape:
    """The GDN layer's depthwise causal conv over a verify block: batch requests of t positions, channels wide,
    width taps."""

    batch: int
    t: int
    channels: int
    width: int
    fmt: str = "bf16"  # x / y dtype
    op = "causal_conv1d_update"

    @property
    def key(self) -> str:
        return f"b{self.batch}_t{self.t}_c{self.channels}_w{self.width}"


class ConvSpace(Space):
    """codegen/triton/gdn.py's conv update: positions x channels per program, warps."""

    op = "causal_conv1d_update"

    def choices(self) -> dict[str, list]:
        return self._with_default(
            {
                "lowering": _lowerings(self.profile),
                "block_t": _upto([1, 2, 4, 8, 16], _p2(self.shape.t)),
                "block_c": _upto([16, 32, 64, 128, 256, 512], _p2(self.shape.channels)),
                "num_warps": [1, 2, 4, 8],
            }
        )

    def launcher_default(self) -> Params:
        return {"lowering": "triton", **gdn_kernels.conv_config(self.shape.t)}

    def waste(self, params: Params) -> str | None:
        if params["lowering"] == "triton" and params["block_t"] * params["block_c"] < params["num_warps"] * 32:
            return (
                f"a {params['block_t']} x {params['block_c']} tile leaves threads of {params['num_warps']} warps idle"
            )
        return None

    def limits(self, params: Params) -> str | None:
        if params["lowering"] != "triton":
            return None
        return _accumulator_check(params["block_t"] * params["block_c"], params["num_warps"], self.profile, "the tile")


# ---- greedy acceptance ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AcceptShape:
    """Greedy acceptance of batch verify blocks of bs tokens over a vocabulary of vocab logits (fp32)."""

    batch: int
    bs: int
    vocab: int
    fmt: str = "fp32"  # logits dtype
    op = "greedy_accept"

    @property
    def key(self) -> str:
        return f"b{self.batch}_bs{self.bs}_v{self.vocab}"


class AcceptSpace(Space):
    """codegen/triton/accept.py's argmax partials: block_v logits per load, chunk logits per program."""

    op = "greedy_accept"

    def choices(self) -> dict[str, list]:
        return self._with_default(
            {
                "lowering": _lowerings(self.profile),
                "block_v": _upto([256, 512, 1024, 2048, 4096], _p2(self.shape.vocab)),
                "chunk": _upto([1024, 2048, 4096, 8192, 16384, 32768], _p2(self.shape.vocab)),
            }
        )

    def launcher_default(self) -> Params:
        block_v, chunk = _chunking(self.shape.vocab, None, None)
        return {"lowering": "triton", "block_v": block_v, "chunk": chunk}

    def waste(self, params: Params) -> str | None:
        if params["lowering"] != "triton":
            return None
        vocab_p2 = _p2(self.shape.vocab)
        if params["block_v"] > vocab_p2:
            return f"block_v {params['block_v']} over the vocabulary ({self.shape.vocab})"
        if params["chunk"] > max(params["block_v"], vocab_p2):
            return f"chunk {params['chunk']} over the vocabulary ({self.shape.vocab})"
        return None

    def limits(self, params: Params) -> str | None:
        if params["lowering"] != "triton":
            return None
        if params["chunk"] % params["block_v"]:
            return f"chunk {params['chunk']} is not a multiple of block_v {params['block_v']}"
        if math.ceil(self.shape.vocab / params["chunk"]) > 4096:
            return "more than 4096 chunks per row"
        return None


# ---- registry ------------------------------------------------------------------------------------------------

SPACES: dict[str, type[Space]] = {
    "linear": LinearSpace,
    "verify_attention": AttentionSpace,
    "draft_attention": AttentionSpace,
    "gdn_verify": GDNSpace,
    "gdn_chunked": GDNChunkedSpace,
    "causal_conv1d_update": ConvSpace,
    "greedy_accept": AcceptSpace,
}
_ATTENTION_KEY = r"b(?P<batch>\d+)_t(?P<t>\d+)_hq(?P<hq>\d+)_hkv(?P<hkv>\d+)_d(?P<d>\d+)_ctx(?P<context>\d+)"
_GDN_KEY = r"b(?P<batch>\d+)_t(?P<t>\d+)_h(?P<heads>\d+)_hv(?P<hv>\d+)_k(?P<dk>\d+)_v(?P<dv>\d+)"
_KEYS = {
    "linear": (LinearShape, r"m(?P<m>\d+)_n(?P<n>\d+)_k(?P<k>\d+)_(?P<epilogue>[a-z]+)_x(?P<act>[a-z0-9]+)"),
    "verify_attention": (AttentionShape, _ATTENTION_KEY),
    "draft_attention": (DraftAttentionShape, _ATTENTION_KEY),
    "gdn_verify": (GDNShape, _GDN_KEY),
    "gdn_chunked": (GDNChunkedShape, _GDN_KEY),
    "causal_conv1d_update": (ConvShape, r"b(?P<batch>\d+)_t(?P<t>\d+)_c(?P<channels>\d+)_w(?P<width>\d+)"),
    "greedy_accept": (AcceptShape, r"b(?P<batch>\d+)_bs(?P<bs>\d+)_v(?P<vocab>\d+)"),
}


def space_for(shape, profile: HardwareProfile) -> Space:
    return SPACES[shape.op](shape, profile)


def parse_shape(op: str, shape_key: str, fmt: str):
    """The shape of a database key (the inverse of `shape.key`)."""
    if op not in _KEYS:
        raise DFlashError(f"parameter 'op': no search space for {op!r} (ops: {', '.join(_KEYS)})")
    cls, pattern = _KEYS[op]
    match = re.fullmatch(pattern, shape_key)
    if match is None:
        raise DFlashError(f"parameter 'shape_key': {shape_key!r} is not a {op} shape key")
    fields = {k: (v if k in ("epilogue", "act") else int(v)) for k, v in match.groupdict().items()}
    return cls(**fields, fmt=fmt)
