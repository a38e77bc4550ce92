"""Task definitions, loading of GLUE/custom/hub data into plain rows, tokenization and dynamic-padding collate."""
from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..errors import PrunetuneError
from .base import EncodedDataset, Row, Task
from .causal import collate_causal, encode_causal, is_causal_rows, load_causal
from .files import _read_file, _split_file

if TYPE_CHECKING:  # the config layer sits above data/: no runtime import (no cycle)
    from ..config import DataConfig

def _class_label(names: list[str]) -> Callable[[Any], int]:
    """Parser for class labels given as ids ("0"/"1") or as the names themselves."""
    def parse(raw: Any) -> int:
        s = str(raw).strip()
        if s in names:
            return names.index(s)
        number = float(s)
        if not math.isfinite(number):
            raise ValueError(f"not a finite number; expected one of {names} or 0..{len(names) - 1}")
        value = int(number)
        if value != number or not 0 <= value < len(names):
            raise ValueError(f"expected one of {names} or 0..{len(names) - 1}")
        return value
    return parse


def _float_label(raw: Any) -> float:
    value = float(str(raw).strip())
    if not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


# name -> (task, label column, label parser)
_KNOWN: dict[str, tuple[Task, str, Callable[[Any], Any]]] = {
    "sst2": (Task("sst2", ["sentence"], 2, "accuracy", ["negative", "positive"]), "label",
             _class_label(["negative", "positive"])),
    "cola": (Task("cola", ["sentence"], 2, "matthews", ["unacceptable", "acceptable"]), "label",
             _class_label(["unacceptable", "acceptable"])),
    "rte": (Task("rte", ["sentence1", "sentence2"], 2, "accuracy", ["entailment", "not_entailment"]), "label",
            _class_label(["entailment", "not_entailment"])),
    "stsb": (Task("stsb", ["sentence1", "sentence2"], 1, "pearson", None), "score", _float_label),
}
KNOWN_TASKS = sorted(_KNOWN)
_COLA_COLUMNS = ["source", "label", "original_label", "sentence"]  # GLUE CoLA tsv has no header


def sample_path() -> Path:
    """Folder of the bundled SST-2 sample (train.tsv: 4000 rows, dev.tsv: the 872 GLUE dev rows)."""
    return Path(__file__).resolve().parent / "sst2_sample"


