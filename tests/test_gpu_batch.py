"""The batched runtime on CUDA: Triton kernels, CUDA-graph replay, the same tokens as the eager path."""

import json

import pytest
import torch
from test_lossless import MIXED_PARAMS, MIXED_PROMPT, MIXED_VOCAB, _chi2_pvalue, mixed_batch_case

from dflash_compiler.models.loader import load_drafter, load_target
from dflash_compiler.runtime.batch import BatchRunner
from dflash_compiler.runtime.engine import DEFAULT_PAIR, load_tokenizer
from dflash_compiler.runtime.proposer import DFlashProposer
from dflash_compiler.runtime.sampling import SamplingParams
from dflash_compiler.runtime.speculative import SpeculativeDecoder

pytestmark = pytest.mark.gpu


def _pair(dtype):
    target = load_target(DEFAULT_PAIR / "target", device="cuda", dtype=dtype)
    return target, load_drafter(DEFAULT_PAIR / "drafter", target.cfg, device="cuda", dtype=dtype)


@pytest.fixture(scope="module")
def prompts():
    tok = load_tokenizer(DEFAULT_PAIR / "target")
    lines = (DEFAULT_PAIR / "heldout_prompts.jsonl").read_text().splitlines()
    return [tok.encode(json.loads(line)["prompt"], add_special_tokens=False) for line in lines[:12]]


def _serve(runner, requests):
    """Runs (prompt, max_new_tokens, params) requests, adding half of them after the first steps."""
    out, ids = {}, []
    half = len(requests) // 2
    for prompt, n, params in requests[:half]:
        ids.append(runner.add_request(prompt, n, params))
    steps = 0
    while runner.has_work or len(ids) < len(requests):
        if steps == 3:
            for prompt, n, params in requests[half:]:
                ids.append(runner.add_request(prompt, n, params))
        for event in runner.step():
            out.setdefault(event.request_id, []).extend(event.tokens)
        steps += 1
    return [out[i] for i in ids]


LENGTHS = [40, 17, 64, 3, 29, 50, 8, 33, 61, 12, 45, 21]


@pytest.mark.parametrize("block_size", [16, 5, 1])
def test_graph_replay_equals_the_eager_loop_in_fp32(prompts, block_size):
    """Against the eager speculative loop (the foundation's reference), every request joining and leaving."""
    target, drafter = _pair(torch.float32)
    eager = SpeculativeDecoder(target, DFlashProposer(drafter, target) if block_size > 1 else None, block_size)
    requests = [(p, n, SamplingParams()) for p, n in zip(prompts, LENGTHS)]
    expected = [eager.generate(p, n)[0] for p, n, _ in requests]
    for max_batch in (1, 4, 16):
        target, drafter = _pair(torch.float32)  # the runner takes over the weights it is given
        runner = BatchRunner(
            target, drafter if block_size > 1 else None, block_size=block_size, max_batch=max_batch, max_seq_len=512
        )
        assert runner.cuda_graphs
        got = _serve(runner, requests)
        for i, (g, e) in enumerate(zip(got, expected)):
            assert g == e, f"request {i}, max_batch {max_batch}"


def test_captured_graphs_with_inductor_glue_equal_the_eager_loop_in_fp32(prompts):
    """The glue between the ops compiled by TorchInductor (at the warm-up run before each capture), replayed in
    CUDA graphs: the eager loop's tokens, with fewer launches per step than the ATen glue."""
    target, drafter = _pair(torch.float32)
    eager = SpeculativeDecoder(target, DFlashProposer(drafter, target), 16)
    requests = [(p, n, SamplingParams()) for p, n in zip(prompts, LENGTHS[:6])]
    expected = [eager.generate(p, n)[0] for p, n, _ in requests]
    runner = BatchRunner(*_pair(torch.float32), max_batch=4, max_seq_len=512, glue="inductor")
    assert runner.cuda_graphs
    assert _serve(runner, requests) == expected
    aten = BatchRunner(*_pair(torch.float32), max_batch=4, max_seq_len=512)
    step = "step"
    assert runner.model.compiled.graph(step).launches < aten.model.compiled.graph(step).launches


