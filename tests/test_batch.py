"""The batched runtime on CPU (the kernels' PyTorch lowering): scheduling, paging, row moves, cancellation and the
Engine's concurrent API all give the eager loop's tokens."""

import asyncio
import json
import threading

import pytest
import torch
from checkpoints import VOCAB, write_char_tokenizer, write_drafter, write_llama, write_qwen3, write_qwen35
from test_lossless import MIXED_PARAMS, MIXED_PROMPT, MIXED_VOCAB, _chi2_pvalue, mixed_batch_case

from dflash_compiler.errors import DFlashError
from dflash_compiler.models.loader import load_drafter, load_target
from dflash_compiler.runtime import Engine
from dflash_compiler.runtime.batch import BatchRunner, PagePool
from dflash_compiler.runtime.engine import DEFAULT_PAIR, load_tokenizer
from dflash_compiler.runtime.proposer import DFlashProposer
from dflash_compiler.runtime.sampling import SamplingParams, probabilities, row_probabilities
from dflash_compiler.runtime.speculative import GenerationStats, SpeculativeDecoder


def _tiny_pair():
    target = load_target(DEFAULT_PAIR / "target", dtype=torch.float32)
    return target, load_drafter(DEFAULT_PAIR / "drafter", target.cfg, dtype=torch.float32)


@pytest.fixture(scope="module")
def prompts():
    tok = load_tokenizer(DEFAULT_PAIR / "target")
    lines = (DEFAULT_PAIR / "heldout_prompts.jsonl").read_text().splitlines()
    return [tok.encode(json.loads(line)["prompt"], add_special_tokens=False)[:48] for line in lines[:6]]


def _eager(target, drafter, block_size, requests):
    decoder = SpeculativeDecoder(target, DFlashProposer(drafter, target) if drafter else None, block_size)
    return [decoder.generate(p, n, stop_token_ids=stops)[0] for p, n, stops in requests]


def _serve(runner, requests, late_from=None, cancel=None, stats=None):
    """Serves (prompt, max_new_tokens, stops) requests; those from index late_from join after 2 steps; cancel
    (index, step) cancels one request at that step; stats, a list, receives each request's GenerationStats.
    Returns (tokens per request, finish reasons)."""
    late_from = len(requests) if late_from is None else late_from
    stats = stats if stats is not None else []

    def add(p, n, s):
        stats.append(GenerationStats())
        return runner.add_request(p, n, stop_token_ids=s, stats=stats[-1])

    ids = [add(*r) for r in requests[:late_from]]
    out, reasons, step = {}, {}, 0
    while runner.has_work or len(ids) < len(requests):
        if step == 2:
            ids += [add(*r) for r in requests[late_from:]]
        if cancel is not None and step == cancel[1]:
            runner.cancel(ids[cancel[0]])
        for event in runner.step():
            out.setdefault(event.request_id, []).extend(event.tokens)
            if event.finished:
                reasons[event.request_id] = event.finish_reason
        step += 1
    return [out.get(i, []) for i in ids], [reasons[i] for i in ids]


def test_page_pool_hands_out_and_takes_back_pages():
    pool = PagePool(6)
    a = pool.allocate(3)
    assert 0 not in a and len(set(a)) == 3 and pool.available == 2
    with pytest.raises(DFlashError, match="KV cache: 3 pages requested, 2 free"):
        pool.allocate(3)
    pool.release(a)
    assert pool.available == 5 and sorted(pool.allocate(5)) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("block_size,max_batch", [(16, 3), (1, 2)])
def test_batched_equals_eager_on_the_tiny_pair(prompts, block_size, max_batch):
    """More requests than rows: requests queue, are prefilled in chunks, join mid-batch, finish at different steps
    and leave."""
    lengths = [30, 9, 41, 17, 3, 25]
    requests = [(p, n, ()) for p, n in zip(prompts, lengths)]
    expected = _eager(*_tiny_pair(), block_size, requests)
    target, drafter = _tiny_pair()
    # 16-token chunks: prompts take several iterations while others decode; 512: several prompts join at once
    chunk = 16 if block_size > 1 else 512
    runner = BatchRunner(
        target, drafter if block_size > 1 else None, max_batch=max_batch, max_seq_len=160, prefill_chunk=chunk
    )
    stats = []
    got, reasons = _serve(runner, requests, late_from=3, stats=stats)
    assert got == expected
    assert reasons == ["length"] * len(requests)
    assert runner.page_pool.available == runner.page_pool.num_pages - 1
    assert not runner.requests and not runner.running and not runner.waiting  # finished requests leave every table
    assert [s.generated_tokens for s in stats] == lengths
    if block_size > 1:  # real acceptance: the pair's drafter is trained
        assert max(a for s in stats for a in s.acceptance_lengths) > 2


