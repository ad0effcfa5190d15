"""dflash-compile artifacts on CPU: a `--gpu cpu` artifact reloads and generates the eager Engine's greedy tokens,
the tiny pair cross-compiles for every GPU profile (the architecture read from the cubins), every corruption and
mismatch is refused with a one-line error, an interrupted compile leaves nothing behind, and a second in-memory
start of the same models reuses the traces on disk instead of tracing.

Compiles and engine starts whose tracing is counted run in subprocesses (a new process is what the disk cache is
for; cross-compilation needs Triton's compiler, not the interpreter these tests run kernels in). They share one
trace cache, so the step of the tiny pair is traced once for the whole module.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch

from dflash_compiler.artifact import build
from dflash_compiler.artifact.load import load_artifact
from dflash_compiler.artifact.manifest import MANIFEST, file_sha256
from dflash_compiler.errors import DFlashError
from dflash_compiler.graph.ops import OPS
from dflash_compiler.runtime.engine import DEFAULT_PAIR, Engine

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "def parse_args(argv):"
NEW_TOKENS = 24
SHAPES = ["--max-batch", "2", "--max-seq-len", "96"]  # the runner's shapes, shared by every compile below
GREEDY_GRAPHS = "step,join,prefill"
# profile: the architecture its cubins must carry
ARCHS = {"sm80": "sm_80", "sm90": "sm_90a", "sm100": "sm_100a", "sm120": "sm_120a"}


def _run(script: str, cache: Path, *args: str) -> subprocess.CompletedProcess:
    """Runs script in a fresh process with Triton's compiler (not its interpreter) and the module's trace cache."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), DFLASH_CACHE_DIR=str(cache))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args], env=env, cwd=ROOT, capture_output=True, text=True
    )


