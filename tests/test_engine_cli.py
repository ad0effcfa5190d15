"""The Engine API and dflash-generate on tiny checkpoints, with drafters in both upstream config layouts."""

import json
import re

import pytest
import torch
from checkpoints import write_char_tokenizer, write_drafter, write_qwen35

from dflash_compiler import __version__
from dflash_compiler.errors import DFlashError
from dflash_compiler.runtime import Engine, GenerationStats
from dflash_compiler.runtime.cli import SMALL_MODEL_BYTES, default_threads, generate_main

STATS_LINE = re.compile(
    r"\[(?:prompt (?P<index>\d+): )?(?P<tokens>\d+) tokens, block (?P<block>\d+), acceptance length tau = "
    r"(?P<tau>[\d.]+), (?P<tps>[\d.]+) tokens/s"
    r"(?:; autoregressive (?P<ar>[\d.]+) tokens/s, speedup (?P<speedup>[\d.]+)x)?\]"
)


def _write_pair(root, layout):
    write_qwen35(root / "target", seed=7)
    write_char_tokenizer(root / "target")
    # nested layout: no target_layer_ids, so the default rule picks them; a sliding layer; `model.` prefixes
    if layout == "legacy":
        write_drafter(root / "drafter", layout="legacy", target_layer_ids=[1, 2])
    else:
        write_drafter(root / "drafter", layout="nested", sliding_window=5, model_prefix=True)
    return root


