"""Ahead-of-time Triton: compile the project's kernels for a named GPU on a machine without it, and load them on
that GPU with no compilation.

cross_compile runs a function that calls the launchers (linear.py, attention.py, ...) on CPU tensors of the real
shapes. Each `kernel[grid](...)` goes through Triton's own `JITFunction.run`, with the launch left out (warmup) and
Triton's driver standing in for the named GPU, so the binder, the specialization (dtypes, 16-byte alignment,
integer divisibility), the options and the cache key are exactly those the JIT computes on that GPU; the launchers
see the GPU's SM count and capability (device.compiling_for) and pick the configurations they would pick there.
The compiled kernels land in `cache_dir`, which is then a valid TRITON_CACHE_DIR, and each gets a KernelRecord whose
spec is what `JITFunction.preload` takes (the building host's libdevice path dropped from its options: the hash
uses the file's content, which the GPU's copy shares).

Triton's cache key hashes its own compiled library, which differs between Python minor versions: the cache is
hash-identical to the GPU's only when built with the GPU's Python minor version and Triton wheel
(record_versions/check_versions). load_precompiled points Triton at the cache, preloads every record and watches
compilations from then on; in strict mode a kernel that would be compiled raises instead.

Triton also needs host code it builds with the C compiler at first use and keeps in the cache dir: its CUDA
utilities module and (Triton 3.6) a launcher per kernel signature. cross_compile builds them too (host_modules),
linked against a stand-in libcuda.so.1 that only names the library, so the GPU host can load without a C compiler;
the watch counts any that are built after all (CompileWatch.host_builds).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import hashlib
import importlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.compiler.compiler import ASTSource, make_backend
from triton.runtime.autotuner import OutOfResources
from triton.runtime.cache import get_cache_key
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from dflash_compiler.codegen.triton.device import GpuFacts, compiling_for
from dflash_compiler.errors import DFlashError
from dflash_compiler.hw_profiles import load_profile

ARCHS = (80, 90, 100, 120)
SPEC_VERSION = 1


@dataclasses.dataclass(frozen=True)
class KernelRecord:
    """One compiled specialization of a @triton.jit kernel."""

    name: str  # module.qualname of the kernel
    arch: int  # compute capability as Triton writes it (90 = sm_90)
    cache_hash: str  # sha256 hex of Triton's cache key; the entry is <cache_dir>/<base32 of it>/
    binary: str  # the cubin, relative to the cache dir
    shared: int  # bytes of shared memory per program
    spec: str  # JSON for JITFunction.preload

    @property
    def entry(self) -> str:
        return _cache_entry(self.cache_hash)


def _cache_entry(sha_hex: str) -> str:
    return base64.b32encode(bytes.fromhex(sha_hex)).decode().rstrip("=")


class _StandInDriver(DriverBase):
    """Triton's driver for a GPU that is not there: the target is the named one; device 0, stream 0."""

    def __init__(self, arch: int):
        super().__init__()
        self.target = GPUTarget("cuda", arch, 32)

    @classmethod
    def is_active(cls):
        return False

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("no launcher is built for a stand-in GPU")

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def get_benchmarker(self):
        raise NotImplementedError("a stand-in GPU runs nothing")


@contextlib.contextmanager
def stand_in_gpu(arch: int, *, private_caches: bool = True, after_compile=None):
    """Triton's driver answers for the named GPU, and `kernel[grid](...)` goes through JITFunction.run with the
    launch left out (nothing can run on a GPU that is not there); after_compile(kernel_fn, compiled) sees each.

    private_caches: kernels get in-memory caches of their own for the stand-in GPU, and their own caches are
    restored afterwards (so a real GPU's are left alone); False shares them, as a load on that GPU would.
    """
    previous = driver._active  # read raw: resolving the active driver fails on a host without a GPU
    driver.set_active(_StandInDriver(arch))
    saved: dict[JITFunction, object] = {}
    original_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if private_caches and self not in saved:
            saved[self] = self.device_caches
            self.device_caches = defaultdict(self.create_binder)
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        if after_compile is not None:
            after_compile(self, kernel)
        return kernel

    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = original_run
        for fn, caches in saved.items():
            fn.device_caches = caches
        driver.set_active(previous)


def _portable_spec(specialization_data: str) -> str:
    spec = json.loads(specialization_data)
    spec["options"].pop("extern_libs", None)
    return json.dumps(spec)  # key order kept: the signature's is the parameters'


