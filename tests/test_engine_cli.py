"""The Engine API and dflash-generate on tiny checkpoints, with drafters in both upstream config layouts."""

import json

import pytest
from checkpoints import write_char_tokenizer, write_drafter, write_qwen35

from dflash_compiler.runtime import Engine
from dflash_compiler.runtime.cli import generate_main


@pytest.fixture(scope="module", params=["legacy", "nested"])
def pair(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    write_qwen35(root / "target", seed=7)
    write_char_tokenizer(root / "target")
    # nested layout: no target_layer_ids, so the default rule picks them; a sliding layer; `model.` prefixes
    if request.param == "legacy":
        write_drafter(root / "drafter", layout="legacy", target_layer_ids=[1, 2])
    else:
        write_drafter(root / "drafter", layout="nested", sliding_window=5, model_prefix=True)
    return root


def test_engine_generate_and_stream(pair):
    engine = Engine.from_pretrained(target=pair / "target", drafter=pair / "drafter", device="cpu", dtype="float32")
    alone = Engine.from_pretrained(target=pair / "target", drafter=None)
    result = engine.generate("def quicksort(", max_new_tokens=20)
    base = alone.generate("def quicksort(", max_new_tokens=20)
    assert result.token_ids == base.token_ids
    assert result.text == base.text == engine.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    stats = result.stats
    assert stats.acceptance_length == sum(stats.acceptance_lengths) / len(stats.acceptance_lengths) >= 1.0
    assert len(stats.per_position_acceptance) == 7 and stats.tokens_per_s > 0
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
    assert set(doc) >= {"token_ids", "text", "acceptance_lengths", "acceptance_length", "tokens_per_s"}
    engine = Engine.from_pretrained(pair / "target")
    assert doc["token_ids"] == engine.generate("abc", max_new_tokens=12).token_ids
    assert generate_main([*argv, "--max-new-tokens", "8", "--temperature", "0.7", "--top-k", "5", "--seed", "3"]) == 0
    out = capsys.readouterr()
    assert "acceptance length tau" in out.err and "tokens/s" in out.err


def test_cli_reports_errors_in_one_line(pair, capsys):
    code = generate_main(["--target", str(pair / "target"), "--prompt", "abc", "--max-new-tokens", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "max_new_tokens" in err


def test_cli_on_the_batched_runtime_with_quantized_weights(pair, capsys):
    argv = ["--target", str(pair / "target"), "--drafter", str(pair / "drafter"), "--prompt", "abc"]
    assert generate_main([*argv, "--max-new-tokens", "12", "--json", "--runtime", "batched"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["token_ids"] == Engine.from_pretrained(pair / "target").generate("abc", max_new_tokens=12).token_ids
    assert generate_main([*argv, "--max-new-tokens", "8", "--runtime", "batched", "--quant", "fp8", "--baseline"]) == 0
    out = capsys.readouterr()
    assert "acceptance length tau" in out.err and "autoregressive" in out.err
    assert generate_main([*argv, "--runtime", "eager", "--quant", "int4"]) == 2
    assert "parameter 'quant' 'int4' needs runtime='batched'" in capsys.readouterr().err