@pytest.mark.parametrize("width", [2, 7])
def test_a_narrower_verify_is_lossless(prompts, width):
    """The drafter drafts its whole block of 16; the target verifies the first `width` tokens: the output is still
    the target's greedy output, and no step commits more than `width` tokens."""
    lengths = [30, 17, 25]
    requests = [(p, n, ()) for p, n in zip(prompts, lengths)]
    expected = _eager(_tiny_pair()[0], None, 1, requests)
    target, drafter = _tiny_pair()
    runner = BatchRunner(target, drafter, verify_width=width, max_batch=2, max_seq_len=160)
    assert runner.block_size == 16 and runner.verify_widths == {1: width, 2: width}
    stats = []
    got, _ = _serve(runner, requests, late_from=2, stats=stats)
    assert got == expected
    accepted = [a for s in stats for a in s.acceptance_lengths]
    assert 2 <= max(accepted) <= width  # real acceptance (the pair's drafter is trained), capped by the width
    runner = BatchRunner(*_tiny_pair(), verify_width=width, max_batch=2, max_seq_len=200)
    runner.simulate_acceptance([1.0] * 15)  # every draft accepted: each step commits exactly `width` tokens
    stats = []
    _serve(runner, [(p, 5 * width, ()) for p in prompts[:2]], stats=stats)
    assert [s.acceptance_lengths for s in stats] == [[width] * 5] * 2


def test_each_bucket_verifies_at_its_own_width(prompts):
    """Requests join and leave, so steps run at buckets 1, 2 and 4 with widths 16, 6 and 3: a step of one width
    follows a step of another with no re-draft, and the output is still the target's greedy output."""
    lengths = [40, 9, 33, 17, 3, 25]
    requests = [(p, n, ()) for p, n in zip(prompts, lengths)]
    expected = _eager(_tiny_pair()[0], None, 1, requests)
    target, drafter = _tiny_pair()
    runner = BatchRunner(
        target, drafter, verify_width={1: 16, 2: 6, 4: 3}, max_batch=4, max_seq_len=160, buckets=(1, 2, 4)
    )
    assert runner.verify_widths == {1: 16, 2: 6, 4: 3}
    pools = runner.pools  # a row's GDN buffers as the memory plan counts them (the pending block at the widest)
    per_row = [getattr(pools, f)[:, 0] for f in pools._LAYER_ROW_FIELDS]
    assert runner.model.row_bytes() == sum(t.numel() * t.element_size() for t in per_row)
    got, _ = _serve(runner, requests, late_from=2)
    assert got == expected
    assert {"step", "step@w6", "step@w3"} <= set(runner.model.compiled.graphs)
    # the widths change between requests: the next requests are served at the new ones
    runner.set_verify_width(4)
    assert runner.verify_widths == {1: 4, 2: 4, 4: 4}
    again, _ = _serve(runner, requests[:3])
    assert again == expected[:3] and "step@w4" in runner.model.compiled.graphs
    runner.add_request(prompts[0], 4)
    with pytest.raises(DFlashError, match="set_verify_width: requests are running or waiting"):
        runner.set_verify_width(8)
    # a bucket takes the width of the smallest batch size listed at or above it, the largest one's beyond
    mapped = BatchRunner(*_tiny_pair(), verify_width={2: 8, 16: 4}, max_batch=32, max_seq_len=64)
    assert mapped.verify_widths == {1: 8, 2: 8, 4: 4, 8: 4, 16: 4, 24: 4, 32: 4}


def test_cancel_and_stop_tokens(prompts):
    requests = [(p, 40, ()) for p in prompts[:4]]
    expected = _eager(*_tiny_pair(), 16, requests)
    stop = expected[2][10]
    requests[2] = (prompts[2], 40, (stop,))
    target, drafter = _tiny_pair()
    runner = BatchRunner(target, drafter, max_batch=4, max_seq_len=160)
    got, reasons = _serve(runner, requests, cancel=(1, 4))
    assert got[0] == expected[0] and got[3] == expected[3]  # the others are untouched by the row moves
    assert reasons[1] == "cancelled" and got[1] == expected[1][: len(got[1])] and len(got[1]) < 40
    assert reasons[2] == "stop" and got[2] == expected[2][: expected[2].index(stop) + 1]
    assert runner.page_pool.available == runner.page_pool.num_pages - 1 and not runner.running


