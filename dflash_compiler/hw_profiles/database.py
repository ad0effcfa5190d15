"""The tuning database of a hardware profile: what `dflash-tune` measured, read by the compiler's lowering pass.

Plain text that diffs well: `hw_profiles/<profile>/<op>.jsonl`, one file per op family, one entry per line as JSON
with sorted keys, lines sorted by shape key and format. An entry is the chosen lowering and config of one
(op, shape key, format) with its measured time, the default's and torch's time, where and when it was measured
(device, driver, library versions, date). `tuned: false` marks an entry that holds the untuned default.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DFlashError
from . import PROFILE_DIR, HardwareProfile

LOWERINGS = ("triton", "vendor", "tvm", "reference")
PLATFORMS = ("cuda", "cpu")


@dataclass
class Entry:
    op: str  # op family: linear, verify_attention, gdn_verify, greedy_accept, runtime
    shape_key: str  # the shape bucket (tuning/spaces.py builds the keys)
    fmt: str  # weight format or dtype: bf16, fp8_channel, fp8_block, int4_sym, int4_asym, fp16, fp32
    lowering: str
    config: dict[str, Any]
    tuned: bool
    time_us: float | None = None
    default_time_us: float | None = None
    torch_time_us: float | None = None
    device: str = ""
    platform: str = "cuda"  # "cpu": timed through the Triton interpreter / the PyTorch lowering
    driver: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    date: str = ""
    trials: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # other figures (a runtime entry's tokens/s)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.op, self.shape_key, self.fmt)

    def to_line(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(", ", ": "))

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Entry:
        if not isinstance(data, dict):
            raise DFlashError(f"{where}: expected a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise DFlashError(f"{where}: unknown field '{unknown[0]}'")
        for name in ("op", "shape_key", "fmt", "lowering", "config", "tuned"):
            if name not in data:
                raise DFlashError(f"{where}: field '{name}' is missing")
        entry = cls(**data)
        entry.validate(where)
        return entry

    def validate(self, where: str) -> None:
        for name in ("op", "shape_key", "fmt"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise DFlashError(f"{where}: field '{name}' must be a non-empty string, got {value!r}")
        if self.lowering not in LOWERINGS:
            raise DFlashError(f"{where}: field 'lowering' must be one of {', '.join(LOWERINGS)}, got {self.lowering!r}")
        if not isinstance(self.config, dict):
            raise DFlashError(f"{where}: field 'config' must be an object, got {self.config!r}")
        if not isinstance(self.tuned, bool):
            raise DFlashError(f"{where}: field 'tuned' must be true or false, got {self.tuned!r}")
        if self.platform not in PLATFORMS:
            raise DFlashError(f"{where}: field 'platform' must be one of {', '.join(PLATFORMS)}, got {self.platform!r}")
        for name, kind in (("versions", dict), ("metrics", dict), ("trials", int), ("date", str), ("device", str)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, kind):
                raise DFlashError(f"{where}: field '{name}' must be {kind.__name__}, got {value!r}")
        for name in ("time_us", "default_time_us", "torch_time_us"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value < 0):
                raise DFlashError(f"{where}: field '{name}' must be a time in microseconds or null, got {value!r}")


class TuningDB:
    """The entries of one profile's database, loaded from and saved to `root/<profile>/`."""

    def __init__(self, profile: str, directory: Path, entries: dict[tuple[str, str, str], Entry] | None = None):
        self.profile, self.directory = profile, Path(directory)
        self._entries: dict[tuple[str, str, str], Entry] = dict(entries or {})
        self._dirty: set[str] = set()

    @classmethod
    def load(cls, profile: str | HardwareProfile, root: str | Path | None = None) -> TuningDB:
        """The database of `profile` under root (default: this package's hw_profiles/); empty if none exists."""
        name = profile.name if isinstance(profile, HardwareProfile) else profile
        directory = Path(root if root is not None else PROFILE_DIR) / name
        db = cls(name, directory)
        if directory.is_dir():
            for path in sorted(directory.glob("*.jsonl")):
                for lineno, line in enumerate(path.read_text().splitlines(), 1):
                    if not line.strip():
                        continue
                    where = f"{path}:{lineno}"
                    try:
                        data = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DFlashError(f"{where}: not valid JSON ({e.msg})") from None
                    entry = Entry.from_dict(data, where)
                    if entry.op != path.stem:
                        raise DFlashError(f"{where}: field 'op' is {entry.op!r} in the file of op {path.stem!r}")
                    if entry.key in db._entries:
                        raise DFlashError(f"{where}: a second entry for {entry.shape_key} {entry.fmt}")
                    db._entries[entry.key] = entry
        return db

    def lookup(self, op: str, shape_key: str, fmt: str) -> Entry | None:
        return self._entries.get((op, shape_key, fmt))

    def record(self, entry: Entry) -> None:
        """Adds the entry, replacing any of the same (op, shape key, format)."""
        entry.validate(f"entry {entry.op} {entry.shape_key} {entry.fmt}")
        self._entries[entry.key] = entry
        self._dirty.add(entry.op)

    def entries(self, op: str | None = None) -> list[Entry]:
        return [self._entries[k] for k in sorted(self._entries) if op is None or k[0] == op]

    def untuned(self) -> list[Entry]:
        return [e for e in self.entries() if not e.tuned]

    def __len__(self) -> int:
        return len(self._entries)

    def save(self) -> list[Path]:
        """Writes every op file that changed: a temporary file in the same directory renamed over the old one, so
        a reader never sees a half-written file. Returns the paths written."""
        self.directory.mkdir(parents=True, exist_ok=True)
        written = []
        for op in sorted(self._dirty):
            path = self.directory / f"{op}.jsonl"
            text = "".join(e.to_line() + "\n" for e in self.entries(op))
            fd, tmp = tempfile.mkstemp(prefix=f".{op}.", suffix=".tmp", dir=self.directory)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            written.append(path)
        self._dirty.clear()
        return written
