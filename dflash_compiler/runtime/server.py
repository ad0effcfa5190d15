"""`dflash-serve`: an HTTP server over an `Engine`, speaking the OpenAI API (`/v1/completions`,
`/v1/chat/completions`, `/v1/models`) and SGLang's native `/generate` and `/flush_cache`, with Prometheus
`/metrics` and `/health`. Every request is submitted to the engine, whose scheduler batches them; a client that
disconnects has its request cancelled.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import secrets
import sys
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from ..errors import DFlashError
from .engine import DEFAULT_PAIR, Engine
from .options import add_calibration, add_glue, add_verify_width, calibration_texts
from .serving import QueueFullError, RequestHandle
from .speculative import GenerationStats

TOKENS_PER_S_WINDOW_S = 10.0
DISCONNECT_POLL_S = 0.1


class APIError(Exception):
    """An error answered with an OpenAI-style body {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, **headers):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = {k.replace("_", "-"): str(v) for k, v in headers.items()}

    @property
    def type(self) -> str:
        return {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}.get(
            self.status, "server_error" if self.status >= 500 else "invalid_request_error"
        )

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ---- request bodies -------------------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Sampling(_Body):
    """Sampling fields shared by the OpenAI endpoints (OpenAI's defaults)."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)  # -1 or 0: off (vLLM and SGLang spell it -1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    logprobs: Any = None


class CompletionBody(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False


class _ContentPart(_Body):
    type: str
    text: str | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[_ContentPart] | None = None


class ChatBody(_Sampling):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    chat_template_kwargs: dict[str, Any] | None = None


class _SGLangSampling(_Body):
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    sampling_seed: int | None = None
    n: int = 1
    ignore_eos: bool = False


class GenerateBody(_Body):
    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: _SGLangSampling = Field(default_factory=_SGLangSampling)
    stream: bool = False


# ---- metrics ---------------------------------------------------------------------------------------------------


class ServerMetrics:
    """Prometheus metrics of one app, in its own registry (several apps can live in one process)."""

    def __init__(self, engine: Engine):
        self.registry = registry = CollectorRegistry()
        loop = engine.loop
        block = _block_size(engine)
        self.requests = Counter(
            "dflash_requests", "Finished requests by finish reason", ["finish_reason"], registry=registry
        )
        self.rejected = Counter(
            "dflash_rejected_requests", "Requests refused, by HTTP status", ["status"], registry=registry
        )
        self.prompt_tokens = Counter("dflash_prompt_tokens", "Prompt tokens of served requests", registry=registry)
        self.generated_tokens = Counter("dflash_generated_tokens", "Tokens generated", registry=registry)
        self.verify_steps = Counter(
            "dflash_verify_steps", "Speculative verify steps of finished requests", registry=registry
        )
        self.accepted_at = Counter(
            "dflash_accepted_drafts",
            "Verify steps whose draft at this position (1-based) was accepted",
            ["position"],
            registry=registry,
        )
        self.acceptance = Histogram(
            "dflash_acceptance_length",
            "Tokens committed per verify step (accepted drafts + the bonus token)",
            buckets=[float(b) for b in range(1, block + 1)],
            registry=registry,
        )
        self.per_position = Gauge(
            "dflash_per_position_acceptance",
            "Fraction of verify steps whose draft at this position was accepted, since start",
            ["position"],
            registry=registry,
        )
        self.step_seconds = Histogram(
            "dflash_step_seconds",
            "Time of one scheduler iteration (batched) or one decoding step (eager)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=registry,
        )
        self.ttft = Histogram(
            "dflash_time_to_first_token_seconds",
            "Time from submission to the first token",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=registry,
        )
        Gauge("dflash_running_requests", "Requests holding a row", registry=registry).set_function(lambda: loop.running)
        Gauge("dflash_queued_requests", "Requests waiting for a row", registry=registry).set_function(
            lambda: loop.queued
        )
        Gauge(
            "dflash_tokens_per_second",
            f"Tokens generated per second over the last {TOKENS_PER_S_WINDOW_S:g} s",
            registry=registry,
        ).set_function(self._tokens_per_s)
        runner = engine.serving.runner if engine.serving is not None else None
        Gauge("dflash_kv_pages_in_use", "KV-cache pages reserved by requests", registry=registry).set_function(
            lambda: runner.pages_in_use if runner is not None else 0
        )
        Gauge("dflash_kv_pages_total", "KV-cache pages that requests can reserve", registry=registry).set_function(
            lambda: runner.page_pool.num_pages - 1 if runner is not None else 0
        )
        self._positions = max(block - 1, 0)
        self._steps, self._accepted = 0, [0] * self._positions  # what the per-position gauges divide
        for i in range(1, self._positions + 1):
            self.accepted_at.labels(str(i))
            self.per_position.labels(str(i)).set_function(self._position_rate(i))
        self._recent: deque[tuple[float, int]] = deque()
        loop.step_observers.append(self.step_seconds.observe)

    def _position_rate(self, i: int):
        return lambda: self._accepted[i - 1] / self._steps if self._steps else 0.0

    def tokens(self, n: int) -> None:
        if n:
            self.generated_tokens.inc(n)
            self._recent.append((time.monotonic(), n))

    def _tokens_per_s(self) -> float:
        cutoff = time.monotonic() - TOKENS_PER_S_WINDOW_S
        while self._recent and self._recent[0][0] < cutoff:
            self._recent.popleft()
        return sum(n for _, n in self._recent) / TOKENS_PER_S_WINDOW_S

    def finished(self, gen: Generation) -> None:
        self.requests.labels(gen.finish_reason or "error").inc()
        self.prompt_tokens.inc(len(gen.prompt_ids))
        steps = gen.stats.acceptance_lengths
        self.verify_steps.inc(len(steps))
        self._steps += len(steps)
        for a in steps:
            self.acceptance.observe(a)
        for i in range(1, self._positions + 1):
            accepted = sum(a - 1 >= i for a in steps)
            if accepted:
                self.accepted_at.labels(str(i)).inc(accepted)
                self._accepted[i - 1] += accepted
        if gen.token_ids:
            self.ttft.observe(gen.stats.time_to_first_token_s)


def _block_size(engine: Engine) -> int:
    if engine.serving is not None:
        return engine.serving.runner.block_size
    return engine.decoder.block_size


# ---- one generation ----------------------------------------------------------------------------------------------


@dataclass
class Generation:
    """One request on the engine, decoded to text incrementally, stopped at the first stop string."""

    engine: Engine
    metrics: ServerMetrics
    prompt_ids: list[int]
    handle: RequestHandle
    stop: list[str]
    stats: GenerationStats
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of text handed out so far
    _prefix: int = 0  # token offsets of the incremental decoding: context start, end of what text holds
    _read: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"; None while running or after an error
    matched: str | int | None = None
    failed: bool = False
    created: float = field(default_factory=time.time)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def start(
        cls, app_state: _State, prompt_ids: list[int], params: dict, stop: list[str], fields: dict[str, str]
    ) -> Generation:
        """Submits the request; fields maps the engine's parameter names to the request's fields for errors."""
        stats = GenerationStats()
        try:
            handle = app_state.engine.submit(prompt_ids, stats=stats, **params)
        except QueueFullError as e:
            app_state.metrics.rejected.labels("503").inc()
            raise APIError(503, str(e), code="queue_full", retry_after=app_state.retry_after_s) from None
        except DFlashError as e:
            app_state.metrics.rejected.labels("400").inc()
            raise _bad_request(e, fields) from None
        return cls(app_state.engine, app_state.metrics, prompt_ids, handle, stop, stats)

    def _decode(self, ids: list[int]) -> str:
        tok = self.engine.tokenizer
        return tok.decode(ids, skip_special_tokens=True) if tok is not None else ""

    def _extend(self, ids: list[int], final: bool = False) -> tuple[str, int, int]:
        """The text that tokens past the read offset add, decoded with a few tokens before them for context (so
        a token's leading space or a multi-byte character split across tokens comes out right) rather than from
        the start: (new text, new prefix offset, new read offset). An incomplete character waits for more tokens
        unless final."""
        prefix_text = self._decode(ids[self._prefix : self._read])
        text = self._decode(ids[self._prefix :])
        if len(text) > len(prefix_text) and (final or not text.endswith("\ufffd")):
            return text[len(prefix_text) :], self._read, len(ids)
        return "", self._prefix, self._read

    def _add(self, chunk: list[int]) -> None:
        """Takes a chunk of tokens; on a stop string keeps the tokens up to the one that completed it."""
        ids = self.token_ids + chunk
        if self.stop:
            # a stop string may straddle chunks: search from where the longest one could start, in every
            # character decoded so far (a trailing incomplete one cannot be part of a stop string)
            start = max(0, len(self.text) - max(map(len, self.stop)) + 1)
            text = self.text + self._extend(ids, final=True)[0]
            hits = [(i, s) for s in self.stop if (i := text.find(s, start)) >= 0]
            if hits:
                at, stop = min(hits)
                for j in range(1, len(chunk) + 1):  # the shortest prefix of the chunk that completes the stop
                    if stop in self.text + self._extend(self.token_ids + chunk[:j], final=True)[0]:
                        chunk = chunk[:j]
                        break
                self.token_ids += chunk
                self.text, self.finish_reason, self.matched = text[:at], "stop", stop
                self.handle.cancel()
                return
        new, prefix, read = self._extend(ids)
        self.token_ids = ids
        self.text += new
        self._prefix, self._read = prefix, read

    def _flush(self) -> None:
        """At the end: whatever the last tokens decode to, an incomplete character included."""
        if self._read < len(self.token_ids):
            new, self._prefix, self._read = self._extend(self.token_ids, final=True)
            self.text += new

    def _ready_text(self) -> str:
        """Text that can be handed out: nothing a stop string could still claim."""
        end = len(self.text)
        if self.finish_reason is None and self.stop:
            end -= max(map(len, self.stop)) - 1
        piece = self.text[self.sent : max(end, self.sent)]
        self.sent += len(piece)
        return piece

    async def pieces(self) -> AsyncIterator[str]:
        """Text pieces as steps commit tokens; finish_reason is set when it ends. The request is cancelled if the
        consumer stops early (a client that went away)."""
        try:
            async for chunk in self.handle:
                before = len(self.token_ids)
                self._add(chunk)
                self.metrics.tokens(len(self.token_ids) - before)
                if piece := self._ready_text():
                    yield piece
                if self.finish_reason is not None:
                    break
            if self.finish_reason is None:
                self._flush()
                self.finish_reason = self.handle.finish_reason
                if self.finish_reason == "stop" and self.token_ids:
                    self.matched = self.token_ids[-1]
            if piece := self._ready_text():
                yield piece
        except Exception as e:
            self.failed = True
            raise APIError(500, f"generation failed: {e}", code="step_failed") from None
        finally:
            if not self.handle.done:
                self.handle.cancel()
            if self.finish_reason is None and not self.failed:  # the consumer went away
                self.finish_reason = "cancelled"
            self.metrics.finished(self)

    async def run(self, request: Request) -> None:
        """Runs to the end, cancelling the request if the client disconnects meanwhile."""
        pieces = self.pieces()
        watcher = _watch_disconnect(request, self.handle)
        try:
            async for _ in pieces:
                pass
        finally:
            watcher.cancel()
            await pieces.aclose()

    @property
    def usage(self) -> dict:
        n = len(self.token_ids)
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": n, "total_tokens": len(self.prompt_ids) + n}

    @property
    def acceptance(self) -> dict:
        """The request's acceptance statistics (the response extension "dflash")."""
        s = self.stats
        return {
            "acceptance_length": s.acceptance_length,
            "acceptance_lengths": list(s.acceptance_lengths),
            "per_position_acceptance": s.per_position_acceptance,
            "spec_verify_ct": len(s.acceptance_lengths),
            "block_size": s.block_size,
            "time_to_first_token_s": s.time_to_first_token_s,
            "tokens_per_s": s.tokens_per_s,
        }


def _watch_disconnect(request: Request, handle: RequestHandle) -> asyncio.Future:
    async def watch():
        while not handle.done:
            if await request.is_disconnected():
                handle.cancel()
                return
            await asyncio.sleep(DISCONNECT_POLL_S)

    return asyncio.ensure_future(watch())


# ---- the app ------------------------------------------------------------------------------------------------------


@dataclass
class _State:
    engine: Engine
    metrics: ServerMetrics
    retry_after_s: int
    started: int = field(default_factory=lambda: int(time.time()))


OPENAI_FIELDS = {"max_new_tokens": "max_tokens"}  # the engine's parameter names as OpenAI request fields


def _bad_request(error: DFlashError, fields: dict[str, str] | None = None) -> APIError:
    """A DFlashError ("parameter 'x' ...") as a 400 naming the request field."""
    message = str(error)
    m = re.search(r"parameter '(\w+)'", message)
    param = m.group(1) if m else None
    if param is not None and fields and param in fields:
        message = message.replace(f"parameter '{param}'", f"parameter '{fields[param]}'")
        param = fields[param]
    return APIError(400, message, param=param, code="invalid_value")


def _stop_strings(stop: str | list[str] | None, param: str = "stop") -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in stops):
        raise APIError(400, f"parameter '{param}' holds an empty string", param=param, code="invalid_value")
    return stops


