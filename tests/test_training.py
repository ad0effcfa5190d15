"""dflash-train-drafter on tiny random targets (hybrid and dense): it trains, saves the upstream format, reloads,
resumes, and the objective's mask keeps blocks apart."""

import json

import pytest
import torch
from checkpoints import VOCAB, write_char_tokenizer, write_qwen3, write_qwen35

from dflash_compiler.models.loader import load_drafter, load_target
from dflash_compiler.runtime import Engine
from dflash_compiler.training.cli import train_main
from dflash_compiler.training.drafter import block_loss, drafter_config_dict, new_drafter, sample_anchors


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


def test_train_save_reload_and_resume(target_dir, tmp_path):
    out = tmp_path / "drafter"
    assert train_main(_args(target_dir, out)) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["DFlashDraftModel"] and cfg["dflash_config"]["block_size"] == 4
    assert cfg["dflash_config"]["mask_token_id"] == VOCAB - 2  # the tokenizer's <|mask|>
    summary = json.loads((out / "training.json").read_text())
    assert summary["steps"] == 6 and summary["held_out_tau"] >= 1.0
    assert [h["step"] for h in summary["history"]] == [3, 6]
    target = load_target(target_dir / "target")
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
    out = target(
        tokens, positions, target.new_cache(1, 0), taps=drafter.cfg.target_layer_ids, per_position_states=False
    )
    context = drafter.context_kv(out.features, positions)

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