@pytest.fixture(scope="module", params=["legacy", "nested"])
def pair(request, tmp_path_factory):
    return _write_pair(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def one_pair(tmp_path_factory):
    return _write_pair(tmp_path_factory.mktemp("one"), "legacy")


@pytest.fixture(scope="module")
def eager(one_pair):
    return Engine.from_pretrained(one_pair / "target", one_pair / "drafter")


def _stats_lines(err: str) -> list[dict]:
    return [m.groupdict() for m in STATS_LINE.finditer(err)]


def test_engine_generate_and_stream(pair):
    engine = Engine.from_pretrained(target=pair / "target", drafter=pair / "drafter", device="cpu", dtype="float32")
    alone = Engine.from_pretrained(target=pair / "target", drafter=None)
    result = engine.generate("def quicksort(", max_new_tokens=20)
    base = alone.generate("def quicksort(", max_new_tokens=20)
    assert result.token_ids == base.token_ids
    assert result.text == base.text == engine.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    stats = result.stats
    # the batched runtime's step (a separate implementation) accepts the same drafts at every step
    batched = Engine.from_pretrained(pair / "target", pair / "drafter", runtime="batched")
    assert batched.generate("def quicksort(", max_new_tokens=20).stats.acceptance_lengths == stats.acceptance_lengths
    batched.close()
    assert stats.generated_tokens == len(result.token_ids) == 20 and result.finish_reason == "length"
    assert sum(stats.acceptance_lengths) == 19 and len(stats.per_position_acceptance) == 7
    assert stats.tokens_per_s > 0 and stats.limit_note is None
    assert base.stats.acceptance_lengths == [1] * (len(base.token_ids) - 1)
    streamed = "".join(engine.stream("def quicksort(", max_new_tokens=20))
    assert streamed == result.text
    assert engine.generate(engine.encode("def quicksort("), max_new_tokens=20).token_ids == result.token_ids
    chat = engine.generate("hello", max_new_tokens=5, chat=True)
    assert chat.token_ids == alone.generate([{"role": "user", "content": "hello"}], 5, chat=True).token_ids


def test_cli_json_and_text(pair, capsys):
    argv = ["--target", str(pair / "target"), "--drafter", str(pair / "drafter"), "--prompt", "abc"]
    assert generate_main([*argv, "--max-new-tokens", "12", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    engine = Engine.from_pretrained(pair / "target", pair / "drafter")
    expected = engine.generate("abc", max_new_tokens=12)
    assert doc["token_ids"] == expected.token_ids and doc["text"] == expected.text
    assert doc["acceptance_lengths"] == expected.stats.acceptance_lengths
    assert doc["acceptance_length"] == pytest.approx(expected.stats.acceptance_length)
    assert doc["per_position_acceptance"] == pytest.approx(expected.stats.per_position_acceptance)
    assert doc["tokens_per_s"] > 0 and doc["finish_reason"] == expected.finish_reason
    sampling = ["--max-new-tokens", "8", "--temperature", "0.7", "--top-k", "5", "--seed", "3"]
    assert generate_main([*argv, *sampling]) == 0
    out = capsys.readouterr()
    sampled = engine.generate("abc", max_new_tokens=8, temperature=0.7, top_k=5, seed=3)
    assert out.out == sampled.text + "\n"
    (line,) = _stats_lines(out.err)
    assert int(line["tokens"]) == len(sampled.token_ids) and int(line["block"]) == 8
    assert float(line["tau"]) == pytest.approx(sampled.stats.acceptance_length, abs=0.005)


def test_cli_reports_errors_in_one_line(pair, capsys):
    code = generate_main(["--target", str(pair / "target"), "--prompt", "abc", "--max-new-tokens", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "max_new_tokens" in err


def test_cli_on_the_batched_runtime_with_quantized_weights(pair, capsys):
    argv = ["--target", str(pair / "target"), "--drafter", str(pair / "drafter"), "--prompt", "abc"]
    assert generate_main([*argv, "--max-new-tokens", "12", "--json", "--runtime", "batched", "--quant", "bf16"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["token_ids"] == Engine.from_pretrained(pair / "target").generate("abc", max_new_tokens=12).token_ids
    assert generate_main([*argv, "--max-new-tokens", "8", "--runtime", "batched", "--quant", "fp8", "--baseline"]) == 0
    out = capsys.readouterr()
    fp8 = Engine.from_pretrained(pair / "target", pair / "drafter", runtime="batched", quant="fp8")
    expected = fp8.generate("abc", max_new_tokens=8)
    fp8.close()
    assert out.out == expected.text + "\n"
    (line,) = _stats_lines(out.err)
    assert int(line["tokens"]) == 8 and float(line["tau"]) == pytest.approx(expected.stats.acceptance_length, abs=0.005)
    assert float(line["speedup"]) == pytest.approx(float(line["tps"]) / float(line["ar"]), rel=0.02, abs=0.01)
    assert generate_main([*argv, "--runtime", "eager", "--quant", "int4"]) == 2
    assert "parameter 'quant' 'int4' needs runtime='batched'" in capsys.readouterr().err


def test_cli_with_calibrated_int4_at_a_verify_width(pair, capsys):
    from dflash_compiler.benchmark.prompts import load_prompts

    argv = ["--target", str(pair / "target"), "--drafter", str(pair / "drafter"), "--prompt", "abc", "--json",
            "--max-new-tokens", "10", "--runtime", "batched", "--quant", "int4", "--calibration", "gsm8k",
            "--calibration-prompts", "2", "--verify-width", "3"]  # fmt: skip
    assert generate_main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    texts = [p.text for p in load_prompts("gsm8k", 2)]
    engine = Engine.from_pretrained(pair / "target", pair / "drafter", runtime="batched", quant="int4",
                                    calibration=texts, verify_width=3)  # fmt: skip
    expected = engine.generate("abc", max_new_tokens=10)
    engine.close()
    assert doc["token_ids"] == expected.token_ids and max(expected.stats.acceptance_lengths) <= 3


def _one_line_error(capsys, argv: list[str], message: str) -> None:
    assert generate_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dflash-generate: error: ") and message in err, err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--device", "gpu"], "parameter 'device': 'gpu' is not a torch device"),
        (["--device", "cuda:x"], "parameter 'device': 'cuda:x' is not a torch device"),
        (["--block-size", "0"], "parameter 'block_size' must be in 1..8, got 0"),
        (["--block-size", "-3"], "parameter 'block_size' must be in 1..8, got -3"),
        (["--block-size", "0", "--runtime", "batched"], "parameter 'block_size' must be in 1..8, got 0"),
        (["--drafter", "none", "--block-size", "4"], "parameter 'block_size' must be in 1..1 (no drafter"),
        (["--dtype", "float8"], "parameter 'dtype': 'float8' is not one of"),
        (["--threads", "0"], "parameter 'threads' must be >= 1, got 0"),
        (["--system", "be brief"], "parameter 'system' needs --chat"),
    ],
)
def test_cli_bad_settings(one_pair, capsys, extra, message):
    argv = ["--target", str(one_pair / "target"), "--drafter", str(one_pair / "drafter"), "--prompt", "abc"]
    _one_line_error(capsys, [*argv, "--max-new-tokens", "4", *extra], message)


def test_cli_bad_paths_and_prompts(one_pair, tmp_path, capsys):
    target, drafter = str(one_pair / "target"), str(one_pair / "drafter")
    _one_line_error(capsys, ["--target", drafter, "--prompt", "a"], "looks like a DFlash drafter, not a target")
    swapped = ["--target", target, "--drafter", target, "--prompt", "a"]
    _one_line_error(capsys, swapped, "looks like a target model, not a DFlash drafter")
    missing = str(tmp_path / "missing")
    _one_line_error(capsys, ["--target", missing, "--prompt", "a"], f"{missing}: does not exist")
    for chat in ([], ["--chat"]):
        _one_line_error(capsys, ["--target", target, "--prompt", "", *chat], "parameter 'prompt' is empty")
    _one_line_error(capsys, ["--target", target, "--prompts-file", missing], f"{missing} does not exist")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    _one_line_error(capsys, ["--target", target, "--prompts-file", str(tmp_path / "p.jsonl")], "p.jsonl: line 2 needs")


def test_engine_refuses_empty_prompts(eager):
    for prompt, chat in (("", False), ("", True), ([], True)):
        with pytest.raises(DFlashError, match="parameter 'prompt' is"):
            eager.generate(prompt, max_new_tokens=4, chat=chat)


def test_cli_drafter_default_and_none(capsys):
    """--drafter omitted: the bundled drafter with the bundled target; 'none': the target alone."""
    assert generate_main(["--prompt", "def f(x):", "--max-new-tokens", "6", "--json"]) == 0
    with_drafter = json.loads(capsys.readouterr().out)
    assert generate_main(["--prompt", "def f(x):", "--max-new-tokens", "6", "--json", "--drafter", "none"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert with_drafter["block_size"] == 16 and alone["block_size"] == 1
    assert alone["acceptance_lengths"] == [1] * 5 and alone["token_ids"] == with_drafter["token_ids"]


def test_cli_target_without_drafter_runs_alone(one_pair, capsys):
    assert generate_main(["--target", str(one_pair / "target"), "--prompt", "abc", "--max-new-tokens", "5"]) == 0
    (line,) = _stats_lines(capsys.readouterr().err)
    assert line["block"] == "1" and line["tau"] == "1.00"


def test_prompt_near_the_context_says_why_it_stops(one_pair, eager, capsys):
    prompt = "x" * 505  # one token per character; the target's context is 512
    result = eager.generate(prompt, max_new_tokens=20)
    assert len(result.token_ids) == 7 and result.finish_reason == "length"
    note = result.stats.limit_note
    assert (
        note
        == "the prompt is 505 tokens and the model's context is 512, so at most 7 of the 20 new tokens asked for fit"
    )
    argv = ["--target", str(one_pair / "target"), "--prompt", prompt, "--max-new-tokens", "20"]
    assert generate_main(argv) == 0
    assert f"note: {note}" in capsys.readouterr().err
    assert generate_main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["limit_note"] == note
    assert eager.generate(prompt, max_new_tokens=7).stats.limit_note is None
    batched = Engine.from_pretrained(one_pair / "target", one_pair / "drafter", runtime="batched", max_seq_len=300)
    got = batched.generate("x" * 290, max_new_tokens=20)
    batched.close()
    assert len(got.token_ids) == 10 and got.stats.limit_note == (
        "the prompt is 290 tokens and the engine's max_seq_len is 300, so at most 10 of the 20 new tokens asked for fit"
    )


def test_interleaved_streams_equal_sequential_runs():
    """Each eager stream owns its drafter context, so streams advanced in turn give their sequential output."""
    engine = Engine.from_pretrained()  # the bundled tiny pair, eager on CPU
    requests = [
        ("def parse_args(argv):", dict(max_new_tokens=16)),
        ("class Stack:\n", dict(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=5)),
        ("import os\n", dict(max_new_tokens=20)),
    ]
    sequential = [engine.generate(prompt, **kw) for prompt, kw in requests]
    stats = [GenerationStats() for _ in requests]
    streams = [engine.stream(prompt, stats=st, **kw) for (prompt, kw), st in zip(requests, stats)]
    texts = ["" for _ in requests]
    live = set(range(len(streams)))
    while live:
        for i in sorted(live):
            piece = next(streams[i], None)
            if piece is None:
                live.discard(i)
            else:
                texts[i] += piece
    assert texts == [r.text for r in sequential]
    # the same drafts were accepted: each stream drafted from its own context
    assert [st.acceptance_lengths for st in stats] == [r.stats.acceptance_lengths for r in sequential]
    token_streams = [engine.stream_tokens(prompt, **kw) for prompt, kw in requests]
    tokens = [next(s) for s in token_streams]  # every request prefilled before any drafts
    for i, s in reversed(list(enumerate(token_streams))):
        tokens[i] += [t for chunk in s for t in chunk]
    assert tokens == [r.token_ids for r in sequential]
    assert max(r.stats.acceptance_length for r in sequential) > 1.5  # the drafter's context was used


def test_seedless_sampling_leaves_the_global_generator_alone(eager):
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    for _ in range(2):
        eager.generate("abc", max_new_tokens=6, temperature=1.0)
    assert torch.equal(torch.get_rng_state(), before)
    seeded = [eager.generate("abc", max_new_tokens=6, temperature=1.0, seed=9).token_ids for _ in range(2)]
    assert seeded[0] == seeded[1] and torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("runtime", ["eager", "batched"])
def test_stop_strings(one_pair, eager, runtime):
    full = eager.generate("def f(", max_new_tokens=40)
    assert len(full.text) >= 20
    stop = full.text[12:15]
    cut = full.text.index(stop)
    engine = (
        eager
        if runtime == "eager"
        else Engine.from_pretrained(one_pair / "target", one_pair / "drafter", runtime=runtime)
    )
    got = engine.generate("def f(", max_new_tokens=40, stop=[stop, "\x7f never"])
    pieces = list(engine.stream("def f(", max_new_tokens=40, stop=stop))
    engine.close()
    assert got.text == full.text[:cut] == "".join(pieces) and got.finish_reason == "stop"
    # the tokens run through the one that completed the stop string
    n = len(got.token_ids)
    assert got.token_ids == full.token_ids[:n]
    decode = lambda ids: eager.tokenizer.decode(ids, skip_special_tokens=True)
    assert stop in decode(got.token_ids) and stop not in decode(got.token_ids[:-1])
    assert all(stop not in p for p in pieces)
    with pytest.raises(DFlashError, match="parameter 'stop' must hold non-empty strings"):
        eager.generate("def f(", max_new_tokens=4, stop=[""])


def test_cli_stop_system_prompt_and_prompt_files(one_pair, eager, tmp_path, capsys):
    argv = ["--target", str(one_pair / "target"), "--drafter", str(one_pair / "drafter"), "--max-new-tokens", "30"]
    full = eager.generate("abc", max_new_tokens=30).text
    stops = [full[9:11], full[4:6]]  # the earlier one wins
    assert generate_main([*argv, "--prompt", "abc", "--stop", stops[0], "--stop", stops[1]]) == 0
    assert capsys.readouterr().out == full[: full.index(stops[1])] + "\n"
    system = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    expected_chat = eager.generate(system, max_new_tokens=30, chat=True)
    assert generate_main([*argv, "--prompt", "hi", "--chat", "--system", "be brief", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == expected_chat.token_ids
    lines = tmp_path / "prompts.txt"
    lines.write_text("abc\n\ndef g(x):\n")
    assert generate_main([*argv, "--prompts-file", str(lines), "--json"]) == 0
    docs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["prompt"] for d in docs] == ["abc", "def g(x):"]
    assert [d["token_ids"] for d in docs] == [
        eager.generate(p, max_new_tokens=30).token_ids for p in ("abc", "def g(x):")
    ]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"messages": system[1:]}) + "\n")
    assert generate_main([*argv, "--prompts-file", str(jsonl), "--chat", "--system", "be brief"]) == 0
    out = capsys.readouterr()
    assert out.out == (expected_chat.text + "\n") * 2
    assert [line["index"] for line in _stats_lines(out.err)] == ["1", "2"]


def test_threads(one_pair, capsys):
    assert default_threads(SMALL_MODEL_BYTES - 1, 8) == 1 and default_threads(SMALL_MODEL_BYTES, 8) == 8
    argv = ["--target", str(one_pair / "target"), "--prompt", "abc", "--max-new-tokens", "3"]
    try:
        assert generate_main([*argv, "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
        assert generate_main(argv) == 0  # a tiny model on CPU: one thread
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(1)
    capsys.readouterr()


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate_main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"dflash-generate {__version__}\n"


def test_cli_request_that_ends_at_its_first_token(one_pair, capsys):
    argv = ["--target", str(one_pair / "target"), "--prompt", "abc", "--max-new-tokens", "1"]
    assert generate_main(argv) == 0
    err = capsys.readouterr().err
    assert err == "[1 token: generation ended at the first token, no verify step ran]\n"
