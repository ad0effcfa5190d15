"""The embeddable API: `Engine.from_pretrained(target=..., drafter=...)`, then `generate` or `stream`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DFlashError
from ..models.loader import load_drafter, load_target, parse_dtype
from .batch import BatchRunner
from .proposer import DFlashProposer
from .sampling import SamplingParams
from .serving import EagerLoop, RequestHandle, ServingLoop
from .speculative import GenerationStats, SpeculativeDecoder

DEFAULT_PAIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-pair"


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    stats: GenerationStats
    finish_reason: str  # "stop" | "length"


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

    runtime "eager" runs one request at a time through the eager loop (any device; `seed` makes sampling
    reproducible). runtime "batched" serves every submitted request together through the batched step (CUDA
    graphs on CUDA; Triton kernels there, their PyTorch lowering elsewhere), with weights optionally quantized at
    load (quant "fp8" or "int4"); it takes the models' weights over. "auto" is batched on CUDA, eager elsewhere.
    `submit` works on both (the eager runtime serves submitted requests one at a time); max_queue bounds the
    requests that may wait for a row (QueueFullError beyond it), None leaves the queue unbounded.
    """

    def __init__(
        self,
        target,
        drafter=None,
        tokenizer=None,
        block_size: int | None = None,
        runtime: str = "eager",
        quant: str = "bf16",
        max_batch: int = 32,
        max_seq_len: int | None = None,
        max_queue: int | None = None,
    ):
        self.drafter, self.tokenizer = drafter, tokenizer
        self.cfg = target.cfg
        if runtime == "auto":
            runtime = "batched" if target.embed_tokens.weight.device.type == "cuda" else "eager"
        if runtime not in ("eager", "batched"):
            raise DFlashError(f"parameter 'runtime' must be 'auto', 'eager' or 'batched', got {runtime!r}")
        if runtime == "eager" and quant != "bf16":
            raise DFlashError(f"parameter 'quant' {quant!r} needs runtime='batched'")
        self.runtime = runtime
        self.decoder = self.serving = None
        self.target = target if runtime == "eager" else None  # the batched runtime takes the weights over
        if runtime == "eager":
            proposer = DFlashProposer(drafter, target) if drafter is not None else None
            self.decoder = SpeculativeDecoder(target, proposer, block_size)
            self.loop = EagerLoop(self.decoder, max_queue)
        else:
            runner = BatchRunner(
                target,
                drafter,
                block_size=block_size,
                max_batch=max_batch,
                # the attention split counts are sized for this bound: a model's full context (262k for Qwen3.5)
                # would split short contexts needlessly; pass max_seq_len for longer requests
                max_seq_len=max_seq_len or min(target.cfg.max_position_embeddings, 32768),
                quant=quant,
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
        quant: str = "bf16",
        max_batch: int = 32,
        max_seq_len: int | None = None,
        max_queue: int | None = None,
    ) -> Engine:
        """Loads a target checkpoint directory and, optionally, its DFlash drafter. With neither named, the
        tiny trained pair that ships with the package is used."""
        if target is None:
            if not (DEFAULT_PAIR / "target").is_dir():
                raise DFlashError("parameter 'target' is required (no default model pair is installed)")
            target = DEFAULT_PAIR / "target"
            drafter = drafter if drafter is not None else DEFAULT_PAIR / "drafter"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise DFlashError(f"parameter 'device' is {device!r} but CUDA is not available")
        dtype = parse_dtype(dtype)
        target_model = load_target(target, device=device, dtype=dtype)
        drafter_model = load_drafter(drafter, target_model.cfg, device=device, dtype=dtype) if drafter else None
        tokenizer = load_tokenizer(target, drafter)
        return cls(
            target_model, drafter_model, tokenizer, block_size, runtime, quant, max_batch, max_seq_len, max_queue
        )

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
        if isinstance(prompt, str) or chat:
            if self.tokenizer is None:
                raise DFlashError("parameter 'prompt' is text but the engine has no tokenizer; pass token ids")
            if chat:
                messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
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
        if self.serving is not None:
            handle = self.submit(prompt, max_new_tokens, temperature, top_p, top_k, chat, stop_token_ids, stats, seed)
            try:
                yield from handle
            finally:
                if not handle.done:
                    handle.cancel()
            return
        params = SamplingParams(temperature, top_k, top_p)
        stops = self.stop_token_ids | set(stop_token_ids)
        yield from self.decoder.stream(self.encode(prompt, chat), max_new_tokens, params, stops, seed, stats)

    def stream(self, prompt, max_new_tokens: int = 128, **kwargs) -> Iterator[str]:
        """Yields text pieces as tokens are committed (whole characters only)."""
        tokens: list[int] = []
        emitted = ""
        for chunk in self.stream_tokens(prompt, max_new_tokens, **kwargs):
            tokens.extend(chunk)
            text = self._decode(tokens)
            if text.endswith("\ufffd"):  # a multi-byte character is still incomplete
                continue
            if len(text) > len(emitted):
                yield text[len(emitted) :]
                emitted = text
        text = self._decode(tokens)
        if len(text) > len(emitted):
            yield text[len(emitted) :]

    def generate(self, prompt, max_new_tokens: int = 128, **kwargs) -> GenerationResult:
        stats = GenerationStats()
        tokens = [t for chunk in self.stream_tokens(prompt, max_new_tokens, stats=stats, **kwargs) for t in chunk]
        stops = self.stop_token_ids | set(kwargs.get("stop_token_ids", ()))
        reason = "stop" if tokens and tokens[-1] in stops else "length"
        return GenerationResult(self._decode(tokens), tokens, stats, reason)
