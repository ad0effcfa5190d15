"""The batched runtime: requests come and go while every running one advances by one speculative step at a time.

`BatchRunner.step()` is one scheduler iteration:
  1. requests that finished or were cancelled leave: their pages return to the pool and the last running row
     moves into the hole, so running requests always fill rows 0..n-1;
  2. up to prefill_chunk prompt tokens are prefilled in the reserved last row (a long prompt over several
     iterations, so it never stalls the others for long; short ones several at a time); a request whose prompt is
     done drafts its first block and joins at row n;
  3. the step for rows 0..n-1 is launched: a CUDA graph per (bucket, sampling, simulation) on CUDA, replayed,
     followed by an asynchronous copy of the committed tokens to pinned memory;
  4. the previous step's tokens are read (their copy is done by now, while this step runs on the GPU), stop
     conditions are checked and events are returned.
So the host never waits for the step it launched; results arrive one iteration later.

Memory is reserved per request at admission (its pages up to prompt + max_new_tokens + two blocks, and a row), so
a running batch never runs out of memory; a request that can never fit is refused with a clear error. Everything
else a step can need is fixed at start-up: the sampling buffers (draft probabilities of every row) are allocated
then, the step's workspace at the largest batch (full-vocabulary sorts of sampled rows included) is measured and
kept out of the KV budget, and on CUDA the graph of every (bucket, sampling) pair is captured then, not while
serving. Finished and cancelled requests leave every table.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import DFlashError
from ..graph.compiler import CompiledStep
from ..models.drafter import DFlashDrafter
from ..models.target import TargetModel
from .sampling import SamplingParams, probabilities, sample_from
from .speculative import GenerationStats, check_request
from .step_model import PAGE_SIZE, Pools, StepModel

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64)


def step_max_len(max_seq_len: int, block_size: int) -> int:
    """The max_len a runner compiles its step for: a request's tokens and two blocks, in whole KV pages."""
    return -(-(max_seq_len + 2 * block_size) // PAGE_SIZE) * PAGE_SIZE


def bucket_widths(
    verify_width: int | Mapping[int, int] | None, buckets: Sequence[int], block_size: int
) -> dict[int, int]:
    """The verify width of each bucket: verify_width for all of them, or by batch size (a bucket takes the width of
    the smallest batch size listed at or above it, the largest one's beyond); None: the whole block."""
    if verify_width is None:
        return {b: block_size for b in buckets}
    if block_size == 1:
        raise DFlashError("parameter 'verify_width': autoregressive decoding (no drafter) verifies one token")
    listed = dict(verify_width) if isinstance(verify_width, Mapping) else {max(buckets): verify_width}
    if not listed or any(not isinstance(k, int) or k < 1 for k in listed):
        raise DFlashError(f"parameter 'verify_width': batch sizes must be positive integers, got {listed}")
    for width in listed.values():
        if not isinstance(width, int) or not 2 <= width <= block_size:
            raise DFlashError(f"parameter 'verify_width' must be in 2..{block_size} (the draft block), got {width}")
    if not isinstance(verify_width, Mapping):
        return {b: verify_width for b in buckets}
    keys = sorted(listed)
    return {b: listed[next((k for k in keys if k >= b), keys[-1])] for b in buckets}


def runner_buckets(max_batch: int, buckets: Sequence[int] = BUCKETS) -> tuple[int, ...]:
    """The batch sizes a runner steps at: those of buckets below max_batch, and max_batch."""
    return tuple(sorted({b for b in buckets if b < max_batch} | {max_batch}))


@dataclass
class StepEvent:
    request_id: int
    tokens: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"


@dataclass
class _Request:
    id: int
    prompt: list[int]
    max_new_tokens: int
    params: SamplingParams
    stops: frozenset[int]
    stats: GenerationStats
    pages: list[int] = field(default_factory=list)
    prefilled: int = 0
    generated: int = 0
    finished: bool = False
    cancelled: bool = False
    t_submit: float = 0.0
    t_first: float = 0.0


class PagePool:
    """Free list of KV pages. Page 0 is the scratch page that free rows write to; it is never handed out."""

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self.free_pages = list(range(num_pages - 1, 0, -1))

    @property
    def available(self) -> int:
        return len(self.free_pages)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_pages):
            raise DFlashError(f"KV cache: {n} pages requested, {len(self.free_pages)} free")
        return [self.free_pages.pop() for _ in range(n)]

    def release(self, pages: list[int]) -> None:
        self.free_pages.extend(reversed(pages))


