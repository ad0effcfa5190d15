"""Where `dflash-bench` sends its requests: an Engine in this process, or a running server speaking the OpenAI API
(this project's `dflash-serve`, vLLM) or SGLang's native `/generate`.

Every backend answers one request with a `RequestResult` whose numbers come from what the engine or server
reported: the Engine's `GenerationStats`; the OpenAI `usage` and this project's `dflash` response extension (the
request's `GenerationStats.as_dict()`); SGLang's `meta_info`. Only the time to the first token and the request's
latency are measured here, on the client, for servers.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

from ..errors import DFlashError
from ..runtime.speculative import GenerationStats
from .prompts import Prompt, check_chat_template, render_chat

# vLLM's speculative-decoding counters (Prometheus, /metrics), summed over engines and models
VLLM_DRAFTS = "vllm:spec_decode_num_drafts"
VLLM_ACCEPTED = "vllm:spec_decode_num_accepted_tokens"
VLLM_ACCEPTED_PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"


@dataclass
class Sampling:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off (not sent)


@dataclass
class RequestResult:
    prompt_id: str
    completion_tokens: int
    ttft_s: float  # submit to the first token
    latency_s: float  # submit to the last token
    finish_reason: str | None = None
    text: str = ""
    stats: GenerationStats | None = None  # per verify step: in process, and from this project's server
    verify_steps: int | None = None
    acceptance_length: float | None = None  # tau of this request, as reported

    def __post_init__(self):
        if self.stats is not None:
            self.verify_steps, self.acceptance_length = len(self.stats.acceptance_lengths), self.stats.acceptance_length

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first."""
        n = self.completion_tokens - 1
        return (self.latency_s - self.ttft_s) / n if n > 0 else None

    @classmethod
    def from_stats(cls, prompt_id: str, stats: GenerationStats, **kwargs) -> RequestResult:
        return cls(
            prompt_id,
            stats.generated_tokens,
            stats.time_to_first_token_s,
            stats.time_to_first_token_s + stats.decode_time_s,
            stats=stats,
            **kwargs,
        )

    def as_dict(self) -> dict:
        return {
            "prompt_id": self.prompt_id,
            "completion_tokens": self.completion_tokens,
            "ttft_s": self.ttft_s,
            "tpot_s": self.tpot_s,
            "latency_s": self.latency_s,
            "finish_reason": self.finish_reason,
            "verify_steps": self.verify_steps,
            "acceptance_length": self.acceptance_length,
            "acceptance_lengths": self.stats.acceptance_lengths if self.stats is not None else None,
        }


@dataclass
class ServerAcceptance:
    """Acceptance over a whole run, from server-wide counters (vLLM reports none per request)."""

    acceptance_length: float
    per_position_acceptance: list[float]
    verify_steps: int


class Backend:
    """One engine or server. `send` is called from several threads at once (the benchmark's concurrency)."""

    max_concurrency: int | None = None

    def begin_run(self) -> None:
        """Called before each (mode, concurrency) run."""

    def end_run(self) -> ServerAcceptance | None:
        return None

    def send(self, prompt: Prompt, sampling: Sampling) -> RequestResult:
        raise NotImplementedError

    def close(self) -> None:
        pass


