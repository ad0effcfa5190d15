"""The batched step as the runtime runs it: the compiled graphs of the models' step (graph/compiler.py) over
pooled device state.

The forward is the models' own (`models/step.py`, `TargetModel.paged_forward`, `DFlashDrafter.paged_*`); this
module only allocates the pools and calls the graphs the compiler emitted for them.
"""

from __future__ import annotations

from ..errors import DFlashError
from ..graph.compiler import QUANTS, CompiledStep, compile_step, graph_name, new_pools
from ..models.drafter import DFlashDrafter
from ..models.paged import PAGE_SIZE, Pools
from ..models.target import TargetModel

__all__ = ["PAGE_SIZE", "QUANTS", "Pools", "StepModel"]


class StepModel:
    """The compiled step of (target, drafter) and its pools.

    quant converts the linear layers while compiling (FP8 per channel or block, or INT4 group-128, by
    round-to-nearest). With consume=True the models' parameters are released as they are converted, so an engine
    never holds two copies of the model; the modules cannot run afterwards. ops: "triton" (the kernels) or
    "reference" (their PyTorch lowering, any device). max_len bounds cache length + block per row. compiled: a
    prebuilt step (an artifact's graphs and weights) to run instead of compiling the models (target and drafter are
    then its meta models). cache_dir: where compile_step keeps traces between processes (None: this process only).
    """

    def __init__(
        self,
        target: TargetModel,
        drafter: DFlashDrafter | None,
        block_size: int,
        quant: str = "bf16",
        ops: str = "triton",
        consume: bool = False,
        max_len: int = 4096,
        compiled: CompiledStep | None = None,
        cache_dir=None,
        calibration=None,
        glue: str = "aten",
    ):
        if compiled is not None:
            target, drafter = compiled.step.target, compiled.step.drafter
        if ops not in ("triton", "reference"):
            raise DFlashError(f"parameter 'ops' must be 'triton' or 'reference', got {ops!r}")
        if drafter is not None and block_size > 1 and drafter.cfg.attention_bias:
            raise DFlashError(
                f"{drafter.cfg.source}: drafters with attention biases are not supported by the batched runtime"
            )
        if compiled is None:
            compiled = compile_step(
                target, drafter, block_size, quant=quant, backend=ops, max_len=max_len, release_sources=consume,
                cache_dir=cache_dir, calibration=calibration, glue=glue,
            )  # fmt: skip
        elif (compiled.step.block_size, compiled.step.max_len, compiled.quant) != (block_size, max_len, quant):
            raise DFlashError(
                f"parameter 'compiled': compiled for block size {compiled.step.block_size}, max_len "
                f"{compiled.step.max_len}, quant {compiled.quant!r}; asked for {block_size}, {max_len}, {quant!r}"
            )
        self.compiled: CompiledStep = compiled
        self.cfg, self.block_size, self.quant, self.max_len = target.cfg, block_size, quant, max_len
        self.device = compiled.device
        self.dtype = compiled.step.target.embed_tokens.weight.dtype  # the meta models' (the given ones may be released)
        self.step_def = self.compiled.step
        self.has_drafter = self.step_def.drafter is not None

    # ---- memory ------------------------------------------------------------------------------------------

    def page_bytes(self) -> int:
        """Bytes of one KV page over every target attention layer and drafter layer."""
        cfg, per = self.cfg, 0
        per += len(cfg.attention_layers) * 2 * cfg.num_kv_heads * cfg.head_dim
        if self.has_drafter:
            dc = self.step_def.drafter.cfg
            per += dc.num_layers * 2 * dc.num_kv_heads * dc.head_dim
        return per * PAGE_SIZE * self.dtype.itemsize

    def row_bytes(self) -> int:
        """Bytes of one row's GDN state, conv window and pending block (keys, gates, update rows)."""
        cfg, width, act = self.cfg, self.step_def.block_size, self.dtype.itemsize
        hv, dk, dv = cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
        state = hv * dk * dv * 4
        conv = cfg.gdn_conv_dim * max(cfg.linear_conv_kernel_dim - 1, 0) * act
        pending = width * ((cfg.linear_num_key_heads * dk + hv) * act + hv * dv * 4)
        return len(cfg.gdn_layers) * (state + conv + pending)

    def new_pools(self, rows: int, pages: int, pages_per_row: int) -> Pools:
        if pages_per_row * PAGE_SIZE != -(-self.max_len // PAGE_SIZE) * PAGE_SIZE:
            raise DFlashError(f"parameter 'pages_per_row': the step was compiled for max_len {self.max_len}")
        return new_pools(self.step_def, rows, pages, pages_per_row, self.device, self.dtype)

    # ---- the step ------------------------------------------------------------------------------------------

    def _graph(self, name: str):
        return self.compiled.graph(name)

    def step(self, pools: Pools, n: int, active, sampled: bool, simulated: bool, width: int | None = None) -> None:
        """One step for rows 0..n-1 (those whose `active` flag is on advance), verifying `width` tokens of each
        drafted block (None: all of them)."""
        view = pools.rows(slice(0, n))
        view.active = active[:n]
        if not sampled:
            view.draft_probs = None
        width = None if width == self.block_size else width
        self._graph(graph_name("step", sampled, simulated, width))(view)

    def draft(self, pools: Pools, rows: slice, act, anchor, table, sampled: bool) -> None:
        """The first draft of the request in the one row `rows` after its first token `anchor` [1]."""
        view = pools.rows(rows)
        view.active = act
        if not sampled:
            view.draft_probs = None
        self._graph(graph_name("join", sampled))(view, anchor)

    def prefill_chunk(self, pools: Pools, row: int, ids, start: int):
        """Prefills tokens ids [T] at positions start.. of pool row `row`. Returns the last position's logits [V]."""
        import torch

        lens = torch.full((1,), start, dtype=torch.int32, device=ids.device)
        view = pools.rows(slice(row, row + 1))
        view.draft_probs = None
        return self._graph("prefill")(view, ids.view(1, -1), lens)[0]
