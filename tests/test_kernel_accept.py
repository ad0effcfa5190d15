"""On-device greedy and rejection-sampling acceptance against PyTorch references (float64 for the sampler)."""

from __future__ import annotations

import pytest
import torch

from dflash_compiler.codegen.triton.accept import argmax, greedy_accept, rejection_accept
from dflash_compiler.runtime.sampling import SamplingParams, probabilities
from dflash_compiler.runtime.sampling import greedy_accept as greedy_ref
from dflash_compiler.runtime.sampling import rejection_accept as rejection_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _tokens_row(drafts, accepted, bonus):
    """The committed row: accepted drafts, the bonus, then -1."""
    bs = drafts.shape[1] + 1
    j = torch.arange(bs, device=drafts.device)
    padded = torch.cat((drafts.long(), torch.full_like(accepted[:, None], -1)), 1)
    return torch.where(j < accepted[:, None], padded, torch.where(j == accepted[:, None], bonus[:, None], -1))


def _sample_dist(p, q, accepted):
    """The distribution the bonus is drawn from (float64), for checking draws that differ from the reference only
    by rounding at a CDF boundary."""
    bs = p.shape[1]
    dists = []
    for n in range(p.shape[0]):
        a = int(accepted[n])
        dist = p[n, a]
        if a < bs - 1:
            resid = (p[n, a] - q[n, a]).clamp_min(0)
            if resid.sum() > 0:
                dist = resid
        dists.append(dist)
    return torch.stack(dists)


def _check_sample(bonus, ref_bonus, dist, u_sample):
    cdf = dist.cumsum(-1)
    x = u_sample.double() * cdf[:, -1]
    for n in range(bonus.shape[0]):
        b = int(bonus[n])
        assert dist[n, b] > 0, "sampled a token with no mass"
        if b == int(ref_bonus[n]):
            continue
        lo = cdf[n, b - 1] if b > 0 else 0.0
        tol = 1e-5 * float(cdf[n, -1])
        assert lo - tol <= x[n] <= cdf[n, b] + tol, f"token {b} (reference {int(ref_bonus[n])}) misses x={float(x[n])}"


def _drafts_with_prefix(target, gen, vocab):
    """Draft tokens that agree with the target for a random prefix per request (all, none, or in between)."""
    n_req, bs = target.shape
    keep = torch.randint(0, bs, (n_req,), generator=gen)
    keep[0] = bs - 1
    if n_req > 1:
        keep[1] = 0
    drafts = target[:, :-1].clone()
    for n in range(n_req):
        if keep[n] < bs - 1:
            drafts[n, keep[n]] = (drafts[n, keep[n]] + 1 + torch.randint(0, vocab - 1, (1,), generator=gen)) % vocab
            drafts[n, keep[n] + 1 :] = torch.randint(0, vocab, (bs - 2 - int(keep[n]),), generator=gen)
    return drafts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bs,vocab", [(9, 300), (5, 37), (1, 100)])
def test_greedy(dtype, bs, vocab):
    gen = torch.Generator().manual_seed(bs + vocab)
    n_req = 4
    logits = torch.randn(n_req, bs, vocab, generator=gen).to(DEVICE, dtype)
    drafts = _drafts_with_prefix(logits.argmax(-1).cpu(), gen, vocab).to(DEVICE, torch.int32)
    res = greedy_accept(drafts, logits, block_v=64, chunk=128)
    a, bonus = greedy_ref(drafts.long(), logits)
    assert torch.equal(res.num_accepted, a)
    assert torch.equal(res.bonus, bonus)
    assert torch.equal(res.tokens, _tokens_row(drafts, a, bonus))
    if bs > 1:
        assert int(a[0]) == bs - 1 and (n_req < 2 or int(a[1]) == 0)


