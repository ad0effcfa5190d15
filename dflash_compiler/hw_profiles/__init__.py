"""Hardware profiles: the facts about a GPU (or the CPU path) that the compiler chooses and prunes configs by.

One TOML file per profile in this directory (sm80, sm90, sm100, sm120, cpu): shared memory per block and per SM,
registers, the tensor-core dtypes, and per named device its SM count, L2 size and memory bandwidth (each bandwidth
says whether it was measured here or is a vendor spec). A profile's tuning database lives beside it in
`<profile>/` (database.py).

    load_profile("sm90")                 the profile, describing its first listed device (the H200)
    load_profile("sm90", "H100")         ... describing the named device
    load_profile("auto")                 the profile of the current CUDA device, else "cpu"
    profile_for_device(torch.cuda.get_device_properties(0))
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DFlashError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PROFILE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class DeviceSpec:
    """One device of a profile. match: a substring of torch's device name that identifies it."""

    name: str
    match: str
    sm_count: int
    l2_bytes: int | None = None
    memory_bandwidth_tbps: float | None = None
    bandwidth_source: str = "not known"


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    description: str
    kind: str  # "cuda" | "cpu"
    compute_capability: tuple[int, int] | None
    triton_target: int | None  # Triton's GPUTarget arch number (90 for sm_90)
    smem_per_block: int  # bytes, the opt-in maximum a kernel may request
    smem_per_sm: int
    registers_per_sm: int
    registers_per_thread: int
    max_threads_per_block: int
    warp_size: int
    activation_dtypes: tuple[str, ...]
    tensor_core_dtypes: tuple[str, ...]
    devices: tuple[DeviceSpec, ...]
    device: DeviceSpec  # the device this profile describes now
    path: Path

    @property
    def sm_count(self) -> int:
        return self.device.sm_count

    @property
    def l2_bytes(self) -> int | None:
        return self.device.l2_bytes

    @property
    def memory_bandwidth_tbps(self) -> float | None:
        return self.device.memory_bandwidth_tbps

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    @property
    def fp8_tensor_cores(self) -> bool:
        """FP8 e4m3 dots on tensor cores (sm89 and later)."""
        return "fp8_e4m3" in self.tensor_core_dtypes

    @property
    def warpgroup_mma(self) -> bool:
        """Hopper's warpgroup MMA (wgmma), which Triton uses for its dots there in place of mma.sync."""
        return self.compute_capability == (9, 0)

    @property
    def tensor_memory_accelerator(self) -> bool:
        """TMA: tiles copied between global and shared memory by one instruction (sm90 and later)."""
        return self.compute_capability is not None and self.compute_capability >= (9, 0)

    @property
    def fp4_tensor_cores(self) -> bool:
        """Native FP4 (e2m1, MXFP4/NVFP4) dots (sm100 and sm120)."""
        return "fp4_e2m1" in self.tensor_core_dtypes

    @property
    def database_dir(self) -> Path:
        return self.path.parent / self.name

    def for_device(self, name: str) -> HardwareProfile:
        """The profile describing the listed device whose name or match string contains `name`."""
        for d in self.devices:
            if name.lower() in d.name.lower() or d.match.lower() in name.lower():
                return dataclasses.replace(self, device=d)
        listed = ", ".join(d.name for d in self.devices)
        raise DFlashError(f"{self.path}: no device {name!r} in profile {self.name} (listed: {listed})")


