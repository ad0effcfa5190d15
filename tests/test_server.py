"""`dflash-serve` on the tiny pair on CPU, on loopback, driven by the official `openai` client and by SGLang-style
`/generate` requests as the upstream DFlash benchmark client sends them: every response equals the Engine's own
greedy output, bad input gets OpenAI-style errors, a client that goes away frees its pages, overload is refused
with Retry-After, and after a load test the metrics match what was sent and the runner's tables are empty."""

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from dflash_compiler.runtime import Engine
from dflash_compiler.runtime.engine import DEFAULT_PAIR
from dflash_compiler.runtime.server import create_app, load_engine, serve_main, serve_parser

MODEL = "tiny-pair"
PROMPTS = [
    json.loads(line)["prompt"][:60] for line in (DEFAULT_PAIR / "heldout_prompts.jsonl").read_text().splitlines()
]


class Server:
    """A uvicorn server on a free loopback port, in a background thread."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120, **kwargs)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def engine():
    # block 4 and a short context keep the CPU steps cheap; the eager test below serves the drafter's block 16
    engine = Engine.from_pretrained(runtime="batched", block_size=4, max_batch=32, max_seq_len=128, max_queue=256)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def server(engine):
    server = Server(create_app(engine, model_name=[MODEL, str(DEFAULT_PAIR)]))
    yield server
    server.stop()


def _metrics(url: str) -> dict[str, float]:
    """Every sample of /metrics by name and labels, e.g. 'dflash_requests_total{finish_reason="length"}'."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def _idle(engine, timeout: float = 30.0):
    runner, loop = engine.serving.runner, engine.serving
    deadline = time.monotonic() + timeout
    while (runner.has_work or loop._handles) and time.monotonic() < deadline:
        time.sleep(0.01)
    return runner


def _assert_tables_empty(engine):
    runner = _idle(engine)
    assert runner.requests == {} and not runner.waiting and runner.running == [] and runner.prefilling is None
    assert runner.pages_in_use == 0 and engine.serving._handles == {} and engine.serving.queued == 0


def _expected(engine, prompts, max_tokens, chat=False):
    """The Engine's greedy tokens for each prompt, submitted together."""
    handles = [engine.submit(p, max_tokens, chat=chat) for p in prompts]
    return [h.result(timeout=120) for h in handles]


def _decode(engine, ids):
    return engine.tokenizer.decode(ids, skip_special_tokens=True)


def test_completions_and_chat_streamed_and_not(engine, server):
    client = server.client()
    prompt = PROMPTS[0]
    [tokens] = _expected(engine, [prompt], 12)
    text = _decode(engine, tokens)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == text and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == len(engine.encode(prompt))
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    ext = r.model_extra["dflash"]
    assert ext["spec_verify_ct"] == len(ext["acceptance_lengths"]) >= 1
    assert ext["acceptance_length"] == pytest.approx(sum(ext["acceptance_lengths"]) / ext["spec_verify_ct"])
    assert sum(ext["acceptance_lengths"]) >= 11  # every token after the first came from a verify step
    steps = ext["acceptance_lengths"]
    assert ext["per_position_acceptance"] == pytest.approx(
        [sum(a > i for a in steps) / len(steps) for i in range(1, 4)]
    )

    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert chunks[-1].model_extra["dflash"]["acceptance_lengths"] == steps

    # chat: chat_template_kwargs reach the template (this one writes a marker when enable_thinking is false)
    tok = engine.tokenizer
    template = tok.chat_template
    tok.chat_template = template.replace(
        "<|im_start|>assistant\n",
        "<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}# no thinking\n{% endif %}",
    )
    try:
        messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def add(a, b):"}]
        kwargs = {"enable_thinking": False}
        ids = engine.encode(messages, chat=True, chat_template_kwargs=kwargs)
        assert len(ids) > len(engine.encode(messages, chat=True))
        [chat_tokens] = _expected(engine, [ids], 10)
        chat_text = _decode(engine, chat_tokens)
        body = dict(
            model=MODEL, messages=messages, max_tokens=10, temperature=0, extra_body={"chat_template_kwargs": kwargs}
        )
        r = client.chat.completions.create(**body)
        assert r.choices[0].message.content == chat_text and r.choices[0].message.role == "assistant"
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(chat_tokens)
        stream = client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat_text
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(chat_tokens)
    finally:
        tok.chat_template = template

    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_sixteen_concurrent_clients_get_the_engines_output(engine, server):
    prompts = [PROMPTS[i % len(PROMPTS)][: 12 + 3 * i] for i in range(16)]
    chats = {i: [{"role": "user", "content": prompts[i]}] for i in range(0, 16, 4)}
    inputs = [engine.encode(chats[i], chat=True) if i in chats else prompts[i] for i in range(16)]
    expected = [_decode(engine, t) for t in _expected(engine, inputs, 8)]

    def one(i):
        client = server.client()
        if i in chats:
            r = client.chat.completions.create(model=MODEL, messages=chats[i], max_tokens=8, temperature=0)
            return r.choices[0].message.content
        if i % 2:
            stream = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=8, temperature=0, stream=True)
            return "".join(c.choices[0].text for c in stream)
        r = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=8, temperature=0)
        assert r.usage.completion_tokens == 8
        return r.choices[0].text

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(one, range(16))) == expected
    _assert_tables_empty(engine)


