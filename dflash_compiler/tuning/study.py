"""Optuna studies over a discrete space: one study per (profile, op, shape bucket, format), resumable, shareable.

TPE over the space, seeded with the launcher's default (so the chosen config is never slower than the default
as measured); points that cannot run on the profile are pruned before they launch; a point that fails to launch or
gives a wrong result is a failed trial, never chosen. Storage is a JournalStorage file (or SQLite for a path
ending in .db/.sqlite): a second run with the same storage resumes the study, and several workers may share it.

Trial accounting: `n_trials` counts measured points (complete or failed), not pruned ones or repeats of a point
already measured (those return the earlier value without launching). A trial whose worker died (a killed run) is
failed on the next start and its point queued again.
"""

from __future__ import annotations

import json
import os
import random
import socket
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from ..errors import DFlashError
from .measure import ConfigFailed
from .spaces import Params, Space

WORKER = f"{socket.gethostname()}:{os.getpid()}"

optuna.logging.set_verbosity(optuna.logging.WARNING)


def open_storage(path: str | Path):
    """JournalStorage on a file, or RDBStorage on SQLite for .db/.sqlite/.sqlite3 paths."""
    path = Path(path)
    if not path.parent.is_dir():
        raise DFlashError(f"parameter 'storage': directory {path.parent} does not exist")
    if path.suffix in (".db", ".sqlite", ".sqlite3"):
        return RDBStorage(f"sqlite:///{path}")
    return JournalStorage(JournalFileBackend(str(path)))


def params_key(params: Params) -> str:
    return json.dumps(params, sort_keys=True)


def _alive(worker: str) -> bool:
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname():
        return True  # another machine's worker: not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


def fail_dead_trials(study: optuna.Study, storage) -> int:
    """Fails the running trials whose worker process on this host is gone and queues their points again."""
    dead = 0
    study_id = storage.get_study_id_from_name(study.study_name)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        if worker is None or _alive(worker):
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        storage.set_trial_user_attr(trial_id, "interrupted", True)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        if t.params:
            attrs = {"requeued_from": t.number, **({"default": True} if t.user_attrs.get("default") else {})}
            study.enqueue_trial(t.params, user_attrs=attrs)
        dead += 1
    return dead


def measured_points(study: optuna.Study) -> dict[str, optuna.trial.FrozenTrial]:
    """The first complete or failed (not interrupted) trial of every measured point."""
    points = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
        if t.user_attrs.get("interrupted") or t.user_attrs.get("repeat_of") is not None:
            continue
        points.setdefault(params_key(t.params), t)
    return points


def optimize(
    space: Space,
    measure: Callable[[Params], float],
    *,
    storage,
    study_name: str,
    n_trials: int,
    seed: int = 0,
    progress: Callable[[optuna.trial.FrozenTrial], None] | None = None,
) -> optuna.Study:
    """Runs (or resumes) the study until n_trials points are measured or the feasible space is exhausted.

    measure(params) -> microseconds, raising ConfigFailed for a config that fails or is wrong."""
    if n_trials < 1:
        raise DFlashError(f"parameter 'trials' must be >= 1, got {n_trials}")
    sampler = optuna.samplers.TPESampler(seed=seed)
    study = optuna.create_study(
        study_name=study_name, storage=storage, direction="minimize", sampler=sampler, load_if_exists=True
    )
    fail_dead_trials(study, storage)
    study.enqueue_trial(space.default(), user_attrs={"default": True}, skip_if_exists=True)
    feasible_points = space.feasible()
    feasible = len(feasible_points)
    rng = random.Random(seed)

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", WORKER)
        params = space.suggest(trial)
        reason = space.check(params)
        if reason is not None:
            trial.set_user_attr("pruned", reason)
            raise optuna.TrialPruned(reason)
        earlier = measured_points(study).get(params_key(params))
        if earlier is not None:
            trial.set_user_attr("repeat_of", earlier.number)
            if earlier.state == TrialState.FAIL:
                trial.set_user_attr("error", earlier.user_attrs.get("error", "failed"))
                raise ConfigFailed(earlier.user_attrs.get("error", "failed"))
            return earlier.value
        try:
            return measure(params)
        except ConfigFailed as e:
            trial.set_user_attr("error", str(e))
            raise

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        wasted = trial.state == TrialState.PRUNED or trial.user_attrs.get("repeat_of") is not None
        if progress is not None and not wasted:
            progress(trial)
        measured = measured_points(study)
        if len(measured) >= min(n_trials, feasible):
            study.stop()
        elif wasted:
            # TPE keeps proposing the best point it knows, or points that cannot run: measure an unmeasured
            # feasible point next instead of spending trials on them
            waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
            fresh = [p for p in feasible_points if params_key(p) not in measured]
            if fresh and not waiting:
                study.enqueue_trial(rng.choice(fresh), user_attrs={"explore": True})

    if len(measured_points(study)) < min(n_trials, feasible):
        # pruned points and repeats are cheap but bounded, so a space mostly infeasible still terminates
        study.optimize(objective, n_trials=20 * n_trials + 50, catch=(ConfigFailed,), callbacks=[after_trial])
    return study


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The fastest complete trial (failed and pruned ones are never chosen), None if none completed."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    return min(done, key=lambda t: t.value) if done else None


def default_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The measured trial of the launcher's default (complete or failed), None before it ran."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
    return next((t for t in trials if t.user_attrs.get("default") and not t.user_attrs.get("interrupted")), None)
