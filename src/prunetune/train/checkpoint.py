"""Resumable checkpoints: one folder per run phase group, written atomically, checksummed, and never unpickled.

A checkpoint folder holds
- tensors.safetensors: every tensor of the payload, under its path in the payload (e.g. "params/<name>",
  "optimizer/<name>/exp_avg", "rng/torch");
- state.json: everything else as JSON (step, logs, plan, ...), tensors replaced by {"$t": key}; numpy arrays,
  tuples and dicts with non-string keys are tagged so the RNG states round-trip exactly (bit-exact resume);
  plus fingerprints of the configuration, of the data files' content and of the model's files;
- prunetune.json: sha256 of both files.
Any nested dict / list of tensors and JSON-able values can be stored: callers add payload fields freely.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import PrunetuneError
from ..export.manifest import MANIFEST, read_manifest, write_manifest
from ..io import atomic_dir, old_version, recover_dir

TENSORS = "tensors.safetensors"
STATE = "state.json"
LEGACY = "state.pt"  # the pickle format of earlier versions: refused, never loaded
FORMAT = 2
IGNORED = {("output_dir",), ("overwrite",), ("train", "resume"), ("train", "save_every"), ("train", "log_every"),
           ("train", "report_to"), ("train", "logging_dir"), ("train", "tensorboard_dir"), ("baseline",)}
DATA_STEMS = {"train", "dev", "validation"}  # the split files tasks read from data.data_dir
MODEL_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".txt", ".model", ".msgpack"}


def fingerprint(config: dict) -> str:
    """Hash of everything that shapes the trajectory (output folder and logging knobs excluded)."""
    def strip(d, path=()):
        return {k: strip(v, path + (k,)) if isinstance(v, dict) else v for k, v in d.items() if path + (k,) not in IGNORED}

    return hashlib.sha256(json.dumps(strip(config), sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---- content fingerprints --------------------------------------------------------------------------------------
_DIGESTS: dict[tuple, str] = {}  # (path, size, mtime_ns) -> sha256: a file is hashed once per process


def _file_digest(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def data_files(config: dict) -> list[Path]:
    """The local files the data comes from (hub datasets and the bundled sample have none)."""
    d = config.get("data") or {}
    files = [Path(d[k]) for k in ("train_file", "dev_file") if d.get(k)]
    if d.get("data_dir") and Path(d["data_dir"]).is_dir():
        files += [p for p in Path(d["data_dir"]).iterdir() if p.is_file() and p.name.split(".")[0] in DATA_STEMS]
    return sorted({p for p in files if p.is_file()})


def model_files(config: dict) -> list[Path]:
    """The local files of the model: weights, config, tokenizer (a hub id or alias has none here)."""
    m = config.get("model") or {}
    path = Path(str(m.get("name_or_path") or ""))
    if m.get("gguf_file"):
        gguf = Path(m["gguf_file"]) if os.path.isabs(m["gguf_file"]) else path / m["gguf_file"]
        return [gguf] if gguf.is_file() else []
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in MODEL_SUFFIXES and p.suffix != ".gguf")
    return []


def _digest_of(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{_file_digest(f)}\n".encode())
    return h.hexdigest()[:16]


def fingerprints(config: dict) -> dict[str, str]:
    return {"config": fingerprint(config), "data": _digest_of(data_files(config)),
            "model": _digest_of(model_files(config))}


# ---- payload <-> (JSON, tensors) ---------------------------------------------------------------------------------
def _encode(obj, path: str, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, torch.Tensor):
        key = path or "tensor"
        while key in tensors:
            key += "#"
        tensors[key] = obj.detach().cpu().clone().contiguous()  # clone: safetensors refuses shared storage
        return {"$t": key}
    if isinstance(obj, np.ndarray):
        raw = torch.frombuffer(bytearray(obj.tobytes()), dtype=torch.uint8) if obj.size else torch.zeros(0, dtype=torch.uint8)
        return {"$nd": _encode(raw, path, tensors)["$t"], "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"$tuple": [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: _encode(v, f"{path}/{k}" if path else k, tensors) for k, v in obj.items()}
        # non-string keys (e.g. step numbers) or keys that look like our tags: kept as [key, value] pairs
        return {"$dict": [[_encode(k, f"{path}/key{i}", tensors), _encode(v, f"{path}/{k}", tensors)]
                          for i, (k, v) in enumerate(obj.items())]}
    raise TypeError(f"checkpoint payload at '{path}' holds a {type(obj).__name__}, which cannot be stored")


def _decode(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "$t" in obj:
        return tensors[obj["$t"]]
    if "$nd" in obj:
        raw = tensors[obj["$nd"]].numpy().tobytes()
        return np.frombuffer(raw, dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
    if "$tuple" in obj:
        return tuple(_decode(v, tensors) for v in obj["$tuple"])
    if "$dict" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["$dict"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


# ---- save / load -------------------------------------------------------------------------------------------------
def save_checkpoint(folder: str | Path, payload: dict, config: dict) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    body = _encode(payload, "", tensors)
    state = {"format": FORMAT, "fingerprint": fingerprints(config), "payload": body}
    with atomic_dir(folder) as tmp:
        save_file(tensors, str(tmp / TENSORS))
        (tmp / STATE).write_text(json.dumps(state))
        write_manifest(tmp, {"kind": "checkpoint", "phase": payload.get("phase")})


def _current(folder: Path) -> Path | None:
    """The folder to read: the checkpoint, or its previous version when a kill interrupted the swap (the next
    save restores it in place; reading does not move files, so ranks can read concurrently)."""
    def present() -> bool:
        return folder.is_dir() and any((folder / n).exists() for n in (MANIFEST, STATE, TENSORS, LEGACY))

    if present():
        return folder
    old = old_version(folder)
    if old.is_dir():
        return old
    return folder if present() else None  # rank 0 may have just renamed the previous version back


def _read_state(src: Path, folder: Path, config: dict) -> dict:
    """Checked state.json of a checkpoint folder: manifest and checksums, format, fingerprints."""
    if (src / LEGACY).exists():
        raise PrunetuneError(f"checkpoint {folder} is in the old pickle format ({LEGACY}), which is never loaded "
                             "(unpickling can run code); run without --resume, or use a new --output-dir")
    try:
        info = read_manifest(src)
    except PrunetuneError as exc:
        raise PrunetuneError(f"checkpoint refused: {exc}") from None
    if info.get("kind") != "checkpoint" or not {STATE, TENSORS} <= set(info["files"]):
        raise PrunetuneError(f"checkpoint {folder} is refused: its manifest does not list {STATE} and {TENSORS}")
    try:
        state = json.loads((src / STATE).read_text())
    except (OSError, UnicodeDecodeError, RecursionError, json.JSONDecodeError) as exc:
        raise PrunetuneError(f"checkpoint {folder} is corrupt: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("payload"), dict):
        raise PrunetuneError(f"checkpoint {folder} is not a format-{FORMAT} prunetune checkpoint")
    stored, now = state.get("fingerprint"), fingerprints(config)
    stored = stored if isinstance(stored, dict) else {}
    if stored.get("config") != now["config"]:
        raise PrunetuneError(f"checkpoint {folder} was written by a run with a different configuration; "
                             "use the same config to resume, or a new --output-dir")
    for key, what in (("data", "the data files"), ("model", "the model's files")):
        if stored.get(key) != now[key]:
            raise PrunetuneError(f"checkpoint {folder} was written with other content in {what} (same paths, "
                                 f"changed bytes); restore them to resume, or start afresh in a new --output-dir")
    return state


def load_checkpoint(folder: str | Path, config: dict) -> dict | None:
    """The checkpoint's payload, None when there is none; PrunetuneError when corrupt, in the old pickle
    format, or from another configuration / data / model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    src = _current(folder)
    if src is None:
        return None
    state = _read_state(src, folder, config)
    try:
        tensors = load_file(str(src / TENSORS))
        return _decode(state["payload"], tensors)
    except (SafetensorError, OSError, KeyError, TypeError, ValueError, RecursionError) as exc:
        raise PrunetuneError(f"checkpoint {folder} is corrupt: {type(exc).__name__}: {exc}") from None


def checkpoint_folders(root: str | Path) -> list[Path]:
    """Checkpoint folders under root (a run's checkpoints/), including one cut off mid-swap."""
    root = Path(root)
    if not root.is_dir():
        return []
    names = set()
    for p in root.iterdir():
        if not p.is_dir():
            continue
        name = p.name
        if name.startswith(".") and name.endswith(".prunetune-old"):
            name = name[1:-len(".prunetune-old")]
        elif name.startswith("."):
            continue  # temporary folders of an interrupted write
        names.add(name)
    return [root / n for n in sorted(names) if _current(root / n) is not None]


def recover_checkpoints(root: str | Path) -> None:
    """Put back checkpoints whose swap a kill cut short (rank 0, before training: nobody reads them yet)."""
    for folder in checkpoint_folders(root):
        recover_dir(folder)


def check_resumable(root: str | Path, config: dict) -> None:
    """Before any work: --resume needs at least one checkpoint, and every checkpoint must be sound and from this
    configuration, data and model."""
    folders = checkpoint_folders(root)
    if not folders:
        raise PrunetuneError(f"nothing to resume: no checkpoints in {root}; check --output-dir, or run without "
                             "--resume to start afresh")
    for folder in folders:
        _read_state(_current(folder), folder, config)
