"""Ahead-of-time Triton on the GPU: kernels cross-compiled with no GPU in sight load and run with no compilation.

The build runs in a subprocess that cannot see the GPU (CUDA_VISIBLE_DEVICES empty), with this machine's own
Python and Triton (as an artifact for this GPU must be built); the cache is then moved to another directory, and a
fresh process loads it in strict mode, runs every kernel family at the same tiny shapes, checks the outputs against
their references, and counts Triton's compilations. DFLASH_AOT_PREBUILT=DIR loads what another host built instead
(aot.py's command line with --cache-dir DIR/cache --records DIR/records.json, same Python minor and Triton).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dflash_compiler.codegen.triton import aot
from dflash_compiler.hw_profiles import profile_for_device

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]


def _python(script: str, **env_overrides: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    env.update(env_overrides)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.strip().splitlines()[-1]


LOAD_AND_RUN = """
import json
import torch
import aot_launches
from dflash_compiler.codegen.triton import aot
from dflash_compiler.codegen.triton.fused_ops import rms_norm
from dflash_compiler.errors import DFlashError

records, versions = aot.load_records(r"{records}")
watch = aot.load_precompiled(r"{cache}", records, strict=True, versions=versions)
result = {{"preload": [list(watch.compiled), watch.cache_loads]}}
errors = {{}}
for name, got, ref in aot_launches.every_family("cuda"):
    assert torch.isfinite(got.float()).all(), name
    if ref is not None:
        ref = ref.to(got.device).float()
        errors[name] = ((got.float() - ref).norm() / ref.norm().clamp_min(1e-6)).item()
torch.cuda.synchronize()
result["run"] = [list(watch.compiled), watch.cache_loads]
result["errors"] = errors
result["host_builds"] = watch.host_builds
try:  # a hidden size the build never saw: a new specialization
    x = torch.randn(3, 100, device="cuda", dtype=torch.bfloat16)
    rms_norm(x, torch.ones(100, device="cuda", dtype=torch.bfloat16), 1e-6)
except DFlashError as e:
    result["refused"] = str(e)
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> tuple[Path, Path]:
    """Every kernel family cross-compiled for this GPU by a process that cannot see it; or, with
    DFLASH_AOT_PREBUILT=DIR, the DIR/cache and DIR/records.json that another host built."""
    if prebuilt := os.environ.get("DFLASH_AOT_PREBUILT"):
        return Path(prebuilt, "cache"), Path(prebuilt, "records.json")
    props = torch.cuda.get_device_properties(0)
    profile = profile_for_device(props)
    if profile.triton_target not in aot.ARCHS:
        pytest.skip(f"{profile.name} is not one of the profiles Triton kernels are compiled for")
    out = tmp_path_factory.mktemp("aot")
    cache, records = out / "build", out / "records.json"
    _python(
        f"""
        import torch
        from dflash_compiler.codegen.triton import aot
        assert not torch.cuda.is_available()
        aot.main(['--launch', 'aot_launches:every_family', '--gpu', '{profile.name}', '--device', {props.name!r},
                  '--cache-dir', r'{cache}', '--records', r'{records}'])
        """,
        CUDA_VISIBLE_DEVICES="",
    )
    return cache, records


def _load_and_run(build, tmp_path, **env) -> dict:
    """A fresh process loads a copy of the cache from another directory, strictly, and runs every family."""
    cache, records = build
    loaded = tmp_path / "elsewhere"
    shutil.copytree(cache, loaded)
    kernel_entries = {p.parent.name for p in loaded.glob("*/*.cubin")}
    result = json.loads(_python(LOAD_AND_RUN.format(records=records, cache=loaded), **env))
    assert {p.parent.name for p in loaded.glob("*/*.cubin")} == kernel_entries
    result["kernels"] = len(json.loads(records.read_text())["kernels"])
    return result


def test_precompiled_kernels_load_and_run_with_no_compilation(build, tmp_path):
    result = _load_and_run(build, tmp_path)
    n = result["kernels"]
    assert result["preload"] == [[], n], "a precompiled kernel missed the cache (a version or key mismatch)"
    assert result["run"] == [[], n], "a launch compiled a kernel"
    for name, err in result["errors"].items():
        assert err < 2e-2, f"{name}: relative error {err:.2e}"
    assert set(result["errors"]) >= {"linear_dense", "linear_fp8_channel", "linear_int4_asym", "rms_norm"}
    assert result["refused"].endswith("would be compiled (strict mode)")


def test_precompiled_host_modules_load_without_a_c_compiler(build, tmp_path):
    """Triton's CUDA utilities and launchers come from the build too: with no C compiler the run still works."""
    result = _load_and_run(build, tmp_path, CC="/bin/false")
    assert result["host_builds"] == []
    assert result["run"] == [[], result["kernels"]]
