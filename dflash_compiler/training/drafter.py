"""DFlash drafter training (paper section 4.2): a frozen target, trainable drafter layers, `fc`, `hidden_norm` and
`norm`; blocks `[anchor, MASK x (B-1)]` at random anchors in the response see the context strictly before their
anchor and each other, never other blocks; cross-entropy on slots 1..B-1 weighted exp(-(k-1)/gamma).

With `distill` > 0 the per-slot loss mixes in the KL divergence from the target's own next-token distribution at
that position (the same forward that yields the features yields those logits), so the drafter learns the target's
whole distribution rather than its argmax alone. `decode_acceptance` measures the acceptance length of real
greedy speculative decoding (the runtime's loop, batched), the figure the benchmarks report."""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ..models import eager
from ..models.config import DrafterConfig, TargetConfig, default_target_layer_ids
from ..models.drafter import DFlashDrafter
from ..models.target import TargetModel
from .data import SequenceSet


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 32
    anchors_per_sequence: int = 8
    lr: float = 6e-4
    warmup: float = 0.04
    weight_decay: float = 0.0
    gamma: float = 7.0
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 200
    checkpoint_every: int = 500
    distill: float = 0.0  # weight of the KL term against the target's distribution (0: hard labels only, 1: KL only)
    eval_decode: int = 0  # held-out prompts decoded for the real acceptance length at each evaluation (0: none)
    eval_decode_tokens: int = 128
    minutes: float | None = None  # size `steps` to this training time (timed after the first steps)