def list_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def _field(path: Path, data: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    if name not in data:
        if default is ...:
            raise DFlashError(f"{path}: field '{name}' is missing")
        return default
    value = data[name]
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise DFlashError(f"{path}: field '{name}' must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _parse(path: Path) -> HardwareProfile:
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise DFlashError(f"{path}: not valid TOML ({e})") from None
    devices = []
    for i, d in enumerate(_field(path, data, "devices", list)):
        where = path.with_name(f"{path.name}: devices[{i}]")
        devices.append(
            DeviceSpec(
                name=_field(where, d, "name", str),
                match=_field(where, d, "match", str),
                sm_count=_field(where, d, "sm_count", int),
                l2_bytes=_field(where, d, "l2_bytes", int, None),
                memory_bandwidth_tbps=_field(where, d, "memory_bandwidth_tbps", (int, float), None),
                bandwidth_source=_field(where, d, "bandwidth_source", str, "not known"),
            )
        )
    if not devices:
        raise DFlashError(f"{path}: field 'devices' lists no device")
    cc = _field(path, data, "compute_capability", list, None)
    kind = _field(path, data, "kind", str)
    if kind not in ("cuda", "cpu"):
        raise DFlashError(f"{path}: field 'kind' must be 'cuda' or 'cpu', got {kind!r}")
    return HardwareProfile(
        name=_field(path, data, "name", str),
        description=_field(path, data, "description", str),
        kind=kind,
        compute_capability=tuple(cc) if cc else None,
        triton_target=_field(path, data, "triton_target", int, None),
        smem_per_block=_field(path, data, "smem_per_block", int),
        smem_per_sm=_field(path, data, "smem_per_sm", int),
        registers_per_sm=_field(path, data, "registers_per_sm", int),
        registers_per_thread=_field(path, data, "registers_per_thread", int),
        max_threads_per_block=_field(path, data, "max_threads_per_block", int),
        warp_size=_field(path, data, "warp_size", int),
        activation_dtypes=tuple(_field(path, data, "activation_dtypes", list)),
        tensor_core_dtypes=tuple(_field(path, data, "tensor_core_dtypes", list)),
        devices=tuple(devices),
        device=devices[0],
        path=path,
    )


def load_profile(name: str | HardwareProfile, device: str | None = None) -> HardwareProfile:
    """The named profile ("sm80", "sm90", "sm100", "sm120", "cpu", or "auto": this machine's); device picks one
    of its listed devices by name."""
    if isinstance(name, HardwareProfile):
        return name.for_device(device) if device else name
    if name == "auto":
        import torch

        if torch.cuda.is_available():
            return profile_for_device(torch.cuda.get_device_properties(torch.cuda.current_device()))
        name = "cpu"
    path = PROFILE_DIR / f"{name}.toml"
    if not path.is_file():
        raise DFlashError(
            f"parameter 'gpu': unknown hardware profile {name!r} (profiles: {', '.join(list_profiles())})"
        )
    profile = _parse(path)
    if profile.name != name:
        raise DFlashError(f"{path}: field 'name' is {profile.name!r}, expected {name!r}")
    return profile.for_device(device) if device else profile


def profile_for_device(props) -> HardwareProfile:
    """The profile of a CUDA device from its properties (torch.cuda.get_device_properties): chosen by compute
    capability, the device matched by name, and the limits the device reports taking precedence over the file's."""
    cc = (props.major, props.minor)
    for name in list_profiles():
        profile = load_profile(name)
        if profile.compute_capability == cc:
            break
    else:
        raise DFlashError(
            f"{props.name}: no hardware profile for compute capability {cc[0]}.{cc[1]} "
            f"(profiles: {', '.join(list_profiles())})"
        )
    listed = next((d for d in profile.devices if d.match.lower() in props.name.lower()), None)
    l2 = getattr(props, "L2_cache_size", None) or (listed.l2_bytes if listed else None)
    device = DeviceSpec(
        name=props.name,
        match=listed.match if listed else props.name,
        sm_count=props.multi_processor_count,
        l2_bytes=l2,
        memory_bandwidth_tbps=listed.memory_bandwidth_tbps if listed else None,
        bandwidth_source=listed.bandwidth_source if listed else "not known (device not listed in the profile)",
    )
    smem = getattr(props, "shared_memory_per_block_optin", None) or profile.smem_per_block
    smem_sm = getattr(props, "shared_memory_per_multiprocessor", None) or profile.smem_per_sm
    return dataclasses.replace(profile, device=device, smem_per_block=smem, smem_per_sm=smem_sm)
