"""bench/linear_floor.py's kernels on CPU (Triton's interpreter): the streaming kernel sums each program's share of
the words, and the grid is the linear launcher's."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import linear_floor  # noqa: E402

from dflash_compiler.codegen.triton import linear  # noqa: E402


@pytest.mark.parametrize("stages", [1, 3])
@pytest.mark.parametrize("words,programs", [(1000, 3), (4099, 7), (5, 5)])
def test_the_stream_kernel_sums_each_programs_share(words, programs, stages):
    w = torch.randint(-1000, 1000, (words,), dtype=torch.int32)
    out = torch.full((programs,), -1, dtype=torch.int32)
    linear_floor._stream_kernel[(programs,)](w, out, words, BLOCK=64, STAGES=stages)
    bounds = [(p * words) // programs for p in range(programs + 1)]
    assert out.tolist() == [int(w[a:b].sum()) for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize(
    "config",
    [
        {"block_n": 64, "block_m": 16, "block_k": 128, "programs": None, "split_k": 2},
        {"block_n": 128, "block_m": 16, "block_k": 128, "programs": 264, "split_k": 1},
    ],
)
def test_the_grid_is_the_launchers(config, monkeypatch):
    """The launcher's grid for the same config, read from its launch."""
    seen = {}

    class Launch:
        def __getitem__(self, grid):
            seen["grid"] = grid[0]
            return lambda *a, **k: None

    monkeypatch.setattr(linear, "_linear_kernel", Launch())
    x = torch.randn(16, 1024, dtype=torch.float16)
    weight = linear.DenseWeight(torch.randn(640, 1024, dtype=torch.float16))
    cfg = linear.LinearConfig(**{k: v for k, v in config.items()})
    linear.linear(x, weight, config=cfg)
    assert linear_floor.grid_of(config, 16, 640, 1024) == seen["grid"]


def test_the_fit_recovers_a_fixed_cost_and_a_rate():
    """Points on time = 6 us + bytes / 2.5 TB/s give back 6 us and 2.5 TB/s; noise-free points fit exactly."""
    points = [(b, 6.0 + b / 2.5e12 * 1e6) for b in (10_000_000, 21_000_000, 42_000_000, 84_000_000)]
    fixed, rate = linear_floor.fit_fixed_and_rate(points)
    assert fixed == pytest.approx(6.0) and rate == pytest.approx(2.5)