def test_greedy_ties_take_first_index():
    logits = torch.zeros(1, 3, 300, device=DEVICE)
    logits[0, :, 7] = 1.0
    logits[0, :, 250] = 1.0  # same max in a later chunk
    logits[0, 1, 3] = 1.0
    drafts = torch.tensor([[7, 3]], device=DEVICE)
    res = greedy_accept(drafts, logits, block_v=32, chunk=64)
    assert res.num_accepted.tolist() == [2] and res.bonus.tolist() == [7]
    assert res.tokens.tolist() == [[7, 3, 7]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,block_v,chunk", [((3, 15, 333), 32, 64), ((7, 1000), None, None), ((1, 2, 5), 4, 4)])
def test_argmax_equals_torch(dtype, shape, block_v, chunk):
    """Rows split over chunks of the vocabulary: the first index of the maximum, as torch.argmax, for any leading
    dims; ties across chunks, rows of -inf and a strided last dim included."""
    gen = torch.Generator().manual_seed(sum(shape))
    logits = (torch.randn(*shape, generator=gen) * 4).to(DEVICE, dtype)
    flat = logits.view(-1, shape[-1])
    flat[0, -1] = flat[0, 0] = flat[0].max() + 1  # a tie between the first and the last chunk
    flat[-1] = float("-inf")
    got = argmax(logits, block_v=block_v, chunk=chunk)
    assert got.dtype == torch.int64 and got.shape == logits.shape[:-1]
    assert torch.equal(got, logits.argmax(-1))
    assert int(got.view(-1)[0]) == 0 and int(got.view(-1)[-1]) == 0
    wide = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen).to(DEVICE, dtype)[..., ::2]
    assert torch.equal(argmax(wide, block_v=block_v, chunk=chunk), wide.argmax(-1))
    with pytest.raises(ValueError, match="logits"):
        argmax(logits.long())


def _probs(n_req, rows, vocab, gen, sharp):
    return torch.softmax(torch.randn(n_req, rows, vocab, generator=gen, dtype=torch.float64) * sharp, -1)