def test_generate_as_the_upstream_benchmark_client_drives_it(engine, server):
    """dflash.benchmark (--backend sglang): GET /flush_cache, then POST /generate with text and sampling_params;
    it reads meta_info.completion_tokens, spec_verify_ct and spec_accept_length. (--backend vllm): POST
    /v1/chat/completions with top_k and chat_template_kwargs; it reads usage.completion_tokens."""
    http = httpx.Client(base_url=server.url, timeout=120)
    http.get("/flush_cache").raise_for_status()
    assert http.post("/flush_cache").status_code == 200
    prompt = PROMPTS[1]
    [tokens] = _expected(engine, [prompt], 12)
    body = {"text": prompt, "sampling_params": {"temperature": 0.0, "top_p": 1.0, "top_k": 1, "max_new_tokens": 12}}
    resp = http.post("/generate", json=body)
    resp.raise_for_status()
    out = resp.json()
    out = out if isinstance(out, dict) else out[0]
    meta = out["meta_info"]
    assert out["output_ids"] == tokens and out["text"] == _decode(engine, tokens)
    assert meta["completion_tokens"] == 12 and meta["prompt_tokens"] == len(engine.encode(prompt))
    assert meta["finish_reason"] == {"type": "length", "length": 12}
    assert meta["spec_verify_ct"] == len(out["dflash"]["acceptance_lengths"]) > 0
    assert float(meta["spec_accept_length"]) == pytest.approx(12 / meta["spec_verify_ct"])

    # the same by token ids, as a batch, and streamed (cumulative objects, then [DONE])
    by_ids = http.post(
        "/generate", json={"input_ids": [engine.encode(prompt)] * 2, "sampling_params": body["sampling_params"]}
    )
    assert [o["output_ids"] for o in by_ids.json()] == [tokens, tokens]
    with http.stream("POST", "/generate", json={**body, "stream": True}) as stream:
        lines = [line for line in stream.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    objs = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(len(a["output_ids"]) <= len(b["output_ids"]) for a, b in zip(objs, objs[1:]))
    assert objs[-1]["output_ids"] == tokens and objs[-1]["text"] == out["text"]
    assert objs[-1]["meta_info"]["finish_reason"]["type"] == "length" and objs[0]["meta_info"]["finish_reason"] is None

    chat = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 6,
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 1,
        "chat_template_kwargs": {"enable_thinking": False},
    }
    resp = http.post("/v1/chat/completions", json=chat)
    resp.raise_for_status()
    assert int(resp.json()["usage"]["completion_tokens"]) == 6


def test_stop_strings_end_the_request_and_are_trimmed(engine, server):
    client = server.client()
    prompt = PROMPTS[2]
    [tokens] = _expected(engine, [prompt], 24)
    text = _decode(engine, tokens)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip() and text.find(stop) > 0
    want = text[: text.find(stop)]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=[stop, "never seen"])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    kept = r.usage.completion_tokens
    assert stop in _decode(engine, tokens[:kept]) and stop not in _decode(engine, tokens[: kept - 1])
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=stop, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == want and chunks[-1].choices[0].finish_reason == "stop"
    out = httpx.post(
        server.url + "/generate",
        json={"text": prompt, "sampling_params": {"max_new_tokens": 24, "temperature": 0, "stop": stop}},
    ).json()
    assert out["text"] == want and out["output_ids"] == tokens[:kept]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    _assert_tables_empty(engine)


