"""Weight formats the compiler emits for linear layers y = x @ W^T, W [N, K]: quantizers, loaders, exact dequant.

Every format is a dataclass of tensors; `dequantize()` returns, in fp32, exactly the values the kernels in
codegen/triton/linear.py multiply by, so it is the reference those kernels are tested against.

- DenseWeight: W itself (bf16, fp16 or fp32).
- FP8ChannelWeight: qweight [N, K] float8_e4m3fn, scale [N] fp32; W[n, k] = q[n, k] * scale[n].
- FP8BlockWeight: the layout of official Qwen FP8 checkpoints: qweight [N, K] float8_e4m3fn (`weight`) and
  scale_inv [ceil(N/128), ceil(K/128)] fp32 (`weight_scale_inv`); W[n, k] = q[n, k] * scale_inv[n // 128, k // 128].
- Int4Weight: 4-bit weight-only, groups of `group_size` (a multiple of 128) inputs along K, symmetric (zero 8) or
  asymmetric (a zero point per group and output); W[n, k] = (q[n, k] - zero[g, n]) * scales[g, n], g = k // group_size.

INT4 packed layout (ours). K is cut into runs of 128 inputs, one run per 16 int32 words:
    qweight int32 [N, 16 * ceil(K / 128)]; in run r of row n, word w (0..15) holds the two adjacent inputs
    k = 128 r + 32 j + 2 w + h (h = 0, 1) of plane j (0..3) in bits 16 h + 4 j .. +3, as unsigned nibbles 0..15;
    inputs past K are 0.
    scales [G, N] (fp16, bf16 or fp32), G = ceil(K / group_size); contiguous over the outputs of one group.
    qzeros int32 [G, ceil(N / 8)] (asymmetric only): the zero of output n in group g is bits 4(n % 8).. of word
    [g, n // 8]. Symmetric weights store no zeros (zero 8).
Why: a kernel tile of BN rows by one run is BN rows of 64 contiguous bytes (16-byte loads, every sector used).
Plane j of the 16 words is the 32 consecutive inputs 128 r + 32 j .. + 31 (two k16 steps of a tensor-core dot,
against a contiguous slice of activations), and one shift and one mask-or of a word, (w >> 4j) & 0x000F000F |
magic, yields the 16-bit float pair (k, k + 1) that a dot operand register holds: one 32-bit op per two weights.

GPTQ (qweight [K/8, N], nibble j of word [r, n] = input 8r + j; qzeros [G, N/8] storing zero - 1 in v1
checkpoints; scales [G, N]) and AWQ (qweight [K, N/8] with nibble i of word [k, c] = output 8c + [0,2,4,6,1,3,5,7][i];
qzeros alike, no offset; scales [G, N]) convert to and from this layout exactly.

FP8 activations (the FP8 dot path): quantized dynamically per token and per 128-input group, the activation
granularity of the Qwen FP8 block recipe (a single scale per token would need a pass over x before the GEMM).
`quantize_fp8_activations` is the reference of what the kernel computes in registers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dflash_compiler.errors import DFlashError

FP8_MAX = 448.0
FP8_BLOCK = 128
INT4_RUN = 128
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
ROW_CHUNK = 8192  # rows quantized at a time: bounds the fp32/int64 temporaries on large matrices (lm_head)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words holding 32-bit patterns -> int32 with the same bits."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _unpack_nibbles(words: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words -> nibbles (int64), the 8 nibbles of each word laid out along a new axis after `dim` (j = 0..7)."""
    shifts = torch.arange(0, 32, 4, device=words.device)
    w = words.to(torch.int64).unsqueeze(dim + 1)
    shape = [1] * w.dim()
    shape[dim + 1] = 8
    return (w >> shifts.view(shape)) & 0xF


