"""What the compiler reads back from a profile's tuning database: the (lowering, config) of one call, or the
launcher's default marked untuned. Nothing here imports Optuna: the compiler chooses without the tuner."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import DFlashError
from ..hw_profiles import HardwareProfile, load_profile
from ..hw_profiles.database import TuningDB
from .spaces import SPACES, parse_shape, space_for

log = logging.getLogger(__name__)


class Choice(NamedTuple):
    lowering: str
    config: dict[str, Any]
    tuned: bool


def default_choice(op: str, shape_key: str, fmt: str, profile: HardwareProfile) -> Choice:
    """The launcher's default for a call, marked untuned (an op without a search space: its launcher's own
    default, config {})."""
    if op not in SPACES:
        return Choice("triton" if profile.is_cuda else "reference", {}, False)
    space = space_for(parse_shape(op, shape_key, fmt), profile)
    lowering, config = space.config(space.default())
    return Choice(lowering, config, False)


class Chooser:
    """The lowering pass's view of one profile's database; remembers the calls that fell back to defaults."""

    def __init__(self, profile: str | HardwareProfile, root: str | Path | None = None, db: TuningDB | None = None):
        self.profile = load_profile(profile)
        self.db = db if db is not None else TuningDB.load(self.profile, root)
        self.fallbacks: list[tuple[str, str, str]] = []
        self.chosen: dict[tuple[str, str, str], Choice] = {}  # the tuned answers given

    def choose(self, op: str, shape_key: str, fmt: str) -> Choice:
        entry = self.db.lookup(op, shape_key, fmt)
        if entry is not None and entry.tuned:
            choice = self.chosen[(op, shape_key, fmt)] = Choice(entry.lowering, dict(entry.config), True)
            return choice
        if (op, shape_key, fmt) not in self.fallbacks:
            self.fallbacks.append((op, shape_key, fmt))
        if entry is not None:  # an entry marked untuned holds the default it was recorded with
            return Choice(entry.lowering, dict(entry.config), False)
        return default_choice(op, shape_key, fmt, self.profile)


def choose(op: str, shape_key: str, fmt: str, profile: str | HardwareProfile, root: str | Path | None = None) -> Choice:
    """(lowering, config, tuned) for one call: the profile database's entry, or the default marked untuned.
    (It reads the database on every call; a pass over many calls uses one Chooser.)"""
    return Chooser(profile, root).choose(op, shape_key, fmt)


def untuned_fallbacks(
    calls: Iterable[tuple[str, str, str]], profile: str | HardwareProfile, root: str | Path | None = None
) -> list[tuple[str, str, str]]:
    """The (op, shape key, format) calls among `calls` that the profile's database has no tuned entry for."""
    chooser = Chooser(profile, root)
    for call in calls:
        chooser.choose(*call)
    return chooser.fallbacks


class RecordedChoices:
    """A chooser that answers with the tuned choices another chooser gave (an artifact's manifest records them,
    so a load lowers exactly what the build lowered and compiled kernels for); every other call is untuned."""

    def __init__(self, rows: Iterable[dict], where: str = "tuning.lowered"):
        self.chosen: dict[tuple[str, str, str], Choice] = {}
        for i, r in enumerate(rows):
            try:
                key, choice = (r["op"], r["shape_key"], r["fmt"]), Choice(r["lowering"], dict(r["config"]), True)
            except (KeyError, TypeError, ValueError):
                fields = "op, shape_key, fmt, lowering, config"
                raise DFlashError(f"{where}[{i}]: expected an object with {fields}, got {r!r}"[:300]) from None
            self.chosen[key] = choice
        self.fallbacks: list[tuple[str, str, str]] = []

    def choose(self, op: str, shape_key: str, fmt: str) -> Choice:
        choice = self.chosen.get((op, shape_key, fmt))
        if choice is None:
            if (op, shape_key, fmt) not in self.fallbacks:
                self.fallbacks.append((op, shape_key, fmt))
            return Choice("triton", {}, False)
        return choice


def recorded_rows(chooser) -> list[dict]:
    """The tuned answers of a chooser as the manifest records them (RecordedChoices reads them back)."""
    return [
        {"op": op, "shape_key": key, "fmt": fmt, "lowering": c.lowering, "config": c.config}
        for (op, key, fmt), c in sorted(getattr(chooser, "chosen", {}).items())
    ]


def runtime_model_key(cfg) -> str:
    """The name a target's runtime entries are recorded under: its architecture and shapes (a random-weight study
    at a checkpoint's shapes speaks for the checkpoint)."""
    return f"{cfg.model_type}-h{cfg.hidden_size}-l{cfg.num_layers}-v{cfg.vocab_size}"


def tuned_verify_widths(
    model: str, quant: str, profile: str | HardwareProfile, root: str | Path | None = None
) -> dict[int, int] | None:
    """The verify width per batch size that the runtime studies of `model` in `quant` chose on the profile (a later
    study's answer for a batch size replaces an earlier one's), or None if no study of it is recorded."""
    db = TuningDB.load(load_profile(profile), root)
    entries = [e for e in db.entries("runtime") if e.fmt == quant and e.shape_key.startswith(f"{model}_c")]
    widths: dict[int, int] = {}
    for entry in sorted(entries, key=lambda e: e.date):
        where = f"{db.directory / 'runtime.jsonl'}: entry {entry.shape_key} {entry.fmt}"
        chosen = entry.config.get("widths")
        if not isinstance(chosen, dict):
            raise DFlashError(f"{where}: field 'config.widths' must be an object, got {chosen!r}")
        try:
            widths.update({int(batch): int(width) for batch, width in chosen.items()})
        except (TypeError, ValueError):
            raise DFlashError(
                f"{where}: field 'config.widths' must map batch sizes to widths, got {chosen!r}"
            ) from None
    return widths or None


def tuned_widths_or_block(
    target_cfg, quant: str, profile: str | HardwareProfile, asked: bool = True
) -> dict[int, int] | None:
    """tuned_verify_widths for a target configuration; None (logged, as a warning when the tuned widths were asked
    for rather than taken by default: every bucket verifies the whole draft block) when the profile records no
    runtime study of it."""
    model = runtime_model_key(target_cfg)
    widths = tuned_verify_widths(model, quant, profile)
    if widths is None:
        name = profile if isinstance(profile, str) else profile.name
        (log.warning if asked else log.info)(
            "no runtime study of %s in %s on profile %s: verifying the whole draft block", model, quant, name
        )
    return widths