@pytest.mark.parametrize("family", ["qwen35", "qwen3", "llama"])
def test_every_target_family(tmp_path, family):
    writer = {"qwen35": write_qwen35, "qwen3": write_qwen3, "llama": write_llama}[family]
    writer(tmp_path / "t", seed=3)
    write_drafter(tmp_path / "d", layout="nested", sliding_window=5, block_size=6)

    def load():
        target = load_target(tmp_path / "t")
        return target, load_drafter(tmp_path / "d", target.cfg)

    gen = torch.Generator().manual_seed(1)
    requests = [(torch.randint(0, VOCAB, (n,), generator=gen).tolist(), m, ()) for n, m in ((7, 12), (20, 9), (3, 15))]
    expected = _eager(*load(), 6, requests)
    got, _ = _serve(BatchRunner(*load(), max_batch=2, max_seq_len=96), requests, late_from=1)
    assert got == expected


@pytest.mark.parametrize("quant", ["fp8", "int4"])
def test_quantized_at_load_dflash_is_lossless(prompts, quant):
    requests = [(p, 24, ()) for p in prompts[:3]]
    target, drafter = _tiny_pair()
    spec, _ = _serve(BatchRunner(target, drafter, max_batch=3, max_seq_len=128, quant=quant), requests)
    alone, _ = _serve(BatchRunner(_tiny_pair()[0], None, max_batch=3, max_seq_len=128, quant=quant), requests)
    assert spec == alone
    # the reference: the eager loop on the target whose linear weights are their dequantized conversions
    assert spec == _eager(_dequantized_target(quant), None, 1, requests)


def test_calibrated_int4_dflash_is_lossless(prompts):
    """INT4 clipped by calibration statistics: DFlash gives the greedy tokens of the target whose weights are the
    same calibrated conversion, dequantized (statistics from the prefill of the calibration prompts)."""
    from dflash_compiler.codegen import weight_formats as wf
    from dflash_compiler.graph.calibrate import linear_input_moments

    calibration = [p[:40] for p in prompts[3:6]]
    requests = [(p, 24, ()) for p in prompts[:3]]
    target, drafter = _tiny_pair()
    runner = BatchRunner(target, drafter, max_batch=3, max_seq_len=128, quant="int4", calibration=calibration)
    assert any("_calibrated_" in name for name in runner.model.compiled.graph("step").passes)
    spec, _ = _serve(runner, requests)
    reference = _tiny_pair()[0]
    moments = linear_input_moments(reference, calibration)
    assert moments and all(m.shape == (reference.get_parameter(n[7:]).shape[1],) for n, m in moments.items())
    calibrated = 0
    with torch.no_grad():
        for name, module in reference.named_modules():
            weight = getattr(module, "weight", None)
            if not isinstance(module, torch.nn.Linear) or weight.shape[1] % 128:
                continue
            importance = moments.get(f"target.{name}.weight")
            calibrated += importance is not None
            module.weight.copy_(wf.quantize_int4(weight, importance=importance).dequantize().to(weight.dtype))
    assert calibrated > 0
    assert spec == _eager(reference, None, 1, requests)
    rtn, _ = _serve(BatchRunner(*_tiny_pair(), max_batch=3, max_seq_len=128, quant="int4"), requests)
    assert rtn == _eager(_dequantized_target("int4"), None, 1, requests)
    with pytest.raises(DFlashError, match="parameter 'calibration': it applies to quant 'int4', not 'fp8'"):
        BatchRunner(*_tiny_pair(), quant="fp8", calibration=calibration)
    with pytest.raises(DFlashError, match="parameter 'calibration': token ids must lie in 0..4095"):
        BatchRunner(*_tiny_pair(), quant="int4", calibration=[[1, 5000]])


def test_bad_verify_widths_and_calibrations_name_the_parameter():
    from dflash_compiler.graph.calibrate import linear_input_moments
    from dflash_compiler.runtime.batch import bucket_widths
    from dflash_compiler.runtime.engine import calibration_ids

    with pytest.raises(DFlashError, match=r"parameter 'verify_width': batch sizes must be positive integers"):
        bucket_widths({0: 4}, (1, 2), 16)
    assert bucket_widths({2: 4}, (1, 2, 4), 16) == {1: 4, 2: 4, 4: 4}
    with pytest.raises(DFlashError, match=r"parameter 'calibration'\[1\]: text needs a tokenizer"):
        calibration_ids([[1, 2], "some text"], None)
    assert calibration_ids([list(range(600))], None) == [list(range(512))]  # cut to CALIBRATION_TOKENS
    target = _tiny_pair()[0]
    for prompts in ([], [[]]):
        with pytest.raises(DFlashError, match="parameter 'calibration': expected one or more non-empty prompts"):
            linear_input_moments(target, prompts)


