"""Targets, dlight scheduling, and TVMKernel: a compiled TVM module called on torch tensors, saved and loaded.

Every kernel is built for static shapes (one build per batch bucket). A kernel is a list of stages, each a PrimFunc
of the module called on named tensors (inputs, outputs, and for two-stage kernels a fp32 workspace). On CUDA each
PrimFunc is scheduled by the first dlight GPU rule that applies (GEMV, LowBatchGEMV, Matmul, RMSNorm,
GeneralReduction, Fallback, in that order); the rule used is recorded in the kernel's spec. On LLVM the dlight CPU
rules (GEMV, Reduction) are tried and a function neither matches compiles as plain loops.

CUDA builds need no GPU: on a host without a CUDA driver TVM keeps the generated CUDA C++ source in the module and
NVRTC compiles it when the module is loaded on the GPU host. That source is the same for every architecture from
sm_89 up (only sm_80 differs: FP8 decodes in software there), and the loader compiles it for the GPU it runs on, so
the requested architecture lives in the spec saved next to the library, and a call on a GPU of another architecture
is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dflash_compiler.errors import DFlashError

CUDA_ARCHS = ("sm_80", "sm_90", "sm_100", "sm_120")
# Static shared memory per block is 48 KiB on every architecture unless a kernel opts in to more; dlight assumes
# this figure anyway (and warns) when the target does not state it.
_CUDA_TARGET_ATTRS = {"max_shared_memory_per_block": 49152, "max_threads_per_block": 1024, "thread_warp_size": 32}
_TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "uint8": torch.uint8,
    "int32": torch.int32,
}
DTYPE_NAMES = {v: k for k, v in _TORCH_DTYPES.items()}


def parse_target(target: str) -> dict:
    """ "llvm" or "cuda -arch=sm_XX" (XX in 80, 90, 100, 120) -> the target dict TVM 0.27 takes."""
    if target == "llvm":
        return {"kind": "llvm"}
    m = re.fullmatch(r"cuda\s+-arch=(sm_\d+)", target.strip())
    if m is None or m.group(1) not in CUDA_ARCHS:
        raise DFlashError(f"target: expected 'llvm' or 'cuda -arch=' one of {', '.join(CUDA_ARCHS)}, got {target!r}")
    return {"kind": "cuda", "arch": m.group(1), **_CUDA_TARGET_ATTRS}


def cuda_target(capability: tuple[int, int]) -> str:
    """The CUDA target of a compute capability, as parse_target reads it."""
    major, minor = capability
    return f"cuda -arch=sm_{major}{minor}"


def torch_dtype(name: str) -> torch.dtype:
    return _TORCH_DTYPES[name]


def dtype_name(dtype: torch.dtype, param: str, allowed: tuple[torch.dtype, ...]) -> str:
    if dtype not in allowed:
        raise DFlashError(f"{param}: expected one of {[DTYPE_NAMES[d] for d in allowed]}, got {dtype}")
    return DTYPE_NAMES[dtype]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # a key of _TORCH_DTYPES


@dataclass(frozen=True)
class Stage:
    function: str
    args: tuple[str, ...]  # tensor names, in the PrimFunc's parameter order
    schedule: str  # the dlight rule that scheduled it, or "loops" (LLVM, no rule applied)


@dataclass(frozen=True)
class KernelSpec:
    op: str
    target: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    stages: tuple[Stage, ...]
    workspace: tuple[TensorSpec, ...] = ()
    attrs: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> KernelSpec:
        d = json.loads(text)

        def specs(items):
            return tuple(TensorSpec(t["name"], tuple(t["shape"]), t["dtype"]) for t in items)

        return cls(
            op=d["op"],
            target=d["target"],
            inputs=specs(d["inputs"]),
            outputs=specs(d["outputs"]),
            stages=tuple(Stage(s["function"], tuple(s["args"]), s["schedule"]) for s in d["stages"]),
            workspace=specs(d["workspace"]),
            attrs=d["attrs"],
        )


def _schedule(func, target_obj, is_cuda: bool):
    """(scheduled PrimFunc, rule name): the first dlight rule that applies, in the order of the module docstring."""
    import tvm.s_tir.dlight as dl

    if is_cuda:
        rules = [
            dl.gpu.GEMV(),
            dl.gpu.LowBatchGEMV(),  # only for a PrimFunc with one symbolic extent (the batch)
            dl.gpu.Matmul(),
            dl.gpu.RMSNorm(),
            dl.gpu.GeneralReduction(),
            dl.gpu.Fallback(),
        ]
    else:
        rules = [dl.cpu.GEMV(), dl.cpu.Reduction()]
    with target_obj:
        for rule in rules:
            try:
                space = rule.apply(func, target_obj, False)
            except Exception:  # noqa: BLE001 - a rule that does not fit may raise instead of returning None
                space = None
            if space is not None:
                sch = space[0] if isinstance(space, list) else space
                return sch.mod["main"], type(rule).__name__
    if is_cuda:
        raise DFlashError(f"target: no dlight rule schedules {func.attrs['global_symbol']} for CUDA")
    return func, "loops"


def compile_kernel(
    op: str,
    target: str,
    funcs: dict,
    args: dict[str, tuple[str, ...]],
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    workspace: tuple[TensorSpec, ...] = (),
    attrs: dict | None = None,
) -> TVMKernel:
    """Schedule and compile PrimFuncs {name: func} (called in that order, on args[name]) into one module."""
    import tvm
    from tvm.target import Target

    target_dict = parse_target(target)
    target_obj = Target(target_dict)
    is_cuda = target_dict["kind"] == "cuda"
    scheduled, stages = {}, []
    for name, func in funcs.items():
        func = func.with_attr("global_symbol", name)
        sched, rule = _schedule(func, target_obj, is_cuda)
        scheduled[name] = sched.with_attr("global_symbol", name)
        stages.append(Stage(name, args[name], rule))
    executable = tvm.compile(tvm.IRModule(scheduled), target=target_obj)
    spec = KernelSpec(op, target, inputs, outputs, tuple(stages), workspace, dict(attrs or {}))
    return TVMKernel(executable.mod, spec)


class TVMKernel:
    """A compiled TVM module and its spec: call it on torch tensors (inputs in spec order, outputs allocated unless
    given), save it with export_library(path), load it with TVMKernel.load(path)."""

    def __init__(self, module, spec: KernelSpec):
        self.module = module
        self.spec = spec
        self._functions = {s.function: module[s.function] for s in spec.stages}
        self._workspaces: dict[torch.device, dict[str, torch.Tensor]] = {}
        self._checked_devices: set[torch.device] = set()

    @property
    def arch(self) -> str | None:
        t = parse_target(self.spec.target)
        return t.get("arch")

    def device_source(self) -> str:
        """The generated CUDA C++ source (CUDA targets only)."""
        if self.arch is None:
            raise DFlashError(f"target: {self.spec.target} has no device source")
        return self.module.imports[0].inspect_source()

    def _check(self, given: torch.Tensor, spec: TensorSpec, device: torch.device) -> torch.Tensor:
        if given.dtype == torch.float8_e4m3fn and spec.dtype == "uint8":
            given = given.view(torch.uint8)  # FP8 weights are read as their bits (a view, no copy)
        if tuple(given.shape) != spec.shape or given.dtype != torch_dtype(spec.dtype):
            raise DFlashError(
                f"{spec.name}: expected {spec.dtype} {list(spec.shape)}, got {given.dtype} {list(given.shape)}"
            )
        if given.device != device:
            raise DFlashError(f"{spec.name}: expected a tensor on {device}, got {given.device}")
        if not given.is_contiguous():
            raise DFlashError(f"{spec.name}: expected a contiguous tensor")
        return given

    def _check_device(self, device: torch.device) -> None:
        want_cuda = self.arch is not None
        if (device.type == "cuda") != want_cuda:
            raise DFlashError(f"target: this kernel is built for {self.spec.target}, the tensors are on {device}")
        if want_cuda and device not in self._checked_devices:
            major, minor = torch.cuda.get_device_capability(device)
            if f"sm_{major}{minor}" != self.arch:
                raise DFlashError(f"target: this kernel is built for {self.arch}, the GPU is sm_{major}{minor}")
            self._checked_devices.add(device)

    def __call__(self, *inputs: torch.Tensor, out: torch.Tensor | tuple[torch.Tensor, ...] | None = None):
        spec = self.spec
        if len(inputs) != len(spec.inputs):
            raise DFlashError(f"inputs: expected {len(spec.inputs)} tensors ({[t.name for t in spec.inputs]})")
        device = inputs[0].device
        self._check_device(device)
        tensors = {t.name: self._check(x, t, device) for x, t in zip(inputs, spec.inputs)}
        if out is None:
            outs = tuple(torch.empty(t.shape, dtype=torch_dtype(t.dtype), device=device) for t in spec.outputs)
        else:
            outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
            if len(outs) != len(spec.outputs):
                raise DFlashError(f"out: expected {len(spec.outputs)} tensors ({[t.name for t in spec.outputs]})")
            outs = tuple(self._check(o, t, device) for o, t in zip(outs, spec.outputs))
        tensors.update((t.name, o) for t, o in zip(spec.outputs, outs))
        tensors.update(self._workspace(device))
        with self._stream(device):
            for stage in spec.stages:
                self._functions[stage.function](*(tensors[a] for a in stage.args))
        return outs[0] if len(outs) == 1 else outs

    def _workspace(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Static-shape scratch tensors, allocated on the first call on a device and reused by every later one (so
        a CUDA graph captured after a warm-up call keeps pointing at live memory)."""
        if device not in self._workspaces:
            self._workspaces[device] = {
                t.name: torch.empty(t.shape, dtype=torch_dtype(t.dtype), device=device) for t in self.spec.workspace
            }
        return self._workspaces[device]

    @staticmethod
    def _stream(device: torch.device):
        if device.type != "cuda":
            return contextlib.nullcontext()
        import tvm_ffi

        return tvm_ffi.use_torch_stream()  # launch on torch's current stream (or the graph being captured)

    # ---- artifacts -------------------------------------------------------------------------------------------
    @staticmethod
    def spec_path(path: str | Path) -> Path:
        path = Path(path)
        return path.with_name(path.name + ".json")

    def export_library(self, path: str | Path) -> None:
        """Write the shared library to path and the spec to path + '.json', each through a temporary file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_lib = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        tmp_spec = self.spec_path(tmp_lib)
        try:
            self.module.export_library(tmp_lib)
            tmp_spec.write_text(self.spec.to_json())
            os.replace(tmp_lib, path)
            os.replace(tmp_spec, self.spec_path(path))
        finally:
            for p in (Path(tmp_lib), tmp_spec):
                p.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | Path) -> TVMKernel:
        import tvm

        path = Path(path)
        for p in (path, cls.spec_path(path)):
            if not p.is_file():
                raise DFlashError(f"{p}: missing TVM kernel file")
        try:
            spec = KernelSpec.from_json(cls.spec_path(path).read_text())
        except (ValueError, KeyError, TypeError) as e:
            raise DFlashError(f"{cls.spec_path(path)}: not a TVM kernel spec ({type(e).__name__}: {e})") from None
        try:
            module = tvm.runtime.load_module(str(path))
        except Exception as e:  # noqa: BLE001 - TVM raises plain RuntimeErrors; report the first line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DFlashError(f"{path}: cannot load the TVM module built for {spec.target} here ({first})") from None
        return cls(module, spec)