def cross_compile(
    launch: Callable[[], None],
    arch: int,
    cache_dir: str | os.PathLike,
    *,
    sm_count: int,
    max_shared_memory: int | None = None,
    host_modules: bool = True,
) -> list[KernelRecord]:
    """Compile, for GPUTarget("cuda", arch, 32), every kernel specialization that `launch` would launch.

    launch calls the project's launchers on CPU tensors; no kernel runs. sm_count (and the capability from arch)
    is what the launchers see as the device's. max_shared_memory (bytes per block, opt-in), if given, makes a
    kernel that needs more raise OutOfResources as its launch would on the GPU, so a launcher's fallback runs.
    host_modules: also build Triton's host modules for these kernels into the cache (needs a C compiler here).
    Returns one record per distinct specialization, in launch order.
    """
    if arch not in ARCHS:
        raise DFlashError(f"arch: {arch} is not one of {', '.join(map(str, ARCHS))}")
    if knobs.runtime.interpret:
        raise DFlashError("TRITON_INTERPRET: cross-compilation needs Triton's compiler; unset TRITON_INTERPRET")
    cache_dir = Path(cache_dir).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    records: list[KernelRecord] = []
    specs: list[str] = []
    compiled = []

    def record_spec(*, compile, **_):
        specs.append(compile["specialization_data"])
        return None

    def after_compile(fn, kernel):
        if len(specs) > len(records):  # compiled just now (a repeated specialization is already in memory)
            compiled.append(kernel)
            records.append(
                KernelRecord(
                    name=f"{fn.fn.__module__}.{fn.fn.__qualname__}",
                    arch=arch,
                    cache_hash=kernel.hash,
                    binary=str(Path(kernel.metadata_group[f"{kernel.src.name[:150]}.cubin"]).relative_to(cache_dir)),
                    shared=kernel.metadata.shared,
                    spec=_portable_spec(specs[-1]),
                )
            )
        if max_shared_memory is not None and kernel.metadata.shared > max_shared_memory:
            raise OutOfResources(kernel.metadata.shared, max_shared_memory, "shared memory")

    with contextlib.ExitStack() as stack:
        stack.enter_context(knobs.cache.scope())
        stack.enter_context(knobs.runtime.scope())
        stack.enter_context(knobs.compilation.scope())
        knobs.cache.dir = str(cache_dir)
        # an installed CompileWatch (a loaded artifact) is not told of these compilations, nor can it refuse them
        knobs.runtime.jit_cache_hook = None
        knobs.compilation.listener = None
        knobs.runtime.jit_post_compile_hook = record_spec
        stack.enter_context(stand_in_gpu(arch, after_compile=after_compile))
        stack.enter_context(compiling_for(GpuFacts((arch // 10, arch % 10), sm_count, max_shared_memory)))
        launch()
        if not records:
            raise DFlashError("launch: it launched no Triton kernel")
        if host_modules:
            _build_host_modules(compiled)
    return records


def _build_host_modules(kernels: list) -> None:
    """Triton's CUDA utilities and per-signature launchers for `kernels`, built by Triton's own code into the
    current cache dir. The build links against a stand-in libcuda.so.1, so the import Triton then tries fails
    here (no CUDA symbols) after the module is stored; on the GPU host the same key finds it and loads it."""
    from triton.backends.nvidia import driver as nvidia
    from triton.runtime import build as triton_build

    cc = knobs.build.cc or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise DFlashError("host_modules: no C compiler here (set CC, or build without host modules)")
    with tempfile.TemporaryDirectory() as stub_dir, knobs.nvidia.scope(), knobs.build.scope():
        stub = Path(stub_dir)
        (stub / "empty.c").write_text("")
        subprocess.run(
            [
                cc,
                str(stub / "empty.c"),
                "-shared",
                "-fPIC",
                "-Wl,-soname,libcuda.so.1",
                "-o",
                str(stub / "libcuda.so.1"),
            ],
            check=True,
            capture_output=True,
        )
        knobs.nvidia.libcuda_path = stub_dir
        # The stand-in defines no symbol, so a linker that drops unused libraries (--as-needed, some distributions'
        # default) would leave libcuda.so.1 out of the modules' dependencies: keep it.
        wrapper = stub / "cc"
        wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(cc)} -Wl,--no-as-needed "$@"\n')
        wrapper.chmod(0o755)
        knobs.build.cc = str(wrapper)
        builds = [lambda: nvidia.CudaUtils.__init__(object.__new__(nvidia.CudaUtils))]
        if hasattr(nvidia, "make_launcher"):  # Triton <= 3.6: a launcher module per kernel signature
            builds += [lambda k=k: nvidia.CudaLauncher(k.src, k.metadata) for k in kernels]
        # Triton remembers the compiler and the libcuda directories it found: forget this call's stand-ins
        # (deleted on return) before and after, so a later build finds its own
        remembered = [getattr(triton_build, "_find_compiler", None), nvidia.libcuda_dirs, nvidia.library_dirs]

        def forget():
            for fn in remembered:
                getattr(fn, "cache_clear", lambda: None)()

        # Triton logs a warning for each module it stored but could not import: expected here
        build_log = logging.getLogger(triton_build.__name__)
        level = build_log.level
        build_log.setLevel(logging.ERROR)
        forget()
        try:
            for build in builds:
                with contextlib.suppress(ImportError):  # stored; it cannot be imported against the stand-in libcuda
                    build()
        finally:
            forget()
            build_log.setLevel(level)


def strip_cache(cache_dir: str | os.PathLike) -> int:
    """Removes from each kernel entry of a cache what a cache hit does not read (the intermediate IRs and the
    source: Triton loads the metadata JSON and the cubin), rewriting its group file. Returns the bytes removed."""
    removed = 0
    for group_file in Path(cache_dir).glob("*/__grp__*.json"):
        children = json.loads(group_file.read_text())["child_paths"]
        if not any(name.endswith(".cubin") for name in children):
            continue  # a host module's entry
        kept = {name: path for name, path in children.items() if name.endswith((".json", ".cubin"))}
        for name in set(children) - set(kept):
            child = group_file.parent / name
            if child.is_file():
                removed += child.stat().st_size
                child.unlink()
        group_file.write_text(json.dumps({"child_paths": kept}))
    return removed


# ---- the architecture in a cubin ---------------------------------------------------------------------------------


def cubin_arch(path: str | os.PathLike) -> str:
    """The SM a cubin is built for, as its ELF says: "sm_80", "sm_90a", "sm_100a", "sm_120a" (cuobjdump -lelf, shipped
    with Triton; the arch-specific "a" is not in e_flags with every ptxas, so the header alone is not enough)."""
    try:
        listing = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "-lelf", str(path)], capture_output=True, text=True, check=True
        ).stdout
    except subprocess.CalledProcessError as e:
        raise DFlashError(f"{path}: cuobjdump cannot read it ({e.stderr.strip()})") from None
    found = re.findall(r"\.(sm_\d+[a-z]?)\.cubin", listing)
    if len(found) != 1:
        raise DFlashError(f"{path}: expected one ELF image, cuobjdump lists {listing.strip()!r}")
    return found[0]


# ---- records on disk ---------------------------------------------------------------------------------------------


def save_records(path: str | os.PathLike, records: list[KernelRecord], versions: dict) -> None:
    """Write the records and the versions they were built with as JSON (via a temporary file, then a rename)."""
    path = Path(path)
    doc = {"spec_version": SPEC_VERSION, "versions": versions, "kernels": [dataclasses.asdict(r) for r in records]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
    os.replace(tmp, path)


def load_records(path: str | os.PathLike) -> tuple[list[KernelRecord], dict]:
    """The records and versions written by save_records; a malformed file raises naming the field."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DFlashError(f"{path}: cannot read kernel records ({e})") from None
    if not isinstance(doc, dict):
        raise DFlashError(f"{path}: expected a JSON object of kernel records")
    if doc.get("spec_version") != SPEC_VERSION:
        raise DFlashError(f"{path}: spec_version {doc.get('spec_version')!r} is not {SPEC_VERSION}")
    types = {f.name: {"str": str, "int": int}[f.type] for f in dataclasses.fields(KernelRecord)}
    records = []
    for i, item in enumerate(doc.get("kernels") or []):
        for name, kind in types.items():
            if not isinstance(item, dict) or name not in item:
                raise DFlashError(f"{path}: kernels[{i}] lacks {name!r}")
            if not isinstance(item[name], kind):
                raise DFlashError(f"{path}: kernels[{i}].{name} is not of type {kind.__name__}")
        records.append(KernelRecord(**{name: item[name] for name in types}))
    if not records:
        raise DFlashError(f"{path}: kernels is empty")
    if not isinstance(doc.get("versions"), dict):
        raise DFlashError(f"{path}: versions missing")
    return records, doc["versions"]


# ---- versions ----------------------------------------------------------------------------------------------------


def record_versions(arch: int = 90) -> dict:
    """What Triton's cache key depends on, and torch: Python minor version, Triton, the ptxas Triton uses for `arch`
    (ptxas_arch), torch (its release, without the build's local tag), and the cache-invalidating TRITON_* settings."""
    import torch
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.backends.nvidia.compiler import get_ptxas_version

    return {
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "triton": triton.__version__,
        "ptxas": re.search(r"V(\d+(?:\.\d+)+)", get_ptxas_version(arch)).group(1),
        "ptxas_arch": arch,
        "torch": torch.__version__.split("+")[0],
        "triton_env": dict(sorted(get_cache_invalidating_env_vars().items())),
    }


def check_versions(recorded: dict) -> None:
    """Raise a one-line DFlashError naming the first library whose version differs from the recorded one."""
    current = record_versions(recorded.get("ptxas_arch", 90))
    for name in ("python", "triton", "ptxas", "torch", "triton_env"):
        if recorded.get(name) != current[name]:
            raise DFlashError(
                f"{name}: the kernels were compiled with {name} {recorded.get(name)!r}, this host has {current[name]!r}"
            )


# ---- loading -----------------------------------------------------------------------------------------------------


def _relocate(cache_dir: Path, records: list[KernelRecord]) -> None:
    """Point each entry's group file at this directory: Triton stores absolute paths in it, those of the host that
    filled the cache, and treats a group whose files it cannot find as a miss."""
    for entry in sorted({r.entry for r in records}):
        folder = cache_dir / entry
        groups = list(folder.glob("__grp__*.json"))
        if not groups:
            raise DFlashError(f"{folder}: missing, or holds no Triton cache entry")
        for group_file in groups:
            try:
                group = json.loads(group_file.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise DFlashError(f"{group_file}: unreadable Triton cache group ({e})") from None
            children = {name: str(folder / name) for name in group["child_paths"]}
            for child in children.values():
                if not os.path.exists(child):
                    raise DFlashError(f"{child}: missing from the precompiled kernels")
            if children != group["child_paths"]:
                tmp = group_file.with_name(group_file.name + ".tmp")
                try:
                    tmp.write_text(json.dumps({"child_paths": children}))
                    os.replace(tmp, group_file)
                except OSError as e:
                    raise DFlashError(f"{group_file}: cannot point it at {folder} ({e.strerror})") from None


def _jit_function(name: str) -> JITFunction:
    module_name, _, qualname = name.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module_name), qualname)
    except (ImportError, AttributeError):
        raise DFlashError(f"kernels: {name} does not exist in this version of the project") from None
    if not isinstance(fn, JITFunction):
        raise DFlashError(f"kernels: {name} is not a compiled Triton kernel here (TRITON_INTERPRET set?)")
    return fn


def _would_compile(jit_function: JITFunction, compile: dict) -> bool:
    """Whether triton.compile would miss the disk cache for this specialization: its own key and lookup."""
    from triton._C.libtriton import get_cache_invalidating_env_vars

    target = driver.active.get_current_target()
    backend = make_backend(target)
    options = {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in json.loads(compile["specialization_data"])["options"].items()
    }
    src = ASTSource(jit_function, compile["signature"], compile["constants"], compile["configs"][0])
    options = backend.parse_options(dict(options, **src.parse_options()))
    key = get_cache_key(src, backend, options, env_vars=get_cache_invalidating_env_vars())
    # FileCacheManager.get_group's test, without creating the entry's directory as a cache manager would
    folder = Path(knobs.cache.dir) / _cache_entry(hashlib.sha256(key.encode()).hexdigest())
    group_file = folder / f"__grp__{src.name[:150]}.json"
    if not group_file.is_file():
        return True
    metadata = json.loads(group_file.read_text()).get("child_paths", {}).get(f"{src.name[:150]}.json")
    return metadata is None or not os.path.exists(metadata)


def _describe(compile: dict) -> str:
    """The constants and argument attributes (16-divisibility of pointers and integers) that key a variant."""
    names = list(compile["signature"])
    attrs = compile["configs"][0] if compile.get("configs") else {}
    marked = [names[k[0]] for k, v in attrs.items() if v] if isinstance(attrs, dict) else []
    consts = {names[k[0]] if isinstance(k, tuple) else k: v for k, v in compile["constants"].items()}
    return f"constants {consts}, divisible by 16: {', '.join(marked) or 'none'}"


class CompileWatch:
    """Counts Triton's kernel compilations (cache misses) and cache loads while installed; strict: a kernel that
    would be compiled raises a DFlashError instead. host_builds lists the host modules Triton has built into the
    cache dir since (C-compiled, not kernels: not refused, only counted)."""

    def __init__(self, strict: bool, cache_dir: Path):
        self.strict = strict
        self.compiled: list[str] = []
        self.cache_loads = 0
        self._cache_dir = cache_dir
        self._modules_at_start = self._host_modules()
        self._previous = (knobs.compilation.listener, knobs.runtime.jit_cache_hook)
        knobs.compilation.listener = self._listen
        knobs.runtime.jit_cache_hook = self._before_compile

    def _listen(self, *, src, metadata, metadata_group, times, cache_hit):
        if cache_hit:
            self.cache_loads += 1
        else:
            self.compiled.append(getattr(src, "name", str(src)))
        if self._previous[0] is not None:
            self._previous[0](
                src=src, metadata=metadata, metadata_group=metadata_group, times=times, cache_hit=cache_hit
            )

    def _before_compile(self, *, fn, compile, **kwargs):
        if self.strict and _would_compile(fn.jit_function, compile):
            raise DFlashError(
                f"{fn.module}.{fn.name}: this specialization ({_describe(compile)}) is not among the precompiled "
                "kernels and would be compiled (strict mode)"
            )
        if self._previous[1] is not None:
            return self._previous[1](fn=fn, compile=compile, **kwargs)
        return None

    def _host_modules(self) -> set[str]:
        return {str(p.relative_to(self._cache_dir)) for p in self._cache_dir.glob("*/*.so")}

    @property
    def host_builds(self) -> list[str]:
        return sorted(Path(p).name for p in self._host_modules() - self._modules_at_start)

    def close(self) -> None:
        knobs.compilation.listener, knobs.runtime.jit_cache_hook = self._previous

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_precompiled(
    cache_dir: str | os.PathLike, specs: list[KernelRecord], strict: bool = True, versions: dict | None = None
) -> CompileWatch:
    """Make this process's Triton JIT use the precompiled kernels: TRITON_CACHE_DIR = cache_dir, then every record
    preloaded into its kernel's in-memory cache (a disk-cache hit each). Returns the installed CompileWatch.

    The GPU must be of the records' architecture; with versions (record_versions() of the build), the libraries
    must match them. Strict: a kernel that would be compiled, now or in any later launch, raises. Call it before
    anything starts Triton's driver, so that the driver's own host module also comes from the cache.
    """
    cache_dir = Path(cache_dir).resolve()
    if versions is not None:
        check_versions(versions)
    _relocate(cache_dir, specs)
    # before the driver starts: it builds (or here, finds) Triton's CUDA utilities module in the cache dir
    knobs.cache.dir = str(cache_dir)
    arch = driver.active.get_current_target().arch
    built_for = {r.arch for r in specs}
    if built_for != {arch}:
        raise DFlashError(f"kernels: compiled for sm_{'/'.join(map(str, sorted(built_for)))}, this GPU is sm_{arch}")
    watch = CompileWatch(strict, cache_dir)
    try:
        for record in specs:
            _jit_function(record.name).preload(record.spec)
    except BaseException:
        watch.close()
        raise
    return watch


# ---- command line (a subprocess with the GPU machine's Python builds the cache) ----------------------------------


def _resolve(target: str) -> Callable[[], None]:
    module_name, _, attr = target.partition(":")
    if not attr:
        raise DFlashError(f"--launch: expected module:function, got {target!r}")
    return getattr(importlib.import_module(module_name), attr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--launch", required=True, help="module:function that calls the launchers on CPU tensors")
    parser.add_argument("--gpu", required=True, help="hardware profile: sm80, sm90, sm100 or sm120")
    parser.add_argument("--device", help="one of the profile's devices (its SM count); default the first listed")
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--records", required=True, help="where the kernel records JSON goes")
    parser.add_argument("--no-host-modules", action="store_true", help="leave Triton's C modules to the GPU host")
    args = parser.parse_args(argv)
    profile = load_profile(args.gpu, args.device)
    if profile.triton_target not in ARCHS:
        raise DFlashError(f"--gpu: profile {profile.name} is not a GPU to compile Triton kernels for")
    records = cross_compile(
        _resolve(args.launch),
        profile.triton_target,
        args.cache_dir,
        sm_count=profile.sm_count,
        max_shared_memory=profile.smem_per_block,
        host_modules=not args.no_host_modules,
    )
    save_records(args.records, records, record_versions(profile.triton_target))
    print(f"{len(records)} kernels compiled for {profile.name} ({profile.device.name}) into {args.cache_dir}")


if __name__ == "__main__":
    main()
