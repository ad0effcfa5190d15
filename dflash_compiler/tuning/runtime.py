"""The runtime study: the verify width (draft length) per batch bucket, the CUDA-graph bucket set and the prefill
chunk, against end-to-end tokens/s.

The objective is a callable from a RuntimeConfig to tokens/s per concurrency level; `pair_throughput` builds one
from a real model pair on the batched runtime (`BatchRunner`), with the pair's own acceptance or a simulated
acceptance profile (for random weights at real shapes): requests served to completion, or (steady_steps) the
decoding of a full batch, timed over a fixed number of steps. The study maximises the mean tokens/s over the
concurrency levels; each level's figure is kept in its trial (`tokens_per_s`), so the width chosen per bucket and
the figures of the alternatives can be read back (and plotted) from the study. A level's figure depends only on
the width of its own bucket, so after the default the study measures every width at every level at once (one
trial per width), and `chosen_config` composes the best width of each bucket from those measurements.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch

from ..errors import DFlashError
from ..runtime.batch import BUCKETS
from ..runtime.step_model import PAGE_SIZE
from .study import fail_dead_trials

GRAPH_BUCKET_SETS = {
    "default": BUCKETS,
    "pow2": (1, 2, 4, 8, 16, 32, 64),
    "fine": (1, 2, 3, 4, 6, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64),
}
PREFILL_CHUNKS = (128, 256, 512, 1024)
DEFAULT_PREFILL_CHUNK = 512
STEADY_WARMUP = 2  # untimed steps of a steady measurement after every request decodes


ACCEPTANCE_PROFILES = Path(__file__).resolve().parents[1] / "assets" / "acceptance_profiles.json"


def acceptance_profiles() -> dict[str, dict]:
    """The published per-position acceptance profiles of the Qwen3.5-27B DFlash drafter, by name: entry i of
    `per_position` is the fraction of verify steps in which draft slot i was accepted."""
    import json

    doc = json.loads(ACCEPTANCE_PROFILES.read_text())
    return {name: e for name, e in doc.items() if isinstance(e, dict) and "per_position" in e}


@dataclass(frozen=True)
class RuntimeConfig:
    widths: tuple[tuple[int, int], ...]  # (concurrency bucket, verify width), buckets ascending
    graph_buckets: str  # a name in GRAPH_BUCKET_SETS
    prefill_chunk: int

    def width(self, concurrency: int) -> int:
        """The width of the smallest bucket holding `concurrency` requests (the largest bucket's beyond)."""
        return next((w for b, w in self.widths if b >= concurrency), self.widths[-1][1])

    def as_dict(self) -> dict:
        return {
            "widths": {str(b): w for b, w in self.widths},
            "graph_buckets": list(GRAPH_BUCKET_SETS[self.graph_buckets]),
            "graph_bucket_set": self.graph_buckets,
            "prefill_chunk": self.prefill_chunk,
        }


class RuntimeSpace:
    """Widths per concurrency bucket (default: 1, autoregressive, up to the drafter's block; every width is a step
    compiled apart); the graph bucket sets (default: all; each set is a runner built apart); the prefill chunks.
    The default point: the drafter's full block everywhere, the runtime's buckets, 512-token chunks."""

    def __init__(
        self,
        concurrencies: Sequence[int],
        max_width: int,
        widths: Sequence[int] | None = None,
        graph_bucket_sets: Sequence[str] | None = None,
        prefill_chunks: Sequence[int] = PREFILL_CHUNKS,
    ):
        if not concurrencies or any(c < 1 for c in concurrencies):
            raise DFlashError(f"parameter 'concurrency' must list batch sizes >= 1, got {list(concurrencies)}")
        sets = list(GRAPH_BUCKET_SETS) if graph_bucket_sets is None else list(graph_bucket_sets)
        unknown = [name for name in sets if name not in GRAPH_BUCKET_SETS]
        if not sets or unknown:
            raise DFlashError(
                f"parameter 'graph_buckets' must name sets among {list(GRAPH_BUCKET_SETS)}, got {list(sets)}"
            )
        self.graph_bucket_sets = sets
        widths = (1, 2, 4, 8, 12, 16) if widths is None else widths
        if any(not 1 <= w <= max_width for w in widths):
            raise DFlashError(
                f"parameter 'widths' must lie in 1..{max_width} (the drafter's block), got {list(widths)}"
            )
        if not prefill_chunks or any(c < 1 for c in prefill_chunks):
            raise DFlashError(f"parameter 'prefill_chunks' must list chunk sizes >= 1, got {list(prefill_chunks)}")
        self.concurrencies = tuple(sorted(set(concurrencies)))
        self.max_width = max_width
        self.widths = sorted({w for w in widths if w <= max_width} | {max_width})
        self.prefill_chunks = sorted(set(prefill_chunks))

    def default(self) -> dict:
        return self.uniform(self.max_width)

    def uniform(self, width: int) -> dict:
        """The default point with every level at `width`."""
        chunk = DEFAULT_PREFILL_CHUNK if DEFAULT_PREFILL_CHUNK in self.prefill_chunks else self.prefill_chunks[0]
        return {
            **{f"width_c{c}": width for c in self.concurrencies},
            "graph_buckets": "default" if "default" in self.graph_bucket_sets else self.graph_bucket_sets[0],
            "prefill_chunk": chunk,
        }

    def suggest(self, trial: optuna.Trial) -> RuntimeConfig:
        widths = tuple((c, trial.suggest_categorical(f"width_c{c}", self.widths)) for c in self.concurrencies)
        return RuntimeConfig(
            widths,
            trial.suggest_categorical("graph_buckets", self.graph_bucket_sets),
            trial.suggest_categorical("prefill_chunk", self.prefill_chunks),
        )

    def config(self, params: dict) -> RuntimeConfig:
        widths = tuple((c, params[f"width_c{c}"]) for c in self.concurrencies)
        return RuntimeConfig(widths, params["graph_buckets"], params["prefill_chunk"])


def checkpoint_models(target_dir: str | Path, drafter_dir: str | Path, device: str = "cpu", dtype: str = "float32"):
    """A model source: (target, drafter) loaded fresh from checkpoint directories on each call (a runner takes the
    weights it is given over); drafter=False loads the target alone."""
    from ..models.loader import load_drafter, load_target, parse_dtype

    torch_dtype = parse_dtype(dtype)

    def models(drafter: bool = True):
        target = load_target(target_dir, device=device, dtype=torch_dtype)
        return target, load_drafter(drafter_dir, target.cfg, device=device, dtype=torch_dtype) if drafter else None

    return models


def random_models(target_cfg, drafter_cfg, device: str = "cuda", dtype: str = "bfloat16"):
    """A model source: (target, drafter) of the configurations with seeded random weights (models/random_init.py),
    for a study at real shapes with a simulated acceptance profile."""
    from ..models.loader import parse_dtype
    from ..models.random_init import random_drafter, random_target

    torch_dtype = parse_dtype(dtype)

    def models(drafter: bool = True):
        target = random_target(target_cfg, device, torch_dtype)
        return target, random_drafter(drafter_cfg, target_cfg.hidden_size, device, torch_dtype) if drafter else None

    return models


class _Runners:
    """One live runner at a time, kept while the trials ask for the same kind (speculative or autoregressive) and
    bucket set: the widths change between trials with set_verify_width, the prefill chunk as an attribute, so a
    trial pays for graph captures, not for loading and compiling the models again."""

    def __init__(self, models, max_batch: int, max_seq_len: int, quant: str, acceptance_profile):
        self.models, self.max_batch, self.max_seq_len, self.quant = models, max_batch, max_seq_len, quant
        self.acceptance_profile = acceptance_profile
        self.key, self.runner = None, None

    def get(self, speculative: bool, graph_buckets: str):
        from ..runtime.batch import BatchRunner

        if self.key != (speculative, graph_buckets):
            self.runner = None  # the previous runner's weights go before the next one's are built
            gc.collect()  # weights held only by reference cycles go now, not at the next collection (27B: OOM)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            target, drafter = self.models(drafter=speculative)
            block = drafter.cfg.block_size if drafter is not None else 1
            pages = self.max_batch * -(-(self.max_seq_len + 2 * block) // PAGE_SIZE) + 1  # the pool they need
            self.runner = BatchRunner(
                target, drafter, max_batch=self.max_batch, max_seq_len=self.max_seq_len, quant=self.quant,
                buckets=GRAPH_BUCKET_SETS[graph_buckets], num_pages=pages,
            )  # fmt: skip
            if speculative and self.acceptance_profile is not None:
                self.runner.simulate_acceptance(self.acceptance_profile)
            self.key = (speculative, graph_buckets)
        return self.runner


def _buckets_of(concurrencies: Sequence[int], max_batch: int, bucket_set: str) -> dict[int, int]:
    """The CUDA-graph bucket a runner of max_batch rows with the named bucket set steps each level at."""
    from ..runtime.batch import runner_buckets

    buckets = runner_buckets(max_batch, GRAPH_BUCKET_SETS[bucket_set])
    return {c: next(b for b in buckets if b >= c) for c in concurrencies}


def pair_throughput(
    models,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    max_batch: int,
    quant: str = "bf16",
    acceptance_profile: Sequence[float] | None = None,
    max_seq_len: int = 1024,
    steady_steps: int = 0,
) -> Callable[[RuntimeConfig, Sequence[int]], dict[int, float]]:
    """An objective over a model source (checkpoint_models, random_models) on the batched runtime, one runner of
    max_batch rows serving every level: for each concurrency c, c requests (the prompts in turn) served to
    completion at the width the config gives c's bucket; tokens/s = generated tokens over wall time (graph
    captures and an untimed warm-up pass happen before the timing). Levels of width 1 run on an autoregressive
    runner (no drafter).

    steady_steps > 0: the decoding rate of a full batch instead, without prefill or the batch's tail. The c
    requests (max_new_tokens each) are prefilled and stepped STEADY_WARMUP times untimed, then steady_steps steps
    are timed and the requests are cancelled. Requests served to completion spend much of a short run in prefill
    and in the tail, where fewer than c are decoding; this is the rate the speculative step itself sets, and it
    varies far less from trial to trial. With a simulated profile the rate is taken at the profile's mean
    acceptance for the level's width (c (1 + sum of its first width - 1 rates) tokens per timed step), so that a
    few steps' draws do not decide between widths; with real acceptance, the tokens committed."""

    if steady_steps < 0:
        raise DFlashError(f"parameter 'steady_steps' must be >= 0, got {steady_steps}")
    runners = _Runners(models, max_batch, max_seq_len, quant, acceptance_profile)

    def steady(runner, concurrency: int, width: int) -> float:
        torch.manual_seed(0)  # the same draws in every trial (simulated acceptance, sampling)
        rids = [runner.add_request(list(prompts[i % len(prompts)]), max_new_tokens) for i in range(concurrency)]
        produced = dict.fromkeys(rids, 0)
        while runner.has_work and not all(produced.values()):  # prefill until every request decodes
            for ev in runner.step():
                produced[ev.request_id] += len(ev.tokens)
        for _ in range(STEADY_WARMUP):
            runner.step()
        sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda *_: None)
        sync(runner.device)
        generated, finished, start = 0, 0, time.perf_counter()
        for _ in range(steady_steps):
            for ev in runner.step():
                generated += len(ev.tokens)
                finished += ev.finished and ev.finish_reason != "cancelled"
        sync(runner.device)
        elapsed = time.perf_counter() - start
        for rid in rids:
            runner.cancel(rid)
        while runner.has_work:
            runner.step()
        if finished:
            raise DFlashError(
                f"parameter 'max_new_tokens': {max_new_tokens} tokens per request ran out during the "
                f"{STEADY_WARMUP} + {steady_steps} steady steps at concurrency {concurrency}"
            )
        if acceptance_profile is not None:
            return concurrency * (1 + sum(acceptance_profile[: width - 1])) * steady_steps / elapsed
        return generated / elapsed

    def serve(runner, concurrency: int) -> float:
        # An untimed pass first: the prefill's kernels compile on their first shapes, and the timed pass must
        # not pay for that.
        for i in range(concurrency):
            runner.add_request(list(prompts[i % len(prompts)]), min(max_new_tokens, 2 * runner.block_size))
        while runner.has_work:
            runner.step()
        # Every timed pass draws the same random numbers (simulated acceptance, sampling), so trials differ by
        # their config, not by their draws.
        torch.manual_seed(0)
        for i in range(concurrency):
            runner.add_request(list(prompts[i % len(prompts)]), max_new_tokens)
        generated = 0
        start = time.perf_counter()
        while runner.has_work:
            generated += sum(len(e.tokens) for e in runner.step())
        if runner.device.type == "cuda":
            torch.cuda.synchronize(runner.device)
        return generated / (time.perf_counter() - start)

    def measure(config: RuntimeConfig, concurrencies: Sequence[int]) -> dict[int, float]:
        bucket_of = _buckets_of(concurrencies, max_batch, config.graph_buckets)
        speculative = [c for c in concurrencies if config.width(c) > 1]
        widths: dict[int, int] = {}
        for c in speculative:
            if widths.setdefault(bucket_of[c], config.width(c)) != config.width(c):
                raise optuna.TrialPruned(
                    f"concurrency levels in bucket {bucket_of[c]} of set {config.graph_buckets!r} ask for different "
                    "widths"
                )
        out = {}
        for is_speculative, levels in (
            (True, speculative),
            (False, [c for c in concurrencies if c not in speculative]),
        ):
            if not levels:
                continue
            runner = runners.get(is_speculative, config.graph_buckets)
            runner.prefill_chunk = config.prefill_chunk
            if is_speculative:
                runner.set_verify_width(widths)
            if steady_steps:
                out.update({c: steady(runner, c, config.width(c)) for c in levels})
            else:
                out.update({c: serve(runner, c) for c in levels})
        return {c: out[c] for c in concurrencies}

    return measure


def runtime_study(
    space: RuntimeSpace,
    throughput: Callable[[RuntimeConfig, Sequence[int]], dict[int, float]],
    *,
    storage,
    study_name: str,
    n_trials: int,
    seed: int = 0,
    progress: Callable[[optuna.trial.FrozenTrial], None] | None = None,
) -> optuna.Study:
    """Runs (or resumes) the study to n_trials finished trials, the default first."""
    study = optuna.create_study(
        study_name=study_name,
        storage=storage,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed),
        load_if_exists=True,
    )
    fail_dead_trials(study, storage)
    study.enqueue_trial(space.default(), user_attrs={"default": True}, skip_if_exists=True)
    for width in reversed(space.widths[:-1]):  # then every width at every level: the whole widths table
        study.enqueue_trial(space.uniform(width), skip_if_exists=True)
    from .study import WORKER

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", WORKER)
        config = space.suggest(trial)
        per_level = throughput(config, space.concurrencies)
        trial.set_user_attr("tokens_per_s", {str(c): v for c, v in per_level.items()})
        return sum(per_level.values()) / len(per_level)

    finished = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL
    done = len([t for t in study.get_trials(states=finished) if not t.user_attrs.get("interrupted")])
    callbacks = [lambda s, t: progress(t)] if progress is not None else []
    if done < n_trials:
        study.optimize(objective, n_trials=n_trials - done, callbacks=callbacks)
    return study


