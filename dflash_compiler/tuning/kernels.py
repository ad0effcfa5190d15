"""Tuning one kernel call on this machine into a database entry, and the choice the compiler reads back."""

from __future__ import annotations

import datetime
import math
import platform
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..hw_profiles import HardwareProfile, load_profile
from ..hw_profiles.database import Entry, TuningDB
from .measure import ConfigFailed, make_case
from .spaces import SPACES, parse_shape, space_for
from .study import best_trial, default_trial, measured_points, optimize


def environment(device: torch.device) -> dict[str, Any]:
    """Where a measurement ran: device name, driver, library versions, date."""
    import optuna
    import triton

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "optuna": optuna.__version__,
    }
    if device.type == "cuda":
        versions["cuda"] = torch.version.cuda or ""
        name = torch.cuda.get_device_name(device)
        try:
            driver = subprocess.check_output(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", f"--id={device.index or 0}"],
                text=True,
                timeout=10,
            ).strip()
        except (OSError, subprocess.SubprocessError):
            driver = ""
    else:
        name, driver = f"cpu ({platform.processor() or platform.machine()})", ""
    return {
        "device": name,
        "driver": driver,
        "versions": versions,
        "date": datetime.date.today().isoformat(),
        "platform": "cuda" if device.type == "cuda" else "cpu",
    }


def study_name(profile: HardwareProfile, shape) -> str:
    return f"{profile.name}:{shape.op}:{shape.key}:{shape.fmt}"


def tune_call(
    shape,
    profile: HardwareProfile,
    storage,
    n_trials: int,
    device: torch.device,
    seed: int = 0,
    progress: Callable | None = None,
    previous: Entry | None = None,
):
    """Runs (or resumes) the study of one call and returns (its database entry, the study). The winner is timed
    again beside the default before it is chosen; a call whose every measured config failed gets the default,
    marked untuned. `previous` (the database's entry) is returned as it is when the study measured nothing new on
    this device."""
    space = space_for(shape, profile)
    cases = []  # built on first use: a finished study needs no inputs

    def case():
        if not cases:
            cases.append(make_case(shape, profile, device, seed))
        return cases[0]

    def measure(params):
        lowering, config = space.config(params)
        return case().measure(lowering, config)

    study = optimize(
        space, measure, storage=storage, study_name=study_name(profile, shape), n_trials=n_trials, seed=seed,
        progress=progress,
    )  # fmt: skip
    env = environment(torch.device(device))
    unchanged = previous is not None and previous.trials == len(measured_points(study))
    if unchanged and previous.key == (shape.op, shape.key, shape.fmt) and previous.device == env["device"]:
        return previous, study
    best, default = best_trial(study), default_trial(study)
    chosen = best.params if best is not None else space.default()
    best_us = best.value if best is not None else None
    default_us = default.value if default is not None and default.value is not None else None
    if best_us is not None and default_us is not None and best.params != default.params:
        chosen, best_us, default_us = _confirm(case(), space, best.params, default.params, device)
    tuned = best_us is not None and math.isfinite(best_us)
    if not tuned:
        chosen, best_us = space.default(), None
    default_us = default_us if default_us is not None and math.isfinite(default_us) else None
    lowering, config = space.config(chosen)
    entry = Entry(
        op=shape.op,
        shape_key=shape.key,
        fmt=shape.fmt,
        lowering=lowering,
        config=config,
        tuned=tuned,
        time_us=best_us,
        default_time_us=default_us,
        torch_time_us=case().torch_time_us(),
        trials=len(measured_points(study)),
        **env,
    )
    return entry, study


def _confirm(case, space, best: dict, default: dict, device) -> tuple[dict, float, float]:
    """Times the study's winner and the default again, alternately (3 rounds on CUDA, 1 on the CPU), so that a
    winner by noise is not chosen: (the chosen params, its median time, the default's median time)."""
    rounds = 3 if torch.device(device).type == "cuda" else 1
    times: dict[str, list[float]] = {"best": [], "default": []}
    for _ in range(rounds):
        for name, params in (("best", best), ("default", default)):
            try:
                times[name].append(case.measure(*space.config(params)))
            except ConfigFailed:
                times[name].append(float("inf"))
    best_us, default_us = (sorted(t)[len(t) // 2] for t in (times["best"], times["default"]))
    return (best, best_us, default_us) if best_us < default_us else (default, default_us, default_us)


# ---- what the compiler reads -----------------------------------------------------------------------------------


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

    def choose(self, op: str, shape_key: str, fmt: str) -> Choice:
        entry = self.db.lookup(op, shape_key, fmt)
        if entry is not None and entry.tuned:
            return Choice(entry.lowering, dict(entry.config), True)
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
