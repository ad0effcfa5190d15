"""Tuning one kernel call on this machine into a database entry, and the choice the compiler reads back."""

from __future__ import annotations

import datetime
import math
import platform
import subprocess
from collections.abc import Callable
from typing import Any

import torch

from ..hw_profiles import HardwareProfile
from ..hw_profiles.database import Entry
from .measure import ConfigFailed, make_case
from .spaces import space_for
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
    precompiler=None,
):
    """Runs (or resumes) the study of one call and returns (its database entry, the study). The winner is timed
    again beside the default before it is chosen; a call whose every measured config failed gets the default,
    marked untuned. `previous` (the database's entry) is returned as it is when the study measured nothing new on
    this device. With a `precompiler` (tuning/precompile.py) points are proposed a batch per worker at a time and
    compiled in parallel before they are timed."""
    space = space_for(shape, profile)
    cases = []  # built on first use: a finished study needs no inputs

    def case():
        if not cases:
            cases.append(make_case(shape, profile, device, seed))
        return cases[0]

    def measure(params):
        lowering, config = space.config(params)
        return case().measure(lowering, config)

    known = space.point(previous.lowering, previous.config) if previous is not None else None
    study = optimize(
        space, measure, storage=storage, study_name=study_name(profile, shape), n_trials=n_trials, seed=seed,
        progress=progress, batch=precompiler.workers if precompiler else 1,
        prepare=(lambda points: precompiler.prepare(shape, space, points)) if precompiler else None,
        seeds=[known] if known is not None else [],
    )  # fmt: skip
    env = environment(torch.device(device))
    best, default = best_trial(study), default_trial(study)
    # The database already holds this study's result: as many measured points, and its winner as the config (or
    # the default where the winner is the default). An entry holding the default beside another winner is the
    # confirmation's choice of an earlier study, which says nothing of this one's winner: confirm it again.
    unchanged = (
        previous is not None
        and previous.trials == len(measured_points(study))
        and best is not None
        and (previous.lowering, previous.config) == space.config(best.params)
    )
    if unchanged and previous.key == (shape.op, shape.key, shape.fmt) and previous.device == env["device"]:
        return previous, study
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
