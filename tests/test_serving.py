"""The serving loops behind `Engine.submit`: submit never waits for a step, finished requests leave every table,
a step that raises fails only the requests in it, the queue is bounded, and the eager loop serves in order."""

import threading
import time

import pytest
import torch
from checkpoints import write_drafter, write_qwen35

from dflash_compiler.errors import DFlashError
from dflash_compiler.models.loader import load_drafter, load_target
from dflash_compiler.runtime.batch import BatchRunner
from dflash_compiler.runtime.proposer import DFlashProposer
from dflash_compiler.runtime.sampling import SamplingParams
from dflash_compiler.runtime.serving import EagerLoop, QueueFullError, ServingLoop, StepFailedError
from dflash_compiler.runtime.speculative import GenerationStats, SpeculativeDecoder

GREEDY = SamplingParams()
PROMPTS = [[3, 17, 5, 9], [40, 2, 2, 71, 8, 1], [11, 12], [60, 61, 62, 63, 64], [7] * 9, [33, 5, 90]]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    write_qwen35(root / "target", seed=11)
    write_drafter(root / "drafter", block_size=5)
    return root


def _models(pair):
    target = load_target(pair / "target", dtype=torch.float32)
    return target, load_drafter(pair / "drafter", target.cfg, dtype=torch.float32)


@pytest.fixture(scope="module")
def expected(pair):
    decoder = SpeculativeDecoder(*_with_proposer(*_models(pair)))
    return [decoder.generate(p, 12)[0] for p in PROMPTS]


def _with_proposer(target, drafter):
    return target, DFlashProposer(drafter, target)


def _loop(pair, **kwargs) -> ServingLoop:
    runner = BatchRunner(*_models(pair), max_batch=kwargs.pop("max_batch", 4), max_seq_len=96)
    return ServingLoop(runner, **kwargs)


class _GatedStep:
    """Replaces the runner's step model's step: each call waits for the gate, and a call can be made to raise."""

    def __init__(self, runner: BatchRunner):
        self.runner, self.real = runner, runner.model.step
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.fail_next = False
        self.calls = 0
        runner.model.step = self

    def __call__(self, *args):
        self.calls += 1
        self.entered.set()
        self.gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected step failure")
        return self.real(*args)


def _assert_tables_empty(loop: ServingLoop) -> None:
    """Once idle (the rows of the last finished requests leave at the iteration after their last tokens)."""
    runner = loop.runner
    deadline = time.monotonic() + 30
    while runner.has_work and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runner.requests == {} and not runner.waiting and runner.running == [] and runner.prefilling is None
    assert runner.pages_in_use == 0 and loop._handles == {} and loop.queued == 0


