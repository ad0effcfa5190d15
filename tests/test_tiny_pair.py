"""The shipped tiny pair: the default model, real speculative decoding on CPU, output identical to the target's."""

import json
from pathlib import Path

import pytest
import torch

from dflash_compiler.models import eager
from dflash_compiler.runtime import Engine
from dflash_compiler.runtime.engine import DEFAULT_PAIR

HELD_OUT = [json.loads(line)["prompt"] for line in (DEFAULT_PAIR / "heldout_prompts.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def engines():
    return Engine.from_pretrained(), Engine.from_pretrained(DEFAULT_PAIR / "target", None)


def test_the_pair_is_the_default_and_small(engines):
    spec, _ = engines
    assert spec.drafter is not None and spec.decoder.block_size == 16
    size = sum(f.stat().st_size for f in Path(DEFAULT_PAIR).rglob("*.safetensors"))
    assert size < 25 * 2**20


def test_held_out_acceptance_and_lossless(engines):
    """tau as the upstream benchmark defines it (the mean over prompts of each prompt's mean acceptance length),
    greedy, block 16, on the first 32 held-out prompts; the full 64-prompt figures are in BENCHMARKS.md."""
    spec, alone = engines
    taus = []
    for i, prompt in enumerate(HELD_OUT[:32]):
        result = spec.generate(prompt, max_new_tokens=128)
        if i < 6:
            assert result.token_ids == alone.generate(prompt, max_new_tokens=128).token_ids
        taus.append(result.stats.acceptance_length)
    tau = sum(taus) / len(taus)
    assert tau >= 3.5, f"held-out acceptance length {tau:.2f}"


def test_target_loads_in_transformers_with_the_same_logits(engines):
    from transformers import AutoModelForCausalLM

    _, alone = engines
    ref = AutoModelForCausalLM.from_pretrained(DEFAULT_PAIR / "target", dtype=torch.float32).eval()
    ids = torch.tensor([alone.encode(HELD_OUT[0])])
    with torch.no_grad():
        expected = ref(ids).logits
        ours = eager.forward_rows(alone.target, ids)
    torch.testing.assert_close(ours.logits, expected, rtol=1e-4, atol=1e-4)
