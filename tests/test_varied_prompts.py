"""The varied drafter-prompt generator of scripts/tiny_pair.py: each kind cuts what it names from a source file."""

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("tiny_pair", ROOT / "scripts" / "tiny_pair.py")
tiny_pair = importlib.util.module_from_spec(_spec)
sys.modules["tiny_pair"] = tiny_pair  # dataclasses look their module up there
_spec.loader.exec_module(tiny_pair)

SOURCE = '''"""A module."""
import os
import sys
from pathlib import Path

X = 1


class Box(Base):
    """Holds things.

    More words.
    """

    @property
    def size(self,
             other=None):
        return 3
'''


@pytest.fixture
def src():
    lines = SOURCE.splitlines()
    headers = [i for i, line in enumerate(lines) if tiny_pair.HEADER.match(line)]
    imports = [i for i, line in enumerate(lines) if tiny_pair.IMPORT.match(line)]
    return tiny_pair.SourceLines(lines, headers, imports)


def _draws(kind, src, n=200):
    rng = random.Random(0)
    return {p for p in (tiny_pair.varied_prompt(kind, src, rng) for _ in range(n)) if p is not None}


def test_openings_are_dedented_headers_with_their_signature(src):
    got = _draws("opening", src)
    assert {p.rstrip("\n") for p in got} == {
        "class Box(Base):",
        'class Box(Base):\n    """Holds things.',
        "def size(self,\n         other=None):",
        "def size(self,\n         other=None):\n    return 3",
        "@property\ndef size(self,\n         other=None):",
        "@property\ndef size(self,\n         other=None):\n    return 3",
    }


def test_docstrings_imports_and_headers(src):
    assert _draws("docstring", src) == {
        'class Box(Base):\n    """Holds things.\n\n    More words.\n    """',
        'class Box(Base):\n    """Holds things.\n\n    More words.\n    """\n',
    }
    imports = _draws("imports", src)
    assert "import os\nimport sys\nfrom pathlib import Path\n" in imports
    assert all(p.startswith(("import", "from")) for p in imports)
    assert _draws("header", src) <= {"\n".join(SOURCE.splitlines()[:n]) + "\n" for n in range(1, 13)}


def test_the_fresh_openings_file_holds_distinct_short_openings():
    path = ROOT / "dflash_compiler" / "assets" / "tiny-pair" / "fresh_openings.jsonl"
    prompts = [json.loads(line)["prompt"] for line in path.read_text().splitlines()]
    keys = [next(line for line in p.splitlines() if not line.startswith("@")) for p in prompts]
    assert len(prompts) == 64 and len(set(keys)) == 64
    assert all(tiny_pair.HEADER.match(k) and not k.startswith(" ") for k in keys)
