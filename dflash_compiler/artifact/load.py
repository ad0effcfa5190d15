"""Loading an artifact: every checksum verified, the libraries and the device checked against the compile's, the
kernels made Triton's (strict: none may be compiled), the graphs and weights handed to the runtime as a
CompiledStep. Nothing is traced, passed or compiled, except for an artifact that names a seed instead of holding
weights (benchmark models at real shapes): its weights are made on the device and converted by the passes again,
from the step traced once (then kept in the trace cache); still no kernel is compiled."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import DFlashError
from ..graph.compiler import CompiledGraph, CompiledStep, PrebuiltGraphs
from ..graph.serialize import graph_from_dict
from ..models.config import DrafterConfig, TargetConfig
from ..models.drafter import DFlashDrafter
from ..models.loader import check_drafter_fits, parse_dtype
from ..models.step import SpeculativeStep
from ..models.target import TargetModel
from .manifest import MANIFEST, check_versions, read_manifest


@dataclass
class Artifact:
    root: Path
    manifest: dict[str, Any]
    compiled: CompiledStep
    watch: Any  # aot.CompileWatch of the kernels (GPU artifacts), counting any compilation after the load
    tokenizer_dir: Path | None

    @property
    def max_batch(self) -> int:
        return self.manifest["max_batch"]

    @property
    def max_seq_len(self) -> int:
        return self.manifest["max_seq_len"]

    @property
    def verify_widths(self) -> dict[int, int] | None:
        """The verify width of each batch bucket that the step graphs were compiled at (None: the whole block)."""
        widths = self.manifest.get("verify_widths")
        if widths is None:
            return None
        try:
            return {int(bucket): int(width) for bucket, width in widths.items()}
        except (AttributeError, TypeError, ValueError):
            where = self.root / MANIFEST
            raise DFlashError(
                f"{where}: field 'verify_widths' must map batch sizes to widths, got {widths!r}"
            ) from None


def _device_profile(device: torch.device) -> str:
    if device.type == "cpu":
        return "cpu"
    if device.type != "cuda":
        raise DFlashError(f"parameter 'device': artifacts run on cpu or cuda, got {device}")
    from ..hw_profiles import profile_for_device

    return profile_for_device(torch.cuda.get_device_properties(device)).name


def load_artifact(root: str | os.PathLike, device: str | torch.device = "cpu", strict: bool = True) -> Artifact:
    """The compiled step of an artifact directory on device. strict: a Triton kernel that would be compiled
    (one the artifact does not hold) raises instead."""
    root = Path(root)
    device = torch.device(device)
    doc = read_manifest(root)
    manifest = root / MANIFEST
    profile = doc["profile"]["name"]
    gpu = profile != "cpu"
    tvm_kernels = doc.get("kernels", {}).get("tvm") if gpu else None
    libraries = ("python", "torch", "triton", *(("tvm",) if tvm_kernels else ())) if gpu else ("torch",)
    check_versions(doc, root, libraries)
    here = _device_profile(device)
    if here != profile:
        raise DFlashError(
            f"{manifest}: compiled for profile {profile} ({doc['profile']['device']}), device {device} is "
            f"profile {here} (compile with --gpu {here})"
        )
    watch = _load_kernels(root, doc, strict) if gpu else None
    try:
        if tvm_kernels:  # the linears lowered to TVM: their modules, so that no TVM kernel is built at run time
            from ..codegen.tvm import linear as tvm_linear

            tvm_linear.install_kernels(tvm_kernels["kernels"], root / tvm_kernels["dir"], strict)
        step = _meta_step(doc, manifest)
        if "random_seed" in doc["weights"]:
            weights = _random_weights(doc, step, manifest, device)
        else:
            weights = _load_weights(root, doc, device)
        templates = {}
        for name, meta in doc["graphs"].items():
            path = root / meta["file"]
            gm = graph_from_dict(json.loads(path.read_text()), str(path))
            templates[name] = CompiledGraph(name, gm, meta["passes"], meta["ops_before"], meta["launches_before"])
        tuning = None
        if doc["backend"] == "triton":  # lowered with the choices the build lowered with and compiled kernels for
            from ..tuning.choice import RecordedChoices

            tuning = RecordedChoices(doc.get("tuning", {}).get("lowered", []), f"{manifest}: tuning.lowered")
        compiled = CompiledStep(
            PrebuiltGraphs(step, doc["quant"], templates), None, doc["backend"], device, weights, tuning=tuning
        )
    except BaseException:
        if watch is not None:
            watch.close()
        raise
    tokenizer = root / doc["tokenizer"] if doc.get("tokenizer") else None
    return Artifact(root, doc, compiled, watch, tokenizer)


def _meta_step(doc: dict, manifest: Path) -> SpeculativeStep:
    """The step's models on the meta device (configurations and shapes), from the manifest's config dicts."""
    dtype = parse_dtype(doc["dtype"])
    target_cfg = TargetConfig.from_dict(doc["models"]["target"], Path(f"{manifest}:models.target"))
    with torch.device("meta"):
        target = TargetModel(target_cfg).to(dtype)
        drafter = None
        if doc["models"]["drafter"] is not None:
            where = Path(f"{manifest}:models.drafter")
            drafter_cfg = DrafterConfig.from_dict(doc["models"]["drafter"], where)
            check_drafter_fits(drafter_cfg, target_cfg, where)
            drafter = DFlashDrafter(drafter_cfg, target_cfg.hidden_size).to(dtype)
    return SpeculativeStep(target, drafter, doc["block_size"], doc["max_len"])


def _random_weights(doc: dict, step: SpeculativeStep, manifest: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """The weights of an artifact that names a seed: the models' seeded random weights made on device and converted
    by the same passes as at the build (no kernel is compiled: the graphs are lowered when they are first run),
    then checked against the manifest's list of tensors."""
    from ..graph.cache import default_cache_dir
    from ..graph.compiler import compile_step
    from ..models.random_init import random_pair

    meta = doc["weights"]
    seed = meta["random_seed"]
    target_cfg = step.target.cfg
    drafter_cfg = step.drafter.cfg if step.drafter is not None else None
    target, drafter = random_pair(target_cfg, drafter_cfg, seed, device, parse_dtype(doc["dtype"]))
    compiled = compile_step(
        target, drafter, doc["block_size"], quant=doc["quant"], backend=doc["backend"], max_len=doc["max_len"],
        release_sources=True, cache_dir=default_cache_dir(), profile=doc["profile"]["name"],
    )  # fmt: skip
    tensors = compiled.weights
    _check_tensors(tensors, meta, f"{manifest}: weights of seed {seed}")
    return tensors