def _python(script: str, cache: Path, *args: str) -> str:
    """_run's last line of output; the script must succeed."""
    proc = _run(script, cache, *args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.strip().splitlines()[-1]


# a start of the batched runtime that counts torch.export traces; prints {"traces", "loads", "tokens"}
ENGINE_START = f"""
import json, torch
torch.set_num_threads(1)
from dflash_compiler.graph import compiler
from dflash_compiler.runtime.engine import DEFAULT_PAIR, Engine
traces = []
trace = compiler.trace
compiler.trace = lambda *a, **k: (traces.append(1), trace(*a, **k))[1]
engine = Engine.from_pretrained(runtime="batched", max_batch=2, max_seq_len=96)
tokens = engine.generate({PROMPT!r}, max_new_tokens={NEW_TOKENS}).token_ids
cache = next(iter(compiler._STEP_GRAPHS.values())).cache
print(json.dumps({{"traces": len(traces), "loads": cache.loads, "tokens": tokens}}))
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("trace-cache")


@pytest.fixture(scope="module")
def starts(cache) -> list[dict]:
    """Two starts of Engine.from_pretrained (batched) in new processes on one disk cache."""
    return [json.loads(_python(ENGINE_START, cache)) for _ in range(2)]


@pytest.fixture(scope="module")
def eager_tokens() -> list[int]:
    engine = Engine.from_pretrained(runtime="eager")
    tokens = engine.generate(PROMPT, max_new_tokens=NEW_TOKENS).token_ids
    engine.close()
    return tokens


@pytest.fixture(scope="module")
def cpu_artifact(tmp_path_factory, cache, starts) -> Path:
    """`dflash-compile --gpu cpu` of the tiny pair (after the engine starts: its traces come from their cache)."""
    out = tmp_path_factory.mktemp("artifacts") / "tiny-cpu"
    args = ["--gpu", "cpu", "--graphs", GREEDY_GRAPHS, *SHAPES, "-o", str(out), "--quiet"]
    line = _python(f"from dflash_compiler.artifact.cli import compile_main\ncompile_main({args!r})", cache)
    assert line.startswith(f"{out}: compiled in")
    return out


CROSS_COMPILE = """
import sys
from dflash_compiler.artifact.build import compile_artifact
for gpu in sys.argv[2:]:
    compile_artifact(f"{sys.argv[1]}/{gpu}", gpu=gpu, graphs=["join"], max_batch=2, max_seq_len=96, progress=False)
print("compiled")
"""


@pytest.fixture(scope="module")
def gpu_artifacts(tmp_path_factory, cache, starts) -> tuple[dict[str, Path], dict[str, str]]:
    """The tiny pair's first-draft graph cross-compiled for each GPU profile, and the error output of each compile
    that failed. sm100 compiles in a process of its own: Triton 3.9 can abort the process there."""
    folder = tmp_path_factory.mktemp("cross")
    errors = {}
    for group in (["sm80", "sm90", "sm120"], ["sm100"]):
        proc = _run(CROSS_COMPILE, cache, str(folder), *group)
        if proc.returncode != 0:
            errors.update({gpu: proc.stderr for gpu in group if not (folder / gpu).is_dir()})
    return {gpu: folder / gpu for gpu in ARCHS}, errors


def test_second_start_reads_the_traces_instead_of_tracing(starts):
    first, second = starts
    assert first["traces"] == 3 and first["loads"] == 0  # step, join, prefill
    assert second["traces"] == 0 and second["loads"] == 3
    assert second["tokens"] == first["tokens"]


def test_cpu_artifact_reloads_with_the_eager_engines_greedy_tokens(cpu_artifact, eager_tokens, starts, monkeypatch):
    from dflash_compiler.graph import compiler

    def no_trace(*args, **kwargs):
        raise AssertionError("loading an artifact traced a graph")

    monkeypatch.setattr(compiler, "trace", no_trace)
    monkeypatch.setattr(torch.export, "export", no_trace)
    engine = Engine.from_artifact(cpu_artifact)
    result = engine.generate(PROMPT, max_new_tokens=NEW_TOKENS)
    engine.close()
    assert result.token_ids == eager_tokens
    assert starts[0]["tokens"] == eager_tokens  # the in-memory compile of the same pipeline
    assert result.stats.acceptance_length > 1.5  # the drafter's blocks are accepted, not only the bonus tokens


def test_manifest_describes_the_compile(cpu_artifact):
    doc = json.loads((cpu_artifact / MANIFEST).read_text())
    assert doc["profile"]["name"] == "cpu" and doc["quant"] == "bf16" and doc["dtype"] == "float32"
    assert (doc["block_size"], doc["max_batch"], doc["max_seq_len"]) == (16, 2, 96)
    assert doc["versions"]["torch"] == torch.__version__.split("+")[0]
    target_config = json.loads((DEFAULT_PAIR / "target" / "config.json").read_text())
    assert doc["models"]["target"] == target_config
    assert set(doc["graphs"]) == set(GREEDY_GRAPHS.split(","))
    for name, graph in doc["graphs"].items():
        assert graph["launches"] < graph["launches_before"], name  # the passes fused the step
        planned = Counter(row["op"] for row in doc["plan"] if row["graph"] == name)
        assert planned == {op: n for op, n in graph["ops"].items() if op in OPS}  # every dflash op node, lowered
    assert {row["impl"] for row in doc["plan"]} == {"reference"}
    untuned = [f"{c['op']}:{c['shape_key']}:{c['fmt']}" for c in doc["tuning"]["calls"] if not c["tuned"]]
    assert untuned and sorted(untuned) == sorted(doc["tuning"]["untuned"])
    files = {p.relative_to(cpu_artifact).as_posix() for p in cpu_artifact.rglob("*") if p.is_file()}
    assert files - {MANIFEST} == set(doc["files"])
    for rel, entry in doc["files"].items():
        assert entry["sha256"] == file_sha256(cpu_artifact / rel)


@pytest.mark.parametrize("gpu", ARCHS)
def test_cross_compiled_kernels_carry_the_profiles_architecture(gpu_artifacts, gpu):
    import triton

    from dflash_compiler.codegen.triton import aot

    roots, errors = gpu_artifacts
    if gpu == "sm100" and triton.__version__.startswith("3.9") and "TritonGPUHoistTMEMAlloc" in errors.get(gpu, ""):
        # Triton 3.9's TMEM hoisting pass breaks on the split-K linear kernel at 16 rows for sm_100 (Triton 3.6,
        # the GPU machines' wheel, compiles it)
        pytest.xfail(f"Triton {triton.__version__}'s TritonGPUHoistTMEMAlloc pass fails on _linear_kernel for sm_100")
    assert gpu not in errors, errors[gpu][-4000:]
    root = roots[gpu]
    records, versions = aot.load_records(root / "kernels" / "records.json")
    assert versions["python"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    families = {r.name.rsplit(".", 1)[-1] for r in records}
    assert {"_linear_kernel", "_attention_kernel", "_qk_norm_rope_kernel"} <= families
    cubins = {root / "kernels" / "cache" / r.binary for r in records}
    assert {aot.cubin_arch(c) for c in cubins} == {ARCHS[gpu]}
    # compiled for 16-byte aligned weights, as the GPU holds them (each weight in an allocation of its own)
    norms = [json.loads(r.spec) for r in records if r.name.endswith("._rms_norm_kernel")]
    assert norms and all(
        ["tt.divisibility", 16] in dict(zip(map(tuple, s["attrs_keys"]), s["attrs_vals"]))[(2,)] for s in norms
    )
    kept = {p.suffix for p in (root / "kernels" / "cache").rglob("*") if p.is_file()}
    assert {".cubin", ".json"} <= kept and not kept & {".ptx", ".llir", ".ttir", ".ttgir"}  # what a load reads
    doc = json.loads((root / MANIFEST).read_text())
    assert {row["impl"] for row in doc["plan"]} == {"triton"} and doc["kernels"]["count"] == len(records)


TVM_CROSS_COMPILE = """
import sys
from dflash_compiler.artifact.build import compile_artifact
from dflash_compiler.tuning import choice

def choose(self, op, shape_key, fmt):  # a database that lowers every linear to TVM
    if op != "linear":
        return real(self, op, shape_key, fmt)
    chosen = self.chosen[(op, shape_key, fmt)] = choice.Choice("tvm", {}, True)
    return chosen

real, choice.Chooser.choose = choice.Chooser.choose, choose
compile_artifact(sys.argv[1], gpu="sm90", graphs=["join"], max_batch=2, max_seq_len=96, progress=False)
print("compiled")
"""


def test_linears_lowered_to_tvm_ship_their_kernels_built_for_the_gpu(tmp_path, cache, starts):
    """A database that lowers the linears to TVM: the sm90 artifact holds a TVM module for every linear shape of its
    graphs, built here for sm_90 (their specs name it, as a load checks), listed in the manifest beside the TVM
    release they need; the plan records the lowering."""
    from dflash_compiler.artifact.manifest import library_versions
    from dflash_compiler.codegen.tvm.build import KernelSpec

    out = tmp_path / "tvm-sm90"
    assert _python(TVM_CROSS_COMPILE, cache, str(out)) == "compiled"
    doc = json.loads((out / MANIFEST).read_text())
    tvm = doc["kernels"]["tvm"]
    assert (
        tvm["target"] == "cuda -arch=sm_90" and tvm["kernels"] and doc["versions"]["tvm"] == library_versions()["tvm"]
    )
    for entry in tvm["kernels"]:
        spec = KernelSpec.from_json((out / tvm["dir"] / (entry["file"] + ".json")).read_text())
        fmt, m, n, k = entry["key"][:4]
        assert spec.target == "cuda -arch=sm_90" and entry["key"][7] == spec.target and spec.op == "linear"
        assert (spec.attrs["format"], spec.attrs["m"], spec.attrs["n"], spec.attrs["k"]) == (fmt, m, n, k)
        assert (out / tvm["dir"] / entry["file"]).stat().st_size > 0
        assert f"{tvm['dir']}/{entry['file']}" in doc["files"]  # checksummed like every other file
    linears = [row for row in doc["plan"] if row["op"] == "linear"]
    assert linears and all({c["lowering"] for c in row["tuned"].values()} == {"tvm"} for row in linears)
    assert {row["lowering"] for row in doc["tuning"]["lowered"]} == {"tvm"}


GDN_CROSS_COMPILE = """
import sys
from dflash_compiler.artifact.build import compile_artifact
from dflash_compiler.tuning import choice

CONFIGS = {  # a database with a GDN verify config for every batch size
    "gdn_verify": {"block_v": 16, "num_warps": 1, "unroll": True},
}

def choose(self, op, shape_key, fmt):
    if op not in CONFIGS:
        return real(self, op, shape_key, fmt)
    chosen = self.chosen[(op, shape_key, fmt)] = choice.Choice("triton", CONFIGS[op], True)
    return chosen

real, choice.Chooser.choose = choice.Chooser.choose, choose
compile_artifact(sys.argv[1], gpu="sm90", graphs=["step"], max_batch=1, max_seq_len=96, progress=False)
print("compiled")
"""


def test_tuned_gdn_configs_are_compiled_ahead(tmp_path, cache, starts):
    """A database GDN verify config (the recurrent kernel's): the sm90 artifact's plan records it on the step's
    nodes and its kernels hold it specialized as tuned, with the pending block's commit that the recurrent verify
    launches first and the layer commit (so a load of the tuned step compiles nothing)."""
    from dflash_compiler.codegen.triton import aot

    out = tmp_path / "gdn-sm90"
    assert _python(GDN_CROSS_COMPILE, cache, str(out)) == "compiled"
    doc = json.loads((out / MANIFEST).read_text())
    verify = [row for row in doc["plan"] if row["op"] == "gdn_verify"]
    config = {"block_v": 16, "num_warps": 1, "unroll": True}
    assert verify and all(row["tuned"]["1"] == {"lowering": "triton", "config": config} for row in verify)
    records, _ = aot.load_records(out / "kernels" / "records.json")
    commit = [row for row in doc["plan"] if row["op"] == "gdn_commit"]
    assert commit and not any("tuned" in row for row in commit)
    recurrent, commits, layer_commits = [], [], 0
    for r in records:
        spec = json.loads(r.spec)
        names = list(spec["signature"])
        constants = {names[key[0]]: val for key, val in zip(spec["constant_keys"], spec["constant_vals"])}
        if r.name.endswith("._gdn_recurrent_kernel"):
            recurrent.append((constants["DELTAS"], constants["BV"], constants["UNROLL"], spec["options"]["num_warps"]))
        elif r.name.endswith("._gdn_delta_commit_kernel"):
            commits.append((constants["PREC"], constants["V_MAJOR"], spec["options"]["num_warps"]))
        layer_commits += r.name.endswith("._gdn_commit_kernel")
    assert (True, 16, True, 1) in recurrent  # the verify with its update rows, as tuned
    assert commits and set(commits) == {("tf32x3", False, 4)}  # the pending block's commit, at its defaults
    assert layer_commits


STAND_IN_LOAD = """
import json, shutil, sys, tempfile
from pathlib import Path
from dflash_compiler.codegen.triton import aot
from dflash_compiler.codegen.triton.device import GpuFacts, compiling_for
root = Path(sys.argv[1])
records, versions = aot.load_records(root / "kernels" / "records.json")
cache = Path(tempfile.mkdtemp()) / "cache"
shutil.copytree(root / "kernels" / "cache", cache)
with aot.stand_in_gpu(90, private_caches=False), compiling_for(GpuFacts((9, 0), 132)):
    watch = aot.load_precompiled(cache, records, strict=True, versions=versions)
print(json.dumps({"compiled": watch.compiled, "cache_loads": watch.cache_loads, "records": len(records)}))
"""


def test_stripped_kernel_cache_preloads_with_no_compilation(gpu_artifacts, cache):
    """On a stand-in for the GPU (Triton's driver answers for sm_90): every kernel of the sm90 artifact, its cache
    entries stripped to metadata and cubin, is a disk-cache hit."""
    loaded = json.loads(_python(STAND_IN_LOAD, cache, str(gpu_artifacts[0]["sm90"])))
    assert loaded["compiled"] == [] and loaded["cache_loads"] == loaded["records"] > 0


# ---- corruption and mismatch: each refused with one line naming what is wrong --------------------------------------


@pytest.fixture
def copy(cpu_artifact, tmp_path) -> Path:
    out = tmp_path / "artifact"
    shutil.copytree(cpu_artifact, out)
    return out


def _refused(root: Path, device="cpu") -> str:
    with pytest.raises(DFlashError) as err:
        load_artifact(root, device)
    message = str(err.value)
    assert "\n" not in message
    return message


def _edit_manifest(root: Path, edit) -> None:
    doc = json.loads((root / MANIFEST).read_text())
    edit(doc)
    (root / MANIFEST).write_text(json.dumps(doc))


def test_altered_weight_file(copy):
    path = copy / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    assert _refused(copy) == f"{path}: altered (its sha256 differs from the manifest's)"


def test_truncated_safetensors(copy):
    path = copy / "weights.safetensors"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    assert _refused(copy) == f"{path}: {size - 100} bytes, the manifest says {size} (truncated or altered)"


def test_missing_file(copy):
    (copy / "graphs" / "join.json").unlink()
    assert _refused(copy) == f"{copy / 'graphs' / 'join.json'}: missing from the artifact"
    shutil.rmtree(copy / "graphs")
    (copy / MANIFEST).unlink()
    assert "manifest.json: missing" in _refused(copy)


def test_altered_manifest_field(copy):
    _edit_manifest(copy, lambda doc: doc.update(quant="int4"))
    assert _refused(copy) == f"{copy / MANIFEST}: field 'quant' was altered after compilation (its checksum differs)"


def test_altered_model_config(copy):
    _edit_manifest(copy, lambda doc: doc["models"]["target"].update(num_hidden_layers=4))
    assert "field 'models' was altered" in _refused(copy)


def test_library_version_mismatch(copy, monkeypatch):
    from dflash_compiler.artifact import manifest

    current = manifest.library_versions()
    monkeypatch.setattr(manifest, "library_versions", lambda: {**current, "torch": "2.99.0"})
    built = current["torch"]
    assert _refused(copy) == (
        f"{copy / MANIFEST}: compiled with torch {built}, this host has torch 2.99.0 "
        "(recompile the artifact here, or install the version it was compiled with)"
    )


def test_gpu_artifact_on_a_cpu_device(gpu_artifacts):
    root = gpu_artifacts[0]["sm90"]
    message = _refused(root, "cpu")
    assert message == (
        f"{root / MANIFEST}: compiled for profile sm90 (NVIDIA H200), device cpu is profile cpu "
        "(compile with --gpu cpu)"
    )


def test_cpu_artifact_on_a_gpu_of_another_profile(copy, monkeypatch):
    from dflash_compiler.artifact import load

    monkeypatch.setattr(load, "_device_profile", lambda device: "sm90")
    message = _refused(copy, "cpu")
    assert "compiled for profile cpu (cpu)" in message and "is profile sm90 (compile with --gpu sm90)" in message


def test_an_artifact_verifies_each_bucket_at_its_width(tmp_path, cache, starts):
    """--verify-width 1:16,2:5: the artifact holds the 5-wide step graph beside the full one, its manifest the width
    of each bucket, and its runner serves two requests at once (bucket 2, width 5) with the target's greedy
    tokens."""
    from dflash_compiler.artifact.cli import compile_main
    from dflash_compiler.models.loader import load_target
    from dflash_compiler.runtime.batch import BatchRunner
    from dflash_compiler.runtime.speculative import SpeculativeDecoder

    out = tmp_path / "widths"
    args = ["--gpu", "cpu", "--graphs", GREEDY_GRAPHS, *SHAPES, "--verify-width", "1:16,2:5", "-o", str(out)]
    assert compile_main([*args, "--quiet"]) == 0
    doc = json.loads((out / MANIFEST).read_text())
    assert doc["verify_widths"] == {"1": 16, "2": 5} and set(doc["graphs"]) == {*GREEDY_GRAPHS.split(","), "step@w5"}
    loaded = load_artifact(out)
    assert loaded.verify_widths == {1: 16, 2: 5}
    runner = BatchRunner(None, None, max_batch=2, max_seq_len=96, compiled=loaded.compiled,
                         verify_width=loaded.verify_widths)  # fmt: skip
    prompts = [[5, 17, 33, 8, 91], [12, 4, 77]]
    ids = [runner.add_request(p, 20) for p in prompts]
    out_tokens: dict[int, list[int]] = {}
    while runner.has_work:
        for event in runner.step():
            out_tokens.setdefault(event.request_id, []).extend(event.tokens)
    target = SpeculativeDecoder(load_target(DEFAULT_PAIR / "target", dtype=torch.float32), None, 1)
    assert [out_tokens[i] for i in ids] == [target.generate(p, 20)[0] for p in prompts]


def test_an_artifact_takes_the_tuned_widths(tmp_path, cache, starts, monkeypatch):
    from dflash_compiler.hw_profiles import database
    from dflash_compiler.hw_profiles.database import Entry, TuningDB
    from dflash_compiler.models.config import TargetConfig
    from dflash_compiler.tuning.choice import runtime_model_key

    model = runtime_model_key(TargetConfig.from_dir(DEFAULT_PAIR / "target"))
    db = TuningDB.load("cpu", tmp_path / "db")
    db.record(Entry(op="runtime", shape_key=f"{model}_c1-2", fmt="bf16", lowering="reference", tuned=True,
                    config={"widths": {"1": 16, "2": 6}}, device="cpu", platform="cpu"))  # fmt: skip
    db.save()
    monkeypatch.setattr(database, "PROFILE_DIR", tmp_path / "db")
    # the default at the drafter's own block: the study's widths
    out = build.compile_artifact(tmp_path / "tuned", gpu="cpu", graphs=GREEDY_GRAPHS.split(","), max_batch=2,
                                 max_seq_len=96, cache_dir=cache, progress=False)  # fmt: skip
    assert load_artifact(out).verify_widths == {1: 16, 2: 6}


def test_a_calibrated_int4_artifact_decodes_as_the_in_memory_compile(tmp_path, cache, starts, capsys):
    """--quant int4 --calibration: the manifest records the calibration, the step's quantization pass is the
    calibrated one, and the artifact decodes the tokens of Engine.from_pretrained with the same prompts."""
    from dflash_compiler.artifact.cli import compile_main
    from dflash_compiler.benchmark.prompts import load_prompts

    out = tmp_path / "int4"
    args = ["--gpu", "cpu", "--quant", "int4", "--graphs", GREEDY_GRAPHS, *SHAPES, "--calibration", "gsm8k",
            "--calibration-prompts", "3", "-o", str(out), "--quiet"]  # fmt: skip
    bad = ["--gpu", "cpu", "--quant", "int4", *SHAPES, "--calibration", "nope", "-o", str(tmp_path / "x"), "--quiet"]
    assert compile_main(bad) == 2
    assert not (tmp_path / "x").exists()
    assert "parameter '--calibration': 'nope' is neither a prompt set" in capsys.readouterr().err
    assert compile_main(args) == 0
    doc = json.loads((out / MANIFEST).read_text())
    assert doc["calibration"]["prompts"] == 3 and doc["calibration"]["tokens"] > 30
    assert any(name.startswith("quantize_int4_calibrated_") for name in doc["graphs"]["step"]["passes"])
    engine = Engine.from_artifact(out)
    got = engine.generate(PROMPT, max_new_tokens=NEW_TOKENS).token_ids
    engine.close()
    texts = [p.text for p in load_prompts("gsm8k", 3)]
    engine = Engine.from_pretrained(runtime="batched", quant="int4", max_batch=2, max_seq_len=96, calibration=texts)
    assert engine.generate(PROMPT, max_new_tokens=NEW_TOKENS).token_ids == got
    engine.close()


def test_a_random_weight_artifact_names_its_seed_and_rebuilds_the_weights(tmp_path, cache, starts, capsys):
    """--random-weights: no weight file, the seed in the manifest; the load makes the seeded weights on its device
    and converts them as the build did: the weights of the in-memory compile of the same random models. A
    config-only model directory is all the build reads."""
    from dflash_compiler.artifact.cli import compile_main
    from dflash_compiler.artifact.load import load_artifact
    from dflash_compiler.graph.compiler import compile_step
    from dflash_compiler.models.config import DrafterConfig, TargetConfig
    from dflash_compiler.models.random_init import random_pair

    configs = {}
    for name in ("target", "drafter"):
        (tmp_path / name).mkdir()
        shutil.copy2(DEFAULT_PAIR / name / "config.json", tmp_path / name / "config.json")
        configs[name] = str(tmp_path / name)
    out = tmp_path / "random"
    args = ["--target", configs["target"], "--drafter", configs["drafter"], "--gpu", "cpu", "--graphs",
            GREEDY_GRAPHS, *SHAPES, "--random-weights", "7", "-o", str(out), "--quiet"]  # fmt: skip
    assert compile_main(args) == 0
    doc = json.loads((out / MANIFEST).read_text())
    assert doc["weights"]["random_seed"] == 7 and "file" not in doc["weights"]
    assert not list(out.glob("*.safetensors")) and doc["weights"]["tensors"]
    loaded = load_artifact(out).compiled
    cfgs = TargetConfig.from_dir(configs["target"]), DrafterConfig.from_dir(configs["drafter"])
    target, drafter = random_pair(*cfgs, 7, "cpu", torch.float32)
    in_memory = compile_step(target, drafter, 16, max_len=doc["max_len"])
    assert loaded.weights.keys() == in_memory.weights.keys()
    assert all(torch.equal(loaded.weights[n], in_memory.weights[n]) for n in in_memory.weights)
    other = random_pair(*cfgs, 8, "cpu", torch.float32)[0]
    assert not torch.equal(other.embed_tokens.weight, target.embed_tokens.weight)  # another seed, other weights
    assert compile_main([*args[:-3], "--calibration", "gsm8k", "-o", str(tmp_path / "x"), "--quiet"]) == 2
    assert "'random_weights' and 'calibration' exclude each other" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(DFlashError, match="parameter 'random_weights' must be an integer seed, got '7'"):
        build.compile_artifact(tmp_path / "y", gpu="cpu", random_weights="7", progress=False)
    assert not (tmp_path / "y").exists()


# ---- the compile's own guarantees ---------------------------------------------------------------------------------


def test_interrupted_compile_leaves_nothing(tmp_path, cache, starts, monkeypatch):
    import safetensors.torch

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupt)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        build.compile_artifact(out, gpu="cpu", graphs=["join"], max_batch=2, max_seq_len=96, cache_dir=cache,
                               progress=False)  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused(cpu_artifact):
    with pytest.raises(DFlashError, match="exists"):
        build.compile_artifact(cpu_artifact, gpu="cpu", progress=False)


def test_generate_cli_runs_an_artifact(cpu_artifact, eager_tokens, capsys):
    from dflash_compiler.runtime.cli import generate_main

    argv = ["--artifact", str(cpu_artifact), "--prompt", PROMPT, "--max-new-tokens", str(NEW_TOKENS), "--json"]
    assert generate_main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"] == eager_tokens
    assert generate_main([*argv, "--quant", "fp8"]) == 2
    assert "--quant does not apply" in capsys.readouterr().err
    assert generate_main([*argv, "--glue", "inductor"]) == 2
    assert "--glue does not apply" in capsys.readouterr().err


# ---- on the GPU ---------------------------------------------------------------------------------------------------

GPU_LOAD = """
import json, sys
from dflash_compiler.runtime.engine import DEFAULT_PAIR, Engine
engine = Engine.from_artifact(sys.argv[1], device="cuda", strict=True)
tokens = engine.generate({prompt!r}, max_new_tokens={n}).token_ids
watch = engine.artifact.watch
print(json.dumps({{"tokens": tokens, "compiled": watch.compiled, "host_builds": watch.host_builds,
                  "cache_loads": watch.cache_loads}}))
"""


@pytest.mark.gpu
def test_sm90_artifact_loads_on_the_gpu_compiling_nothing():
    """DFLASH_ARTIFACT_SM90 names an artifact built on a host without a GPU (with the GPU's Python minor and
    Triton): a fresh process loads it in strict mode, captures the step graphs and generates, with no Triton
    compilation and no host module built; the tokens are those of the in-memory compile of the same pair."""
    root = os.environ.get("DFLASH_ARTIFACT_SM90")
    if not root:
        pytest.fail("set DFLASH_ARTIFACT_SM90 to an sm90 artifact of the tiny pair (dflash-compile --gpu sm90)")
    doc = json.loads((Path(root) / MANIFEST).read_text())
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    script = textwrap.dedent(GPU_LOAD.format(prompt=PROMPT, n=NEW_TOKENS))
    proc = subprocess.run([sys.executable, "-c", script, root], env=env, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded["compiled"] == [] and loaded["host_builds"] == []
    assert loaded["cache_loads"] >= doc["kernels"]["count"]
    engine = Engine.from_pretrained(
        device="cuda", dtype=doc["dtype"], runtime="batched", max_batch=doc["max_batch"],
        max_seq_len=doc["max_seq_len"],
    )  # fmt: skip
    assert loaded["tokens"] == engine.generate(PROMPT, max_new_tokens=NEW_TOKENS).token_ids
    engine.close()
