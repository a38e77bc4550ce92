"""prunetune.json: what an export (or checkpoint) holds, and sha256 checksums of every file in it.

Reading refuses a manifest without its file list, entries outside the folder, and (when verifying) files that
the list does not name: everything that is loaded from the folder is covered by a checksum."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path, PurePosixPath

from ..errors import PrunetuneError

MANIFEST = "prunetune.json"
FORMAT = 1
_DIGEST = re.compile(r"[0-9a-f]{64}")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _listing(folder: Path) -> list[Path]:
    """Every file under folder (symlinks included: they are refused by read_manifest), manifest excluded."""
    return sorted(p for p in folder.rglob("*") if (p.is_file() or p.is_symlink()) and p != folder / MANIFEST)


def write_manifest(folder: Path, info: dict) -> None:
    info = dict(info, format=FORMAT, files={p.relative_to(folder).as_posix(): sha256(p) for p in _listing(folder)})
    (folder / MANIFEST).write_text(json.dumps(info, indent=1))


def _safe_entry(folder: Path, rel) -> Path:
    """The file a manifest entry names; refused when it could point outside the folder."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        raise PrunetuneError(f"{folder / MANIFEST} is corrupt: bad file entry {rel!r}")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or rel.startswith("/") or (len(rel) > 1 and rel[1] == ":"):
        raise PrunetuneError(f"{folder / MANIFEST} is refused: file entry {rel!r} points outside the folder")
    f = folder / pure
    if f.is_symlink():
        raise PrunetuneError(f"{folder} is refused: {rel} is a symbolic link")
    return f


def read_manifest(folder: Path, verify: bool = True) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise PrunetuneError(f"{folder} is not a prunetune export (no {MANIFEST})")
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, RecursionError, json.JSONDecodeError) as exc:
        raise PrunetuneError(f"{path} is corrupt: {exc}") from None
    if not isinstance(info, dict):
        raise PrunetuneError(f"{path} is corrupt: not a JSON object")
    if info.get("format") != FORMAT:
        raise PrunetuneError(f"{folder}: export format {info.get('format')} is not supported (expected {FORMAT})")
    files = info.get("files")
    if not isinstance(files, dict) or not files:
        raise PrunetuneError(f"{path} is refused: it has no list of files with checksums")
    entries = {rel: _safe_entry(folder, rel) for rel in files}
    for rel, digest in files.items():
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise PrunetuneError(f"{path} is corrupt: bad checksum for {rel}")
    if verify:
        for rel, f in entries.items():
            if not f.is_file():
                raise PrunetuneError(f"export {folder} is incomplete: {rel} is missing")
            if sha256(f) != files[rel]:
                raise PrunetuneError(f"export {folder} is corrupt: checksum mismatch for {rel}")
        unlisted = [p.relative_to(folder).as_posix() for p in _listing(folder)
                    if p.relative_to(folder).as_posix() not in files]
        if unlisted:
            raise PrunetuneError(f"{folder} is refused: {', '.join(unlisted[:3])} "
                                 f"{'is' if len(unlisted) == 1 else 'are'} not listed in its {MANIFEST} "
                                 "(files added after it was written are not loaded); remove them or re-export")
    return info


def is_export(folder: Path) -> bool:
    """A folder that holds a prunetune export (and may therefore be replaced by a new one)."""
    try:
        info = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, RecursionError, ValueError):
        return False
    return isinstance(info, dict) and info.get("kind", "export") == "export" and "peft" in info
