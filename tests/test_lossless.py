"""Greedy DFlash output equals the target's own greedy output; sampled output follows the target's distribution."""

import random

import pytest
import torch
from checkpoints import VOCAB, write_drafter, write_llama, write_qwen3, write_qwen35

from dflash_compiler.models import eager
from dflash_compiler.models.loader import load_drafter, load_target
from dflash_compiler.runtime.proposer import DFlashProposer
from dflash_compiler.runtime.sampling import SamplingParams, probabilities, rejection_accept
from dflash_compiler.runtime.speculative import PREFILL_CHUNK, SpeculativeDecoder


class OracleProposer:
    """Proposes the target's true greedy continuation with random corruptions, so that every acceptance length
    from 0 to B-1 occurs; the loop must still commit exactly the target's output."""

    target_layer_ids = (1,)

    def __init__(self, continuation: list[int], prompt_len: int, block_size: int, error_rate: float, seed: int):
        self.continuation, self.prompt_len, self.block_size = continuation, prompt_len, block_size
        self.rng, self.error_rate = random.Random(seed), error_rate
        self.proposals: list[tuple[int, list[int]]] = []  # (continuation index of the first draft, drafts)

    def new_state(self, batch, max_len):
        return 0  # the number of context positions seen

    def add_context(self, state, features, positions):
        assert features.shape[1] == positions.shape[1] > 0
        assert int(positions[0, 0]) == state, "context arrives in order, without gaps"
        return state + positions.shape[1]

    def propose(self, state, anchor, start, params, uniforms):
        first = int(start.item()) - self.prompt_len + 1  # index in the continuation of the first draft
        assert state == int(start.item()), "the context covers every position before the anchor"
        drafts = []
        for i in range(first, first + self.block_size - 1):
            tok = self.continuation[i] if i < len(self.continuation) else 0
            if self.rng.random() < self.error_rate:
                tok = (tok + 1 + self.rng.randrange(VOCAB - 1)) % VOCAB
            drafts.append(tok)
        self.proposals.append((first, drafts))
        return torch.tensor([drafts]), None

    def expected_acceptance(self, block_size: int, max_new_tokens: int) -> list[int]:
        """Each step's acceptance length as the greedy rule must give it for the drafts proposed: the drafts that
        match the continuation up to the first mismatch, within the verified block, plus the bonus token."""
        lengths, generated = [], 1
        for first, drafts in self.proposals:
            verified = drafts[: min(block_size, max_new_tokens - generated) - 1]
            matched = next((i for i, t in enumerate(verified) if t != self.continuation[first + i]), len(verified))
            lengths.append(matched + 1)
            generated += matched + 1
        # one token left: verified alone, with no drafts asked for
        return lengths + [1] * (max_new_tokens - generated)


TARGETS = {
    "qwen3_5": lambda d: write_qwen35(d, seed=11, multimodal=False),
    "qwen3": lambda d: write_qwen3(d, seed=12),
    "llama": lambda d: write_llama(d, seed=13),
}


@pytest.fixture(scope="module", params=list(TARGETS))
def target(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    TARGETS[request.param](d)
    return load_target(d)


def test_greedy_output_is_the_targets_for_every_block_size(target):
    baseline = SpeculativeDecoder(target)
    rng = random.Random(0)
    lengths_seen = set()
    for block_size in range(1, 17):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 20))]
        expected, _ = baseline.generate(prompt, 24)
        oracle = OracleProposer(expected, len(prompt), 16, error_rate=rng.choice([0.05, 0.2, 0.5]), seed=block_size)
        tokens, stats = SpeculativeDecoder(target, oracle, block_size).generate(prompt, 24)
        assert tokens == expected, f"block size {block_size}"
        if block_size > 1:
            assert stats.acceptance_lengths == oracle.expected_acceptance(block_size, 24)
        else:
            assert stats.acceptance_lengths == [1] * 23 and not oracle.proposals
        lengths_seen.update(stats.acceptance_lengths)
    assert max(lengths_seen) >= 8, "the oracle should produce long accepted runs"