class _Handle:
    """What Generation needs of a request handle when the tokens are fed in by hand."""

    cancelled = False

    def cancel(self):
        self.cancelled = True


def test_incremental_text_equals_whole_decoding(engine):
    """Text is decoded a chunk at a time with a few tokens of context: characters split across byte-level tokens
    come out whole, and a stop string found across chunks ends the text before it."""
    from dflash_compiler.runtime.server import Generation, ServerMetrics

    text = "def naïve(x):  # ünïcödé ✓ 日本語\n    return x  # done"
    ids = engine.encode(text)
    for stop, want in (([], text), (["✓ 日", "zzz"], text[: text.index("✓ 日")])):
        for size in (1, 2, 3, 7):
            gen = Generation(engine, ServerMetrics(engine), [1], _Handle(), stop, None)
            pieces = []
            for i in range(0, len(ids), size):
                gen._add(ids[i : i + size])
                pieces.append(gen._ready_text())
                if gen.finish_reason is not None:
                    break
            else:
                gen._flush()
            pieces.append(gen._ready_text())
            assert "".join(pieces) == gen.text == want
            assert all("\ufffd" not in p for p in pieces)
            if stop:
                assert (
                    gen.handle.cancelled and gen.matched == "✓ 日" and stop[0] in engine.tokenizer.decode(gen.token_ids)
                )
                assert stop[0] not in engine.tokenizer.decode(gen.token_ids[:-1])


def test_a_client_that_disconnects_frees_its_pages(engine, server):
    runner = _idle(engine)
    before = _metrics(server.url).get('dflash_requests_total{finish_reason="cancelled"}', 0.0)
    with httpx.Client(base_url=server.url, timeout=120) as http:
        body = {"model": MODEL, "prompt": PROMPTS[3], "max_tokens": 200, "temperature": 0, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    break
            n = len(engine.encode(PROMPTS[3]))
            assert runner.pages_in_use == runner._pages_needed(n, min(200, runner.max_seq_len - n))
    # non-streamed: the client gives up waiting
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=server.url, timeout=0.5) as http:
        http.post("/v1/completions", json={**body, "stream": False})
    _assert_tables_empty(engine)
    after = _metrics(server.url)
    assert after['dflash_requests_total{finish_reason="cancelled"}'] == before + 2
    assert after["dflash_kv_pages_in_use"] == 0


def test_bad_input_is_answered_as_specified(engine, server):
    http = httpx.Client(base_url=server.url, timeout=60)
    long_prompt = list(range(5, 305))

    def error(path, body=None, content=None, status=400):
        resp = (
            http.post(path, json=body)
            if content is None
            else http.post(path, content=content, headers={"content-type": "application/json"})
        )
        assert resp.status_code == status, resp.text
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and "\n" not in err["message"]
        return err

    assert error("/v1/completions", content=b'{"prompt": "x",')["code"] == "invalid_json"
    assert error("/v1/completions", content=b"[1, 2]")["message"] == "the request body must be a JSON object"
    err = error("/v1/completions", {"model": "gpt-4", "prompt": "x"})
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert error("/v1/completions", {"prompt": "x", "n": 2})["param"] == "n"
    assert error("/v1/completions", {"prompt": "x", "top_p": 1.5})["param"] == "top_p"
    assert error("/v1/completions", {"prompt": "x", "temperature": -1})["param"] == "temperature"
    assert error("/v1/completions", {"prompt": "x", "max_tokens": 0})["param"] == "max_tokens"
    assert error("/v1/completions", {"prompt": "x", "top_k": -2})["param"] == "top_k"
    assert error("/v1/completions", {"prompt": "x", "stop": ["", "a"]})["param"] == "stop"
    assert error("/v1/completions", {"max_tokens": 3})["message"] == "parameter 'prompt': Field required"
    err = error("/v1/completions", {"prompt": long_prompt, "max_tokens": 4})
    assert err["param"] == "prompt" and "300 tokens, longer than this runner's max_seq_len (128 - 1)" in err["message"]
    err = error("/v1/completions", {"prompt": [1, 2, 999999]})
    assert err["param"] == "prompt" and "outside the vocabulary" in err["message"]
    err = error("/v1/completions", {"prompt": "x", "max_tokens": 3, "temperature": 0.5, "seed": 1})
    assert err["param"] == "seed" and "needs runtime='eager'" in err["message"]
    assert error("/v1/chat/completions", {"messages": []})["param"] == "messages"
    assert error("/v1/chat/completions", {"messages": [{"content": "hi"}]})["param"] == "messages.0.role"
    assert error("/generate", {"sampling_params": {"max_new_tokens": 3}})["param"] == "text"
    err = error("/generate", {"text": "x", "sampling_params": {"max_new_tokens": 0}})
    assert err["param"] == "sampling_params.max_new_tokens"
    err = error("/generate", {"input_ids": long_prompt, "sampling_params": {"max_new_tokens": 4}})
    assert err["param"] == "input_ids"
    _assert_tables_empty(engine)

    # with an API key, every endpoint but /health and /metrics needs it
    keyed = TestClient(create_app(engine, model_name=MODEL, api_key="s3cret"))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        resp = keyed.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=headers)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
        assert keyed.get("/v1/models", headers=headers).status_code == 401
        assert keyed.post("/generate", json={"text": "x"}, headers=headers).status_code == 401
    good = {"Authorization": "Bearer s3cret"}
    resp = keyed.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "temperature": 0}, headers=good)
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 2
    assert keyed.get("/health").status_code == 200 and keyed.get("/metrics").status_code == 200