def _only_one(n: int, param: str = "n") -> None:
    if n != 1:
        raise APIError(400, f"parameter '{param}' must be 1 (one choice per request), got {n}", param=param)


def _sse(doc: dict | str) -> str:
    return f"data: {doc if isinstance(doc, str) else json.dumps(doc)}\n\n"


def create_app(
    engine: Engine,
    *,
    model_name: str | list[str] | tuple[str, ...] = "tiny-pair",
    api_key: str | None = None,
    retry_after_s: int = 1,
) -> FastAPI:
    """The server's app over an engine. model_name: the name(s) clients may ask for (the first is listed by
    /v1/models). With api_key, every endpoint but /health and /metrics needs `Authorization: Bearer <api_key>`."""
    names = (model_name,) if isinstance(model_name, str) else tuple(model_name)
    state = _State(engine, ServerMetrics(engine), retry_after_s)
    context = engine.serving.runner.max_seq_len if engine.serving is not None else engine.cfg.max_position_embeddings
    app = FastAPI(title="dflash-serve", description=__doc__)
    app.state.dflash = state

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            message = f"the request body is not valid JSON: {err.get('msg')}"
            return APIError(400, message, code="invalid_json").response()
        param = ".".join(loc) or None
        if param is None:
            return APIError(400, "the request body must be a JSON object", code="invalid_json").response()
        where = f"parameter '{param}'"
        return APIError(400, f"{where}: {err.get('msg')}", param=param, code="invalid_value").response()

    def authenticate(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            state.metrics.rejected.labels("401").inc()
            raise APIError(401, "missing or wrong API key (header Authorization: Bearer ...)", code="invalid_api_key")

    guarded = [Depends(authenticate)]

    def check_model(model: str | None) -> None:
        if model is not None and model not in names:
            raise APIError(
                400,
                f"parameter 'model': unknown model {model!r}; this server serves {names[0]!r}",
                param="model",
                code="model_not_found",
            )

    def sampling(body: _Sampling, max_tokens: int | None) -> dict:
        _only_one(body.n)
        if body.logprobs not in (None, False, 0):
            raise APIError(400, "parameter 'logprobs' is not supported", param="logprobs")
        return dict(
            max_new_tokens=max_tokens if max_tokens is not None else context,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=max(body.top_k, 0),
            seed=body.seed,
        )

    def start(prompt_ids: list[int], params: dict, stop: list[str], fields: dict[str, str]) -> Generation:
        return Generation.start(state, prompt_ids, params, stop, fields)

    def encode(fn, *args, param: str):
        try:
            return fn(*args)
        except DFlashError as e:
            raise _bad_request(e) from None
        except Exception as e:  # a tokenizer or chat-template failure on this input
            raise APIError(400, f"parameter '{param}': {type(e).__name__}: {e}", param=param) from None

    # ---- OpenAI ------------------------------------------------------------------------------------------------

    @app.get("/v1/models", dependencies=guarded)
    async def models():
        model = {"id": names[0], "object": "model", "created": state.started, "owned_by": "dflash-compiler"}
        return {"object": "list", "data": [{**model, "max_model_len": context}]}

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionBody, request: Request):
        check_model(body.model)
        if body.echo:
            raise APIError(400, "parameter 'echo' is not supported", param="echo")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                message = "parameter 'prompt' must hold one prompt (a batch is not supported)"
                raise APIError(400, message, param="prompt")
            prompt = prompt[0]
        ids = encode(engine.encode, prompt, param="prompt")
        gen = start(ids, sampling(body, body.max_tokens), _stop_strings(body.stop), OPENAI_FIELDS)
        return await respond(gen, request, body, chat=False)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatBody, request: Request):
        check_model(body.model)
        messages = []
        for m in body.messages:
            content = m.content
            if isinstance(content, list):
                content = "".join(part.text or "" for part in content if part.type == "text")
            messages.append({**(m.model_extra or {}), "role": m.role, "content": content or ""})
        ids = encode(engine.encode, messages, True, body.chat_template_kwargs, param="messages")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        fields = {**OPENAI_FIELDS, "prompt": "messages"}
        gen = start(ids, sampling(body, max_tokens), _stop_strings(body.stop), fields)
        return await respond(gen, request, body, chat=True)

    async def respond(gen: Generation, request: Request, body: _Sampling, chat: bool):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{gen.request_id}"
        obj = "chat.completion" if chat else "text_completion"
        head = {"id": rid, "created": int(gen.created), "model": body.model or names[0]}
        if not body.stream:
            await gen.run(request)
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": gen.text}}
            else:
                choice = {"index": 0, "text": gen.text, "logprobs": None}
            choice["finish_reason"] = gen.finish_reason
            return {**head, "object": obj, "choices": [choice], "usage": gen.usage, "dflash": gen.acceptance}
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        obj += ".chunk" if chat else ""

        def chunk(piece: str | None, finish: str | None, first: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": piece or ""} if first else {}
                if piece and not first:
                    delta["content"] = piece
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
            doc = {**head, "object": obj, "choices": [choice]}
            if include_usage:
                doc["usage"] = None
            return doc

        async def events():
            if chat:
                yield _sse(chunk("", None, first=True))
            try:
                async for piece in gen.pieces():
                    yield _sse(chunk(piece, None))
            except APIError as e:
                yield _sse(e.body())
                yield _sse("[DONE]")
                return
            last = chunk(None, gen.finish_reason)
            last["dflash"] = gen.acceptance
            yield _sse(last)
            if include_usage:
                yield _sse({**head, "object": obj, "choices": [], "usage": gen.usage})
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    # ---- SGLang ------------------------------------------------------------------------------------------------

    @app.post("/generate", dependencies=guarded)
    async def generate(body: GenerateBody, request: Request):
        if (body.text is None) == (body.input_ids is None):
            raise APIError(400, "give one of 'text' and 'input_ids'", param="text")
        sp = body.sampling_params
        _only_one(sp.n, "sampling_params.n")
        if sp.ignore_eos:
            param = "sampling_params.ignore_eos"
            raise APIError(400, f"parameter '{param}' is not supported", param=param)
        if body.text is not None:
            batch = body.text if isinstance(body.text, list) else None
            prompts = [encode(engine.encode, t, param="text") for t in (batch if batch is not None else [body.text])]
        else:
            nested = bool(body.input_ids) and isinstance(body.input_ids[0], list)
            batch = body.input_ids if nested else None
            prompts = [list(p) for p in (batch if batch is not None else [body.input_ids])]
        if batch is not None and body.stream:
            raise APIError(400, "parameter 'stream': a batch of prompts cannot be streamed", param="stream")
        params = dict(
            max_new_tokens=sp.max_new_tokens,
            temperature=sp.temperature,
            top_p=sp.top_p,
            top_k=max(sp.top_k, 0),
            seed=sp.sampling_seed,
            stop_token_ids=tuple(sp.stop_token_ids or ()),
        )
        stop = _stop_strings(sp.stop, "sampling_params.stop")
        fields = {
            "max_new_tokens": "sampling_params.max_new_tokens",
            "seed": "sampling_params.sampling_seed",
            "prompt": "input_ids" if body.text is None else "text",
        }
        gens = []
        try:
            for ids in prompts:
                gens.append(start(ids, params, stop, fields))
        except APIError:
            for g in gens:
                g.handle.cancel()
            raise
        if not body.stream:
            await asyncio.gather(*(g.run(request) for g in gens))
            outs = [sglang_output(g) for g in gens]
            return outs if batch is not None else outs[0]
        gen = gens[0]

        async def events():
            try:
                async for _ in gen.pieces():
                    yield _sse(sglang_output(gen))
            except APIError as e:
                yield _sse(e.body())
                yield _sse("[DONE]")
                return
            yield _sse(sglang_output(gen))
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    def sglang_output(gen: Generation) -> dict:
        n, steps = len(gen.token_ids), len(gen.stats.acceptance_lengths)
        reason = None
        if gen.finish_reason == "length":
            reason = {"type": "length", "length": n}
        elif gen.finish_reason == "stop":
            reason = {"type": "stop", "matched": gen.matched}
        elif gen.finish_reason == "cancelled":
            reason = {"type": "abort", "message": "cancelled"}
        meta = {
            "id": gen.request_id,
            "prompt_tokens": len(gen.prompt_ids),
            "completion_tokens": n,
            "finish_reason": reason,
            "spec_verify_ct": steps,
            "spec_accept_length": n / steps if steps else 1.0,
            "e2e_latency": time.time() - gen.created,
        }
        return {"text": gen.text, "output_ids": list(gen.token_ids), "meta_info": meta, "dflash": gen.acceptance}

    @app.api_route("/flush_cache", methods=["GET", "POST"], dependencies=guarded)
    async def flush_cache():
        # No prefix cache is kept between requests, so there is nothing to flush.
        return PlainTextResponse("Cache flushed.\n")

    # ---- operations ----------------------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        failure = engine.loop.failure
        if failure is not None:
            return JSONResponse({"status": "error", "message": str(failure)}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


# ---- the command line ------------------------------------------------------------------------------------------


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dflash-serve", description=__doc__.splitlines()[0])
    p.add_argument("artifact", nargs="?", help="a compiled artifact directory (or name the models with --target)")
    p.add_argument("--target", help="target checkpoint directory (default: the bundled tiny pair)")
    p.add_argument("--drafter", help="DFlash drafter checkpoint directory (omit to run the target alone)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but /health and /metrics")
    p.add_argument("--max-queue", type=int, default=256, help="requests that may wait for a row; more get 503")
    p.add_argument("--served-model-name", help="the model name clients use (default: the target directory's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on CPU, else bf16)")
    p.add_argument(
        "--runtime",
        default="batched",
        choices=("auto", "eager", "batched"),
        help="batched (default): every request in one batch per step; eager: one request at a time",
    )
    p.add_argument("--quant", default="bf16", choices=("bf16", "fp8", "int4"), help="weight format (batched)")
    p.add_argument("--block-size", type=int, default=None, help="draft block size (default: the drafter's)")
    p.add_argument("--max-batch", type=int, default=32, help="requests decoded together (batched runtime)")
    add_verify_width(p)
    add_calibration(p)
    add_glue(p)
    p.add_argument("--max-seq-len", type=int, default=None, help="prompt + generated tokens per request")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return p


def load_engine(args: argparse.Namespace) -> tuple[Engine, list[str]]:
    """The engine and model names that the parsed arguments describe."""
    if args.artifact is not None:
        if args.target is not None or args.drafter is not None:
            raise DFlashError("give an artifact or --target/--drafter, not both")
        if args.glue != "aten":
            raise DFlashError("parameter 'glue': an artifact runs the glue it was compiled with")
        engine = Engine.from_artifact(args.artifact)
        engine.loop.max_queue = args.max_queue
        names = [args.served_model_name or Path(args.artifact).name, args.artifact]
        return engine, list(dict.fromkeys(names))
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("float32" if device == "cpu" else "bfloat16")
    engine = Engine.from_pretrained(
        args.target,
        args.drafter,
        device=device,
        dtype=dtype,
        block_size=args.block_size,
        runtime=args.runtime,
        quant=args.quant,
        max_batch=args.max_batch,
        max_seq_len=args.max_seq_len,
        max_queue=args.max_queue,
        verify_width=args.verify_width,
        calibration=calibration_texts(args),
        glue=args.glue,
    )
    target = args.target or str(DEFAULT_PAIR)
    names = [args.served_model_name] if args.served_model_name else []
    return engine, list(dict.fromkeys([*names, Path(target).name, target]))


# The serving thread and the HTTP event loop share the GIL. At the default 5 ms switch interval a step of a
# millisecond or two waits up to 5 ms for the GIL whenever the event loop is busy streaming.
GIL_SWITCH_INTERVAL_S = 0.0005


def serve_main(argv: list[str] | None = None) -> int:
    args = serve_parser().parse_args(argv)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    try:
        engine, names = load_engine(args)
    except DFlashError as e:
        print(f"dflash-serve: error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    app = create_app(engine, model_name=names, api_key=args.api_key)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.close()
    return 0


if __name__ == "__main__":  # python -m dflash_compiler.runtime.server, where the console script is not installed
    raise SystemExit(serve_main())