def _pack_nibbles(q: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of _unpack_nibbles: nibbles with an axis of 8 at dim + 1 -> int32 words."""
    shape = [1] * q.dim()
    shape[dim + 1] = 8
    shifts = torch.arange(0, 32, 4, device=q.device).view(shape)
    return _to_int32((q.to(torch.int64) << shifts).sum(dim + 1))


@dataclass
class DenseWeight:
    """W [N, K] as stored (bf16 in the models; fp16/fp32 accepted)."""

    weight: torch.Tensor

    def __post_init__(self) -> None:
        if self.weight.dim() != 2 or not self.weight.is_floating_point() or self.weight.element_size() < 2:
            raise DFlashError(
                f"weight: expected a 2-D bf16/fp16/fp32 tensor, got {self.weight.dtype} {tuple(self.weight.shape)}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def dequantize(self) -> torch.Tensor:
        return self.weight.float()

    def rows(self, start: int, stop: int) -> DenseWeight:
        return DenseWeight(self.weight[start:stop])

    def to(self, device: torch.device | str) -> DenseWeight:
        return DenseWeight(self.weight.to(device))


@dataclass
class FP8ChannelWeight:
    """qweight [N, K] float8_e4m3fn with one fp32 scale per output row."""

    qweight: torch.Tensor
    scale: torch.Tensor

    def __post_init__(self) -> None:
        if self.qweight.dim() != 2 or self.qweight.dtype != torch.float8_e4m3fn:
            raise DFlashError(f"qweight: expected a 2-D float8_e4m3fn tensor, got {self.qweight.dtype}")
        if self.scale.shape != (self.qweight.shape[0],) or self.scale.dtype != torch.float32:
            raise DFlashError(
                f"scale: expected fp32 [{self.qweight.shape[0]}], got {self.scale.dtype} {tuple(self.scale.shape)}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)

    @property
    def nbytes(self) -> int:
        return self.qweight.numel() + 4 * self.scale.numel()

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]

    def rows(self, start: int, stop: int) -> FP8ChannelWeight:
        return FP8ChannelWeight(self.qweight[start:stop], self.scale[start:stop])

    def to(self, device: torch.device | str) -> FP8ChannelWeight:
        return FP8ChannelWeight(self.qweight.to(device), self.scale.to(device))


@dataclass
class FP8BlockWeight:
    """qweight [N, K] float8_e4m3fn with one fp32 factor per 128x128 block (Qwen's `weight_scale_inv`)."""

    qweight: torch.Tensor
    scale_inv: torch.Tensor

    def __post_init__(self) -> None:
        if self.qweight.dim() != 2 or self.qweight.dtype != torch.float8_e4m3fn:
            raise DFlashError(f"weight: expected a 2-D float8_e4m3fn tensor, got {self.qweight.dtype}")
        n, k = self.qweight.shape
        want = (_cdiv(n, FP8_BLOCK), _cdiv(k, FP8_BLOCK))
        if tuple(self.scale_inv.shape) != want or self.scale_inv.dtype != torch.float32:
            raise DFlashError(
                f"weight_scale_inv: expected fp32 {list(want)} for weight {[n, k]} (128x128 blocks), "
                f"got {self.scale_inv.dtype} {list(self.scale_inv.shape)}"
            )

    @classmethod
    def from_checkpoint(cls, weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> FP8BlockWeight:
        """The `weight` / `weight_scale_inv` pair of an official Qwen FP8 checkpoint (scales may be stored bf16)."""
        if weight_scale_inv.is_floating_point() and weight_scale_inv.dtype != torch.float32:
            weight_scale_inv = weight_scale_inv.float()
        return cls(weight.contiguous(), weight_scale_inv.contiguous())

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)

    @property
    def nbytes(self) -> int:
        return self.qweight.numel() + 4 * self.scale_inv.numel()

    def dequantize(self) -> torch.Tensor:
        n, k = self.qweight.shape
        s = self.scale_inv.repeat_interleave(FP8_BLOCK, 0)[:n].repeat_interleave(FP8_BLOCK, 1)[:, :k]
        return self.qweight.float() * s

    def rows(self, start: int, stop: int) -> FP8BlockWeight:
        """Output rows start:stop; start must be a multiple of 128."""
        if start % FP8_BLOCK:
            raise DFlashError(f"start: must be a multiple of {FP8_BLOCK}, got {start}")
        stop = min(stop, self.qweight.shape[0])
        return FP8BlockWeight(self.qweight[start:stop], self.scale_inv[start // FP8_BLOCK : _cdiv(stop, FP8_BLOCK)])

    def to(self, device: torch.device | str) -> FP8BlockWeight:
        return FP8BlockWeight(self.qweight.to(device), self.scale_inv.to(device))


@dataclass
class Int4Weight:
    """4-bit weight-only in the packed layout of the module docstring."""

    qweight: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor | None
    in_features: int
    group_size: int = 128

    def __post_init__(self) -> None:
        n = self.qweight.shape[0] if self.qweight.dim() == 2 else -1
        k, g = self.in_features, self.group_size
        if g <= 0 or g % INT4_RUN:
            raise DFlashError(f"group_size: must be a positive multiple of {INT4_RUN}, got {g}")
        if self.qweight.dtype != torch.int32 or tuple(self.qweight.shape) != (n, 16 * _cdiv(k, INT4_RUN)):
            raise DFlashError(
                f"qweight: expected int32 [N, {16 * _cdiv(k, INT4_RUN)}] for in_features {k}, "
                f"got {self.qweight.dtype} {list(self.qweight.shape)}"
            )
        if tuple(self.scales.shape) != (_cdiv(k, g), n) or not self.scales.is_floating_point():
            raise DFlashError(
                f"scales: expected float [{_cdiv(k, g)}, {n}], got {self.scales.dtype} {list(self.scales.shape)}"
            )
        if self.qzeros is not None and (
            self.qzeros.dtype != torch.int32 or tuple(self.qzeros.shape) != (_cdiv(k, g), _cdiv(n, 8))
        ):
            raise DFlashError(
                f"qzeros: expected int32 [{_cdiv(k, g)}, {_cdiv(n, 8)}], "
                f"got {self.qzeros.dtype} {list(self.qzeros.shape)}"
            )

    @property
    def symmetric(self) -> bool:
        return self.qzeros is None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.qweight.shape[0], self.in_features)

    @property
    def nbytes(self) -> int:
        zeros = 0 if self.qzeros is None else 4 * self.qzeros.numel()
        return 4 * self.qweight.numel() + self.scales.numel() * self.scales.element_size() + zeros

    def rows(self, start: int, stop: int) -> Int4Weight:
        """Output rows start:stop; start must be a multiple of 8."""
        if start % 8:
            raise DFlashError(f"start: must be a multiple of 8, got {start}")
        stop = min(stop, self.qweight.shape[0])
        qz = None if self.qzeros is None else self.qzeros[:, start // 8 : _cdiv(stop, 8)]
        return Int4Weight(self.qweight[start:stop], self.scales[:, start:stop], qz, self.in_features, self.group_size)

    def to(self, device: torch.device | str) -> Int4Weight:
        qz = None if self.qzeros is None else self.qzeros.to(device)
        return Int4Weight(self.qweight.to(device), self.scales.to(device), qz, self.in_features, self.group_size)

    # ---- unpacked views -------------------------------------------------------------------------------------
    def unpack(self) -> torch.Tensor:
        """The nibbles q [N, K] (int64, 0..15)."""
        n = self.qweight.shape[0]
        runs = self.qweight.shape[1] // 16
        nib = _unpack_nibbles(self.qweight.view(n, runs, 16), 2)  # [N, R, 16 (w), 8 (i = 4h + j)]
        nib = nib.view(n, runs, 16, 2, 4).permute(0, 1, 4, 2, 3)  # [N, R, j, w, h]: input 32j + 2w + h
        return nib.reshape(n, runs * INT4_RUN)[:, : self.in_features]

    def zeros(self) -> torch.Tensor:
        """Zero points [G, N] (int64); 8 everywhere for symmetric weights."""
        n = self.qweight.shape[0]
        if self.qzeros is None:
            return torch.full((self.scales.shape[0], n), 8, dtype=torch.int64, device=self.qweight.device)
        return _unpack_nibbles(self.qzeros, 1).flatten(1)[:, :n]

    def dequantize(self) -> torch.Tensor:
        k, g = self.in_features, self.group_size
        z = self.zeros().repeat_interleave(g, 0)[:k].T
        s = self.scales.float().repeat_interleave(g, 0)[:k].T
        return (self.unpack() - z).float() * s

    @classmethod
    def from_unpacked(
        cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int = 128
    ) -> Int4Weight:
        """Pack nibbles q [N, K] (0..15), scales [G, N] and zeros [G, N] (None: symmetric, zero 8)."""
        n, k = q.shape
        runs = _cdiv(k, INT4_RUN)
        qp = torch.zeros(n, runs * INT4_RUN, dtype=torch.int64, device=q.device)
        qp[:, :k] = q
        planes = qp.view(n, runs, 4, 16, 2).permute(0, 1, 3, 4, 2).reshape(n, runs, 16, 8)  # [N, R, w, 4h + j]
        words = _pack_nibbles(planes, 2).reshape(n, runs * 16)
        qzeros = None
        if zeros is not None:
            zp = torch.zeros(zeros.shape[0], _cdiv(n, 8) * 8, dtype=torch.int64, device=q.device)
            zp[:, :n] = zeros
            qzeros = _pack_nibbles(zp.view(zeros.shape[0], -1, 8), 1)
        return cls(words.contiguous(), scales.contiguous(), qzeros, k, group_size)

    # ---- checkpoint converters -----------------------------------------------------------------------------
    @classmethod
    def from_gptq(
        cls,
        qweight: torch.Tensor,
        qzeros: torch.Tensor,
        scales: torch.Tensor,
        g_idx: torch.Tensor | None = None,
        *,
        group_size: int = 128,
        v1: bool = True,
        symmetric: bool | None = None,
    ) -> Int4Weight:
        """GPTQ 4-bit tensors (v1 checkpoints store zero - 1; v2 store the zero). symmetric=None: detect."""
        if qweight.dtype != torch.int32 or qweight.dim() != 2:
            raise DFlashError(f"qweight: expected GPTQ int32 [K/8, N], got {qweight.dtype} {list(qweight.shape)}")
        k, n = qweight.shape[0] * 8, qweight.shape[1]
        _check_group_tensors(k, n, qzeros, scales, group_size)
        if g_idx is not None:
            trivial = torch.arange(k, device=g_idx.device) // group_size
            if g_idx.shape != (k,) or not torch.equal(g_idx.to(torch.int64), trivial):
                raise DFlashError(
                    "g_idx: act-order (desc_act) GPTQ checkpoints are not supported; re-quantize without it"
                )
        q = _unpack_nibbles(qweight, 0).flatten(0, 1).T  # [K/8, 8, N] -> [K, N] -> [N, K]
        z = _unpack_nibbles(qzeros, 1).flatten(1)[:, :n] + (1 if v1 else 0)
        if v1 and bool((z > 15).any()):
            raise DFlashError(
                "qzeros: a v1 zero point of 0 (stored as -1) does not fit 4 bits; this checkpoint is corrupt"
            )
        if symmetric is None:
            symmetric = bool((z == 8).all())
        elif symmetric and not bool((z == 8).all()):
            raise DFlashError("qzeros: symmetric=True but the zero points are not all 8")
        return cls.from_unpacked(q, scales, None if symmetric else z, group_size)

    def to_gptq(self, v1: bool = True) -> dict[str, torch.Tensor]:
        """GPTQ tensors {qweight [K/8, N], qzeros [G, N/8], scales [G, N]}; needs K and N multiples of 8."""
        n, k = self.shape
        if k % 8 or n % 8:
            raise DFlashError(f"in_features/out_features: GPTQ packing needs multiples of 8, got {k}, {n}")
        q = self.unpack().T.contiguous()  # [K, N]
        qweight = _pack_nibbles(q.view(k // 8, 8, n), 0)
        z = self.zeros() - (1 if v1 else 0)
        if bool((z < 0).any()):
            raise DFlashError("zeros: a zero point of 0 cannot be stored in a GPTQ v1 checkpoint")
        qzeros = _pack_nibbles(z.view(z.shape[0], n // 8, 8), 1)
        return {"qweight": qweight, "qzeros": qzeros, "scales": self.scales.clone()}

    @classmethod
    def from_awq(
        cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, *, group_size: int = 128
    ) -> Int4Weight:
        """AWQ 4-bit GEMM-layout tensors (interleaved nibble order, zeros stored as is)."""
        if qweight.dtype != torch.int32 or qweight.dim() != 2:
            raise DFlashError(f"qweight: expected AWQ int32 [K, N/8], got {qweight.dtype} {list(qweight.shape)}")
        k, n = qweight.shape[0], qweight.shape[1] * 8
        _check_group_tensors(k, n, qzeros, scales, group_size)
        q = _awq_unpack(qweight).T
        z = _awq_unpack(qzeros)
        return cls.from_unpacked(q, scales, z, group_size)

    def to_awq(self) -> dict[str, torch.Tensor]:
        """AWQ tensors {qweight [K, N/8], qzeros [G, N/8], scales [G, N]}; needs N a multiple of 8."""
        n, k = self.shape
        if n % 8:
            raise DFlashError(f"out_features: AWQ packing needs a multiple of 8, got {n}")
        return {
            "qweight": _awq_pack(self.unpack().T.contiguous()),
            "qzeros": _awq_pack(self.zeros()),
            "scales": self.scales.clone(),
        }


def _check_group_tensors(k: int, n: int, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> None:
    groups = _cdiv(k, group_size)
    if tuple(scales.shape) != (groups, n) or not scales.is_floating_point():
        raise DFlashError(
            f"scales: expected float [{groups}, {n}] for K={k}, group_size={group_size}, got {list(scales.shape)}"
        )
    if qzeros.dtype != torch.int32 or tuple(qzeros.shape) != (groups, n // 8):
        raise DFlashError(f"qzeros: expected int32 [{groups}, {n // 8}], got {qzeros.dtype} {list(qzeros.shape)}")


def _awq_unpack(words: torch.Tensor) -> torch.Tensor:
    """AWQ words [R, C] -> values [R, 8C] in natural column order."""
    nib = _unpack_nibbles(words, 1)  # [R, C, 8 (nibble i)], nibble i holds column 8c + AWQ_ORDER[i]
    out = torch.empty_like(nib)
    out[:, :, list(AWQ_ORDER)] = nib
    return out.flatten(1)


def _awq_pack(values: torch.Tensor) -> torch.Tensor:
    r, n = values.shape
    v = values.view(r, n // 8, 8)[:, :, list(AWQ_ORDER)]
    return _pack_nibbles(v, 1)


# ---- quantizers from a dense weight [N, K] ----------------------------------------------------------------------


def quantize_fp8_channel(w: torch.Tensor) -> FP8ChannelWeight:
    if w.shape[0] > ROW_CHUNK:
        parts = [quantize_fp8_channel(w[i : i + ROW_CHUNK]) for i in range(0, w.shape[0], ROW_CHUNK)]
        return FP8ChannelWeight(torch.cat([p.qweight for p in parts]), torch.cat([p.scale for p in parts]))
    wf = w.float()
    scale = wf.abs().amax(dim=1).clamp_min(1e-12) / FP8_MAX
    q = (wf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return FP8ChannelWeight(q.contiguous(), scale.contiguous())


def quantize_fp8_block(w: torch.Tensor) -> FP8BlockWeight:
    n, k = w.shape
    if n > ROW_CHUNK:
        parts = [quantize_fp8_block(w[i : i + ROW_CHUNK]) for i in range(0, n, ROW_CHUNK)]
        return FP8BlockWeight(torch.cat([p.qweight for p in parts]), torch.cat([p.scale_inv for p in parts]))
    nb, kb = _cdiv(n, FP8_BLOCK), _cdiv(k, FP8_BLOCK)
    wp = torch.zeros(nb * FP8_BLOCK, kb * FP8_BLOCK, dtype=torch.float32, device=w.device)
    wp[:n, :k] = w.float()
    blocks = wp.view(nb, FP8_BLOCK, kb, FP8_BLOCK)
    scale_inv = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / FP8_MAX
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view_as(wp)[:n, :k]
    return FP8BlockWeight(q.to(torch.float8_e4m3fn).contiguous(), scale_inv.contiguous())


CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def quantize_int4(
    w: torch.Tensor,
    group_size: int = 128,
    symmetric: bool = True,
    scale_dtype: torch.dtype = torch.float16,
    importance: torch.Tensor | None = None,
) -> Int4Weight:
    """INT4 with GPTQ's conventions: the range always includes 0; symmetric uses zero 8. Round-to-nearest over each
    group's full range; with importance [K] (the inputs' mean squares on calibration data), each group's range is
    the clipping of it (CLIP_RATIOS) whose rounding error, weighted by importance, is smallest: clipping a few
    outliers buys finer steps for the rest where the activations make them matter."""
    n, k = w.shape
    if importance is not None and tuple(importance.shape) != (k,):
        raise ValueError(f"importance: expected [{k}] (one per input), got {tuple(importance.shape)}")
    if n > ROW_CHUNK:
        parts = [
            quantize_int4(w[i : i + ROW_CHUNK], group_size, symmetric, scale_dtype, importance)
            for i in range(0, n, ROW_CHUNK)
        ]
        qzeros = None if symmetric else torch.cat([p.qzeros for p in parts], 1)
        return Int4Weight(
            torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts], 1), qzeros, k, group_size
        )
    groups = _cdiv(k, group_size)
    wp = torch.zeros(n, groups * group_size, dtype=torch.float32, device=w.device)
    wp[:, :k] = w.float()
    wg = wp.view(n, groups, group_size)
    wmin0 = wg.amin(dim=2).clamp_max(0)
    wmax0 = wg.amax(dim=2).clamp_min(0)

    def scales_at(ratio):
        """(scale in scale_dtype, zero point) of every group with its range clipped to ratio."""
        wmin, wmax = wmin0 * ratio, wmax0 * ratio
        if symmetric:
            amax = torch.maximum(-wmin, wmax)
            scale = torch.where(amax > 0, 2 * amax / 15, torch.ones_like(amax)).to(scale_dtype)
            return scale, torch.full_like(scale.float(), 8.0)
        flat = (wmin == 0) & (wmax == 0)
        wmin, wmax = torch.where(flat, -1.0, wmin), torch.where(flat, 1.0, wmax)
        scale = ((wmax - wmin) / 15).to(scale_dtype)
        return scale, torch.round(-wmin / scale.float()).clamp(0, 15)

    scale, zero = scales_at(1.0)
    if importance is not None:
        imp = torch.zeros(groups * group_size, dtype=torch.float32, device=w.device)
        imp[:k] = importance.to(device=w.device, dtype=torch.float32)
        imp = imp.view(1, groups, group_size)
        best = None
        for ratio in CLIP_RATIOS:
            s_r, z_r = scales_at(ratio)
            sf = s_r.float()[:, :, None]
            deq = (torch.round(wg / sf + z_r[:, :, None]).clamp(0, 15) - z_r[:, :, None]) * sf
            err = ((deq - wg) ** 2 * imp).sum(2)  # [n, groups]
            if best is None:
                best = err
                continue
            better = err < best
            best = torch.where(better, err, best)
            scale, zero = torch.where(better, s_r, scale), torch.where(better, z_r, zero)
    sf = scale.float()
    q = torch.round(wg / sf[:, :, None] + zero[:, :, None]).clamp(0, 15).to(torch.int64)
    q = q.view(n, groups * group_size)[:, :k]
    zeros = None if symmetric else zero.to(torch.int64).T.contiguous()
    return Int4Weight.from_unpacked(q, scale.T.contiguous(), zeros, group_size)


# ---- FP8 activations -------------------------------------------------------------------------------------------


def quantize_fp8_activations(x: torch.Tensor, group: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token, per-`group`-inputs FP8 quantization of x [M, K] as the FP8 dot kernel does it.

    Returns (xq [M, K] float8_e4m3fn, scales [M, ceil(K / group)] fp32); x ~= xq * scales[:, k // group].
    """
    m, k = x.shape
    groups = _cdiv(k, group)
    xp = torch.zeros(m, groups * group, dtype=torch.float32, device=x.device)
    xp[:, :k] = x.float()
    xg = xp.view(m, groups, group)
    amax = xg.abs().amax(dim=2)
    # tensor by tensor: correctly rounded on every device (CUDA divides by a scalar as a product with its
    # reciprocal, and `scalar / tensor` is reciprocal() * scalar)
    fp8_max = torch.full_like(amax, FP8_MAX)
    inv = torch.where(amax > 0, fp8_max / amax, torch.zeros_like(amax))
    xq = (xg * inv[:, :, None]).to(torch.float8_e4m3fn).view(m, groups * group)[:, :k]
    return xq.contiguous(), amax / fp8_max


def dequantize_fp8_activations(xq: torch.Tensor, scales: torch.Tensor, group: int = FP8_BLOCK) -> torch.Tensor:
    k = xq.shape[1]
    return xq.float() * scales.repeat_interleave(group, 1)[:, :k]
