"""Optuna studies over a discrete space: one study per (profile, op, shape bucket, format), resumable, shareable.

TPE over the space, seeded with the launcher's default (so the chosen config is never slower than the default
as measured) and then the space's structured alternatives (Space.alternatives); points that cannot run on the
profile are pruned before they launch; a point that fails to launch or gives a wrong result is a failed trial,
never chosen. Storage is a JournalStorage file (or SQLite for a path ending in .db/.sqlite): a second run with the
same storage resumes the study, and several workers may share it.

Trial accounting: `n_trials` counts measured points (complete or failed), not pruned ones or repeats of a point
already measured (those return the earlier value without launching). A trial whose worker died (a killed run) is
failed on the next start and its point queued again.
"""

from __future__ import annotations

import json
import os
import random
import socket
from collections.abc import Callable, Sequence
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from ..errors import DFlashError
from .measure import ConfigFailed, DeviceFault, is_device_fault
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
    prepare: Callable[[list[Params]], list[str | None] | None] | None = None,
    batch: int = 1,
    seeds: Sequence[Params] = (),
) -> optuna.Study:
    """Runs (or resumes) the study until n_trials points are measured or the feasible space is exhausted.

    measure(params) -> microseconds, raising ConfigFailed for a config that fails or is wrong. Points are proposed
    `batch` at a time (TPE with a constant liar, so a batch spreads out); `prepare(points)` gets each batch's new
    runnable points before any of them is measured (the tuner compiles and runs them once in worker processes
    there) and may return each point's error: a point that faulted the GPU there is marked failed, not measured.
    A point whose measurement faults the GPU (DeviceFault) is marked failed and stops the study with a one-line
    error: this process can measure nothing more, and a resumed study does not run that point again."""
    if n_trials < 1:
        raise DFlashError(f"parameter 'trials' must be >= 1, got {n_trials}")
    if batch < 1:
        raise DFlashError(f"parameter 'batch' must be >= 1, got {batch}")
    sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    study = optuna.create_study(
        study_name=study_name, storage=storage, direction="minimize", sampler=sampler, load_if_exists=True
    )
    fail_dead_trials(study, storage)
    study.enqueue_trial(space.default(), user_attrs={"default": True}, skip_if_exists=True)
    for seed_point in seeds:  # e.g. the database's current choice: a new study does not lose what was found
        study.enqueue_trial(seed_point, user_attrs={"seed": True}, skip_if_exists=True)
    for point in space.alternatives():
        study.enqueue_trial(point, user_attrs={"alternative": True}, skip_if_exists=True)
    feasible_points = space.feasible()
    target = min(n_trials, len(feasible_points))
    rng = random.Random(seed)

    def finished(trial: optuna.trial.FrozenTrial, wasted: bool) -> bool:
        if progress is not None and not wasted:
            progress(trial)
        measured = measured_points(study)
        if len(measured) >= target:
            return True
        if wasted:
            # TPE keeps proposing the best point it knows, or points that cannot run: measure an unmeasured
            # feasible point next instead of spending trials on them
            waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
            fresh = [p for p in feasible_points if params_key(p) not in measured]
            if fresh and not waiting:
                study.enqueue_trial(rng.choice(fresh), user_attrs={"explore": True})
        return False

    def run(trial: optuna.Trial, params: Params) -> bool:
        """Measures one asked point (or answers it from an earlier measurement); True when the study is done."""
        earlier = measured_points(study).get(params_key(params))
        if earlier is not None:
            trial.set_user_attr("repeat_of", earlier.number)
            if earlier.state == TrialState.FAIL:
                trial.set_user_attr("error", earlier.user_attrs.get("error", "failed"))
                frozen = study.tell(trial, state=TrialState.FAIL)
            else:
                frozen = study.tell(trial, earlier.value)
            return finished(frozen, wasted=True)
        fault = faults.pop(params_key(params), None)
        if fault is not None:
            trial.set_user_attr("error", f"faulted the GPU in a compile worker: {fault}")
            return finished(study.tell(trial, state=TrialState.FAIL), wasted=False)
        try:
            frozen = study.tell(trial, measure(params))
        except ConfigFailed as e:
            trial.set_user_attr("error", str(e))
            frozen = study.tell(trial, state=TrialState.FAIL)
        except DeviceFault as e:
            trial.set_user_attr("error", str(e))
            study.tell(trial, state=TrialState.FAIL)
            raise DFlashError(
                f"study {study_name}: config {params} {e}; it is marked failed, and this process can measure nothing "
                "more: resume the study with the same storage"
            ) from None
        return finished(frozen, wasted=False)

    # pruned points and repeats are cheap but bounded, so a space mostly infeasible still terminates
    budget = 20 * n_trials + 50
    faults: dict[str, str] = {}  # points that faulted the GPU in a compile worker, by params_key
    done = len(measured_points(study)) >= target
    while not done and budget > 0:
        asked: list[tuple[optuna.Trial, Params]] = []
        room = min(batch, target - len(measured_points(study)))  # a batch never measures past the target
        while len(asked) < room and budget > 0 and not done:
            budget -= 1
            trial = study.ask()
            trial.set_user_attr("worker", WORKER)
            params = space.suggest(trial)
            reason = space.check(params)
            if reason is None:
                asked.append((trial, params))
                continue
            trial.set_user_attr("pruned", reason)
            done = finished(study.tell(trial, state=TrialState.PRUNED), wasted=True)
        if prepare is not None:
            measured = measured_points(study)
            fresh = {params_key(p): p for _, p in asked if params_key(p) not in measured}
            if fresh:
                errors = prepare(list(fresh.values())) or []
                faults.update((key, e) for key, e in zip(fresh, errors) if e is not None and is_device_fault(e))
        for trial, params in asked:
            done = run(trial, params) or done
    return study


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The fastest complete trial (failed and pruned ones are never chosen), None if none completed."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    return min(done, key=lambda t: t.value) if done else None


def default_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The measured trial of the launcher's default (complete or failed), None before it ran."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
    return next((t for t in trials if t.user_attrs.get("default") and not t.user_attrs.get("interrupted")), None)
