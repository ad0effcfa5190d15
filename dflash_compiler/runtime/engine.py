"""The embeddable API: `Engine.from_pretrained(target=..., drafter=...)`, then `generate` or `stream`."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DFlashError
from ..graph.cache import default_cache_dir
from ..models.loader import load_drafter, load_target, parse_dtype
from .batch import BatchRunner
from .proposer import DFlashProposer
from .sampling import SamplingParams
from .serving import EagerLoop, RequestHandle, ServingLoop
from .speculative import GenerationStats, SpeculativeDecoder, resolve_block_size

DEFAULT_PAIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-pair"


QUANTS = ("none", "bf16", "fp8", "int4")  # "bf16" is accepted as "none": the weights as loaded


@dataclass
class GenerationResult:
    text: str  # ends before a stop string, if one was met
    token_ids: list[int]  # through the token that completed a stop string or was a stop token
    stats: GenerationStats  # stats.limit_note says why, when the context left room for fewer than max_new_tokens
    finish_reason: str  # "stop" (a stop token or stop string) | "length"


def check_device(device: str | torch.device) -> torch.device:
    """The torch device, or a one-line error naming what is wrong with it (unknown name, backend not available,
    no such GPU index)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DFlashError(f"parameter 'device': {device!r} is not a torch device (cpu, cuda, cuda:N)") from None
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise DFlashError(f"parameter 'device' is {str(device)!r} but {dev.type.upper()} is not available here")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if dev.index is not None and dev.index >= count:
        raise DFlashError(f"parameter 'device' is {str(device)!r} but only {count} {dev.type} device(s) exist")
    return dev


CALIBRATION_TOKENS = 512  # tokens of each calibration prompt the quantizer's statistics read


def calibration_ids(prompts: Sequence[str | Sequence[int]], tokenizer) -> list[list[int]]:
    """Calibration prompts as token id lists (text through the tokenizer), each cut to CALIBRATION_TOKENS."""
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise DFlashError(f"parameter 'calibration'[{i}]: text needs a tokenizer; pass token ids")
            p = tokenizer.encode(p, add_special_tokens=False)
        out.append([int(t) for t in p][:CALIBRATION_TOKENS])
    return out


def _tuned_widths(target_cfg, quant: str, device: torch.device, asked: bool) -> dict[int, int] | None:
    """The verify widths this device's profile recorded for the target (tuning/choice.py)."""
    from ..hw_profiles import profile_for_device
    from ..tuning.choice import tuned_widths_or_block

    profile = profile_for_device(torch.cuda.get_device_properties(device)) if device.type == "cuda" else "cpu"
    return tuned_widths_or_block(target_cfg, "bf16" if quant == "none" else quant, profile, asked)


def _stop_strings(stop: str | Sequence[str]) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if any(not isinstance(s, str) or not s for s in stops):
        raise DFlashError(f"parameter 'stop' must hold non-empty strings, got {stop!r}")
    return stops