def _canonical(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


def _extract(path: Path, columns: list[str], records, text_fields: list[str], label_field: str):
    """[(location, text, text_pair, raw_label)], checking the needed columns exist."""
    _check_fields(text_fields, label_field, str(path))
    for kind, names in (("label", [label_field]), ("text", text_fields)):
        for name in names:
            if name not in columns:
                raise PrunetuneError(f"{kind} column '{name}' not found in {path} (available columns: {', '.join(columns)})")
    out = []
    for where, rec in records:
        missing = [f for f in [*text_fields, label_field] if f not in rec]
        if missing:
            raise PrunetuneError(f"malformed row in {where}: missing field(s) {', '.join(missing)}")
        bad = next((f for f in text_fields if rec[f] is None or isinstance(rec[f], (list, dict))), None)
        if bad is not None:  # str() would train on "None" / "['a', 'b']"
            raise PrunetuneError(f"malformed row in {where}: text field '{bad}' is {rec[bad]!r}, not text")
        texts = [str(rec[f]).strip() for f in text_fields]
        out.append((where, texts[0], texts[1] if len(texts) > 1 else None, rec[label_field]))
    return out


def _check_fields(text_fields: list[str], label_field: str, where: str) -> None:
    if not 1 <= len(text_fields) <= 2:
        raise PrunetuneError(f"data.text_fields takes 1 or 2 column names, got {text_fields}")
    if label_field in text_fields:
        raise PrunetuneError(f"label column '{label_field}' is also a text column (data.text_fields {text_fields}) "
                             f"in {where}: the model would read the answer")


def _rows(items, parse: Callable[[Any], Any]) -> list[Row]:
    rows = []
    for where, text, pair, raw in items:
        try:
            label = parse(raw)
        except (ValueError, TypeError, OverflowError) as exc:
            raise PrunetuneError(f"cannot parse label {raw!r} in {where}: {exc}") from None
        rows.append({"text": text, "text_pair": pair, "label": label})
    return rows


# ---------------------------------------------------------------- label inference (custom / hub)

def _as_number(raw: Any) -> float | None:
    if isinstance(raw, bool):
        return float(raw)
    if isinstance(raw, (int, float)):
        return float(raw)
    try:
        return float(str(raw).strip())
    except ValueError:
        return None


def _infer_labels(items, num_labels: int | None, names: list[str] | None = None):
    """Decide regression vs classification from raw labels; return (parse, num_labels, label_names)."""
    raws = [raw for *_, raw in items]
    for where, *_, raw in items:
        if raw is None or isinstance(raw, (list, dict)) or str(raw).strip() == "":
            raise PrunetuneError(f"cannot parse label {raw!r} in {where}: empty or not a scalar")
    numbers = [_as_number(r) for r in raws]
    if all(n is not None for n in numbers):
        bad = next((i for i, n in enumerate(numbers) if not math.isfinite(n)), None)
        if bad is not None:
            raise PrunetuneError(f"cannot parse label {raws[bad]!r} in {items[bad][0]}: not a finite number")
        if num_labels == 1 or any(not n.is_integer() for n in numbers):
            return _float_label, 1, None
        values = sorted({int(n) for n in numbers})
        if len(values) < 2 and not num_labels:  # nothing to tell apart: a head would learn a constant
            raise PrunetuneError(f"all labels are {raws[0]!r} (in {items[0][0]} and every other row): a classifier "
                                 f"needs 2 or more distinct labels (or data.num_labels: 1 for regression)")
        if values[0] >= 0:  # class ids as given
            if num_labels is None and values[-1] + 1 > 2 * len(values):  # sparse ids: not class ids
                where = items[[int(n) for n in numbers].index(values[-1])][0]
                raise PrunetuneError(
                    f"label {values[-1]} in {where} would make a {values[-1] + 1}-class head for "
                    f"{len(values)} distinct labels; set data.num_labels (1 = regression) if that is meant")
            n = num_labels or max(values[-1] + 1, 2)
            if values[-1] >= n:
                raise PrunetuneError(f"label {values[-1]} is out of range for data.num_labels={n}")
            return (lambda r: int(_as_number(r))), n, names
        mapping = {v: i for i, v in enumerate(values)}  # e.g. -1/1: map sorted values to ids
        return (lambda r: mapping[int(_as_number(r))]), _check_n(len(values), num_labels), [str(v) for v in values]
    if num_labels == 1:
        bad = next(i for i, n in enumerate(numbers) if n is None)
        raise PrunetuneError(f"cannot parse label {raws[bad]!r} in {items[bad][0]}: regression (num_labels=1) needs numbers")
    names = sorted({str(r).strip() for r in raws})
    if len(names) < 2 and not num_labels:  # nothing to tell apart: a head would learn a constant
        raise PrunetuneError(f"all labels are {names[0]!r} (in {items[0][0]} and every other row): a classifier "
                             f"needs 2 or more distinct labels")
    index = {name: i for i, name in enumerate(names)}
    return (lambda r: index[str(r).strip()]), _check_n(len(names), num_labels), names


def _check_n(found: int, num_labels: int | None) -> int:
    if num_labels and found > num_labels:
        raise PrunetuneError(f"found {found} distinct labels but data.num_labels={num_labels}")
    return num_labels or max(found, 2)


# ---------------------------------------------------------------- loaders

def _load_known(key: str, cfg: DataConfig):
    base, label_field, parse = _KNOWN[key]
    if cfg.num_labels is not None and cfg.num_labels != base.num_labels:  # the head is the task's, not the config's
        raise PrunetuneError(f"data.num_labels={cfg.num_labels} does not fit task '{key}' ({base.num_labels} "
                             f"label{'s' if base.num_labels > 1 else ', regression'}); leave it unset or use task 'custom'")
    task = Task(base.name, list(cfg.text_fields or base.text_fields), base.num_labels, base.metric,
                list(base.label_names) if base.label_names else None)
    label_field = cfg.label_field or label_field
    if key == "sst2" and not (cfg.data_dir or cfg.train_file or cfg.dev_file):
        cfg = dataclasses.replace(cfg, data_dir=str(sample_path()))
    splits = []
    for split in ("train", "dev"):
        path = _split_file(cfg, split, allow_any_ext=False)
        columns, records = _read_file(path, _COLA_COLUMNS if key == "cola" and path.suffix.lower() == ".tsv" else None)
        splits.append(_rows(_extract(path, columns, records, task.text_fields, label_field), parse))
    return task, splits[0], splits[1]


def _load_custom(cfg: DataConfig):
    fields = list(cfg.text_fields or [])
    if not 1 <= len(fields) <= 2:
        raise PrunetuneError(f"task 'custom' needs data.text_fields with 1 or 2 column names, got {cfg.text_fields}")
    label_field = cfg.label_field or "label"
    items = []
    for split in ("train", "dev"):
        path = _split_file(cfg, split, allow_any_ext=True)
        columns, records = _read_file(path)
        items.append(_extract(path, columns, records, fields, label_field))
    parse, n, names = _infer_labels(items[0] + items[1], cfg.num_labels)
    task = Task("custom", fields, n, "pearson" if n == 1 else "accuracy", names)
    return task, _rows(items[0], parse), _rows(items[1], parse)


def _load_hub(name: str, cfg: DataConfig):
    parts = name.split("/")
    attempts = [tuple(parts)] if len(parts) <= 2 else [("/".join(parts[:-1]), parts[-1])]
    if len(parts) == 2:
        attempts.append((name,))  # "owner/dataset" repo id
    try:
        import datasets
    except ImportError as exc:
        raise PrunetuneError(f"could not load dataset '{name}': the `datasets` package is missing ({exc})") from None
    ds, first_error = None, None
    for args in attempts:
        try:
            ds = datasets.load_dataset(*args)
            break
        except Exception as exc:  # noqa: BLE001 - any hub/offline/script failure becomes one clear line
            first_error = first_error or exc
            if isinstance(exc, ConnectionError):  # offline: the next spelling would fail (slowly) the same way
                break
    if ds is None:
        msg = " ".join(str(first_error).split())[:300]
        raise PrunetuneError(f"could not load dataset '{name}' from the hub (offline?): "
                             f"{type(first_error).__name__}: {msg}") from None
    dev_split = next((s for s in ("validation", "dev", "test") if s in ds), None)
    if "train" not in ds or dev_split is None:
        raise PrunetuneError(f"dataset '{name}' needs 'train' and 'validation' splits, has {', '.join(ds)}")
    known = _KNOWN.get(_canonical(parts[-1]))
    fields = list(cfg.text_fields or (known[0].text_fields if known else _guess_fields(ds["train"].column_names)))
    label_field = cfg.label_field or "label"
    _check_fields(fields, label_field, name)
    items = []
    for split in ("train", dev_split):
        table = ds[split]
        where = f"{name}[{split}]"
        columns = table.column_names
        for kind, names in (("label", [label_field]), ("text", fields)):
            for col in names:
                if col not in columns:
                    raise PrunetuneError(f"{kind} column '{col}' not found in {where} (available columns: {', '.join(columns)})")
        cols = [table[f] for f in fields]
        items.append([(f"{where} row {i}", str(cols[0][i]).strip(), str(cols[1][i]).strip() if len(cols) > 1 else None, lab)
                      for i, lab in enumerate(table[label_field])])
    feature = ds["train"].features.get(label_field)
    names = list(feature.names) if hasattr(feature, "names") else None
    num_labels = 1 if known and known[0].num_labels == 1 else (cfg.num_labels or (len(names) if names else None))
    parse, n, names = _infer_labels(items[0] + items[1], num_labels, names)
    metric = known[0].metric if known else ("pearson" if n == 1 else "accuracy")
    task = Task(name, fields, n, metric, names)
    return task, _rows(items[0], parse), _rows(items[1], parse)


def _guess_fields(columns: list[str]) -> list[str]:
    for pair in (["sentence1", "sentence2"], ["premise", "hypothesis"], ["question", "sentence"],
                 ["question1", "question2"], ["sentence"], ["text"]):
        if all(c in columns for c in pair):
            return pair
    raise PrunetuneError(f"cannot guess the text columns (have {', '.join(columns)}); set data.text_fields")


def load_task(cfg: DataConfig) -> tuple[Task, list[Row], list[Row]]:
    """Load (task, train_rows, dev_rows) for a GLUE task, a custom file pair or a `datasets` hub name."""
    name = (cfg.task or "").strip()
    key = _canonical(name)
    if "/" not in name and key in _KNOWN:
        task, train, dev = _load_known(key, cfg)
    elif key == "custom":
        task, train, dev = _load_custom(cfg)
    elif key == "causallm":

        task, train, dev = load_causal(cfg)
    elif name:
        task, train, dev = _load_hub(name, cfg)
    else:
        raise PrunetuneError(f"data.task is empty (use one of {', '.join(KNOWN_TASKS)}, custom, causal_lm, or a hub name)")
    for key_, n in (("max_train_samples", cfg.max_train_samples), ("max_eval_samples", cfg.max_eval_samples)):
        if n is not None and n < 1:
            raise PrunetuneError(f"data.{key_} must be >= 1, got {n}")
    if cfg.max_train_samples is not None and cfg.max_train_samples < len(train):
        train = list(train)
        random.Random(0).shuffle(train)
        train = train[: cfg.max_train_samples]
    if cfg.max_eval_samples is not None:
        dev = dev[: cfg.max_eval_samples]
    return task, train, dev


# ---------------------------------------------------------------- tokenization

def encode(rows: list[Row], tokenizer, max_length: int) -> EncodedDataset:
    """Tokenize all rows at once (truncation, no padding); labels stay int (classes) or float (regression).
    Causal-LM rows (prompt/response, see data/causal.py) get token labels with the prompt masked to -100."""
    if not rows:
        return EncodedDataset([])

    if is_causal_rows(rows):
        return encode_causal(rows, tokenizer, max_length)
    texts = [r["text"] for r in rows]
    pairs = [r.get("text_pair") for r in rows]
    if all(p is None for p in pairs):
        pairs = None
    elif any(p is None for p in pairs):
        raise PrunetuneError("rows mix single sentences and sentence pairs; every row needs a text_pair or none does")
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length, padding=False)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    items = [{k: list(enc[k][i]) for k in keys} for i in range(len(rows))]
    for item, row in zip(items, rows):
        label = row["label"]
        item["labels"] = float(label) if isinstance(label, float) else int(label)
    return EncodedDataset(items)


def make_collate(tokenizer) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """Collate fn padding each batch to its longest example; labels long (classes) or float (regression);
    token labels (causal LM) are right-padded with -100."""
    if getattr(tokenizer, "pad_token", None) is None:
        raise PrunetuneError("the tokenizer has no pad token; set one first (e.g. tokenizer.pad_token = tokenizer.eos_token)")
    warned = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(warned, dict):  # silence "use __call__ instead of pad" advice: inputs are pre-tokenized
        warned["Asking-to-pad-a-fast-tokenizer"] = True

    def collate(features: list[dict]) -> dict[str, torch.Tensor]:
        if features and isinstance(features[0].get("labels"), list):
            return collate_causal(features, tokenizer.pad_token_id)
        labels = [f["labels"] for f in features if "labels" in f]
        batch = tokenizer.pad([{k: v for k, v in f.items() if k != "labels"} for f in features], return_tensors="pt")
        batch = dict(batch)
        if labels:
            is_float = any(isinstance(x, float) for x in labels)
            batch["labels"] = torch.tensor(labels, dtype=torch.float if is_float else torch.long)
        return batch

    return collate
