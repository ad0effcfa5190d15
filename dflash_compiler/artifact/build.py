"""Compiling a model pair into an artifact directory for one hardware profile.

    manifest.json              versions, model configs, profile, quant, shapes, the plan, tuning choices, checksums
    weights.safetensors        the compiled step's weights by name, in their compiled formats
    graphs/<graph>.json        the weight-free graphs after the passes (graph/serialize.py)
    kernels/cache/             (GPU profiles) Triton's cache with every kernel the step launches, for that GPU
    kernels/records.json       the kernels' records (codegen/triton/aot.py), with the versions they were built by
    kernels/tvm/               (GPU profiles) the TVM modules of the linears the tuning database lowers to TVM
    tokenizer/                 the target's tokenizer files

Everything is written into a temporary directory beside the output and renamed at the end, so an interrupted
compile leaves nothing at the output path.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..errors import DFlashError
from ..graph.cache import default_cache_dir
from ..graph.compiler import PHASES, CompiledStep, PrebuiltGraphs, compile_step, graph_name, split_width
from ..graph.serialize import graph_to_dict
from ..hw_profiles import HardwareProfile, load_profile
from ..models.config import DrafterConfig, TargetConfig
from ..models.loader import check_drafter_fits, load_drafter, load_target, parse_dtype
from ..models.paged import PAGE_SIZE
from ..models.random_init import random_pair
from .manifest import library_versions, project, replace_dir, write_manifest

GPUS = ("sm80", "sm90", "sm100", "sm120", "cpu", "auto")
QUANTS = ("bf16", "fp8", "int4")
PREFILL_CHUNK = 512  # the batched runtime's default prefill chunk (runtime/batch.py)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
_ACT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _progress(enabled: bool, total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="dflash-compile", unit="phase", disable=not enabled, dynamic_ncols=True)


def compile_artifact(
    out: str | os.PathLike,
    *,
    target: str | os.PathLike | None = None,
    drafter: str | os.PathLike | None = None,
    gpu: str = "cpu",
    quant: str = "bf16",
    block_size: int | None = None,
    verify_width: int | Mapping[int, int] | str | None = None,
    max_batch: int = 32,
    max_seq_len: int = 4096,
    dtype: str | torch.dtype | None = None,
    graphs: Sequence[str] | None = None,
    prefill_lengths: Sequence[int] | None = None,
    force: bool = False,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
    calibration: Sequence[str | Sequence[int]] | None = None,
    random_weights: int | None = None,
) -> Path:
    """Compiles (target, drafter) for the hardware profile `gpu` into the directory out and returns it.

    With no target named, the tiny pair that ships with the package. dtype: the activations' (default float32 on
    the cpu profile, else bfloat16). graphs: the step graphs to include (default: every one the runtime may call).
    prefill_lengths: the prefill chunk lengths whose kernels are compiled ahead (default 1..512, every chunk the
    runtime can run). cache_dir: where traces are kept between compiles (default $DFLASH_CACHE_DIR or
    ~/.cache/dflash-compiler). verify_width: the verify width of every batch bucket, or by batch size (runtime/batch.py
    BatchRunner), or "tuned" (the widths the profile's runtime study chose for the model: the default at the
    drafter's own block, the whole block where no study is recorded); each bucket's step graph is compiled at its
    width and the runner of the artifact uses them. calibration (quant "int4"): prompts, as text or
    token ids, whose activations guide the INT4 quantizer (graph/calibrate.py). random_weights: a seed; the models
    get seeded random weights (models/random_init.py: for benchmarks at real shapes, target and drafter directories
    need only their config.json), and the artifact names the seed instead of holding the weights, which a load
    rebuilds on its device."""
    from ..runtime.batch import BUCKETS, bucket_widths, runner_buckets, step_max_len
    from ..runtime.engine import DEFAULT_PAIR
    from ..runtime.speculative import resolve_block_size
    from ..tuning.choice import tuned_widths_or_block

    out = Path(out)
    if out.exists() and not force:
        raise DFlashError(f"parameter 'output': {out} exists (pass --force to replace it)")
    if quant not in QUANTS:
        raise DFlashError(f"parameter 'quant' must be one of {', '.join(QUANTS)}, got {quant!r}")
    if not 1 <= max_batch <= BUCKETS[-1]:
        raise DFlashError(f"parameter 'max_batch' must be in 1..{BUCKETS[-1]}, got {max_batch}")
    if max_seq_len < 1:
        raise DFlashError(f"parameter 'max_seq_len' must be >= 1, got {max_seq_len}")
    if random_weights is not None and (isinstance(random_weights, bool) or not isinstance(random_weights, int)):
        raise DFlashError(f"parameter 'random_weights' must be an integer seed, got {random_weights!r}")
    if random_weights is not None and calibration is not None:
        raise DFlashError(
            "parameters 'random_weights' and 'calibration' exclude each other: random weights are not calibrated"
        )
    profile = load_profile(gpu)
    if profile.is_cuda and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise DFlashError("TRITON_INTERPRET is set: compiling kernels for a GPU needs Triton's compiler; unset it")
    if target is None:
        target = DEFAULT_PAIR / "target"
        drafter = DEFAULT_PAIR / "drafter" if drafter is None else drafter
    dtype = parse_dtype(dtype or ("bfloat16" if profile.is_cuda else "float32"))
    if dtype not in _ACT:
        raise DFlashError(f"parameter 'dtype' must be float32, bfloat16 or float16, got {dtype}")
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # as a plain mkdir would make it (mkdtemp's is private)
    try:
        with _progress(progress, 6 if profile.is_cuda else 5) as bar:
            bar.set_postfix_str("loading the models")
            if random_weights is None:
                target_model = load_target(target, device="cpu", dtype=dtype)
                drafter_model = load_drafter(drafter, target_model.cfg, device="cpu", dtype=dtype) if drafter else None
            else:
                target_cfg = TargetConfig.from_dir(target)
                drafter_cfg = DrafterConfig.from_dir(drafter) if drafter else None
                if drafter_cfg is not None:
                    check_drafter_fits(drafter_cfg, target_cfg, Path(drafter))
                target_model, drafter_model = random_pair(target_cfg, drafter_cfg, random_weights, "cpu", dtype)
            block = resolve_block_size(block_size, drafter_model.cfg.block_size if drafter_model else None)
            buckets = runner_buckets(max_batch)
            # the study's widths were measured at the drafter's own block
            by_default = verify_width is None and drafter_model is not None and block == drafter_model.cfg.block_size
            if verify_width == "tuned" or by_default:
                asked = not by_default
                verify_width = tuned_widths_or_block(target_model.cfg, quant, profile, asked) if block > 1 else None
            widths = bucket_widths(verify_width, buckets, block)
            max_seq_len = min(max_seq_len, target_model.cfg.max_position_embeddings)
            max_len = step_max_len(max_seq_len, block)
            configs = {
                "target": _config_json(target),
                "drafter": _config_json(drafter) if drafter_model is not None else None,
            }
            target_cfg, drafter_cfg = target_model.cfg, drafter_model.cfg if drafter_model is not None else None
            bar.update()

            bar.set_postfix_str("tracing, passes, lowering")
            backend = "triton" if profile.is_cuda else "reference"
            calibration_tokens = None
            if calibration is not None:
                from ..runtime.engine import calibration_ids, load_tokenizer

                calibration_tokens = calibration_ids(calibration, load_tokenizer(target, drafter))
            compiled = compile_step(
                target_model, drafter_model, block, quant=quant, backend=backend, max_len=max_len,
                release_sources=True, cache_dir=cache_dir, profile=profile, calibration=calibration_tokens,
            )  # fmt: skip
            del target_model, drafter_model
            names = list(graphs) if graphs is not None else [g for g in PHASES if compiled.graphs_def.has(g)]
            names += [  # the step graphs of the buckets that verify fewer tokens than the block
                graph_name("step", sampled, simulated, w)
                for w in sorted(set(widths.values()) - {block})
                for sampled in (False, True)
                for simulated in (False, True)
                if graph_name("step", sampled, simulated) in names
            ]
            for name in names:
                if not compiled.graphs_def.has(name):
                    raise DFlashError(f"parameter 'graphs': {name!r} is not a graph of this step ({', '.join(PHASES)})")
                compiled.graph(name)
            bar.update()

            bar.set_postfix_str("writing the weights")
            if random_weights is None:
                weights = _save_weights(compiled.weights, tmp / "weights.safetensors")
            else:
                weights = {"random_seed": random_weights, **_layout(compiled.weights)[1]}
            bar.update()

            bar.set_postfix_str("writing the graphs")
            graph_docs = _save_graphs(compiled, names, tmp / "graphs")
            _copy_tokenizer(Path(target), tmp / "tokenizer")
            bar.update()

            kernels = None
            if profile.is_cuda:
                bar.set_postfix_str(f"compiling the kernels for {profile.name}")
                longest = min(PREFILL_CHUNK, max_seq_len)
                lengths = list(prefill_lengths) if prefill_lengths is not None else list(range(1, longest + 1))
                kernels = compile_kernels(compiled, names, profile, tmp / "kernels", max_batch, lengths, widths)
                bar.update()

            bar.set_postfix_str("writing the manifest")
            fields = {
                "project": project(),
                "versions": library_versions(),
                "profile": _profile_fields(profile),
                "quant": quant,
                "dtype": _dtype_name(dtype),
                "backend": backend,
                "block_size": block,
                "max_batch": max_batch,
                "max_seq_len": max_seq_len,
                "max_len": max_len,
                "buckets": list(buckets),
                "verify_widths": {str(b): w for b, w in widths.items()},
                "calibration": None
                if calibration_tokens is None
                else {"prompts": len(calibration_tokens), "tokens": sum(map(len, calibration_tokens))},
                "models": configs,
                "graphs": graph_docs,
                "weights": weights,
                "plan": compiled.plan(),
                "tuning": {
                    **_tuning(target_cfg, drafter_cfg, quant, dtype, profile, buckets, max_len, block),
                    "lowered": _recorded_rows(compiled.tuning),  # the tuned choices the graphs were lowered with
                },
                "kernels": kernels,
                "tokenizer": "tokenizer" if (tmp / "tokenizer").is_dir() else None,
            }
            write_manifest(tmp, fields)
            bar.update()
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _config_json(directory) -> dict:
    from ..models.config import read_config_json

    return read_config_json(directory)[1]


def _profile_fields(profile: HardwareProfile) -> dict:
    return {
        "name": profile.name,
        "device": profile.device.name,
        "compute_capability": list(profile.compute_capability) if profile.compute_capability else None,
        "triton_target": profile.triton_target,
        "sm_count": profile.device.sm_count,
        "smem_per_block": profile.smem_per_block,
    }


def _layout(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors to store (a tensor that is another name's, tied weights, once, listed under aliases; a view into
    another tensor's storage as a copy) and their description in the manifest."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_view: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in weights.items():
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and view in by_view:
            aliases[name] = by_view[view]
            continue
        by_view[view] = name
        storage = t.untyped_storage()
        whole = t.is_contiguous() and t.storage_offset() == 0 and t.numel() * t.element_size() == storage.nbytes()
        if not whole or storage.data_ptr() in storages:
            t = t.contiguous().clone()
        storages.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    return tensors, {
        "aliases": aliases,
        "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        "tensors": {
            n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for n, t in tensors.items()
        },
    }


def _save_weights(weights: dict[str, torch.Tensor], path: Path) -> dict:
    """The weights as one safetensors file, described as _layout describes them."""
    from safetensors.torch import save_file

    tensors, doc = _layout(weights)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return {"file": path.name, **doc}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _save_graphs(compiled: CompiledStep, names: list[str], folder: Path) -> dict:
    import json

    folder.mkdir()
    docs = {}
    for name in names:
        template, lowered = compiled.graphs_def.template(name), compiled.graph(name)
        (folder / f"{name}.json").write_text(json.dumps(graph_to_dict(template.gm)))
        docs[name] = {
            "file": f"graphs/{name}.json",
            "passes": template.passes,
            "ops_before": template.ops_before,
            "launches_before": template.launches_before,
            "ops": lowered.ops,
            "launches": lowered.launches,
        }
    return docs


def _copy_tokenizer(target: Path, folder: Path) -> None:
    found = [target / f for f in TOKENIZER_FILES if (target / f).is_file()]
    if found:
        folder.mkdir()
        for f in found:
            shutil.copy2(f, folder / f.name)


def _as_on_the_gpu(weights: dict) -> dict:
    """The weights laid out as the GPU runtime holds them: each in an allocation of its own (a checkpoint read on
    the CPU leaves tensors at the file's 8-byte offsets, and Triton keys a kernel on its pointers' 16-byte
    alignment, so kernels compiled for those would not be the ones the GPU launches)."""
    return {k: v.clone() if isinstance(v, torch.Tensor) and v.data_ptr() % 16 else v for k, v in weights.items()}


def _recorded_rows(chooser) -> list[dict]:
    from ..tuning.choice import recorded_rows

    return recorded_rows(chooser)


def _tuning(target_cfg, drafter_cfg, quant, dtype, profile, buckets, max_len, block) -> dict:
    """The tuning database's lowering and config for every tunable call of the step, and the calls it has no
    tuned entry for (those run the launcher's default)."""
    from ..tuning.choice import Chooser
    from ..tuning.shapes import model_calls

    calls = model_calls(
        target_cfg, drafter_cfg, quant, _ACT[dtype], buckets, max_len, block_size=block, prefill_chunk=PREFILL_CHUNK
    )
    chooser = Chooser(profile)
    rows = []
    for call in calls:
        choice = chooser.choose(call.op, call.shape.key, call.shape.fmt)
        rows.append({"call": call.name, "op": call.op, "shape_key": call.shape.key, "fmt": call.shape.fmt,
                     "lowering": choice.lowering, "config": choice.config, "tuned": choice.tuned})  # fmt: skip
    return {"calls": rows, "untuned": [f"{op}:{key}:{fmt}" for op, key, fmt in chooser.fallbacks]}


# ---- kernels ahead of time ----------------------------------------------------------------------------------------


def _dry_run(op: str, tuned: dict | None = None):
    """The op's Triton implementation (with the node's tuned choices, graph/compiler.py lower) called for its
    kernels' compilation (nothing is launched on a stand-in GPU), then its reference for the values the rest of
    the step reads."""
    from ..graph.ops import implementation, triton_implementations

    reference = implementation(op, "reference")
    if op not in triton_implementations():
        return reference
    choices = {int(m): (c["lowering"], c["config"]) for m, c in (tuned or {}).items()}
    kernel = implementation(op, "triton", choices)

    def run(*args, **kwargs):
        kernel(*args, **kwargs)
        return reference(*args, **kwargs)

    run.__name__ = f"{op}_ahead_of_time"
    return run


def compile_kernels(
    compiled: CompiledStep,
    names: list[str],
    profile: HardwareProfile,
    folder: Path,
    max_batch: int,
    lengths,
    widths: dict[int, int] | None = None,
) -> dict:
    """Cross-compiles, for the profile's GPU, every Triton kernel the step's graphs launch when the batched runtime
    runs them: each batch bucket of the step, the first draft, and a prefill chunk of each length. The graphs run
    on CPU tensors laid out as the runtime's pools (the kernels' specializations depend on shapes, strides and
    alignment), each op's kernel compiled and its reference computing the values."""
    from ..codegen.triton import aot
    from ..codegen.tvm import linear as tvm_linear
    from ..codegen.tvm.build import cuda_target
    from ..runtime.batch import runner_buckets
    from ..runtime.step_model import StepModel

    templates = {n: compiled.graphs_def.template(n) for n in names}
    step = compiled.step
    dry = CompiledStep(PrebuiltGraphs(step, compiled.quant, templates), None, "reference", torch.device("cpu"),
                       weights=_as_on_the_gpu(compiled.weights))  # fmt: skip
    for name in names:
        gm = dry.graph(name).gm
        lowered = {node.name: node.meta.get("lowering", {}) for node in compiled.graph(name).gm.graph.nodes}
        for node in gm.graph.nodes:
            if "lowering" in node.meta:
                node.target = _dry_run(node.meta["lowering"]["op"], lowered.get(node.name, {}).get("tuned"))
        gm.recompile()
    model = StepModel(None, None, step.block_size, compiled.quant, "reference", max_len=step.max_len, compiled=dry)
    pages_per_row = step.max_len // PAGE_SIZE
    rows = max_batch + 1
    pools = model.new_pools(rows, pages_per_row + 1, pages_per_row)
    block, vocab = step.block_size, step.target.cfg.vocab_size
    if block > 1:  # as the runner allocates them (runtime/batch.py)
        pools.draft_probs = torch.zeros(rows, block - 1, vocab)

    def launch():
        one = slice(max_batch, max_batch + 1)
        ones = torch.ones(1, dtype=torch.bool)
        if "prefill" in names:
            for n in lengths:
                model.prefill_chunk(pools, max_batch, torch.zeros(n, dtype=torch.long), 0)
        for sampled in (False, True):
            if ("join_sampled" if sampled else "join") in names:
                model.draft(pools, one, ones, torch.zeros(1, dtype=torch.long), pools.block_table[one], sampled)
        for bucket in runner_buckets(max_batch):
            width = (widths or {}).get(bucket, block)
            for name in names:
                phase, graph_width = split_width(name)
                if phase.startswith("step") and (graph_width or block) == width:
                    off = torch.zeros_like(pools.active)  # the runner's warm-up before a capture
                    model.step(pools, bucket, off, "sampled" in phase, "simulated" in phase, width)

    arch = profile.triton_target
    tvm_target = cuda_target(profile.compute_capability)  # the linears the database lowers to TVM, for the GPU
    with torch.inference_mode(), tvm_linear.building_for(tvm_target):
        records = aot.cross_compile(
            launch, arch, folder / "cache", sm_count=profile.device.sm_count, max_shared_memory=profile.smem_per_block
        )
    aot.strip_cache(folder / "cache")  # the artifact carries what a load reads: metadata and cubins
    aot.save_records(folder / "records.json", records, aot.record_versions(arch))
    tvm_kernels = tvm_linear.export_kernels(tvm_target, folder / "tvm")
    return {
        "cache": "kernels/cache",
        "records": "kernels/records.json",
        "arch": arch,
        "count": len(records),
        "kernels": sorted({r.name for r in records}),
        "prefill_lengths": [min(lengths), max(lengths), len(lengths)] if lengths else [],
        "tvm": {"dir": "kernels/tvm", "target": tvm_target, "kernels": tvm_kernels} if tvm_kernels else None,
    }
