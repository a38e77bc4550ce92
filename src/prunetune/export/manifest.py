"""prunetune.json: what an export holds, and sha256 checksums of every file in it."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import PrunetuneError

MANIFEST = "prunetune.json"
FORMAT = 1


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path, info: dict) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    info = dict(info, format=FORMAT, files={str(p.relative_to(folder)): sha256(p) for p in files})
    (folder / MANIFEST).write_text(json.dumps(info, indent=1))


def read_manifest(folder: Path, verify: bool = True) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise PrunetuneError(f"{folder} is not a prunetune export (no {MANIFEST})")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PrunetuneError(f"{path} is corrupt: {exc}") from None
    if info.get("format") != FORMAT:
        raise PrunetuneError(f"{folder}: export format {info.get('format')} is not supported (expected {FORMAT})")
    if verify:
        for rel, digest in info.get("files", {}).items():
            f = folder / rel
            if not f.is_file():
                raise PrunetuneError(f"export {folder} is incomplete: {rel} is missing")
            if sha256(f) != digest:
                raise PrunetuneError(f"export {folder} is corrupt: checksum mismatch for {rel}")
    return info