def _dequantized_target(quant: str):
    """The tiny target with every weight the batched runtime converts (each nn.Linear, lm_head included) replaced
    by the dequantized result of that conversion."""
    from dflash_compiler.graph.passes import quantize_weight

    target, _ = _tiny_pair()
    with torch.no_grad():
        for module in target.modules():
            converted = quantize_weight(module.weight, quant) if isinstance(module, torch.nn.Linear) else None
            if converted is not None:
                module.weight.copy_(converted.dequantize().to(module.weight.dtype))
    return target


def test_simulated_acceptance_draws_from_the_profile(prompts):
    target, drafter = _tiny_pair()
    runner = BatchRunner(target, drafter, max_batch=2, max_seq_len=200)
    runner.simulate_acceptance([1.0] * 7 + [0.0] * 9)  # every step accepts exactly 7 drafts
    stats = []
    _serve(runner, [(p, 57, ()) for p in prompts[:2]], stats=stats)
    assert [s.acceptance_lengths for s in stats] == [[8] * 7] * 2


def test_requests_that_cannot_be_served(prompts):
    target, drafter = _tiny_pair()
    runner = BatchRunner(target, drafter, max_batch=2, max_seq_len=100, num_pages=3)
    with pytest.raises(
        DFlashError, match=r"parameter 'prompt' is 120 tokens, longer than this runner's max_seq_len \(100 - 1\)"
    ):
        runner.add_request(list(range(120)), 4)
    with pytest.raises(DFlashError, match="parameter 'max_new_tokens': the request needs 132 tokens of KV cache"):
        runner.add_request(prompts[0][:40], 60)
    with pytest.raises(DFlashError, match="parameter 'max_new_tokens' must be an integer >= 1"):
        runner.add_request(prompts[0], 0)
    with pytest.raises(DFlashError, match="outside the vocabulary"):
        runner.add_request([5, 1 << 20], 3)
    with pytest.raises(DFlashError, match="parameter 'quant' must be one of bf16, fp8, fp8_block, int4"):
        BatchRunner(*_tiny_pair(), quant="int3")
    with pytest.raises(DFlashError, match=r"parameter 'max_batch' must be in 1\.\.64, got 0"):
        BatchRunner(*_tiny_pair(), max_batch=0)
    with pytest.raises(DFlashError, match=r"parameter 'block_size' must be in 1\.\.16"):
        BatchRunner(*_tiny_pair(), block_size=17)
    with pytest.raises(DFlashError, match="parameter 'verify_width': autoregressive decoding"):
        BatchRunner(_tiny_pair()[0], verify_width=4)
    for width in (1, 17):
        with pytest.raises(
            DFlashError, match=rf"parameter 'verify_width' must be in 2\.\.16 \(the draft block\), got {width}"
        ):
            BatchRunner(*_tiny_pair(), verify_width=width)
    with pytest.raises(DFlashError, match="parameter 'ops' must be 'triton' or 'reference'"):
        BatchRunner(*_tiny_pair(), ops="cuda")
    with pytest.raises(DFlashError, match="simulate_acceptance needs a drafter"):
        BatchRunner(_tiny_pair()[0]).simulate_acceptance([0.5])


def test_row_probabilities_match_per_row_settings():
    logits = torch.randn(4, 3, 29, generator=torch.Generator().manual_seed(0))
    settings = [SamplingParams(0.7, 5, 1.0), SamplingParams(1.3, 0, 0.8), SamplingParams(1.0, 3, 0.5), SamplingParams()]
    rows = row_probabilities(
        logits,
        torch.tensor([s.temperature for s in settings]),
        torch.tensor([s.top_k for s in settings]),
        torch.tensor([s.top_p for s in settings]),
    )
    for i, s in enumerate(settings[:3]):
        torch.testing.assert_close(rows[i], probabilities(logits[i], s))
    torch.testing.assert_close(rows[3], torch.softmax(logits[3], -1))  # greedy rows: temperature 1


@pytest.fixture(scope="module")
def char_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    write_qwen35(root / "target", seed=5)
    write_char_tokenizer(root / "target")
    write_drafter(root / "drafter", block_size=5)
    return root


