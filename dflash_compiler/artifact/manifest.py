"""The artifact's manifest: what was compiled, with which libraries, for which GPU, and a checksum of every file.

Every top-level field of the manifest has its own sha256 (`field_sha256`), so an edited field is named when the
artifact is loaded; every other file is listed under `files` with its size and sha256.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import DFlashError

MANIFEST = "manifest.json"
ARTIFACT_VERSION = 1


def library_versions() -> dict[str, Any]:
    """The versions an artifact depends on: Python's minor version (Triton's cache keys hash its compiled
    library, which differs between minors), torch's release, Triton and TVM (None where not installed)."""
    import torch

    def installed(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    def tvm_version() -> str | None:
        version = installed("apache-tvm")
        if version is None and importlib.util.find_spec("tvm") is not None:  # on the path without its metadata
            import tvm

            version = tvm.__version__
        return version

    return {
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "torch": torch.__version__.split("+")[0],
        "triton": installed("triton"),
        "tvm": tvm_version(),
    }


def project() -> dict[str, str]:
    return {"name": "dflash-compiler", "version": __version__}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _field_digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def write_manifest(root: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Writes root/manifest.json: fields, the size and sha256 of every other file under root, and each field's
    sha256."""
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel != MANIFEST:
            files[rel] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    doc = {"artifact_version": ARTIFACT_VERSION, **fields, "files": files}
    doc["field_sha256"] = {name: _field_digest(value) for name, value in doc.items()}
    (root / MANIFEST).write_text(json.dumps(doc, indent=1, sort_keys=True))
    return doc


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of an artifact directory, checked against its field checksums and every file's."""
    path = root / MANIFEST
    if not root.is_dir():
        raise DFlashError(f"{root}: not an artifact directory")
    if not path.is_file():
        raise DFlashError(f"{path}: missing (not a dflash-compile artifact, or an unfinished one)")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DFlashError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("field_sha256"), dict):
        raise DFlashError(f"{path}: field 'field_sha256' is missing")
    if doc.get("artifact_version") != ARTIFACT_VERSION:
        raise DFlashError(
            f"{path}: field 'artifact_version' is {doc.get('artifact_version')!r}, not {ARTIFACT_VERSION}"
        )
    sums = doc["field_sha256"]
    for name in sorted(set(doc) | set(sums)):
        if name == "field_sha256":
            continue
        if name not in doc or name not in sums or _field_digest(doc[name]) != sums[name]:
            raise DFlashError(f"{path}: field '{name}' was altered after compilation (its checksum differs)")
    for rel, want in doc["files"].items():
        file = root / rel
        if not file.is_file():
            raise DFlashError(f"{file}: missing from the artifact")
        size = file.stat().st_size
        if size != want["bytes"]:
            raise DFlashError(f"{file}: {size} bytes, the manifest says {want['bytes']} (truncated or altered)")
        if file_sha256(file) != want["sha256"]:
            raise DFlashError(f"{file}: altered (its sha256 differs from the manifest's)")
    return doc


def check_versions(doc: dict[str, Any], root: Path, names: tuple[str, ...]) -> None:
    """A one-line error naming the first library among names whose version differs from the compile's."""
    current = library_versions()
    for name in names:
        built = doc["versions"].get(name)
        if built != current[name]:
            raise DFlashError(
                f"{root / MANIFEST}: compiled with {name} {built}, this host has {name} {current[name]} "
                "(recompile the artifact here, or install the version it was compiled with)"
            )


def replace_dir(tmp: Path, out: Path) -> None:
    """Moves the finished tmp over out (an existing out is replaced only once tmp is complete)."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        import shutil

        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