def _check_tensors(tensors: dict[str, torch.Tensor], meta: dict, where) -> None:
    for name, spec in meta["tensors"].items():
        t = tensors.get(name)
        if t is None or list(t.shape) != spec["shape"] or str(t.dtype).removeprefix("torch.") != spec["dtype"]:
            raise DFlashError(f"{where}: tensor {name!r} is missing or not {spec['dtype']} {spec['shape']}")


def _load_weights(root: Path, doc: dict, device: torch.device) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = doc["weights"]
    path = root / meta["file"]
    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise DFlashError(f"{path}: not a readable safetensors file ({e})") from None
    _check_tensors(tensors, meta, path)
    for alias, name in meta["aliases"].items():
        tensors[alias] = tensors[name]
    return tensors


def _load_kernels(root: Path, doc: dict, strict: bool):
    """Triton's cache of the artifact, copied to a directory of this process (Triton points its entries at the
    directory they are loaded from, and builds nothing into the artifact), then preloaded."""
    from ..codegen.triton import aot

    kernels = doc["kernels"]
    records, versions = aot.load_records(root / kernels["records"])
    private = Path(tempfile.mkdtemp(prefix="dflash-kernels-"))
    atexit.register(shutil.rmtree, private, ignore_errors=True)
    shutil.copytree(root / kernels["cache"], private / "cache")
    return aot.load_precompiled(private / "cache", records, strict=strict, versions=versions)