def test_overload_is_refused_with_retry_after(engine, server):
    loop, runner = engine.serving, engine.serving.runner
    real_step, gate, entered = runner.model.step, threading.Event(), threading.Event()

    def held_step(*args):
        entered.set()
        gate.wait()
        return real_step(*args)

    runner.model.step = held_step
    loop.max_queue = 2
    client = server.client()
    try:
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(client.completions.create, model=MODEL, prompt="a = 1", max_tokens=4, temperature=0)
            assert entered.wait(60)
            queued = [
                pool.submit(client.completions.create, model=MODEL, prompt=p, max_tokens=4, temperature=0)
                for p in ("b = 2", "c = 3")
            ]
            deadline = time.monotonic() + 30
            while loop.queued < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(openai.APIStatusError) as refused:
                client.completions.create(model=MODEL, prompt="d = 4", max_tokens=4, temperature=0)
            assert refused.value.status_code == 503
            assert refused.value.response.headers["retry-after"] == "1"
            assert refused.value.response.json()["error"]["code"] == "queue_full"
            gate.set()
            assert [f.result().usage.completion_tokens for f in (first, *queued)] == [4, 4, 4]
    finally:
        gate.set()
        runner.model.step = real_step
        loop.max_queue = 256
    assert _metrics(server.url)['dflash_rejected_requests_total{status="503"}'] >= 1


def test_a_failing_step_answers_500_and_the_server_keeps_serving(engine, server):
    runner = engine.serving.runner
    real_step = runner.model.step
    calls = []

    def failing_once(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected step failure")
        return real_step(*args)

    runner.model.step = failing_once
    client = server.client()
    try:
        with pytest.raises(openai.InternalServerError) as failed:
            client.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=8, temperature=0)
        assert "injected step failure" in failed.value.response.json()["error"]["message"]
    finally:
        runner.model.step = real_step
    r = client.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=8, temperature=0)
    assert r.choices[0].text == _decode(engine, _expected(engine, [PROMPTS[4]], 8)[0])
    _assert_tables_empty(engine)