def test_submit_returns_at_once_while_a_step_runs(pair, expected):
    loop = _loop(pair)
    gated = _GatedStep(loop.runner)
    first = loop.submit(PROMPTS[0], 12, GREEDY)
    assert gated.entered.wait(60)  # the serving thread is inside a step, held there
    times, handles = [], []
    for p in PROMPTS[1:] * 4:
        t0 = time.perf_counter()
        handles.append(loop.submit(p, 12, GREEDY))
        times.append(time.perf_counter() - t0)
    assert max(times) < 0.05 and sorted(times)[len(times) // 2] < 0.005, times
    assert loop.queued == len(handles)  # nothing but the first was admitted while the step ran
    gated.gate.set()
    assert first.result(timeout=120) == expected[0]
    assert [h.result(timeout=120) for h in handles] == expected[1:] * 4
    _assert_tables_empty(loop)
    loop.close()


def test_finished_and_cancelled_requests_leave_every_table(pair, expected):
    loop = _loop(pair)
    for _ in range(3):
        handles = [loop.submit(p, 12, GREEDY) for p in PROMPTS * 2]
        handles[1].cancel()
        handles[7].cancel()
        results = [h.result(timeout=120) for h in handles]
        for i, (h, tokens) in enumerate(zip(handles, results)):
            exp = expected[i % len(PROMPTS)]
            if h.finish_reason == "cancelled":
                assert tokens == exp[: len(tokens)]
            else:
                assert tokens == exp and h.finish_reason == "length"
        assert {handles[1].finish_reason, handles[7].finish_reason} <= {"cancelled", "length"}
        _assert_tables_empty(loop)
    loop.close()


def test_a_failed_step_fails_only_its_requests(pair, expected):
    loop = _loop(pair, max_batch=1)  # one row: the second request waits while the first runs
    gated = _GatedStep(loop.runner)
    running = loop.submit(PROMPTS[0], 12, GREEDY)
    waiting = loop.submit(PROMPTS[1], 12, GREEDY)
    gated.fail_next = True
    gated.gate.set()
    with pytest.raises(StepFailedError, match="request 0: the step failed .RuntimeError: injected step failure"):
        running.result(timeout=120)
    assert waiting.result(timeout=120) == expected[1]  # queued during the failure, served after it
    assert loop.submit(PROMPTS[2], 12, GREEDY).result(timeout=120) == expected[2]  # the engine keeps serving
    assert loop.failed_steps == 1
    _assert_tables_empty(loop)
    assert loop.runner.page_pool.available == loop.runner.page_pool.num_pages - 1
    loop.close()


def test_the_queue_is_bounded(pair, expected):
    loop = _loop(pair, max_queue=3)
    gated = _GatedStep(loop.runner)
    handles = [loop.submit(PROMPTS[0], 12, GREEDY)]
    assert gated.entered.wait(60)
    handles += [loop.submit(p, 12, GREEDY) for p in PROMPTS[1:4]]  # the first has its row: three wait
    assert loop.queued == 3
    with pytest.raises(QueueFullError, match=r"the engine's queue is full \(3 requests wait for a row\)"):
        loop.submit(PROMPTS[4], 12, GREEDY)
    gated.gate.set()
    assert [h.result(timeout=120) for h in handles] == expected[:4]
    assert loop.submit(PROMPTS[4], 12, GREEDY).result(timeout=120) == expected[4]  # room again
    with pytest.raises(DFlashError, match="parameter 'max_queue' must be >= 1, got 0"):
        ServingLoop(loop.runner, max_queue=0)
    loop.close()
    with pytest.raises(DFlashError, match="the engine is closed"):
        loop.submit(PROMPTS[0], 4, GREEDY)


def test_sampling_buffers_are_allocated_at_start(pair):
    runner = BatchRunner(*_models(pair), max_batch=3, max_seq_len=64)
    probs = runner.pools.draft_probs
    assert probs is not None and tuple(probs.shape) == (4, 4, runner.vocab_size)
    assert runner.buckets == (1, 2, 3)
    loop = ServingLoop(runner)
    handles = [loop.submit(p, 6, SamplingParams(0.8, top_k=5)) for p in PROMPTS[:3]]
    assert all(len(h.result(timeout=120)) == 6 for h in handles)
    assert runner.pools.draft_probs is probs  # sampled requests did not allocate at admission
    loop.close()


def test_eager_loop_serves_in_order_and_cancels(pair, expected):
    target, drafter = _models(pair)
    loop = EagerLoop(SpeculativeDecoder(*_with_proposer(target, drafter)), max_queue=8)
    stats = [GenerationStats() for _ in PROMPTS]
    handles = [loop.submit(p, 12, GREEDY, stats=s) for p, s in zip(PROMPTS, stats)]
    handles[3].cancel()
    results = [h.result(timeout=120) for h in handles]
    for i, (h, tokens) in enumerate(zip(handles, results)):
        if i == 3 and h.finish_reason == "cancelled":
            assert tokens == expected[3][: len(tokens)]
        else:
            assert tokens == expected[i] and h.finish_reason == "length"
    assert all(s.generated_tokens == len(r) for s, r in zip(stats, results))
    seeded = [loop.submit(PROMPTS[0], 8, SamplingParams(0.9), seed=5).result(timeout=60) for _ in range(2)]
    assert seeded[0] == seeded[1]
    assert loop._handles == {} and loop.queued == 0 and loop.running == 0
    loop.close()
