"""Safe writes: atomic files and folders (temporary sibling, then rename), checks that a target may be written
without destroying what the user owns, and a lock on a run's output folder."""
from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from .errors import PrunetuneError

OLD_SUFFIX = ".prunetune-old"  # the previous version of a folder while atomic_dir swaps in the new one
RUN_MARKER = "prunetune_run.lock"  # marks (and locks) a folder as a prunetune run's output folder


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _orphans(path: Path) -> list[Path]:
    """Temporary siblings of `path` left by a killed writer (mkstemp/mkdtemp add 8 random characters)."""
    return sorted(path.parent.glob(glob.escape(f".{path.name}.") + "?" * 8 + ".tmp"))


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def clean_orphans(path: str | Path) -> None:
    for p in _orphans(Path(path)):
        _remove(p)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_orphans(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def old_version(path: Path) -> Path:
    return path.with_name(f".{path.name}{OLD_SUFFIX}")


def recover_dir(path: str | Path) -> None:
    """Finish a swap that a kill interrupted: if only the previous version exists (killed between the two
    renames of atomic_dir), it becomes current again; if both exist, the previous one is stale."""
    path = Path(path)
    old = old_version(path)
    if not old.is_dir():
        return
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(old, path)


@contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary folder next to `path`; on success it replaces the folder `path` whole. The previous
    version stays on disk (under OLD_SUFFIX) until the new one is in place, so a kill never leaves neither."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PrunetuneError(f"{path} is a file, not a folder; it is not replaced")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        recover_dir(path)
        clean_orphans(path)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as exc:
        raise PrunetuneError(f"cannot write {path}: {_first_line(exc)}") from None
    old = old_version(path)
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.is_dir() and not path.exists():  # failed between the renames: put the previous version back
            os.replace(old, path)
        raise


# ---- targets ---------------------------------------------------------------------------------------------------
def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def probe_writable(folder: Path) -> None:
    """Create and remove a file in `folder` (os.access cannot tell for root or read-only mounts)."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".prunetune-probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise PrunetuneError(f"cannot write in {folder}: {_first_line(exc)}") from None


def check_location(path: str | Path, what: str) -> None:
    """Refuse a target that is a file or lies under a file; the first existing folder on its path must be
    writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PrunetuneError(f"{what} {path} is a file, not a folder")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise PrunetuneError(f"{what} {path} cannot be created: {base} is a file, not a folder")
    if base != path.absolute():
        probe_writable(base)  # the folders will be created there
    else:  # no probe file inside an existing target (a kill would leave it there); the writes themselves check
        for folder in (base, base.parent):  # written into, and atomic replacement renames in the parent
            if not os.access(folder, os.W_OK | os.X_OK):
                raise PrunetuneError(f"cannot write in {folder}: permission denied")


def check_target(path: str | Path, *, what: str, overwrite: bool, replaceable: Callable[[Path], bool],
                 hint: str) -> None:
    """A folder that will be written or replaced: refused when it is a file, under a file, not writable, or
    a non-empty folder that replaceable() does not recognise as ours (unless overwrite)."""
    path = Path(path)
    check_location(path, what)
    if path.is_dir() and not overwrite and any(path.iterdir()) and not replaceable(path):
        raise PrunetuneError(f"{what} {path} is not empty and {hint}; nothing was written. Choose another "
                             f"folder, or pass --overwrite to replace its contents")


# ---- run output folder lock ---------------------------------------------------------------------------------
_HELD: dict[str, tuple[int, list[Path], bool]] = {}  # resolved folder -> (lock fd, folders created, marker created)


def is_run_dir(path: Path) -> bool:
    return (path / RUN_MARKER).is_file()


def lock_run_dir(path: str | Path) -> None:
    """Create the output folder, mark it as a prunetune run folder and hold an exclusive lock on it until the
    process exits or release_run_dirs(): a second run into the same folder is refused."""
    path = Path(path)
    key = str(path.resolve())
    if key in _HELD:  # this process already holds it (a library caller running twice)
        return
    created = []  # the folder and the parents this call creates, deepest first
    p = path.absolute()
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
        marker_created = not (path / RUN_MARKER).exists()
        fd = os.open(path / RUN_MARKER, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise PrunetuneError(f"cannot write the output folder {path}: {_first_line(exc)}") from None
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform: the folder is still marked
        fcntl = None
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}").get("pid", "?")
            except (OSError, ValueError, AttributeError):
                holder = "?"
            os.close(fd)
            raise PrunetuneError(f"output folder {path} is in use by another prunetune run (pid {holder}); "
                                 "wait for it to finish, or choose another --output-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid()}).encode(), 0)
    _HELD[key] = (fd, created, marker_created)


def release_run_dirs() -> None:
    """Drop the locks; a folder that holds nothing but the marker we created (the run failed before writing
    anything) is removed again, so a refused run leaves no trace."""
    for key, (fd, created, marker_created) in list(_HELD.items()):
        os.close(fd)
        path = Path(key)
        try:
            if marker_created and [p.name for p in path.iterdir()] == [RUN_MARKER]:
                (path / RUN_MARKER).unlink()
                for folder in created:
                    folder.rmdir()
        except OSError:
            pass
        del _HELD[key]