def test_load_from_32_clients(engine, server):
    """200 short requests from 32 concurrent clients: none fails, /metrics counts what was sent, the runner's
    tables are empty afterwards."""
    before = _metrics(server.url)
    prompts = [f"{PROMPTS[i % len(PROMPTS)][: 4 + i % 13]}" for i in range(200)]

    async def one(client, i):
        if i % 3 == 0:
            stream = await client.completions.create(
                model=MODEL,
                prompt=prompts[i],
                max_tokens=2,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [c async for c in stream]
            return chunks[-1].usage, chunks[-2].model_extra["dflash"]
        r = await client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=2, temperature=0)
        return r.usage, r.model_extra["dflash"]

    async def clients():
        todo, results = iter(range(200)), {}

        async def client_loop():
            async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
                for i in todo:
                    results[i] = await one(client, i)

        await asyncio.gather(*(client_loop() for _ in range(32)))
        return [results[i] for i in range(200)]

    results = asyncio.run(clients())
    _assert_tables_empty(engine)
    after = _metrics(server.url)

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    finished = sum(delta(k) for k in after if k.startswith("dflash_requests_total"))
    assert finished == 200
    assert (
        delta('dflash_requests_total{finish_reason="length"}') + delta('dflash_requests_total{finish_reason="stop"}')
        == 200
    )
    assert delta("dflash_generated_tokens_total") == sum(u.completion_tokens for u, _ in results)
    assert delta("dflash_prompt_tokens_total") == sum(u.prompt_tokens for u, _ in results)
    assert delta("dflash_verify_steps_total") == sum(d["spec_verify_ct"] for _, d in results)
    assert delta("dflash_acceptance_length_count") == sum(d["spec_verify_ct"] for _, d in results)
    assert delta("dflash_acceptance_length_sum") == sum(sum(d["acceptance_lengths"]) for _, d in results)
    accepted_1 = sum(sum(a > 1 for a in d["acceptance_lengths"]) for _, d in results)
    assert delta('dflash_accepted_drafts_total{position="1"}') == accepted_1
    steps = after["dflash_verify_steps_total"]
    assert after['dflash_per_position_acceptance{position="1"}'] == pytest.approx(
        after['dflash_accepted_drafts_total{position="1"}'] / steps
    )
    assert after["dflash_running_requests"] == 0 and after["dflash_queued_requests"] == 0
    assert after["dflash_kv_pages_in_use"] == 0 and after["dflash_tokens_per_second"] > 0
    assert delta("dflash_step_seconds_count") > 0


def test_the_eager_runtime_serves_too():
    engine = Engine.from_pretrained(runtime="eager")
    app = TestClient(create_app(engine, model_name=MODEL))
    prompt = PROMPTS[5]
    want = engine.generate(prompt, 12)
    r = app.post("/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0}).json()
    assert r["choices"][0]["text"] == want.text and r["dflash"]["acceptance_lengths"] == want.stats.acceptance_lengths
    sampled = {"prompt": prompt, "max_tokens": 12, "temperature": 0.8, "seed": 7}
    assert (
        app.post("/v1/completions", json=sampled).json()["choices"][0]["text"]
        == app.post("/v1/completions", json=sampled).json()["choices"][0]["text"]
    )
    with app.stream(
        "POST",
        "/generate",
        json={"text": prompt, "sampling_params": {"max_new_tokens": 12, "temperature": 0}, "stream": True},
    ) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert json.loads(lines[-2].removeprefix("data: "))["output_ids"] == want.token_ids
    engine.close()


def test_command_line(capsys, monkeypatch, engine):
    args = serve_parser().parse_args([])
    assert (args.host, args.port, args.max_queue, args.artifact) == ("127.0.0.1", 8000, 256, None)
    monkeypatch.setattr(Engine, "from_artifact", classmethod(lambda cls, path: engine))
    loaded, names = load_engine(serve_parser().parse_args(["dir/art", "--max-queue", "9"]))
    assert loaded is engine and names == ["art", "dir/art"] and engine.loop.max_queue == 9
    engine.loop.max_queue = 256
    monkeypatch.undo()
    assert serve_main(["some-artifact"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "dflash-serve: error: some-artifact: not an artifact directory"
    ]
    assert serve_main(["some-artifact", "--target", "t"]) == 2
    assert "give an artifact or --target/--drafter, not both" in capsys.readouterr().err
    assert serve_main(["some-artifact", "--glue", "inductor"]) == 2
    assert "parameter 'glue': an artifact runs the glue it was compiled with" in capsys.readouterr().err
    assert serve_parser().parse_args(["--glue", "inductor"]).glue == "inductor"
    assert serve_parser().parse_args(["--verify-width", "1:16,16:8"]).verify_width == {1: 16, 16: 8}
    assert serve_parser().parse_args(["--verify-width", "8"]).verify_width == 8
    assert serve_parser().parse_args(["--verify-width", "tuned"]).verify_width == "tuned"
    with pytest.raises(SystemExit):
        serve_parser().parse_args(["--verify-width", "1:sixteen"])
    assert "parameter 'verify_width': expected a width (8) or batch:width pairs" in capsys.readouterr().err
