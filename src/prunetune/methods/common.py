"""Shared set-up for the methods: data, model + PEFT construction, parameter counting, epoch evaluation."""
from __future__ import annotations

from ..errors import PrunetuneError

import copy
import hashlib
import math
import os
import random
import time
from pathlib import Path
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..arch import Arch, get_arch
from ..config import PEFT_ROLES, RunConfig
from ..data import encode, load_task, make_collate
from ..dist import device as dist_device
from ..dist import init_from_env, is_main, log
from ..models import cap_max_length, check_tokenizer_matches, load_model, load_tokenizer, resolve_model_path
from ..train import PeakMemory, TrainState, evaluate, make_loader
from ..train.checkpoint import check_resumable, load_checkpoint, recover_checkpoints, save_checkpoint
from ..surgery.base import apply_plan
from ..units.structure import PeftStructure

if TYPE_CHECKING:  # the annotation only; data.base is imported lazily where rows are built
    from ..data.base import EncodedDataset


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Context:
    cfg: RunConfig
    task: object
    tokenizer: object
    model_path: str
    train_loader: object
    dev_loader: object
    device: torch.device
    max_length: int  # tokens per example as encoded: data.max_length capped at the model's position limit
    base: object = None  # model-object route: the caller's model, copied (never changed) for each model built

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(len(self.train_loader) / self.cfg.train.grad_accum))

    @property
    def total_steps(self) -> int:
        t = self.cfg.train
        return t.max_steps or max(1, int(round(t.epochs * self.steps_per_epoch)))


def start_run(cfg: RunConfig, export: bool = True) -> None:
    """Before loading anything: refuse an output folder that is a file, unwritable, someone else's (non-empty,
    not a prunetune run, unless cfg.overwrite) or in use by another run; refuse --resume with nothing (sound)
    to resume; then lock the folder."""
    from ..export.save import check_export_target
    from ..io import check_target, is_run_dir, lock_run_dir

    out = Path(cfg.output_dir)
    check_target(out, what="output folder", overwrite=cfg.overwrite, replaceable=is_run_dir,
                 hint="is not a prunetune run folder")
    if export:
        check_export_target(out / "model", cfg.overwrite)
    if cfg.train.resume:
        check_resumable(checkpoint_root_of(cfg), cfg.to_dict())
    if int(os.environ.get("RANK", "0")) == 0:  # only rank 0 writes (dist is not initialised yet)
        lock_run_dir(out)
        recover_checkpoints(checkpoint_root_of(cfg))


def prepare(cfg: RunConfig) -> Context:
    task, train_rows, dev_rows = load_task(cfg.data)
    path = resolve_model_path(cfg.model.name_or_path, cfg.model.gguf_file)  # GGUF: converted once, cached
    tok = load_tokenizer(path)
    # longer inputs would overrun the positions; the config keeps what the user asked (checkpoints fingerprint it)
    max_length = cap_max_length(path, cfg.data.max_length)
    collate = make_collate(tok)
    train_ds = encode(train_rows, tok, max_length)
    dev_ds = encode(dev_rows, tok, max_length)
    init_from_env()
    device = dist_device()
    return Context(cfg, task, tok, path,
                   make_loader(train_ds, collate, cfg.train.batch_size, True, cfg.train.seed),
                   make_loader(dev_ds, collate, cfg.train.eval_batch_size, False, cfg.train.seed), device, max_length)


def default_structure(arch: Arch, cfg: RunConfig) -> PeftStructure:
    """PEFT at every candidate position: LoRA on cfg.peft.targets, or adapters after attention and FFN."""
    p = cfg.peft
    if p.kind == "lora":
        if not arch.peft_targets(p.targets):  # e.g. [gate] on BERT: PEFT would wrap nothing
            from ..errors import PrunetuneError

            have = [r for r in PEFT_ROLES if arch.peft_targets([r])]
            raise PrunetuneError(f"peft.targets {p.targets} match no module of this {arch.family} model "
                                 f"(it has {', '.join(have)})")
        return PeftStructure(lora={n: p.r for n in arch.peft_targets(p.targets)}, lora_alpha=p.alpha,
                             lora_r_base=p.r, lora_dropout=p.dropout)
    return PeftStructure(adapters={n: p.adapter_size for n in adapter_positions(arch)})