def drafter_config_dict(
    target: TargetConfig,
    mask_token_id: int,
    block_size: int = 16,
    num_layers: int = 5,
    target_layer_ids: list[int] | None = None,
    overrides: dict | None = None,
) -> dict:
    """An upstream-format drafter config.json for a target (DFlashDraftModel, Qwen3-style layers)."""
    ids = target_layer_ids or default_target_layer_ids(target.num_layers, num_layers)
    head_dim = 128 if target.hidden_size >= 1024 else max(16, target.hidden_size // 8)
    heads = max(1, target.hidden_size // head_dim)
    cfg = {
        "architectures": ["DFlashDraftModel"],
        "model_type": "qwen3",
        "hidden_size": target.hidden_size,
        "intermediate_size": target.intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 4) if heads % 4 == 0 else heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e6,
        "rope_scaling": None,
        "max_position_embeddings": target.max_position_embeddings,
        "layer_types": ["full_attention"] * num_layers,
        "sliding_window": None,
        "num_target_layers": target.num_layers,
        "vocab_size": target.vocab_size,
        "tie_word_embeddings": True,
        "block_size": block_size,
        "dflash_config": {"block_size": block_size, "mask_token_id": mask_token_id, "target_layer_ids": ids},
        "dtype": "bfloat16",
    }
    cfg.update(overrides or {})
    return cfg


def new_drafter(cfg_dict: dict, target: TargetModel, seed: int) -> DFlashDrafter:
    cfg = DrafterConfig.from_dict(cfg_dict, Path("drafter config"))
    device = target.embed_tokens.weight.device
    torch.manual_seed(seed)
    drafter = DFlashDrafter(cfg, target.cfg.hidden_size).to(device)
    with torch.no_grad():
        for p in drafter.parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return drafter


def sample_anchors(n: int, count: int, low: int | torch.Tensor, high: int, generator: torch.Generator) -> torch.Tensor:
    """`count` distinct anchor positions per sequence, uniformly in [low, high] (low: one for all, or one per
    sequence [n])."""
    low = torch.as_tensor(low, dtype=torch.long).expand(n)
    first = int(low.min())
    span = high - first + 1
    count = min(count, high - int(low.max()) + 1)
    keys = torch.rand(n, span, generator=generator)
    keys[first + torch.arange(span) < low.unsqueeze(1)] = 2.0  # positions before a row's own low sort last
    return keys.argsort(-1)[:, :count] + first


def block_loss(
    drafter: DFlashDrafter,
    target: TargetModel,
    tokens: torch.Tensor,
    anchors: torch.Tensor,
    block_size: int,
    gamma: float,
    distill: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """The DFlash objective for sequences [N, L] with anchors [N, A]; also returns the teacher-forced acceptance
    length (which equals the real greedy tau at those anchors when the sequences are the target's greedy output).

    Per slot: (1 - distill) * cross-entropy on the sequence's token + distill * KL(target || drafter), the target's
    distribution being its logits at the position before the slot's."""
    if not 0.0 <= distill <= 1.0:
        raise ValueError(f"distill must be in [0, 1], got {distill}")
    device = tokens.device
    # fp32 master weights for the drafter; with a half-precision target, matmuls run in the target's dtype
    dtype = target.embed_tokens.weight.dtype
    with torch.autocast(device.type, dtype=dtype, enabled=dtype in (torch.bfloat16, torch.float16)):
        return _block_loss(drafter, target, tokens, anchors, block_size, gamma, distill)


def _block_loss(drafter, target, tokens, anchors, block_size, gamma, distill=0.0):
    n, length = tokens.shape
    device = tokens.device
    positions = torch.arange(length, device=device).expand(n, -1)
    with torch.no_grad():
        out = eager.forward_rows(target, tokens, drafter.cfg.target_layer_ids)
    context = drafter.context_kv(out.features.view(n, length, -1), positions)
    a = anchors.shape[1]
    slot = torch.arange(block_size, device=device)
    q_pos = (anchors.unsqueeze(-1) + slot).view(n, a * block_size)
    q_anchor = anchors.repeat_interleave(block_size, dim=1)
    q_block = torch.arange(a, device=device).repeat_interleave(block_size).expand(n, -1)
    masks = drafter.layer_masks(q_pos, q_anchor, q_block, length)
    block_ids = torch.full((n, a, block_size), drafter.cfg.mask_token_id, device=device)
    block_ids[:, :, 0] = tokens.gather(1, anchors)
    hidden = drafter.run_blocks(target.embed_tokens(block_ids.view(n, -1)), q_pos, context, masks)
    logits = target.lm_head(hidden).view(n, a, block_size, -1)[:, :, 1:].float()
    label_pos = q_pos.view(n, a, block_size)[:, :, 1:]
    valid = label_pos < length
    labels = tokens.gather(1, label_pos.clamp(max=length - 1).view(n, -1)).view_as(label_pos)
    weights = torch.exp(-(slot[1:].float() - 1) / gamma).expand_as(labels) * valid
    log_q = logits.log_softmax(-1)
    per_slot = -log_q.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    metrics = {}
    if distill > 0:
        # the target's distribution for the token at p is its output at p - 1 (already computed, no extra pass)
        source = (label_pos - 1).clamp(max=length - 1).view(n, -1, 1).expand(-1, -1, out.logits.shape[-1])
        log_p = out.logits.gather(1, source).view_as(logits).float().log_softmax(-1)
        kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
        per_slot = (1.0 - distill) * per_slot + distill * kl
        metrics["kl"] = float((kl.detach() * weights).sum() / weights.sum())
    loss = (per_slot * weights).sum() / weights.sum()
    with torch.no_grad():
        match = ((logits.argmax(-1) == labels) & valid).long()
        tau = 1.0 + match.cumprod(-1).sum(-1).float().mean()
        per_position = match.cumprod(-1).float().mean((0, 1))
    return loss, {"tau": float(tau), "per_position": per_position.tolist(), **metrics}


@torch.inference_mode()
def decode_acceptance(
    target: TargetModel,
    drafter: DFlashDrafter,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    block_size: int | None = None,
    batch_size: int = 64,
    stop_token_ids: Sequence[int] | None = None,
) -> dict:
    """Greedy speculative decoding of every prompt (max_new_tokens each, stopping after a stop token) through the
    runtime's steps, prompts of equal length batched together. Returns the acceptance length tau as the benchmarks
    define it (mean over prompts of each prompt's mean), pooled over all verify steps, per prompt, and the
    per-position acceptance. Greedy acceptance makes every figure equal to what `SpeculativeDecoder` gives."""
    block_size = block_size or drafter.cfg.block_size
    stops = set(target.cfg.eos_token_ids if stop_token_ids is None else stop_token_ids)
    by_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    lengths: list[list[int]] = [[] for _ in prompts]
    for group in by_length.values():
        for j in range(0, len(group), batch_size):
            rows = group[j : j + batch_size]
            batch = [prompts[i] for i in rows]
            got = _decode_batch(target, drafter, batch, max_new_tokens, block_size, stops)
            for i, x in zip(rows, got):
                lengths[i] = x
    per_prompt = [sum(x) / len(x) if x else 0.0 for x in lengths]
    pooled = [a for x in lengths for a in x]
    steps = max(1, len(pooled))
    return {
        "tau": sum(per_prompt) / max(1, len(per_prompt)),
        "tau_pooled": sum(pooled) / steps,
        "per_prompt": per_prompt,
        "per_position": [sum(a - 1 >= i for a in pooled) / steps for i in range(1, block_size)],
    }


def _decode_batch(target, drafter, prompts, budget, block_size, stops) -> list[list[int]]:
    from ..runtime.proposer import DFlashProposer
    from ..runtime.sampling import SamplingParams, greedy_accept

    device = target.embed_tokens.weight.device
    n, plen = len(prompts), len(prompts[0])
    taps = drafter.cfg.target_layer_ids
    proposer = DFlashProposer(drafter, target, block_size)
    cache_len = plen + budget + block_size
    ids = torch.tensor([list(p) for p in prompts], device=device)
    pools = eager.request_pools(target, n, cache_len, block_size)
    out = eager.prefill(target, pools, ids, taps, last_only=True)
    draft_state = proposer.add_context(proposer.new_state(n, cache_len), out.features.view(n, plen, -1), out.positions)
    anchor = out.logits[:, -1].argmax(-1)
    generated = [1] * n
    done = [int(t) in stops or budget <= 1 for t in anchor.tolist()]
    lengths: list[list[int]] = [[] for _ in range(n)]
    while not all(done):
        drafts, _ = proposer.propose(draft_state, anchor, pools.cache_lens, SamplingParams(), None)
        block = torch.cat((anchor.view(n, 1), drafts), dim=1)
        out = eager.verify(target, pools, block, taps)
        accepted, _ = greedy_accept(drafts, out.logits)
        # the runtime verifies at most the tokens left (budget - generated); finished rows stand still (-1 keeps
        # their state), their block re-run in place
        room = torch.tensor([-1 if d else budget - g - 1 for d, g in zip(done, generated)], device=device)
        accepted = torch.minimum(accepted, room)
        eager.commit(target, pools, out, accepted)
        draft_state = proposer.add_context(draft_state, out.features.view(n, block_size, -1), out.positions)
        choice = out.logits.argmax(-1)  # the committed tokens: accepted drafts equal the target's choices
        live = torch.tensor([not d for d in done], device=device)
        for i, (a, row) in enumerate(zip(accepted.tolist(), choice.tolist())):
            if done[i]:
                continue
            lengths[i].append(a + 1)
            generated[i] += a + 1
            done[i] = generated[i] >= budget or any(t in stops for t in row[: a + 1])
        anchor = torch.where(live, choice.gather(1, accepted.clamp(min=0).view(n, 1)).squeeze(1), anchor)
    return lengths


def save_drafter(drafter: DFlashDrafter, cfg_dict: dict, directory: str | Path, dtype=torch.bfloat16) -> None:
    """Writes config.json + model.safetensors in the upstream layout (no embedding, no head), atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(dtype).contiguous().cpu() for k, v in drafter.state_dict().items()}
    cfg = {**cfg_dict, "dtype": str(dtype).removeprefix("torch.")}
    tmp_weights, tmp_config = directory / "model.safetensors.tmp", directory / "config.json.tmp"
    save_file(tensors, str(tmp_weights), metadata={"format": "pt"})
    tmp_config.write_text(json.dumps(cfg, indent=2) + "\n")
    os.replace(tmp_weights, directory / "model.safetensors")
    os.replace(tmp_config, directory / "config.json")


class DrafterTrainer:
    def __init__(
        self,
        target: TargetModel,
        cfg_dict: dict,
        train: SequenceSet,
        held_out: SequenceSet,
        config: TrainConfig,
        output: str | Path,
        eval_prompts: Sequence[Sequence[int]] | None = None,
    ):
        """eval_prompts: prompts (token ids) for the real-decoding estimate; by default the prompts of the first
        `config.eval_decode` held-out sequences."""
        self.target, self.cfg_dict, self.train_set, self.held_out = target, cfg_dict, train, held_out
        self.config, self.output = config, Path(output)
        if eval_prompts is None and config.eval_decode > 0:
            eval_prompts = held_out.prompts(config.eval_decode)
        self.eval_prompts = [list(p) for p in eval_prompts or []][: config.eval_decode or None]
        self.drafter = new_drafter(cfg_dict, target, config.seed)
        self.block_size = self.drafter.cfg.block_size
        self.optimizer = torch.optim.AdamW(
            self.drafter.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay
        )
        self.step = 0
        self.train_seconds = 0.0
        self.history: list[dict] = []
        self.generator = torch.Generator().manual_seed(config.seed)

    @property
    def checkpoint_path(self) -> Path:
        return self.output / "checkpoint.pt"

    def lr_at(self, step: int) -> float:
        warm = max(1, int(self.config.warmup * self.config.steps))
        if step < warm:
            return self.config.lr * (step + 1) / warm
        progress = (step - warm) / max(1, self.config.steps - warm)
        return self.config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def save_checkpoint(self) -> None:
        self.output.mkdir(parents=True, exist_ok=True)
        state = {
            "step": self.step,
            "drafter": self.drafter.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "history": self.history,
            "config": asdict(self.config),
        }
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint_path)

    def resume(self) -> bool:
        if not self.checkpoint_path.is_file():
            return False
        state = torch.load(self.checkpoint_path, map_location=self.target.embed_tokens.weight.device)
        self.drafter.load_state_dict(state["drafter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.step, self.history = state["step"], state["history"]
        return True

    def _anchors(self, batch: SequenceSet) -> torch.Tensor:
        n, length = batch.tokens.shape
        return sample_anchors(n, self.config.anchors_per_sequence, batch.lens(), length - 2, self.generator)

    @torch.no_grad()
    def evaluate(self, max_sequences: int = 256) -> dict:
        """Held-out teacher-forced acceptance over every anchor position of the response region."""
        self.drafter.eval()
        device = self.target.embed_tokens.weight.device
        tokens = self.held_out.tokens[:max_sequences].to(device)
        lens = self.held_out.lens()[:max_sequences].to(device)
        # every fourth position from each row's response start, whole blocks only, so every slot has a label
        high = max(int(lens.max()), tokens.shape[1] - self.block_size)
        steps = torch.arange(0, high - int(lens.max()) + 1, 4, device=device)
        taus, per_pos = [], []
        for i in range(0, tokens.shape[0], 16):
            chunk = tokens[i : i + 16]
            anchors = lens[i : i + 16, None] + steps
            _, metrics = block_loss(self.drafter, self.target, chunk, anchors, self.block_size, self.config.gamma)
            taus.append(metrics["tau"])
            per_pos.append(metrics["per_position"])
        self.drafter.train()
        result = {"tau": sum(taus) / len(taus), "per_position": [sum(x) / len(x) for x in zip(*per_pos)]}
        if self.eval_prompts:
            decoded = self.evaluate_decoding()
            result.update(
                decode_tau=decoded["tau"],
                decode_tau_pooled=decoded["tau_pooled"],
                decode_per_position=decoded["per_position"],
            )
        return result

    def evaluate_decoding(self) -> dict:
        """Real greedy speculative decoding of the evaluation prompts with the drafter as it would be saved (in
        the target's dtype)."""
        drafter = copy.deepcopy(self.drafter).eval()
        dtype = self.target.embed_tokens.weight.dtype
        for p in drafter.parameters():
            p.data = p.data.to(dtype)
        return decode_acceptance(
            self.target, drafter, self.eval_prompts, self.config.eval_decode_tokens, self.block_size
        )

    def train(self, progress: bool = True) -> list[dict]:
        from tqdm.auto import tqdm

        device = self.target.embed_tokens.weight.device
        batches = self.train_set.batches(self.config.batch_size, self.generator)
        bar = tqdm(total=self.config.steps, initial=self.step, disable=not progress, desc="drafter", unit="step")
        self.drafter.train()
        tokens_seen, t0 = 0, time.perf_counter()
        first = self.step
        if self.config.minutes:
            self.config.steps = max(self.config.steps, first + 14)
            bar.total = self.config.steps
        # with a time budget: time steps first+3..first+13, then fix the step count (an evaluation timed too)
        size_at = first + 13 if self.config.minutes else None
        postfix = {}
        while self.step < self.config.steps:
            if self.step == first + 3:
                t_timed = time.perf_counter()
            batch = next(batches)
            tokens = batch.tokens.to(device)
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_at(self.step)
            loss, _ = block_loss(
                self.drafter,
                self.target,
                tokens,
                self._anchors(batch).to(device),
                self.block_size,
                self.config.gamma,
                self.config.distill,
            )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.drafter.parameters(), self.config.grad_clip)
            self.optimizer.step()
            self.step += 1
            tokens_seen += tokens.numel()
            record = {"step": self.step, "loss": loss.item(), "seconds": time.perf_counter() - t0}
            sizing = self.step == size_at
            if sizing or self.step % self.config.eval_every == 0 or self.step == self.config.steps:
                t_eval = time.perf_counter()
                held = self.evaluate()
                eval_s = time.perf_counter() - t_eval
                record.update(held_out_tau=held.pop("tau"), **held)
                postfix["tau"] = f"{record['held_out_tau']:.2f}"
                if "decode_tau" in record:
                    postfix["tau_dec"] = f"{record['decode_tau']:.2f}"
            if sizing:
                per_step = (t_eval - t_timed) / 10
                left = self.config.minutes * 60 - (time.perf_counter() - t0)
                extra = max(0, int(left / (per_step + eval_s / self.config.eval_every) - 1))
                self.config.steps = self.step + extra
                bar.total = self.config.steps
            self.history.append(record)
            if self.step % self.config.checkpoint_every == 0 or self.step == self.config.steps:
                self.save_checkpoint()
                save_drafter(self.drafter, self.cfg_dict, self.output)
            rate = tokens_seen / max(1e-9, time.perf_counter() - t0)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{rate:,.0f}", **postfix)
            bar.update(1)
        bar.close()
        self.train_seconds = time.perf_counter() - t0
        return self.history