def _find_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    """Where the earliest stop string begins in text[start:], or None."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


def _partial_stop(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of text that begins a stop string: held back until it is known not to be one."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def load_tokenizer(*directories: str | Path | None):
    """The tokenizer (and chat template) of the first directory that has one, from local files only."""
    from transformers import AutoTokenizer

    tried = [str(d) for d in directories if d is not None]
    for d in directories:
        if d is None or not any((Path(d) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            continue
        try:
            return AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        except (OSError, ValueError) as e:
            raise DFlashError(f"{d}: cannot load the tokenizer ({e})") from None
    raise DFlashError(f"no tokenizer found in {' or '.join(tried)} (tokenizer.json / tokenizer_config.json)")


class Engine:
    """Generation on a target (and optionally its DFlash drafter).

    runtime "eager" runs each request through the eager loop (any device; `seed` makes sampling reproducible;
    streams may be interleaved, each holding its own caches). runtime "batched" serves every submitted request
    together through the batched step (CUDA graphs on CUDA; Triton kernels there, their PyTorch lowering
    elsewhere), with weights optionally quantized at load (quant "fp8" or "int4"; "none", or "bf16", keeps them as
    loaded); it takes the models' weights over. "auto" is batched on CUDA, eager elsewhere. `stream` and
    `generate` stop at stop strings (`stop=`) on either runtime. `submit` works on both (the eager runtime serves
    submitted requests one at a time); max_queue bounds the requests that may wait for a row (QueueFullError
    beyond it), None leaves the queue unbounded.
    """

    def __init__(
        self,
        target,
        drafter=None,
        tokenizer=None,
        block_size: int | None = None,
        runtime: str = "eager",
        quant: str = "none",
        max_batch: int = 32,
        max_seq_len: int | None = None,
        max_queue: int | None = None,
        runner: BatchRunner | None = None,
        cache_dir: str | Path | None = None,
        verify_width: int | Mapping[int, int] | None = None,
        calibration: Sequence[str | Sequence[int]] | None = None,
        glue: str = "aten",
    ):
        """runner: a batched runner built elsewhere (an artifact's), served as it is; target and drafter are then
        its meta models. cache_dir: where the batched runtime's compiler keeps traces between processes.
        verify_width (batched runtime): the tokens verified per request and step, for every batch size or by batch
        size (runtime/batch.py BatchRunner). calibration (quant "int4"): prompts, as text or token ids, whose
        activations guide the INT4 quantizer (graph/calibrate.py). glue (batched runtime): "inductor" compiles the
        ATen glue between the ops with TorchInductor (codegen/inductor.py)."""
        self.drafter, self.tokenizer = drafter, tokenizer
        self.cfg = target.cfg
        if runner is not None:
            runtime = "batched"
        if runtime == "auto":
            runtime = "batched" if target.embed_tokens.weight.device.type == "cuda" else "eager"
        if runtime not in ("eager", "batched"):
            raise DFlashError(f"parameter 'runtime' must be 'auto', 'eager' or 'batched', got {runtime!r}")
        if quant not in QUANTS:
            raise DFlashError(f"parameter 'quant' must be one of {', '.join(QUANTS)}, got {quant!r}")
        if runtime == "eager" and quant not in ("none", "bf16"):
            raise DFlashError(f"parameter 'quant' {quant!r} needs runtime='batched'")
        if runtime == "eager" and verify_width is not None:
            raise DFlashError("parameter 'verify_width' needs runtime='batched'")
        if runtime == "eager" and glue != "aten":
            raise DFlashError(f"parameter 'glue' {glue!r} needs runtime='batched'")
        if calibration is not None:
            calibration = calibration_ids(calibration, tokenizer)
        block_size = resolve_block_size(block_size, drafter.cfg.block_size if drafter is not None else None)
        self.runtime = runtime
        self.decoder = self.serving = None
        self.target = target if runtime == "eager" else None  # the batched runtime takes the weights over
        if runtime == "eager":
            proposer = DFlashProposer(drafter, target) if drafter is not None else None
            self.decoder = SpeculativeDecoder(target, proposer, block_size)
            self.loop = EagerLoop(self.decoder, max_queue)
        elif runner is not None:
            self.serving = self.loop = ServingLoop(runner, max_queue)
        else:
            runner = BatchRunner(
                target,
                drafter,
                block_size=block_size,
                max_batch=max_batch,
                # the attention split counts are sized for this bound: a model's full context (262k for Qwen3.5)
                # would split short contexts needlessly; pass max_seq_len for longer requests
                max_seq_len=max_seq_len or min(target.cfg.max_position_embeddings, 32768),
                quant="bf16" if quant == "none" else quant,  # the runner's name for the weights as loaded
                cache_dir=cache_dir,
                verify_width=verify_width,
                calibration=calibration,
                glue=glue,
            )
            self.serving = self.loop = ServingLoop(runner, max_queue)
        self.stop_token_ids = set(target.cfg.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.stop_token_ids.add(tokenizer.eos_token_id)

    @classmethod
    def from_pretrained(
        cls,
        target: str | Path | None = None,
        drafter: str | Path | None = None,
        device: str = "cpu",
        dtype: str | torch.dtype = "float32",
        block_size: int | None = None,
        runtime: str = "auto",
        quant: str = "none",
        max_batch: int = 32,
        max_seq_len: int | None = None,
        max_queue: int | None = None,
        cache_dir: str | Path | None = None,
        verify_width: int | Mapping[int, int] | str | None = None,
        calibration: Sequence[str | Sequence[int]] | None = None,
        glue: str = "aten",
    ) -> Engine:
        """Loads a target checkpoint directory and, optionally, its DFlash drafter. With neither named, the
        tiny trained pair that ships with the package is used. The batched runtime compiles the step in memory;
        its traces are kept on disk by content hash (cache_dir, default $DFLASH_CACHE_DIR or
        ~/.cache/dflash-compiler), so a later start of the same models and shapes does not trace again.
        verify_width "tuned": the widths per batch size that `dflash-tune --runtime` recorded for this model and
        quant on this device's profile; the default on the batched runtime at the drafter's own block (the whole
        block where no study is recorded)."""
        if target is None:
            if not (DEFAULT_PAIR / "target").is_dir():
                raise DFlashError("parameter 'target' is required (no default model pair is installed)")
            target = DEFAULT_PAIR / "target"
            drafter = drafter if drafter is not None else DEFAULT_PAIR / "drafter"
        device = check_device(device)
        dtype = parse_dtype(dtype)
        target_model = load_target(target, device=device, dtype=dtype)
        drafter_model = load_drafter(drafter, target_model.cfg, device=device, dtype=dtype) if drafter else None
        batched = runtime == "batched" or (runtime == "auto" and device.type == "cuda")
        own_block = drafter_model is not None and block_size in (None, drafter_model.cfg.block_size)
        by_default = verify_width is None and batched and own_block
        if verify_width == "tuned" or by_default:
            verify_width = None
            if drafter_model is not None:
                verify_width = _tuned_widths(target_model.cfg, quant, device, asked=not by_default)
        tokenizer = load_tokenizer(target, drafter)
        return cls(
            target_model, drafter_model, tokenizer, block_size, runtime, quant, max_batch, max_seq_len, max_queue,
            cache_dir=default_cache_dir() if cache_dir is None else cache_dir, verify_width=verify_width,
            calibration=calibration, glue=glue,
        )  # fmt: skip

    @classmethod
    def from_artifact(
        cls, artifact: str | Path, device: str = "cpu", strict: bool = True, max_queue: int | None = None
    ) -> Engine:
        """Runs a `dflash-compile` artifact: its graphs, weights and kernels, compiling nothing. Every file is
        checked against the manifest's checksums, the libraries against the versions it was compiled with and
        the device against its hardware profile (a one-line error names what differs). strict: a Triton kernel
        that is not in the artifact raises instead of being compiled."""
        from ..artifact.load import load_artifact

        loaded = load_artifact(artifact, check_device(device), strict=strict)
        compiled = loaded.compiled
        runner = BatchRunner(
            None, None, max_batch=loaded.max_batch, max_seq_len=loaded.max_seq_len, compiled=compiled,
            verify_width=loaded.verify_widths,
        )  # fmt: skip
        tokenizer = load_tokenizer(loaded.tokenizer_dir) if loaded.tokenizer_dir is not None else None
        engine = cls(compiled.step.target, compiled.step.drafter, tokenizer, max_queue=max_queue, runner=runner)
        engine.artifact = loaded
        return engine

    def close(self) -> None:
        """Stops the serving thread behind `submit` (unfinished requests fail)."""
        self.loop.close()

    def submit(
        self,
        prompt,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        chat: bool = False,
        stop_token_ids: Sequence[int] = (),
        stats: GenerationStats | None = None,
        seed: int | None = None,
    ) -> RequestHandle:
        """Queues a request and returns at once; safe from any thread. Iterate the handle (or `async for` it) for
        token chunks, or call `result()`. The batched runtime serves every submitted request together; the eager
        one serves them one at a time, in order. With max_queue set, a request beyond max_queue waiting ones
        raises QueueFullError."""
        params = SamplingParams(temperature, top_k, top_p)
        stops = self.stop_token_ids | set(stop_token_ids)
        prompt_ids = self.encode(prompt, chat)
        if self.serving is None:
            return self.loop.submit(prompt_ids, max_new_tokens, params, stops, stats, seed)
        if seed is not None and not params.greedy:
            raise DFlashError(
                "parameter 'seed' needs runtime='eager' (the batched runtime samples from the device's generator)"
            )
        return self.serving.submit(prompt_ids, max_new_tokens, params, stops, stats)

    def encode(
        self, prompt: str | Sequence[int] | list[dict], chat: bool = False, chat_template_kwargs: dict | None = None
    ) -> list[int]:
        """Token ids of a prompt: text, token ids, or (chat=True) a message or a list of messages put through the
        tokenizer's chat template (chat_template_kwargs, e.g. enable_thinking, go to the template)."""
        if isinstance(prompt, str) and not prompt:
            raise DFlashError("parameter 'prompt' is empty")
        if isinstance(prompt, str) or chat:
            if self.tokenizer is None:
                raise DFlashError("parameter 'prompt' is text but the engine has no tokenizer; pass token ids")
            if chat:
                messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
                if not messages:
                    raise DFlashError("parameter 'prompt' is an empty list of chat messages")
                if not getattr(self.tokenizer, "chat_template", None):
                    raise DFlashError("parameter 'chat' needs a chat template, and the tokenizer has none")
                ids = self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=True, **(chat_template_kwargs or {})
                )
                return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        return list(prompt)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    def stream_tokens(
        self,
        prompt,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        chat: bool = False,
        stop_token_ids: Sequence[int] = (),
        seed: int | None = None,
        stats: GenerationStats | None = None,
    ) -> Iterator[list[int]]:
        """Yields the tokens each step commits; ends after a stop token (included) or max_new_tokens. Where the
        context leaves room for fewer than max_new_tokens, stats.limit_note says so."""
        stats = stats if stats is not None else GenerationStats()
        ids = self.encode(prompt, chat)
        self._note_context_limit(len(ids), max_new_tokens, stats)
        if self.serving is not None:
            handle = self.submit(ids, max_new_tokens, temperature, top_p, top_k, False, stop_token_ids, stats, seed)
            try:
                yield from handle
            finally:
                if not handle.done:
                    handle.cancel()
            return
        params = SamplingParams(temperature, top_k, top_p)
        stops = self.stop_token_ids | set(stop_token_ids)
        yield from self.decoder.stream(ids, max_new_tokens, params, stops, seed, stats)

    def _note_context_limit(self, prompt_len: int, max_new_tokens: int, stats: GenerationStats) -> None:
        if self.serving is not None:
            limit, name = self.serving.runner.max_seq_len, "the engine's max_seq_len"
        else:
            limit, name = self.cfg.max_position_embeddings, "the model's context"
        room = limit - prompt_len
        stats.limit_note = None
        if isinstance(max_new_tokens, int) and 0 < room < max_new_tokens:
            stats.limit_note = (
                f"the prompt is {prompt_len} tokens and {name} is {limit}, so at most {room} of the "
                f"{max_new_tokens} new tokens asked for fit"
            )

    def stream(self, prompt, max_new_tokens: int = 128, stop: str | Sequence[str] = (), **kwargs) -> Iterator[str]:
        """Yields text pieces as tokens are committed (whole characters only). Generation ends at the first stop
        string, which is not yielded."""
        stats = kwargs.pop("stats", None)
        result = GenerationResult("", [], stats if stats is not None else GenerationStats(), "length")
        yield from self._stream_text(prompt, max_new_tokens, _stop_strings(stop), result, **kwargs)

    def generate(self, prompt, max_new_tokens: int = 128, stop: str | Sequence[str] = (), **kwargs) -> GenerationResult:
        stats = kwargs.pop("stats", None)
        result = GenerationResult("", [], stats if stats is not None else GenerationStats(), "length")
        for _ in self._stream_text(prompt, max_new_tokens, _stop_strings(stop), result, **kwargs):
            pass
        return result

    def _stream_text(
        self, prompt, max_new_tokens: int, stops: tuple[str, ...], result: GenerationResult, **kwargs
    ) -> Iterator[str]:
        """Decodes the committed tokens as they come, yields the new text and fills result. Text that may be the
        start of a stop string is held back until it is known not to be one."""
        tokens, emitted, stop_free = result.token_ids, 0, 0
        stop_ids = self.stop_token_ids | set(kwargs.get("stop_token_ids", ()))
        longest = max((len(s) for s in stops), default=0)
        chunks = self.stream_tokens(prompt, max_new_tokens, stats=result.stats, **kwargs)
        try:
            for chunk in itertools.chain(chunks, [None]):  # None: the request has ended
                if chunk is not None:
                    tokens.extend(chunk)
                text = self._decode(tokens)
                if chunk is not None and text.endswith("\ufffd"):  # a multi-byte character is still incomplete
                    continue
                cut = _find_stop(text, stops, max(0, emitted - longest))
                if cut is not None:
                    # keep the tokens through the one that completed the stop string
                    n = next(
                        n
                        for n in range(stop_free + 1, len(tokens) + 1)
                        if _find_stop(self._decode(tokens[:n]), stops, 0) is not None
                    )
                    del tokens[n:]
                    result.text, result.finish_reason = text[:cut], "stop"
                    if cut > emitted:
                        yield text[emitted:cut]
                    return
                stop_free = len(tokens)  # these tokens' text holds no stop string
                safe = len(text) - (_partial_stop(text, stops) if chunk is not None else 0)
                if safe > emitted:
                    yield text[emitted:safe]
                    emitted = safe
        finally:
            chunks.close()  # a stop string ends the request early (the batched runtime cancels it)
        result.text = text
        result.finish_reason = "stop" if tokens and tokens[-1] in stop_ids else "length"
