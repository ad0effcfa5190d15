"""Serving on CUDA: every bucket's graph is captured at start-up (none while serving), the step's workspace and
the sampling buffers are reserved before the KV pages are sized, and the server answers on the batched runtime."""

import pytest
import torch
from fastapi.testclient import TestClient

from dflash_compiler.models.loader import load_drafter, load_target
from dflash_compiler.runtime import Engine
from dflash_compiler.runtime.batch import BatchRunner
from dflash_compiler.runtime.engine import DEFAULT_PAIR
from dflash_compiler.runtime.proposer import DFlashProposer
from dflash_compiler.runtime.sampling import SamplingParams
from dflash_compiler.runtime.server import create_app
from dflash_compiler.runtime.serving import ServingLoop
from dflash_compiler.runtime.speculative import SpeculativeDecoder

pytestmark = pytest.mark.gpu


def _pair():
    target = load_target(DEFAULT_PAIR / "target", device="cuda", dtype=torch.float32)
    return target, load_drafter(DEFAULT_PAIR / "drafter", target.cfg, device="cuda", dtype=torch.float32)


def test_graphs_are_captured_at_start_and_not_while_serving():
    prompts = [[5 + i, 17, 40 + i, 9] for i in range(12)]
    target, drafter = _pair()
    eager = SpeculativeDecoder(target, DFlashProposer(drafter, target))
    expected = [eager.generate(p, 24)[0] for p in prompts]
    runner = BatchRunner(*_pair(), max_batch=12, max_seq_len=256)
    assert runner.buckets == (1, 2, 4, 8, 12)
    graphs = dict(runner._graphs)
    assert set(graphs) == {(b, s, False) for b in runner.buckets for s in (False, True)}
    assert runner.pools.draft_probs is not None
    loop = ServingLoop(runner)
    greedy = [loop.submit(p, 24, SamplingParams()) for p in prompts]
    sampled = [loop.submit(p, 24, SamplingParams(0.8, top_k=20, top_p=0.9)) for p in prompts]
    assert [h.result(timeout=300) for h in greedy] == expected
    assert all(len(h.result(timeout=300)) == 24 for h in sampled)
    assert runner._graphs == graphs  # the same graphs, none added
    loop.close()


def test_the_step_workspace_is_kept_out_of_the_kv_budget():
    runner = BatchRunner(*_pair(), max_batch=32, max_seq_len=1024)
    workspace = runner._step_workspace_bytes()
    verify_probs = 32 * runner.block_size * runner.vocab_size * 4
    assert workspace > 2 * verify_probs  # at least the sort of a full batch's fp32 verify distributions
    free, _ = torch.cuda.mem_get_info()
    assert free > workspace  # a full sampled batch still fits after the KV pages


def test_server_on_the_batched_cuda_runtime():
    engine = Engine.from_pretrained(device="cuda", dtype="float32", max_batch=8, max_seq_len=256)
    assert engine.runtime == "batched"
    client = TestClient(create_app(engine))
    want = engine.generate("def parse_args(argv):", 32)
    r = client.post("/v1/completions", json={"prompt": "def parse_args(argv):", "max_tokens": 32, "temperature": 0})
    assert r.json()["choices"][0]["text"] == want.text
    out = client.post(
        "/generate", json={"text": "def parse_args(argv):", "sampling_params": {"max_new_tokens": 32, "temperature": 0}}
    ).json()
    assert out["output_ids"] == want.token_ids and out["meta_info"]["spec_verify_ct"] > 0
    engine.close()
