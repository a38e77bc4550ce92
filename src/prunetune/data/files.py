"""Reading data files (.tsv/.csv/.json/.jsonl) into records, and finding a split's file."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import PrunetuneError

if TYPE_CHECKING:
    from ..config import DataConfig

_EXTS = (".tsv", ".csv", ".jsonl", ".json")


def _read_file(path: Path, headerless: list[str] | None = None) -> tuple[list[str], list[tuple[str, dict]]]:
    """Return (columns, [(location, record)]) for a .tsv/.csv/.json/.jsonl file; location is "file:line"."""
    if not path.is_file():
        raise PrunetuneError(f"data file not found: {path}")
    ext = path.suffix.lower()
    if ext not in _EXTS:
        raise PrunetuneError(f"unsupported data file type '{ext}' for {path} (use {', '.join(_EXTS)})")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a byte-order mark would glue onto the first column name
    except (OSError, UnicodeDecodeError) as exc:
        raise PrunetuneError(f"cannot read data file {path}: {exc}") from None
    if ext in (".json", ".jsonl"):
        records = _read_json(path, text, ext)
        columns = list(records[0][1]) if records else []
    else:
        columns, records = _read_delimited(path, text, ext, headerless)
    if not records:
        raise PrunetuneError(f"data file {path} is empty (no data rows)")
    return columns, records


_FIELD_LIMIT = 2**31 - 1  # csv's default 131072 characters is less than one long document; C long on every OS


def _read_delimited(path: Path, text: str, ext: str, headerless: list[str] | None):
    if ext == ".tsv":  # GLUE sentences contain quotes: no quoting at all
        reader = csv.reader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(text.splitlines())
    limit = csv.field_size_limit(_FIELD_LIMIT)  # a long text is truncated to max_length later, not an error
    try:
        lines = [(reader.line_num, row) for row in reader if row and any(c.strip() for c in row)]
    except csv.Error as exc:
        raise PrunetuneError(f"malformed row in {path} line {reader.line_num + 1}: {exc}") from None
    finally:
        csv.field_size_limit(limit)
    if not lines:
        return [], []
    first = lines[0][1]
    if headerless and len(first) == len(headerless) and first[1].strip() in ("0", "1"):
        columns = headerless
    else:
        columns = [c.strip() for c in first]
        twice = sorted({c for c in columns if columns.count(c) > 1})
        if twice:  # dict(zip(...)) would silently keep the last of the same-named columns
            raise PrunetuneError(f"header of {path} names column(s) {', '.join(map(repr, twice))} more than once")
        lines = lines[1:]
    records = []
    for lineno, row in lines:
        if len(row) != len(columns):
            raise PrunetuneError(f"malformed row in {path} line {lineno}: expected {len(columns)} columns "
                                 f"({', '.join(columns)}), got {len(row)}")
        records.append((f"{path} line {lineno}", dict(zip(columns, row))))
    return columns, records


def _read_json(path: Path, text: str, ext: str) -> list[tuple[str, dict]]:
    if ext == ".jsonl":
        items = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append((f"{path} line {lineno}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise PrunetuneError(f"malformed row in {path} line {lineno}: invalid JSON ({exc.msg})") from None
    else:
        try:
            data = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as exc:
            raise PrunetuneError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise PrunetuneError(f"{path} must hold a JSON list of objects (or {{\"data\": [...]}})")
        items = [(f"{path} record {i}", rec) for i, rec in enumerate(data, 1)]
    for where, rec in items:
        if not isinstance(rec, dict):
            raise PrunetuneError(f"malformed row in {where}: expected a JSON object, got {type(rec).__name__}")
    return items


def _split_file(cfg: DataConfig, split: str, allow_any_ext: bool) -> Path:
    given = cfg.train_file if split == "train" else cfg.dev_file
    if given:
        return Path(given)
    if not cfg.data_dir:
        raise PrunetuneError(f"task '{cfg.task}' needs data.data_dir (a folder with train.tsv/dev.tsv) "
                             f"or data.train_file and data.dev_file")
    folder = Path(cfg.data_dir)
    stems = ["train"] if split == "train" else ["dev", "validation"]
    exts = _EXTS if allow_any_ext else (".tsv",)
    for stem in stems:
        for ext in exts:
            if (folder / f"{stem}{ext}").is_file():
                return folder / f"{stem}{ext}"
    return folder / f"{stems[0]}.tsv"  # reported as missing by _read_file
