"""Traced graphs on disk by content hash, so that a new process compiling the same step skips torch.export.

The key hashes everything a trace depends on: the source of the model definitions and of the compiler, torch's
version, the models' configurations, the block size, max_len and every weight's name, dtype and shape. A cache
entry holds the graphs before any pass (graph/serialize.py); the passes, the lowering and the weights are redone
from them. The directory is $DFLASH_CACHE_DIR, else ~/.cache/dflash-compiler.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import fx

from .ir import _attr_name
from .serialize import graph_from_dict, graph_to_dict

PACKAGE = Path(__file__).resolve().parent.parent
_TRACED_SOURCES = ("models", "graph", "codegen/reference.py", "codegen/weight_formats.py", "runtime/sampling.py")


def default_cache_dir() -> Path:
    return Path(os.environ.get("DFLASH_CACHE_DIR") or Path.home() / ".cache" / "dflash-compiler")


def _code_digest() -> str:
    h = hashlib.sha256()
    for part in _TRACED_SOURCES:
        path = PACKAGE / part
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            h.update(str(f.relative_to(PACKAGE)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


class TraceCache:
    """The traces of one step configuration under root/traces/<key>/<graph>.json. sources maps each weight
    attribute a trace names to the step's qualified tensor name."""

    def __init__(self, root: str | os.PathLike, step, sources: dict[str, torch.Tensor]):
        self.sources = {_attr_name(name): name for name in sources}
        drafter = step.drafter
        described = {
            "code": _code_digest(),
            "torch": torch.__version__,
            "target": repr(step.target.cfg),
            "drafter": repr(drafter.cfg) if drafter is not None else None,
            "block_size": step.block_size,
            "max_len": step.max_len,
            "weights": [[n, str(t.dtype), list(t.shape)] for n, t in sources.items()],
        }
        self.key = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]
        self.dir = Path(root) / "traces" / self.key
        self.loads = self.saves = 0

    def load(self, name: str) -> fx.GraphModule | None:
        path = self.dir / f"{name}.json"
        try:
            doc = json.loads(path.read_text())
            gm = graph_from_dict(doc, str(path))
        except (OSError, ValueError):  # absent, unreadable or from an incompatible writer: trace again
            return None
        if any(node.target not in self.sources for node in gm.graph.find_nodes(op="get_attr")):
            return None
        self.loads += 1
        return gm

    def save(self, name: str, gm: fx.GraphModule) -> None:
        """Writes the trace (atomically: a reader never sees half a file); a cache that cannot be written is
        skipped."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{name}.", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(graph_to_dict(gm), f)
            os.replace(tmp, self.dir / f"{name}.json")
            self.saves += 1
        except OSError:
            return
