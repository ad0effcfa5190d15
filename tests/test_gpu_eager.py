"""The eager runtime on CUDA: the same tokens as on CPU in fp32, and lossless in bf16."""

import pytest
import torch
from checkpoints import write_char_tokenizer, write_drafter, write_qwen35

from dflash_compiler.runtime import Engine

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    write_qwen35(root / "target", seed=9)
    write_char_tokenizer(root / "target")
    write_drafter(root / "drafter", layout="nested", sliding_window=6)
    return root


def test_cuda_fp32_matches_cpu(pair):
    cpu = Engine.from_pretrained(pair / "target", pair / "drafter", device="cpu")
    gpu = Engine.from_pretrained(pair / "target", pair / "drafter", device="cuda")
    for prompt in ("def quicksort(", "import os\nimport sys", "class A:"):
        assert gpu.generate(prompt, 32).token_ids == cpu.generate(prompt, 32).token_ids


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_precision_is_lossless(pair, dtype):
    spec = Engine.from_pretrained(pair / "target", pair / "drafter", device="cuda", dtype=dtype)
    alone = Engine.from_pretrained(pair / "target", None, device="cuda", dtype=dtype)
    for prompt in ("def quicksort(", "for i in range(10):", "x = [1, 2, 3]"):
        assert spec.generate(prompt, 40).token_ids == alone.generate(prompt, 40).token_ids
