"""Calibration for the quantization pass: the mean square of every input channel of every linear of the target, over
the prefill of calibration prompts run through the models' own eager forward.

The INT4 quantizer weighs each group's rounding error by these (codegen/weight_formats.quantize_int4 importance),
so the clipping of a group is chosen where the activations make the error matter. The statistics are keyed by the
weight's source name (the step's `target.<module>.weight`), which the pass follows through fused weights to.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import DFlashError


class _LinearInputs(TorchDispatchMode):
    """Accumulates sum(x^2) per input channel and the row count of every dflash.linear call, by weight tensor."""

    def __init__(self):
        super().__init__()
        self.sums: dict[int, torch.Tensor] = {}
        self.rows: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.dflash.linear.default:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            key = weight.untyped_storage().data_ptr()
            x2 = x.detach().float().pow(2).sum(0)
            self.sums[key] = self.sums[key] + x2 if key in self.sums else x2
            self.rows[key] = self.rows.get(key, 0) + x.shape[0]
        return func(*args, **kwargs)


@torch.inference_mode()
def linear_input_moments(target, prompts: Sequence[Sequence[int]], prefix: str = "target.") -> dict:
    """{source name: mean of x^2 per input channel [K] (fp32, on the model's device)} for every dense linear weight
    of the target (a TargetModel) that the prefill of the prompts reaches (each prompt one request)."""
    from ..models import eager  # the models import the compiler, which imports this module

    if not prompts or any(len(p) == 0 for p in prompts):
        raise DFlashError("parameter 'calibration': expected one or more non-empty prompts (token id lists)")
    device = target.embed_tokens.weight.device
    vocab = target.cfg.vocab_size
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise DFlashError(f"parameter 'calibration': token ids must lie in 0..{vocab - 1}")
    mode = _LinearInputs()
    with mode:
        for prompt in prompts:
            pools = eager.request_pools(target, 1, len(prompt) + 1)
            eager.prefill(target, pools, torch.tensor([list(prompt)], device=device), last_only=True)
    names = {}
    for name, p in target.named_parameters(remove_duplicate=False):
        names.setdefault(p.untyped_storage().data_ptr(), []).append(prefix + name)
    out = {}
    for key, total in mode.sums.items():
        for name in names.get(key, []):
            out[name] = total / mode.rows[key]
    return out


def moments_digest(moments: dict[str, torch.Tensor]) -> str:
    """A short content hash of calibration statistics (names the quantization pass that uses them)."""
    h = hashlib.sha1()
    for name in sorted(moments):
        h.update(name.encode())
        h.update(moments[name].detach().cpu().numpy().tobytes())
    return h.hexdigest()[:10]