def test_stop_token_mid_block_ends_generation_at_the_same_place(target):
    baseline = SpeculativeDecoder(target)
    rng = random.Random(1)
    for trial in range(6):
        prompt = [rng.randrange(VOCAB) for _ in range(7)]
        expected, _ = baseline.generate(prompt, 30)
        stop = expected[rng.randrange(3, 25)]
        cut = expected[: expected.index(stop) + 1]
        reference, _ = baseline.generate(prompt, 30, stop_token_ids=[stop])
        assert reference == cut
        oracle = OracleProposer(expected, len(prompt), 16, error_rate=0.0, seed=trial)
        tokens, stats = SpeculativeDecoder(target, oracle, 16).generate(prompt, 30, stop_token_ids=[stop])
        assert tokens == cut
        if len(cut) > 2:
            assert stats.acceptance_lengths[-1] > 1, "with a perfect oracle the stop lands inside a block"


def test_max_new_tokens_is_exact(target):
    oracle_src, _ = SpeculativeDecoder(target).generate([5, 6, 7], 40)
    for max_new in (1, 2, 15, 16, 17, 33):
        oracle = OracleProposer(oracle_src, 3, 16, error_rate=0.0, seed=0)
        tokens, _ = SpeculativeDecoder(target, oracle, 16).generate([5, 6, 7], max_new)
        assert tokens == oracle_src[:max_new]


def test_a_prompt_longer_than_a_prefill_chunk(tmp_path):
    """The eager loop prefills in chunks of PREFILL_CHUNK tokens; the state they leave is the one-pass prefill's:
    each greedy token is the argmax after the whole sequence so far, run from empty state in one call."""
    write_qwen35(tmp_path, seed=14, multimodal=False, max_position_embeddings=1024)
    target = load_target(tmp_path)
    prompt = random.Random(3).choices(range(VOCAB), k=PREFILL_CHUNK + 77)
    tokens, _ = SpeculativeDecoder(target).generate(prompt, 3)
    with torch.no_grad():
        for i, token in enumerate(tokens):
            logits = eager.forward_rows(target, torch.tensor([prompt + tokens[:i]])).logits[0, -1]
            assert token == int(logits.argmax())


