"""The step functions have no data-dependent Python control flow: torch.export traces them, and the exported
program computes exactly what the eager one does, cache writes included."""

import torch
from checkpoints import VOCAB, write_drafter, write_qwen35

from dflash_compiler.models.loader import load_drafter, load_target


class VerifyStep(torch.nn.Module):
    def __init__(self, target, taps):
        super().__init__()
        self.target, self.taps = target, taps

    def forward(self, ids, positions, cache, accepted):
        out = self.target(ids, positions, cache, taps=self.taps, per_position_states=True)
        return out.logits, out.features, self.target.commit(cache, out, positions, accepted)


class DraftStep(torch.nn.Module):
    def __init__(self, drafter, target):
        super().__init__()
        self.drafter, self.target = drafter, target

    def forward(self, features, ctx_positions, block_ids, block_positions, cache):
        cache = self.drafter.append_context(cache, features, ctx_positions)
        hidden = self.drafter(self.target.embed_tokens(block_ids), block_positions, cache)
        return self.target.lm_head(hidden[:, 1:]).argmax(-1)


def test_verify_and_draft_steps_export(tmp_path):
    write_qwen35(tmp_path / "t", seed=4, multimodal=False)
    write_drafter(tmp_path / "d", layout="nested", sliding_window=4, target_layer_ids=[1, 2])
    target = load_target(tmp_path / "t")
    drafter = load_drafter(tmp_path / "d", target.cfg)
    ids = torch.randint(0, VOCAB, (2, 6))
    positions = (torch.arange(6) + 9).expand(2, -1).contiguous()
    accepted = torch.tensor([2, 5])
    verify = VerifyStep(target, drafter.cfg.target_layer_ids)
    program = torch.export.export(verify, (ids, positions, target.new_cache(2, 24), accepted)).module()
    eager_cache, exported_cache = target.new_cache(2, 24), target.new_cache(2, 24)
    eager = verify(ids, positions, eager_cache, accepted)
    traced = program(ids, positions, exported_cache, accepted)
    torch.testing.assert_close(traced[0], eager[0], rtol=0, atol=0)
    for a, b in zip(
        eager[2].recurrent + eager[2].conv + eager_cache.k, traced[2].recurrent + traced[2].conv + exported_cache.k
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    draft = DraftStep(drafter, target)
    block = torch.full((2, 8), VOCAB - 2)
    block[:, 0] = ids[:, -1]
    block_positions = (torch.arange(8) + 15).expand(2, -1).contiguous()
    args = (eager[1], positions, block, block_positions)
    program = torch.export.export(draft, (*args, drafter.new_cache(2, 24))).module()
    assert torch.equal(program(*args, drafter.new_cache(2, 24)), draft(*args, drafter.new_cache(2, 24)))