def load_base(ctx: Context, plan=None):
    """Fresh seeded base model for the task (sequence classifier, or causal LM for causal_lm tasks), checked
    against the tokenizer, physically pruned first when a plan is given. Returns (HF model, arch). Every method
    builds its models here (Light-PEFT, the baseline, PrunePEFT's supernet and retrain)."""
    cfg = ctx.cfg
    seed_everything(cfg.train.seed)
    if ctx.base is not None:  # a model object: each phase gets its own copy, the caller's stays as it was
        hf = copy.deepcopy(ctx.base)
    else:
        hf = load_model(ctx.model_path, ctx.task.num_labels, causal_lm=getattr(ctx.task, "causal_lm", False),
                        dtype=cfg.model.dtype, pad_token_id=ctx.tokenizer.pad_token_id)
    if ctx.tokenizer is not None:
        check_tokenizer_matches(ctx.tokenizer, hf)
    arch = get_arch(hf)
    if plan is not None:
        apply_plan(hf, arch, plan)
    return hf, arch


def build_model(ctx: Context, structure: PeftStructure | None = None, plan=None):
    """load_base() with a PEFT structure attached (default: everywhere).
    Returns (forward model, HF model, arch, AdapterSet | None)."""
    hf, arch = load_base(ctx, plan)
    model, adapters = (structure or default_structure(arch, ctx.cfg)).build(hf, arch)
    return model, hf, arch, adapters


def adapter_positions(arch: Arch) -> list[str]:
    """Serial adapters after the attention output and after the FFN output of every layer."""
    return [name for layer in arch.layers for name in (layer.o, layer.down)]


def base_param_counts(hf, arch: Arch) -> dict[str, int]:
    """Base (non-PEFT) parameters: whole body, and transformer blocks only."""
    body = blocks = 0
    block_prefix = arch.blocks_prefix + "." if arch.layers and arch.blocks_prefix else ""
    for name, p in hf.named_parameters():
        if "lora_" in name or not name.startswith(arch.body_prefix):
            continue
        body += p.numel()
        if block_prefix and name.startswith(block_prefix):
            blocks += p.numel()
    return {"body": body, "blocks": blocks}


class epoch_evaluator:  # noqa: N801 - used like the function it was: on_epoch_end=epoch_evaluator(...)
    """Dev evaluation at each epoch end; `seconds` is the time it took, so training time can be told apart
    from evaluation time (a search cost ratio compares training with training). The metrics also go to the
    run's metric loggers (train.report_to) as `<run>/dev_<metric>` at the current step."""

    def __init__(self, ctx: Context, state, evals: list):
        self.ctx, self.state, self.evals, self.seconds = ctx, state, evals, 0.0

    def __call__(self, epoch: int) -> None:
        t0 = time.perf_counter()
        metrics = dev_eval(self.ctx, self.state, self.evals, epoch)
        self.seconds += time.perf_counter() - t0
        log(f"  epoch {epoch}: dev {self.ctx.task.metric} = {metrics.get(self.ctx.task.metric):.4f}")


def dev_eval(ctx: Context, state, evals: list, epoch: float) -> dict:
    """Evaluate on the dev set, append the row to `evals` and send the metrics to the run's metric loggers."""
    metrics = evaluate(state.model, ctx.dev_loader, ctx.task, ctx.device)
    evals.append({"epoch": epoch, "step": state.step, **metrics})
    state.metric_logger.log_dict({f"{state.desc}/dev_{k}": v for k, v in metrics.items()
                                  if isinstance(v, (int, float)) and not isinstance(v, bool)}, state.step)
    return metrics


def final_eval(ctx: Context, state, evals: list) -> None:
    """The end-of-schedule dev row, unless the last epoch-end evaluation was already at this step."""
    if ctx.dev_loader is not None and (not evals or evals[-1]["step"] != state.step):
        dev_eval(ctx, state, evals, round(state.epoch, 2))


def summarize_evals(evals: list[dict], metric: str, greater_is_better: bool | None = None) -> dict:
    """Final and best epoch; best = max, or min for lower-is-better metrics (default: from the metric name)."""
    if not evals:
        return {}
    if greater_is_better is None:
        from ..data.metrics import greater_is_better as _direction

        greater_is_better = _direction(metric)
    best = (max if greater_is_better else min)(evals, key=lambda e: e[metric])
    return {"final": evals[-1], "best": best}


def mean_step(times: list[float], skip: int = 2) -> float:
    t = times[skip:] if len(times) > skip + 2 else times
    return float(sum(t) / max(1, len(t)))


def task_info(ctx: Context) -> dict:
    t = ctx.task
    return {"name": t.name, "num_labels": t.num_labels, "metric": t.metric, "label_names": t.label_names,
            "text_fields": t.text_fields, "label_field": ctx.cfg.data.label_field,
            "max_length": ctx.max_length}


def eval_seconds(ctx: Context, model) -> float:
    t0 = time.perf_counter()
    evaluate(model, ctx.dev_loader, ctx.task, ctx.device)
    return time.perf_counter() - t0


def checkpoint_root_of(cfg: RunConfig) -> Path:
    return Path(cfg.output_dir) / "checkpoints"


def checkpoint_root(ctx: Context) -> Path:
    return checkpoint_root_of(ctx.cfg)