@pytest.mark.parametrize("layout,window", [("legacy", None), ("nested", 3)])
def test_dflash_drafter_is_lossless_on_hybrid_and_dense_targets(tmp_path, layout, window):
    for name, writer in (("hybrid", lambda d: write_qwen35(d, seed=21)), ("dense", lambda d: write_qwen3(d))):
        writer(tmp_path / name)
        target = load_target(tmp_path / name)
        write_drafter(tmp_path / f"d-{name}", layout=layout, sliding_window=window, target_layer_ids=[0, 2])
        drafter = load_drafter(tmp_path / f"d-{name}", target.cfg)
        rng = random.Random(2)
        for _ in range(4):
            prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(2, 30))]
            expected, _ = SpeculativeDecoder(target).generate(prompt, 20)
            tokens, stats = SpeculativeDecoder(target, DFlashProposer(drafter, target)).generate(prompt, 20)
            assert tokens == expected
            assert stats.block_size == 8 and len(stats.per_position_acceptance) == 7


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit, merging cells with expected count < 5 into one."""
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    obs = torch.cat((counts[big], counts[~big].sum().view(1)))
    exp = torch.cat((expected[big], expected[~big].sum().view(1)))
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), stat / 2.0))


def test_rejection_rule_preserves_the_target_distribution():
    torch.manual_seed(0)
    n, vocab = 200_000, 6
    p0 = torch.softmax(torch.randn(vocab) * 1.5, -1)
    p1 = torch.softmax(torch.randn(vocab, vocab) * 1.5, -1)  # the next distribution, given the first token
    q0 = torch.softmax(torch.randn(vocab) * 1.5, -1)
    drafts = torch.multinomial(q0, n, replacement=True).view(n, 1)
    target_probs = torch.stack((p0.expand(n, -1), p1[drafts[:, 0]]), dim=1)
    accepted, token = rejection_accept(drafts, q0.expand(n, 1, -1), target_probs, torch.rand(n, 1), torch.rand(n))
    first = torch.where(accepted == 1, drafts[:, 0], token)
    assert _chi2_pvalue(torch.bincount(first, minlength=vocab).float(), p0) > 1e-3
    ok = accepted == 1
    for d in range(vocab):  # the bonus after an accepted draft d follows p1[d]
        sel = ok & (drafts[:, 0] == d)
        assert _chi2_pvalue(torch.bincount(token[sel], minlength=vocab).float(), p1[d]) > 1e-3
    # the acceptance rate is sum(min(p, q)), as the theory says
    assert abs(ok.float().mean().item() - torch.minimum(p0, q0).sum().item()) < 0.01


def write_tiny_vocab_pair(directory, vocab: int = 6) -> None:
    """A 2-layer Qwen3.5 target over a vocabulary of `vocab` tokens and a drafter for it (block 4): small enough
    that the exact distribution of two generated tokens is a vocab x vocab table."""
    write_qwen35(
        directory / "t",
        seed=31,
        multimodal=False,
        vocab_size=vocab,
        num_hidden_layers=2,
        layer_types=["linear_attention", "full_attention"],
        eos_token_id=None,
    )
    write_drafter(
        directory / "d",
        layout="nested",
        target_layer_ids=[0, 1],
        block_size=4,
        mask_token_id=vocab - 1,
        target_layers=2,
        vocab=vocab,
    )


def first_two_tokens_joint(target, prompt: list[int], params: SamplingParams) -> torch.Tensor:
    """The exact joint distribution [V, V] of the first two tokens the target alone samples after prompt."""
    vocab = target.cfg.vocab_size
    with torch.no_grad():
        p_first = probabilities(eager.forward_rows(target, torch.tensor([prompt])).logits[0, -1], params)
        joint = torch.zeros(vocab, vocab)
        for x in range(vocab):
            logits = eager.forward_rows(target, torch.tensor([prompt + [x]])).logits
            joint[x] = p_first[x] * probabilities(logits[0, -1], params)
    return joint


MIXED_VOCAB, MIXED_PROMPT, MIXED_PARAMS = 6, [1, 4, 2], SamplingParams(0.8, top_k=4, top_p=0.9)


def mixed_batch_case(directory):
    """The tiny-vocabulary pair written to directory, and what a batch mixing sampled (MIXED_PARAMS) and greedy
    requests after MIXED_PROMPT must give: (the CPU target, the exact joint of the first two sampled tokens, the
    target's greedy tokens)."""
    write_tiny_vocab_pair(directory, MIXED_VOCAB)
    target = load_target(directory / "t")
    joint = first_two_tokens_joint(target, MIXED_PROMPT, MIXED_PARAMS)
    greedy, _ = SpeculativeDecoder(target).generate(MIXED_PROMPT, 4)
    return target, joint, greedy


@pytest.mark.slow
@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(0.8, top_k=4, top_p=0.9)])
def test_sampled_dflash_follows_the_target_distribution(tmp_path, params):
    vocab = 6
    write_tiny_vocab_pair(tmp_path, vocab)
    target = load_target(tmp_path / "t")
    drafter = load_drafter(tmp_path / "d", target.cfg)
    prompt = [1, 4, 2]
    joint = first_two_tokens_joint(target, prompt, params)
    decoder = SpeculativeDecoder(target, DFlashProposer(drafter, target))
    counts = torch.zeros(vocab * vocab)
    accepted_any = 0
    for seed in range(800):
        tokens, stats = decoder.generate(prompt, 4, params=params, seed=seed)
        counts[tokens[0] * vocab + tokens[1]] += 1
        accepted_any += stats.acceptance_lengths[0] > 1
    assert accepted_any > 50, "drafts must be accepted often enough for the test to exercise acceptance"
    assert _chi2_pvalue(counts, joint.flatten()) > 1e-3
