"""dflash-train-drafter on tiny random targets (hybrid and dense): it trains, saves the upstream format, reloads,
resumes, and the objective's mask keeps blocks apart."""

import json

import pytest
import torch
from checkpoints import VOCAB, write_char_tokenizer, write_drafter, write_qwen3, write_qwen35

from dflash_compiler.models import eager
from dflash_compiler.models.loader import load_drafter, load_target
from dflash_compiler.runtime import Engine
from dflash_compiler.runtime.proposer import DFlashProposer
from dflash_compiler.runtime.sampling import SamplingParams
from dflash_compiler.runtime.speculative import SpeculativeDecoder
from dflash_compiler.training.cli import train_main
from dflash_compiler.training.data import SequenceSet, read_prompts
from dflash_compiler.training.drafter import (
    block_loss,
    decode_acceptance,
    drafter_config_dict,
    new_drafter,
    sample_anchors,
)


@pytest.fixture(scope="module", params=["qwen3_5", "qwen3"])
def target_dir(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    (write_qwen35 if request.param == "qwen3_5" else write_qwen3)(root / "target", seed=3)
    write_char_tokenizer(root / "target")
    prompts = root / "prompts.jsonl"
    lines = [json.dumps({"prompt": f"def f{i}(x): return x * {i} + {i % 7} # some text"}) for i in range(40)]
    prompts.write_text("\n".join(lines))
    return root


def _args(root, out, *extra):
    return [
        "--target", str(root / "target"), "--prompts", str(root / "prompts.jsonl"), "-o", str(out),
        "--num-layers", "2", "--block-size", "4", "--prompt-len", "12", "--response-len", "10",
        "--steps", "6", "--batch-size", "8", "--eval-every", "3", "--device", "cpu", "--no-progress", *extra,
    ]  # fmt: skip


def _trained_drafter(out, target):
    """The drafter at its last checkpoint in full precision: the weights its last evaluation used."""
    drafter = new_drafter(json.loads((out / "config.json").read_text()), target, seed=0)
    drafter.load_state_dict(torch.load(out / "checkpoint.pt")["drafter"])
    return drafter.eval()


def _held_out(seqs_path, seed: int, count: int) -> SequenceSet:
    """The held-out sequences as dflash-train-drafter splits them off."""
    seqs = SequenceSet.load(seqs_path)
    order = torch.randperm(seqs.tokens.shape[0], generator=torch.Generator().manual_seed(seed))
    return SequenceSet(seqs.tokens[order[:count]], seqs.prompt_len)


@torch.inference_mode()
def _teacher_forced_tau(target, drafter, held: SequenceSet, block_size: int) -> float:
    """1 + the drafts that match the sequence, averaged over anchors every 4th response position (a whole block
    after each), each block drafted by the runtime's proposer from the target's features of the tokens before
    the anchor: the reference for the trainer's held-out estimate."""
    proposer, taps, lengths = DFlashProposer(drafter, target), drafter.cfg.target_layer_ids, []
    for seq in held.tokens.tolist():
        for a in range(held.prompt_len, max(held.prompt_len, len(seq) - block_size) + 1, 4):
            out = eager.forward_rows(target, torch.tensor([seq[:a]]), taps)
            state = proposer.add_context(proposer.new_state(1, a + block_size), out.features[None], out.positions)
            drafts, _ = proposer.propose(state, torch.tensor([seq[a]]), torch.tensor([a]), SamplingParams(), None)
            truth = seq[a + 1 : a + block_size]
            lengths.append(1 + next((i for i, t in enumerate(truth) if drafts[0, i] != t), len(truth)))
    return sum(lengths) / len(lengths)


def _decode_tau(target, drafter, prompts, max_new_tokens: int) -> float:
    """Mean over prompts of the eager loop's acceptance length: the reference for the real-decoding estimate."""
    decoder = SpeculativeDecoder(target, DFlashProposer(drafter, target))
    taus = [decoder.generate(p, max_new_tokens, stop_token_ids=target.cfg.eos_token_ids)[1] for p in prompts]
    return sum(s.acceptance_length for s in taus) / len(taus)


def test_train_save_reload_and_resume(target_dir, tmp_path):
    out = tmp_path / "drafter"
    assert train_main(_args(target_dir, out, "--sequences", str(tmp_path / "seqs.pt"))) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["DFlashDraftModel"] and cfg["dflash_config"]["block_size"] == 4
    assert cfg["dflash_config"]["mask_token_id"] == VOCAB - 2  # the tokenizer's <|mask|>
    summary = json.loads((out / "training.json").read_text())
    assert [h["step"] for h in summary["history"]] == [3, 6] and summary["steps"] == 6
    target = load_target(target_dir / "target")
    held = _held_out(tmp_path / "seqs.pt", 0, summary["held_out_sequences"])
    assert summary["held_out_sequences"] == 2  # 5% of 40, the default --held-out
    reference = _teacher_forced_tau(target, _trained_drafter(out, target), held, 4)
    assert summary["held_out_tau"] == pytest.approx(reference)
    drafter = load_drafter(out, target.cfg)
    assert drafter.cfg.target_layer_ids == (1, 1)  # the upstream default rule for a 4-layer target
    engine = Engine.from_pretrained(target_dir / "target", out)
    alone = Engine.from_pretrained(target_dir / "target")
    assert engine.generate("def g(", max_new_tokens=12).token_ids == alone.generate("def g(", 12).token_ids
    # resume continues from the checkpoint to the new step count
    before = torch.load(out / "checkpoint.pt")["step"]
    assert train_main(_args(target_dir, out, "--resume", "--steps", "8")) == 0
    assert before == 6 and torch.load(out / "checkpoint.pt")["step"] == 8


def test_loss_decreases_when_training_longer(target_dir, tmp_path):
    target = load_target(target_dir / "target")
    cfg = drafter_config_dict(target.cfg, mask_token_id=VOCAB - 2, block_size=4, num_layers=1)
    drafter = new_drafter(cfg, target, seed=0)
    tokens = torch.randint(0, VOCAB - 2, (4, 24))
    anchors = sample_anchors(4, 5, 8, 22, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(drafter.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss, _ = block_loss(drafter, target, tokens, anchors, 4, 4.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


@torch.no_grad()
def test_the_training_forward_equals_the_paged_draft(tmp_path):
    """run_blocks over one block per row, masked by layer_masks, computes what the inference path (context K/V
    written into the paged cache, paged_draft) computes, with a causal sliding layer and rows of other lengths."""
    write_qwen35(tmp_path / "t", seed=7, multimodal=False)
    write_drafter(tmp_path / "d", layout="nested", sliding_window=3, target_layer_ids=[0, 2], block_size=6)
    target = load_target(tmp_path / "t")
    drafter = load_drafter(tmp_path / "d", target.cfg)
    assert drafter.cfg.causal_layers[0] and drafter.cfg.layer_types[0] == "sliding_attention"
    n, ctx, b = 2, 13, 6
    features = torch.randn(n, ctx, 2 * target.cfg.hidden_size)
    positions = torch.arange(ctx).expand(n, -1)
    embeds = target.embed_tokens(torch.randint(0, VOCAB, (n, b)))
    lens = torch.tensor([ctx, ctx - 4])  # each row's anchor position: the context before it counts
    proposer = DFlashProposer(drafter, target, b)
    state = proposer.add_context(proposer.new_state(n, ctx + b), features, positions)
    paged = drafter.paged_draft(state.k, state.v, embeds, lens.int(), state.table, ctx + b).view(n, b - 1, -1)
    q_pos = lens[:, None] + torch.arange(b)
    masks = drafter.layer_masks(q_pos, lens[:, None].expand(-1, b), torch.zeros_like(q_pos), ctx)
    dense = drafter.run_blocks(embeds, q_pos, drafter.context_kv(features, positions), masks)
    torch.testing.assert_close(paged, dense[:, 1:], rtol=1e-5, atol=1e-5)


def test_blocks_see_only_their_context_and_themselves(target_dir):
    """Changing a token after an anchor must not change that block's drafts except through the block itself;
    changing another block's anchor must not change this block."""
    target = load_target(target_dir / "target")
    cfg = drafter_config_dict(target.cfg, mask_token_id=VOCAB - 2, block_size=4, num_layers=2)
    drafter = new_drafter(cfg, target, seed=1)
    tokens = torch.randint(0, VOCAB - 2, (1, 30))
    anchors = torch.tensor([[10, 20]])
    n, length = tokens.shape
    positions = torch.arange(length).expand(n, -1)
    out = eager.forward_rows(target, tokens, drafter.cfg.target_layer_ids)
    context = drafter.context_kv(out.features.view(n, length, -1), positions)

    def hidden(toks):
        q_pos = (anchors.unsqueeze(-1) + torch.arange(4)).view(1, -1)
        masks = drafter.layer_masks(
            q_pos, anchors.repeat_interleave(4, 1), torch.arange(2).repeat_interleave(4)[None], length
        )
        ids = torch.full((1, 2, 4), VOCAB - 2)
        ids[:, :, 0] = toks.gather(1, anchors)
        return drafter.run_blocks(target.embed_tokens(ids.view(1, -1)), q_pos, context, masks).view(2, 4, -1)

    base = hidden(tokens)
    changed = tokens.clone()
    changed[0, 20] = (changed[0, 20] + 1) % (VOCAB - 2)  # the second block's anchor
    torch.testing.assert_close(hidden(changed)[0], base[0])
    assert not torch.allclose(hidden(changed)[1], base[1])


def test_distill_and_real_decoding_estimate_and_sequence_cache(target_dir, tmp_path):
    """--distill trains on the KL term, --eval-decode records the real acceptance length, --sequences reuses the
    target's continuations, and .npy prompts are read as token ids."""
    import numpy as np

    prompts = tmp_path / "prompts.npy"
    np.save(prompts, np.random.default_rng(0).integers(0, VOCAB - 2, (24, 12), dtype=np.uint16))
    seqs = tmp_path / "seqs.pt"
    out = tmp_path / "drafter"
    args = [*_args(target_dir, out, "--distill", "0.5", "--eval-decode", "3", "--eval-decode-tokens", "9")]
    args[args.index("--prompts") + 1] = str(prompts)
    assert train_main([*args, "--sequences", str(seqs)]) == 0
    summary = json.loads((out / "training.json").read_text())
    assert summary["sequences"] == 24 and summary["args"]["distill"] == 0.5
    last = summary["history"][-1]
    target = load_target(target_dir / "target")
    held = _held_out(seqs, 0, summary["held_out_sequences"])
    reference = _decode_tau(target, _trained_drafter(out, target), held.tokens[:3, :12].tolist(), 9)
    assert last["decode_tau"] == pytest.approx(reference) and len(last["decode_per_position"]) == 3
    assert summary["held_out_decode_tau"] == last["decode_tau"]
    # the cached continuations are read back (same tokens), and other settings are refused
    from dflash_compiler.training.data import SequenceSet

    cached = SequenceSet.load(seqs).tokens
    assert cached.shape == (24, 22)
    assert train_main([*args, "--sequences", str(seqs), "--steps", "3"]) == 0
    assert train_main([*args, "--sequences", str(seqs), "--response-len", "11"]) == 2


def test_distill_loss_is_the_kl_to_the_target(target_dir):
    """With distill=1 the loss is zero exactly when the drafter's distribution is the target's, and positive
    otherwise; distill=0 is the hard-label loss."""
    target = load_target(target_dir / "target")
    cfg = drafter_config_dict(target.cfg, mask_token_id=VOCAB - 2, block_size=4, num_layers=1)
    drafter = new_drafter(cfg, target, seed=0)
    tokens = torch.randint(0, VOCAB - 2, (2, 20))
    anchors = torch.tensor([[8, 12], [9, 14]])
    hard, _ = block_loss(drafter, target, tokens, anchors, 4, 4.0, distill=0.0)
    kl, metrics = block_loss(drafter, target, tokens, anchors, 4, 4.0, distill=1.0)
    mixed, _ = block_loss(drafter, target, tokens, anchors, 4, 4.0, distill=0.25)
    assert kl.item() > 0 and metrics["kl"] == pytest.approx(kl.item(), rel=1e-5)
    torch.testing.assert_close(mixed, 0.75 * hard + 0.25 * kl)
    kl.backward()
    assert all(p.grad is not None for p in drafter.layers.parameters())


def test_decode_acceptance_equals_the_runtime_loop(target_dir, tmp_path):
    """The batched estimate reproduces SpeculativeDecoder's acceptance lengths prompt by prompt (greedy), with
    prompts of different lengths and a token budget that cuts the last block."""
    out = tmp_path / "drafter"
    assert train_main(_args(target_dir, out, "--steps", "30", "--eval-every", "30")) == 0
    engine = Engine.from_pretrained(target_dir / "target", out)
    prompts = [engine.encode(f"def f{i}(x): return x * {i}") for i in range(5)] + [engine.encode("import os\n")]
    got = decode_acceptance(engine.target, engine.drafter, prompts, 13, batch_size=2)
    for prompt, tau in zip(prompts, got["per_prompt"]):
        assert tau == pytest.approx(engine.generate(prompt, max_new_tokens=13).stats.acceptance_length)
    assert got["tau"] == pytest.approx(sum(got["per_prompt"]) / len(prompts))


def test_time_budget_sizes_the_step_count(target_dir, tmp_path):
    """--minutes times the first steps and fixes the step count; --eval-prompts decodes the given prompts."""
    out = tmp_path / "drafter"
    extra = ["--minutes", "0.05", "--eval-every", "1000", "--eval-decode", "2", "--eval-decode-tokens", "6"]
    extra += ["--eval-prompts", str(target_dir / "prompts.jsonl")]
    assert train_main(_args(target_dir, out, *extra)) == 0
    summary = json.loads((out / "training.json").read_text())
    # --minutes overrides --steps: the step count is sized at step 13 so that training takes about 3 s
    assert summary["history"][0]["step"] == 13 and summary["history"][-1]["step"] == summary["steps"]
    assert torch.load(out / "checkpoint.pt")["step"] == summary["steps"]
    assert 1.5 <= summary["train_seconds"] <= 6.0, summary["train_seconds"]
    target = load_target(target_dir / "target")
    tokenizer = Engine.from_pretrained(target_dir / "target").tokenizer
    prompts = read_prompts(target_dir / "prompts.jsonl", tokenizer, target.cfg.max_position_embeddings)[:2]
    reference = _decode_tau(target, _trained_drafter(out, target), prompts, 6)
    assert summary["held_out_decode_tau"] == pytest.approx(reference)


def test_prompts_of_varied_lengths_start_at_position_zero(target_dir, tmp_path):
    """--min-prompt-len keeps short prompts as they are: each sequence is the prompt then the target's greedy
    continuation filling it to prompt-len + response-len, and training anchors lie in each row's response."""
    from dflash_compiler.runtime.sampling import SamplingParams
    from dflash_compiler.training.data import SequenceSet, build_sequences, continue_batch

    target = load_target(target_dir / "target")
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB - 2, (n,), generator=gen).tolist() for n in (3, 5, 12, 20, 5, 2)]
    seqs = build_sequences(target, prompts, 12, 10, 2, SamplingParams(), seed=0, min_prompt_len=3)
    kept = [p[-12:] for p in prompts if len(p) >= 3]
    assert seqs.tokens.shape == (5, 22) and seqs.lens().tolist() == [len(p) for p in kept]
    for row, prompt in zip(seqs.tokens, kept):
        alone = continue_batch(target, torch.tensor([prompt]), 22 - len(prompt), SamplingParams(), gen)
        assert row[: len(prompt)].tolist() == prompt and row[len(prompt) :].tolist() == alone[0].tolist()
    assert seqs.prompts(2) == kept[:2]
    path = tmp_path / "seqs.pt"
    seqs.save(path)
    again = SequenceSet.load(path)
    assert torch.equal(again.tokens, seqs.tokens) and torch.equal(again.lens(), seqs.lens())
    # anchors: distinct, inside each row's own response
    lens = seqs.lens()
    anchors = sample_anchors(5, 6, lens, 20, torch.Generator().manual_seed(1))
    assert anchors.shape == (5, 6) and bool((anchors >= lens[:, None]).all()) and bool((anchors <= 20).all())
    assert all(len(set(a)) == 6 for a in anchors.tolist())
    out = tmp_path / "drafter"
    assert train_main(_args(target_dir, out, "--min-prompt-len", "4")) == 0
    summary = json.loads((out / "training.json").read_text())
    assert summary["sequences"] == 40 and summary["args"]["min_prompt_len"] == 4
    assert train_main(_args(target_dir, out, "--min-prompt-len", "0")) == 2


def test_held_out_must_be_a_fraction(target_dir, tmp_path, capsys):
    for bad in ("4", "1", "-0.1"):
        assert train_main(_args(target_dir, tmp_path / "d", "--held-out", bad)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "parameter 'held_out' must be a fraction in [0, 1)" in err, err
    assert not (tmp_path / "d").exists()


def test_init_fine_tunes_a_drafter_from_its_weights(target_dir, tmp_path, capsys):
    base = tmp_path / "base"
    assert train_main(_args(target_dir, base, "--steps", "3")) == 0
    target = load_target(target_dir / "target")
    start = load_drafter(base, target.cfg).state_dict()
    tuned = tmp_path / "tuned"
    # --init keeps the drafter's sizes: the block size and layer count given here are not the base's
    args = _args(target_dir, tuned, "--init", str(base), "--steps", "1", "--lr", "0")
    args[args.index("--block-size") + 1], args[args.index("--num-layers") + 1] = "8", "3"
    assert train_main(args) == 0
    assert json.loads((tuned / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    unchanged = load_drafter(tuned, target.cfg).state_dict()
    assert all(torch.equal(start[k], unchanged[k]) for k in start)
    assert train_main(_args(target_dir, tuned, "--init", str(base), "--steps", "2", "--lr", "1e-2")) == 0
    moved = load_drafter(tuned, target.cfg).state_dict()
    assert any(not torch.equal(start[k], moved[k]) for k in start)
    assert train_main(_args(target_dir, tuned, "--init", str(base), "--drafter-config", str(base / "config.json"))) == 2
    assert "'init' and 'drafter_config' exclude each other" in capsys.readouterr().err
    missing = tmp_path / "no-drafter"
    assert train_main(_args(target_dir, tmp_path / "never", "--init", str(missing))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{missing}: does not exist" in err and not (tmp_path / "never").exists()
