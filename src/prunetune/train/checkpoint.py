"""Resumable checkpoints: one folder per run phase group, written atomically, with sha256 checksums and a
fingerprint of the run configuration (a checkpoint of another configuration is refused)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..errors import PrunetuneError
from ..export.manifest import read_manifest, write_manifest
from ..io import atomic_dir

PAYLOAD = "state.pt"
IGNORED = {("output_dir",), ("train", "resume"), ("train", "save_every"), ("train", "log_every"), ("baseline",)}


def fingerprint(config: dict) -> str:
    """Hash of everything that shapes the trajectory (output folder and logging knobs excluded)."""
    def strip(d, path=()):
        return {k: strip(v, path + (k,)) if isinstance(v, dict) else v for k, v in d.items() if path + (k,) not in IGNORED}

    return hashlib.sha256(json.dumps(strip(config), sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_checkpoint(folder: str | Path, payload: dict, config: dict) -> None:
    with atomic_dir(folder) as tmp:
        torch.save(dict(payload, fingerprint=fingerprint(config)), tmp / PAYLOAD)
        write_manifest(tmp, {"kind": "checkpoint", "phase": payload.get("phase")})


def load_checkpoint(folder: str | Path, config: dict) -> dict | None:
    """The checkpoint's payload, None when there is none; PrunetuneError when corrupt or from another config."""
    folder = Path(folder)
    if not (folder / PAYLOAD).is_file():
        return None
    try:
        read_manifest(folder)
    except PrunetuneError as exc:
        raise PrunetuneError(f"checkpoint refused: {exc}") from None
    try:
        payload = torch.load(folder / PAYLOAD, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a corrupt pickle can raise anything
        raise PrunetuneError(f"checkpoint {folder} is corrupt: {exc}") from None
    if payload.get("fingerprint") != fingerprint(config):
        raise PrunetuneError(f"checkpoint {folder} was written by a run with a different configuration; "
                             "use the same config to resume, or a new --output-dir")
    return payload