class BatchRunner:
    """Serves up to max_batch concurrent requests through the batched step.

    target/drafter: loaded models (drafter None, or block_size 1, is autoregressive decoding). The runner takes
    their weights over: it converts them to its kernels' formats at construction ("bf16" keeps the precision;
    "fp8", "int4" quantize) and releases the originals, so the modules cannot run afterwards. max_seq_len bounds
    prompt + generated tokens per request. KV pages are sized from free GPU memory after the weights
    (kv_memory_fraction of it) or, on CPU, for max_batch full-length requests. buckets: the batch sizes a step runs
    at (padded up to the next one; one CUDA graph each), max_batch always among them. verify_width: the tokens the
    target verifies per request and step (2..block_size, default block_size; the drafter always drafts its whole
    block, so a step of one width can follow a step of another), one for every bucket or a mapping from batch size
    to width (a bucket takes the width of the smallest batch size listed at or above it, the largest one's beyond):
    a wide verify pays at one request, a narrow one once the batch makes the step compute-bound. compiled: a
    prebuilt step (an
    artifact's) run instead of compiling target and drafter (pass None for both). cache_dir: where the compiler
    keeps traces between processes. calibration (quant "int4"): token id lists whose prefill gives the quantizer
    its activation statistics (graph/calibrate.py). glue: "inductor" compiles the ATen glue between the ops with
    TorchInductor (codegen/inductor.py; at the first run of each graph, before its capture), "aten" keeps it.
    """

    def __init__(
        self,
        target: TargetModel | None,
        drafter: DFlashDrafter | None = None,
        *,
        block_size: int | None = None,
        verify_width: int | Mapping[int, int] | None = None,
        max_batch: int = 32,
        max_seq_len: int = 4096,
        quant: str = "bf16",
        ops: str | None = None,
        cuda_graphs: bool | None = None,
        prefill_chunk: int = 512,
        kv_memory_fraction: float = 0.85,
        num_pages: int | None = None,
        buckets: Sequence[int] = BUCKETS,
        compiled: CompiledStep | None = None,
        cache_dir=None,
        calibration: Sequence[Sequence[int]] | None = None,
        glue: str = "aten",
    ):
        if compiled is not None:  # a prebuilt step (an artifact's): its graphs and weights, nothing compiled here
            if target is not None or drafter is not None:
                raise DFlashError("parameter 'compiled': pass either the models or their compiled step, not both")
            if glue != "aten":
                raise DFlashError(f"parameter 'glue': a prebuilt step runs its glue as compiled, not {glue!r}")
            target, drafter = compiled.step.target, compiled.step.drafter
            block_size = compiled.step.block_size if block_size is None else block_size
            if block_size != compiled.step.block_size:
                raise DFlashError(f"parameter 'block_size': the step was compiled for {compiled.step.block_size}")
            device, quant = compiled.device, compiled.quant
        else:
            device = target.embed_tokens.weight.device
        self.device = device
        on_cuda = device.type == "cuda"
        if block_size is None:
            block_size = drafter.cfg.block_size if drafter is not None else 1
        if drafter is None:
            block_size = 1
        if block_size < 1 or (drafter is not None and block_size > drafter.cfg.block_size):
            raise DFlashError(f"parameter 'block_size' must be in 1..{drafter.cfg.block_size if drafter else 1}")
        if not 1 <= max_batch <= BUCKETS[-1]:
            raise DFlashError(f"parameter 'max_batch' must be in 1..{BUCKETS[-1]}, got {max_batch}")
        if max_seq_len > target.cfg.max_position_embeddings:
            max_seq_len = target.cfg.max_position_embeddings
        if not buckets or any(not isinstance(b, int) or b < 1 for b in buckets):
            raise DFlashError(f"parameter 'buckets' must be positive batch sizes, got {tuple(buckets)}")
        # the step runs at the smallest bucket holding the running requests; max_batch is always the last one
        self._buckets = runner_buckets(max_batch, buckets)
        self.block_size, self.max_batch, self.max_seq_len = block_size, max_batch, max_seq_len
        self.prefill_chunk = prefill_chunk
        self.vocab_size = target.cfg.vocab_size
        self.pages_per_row = step_max_len(max_seq_len, block_size) // PAGE_SIZE
        self.model = StepModel(
            target,
            drafter,
            block_size,
            quant,
            ops or ("triton" if on_cuda else "reference"),
            consume=True,
            max_len=self.pages_per_row * PAGE_SIZE,
            compiled=compiled,
            cache_dir=cache_dir,
            calibration=calibration,
            glue=glue,
        )
        self.verify_widths = bucket_widths(verify_width, self.buckets, self.block_size)
        if on_cuda:
            torch.cuda.empty_cache()
        rows = max_batch + 1  # the last row prefills
        self.cuda_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs:
            from ..codegen.triton import linear

            # Graphs keep the split-K workspace's address: size it once, before any step runs.
            linear._workspace(device, 1 << 24, 1 << 16)
        if num_pages is None:
            wanted = max_batch * self.pages_per_row + 1
            if on_cuda:
                reserved = rows * (self.model.row_bytes() + self._draft_probs_bytes()) + self._step_workspace_bytes()
                free, _ = torch.cuda.mem_get_info(device)
                budget = int(free * kv_memory_fraction) - reserved - (2 << 30)
                num_pages = min(wanted, max(budget // self.model.page_bytes(), 0))
            else:
                num_pages = wanted
        if num_pages < 2:
            raise DFlashError("KV cache: no GPU memory left for KV pages after the weights and the step's workspace")
        self.pools: Pools = self._new_pools(rows, num_pages)
        self.page_pool = PagePool(num_pages)
        self.simulated = False
        self._ids = itertools.count()
        self.waiting: deque[_Request] = deque()
        self.left_waiting = 0  # requests that left `waiting` (admitted or cancelled) since start
        self.prefilling: _Request | None = None
        self.running: list[_Request] = []  # index = pool row
        self.requests: dict[int, _Request] = {}  # unfinished requests only
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._graph_pool = None
        self._pending: tuple | None = None  # (rows snapshot, pinned tokens, pinned counts, event)
        self._pinned = [self._pinned_buffers() for _ in range(2)]
        self._parity = 0
        self._events: list[StepEvent] = []
        if self.cuda_graphs:
            self._capture_all(simulated=False)

    @property
    def buckets(self) -> tuple[int, ...]:
        """The batch sizes a step runs at (a graph each on CUDA): the given buckets below max_batch, and max_batch."""
        return self._buckets

    def _draft_probs_bytes(self) -> int:
        return (self.block_size - 1) * self.vocab_size * 4 if self.block_size > 1 else 0

    def _new_pools(self, rows: int, num_pages: int) -> Pools:
        pools = self.model.new_pools(rows, num_pages, self.pages_per_row)
        if self.block_size > 1:  # sampled rows' draft distributions, allocated up front like every other buffer
            pools.draft_probs = torch.zeros(rows, self.block_size - 1, self.vocab_size, device=self.device)
        return pools

    @torch.inference_mode()
    def _step_workspace_bytes(self) -> int:
        """Peak memory of one sampled step at the largest bucket beyond its inputs (logits, full-vocabulary sorts
        of sampling, kernel workspaces), measured on pools of two pages with every row off."""
        probe = self._new_pools(self.max_batch + 1, 2)
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.model.step(probe, self.max_batch, probe.active, True, False)  # the whole block: the widest step
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del probe
        torch.cuda.empty_cache()
        return peak

    def _capture_all(self, simulated: bool) -> None:
        for bucket in self.buckets:
            for sampled in (False, True):
                if (bucket, sampled, simulated) not in self._graphs:
                    self._capture(bucket, sampled, simulated)

    # ---- requests ----------------------------------------------------------------------------------------

    def add_request(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        params: SamplingParams | None = None,
        stop_token_ids: Sequence[int] = (),
        stats: GenerationStats | None = None,
    ) -> int:
        """Queues a request; returns its id. Raises DFlashError for a request that can never fit."""
        req = self.prepare_request(prompt_ids, max_new_tokens, params, stop_token_ids, stats)
        self.enqueue(req)
        return req.id

    def prepare_request(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        params: SamplingParams | None = None,
        stop_token_ids: Sequence[int] = (),
        stats: GenerationStats | None = None,
    ) -> _Request:
        """Checks a request and gives it an id without touching the runner's tables, so any thread may call it
        while another steps the runner; `enqueue` (on the stepping thread) then queues it."""
        prompt = check_request(
            prompt_ids, max_new_tokens, self.vocab_size, self.max_seq_len, "this runner's max_seq_len"
        )
        max_new_tokens = min(max_new_tokens, self.max_seq_len - len(prompt))
        if self._pages_needed(len(prompt), max_new_tokens) > self.page_pool.num_pages - 1:
            raise DFlashError(
                f"parameter 'max_new_tokens': the request needs {len(prompt) + max_new_tokens + 2 * self.block_size} "
                f"tokens of KV cache (prompt, new tokens, two blocks), more than the "
                f"{(self.page_pool.num_pages - 1) * PAGE_SIZE} the cache holds"
            )
        params = params or SamplingParams()
        stats = stats if stats is not None else GenerationStats()
        stats.prompt_tokens, stats.block_size = len(prompt), self.block_size
        req = _Request(next(self._ids), prompt, max_new_tokens, params, frozenset(stop_token_ids), stats)
        req.t_submit = time.perf_counter()
        return req

    def enqueue(self, req: _Request) -> None:
        self.requests[req.id] = req
        self.waiting.append(req)

    def cancel(self, request_id: int) -> None:
        """Stops a request; it leaves at the next step with a final event (finish_reason "cancelled")."""
        req = self.requests.get(request_id)
        if req is not None and not req.finished:
            req.cancelled = True

    def set_verify_width(self, verify_width: int | Mapping[int, int] | None) -> None:
        """Changes the verify widths (given as to the constructor) while no request is running or waiting. On CUDA
        the graphs of the buckets whose width changed are captured again (those of the current acceptance mode;
        the others when simulate_acceptance changes it); the step graph of a new width is lowered once, over the
        weights already built."""
        if self.has_work:
            raise DFlashError("set_verify_width: requests are running or waiting; change the widths between them")
        widths = bucket_widths(verify_width, self.buckets, self.block_size)
        changed = {b for b in self.buckets if widths[b] != self.verify_widths[b]}
        self.verify_widths = widths
        stale = [key for key in self._graphs if key[0] in changed]
        for key in stale:
            del self._graphs[key]
        if self.cuda_graphs and not self._graphs:
            # A pool whose graphs are all gone may still hold their blocks; the allocator refuses new captures into
            # it, so they go to a new pool (the old one is freed with its blocks).
            self._graph_pool = None
            torch.cuda.empty_cache()
        # Only the graphs of the current acceptance mode come back now; the others when the mode changes.
        for key in stale:
            if key[2] == self.simulated:
                self._capture(*key)

    def simulate_acceptance(self, per_position: Sequence[float] | None) -> None:
        """Replaces the accept decision with a draw from a per-position acceptance profile, P(a >= i+1) =
        per_position[i], while every kernel still runs (for benchmarks at real shapes with random weights).
        None restores real acceptance. Entries past the block's draft slots are ignored."""
        if per_position is None:
            self.simulated = False
            if self.cuda_graphs:
                self._capture_all(simulated=False)
            return
        if self.block_size < 2:
            raise DFlashError("simulate_acceptance needs a drafter and block_size >= 2")
        prof = torch.zeros(self.block_size - 1)
        values = torch.tensor(list(per_position)[: self.block_size - 1], dtype=torch.float32)
        prof[: len(values)] = values
        self.pools.profile.copy_(prof)
        self.simulated = True
        if self.cuda_graphs:
            self._capture_all(simulated=True)

    def abort_active(self) -> tuple[list[int], list[StepEvent]]:
        """After a step raised: every request in it (prefilling or running) leaves with its pages, the rows are
        cleared, and waiting requests stay queued. Returns the ids of the unfinished requests that were dropped
        and the events of the other requests that the failed iteration had already produced."""
        held = {r.id: r for r in self._pending[0]} if self._pending is not None else {}
        held.update((r.id, r) for r in self.running)
        if self.prefilling is not None:
            held[self.prefilling.id] = self.prefilling
        failed = []
        for req in held.values():
            self._release_pages(req)
            if not req.finished:
                failed.append(req.id)
                req.finished = True
            self.requests.pop(req.id, None)
        self.running, self.prefilling, self._pending = [], None, None
        self.pools.active.zero_()
        events = [e for e in self._events if e.request_id not in failed]
        self._events = []
        return failed, events

    @property
    def pages_in_use(self) -> int:
        return self.page_pool.num_pages - 1 - self.page_pool.available

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running or self._pending)

    def _pages_needed(self, prompt_len: int, max_new: int) -> int:
        return -(-(prompt_len + max_new + 2 * self.block_size) // PAGE_SIZE)

    # ---- the scheduler iteration -----------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[StepEvent]:
        """One iteration (see the module docstring). Returns the events that became known."""
        self._release_finished()
        self._admit_and_prefill()
        launched = self._launch()
        self._collect()
        self._pending = launched
        events, self._events = self._events, []
        return events

    def _release_finished(self) -> None:
        for req in list(self.waiting):
            if req.cancelled:
                self.waiting.remove(req)
                self.left_waiting += 1
                self._finish(req, "cancelled")
        if self.prefilling is not None and self.prefilling.cancelled:
            self._finish(self.prefilling, "cancelled")
            self._release_pages(self.prefilling)
            self.prefilling = None
        row = 0
        while row < len(self.running):
            req = self.running[row]
            if not (req.finished or req.cancelled):
                row += 1
                continue
            if not req.finished:
                self._finish(req, "cancelled")
            self._release_pages(req)
            last = len(self.running) - 1
            if row != last:
                self.pools.move_row(last, row)
                self.running[row] = self.running[last]
            self.pools.active[last] = False
            self.running.pop()

    def _admit_and_prefill(self) -> None:
        """Prefills up to prefill_chunk prompt tokens: the rest of one prompt, or several short ones in turn."""
        budget = self.prefill_chunk
        while budget > 0:
            if self.prefilling is None and not self._admit():
                return
            req = self.prefilling
            start = req.prefilled
            chunk = req.prompt[start : start + budget]
            ids = torch.tensor(chunk, dtype=torch.long).to(self.device, non_blocking=True)
            logits = self.model.prefill_chunk(self.pools, self.max_batch, ids, start)
            req.prefilled += len(chunk)
            budget -= len(chunk)
            if req.prefilled < len(req.prompt):
                return
            self.prefilling = None
            self._join(req, logits)

    def _admit(self) -> bool:
        """Moves the first waiting request into the prefill row if a row and its pages are free."""
        if not self.waiting or len(self.running) >= self.max_batch:
            return False
        req = self.waiting[0]
        need = self._pages_needed(len(req.prompt), req.max_new_tokens)
        if need > self.page_pool.available:
            return False
        self.waiting.popleft()
        self.left_waiting += 1
        req.pages = self.page_pool.allocate(need)
        row, p = self.max_batch, self.pools
        table = torch.zeros(self.pages_per_row, dtype=torch.int32)
        table[:need] = torch.tensor(req.pages, dtype=torch.int32)
        p.block_table[row].copy_(table)
        p.cache_lens[row] = 0
        p.active[row] = False
        p.clear_row(row)
        p.temperature[row] = req.params.temperature
        p.top_k[row] = req.params.top_k
        p.top_p[row] = req.params.top_p
        self.prefilling = req
        return True

    def _join(self, req: _Request, logits: torch.Tensor) -> None:
        """A prompt is in: its first token, then its first draft, then the request joins the batch at row n."""
        if req.params.greedy:
            first = logits.argmax(-1)
        else:
            first = sample_from(probabilities(logits.unsqueeze(0), req.params), torch.rand(1, device=self.device))[0]
        first_token = int(first)  # the one host read of a request: its first token
        req.t_first = time.perf_counter()
        req.stats.time_to_first_token_s = req.t_first - req.t_submit
        row, p = self.max_batch, self.pools
        p.cache_lens[row] = len(req.prompt)
        rows = slice(row, row + 1)
        ones = torch.ones(1, dtype=torch.bool, device=self.device)
        self.model.draft(p, rows, ones, first.view(1).long(), p.block_table[rows], not req.params.greedy)
        req.generated = 1
        done = first_token in req.stops or req.max_new_tokens <= 1
        reason = ("stop" if first_token in req.stops else "length") if done else None
        self._events.append(StepEvent(req.id, [first_token], done, reason))
        if done:
            req.stats.generated_tokens = 1
            self._retire(req)
            self._release_pages(req)
            return
        dst = len(self.running)
        p.move_row(row, dst)
        p.active[dst] = True
        self.running.append(req)

    def _launch(self):
        n = len(self.running)
        if n == 0:
            return None
        bucket = next(b for b in self.buckets if b >= n)
        sampled = any(not r.params.greedy for r in self.running)
        key = (bucket, sampled, self.simulated)
        if self.cuda_graphs:
            self._graphs[key].replay()
        else:
            self.model.step(self.pools, bucket, self.pools.active, sampled, self.simulated, self.verify_widths[bucket])
        tokens, counts, event = self._pinned[self._parity]
        self._parity ^= 1
        tokens[:n].copy_(self.pools.out_tokens[:n], non_blocking=True)
        counts[:n].copy_(self.pools.out_count[:n], non_blocking=True)
        if event is not None:
            event.record()
        return (list(self.running), tokens, counts, event)

    def _collect(self) -> None:
        if self._pending is None:
            return
        rows, tokens, counts, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        now = time.perf_counter()
        counts_l = counts[: len(rows)].tolist()
        tokens_l = tokens[: len(rows)].tolist()
        for req, count, toks in zip(rows, counts_l, tokens_l):
            if req.finished or req.cancelled or count == 0:
                continue
            new = toks[:count]
            req.stats.acceptance_lengths.append(count)
            reason = None
            for i, tok in enumerate(new):
                if tok in req.stops:
                    new, reason = new[: i + 1], "stop"
                    break
            room = req.max_new_tokens - req.generated
            if len(new) >= room:
                new = new[:room]
                reason = reason or "length"
            req.generated += len(new)
            req.stats.generated_tokens = req.generated
            req.stats.decode_time_s = now - req.t_first
            if reason is not None:
                self._retire(req)  # its row and pages go at the next iteration's release
            self._events.append(StepEvent(req.id, new, reason is not None, reason))

    def _finish(self, req: _Request, reason: str) -> None:
        self._retire(req)
        self._events.append(StepEvent(req.id, [], True, reason))

    def _retire(self, req: _Request) -> None:
        req.finished = True
        self.requests.pop(req.id, None)

    def _release_pages(self, req: _Request) -> None:
        self.page_pool.release(req.pages)
        req.pages = []

    def _pinned_buffers(self):
        rows, b = self.pools.tokens.shape
        if self.device.type != "cuda":
            return torch.zeros(rows, b, dtype=torch.long), torch.zeros(rows, dtype=torch.int32), None
        return (
            torch.zeros(rows, b, dtype=torch.long).pin_memory(),
            torch.zeros(rows, dtype=torch.int32).pin_memory(),
            torch.cuda.Event(),
        )

    # ---- CUDA graphs ------------------------------------------------------------------------------------

    def _capture(self, bucket: int, sampled: bool, simulated: bool) -> torch.cuda.CUDAGraph:
        """Captures the step for rows 0..bucket-1. A warm-up run first compiles every kernel, with all rows
        switched off so that it changes nothing a live row reads."""
        p = self.pools
        off = torch.zeros_like(p.active)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        saved = (p.out_tokens.clone(), p.out_count.clone())
        with torch.cuda.stream(stream):
            self.model.step(p, bucket, off, sampled, simulated, self.verify_widths[bucket])
        torch.cuda.current_stream(self.device).wait_stream(stream)
        p.out_tokens.copy_(saved[0])
        p.out_count.copy_(saved[1])
        graph = torch.cuda.CUDAGraph()
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            self.model.step(p, bucket, p.active, sampled, simulated, self.verify_widths[bucket])
        self._graphs[(bucket, sampled, simulated)] = graph
        return graph

    # ---- measurement ---------------------------------------------------------------------------------------

    @torch.inference_mode()
    def phase_times_ms(self, iters: int = 20) -> dict[str, float]:
        """Mean GPU time of the compiled step graph for the current running batch ("step"), replayed alone.
        Advances the running requests (their events are dropped), so call it between measurements, not while
        serving."""
        if not self.cuda_graphs or not self.running:
            raise DFlashError("phase_times_ms needs CUDA graphs and running requests")
        self._collect()
        self._events.clear()
        n = len(self.running)
        bucket = next(b for b in self.buckets if b >= n)
        sampled = any(not r.params.greedy for r in self.running)
        p = self.pools
        key = (bucket, sampled, self.simulated)
        # Replays advance the batch; lengths and blocks are restored after every one (outside the timing), so
        # every replay sees the same batch and nothing runs past the requests' pages.
        lens, tokens = p.cache_lens.clone(), p.tokens.clone()
        step = self._graphs.get(key) or self._capture(*key)
        pairs = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step.replay()
            end.record()
            pairs.append((start, end))
            p.cache_lens.copy_(lens)
            p.tokens.copy_(tokens)
        torch.cuda.synchronize(self.device)
        return {"step": sum(s.elapsed_time(e) for s, e in pairs) / iters}
