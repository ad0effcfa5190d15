"""Our model definitions against transformers' own implementations, and the GDN state machinery."""

import pytest
import torch
from checkpoints import VOCAB, write_llama, write_qwen3, write_qwen35

from dflash_compiler.models import eager, ops
from dflash_compiler.models.loader import load_target

FAMILIES = {
    "qwen3_5": lambda d: write_qwen35(d, seed=1),
    "qwen3_5_text": lambda d: write_qwen35(d, seed=2, multimodal=False),
    "qwen3": lambda d: write_qwen3(d, seed=3),
    "llama": lambda d: write_llama(d, seed=4),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    ref = FAMILIES[request.param](d)
    return ref, load_target(d)


def _close(ours, ref):
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_prefill_logits_and_taps_match_transformers(pair):
    ref, ours = pair
    ids = torch.randint(0, VOCAB, (2, 41))
    expected = ref(input_ids=ids, output_hidden_states=True)
    last = ours.cfg.num_layers - 1
    # layer k's tap is hidden_states[k + 1]: the residual stream, except after the last layer, where transformers
    # (and the upstream drafters) take it after the final norm
    for taps in [(0, 2), (1, last)]:
        out = eager.forward_rows(ours, ids, taps)
        _close(out.logits, expected.logits)
        _close(out.features.view(2, 41, -1), torch.cat([expected.hidden_states[k + 1] for k in taps], dim=-1))


@torch.no_grad()
@pytest.mark.parametrize("new_tokens", [1, 5])
def test_decode_and_verify_on_a_cache_match_transformers(pair, new_tokens):
    ref, ours = pair
    prompt_len = 23
    ids = torch.randint(0, VOCAB, (1, prompt_len + new_tokens))
    first = ref(input_ids=ids[:, :prompt_len], use_cache=True)
    expected = ref(input_ids=ids[:, prompt_len:], past_key_values=first.past_key_values, use_cache=True).logits

    pools = eager.request_pools(ours, 1, 48, new_tokens)
    eager.prefill(ours, pools, ids[:, :prompt_len])
    verify = eager.verify(ours, pools, ids[:, prompt_len:])
    _close(verify.logits, expected)
    # decoding the same tokens one at a time (a verify of one token, committed) gives the same logits
    pools = eager.request_pools(ours, 1, 48)
    eager.prefill(ours, pools, ids[:, :prompt_len])
    for t in range(new_tokens):
        step = eager.verify(ours, pools, ids[:, prompt_len + t : prompt_len + t + 1])
        eager.commit(ours, pools, step, torch.zeros(1, dtype=torch.long))
        _close(step.logits[:, 0], expected[:, t])
    assert pools.cache_lens.tolist() == [prompt_len + new_tokens]


@torch.no_grad()
def test_verify_states_equal_token_by_token_decoding(tmp_path):
    write_qwen35(tmp_path, seed=5, multimodal=False)
    model = load_target(tmp_path)
    batch, prompt_len, block = 3, 9, 7
    ids = torch.randint(0, VOCAB, (batch, prompt_len + block))

    def prefill():
        pools = eager.request_pools(model, batch, 32, block)
        eager.prefill(model, pools, ids[:, :prompt_len])
        return pools

    def committed(index):
        pools = prefill()
        eager.commit(model, pools, eager.verify(model, pools, ids[:, prompt_len:]), index)
        return pools

    verify = eager.verify(model, prefill(), ids[:, prompt_len:])
    stepwise = prefill()
    for t in range(block):
        # commit the same accepted index for every request and compare with stepping
        after_verify = committed(torch.full((batch,), t))
        step = eager.verify(model, stepwise, ids[:, prompt_len + t : prompt_len + t + 1])
        _close(step.logits[:, 0], verify.logits[:, t])
        eager.commit(model, stepwise, step, torch.zeros(batch, dtype=torch.long))
        _close(eager.gdn_states(model, after_verify), eager.gdn_states(model, stepwise))
        _close(after_verify.conv_window, stepwise.conv_window)
        assert torch.equal(after_verify.cache_lens, stepwise.cache_lens)
    # ragged acceptance: each request selects its own position; -1 leaves a request as it was
    index = torch.tensor([0, 3, -1])
    ragged = committed(index)
    for b, i in enumerate(index.tolist()):
        single = committed(torch.full((batch,), i)) if i >= 0 else prefill()
        _close(eager.gdn_states(model, ragged)[:, b], eager.gdn_states(model, single)[:, b])
        _close(ragged.conv_window[:, b], single.conv_window[:, b])
        assert ragged.cache_lens[b] == single.cache_lens[b] == prompt_len + i + 1


@pytest.mark.parametrize("seq_len,chunk", [(1, 64), (37, 16), (64, 64), (131, 64)])
def test_chunked_and_recurrent_gated_delta_rule_agree(seq_len, chunk):
    b, h, hv, d = 2, 2, 6, 16
    q, k = torch.randn(b, seq_len, h, d), torch.randn(b, seq_len, h, d)
    v = torch.randn(b, seq_len, hv, d)
    g, beta = ops.gdn_gates(torch.randn(b, seq_len, hv), torch.randn(b, seq_len, hv), torch.randn(hv), torch.rand(hv))
    state = torch.randn(b, hv, d, d)
    o_rec, states = ops.gated_delta_rule_recurrent(q, k, v, g, beta, state, all_states=True)
    o_chunk, final = ops.gated_delta_rule_chunked(q, k, v, g, beta, state, chunk_size=chunk)
    torch.testing.assert_close(o_chunk, o_rec, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, states[:, -1], rtol=1e-4, atol=1e-4)


def test_gated_delta_rule_matches_transformers_reference():
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_recurrent_gated_delta_rule

    b, t, h, hv, d = 1, 5, 2, 4, 8
    q, k, v = torch.randn(b, t, h, d), torch.randn(b, t, h, d), torch.randn(b, t, hv, d)
    g, beta = ops.gdn_gates(torch.randn(b, t, hv), torch.randn(b, t, hv), torch.randn(hv), torch.rand(hv))
    state = torch.randn(b, hv, d, d)
    ref_o, ref_s = torch_recurrent_gated_delta_rule(
        q, k, v, g=g, beta=beta, initial_state=state.clone(), output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    o, s = ops.gated_delta_rule_recurrent(q, k, v, g, beta, state)
    torch.testing.assert_close(o, ref_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, ref_s, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("head", ["equal", "different", "head_only"])
def test_tied_checkpoints_that_ship_lm_head_load_as_transformers_loads_them(tmp_path, head):
    """tie_word_embeddings with an lm_head.weight in the file: one tensor serves both when they are equal (or only
    the head ships); a differing head is used as the head."""
    import warnings

    from checkpoints import rewrite_tensors
    from transformers import LlamaForCausalLM

    write_llama(tmp_path, seed=6)
    gen = torch.Generator().manual_seed(0)

    def edit(tensors):
        embed = tensors["model.embed_tokens.weight"]
        if head == "equal":
            tensors["lm_head.weight"] = embed.clone()
        elif head == "different":
            tensors["lm_head.weight"] = torch.randn(embed.shape, generator=gen) * 0.1
        else:
            tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")

    rewrite_tensors(tmp_path, edit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = load_target(tmp_path)
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == (head != "different")
    assert any("differs from the embedding" in str(w.message) for w in caught) == (head == "different")
    ref = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, VOCAB, (1, 17))
    out = eager.forward_rows(ours, ids)
    _close(out.logits, ref(input_ids=ids).logits)
    torch.testing.assert_close(ours.lm_head.weight, ref.lm_head.weight, rtol=0, atol=0)