def widths_table(study: optuna.Study, space: RuntimeSpace) -> dict[int, dict[int, float]]:
    """Per concurrency level, the best tokens/s measured at each width (the alternatives the choice beat)."""
    table: dict[int, dict[int, float]] = {c: {} for c in space.concurrencies}
    for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        for c in space.concurrencies:
            value = t.user_attrs.get("tokens_per_s", {}).get(str(c))
            width = t.params.get(f"width_c{c}")
            if value is not None and width is not None:
                table[c][width] = max(value, table[c].get(width, 0.0))
    return table


def chosen_config(study: optuna.Study, space: RuntimeSpace, max_batch: int) -> tuple[RuntimeConfig, float]:
    """The study's answer and its mean tokens/s: the best trial's bucket set and prefill chunk, with each level at
    the width that gave it the most tokens/s among the trials of that bucket set and chunk. A level's figure
    depends only on its bucket's width, so the composed point's figures are the measured ones. Levels that share
    a bucket share a width: where their best widths differ, they keep the best trial's."""
    best = study.best_trial
    same = [
        t
        for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        if t.params.get("graph_buckets") == best.params["graph_buckets"]
        and t.params.get("prefill_chunk") == best.params["prefill_chunk"]
    ]
    params, values = dict(best.params), {}
    for c in space.concurrencies:
        measured = [(t.user_attrs["tokens_per_s"][str(c)], t.params[f"width_c{c}"]) for t in same]
        values[c], params[f"width_c{c}"] = max(measured)
    bucket_of = _buckets_of(space.concurrencies, max_batch, best.params["graph_buckets"])
    for c in space.concurrencies:
        shared = [d for d in space.concurrencies if bucket_of[d] == bucket_of[c]]
        if len({params[f"width_c{d}"] for d in shared}) > 1:
            for d in shared:
                params[f"width_c{d}"] = best.params[f"width_c{d}"]
                values[d] = best.user_attrs["tokens_per_s"][str(d)]
    return space.config(params), sum(values.values()) / len(values)