class InProcessBackend(Backend):
    """An Engine in this process. The eager runtime serves one request at a time; the batched runtime batches
    every concurrent request."""

    def __init__(self, engine, chat: bool = False, enable_thinking: bool = False):
        self.engine, self.chat, self.enable_thinking = engine, chat, enable_thinking
        self.max_concurrency = 1 if engine.runtime == "eager" else None

    def prompt_text(self, prompt: Prompt) -> str:
        if self.chat:
            return render_chat(self.engine.tokenizer, prompt.messages, self.enable_thinking)
        return prompt.text

    def send(self, prompt: Prompt, sampling: Sampling) -> RequestResult:
        result = self.engine.generate(
            self.prompt_text(prompt),
            sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
        )
        return RequestResult.from_stats(prompt.id, result.stats, finish_reason=result.finish_reason, text=result.text)

    def close(self) -> None:
        import gc

        import torch

        self.engine.close()
        self.engine = None
        gc.collect()  # the next mode's engine sizes its KV pool from the memory left free
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class OpenAIBackend(Backend):
    """An OpenAI-compatible server: `/v1/completions` for raw prompts, `/v1/chat/completions` with `--chat`,
    streamed with usage. This project's server adds the request's acceptance statistics as a `dflash` object; for
    vLLM (`vllm_metrics`), acceptance comes from its Prometheus counters before and after each run, so the server
    must serve nothing else meanwhile."""

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        chat: bool = False,
        enable_thinking: bool = False,
        timeout_s: float = 3600.0,
        vllm_metrics: bool = False,
    ):
        import httpx
        import openai

        self.base_url = base_url.rstrip("/")
        self.chat, self.enable_thinking, self.vllm_metrics = chat, enable_thinking, vllm_metrics
        self.client = openai.OpenAI(
            base_url=f"{self.base_url}/v1", api_key=api_key or "EMPTY", timeout=timeout_s, max_retries=0
        )
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout_s, headers=headers) if vllm_metrics else None
        self._counters: dict | None = None
        try:
            self.model = model or self.client.models.list().data[0].id
        except (openai.APIError, IndexError) as e:
            raise DFlashError(f"{self.base_url}: cannot list the served models ({_one_line(e)})") from None

    def begin_run(self) -> None:
        self._counters = self._vllm_counters() if self.vllm_metrics else None

    def end_run(self) -> ServerAcceptance | None:
        if self._counters is None:
            return None
        before, after = self._counters, self._vllm_counters()
        drafts = after.get(VLLM_DRAFTS, 0.0) - before.get(VLLM_DRAFTS, 0.0)
        if drafts <= 0:
            return None
        accepted = after.get(VLLM_ACCEPTED, 0.0) - before.get(VLLM_ACCEPTED, 0.0)
        positions = sorted(k[1] for k in after if isinstance(k, tuple))
        per_position = [
            (after[(VLLM_ACCEPTED_PER_POS, p)] - before.get((VLLM_ACCEPTED_PER_POS, p), 0.0)) / drafts
            for p in positions
        ]
        return ServerAcceptance(1 + accepted / drafts, per_position, int(drafts))

    def _vllm_counters(self) -> dict:
        """The speculative-decoding counters of /metrics: totals by name, per-position totals by (name, position)."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        try:
            response = self.http.get("/metrics")
        except httpx.HTTPError as e:
            raise DFlashError(f"{self.base_url}/metrics: {_one_line(e)}") from None
        if response.status_code != 200:
            raise DFlashError(f"{self.base_url}/metrics: HTTP {response.status_code}")
        counters: dict = {}
        for family in text_string_to_metric_families(response.text):
            if family.name not in (VLLM_DRAFTS, VLLM_ACCEPTED, VLLM_ACCEPTED_PER_POS):
                continue
            for sample in family.samples:
                if not sample.name.endswith("_total"):
                    continue
                key = family.name
                if family.name == VLLM_ACCEPTED_PER_POS:
                    key = (family.name, int(sample.labels["position"]))
                counters[key] = counters.get(key, 0.0) + sample.value
        return counters

    def send(self, prompt: Prompt, sampling: Sampling) -> RequestResult:
        import openai

        extra: dict = {"top_k": sampling.top_k} if sampling.top_k > 0 else {}
        common = dict(
            model=self.model,
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            stream=True,
            stream_options={"include_usage": True},
        )
        t0 = time.perf_counter()
        first = None
        usage = extension = finish_reason = None
        pieces: list[str] = []
        try:
            if self.chat:
                extra["chat_template_kwargs"] = {"enable_thinking": self.enable_thinking}
                stream = self.client.chat.completions.create(messages=prompt.messages, extra_body=extra, **common)
            else:
                stream = self.client.completions.create(prompt=prompt.text, extra_body=extra or None, **common)
            for chunk in stream:
                for choice in chunk.choices:
                    piece = choice.delta.content if self.chat else choice.text
                    if piece:
                        first = first if first is not None else time.perf_counter()
                        pieces.append(piece)
                    finish_reason = choice.finish_reason or finish_reason
                usage = chunk.usage or usage
                extension = (chunk.model_extra or {}).get("dflash") or extension
        except openai.APIError as e:
            raise DFlashError(f"{self.base_url}: request {prompt.id} failed ({_one_line(e)})") from None
        end = time.perf_counter()
        if usage is None:
            raise DFlashError(f"{self.base_url}: the streamed response to {prompt.id} carried no usage")
        stats = None
        if extension is not None:
            if not isinstance(extension.get("acceptance_lengths"), list) or "block_size" not in extension:
                raise DFlashError(f"{self.base_url}: the 'dflash' extension lacks 'acceptance_lengths' or 'block_size'")
            stats = GenerationStats(
                prompt_tokens=usage.prompt_tokens,
                generated_tokens=usage.completion_tokens,
                block_size=int(extension["block_size"]),
                acceptance_lengths=[int(a) for a in extension["acceptance_lengths"]],
            )
        ttft = (first if first is not None else end) - t0
        return RequestResult(
            prompt.id, usage.completion_tokens, ttft, end - t0, finish_reason, "".join(pieces), stats=stats
        )

    def close(self) -> None:
        self.client.close()
        if self.http is not None:
            self.http.close()


class SGLangBackend(Backend):
    """SGLang's native API, as the upstream DFlash benchmark client drives it: `GET /flush_cache` before each run,
    `POST /generate` with `text` and `sampling_params` (streamed here, for the time to the first token), and
    `meta_info.completion_tokens`, `spec_verify_ct` and `spec_accept_length` read from the last chunk. A chat prompt
    is rendered on the client with the tokenizer's chat template, as upstream does."""

    def __init__(
        self,
        base_url: str,
        tokenizer=None,
        chat: bool = False,
        enable_thinking: bool = False,
        timeout_s: float = 3600.0,
        api_key: str | None = None,
    ):
        import httpx

        self.base_url = base_url.rstrip("/")
        self.tokenizer, self.chat, self.enable_thinking = tokenizer, chat, enable_thinking
        if chat:
            check_chat_template(tokenizer)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # no pool limit: the benchmark's concurrency is the limit
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout_s, headers=headers, limits=limits)

    def begin_run(self) -> None:
        import httpx

        try:
            status = self.http.get("/flush_cache").status_code
            problem = None if status == 200 else f"HTTP {status}"
        except httpx.HTTPError as e:
            problem = _one_line(e)
        if problem is not None:  # as upstream: the run goes on, its prompts may hit a warm prefix cache
            print(f"dflash-bench: warning: {self.base_url}/flush_cache: {problem}", file=sys.stderr)

    def send(self, prompt: Prompt, sampling: Sampling) -> RequestResult:
        import httpx

        text = render_chat(self.tokenizer, prompt.messages, self.enable_thinking) if self.chat else prompt.text
        params: dict = {
            "max_new_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
        }
        if sampling.top_k > 0:
            params["top_k"] = sampling.top_k
        body = {"text": text, "sampling_params": params, "stream": True}
        t0 = time.perf_counter()
        first = last = None
        try:
            with self.http.stream("POST", "/generate", json=body) as response:
                if response.status_code != 200:
                    detail = response.read().decode(errors="replace")[:200]
                    raise DFlashError(f"{self.base_url}/generate: HTTP {response.status_code} ({prompt.id}): {detail}")
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:") :].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if first is None and (chunk.get("text") or (chunk.get("meta_info") or {}).get("completion_tokens")):
                        first = time.perf_counter()
                    last = chunk
        except httpx.HTTPError as e:
            raise DFlashError(f"{self.base_url}/generate: request {prompt.id} failed ({_one_line(e)})") from None
        except json.JSONDecodeError as e:
            raise DFlashError(f"{self.base_url}/generate: a streamed chunk is not JSON ({e.msg})") from None
        end = time.perf_counter()
        meta = (last or {}).get("meta_info") or {}
        if "completion_tokens" not in meta:
            raise DFlashError(f"{self.base_url}/generate: no meta_info.completion_tokens for {prompt.id}")
        tokens = int(meta["completion_tokens"])
        verify_ct = int(meta.get("spec_verify_ct") or 0) or None  # 0 or absent: not speculative
        tau = meta.get("spec_accept_length")
        if verify_ct is not None and tau is None:
            tau = tokens / verify_ct  # SGLang's own definition of spec_accept_length
        reason = meta.get("finish_reason")
        return RequestResult(
            prompt.id,
            tokens,
            ttft_s=(first if first is not None else end) - t0,
            latency_s=end - t0,
            finish_reason=reason.get("type") if isinstance(reason, dict) else reason,
            text=last.get("text", "") if last else "",
            verify_steps=verify_ct,
            acceptance_length=float(tau) if verify_ct is not None else None,
        )

    def close(self) -> None:
        self.http.close()


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