def test_captured_buckets_at_their_own_verify_widths(prompts):
    """One CUDA graph per bucket, each verifying its own width of the drafted block: the eager loop's output."""
    target, drafter = _pair(torch.float32)
    eager = SpeculativeDecoder(target, None, 1)
    requests = [(p, n, SamplingParams()) for p, n in zip(prompts, LENGTHS)]
    expected = [eager.generate(p, n)[0] for p, n, _ in requests]
    target, drafter = _pair(torch.float32)
    widths = {1: 16, 2: 12, 4: 8, 8: 4}
    runner = BatchRunner(target, drafter, verify_width=widths, max_batch=8, max_seq_len=512, buckets=(1, 2, 4, 8))
    assert runner.cuda_graphs and runner.verify_widths == widths
    assert _serve(runner, requests) == expected
    runner.set_verify_width({2: 16, 8: 6})  # buckets 1 and 2 keep or take 16, 4 and 8 take 6: captured again
    assert runner.verify_widths == {1: 16, 2: 16, 4: 6, 8: 6}
    assert _serve(runner, requests) == expected
    # every bucket changes: no graph of the old pool is left, and the captures go to a new one (capturing into a
    # pool whose graphs are all gone trips the allocator's use_count assertion)
    runner.simulate_acceptance([0.5] * 15)
    runner.set_verify_width(5)
    assert runner.verify_widths == {1: 5, 2: 5, 4: 5, 8: 5}
    assert {key[2] for key in runner._graphs} == {True}  # the other mode's graphs come back with the mode
    runner.simulate_acceptance(None)
    assert _serve(runner, requests) == expected


@pytest.mark.parametrize("quant", ["bf16", "fp8", "int4"])
def test_graph_replay_equals_uncaptured_steps(prompts, quant):
    """In half precision and quantized, replayed graphs give exactly what the same steps give uncaptured."""
    requests = [(p, n, SamplingParams()) for p, n in zip(prompts, LENGTHS)]
    outputs = []
    for graphs in (True, False):
        target, drafter = _pair(torch.bfloat16)
        runner = BatchRunner(target, drafter, max_batch=8, max_seq_len=512, quant=quant, cuda_graphs=graphs)
        outputs.append(_serve(runner, requests))
    assert outputs[0] == outputs[1]
    assert [len(o) for o in outputs[0]] == LENGTHS


def test_step_has_no_host_sync(prompts):
    target, drafter = _pair(torch.bfloat16)
    runner = BatchRunner(target, drafter, max_batch=4, max_seq_len=512, cuda_graphs=False)
    for p in prompts[:3]:
        runner.add_request(p, 64)
    for _ in range(6):
        runner.step()
    assert len(runner.running) == 3
    n = len(runner.running)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        runner.model.step(runner.pools, n, runner.pools.active, False, False)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_greedy_and_sampled_requests_share_a_batch(tmp_path):
    """On CUDA, in captured graphs: sampled rows (rejection sampling against the drafter, on device) beside greedy
    rows follow the target's exact joint distribution of their first two tokens; the greedy rows give the target's
    greedy tokens."""
    vocab, prompt, params = MIXED_VOCAB, MIXED_PROMPT, MIXED_PARAMS
    _, joint, greedy_expected = mixed_batch_case(tmp_path)
    target = load_target(tmp_path / "t", device="cuda")
    runner = BatchRunner(target, load_drafter(tmp_path / "d", target.cfg, device="cuda"), max_batch=16)
    assert runner.cuda_graphs
    torch.manual_seed(0)
    requests = [(prompt, 4, SamplingParams() if i % 8 == 0 else params) for i in range(800)]
    got = _serve(runner, requests)
    counts = torch.zeros(vocab * vocab)
    for (_, _, sp), tokens in zip(requests, got):
        if sp.temperature == 0:
            assert tokens == greedy_expected
        else:
            counts[tokens[0] * vocab + tokens[1]] += 1
    assert _chi2_pvalue(counts, joint.flatten()) > 1e-3


@pytest.mark.parametrize("quant", ["fp8", "int4"])
def test_quantized_dflash_equals_quantized_autoregressive_decoding(prompts, quant):
    """DFlash on the quantized target gives that quantized target's own greedy tokens (fp32 activations, so the
    verify and the single-row decode round alike)."""
    requests = [(p, n, SamplingParams()) for p, n in zip(prompts[:6], LENGTHS[:6])]
    spec = _serve(BatchRunner(*_pair(torch.float32), max_batch=4, max_seq_len=512, quant=quant), requests)
    alone = _serve(BatchRunner(_pair(torch.float32)[0], None, max_batch=4, max_seq_len=512, quant=quant), requests)
    assert spec == alone


def test_engine_serves_concurrent_requests_on_cuda(prompts):
    """engine.submit from several threads on the default (batched) runtime, against the eager loop."""
    import threading

    from dflash_compiler.runtime import Engine

    eager = Engine.from_pretrained(device="cuda", dtype="float32", runtime="eager")
    engine = Engine.from_pretrained(device="cuda", dtype="float32", max_batch=8)
    assert engine.runtime == "batched"
    expected = [eager.generate(p, 48).token_ids for p in prompts[:8]]
    results = {}

    def worker(i):
        results[i] = engine.submit(prompts[i], 48).result(timeout=300)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.close()
    assert [results[i] for i in range(8)] == expected