@dataclass
class TrainResult:
    """A finished fixed-structure run: the trained model and the metrics (JSON-ready); hf / adapters: the HF
    model inside it and the adapters that train beside it (None for a run restored as done)."""
    model: object
    metrics: dict
    hf: object = None
    adapters: object = None


def train_fixed(ctx: Context, structure: PeftStructure | None = None, plan=None, export_dir: Path | None = None,
                desc: str = "train", checkpoint_dir: Path | None = None) -> dict:
    """Train one fixed PEFT structure (default: everywhere) on the (optionally pruned) base for the full
    schedule, evaluating each epoch. Used for the vanilla baseline and for PrunePEFT's retrain.
    With checkpoint_dir, progress is saved there and train.resume continues from it. The model of a run
    restored as done from its checkpoint is None."""
    cfg = ctx.cfg
    ck = load_checkpoint(checkpoint_dir, cfg.to_dict()) if checkpoint_dir and cfg.train.resume else None
    if ck is not None and ck["phase"] == "done" and export_dir is None:
        return TrainResult(model=None, metrics=dict(ck["result"]))
    model, hf, arch, adapters = build_model(ctx, structure, plan)
    extras = {"adapters": adapters} if adapters is not None else {}
    state = TrainState(model, hf, extras, cfg.train, ctx.train_loader, ctx.total_steps, ctx.device, desc=desc)
    evals: list[dict] = list(ck["evals"]) if ck else []
    if ck is not None:
        state.load_state_dict(ck)

    def save(phase: str = "train", **extra):
        if checkpoint_dir is not None and is_main():
            save_checkpoint(checkpoint_dir, {"phase": phase, **state.state_dict(), "evals": evals, **extra},
                            cfg.to_dict())

    t0 = time.perf_counter()
    evaluator = epoch_evaluator(ctx, state, evals) if cfg.train.eval_each_epoch and ctx.dev_loader is not None else None
    with PeakMemory(ctx.device) as mem:
        state.run(ctx.total_steps - state.step, on_epoch_end=evaluator, on_checkpoint=save)
    wall = time.perf_counter() - t0
    final_eval(ctx, state, evals)
    result = {
        "evals": evals, **summarize_evals(evals, ctx.task.metric), "steps": state.step,
        "step_seconds": mean_step(state.step_times), "train_seconds": wall, "peak_mb": state.memory.peak_mb,
        "train_seconds_no_eval": wall - (evaluator.seconds if evaluator else 0.0), "cuda_peak_mb": mem.peak_mb,
        "trainable_params": state.trainable_count(), "trainable_params_no_head": state.trainable_count(False),
        "base_params": base_param_counts(hf, arch),
        "eval_seconds": eval_seconds(ctx, state.model) if ctx.dev_loader is not None else 0.0,
        "loss_curve": state.history,
    }
    if export_dir is not None and is_main():
        from ..export import save_export
        from ..plan import PruningPlan

        plan = plan or PruningPlan.unpruned(arch, hf.config.model_type)
        from ..report.card import model_card

        save_export(export_dir, hf, plan, ctx.tokenizer, peft_model=model if model is not hf else None,
                    adapters=adapters, task_info=task_info(ctx), overwrite=cfg.overwrite,
                    card=model_card(plan, task_info(ctx), result, method="PrunePEFT" if structure else "PEFT",
                                    base_model=cfg.model.name_or_path))
        result["export"] = str(export_dir)
    save("done", result=result)
    return TrainResult(model=state.model, metrics=result, hf=hf, adapters=adapters)


def save_trained(folder, *, model, hf, plan, adapters=None, tokenizer=None, task_info: dict | None = None,
                 merge: bool = False, overwrite: bool = False) -> Path:
    """A trained model (a PeftModel, or the HF model itself with adapters beside it) as a prunetune export;
    hf None: the HF model inside the PeftModel. Shared by LightResult.save and PruneResult.save."""
    from ..export import save_export

    peft_model = model if hasattr(model, "peft_config") else None
    if hf is None:
        hf = peft_model.base_model.model if peft_model is not None else model
    return save_export(folder, hf, plan, tokenizer, peft_model=peft_model, adapters=adapters, task_info=task_info,
                       merge=merge, overwrite=overwrite)