@pytest.mark.parametrize("bs,vocab", [(16, 300), (4, 70)])
@pytest.mark.parametrize("q_rows", ["bs-1", "bs"])
def test_rejection_probs(bs, vocab, q_rows):
    gen = torch.Generator().manual_seed(bs * vocab)
    n_req = 5
    p = _probs(n_req, bs, vocab, gen, 2.0)
    q = _probs(n_req, bs - 1 if q_rows == "bs-1" else bs, vocab, gen, 2.0)
    q = 0.5 * q + 0.5 * torch.cat((p[:, : bs - 1], p[:, -1:]), 1)[:, : q.shape[1]]  # drafts close to the target
    p, q = p.float(), q.float()
    drafts = torch.multinomial(q[:, : bs - 1].reshape(-1, vocab), 1, generator=gen).view(n_req, bs - 1)
    u_acc = torch.rand(n_req, bs - 1, generator=gen)
    u_acc[0] = 0.0  # every draft accepted
    u_samp = torch.rand(n_req, generator=gen)
    res = rejection_accept(
        drafts.to(DEVICE), p.to(DEVICE), q.to(DEVICE), u_acc.to(DEVICE), u_samp.to(DEVICE), block_v=32, chunk=64
    )
    a, bonus = rejection_ref(drafts, q[:, : bs - 1], p, u_acc, u_samp)
    assert torch.equal(res.num_accepted.cpu(), a)
    assert int(a[0]) == bs - 1
    _check_sample(res.bonus.cpu(), bonus, _sample_dist(p.double(), q.double(), a), u_samp)
    assert torch.equal(res.tokens.cpu(), _tokens_row(drafts, a, res.bonus.cpu()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rejection_logits(dtype):
    gen = torch.Generator().manual_seed(11)
    n_req, bs, vocab, temp = 5, 6, 333, 0.7
    t_logits = (torch.randn(n_req, bs, vocab, generator=gen) * 3).to(dtype)
    d_logits = (t_logits[:, : bs - 1].float() + torch.randn(n_req, bs - 1, vocab, generator=gen)).to(dtype)
    params = SamplingParams(temperature=temp)
    p, q = probabilities(t_logits, params), probabilities(d_logits, params)
    drafts = torch.multinomial(q.reshape(-1, vocab), 1, generator=gen).view(n_req, bs - 1)
    u_acc = torch.rand(n_req, bs - 1, generator=gen)
    u_samp = torch.rand(n_req, generator=gen)
    res = rejection_accept(
        drafts.to(DEVICE),
        t_logits.to(DEVICE),
        d_logits.to(DEVICE),
        u_acc.to(DEVICE),
        u_samp.to(DEVICE),
        temperature=temp,
        block_v=128,
        chunk=256,
    )
    a, bonus = rejection_ref(drafts, q, p, u_acc, u_samp)
    assert torch.equal(res.num_accepted.cpu(), a)
    _check_sample(res.bonus.cpu(), bonus, _sample_dist(p.double(), q.double(), a), u_samp)


def test_rejection_zero_residual_falls_back_to_p():
    gen = torch.Generator().manual_seed(12)
    n_req, bs, vocab = 4, 4, 90
    p = _probs(n_req, bs, vocab, gen, 1.0).float()
    q = 2 * p[:, : bs - 1]  # q >= p everywhere: the residual is empty
    drafts = torch.randint(0, vocab, (n_req, bs - 1), generator=gen)
    u_acc = torch.full((n_req, bs - 1), 0.9)
    u_acc[:, 0] = 0.1  # accept the first draft (0.2 p < p), reject the second (1.8 p > p)
    u_samp = torch.rand(n_req, generator=gen)
    res = rejection_accept(
        drafts.to(DEVICE), p.to(DEVICE), q.to(DEVICE), u_acc.to(DEVICE), u_samp.to(DEVICE), block_v=16, chunk=32
    )
    a, bonus = rejection_ref(drafts, q, p, u_acc, u_samp)
    assert res.num_accepted.tolist() == [1] * n_req and torch.equal(a, torch.ones(n_req, dtype=torch.long))
    dist = _sample_dist(p.double(), q.double(), a)
    assert torch.equal(dist, p[:, 1].double())
    _check_sample(res.bonus.cpu(), bonus, dist, u_samp)


def test_rejects_bad_inputs():
    logits = torch.randn(2, 4, 50, device=DEVICE)
    with pytest.raises(ValueError, match="draft_tokens"):
        greedy_accept(torch.zeros(2, 4, dtype=torch.int64, device=DEVICE), logits)
    drafts = torch.zeros(2, 3, dtype=torch.int64, device=DEVICE)
    u = torch.rand(2, 3, device=DEVICE)
    with pytest.raises(ValueError, match="u_sample"):
        rejection_accept(drafts, logits, logits, u, torch.rand(3, device=DEVICE), temperature=1.0)
    with pytest.raises(ValueError, match="temperature"):
        rejection_accept(drafts, logits, logits, u, torch.rand(2, device=DEVICE), temperature=0.0)


@pytest.mark.gpu
def test_bf16_full_vocab():
    gen = torch.Generator().manual_seed(13)
    n_req, bs, vocab = 4, 16, 248320
    logits = torch.randn(n_req, bs, vocab, generator=gen).to(DEVICE, torch.bfloat16)
    drafts = _drafts_with_prefix(logits.argmax(-1).cpu(), gen, vocab).to(DEVICE)
    res = greedy_accept(drafts, logits)
    a, bonus = greedy_ref(drafts, logits)
    assert torch.equal(res.num_accepted, a) and torch.equal(res.bonus, bonus)
    assert torch.equal(res.tokens, _tokens_row(drafts, a, bonus))
    params = SamplingParams(temperature=0.8)
    d_logits = (logits[:, : bs - 1].float() + torch.randn(n_req, bs - 1, vocab, generator=gen).to(DEVICE)).bfloat16()
    p, q = probabilities(logits, params), probabilities(d_logits, params)
    d2 = torch.multinomial(q.reshape(-1, vocab), 1).view(n_req, bs - 1)
    u_acc = torch.rand(n_req, bs - 1, generator=gen).to(DEVICE)
    u_samp = torch.rand(n_req, generator=gen).to(DEVICE)
    res = rejection_accept(d2, logits, d_logits, u_acc, u_samp, temperature=params.temperature)
    a, bonus = rejection_ref(d2, q, p, u_acc, u_samp)
    assert torch.equal(res.num_accepted, a)
    _check_sample(res.bonus.cpu(), bonus.cpu(), _sample_dist(p.double(), q.double(), a).cpu(), u_samp.cpu())