def test_engine_submit_from_threads_and_asyncio(char_pair):
    texts = ["def f(x):", "import os", "class A:", "x = 1", "for i in", "while True:"]
    eager = Engine.from_pretrained(char_pair / "target", char_pair / "drafter", runtime="eager")
    expected = [eager.generate(t, 20).token_ids for t in texts]
    engine = Engine.from_pretrained(char_pair / "target", char_pair / "drafter", runtime="batched", max_batch=4)
    assert engine.generate(texts[0], 20).token_ids == expected[0]
    assert "".join(engine.stream(texts[1], 20)) == eager.generate(texts[1], 20).text
    results = {}

    def worker(i):
        results[i] = engine.submit(texts[i], 20).result(timeout=120)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()

    async def agen(i):
        return [tok async for chunk in engine.submit(texts[i], 20) for tok in chunk]

    async def many():
        return await asyncio.gather(*(agen(i) for i in range(3, 6)))

    for i, tokens in zip(range(3, 6), asyncio.run(many())):
        results[i] = tokens
    for t in threads:
        t.join()
    assert [results[i] for i in range(6)] == expected
    handle = engine.submit(texts[0], 200)
    handle.cancel()
    handle.result(timeout=60)
    assert handle.finish_reason == "cancelled"
    with pytest.raises(DFlashError, match="parameter 'prompt' is empty"):
        engine.submit([], 5)
    with pytest.raises(DFlashError, match="parameter 'seed' needs runtime='eager'"):
        engine.generate("x", 3, temperature=0.5, seed=1)
    engine.close()
    with pytest.raises(DFlashError, match="the engine is closed"):
        engine.submit("x", 3)
    assert eager.submit(texts[2], 20).result(timeout=60) == expected[2]  # the eager loop serves in order
    eager.close()
    with pytest.raises(DFlashError, match="parameter 'runtime' must be 'auto', 'eager' or 'batched', got 'gpu'"):
        Engine.from_pretrained(char_pair / "target", runtime="gpu")


@pytest.mark.slow
def test_sampled_requests_follow_the_target_distribution_beside_greedy_ones(tmp_path):
    """Sampled rows (rejection sampling against the drafter, on device) share batches with greedy rows: the first
    two sampled tokens follow the target's exact joint distribution, and the greedy rows give the target's greedy
    tokens."""
    vocab, prompt, params = MIXED_VOCAB, MIXED_PROMPT, MIXED_PARAMS
    target, joint, greedy_expected = mixed_batch_case(tmp_path)
    runner = BatchRunner(load_target(tmp_path / "t"), load_drafter(tmp_path / "d", target.cfg), max_batch=16)
    torch.manual_seed(0)
    kinds, stats = {}, {}
    for i in range(800):
        greedy = i % 8 == 0
        request_stats = GenerationStats()
        rid = runner.add_request(prompt, 4, SamplingParams() if greedy else params, stats=request_stats)
        kinds[rid], stats[rid] = greedy, request_stats
    out = {rid: [] for rid in kinds}
    while runner.has_work:
        for event in runner.step():
            out[event.request_id].extend(event.tokens)
    counts = torch.zeros(vocab * vocab)
    for rid, tokens in out.items():
        if kinds[rid]:
            assert tokens == greedy_expected
        else:
            counts[tokens[0] * vocab + tokens[1]] += 1
    accepted = sum(a > 1 for rid in kinds if not kinds[rid] for a in stats[rid].acceptance_lengths)
    assert accepted > 50, "drafts must be accepted often enough for the test to exercise acceptance"
    assert _chi2_pvalue(counts, joint.flatten()) > 1e-3


def test_the_engine_serves_at_the_given_verify_widths(prompts):
    engine = Engine.from_pretrained(runtime="batched", max_batch=2, max_seq_len=128, verify_width={1: 4, 2: 3})
    try:
        assert engine.serving.runner.verify_widths == {1: 4, 2: 3}
        target = _tiny_pair()[0]
        want = _eager(target, None, 1, [(prompts[0], 20, ())])[0]
        assert engine.generate(prompts[0], max_new_tokens=20).token_ids == want
    finally:
        engine.close()
    with pytest.raises(DFlashError, match="parameter 'verify_width' needs runtime='batched'"):
        Engine.from_pretrained(runtime="eager", verify_width=4)
    with pytest.raises(DFlashError, match="parameter 'glue' 'inductor' needs runtime='batched'"):
        Engine.from_pretrained(runtime="eager", glue="inductor")