def peft_inner_model(model):
    """The HF model inside a LoRA PeftModel; anything else is refused with the way to build one."""
    try:
        from peft import PeftModel
        from peft.utils import ModulesToSaveWrapper
    except ImportError:  # pragma: no cover
        raise PrunetuneError("a PeftModel needs peft installed") from None
    hint = "wrap it first with prunetune.with_peft(model, config)"
    if not isinstance(model, PeftModel):
        raise PrunetuneError(f"prunetune needs a LoRA PeftModel here, got {type(model).__name__}: {hint}")
    conf = model.peft_config.get("default")
    if conf is None or getattr(conf, "peft_type", None) is None or str(conf.peft_type.value) != "LORA":
        raise PrunetuneError(f"prunetune needs a LoRA adapter named 'default': {hint}")
    if any(isinstance(m, ModulesToSaveWrapper) for m in model.modules()):
        raise PrunetuneError("prunetune does not support modules_to_save / task_type wrappers (surgery "
                             f"rebuilds the LoRA model); leave the head trainable instead: {hint}")
    return model.base_model.model


# ---- the model-object route: a caller's model and data instead of paths ------------------------------------
class _TorchRows(torch.utils.data.Dataset):
    """A datasets.Dataset seen as rows of tensors / numbers (the columns a model takes)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        return dict(self.ds[int(i)])


def _plain(value):
    """A row's value as the path route encodes it (0-d tensors as numbers), so labels can be stratified."""
    return value.item() if torch.is_tensor(value) and value.ndim == 0 else value


def as_rows(data) -> "EncodedDataset":
    """Any indexable dataset of tokenized rows as an EncodedDataset (PrunePEFT subsamples and splits rows)."""
    from ..data.base import EncodedDataset

    if isinstance(data, EncodedDataset):
        return data
    if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise PrunetuneError(f"PrunePEFT needs rows it can index (a list, torch Dataset or datasets.Dataset), got "
                             f"{type(data).__name__}")
    items = []
    for i in range(len(data)):
        row = data[i]
        if not isinstance(row, dict) or "input_ids" not in row or "labels" not in row:
            raise PrunetuneError("each training row must be a dict with input_ids and labels (attention_mask "
                                 f"optional); row {i} is {type(row).__name__}"
                                 + (f" with keys {sorted(row)}" if isinstance(row, dict) else ""))
        items.append({k: _plain(v) for k, v in row.items()})
    return EncodedDataset(items)


def model_fingerprint(model) -> str:
    """A digest of a model object's config and weights: names it in a warm-up cache key as a path would."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def object_context(cfg: RunConfig, hf, *, train_data, dev_data=None, tokenizer=None, collate_fn=None, task=None,
                   base=None, rows: bool = False) -> Context:
    """The Context of a run on a model object. train_data / dev_data: a DataLoader or a dataset of tokenized rows
    (input_ids, attention_mask, labels), batched with collate_fn, else padding by `tokenizer`, else stacked.
    rows=True (PrunePEFT): the training rows are taken out of a DataLoader and batched by train.batch_size with
    its collate_fn, since the search draws subsets of them. task: a prunetune Task for dev metrics (default:
    accuracy, or pearson for one regression label). base: the model each phase copies (PrunePEFT)."""
    from ..arch import position_limit_of
    from ..data.tasks import Task

    get_arch(hf)  # an unsupported model is refused before anything else
    if cfg.train.resume:
        raise PrunetuneError("train.resume needs a run folder: use the path route (prunetune.light_peft / the CLI) "
                             "for resumable runs")
    collate = collate_fn
    if collate is None and tokenizer is not None:
        collate = make_collate(tokenizer)

    def loader(data, shuffle: bool, batch_size: int):
        if data is None:
            return None
        if isinstance(data, torch.utils.data.DataLoader):
            if not (rows and shuffle):
                return data
            size = data.batch_size or getattr(data.batch_sampler, "batch_size", None)
            if size not in (None, cfg.train.batch_size):
                raise PrunetuneError(f"the training DataLoader batches {size} rows but train.batch_size is "
                                     f"{cfg.train.batch_size}: set train.batch_size={size} or pass the dataset itself")
            return make_loader(as_rows(data.dataset), data.collate_fn, batch_size, True, cfg.train.seed)
        if not hasattr(data, "__len__") or len(data) == 0:
            raise PrunetuneError("train_data / dev_data must be a DataLoader or a non-empty dataset of rows")
        data = _TorchRows(data) if hasattr(data, "with_format") else data  # datasets.Dataset: rows of tensors
        if rows and shuffle:
            data = as_rows(data)
        return make_loader(data, collate, batch_size, shuffle, cfg.train.seed)

    train_loader = loader(train_data, True, cfg.train.batch_size)
    dev_loader = loader(dev_data, False, cfg.train.eval_batch_size)
    num_labels = int(getattr(hf.config, "num_labels", 2))
    task = task or Task(name="custom", text_fields=[], num_labels=num_labels,
                        metric="pearson" if num_labels == 1 else "accuracy")
    name = getattr(hf.config, "_name_or_path", "") or "<model object>"
    return Context(cfg, task, tokenizer, name, train_loader, dev_loader, dist_device(),
                   int(position_limit_of(hf.config) or 0), base=base)
