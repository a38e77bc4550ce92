"""Light-PEFT inside an ordinary `transformers.Trainer` run: `LightPeftCallback`.

The callback runs the same phase functions as prunetune's own loop (methods/light_peft.py): `Window`,
`mask_l1`'s gradient, `score_step`, `plan_from_scores`, `prune` and the optimizer-state `carry_state`. Where the
Trainer's loop differs, the callback makes it equivalent:

* the L1 term of the masks cannot be added to the Trainer's loss: its exact gradient lambda * sign(m) is added to
  the mask gradients before the optimizer step (the masks are not model parameters: the Trainer neither clips
  nor zeroes them; prunetune's loop does not clip them either);
* the Trainer clips gradients before `on_pre_optimizer_step`: during the estimation window every trainable
  model parameter keeps a copy of its accumulated, unclipped gradient (a post-accumulate-grad hook), and the
  scores are taken from those copies;
* surgery runs in place at step t': the Trainer's model object (a PeftModel) gets the pruned LoRA model, its
  optimizer the surviving parameters with their AdamW state sliced, and the mask parameter group leaves the
  optimizer and the LR scheduler, which carry on.

Data-parallel runs are refused (see `_refuse_distributed`), and so is resuming a Trainer checkpoint. With
gradient accumulation the L1 gradient is added once per optimizer step (prunetune's loop adds 1/accum of it per
micro-batch): equal up to rounding.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..arch import get_arch
from ..config import RunConfig, run_config
from ..dist import log
from ..errors import PrunetuneError
from ..methods.common import base_param_counts, peft_inner_model
from ..methods.light_peft import (Estimate, LightResult, Window, check_target, cost_model, path_step,
                                  plan_from_scores, prune, score_step, token_lengths)
from ..scores import ImportanceTracker, StructureMasks
from ..surgery import check_compensable
from ..train.loop import carry_state, grads_finite

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - transformers is a dependency
    TrainerCallback = object


class LightPeftCallback(TrainerCallback):
    """Light-PEFT in a `transformers.Trainer`: masks and importance for the first t' steps, surgery at t', the
    Trainer fine-tunes the pruned model for the rest of its schedule.

    The model given to the Trainer must be a LoRA PeftModel (adapter "default", no modules_to_save wrappers),
    e.g. from `prunetune.with_peft(model, config)`; bottleneck adapters (peft.kind=adapter) are refused, since
    they train outside the model whose parameters the Trainer optimizes (use `light_peft_model` for them). Only `estimate.*` and `prune.*` (and `peft.kind`) of the
    config are used; the schedule, batch size and optimizer come from the TrainingArguments.

    >>> from prunetune import LightPeftCallback
    >>> cb = LightPeftCallback(prune__heads=0.5, estimate__steps=4)
    >>> cb.cfg.prune.heads, cb.plan is None
    (0.5, True)

    After `trainer.train()`: `cb.plan` (PruningPlan), `cb.result()` (LightResult), `cb.save(folder, tokenizer)`
    writes a prunetune export (`prunetune.AutoPrunedModel.from_pretrained(folder)` reloads it); after surgery
    `trainer.save_model(folder)` also writes one, to folder/prunetune (AutoPrunedModel finds it there).
    """

    def __init__(self, config: RunConfig | dict | None = None, **overrides):
        self.cfg = run_config(config, overrides)
        if self.cfg.peft.kind != "lora":
            raise PrunetuneError(f"LightPeftCallback supports peft.kind=lora, not {self.cfg.peft.kind!r}: prunetune's "
                                 "bottleneck adapters train as hooks outside the model the Trainer builds its "
                                 "optimizer from; for adapters use prunetune.light_peft_model(model, data, "
                                 "peft__kind='adapter') or `prunetune light`")
        if self.cfg.prune.cost_probe:
            raise PrunetuneError("LightPeftCallback does not support prune.cost_probe (timed passes outside the "
                                 "Trainer's loop); use the default cost model")
        if self.cfg.prune.gradual > 0:
            raise PrunetuneError("LightPeftCallback does not support prune.gradual (it prunes in one shot at t'); "
                                 "use prunetune.light_peft_model(model, data, ...) or `prunetune light` for the "
                                 "gradual fade")
        if self.cfg.prune.distill > 0:
            raise PrunetuneError("LightPeftCallback does not support prune.distill (the Trainer computes the "
                                 "loss); use prunetune.light_peft_model(model, data, ...) or `prunetune light`")
        self.plan = None
        self.estimate: Estimate | None = None
        self.window: Window | None = None
        self.mask_curve: list[dict] = []
        self.info: dict = {}
        self._model = None
        self._active = False

    # ---- train begin: checks, masks, tracker, the mask parameter group --------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None,
                       train_dataloader=None, processing_class=None, **kwargs):
        if self.plan is not None:
            return  # a later train() call (e.g. resumed) of an already pruned model: nothing left to do
        _refuse_distributed(args)
        if getattr(args, "fp16", False):
            raise PrunetuneError("LightPeftCallback does not support fp16 (its loss scaling would reach the masks' and "
                                 "the window's gradients scaled); use bf16=True or full precision")
        hf = peft_inner_model(model)
        self._model, self.hf, self.arch = model, hf, get_arch(hf)
        device = next(p for p in model.parameters()).device
        dataset = getattr(train_dataloader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__len__"):
            raise PrunetuneError("LightPeftCallback needs a training dataset with a length (t' is a fraction of it)")
        self.window = Window.of(self.cfg, state.max_steps, len(dataset))
        if state.global_step > 0:  # masks, scores and the pruned shapes are not in the Trainer's checkpoints
            raise PrunetuneError(f"the run starts at step {state.global_step}: LightPeftCallback cannot resume a "
                                 "Trainer checkpoint (its masks, window scores and pruned shapes are not in it); "
                                 "start from step 0, or use `prunetune light --resume` for resumable runs")
        self._dataset, self._device, self._tokenizer = dataset, device, processing_class
        self._batch = args.per_device_train_batch_size
        self._accum = args.gradient_accumulation_steps
        self.params_before = base_param_counts(hf, self.arch)
        self.tracker = ImportanceTracker(hf, None, self.cfg.estimate.rank_score)
        # an unreachable target fails before the first step, not at t'
        check_target(cfg=self.cfg, arch=self.arch, peft_ranks=self.tracker.peft_ranks(), cost_of=self._cost_of,
                     body_params=self.params_before["body"], model_type=hf.config.model_type)
        if self.cfg.prune.compensate:  # a model without o / down biases is refused before the first step
            check_compensable(hf, self.arch)
        self.masks = StructureMasks(self.arch).to(device).attach(hf)
        if self.cfg.prune.reconstruct:
            log(f"prune.reconstruct: the window's input moments take {self.masks.moment_bytes() / 2**30:.2f} GiB")
        self._optimizer, self._scheduler = optimizer, lr_scheduler
        if self.cfg.prune.finetune_lr_scale != 1.0 and not isinstance(
                getattr(_inner(lr_scheduler), "base_lrs", None), list):
            raise PrunetuneError("prune.finetune_lr_scale needs an LR scheduler with base_lrs (a torch LRScheduler) "
                                 "to scale after surgery")
        self._add_mask_group(optimizer, lr_scheduler, self.cfg.estimate.mask_lr or args.learning_rate)
        self._token_hook = model.register_forward_pre_hook(self._capture_mask, with_kwargs=True)
        self._snap_hooks: list = []
        self._snap: dict[int, torch.Tensor] = {}
        self._active = True
        self._t0 = time.perf_counter()

    def _cost_of(self, ranks: dict[str, int]):
        """The step-time cost model at this Trainer's batch shape and the training rows' token lengths."""
        return cost_model(cfg=self.cfg, arch=self.arch, peft_ranks=ranks, lengths=token_lengths(self._dataset),
                          batch_size=self._batch, grad_accum=self._accum, device=self._device)

    def _capture_mask(self, _module, args, kwargs):
        self.tracker.token_mask = self.masks.token_mask = kwargs.get("attention_mask")

    def _add_mask_group(self, optimizer, scheduler, mask_lr: float) -> None:
        """The masks train in their own AdamW group (no weight decay, estimate.mask_lr) on the same schedule."""
        opt = _inner(optimizer)
        params = list(self.masks.parameters())
        sched = _inner(scheduler)
        group0 = opt.param_groups[0]
        if sched is not None and hasattr(sched, "lr_lambdas"):  # LambdaLR: lr = base * lambda(step), as it computes
            lr = mask_lr * sched.lr_lambdas[0](sched.last_epoch)
        else:  # another schedule: the first group's current factor
            lr = mask_lr * (group0["lr"] / group0["initial_lr"] if group0.get("initial_lr") else 1.0)
        opt.add_param_group({"params": params, "weight_decay": 0.0, "lr": lr, "initial_lr": mask_lr})
        self._mask_group = opt.param_groups[-1]
        if sched is not None:
            if hasattr(sched, "lr_lambdas"):  # LambdaLR (the Trainer's schedules): the same factor per step
                sched.lr_lambdas.append(sched.lr_lambdas[0])
            if hasattr(sched, "base_lrs"):
                sched.base_lrs.append(mask_lr)
            if getattr(sched, "_last_lr", None) is not None:
                sched._last_lr.append(self._mask_group["lr"])

    # ---- each step ----------------------------------------------------------------------------------
    def on_step_begin(self, args, state, control, **kwargs):
        # unclipped gradients are snapshot from the window on (path importance: from step 0)
        first = 0 if self.cfg.estimate.module_score == "path" else self.window.start
        if self._active and state.global_step >= self.window.start and not self.tracker._handles:
            self.tracker.start()
            # the window's tokens give removed units' means (and second moments, prune.reconstruct)
            self.masks.collect_means = self.cfg.prune.compensate or self.cfg.prune.reconstruct
            self.masks.collect_moments = self.cfg.prune.reconstruct
        if self._active and state.global_step >= first and not self._snap_hooks:
            for p in self._model.parameters():
                if p.requires_grad:
                    self._snap_hooks.append(p.register_post_accumulate_grad_hook(self._snapshot))

    def _snapshot(self, p) -> None:
        """The accumulated gradient after this backward; the last one before the optimizer step is unclipped."""
        self._snap[id(p)] = p.grad.detach().clone()

    @torch.no_grad()
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self._active:
            return
        lam = {"heads": self.cfg.estimate.lambda_heads, "ffn": self.cfg.estimate.lambda_ffn}
        for kind, params in (("heads", self.masks.heads), ("ffn", self.masks.ffn)):
            for m in params:  # the exact gradient of lambda * |m|_1, added once per optimizer step
                l1 = lam[kind] * m.sign()
                m.grad = l1 if m.grad is None else m.grad + l1
        step = state.global_step
        if step >= self.window.start or self.cfg.estimate.module_score == "path":
            clipped = {}
            for p in self._model.parameters():
                if id(p) in self._snap:
                    clipped[id(p)] = p.grad
                    p.grad = self._snap[id(p)]
            try:
                finite = grads_finite([p for g in _inner(self._optimizer).param_groups for p in g["params"]])
                path_step(cfg=self.cfg, tracker=self.tracker, finite=finite)
                if step >= self.window.start:
                    score_step(cfg=self.cfg, masks=self.masks, tracker=self.tracker, finite=finite)
            finally:
                for p in self._model.parameters():
                    if id(p) in clipped:
                        p.grad = clipped[id(p)]
                self._snap.clear()
        if step % max(1, self.cfg.train.log_every) == 0 or step == self.window.steps - 1:
            self.mask_curve.append({"step": step, "heads_mean": _mean(self.masks.heads),
                                    "ffn_mean": _mean(self.masks.ffn)})

    def on_step_end(self, args, state, control, **kwargs):
        if not self._active:
            return
        self.masks.zero_grad(set_to_none=True)  # the Trainer zeroes the model's gradients only
        if state.global_step == self.window.steps:
            self._surgery()

    # ---- surgery at t' --------------------------------------------------------------------------------
    def _surgery(self) -> None:
        model, hf = self._model, self.hf
        self.info["estimation_seconds"] = time.perf_counter() - self._t0
        t1 = time.perf_counter()
        for h in self._snap_hooks:
            h.remove()
        self._snap_hooks.clear()
        self._token_hook.remove()
        names = {id(p): n for n, p in hf.named_parameters()}
        trainable = {n: p.requires_grad for n, p in hf.named_parameters()}
        cfg = self.cfg
        self.estimate = plan_from_scores(
            cfg=cfg, arch=self.arch, model_type=hf.config.model_type, masks=self.masks, tracker=self.tracker,
            window=self.window, body_params=self.params_before["body"], cost_of=self._cost_of)
        self.plan = self.estimate.plan
        self.masks.detach()
        lora = model.peft_config["default"]
        pruned = prune(model=model, hf=hf, arch=self.arch, adapters=None, estimate=self.estimate, r=lora.r,
                       alpha=lora.lora_alpha, dropout=lora.lora_dropout, merge_removed=self.cfg.prune.merge_removed,
                       damp=cfg.prune.reconstruct_damp)
        self.estimate.moments = None  # used: layers x width^2 that the fine-tune does not need
        _transplant(model, pruned.model)
        for n, p in hf.named_parameters():  # the user's choice of what trains (e.g. a frozen head) is kept
            if n in trainable and "lora_" not in n:
                p.requires_grad_(trainable[n])
        self._rebuild_optimizer(names, pruned.ops)
        _save_exports_too(model, self)
        self._active = False
        self.info["surgery_seconds"] = time.perf_counter() - t1

    def _rebuild_optimizer(self, names: dict[int, str], ops: dict) -> None:
        """In place: the mask group leaves the optimizer (and the scheduler); every other group keeps its
        hyperparameters and holds the surviving parameters, their AdamW state sliced like the parameters."""
        opt, sched = _inner(self._optimizer), _inner(self._scheduler)
        old_state = {names[id(p)]: s for p, s in opt.state.items() if id(p) in names}
        named = {n: p for n, p in self.hf.named_parameters() if p.requires_grad}
        i = next(k for k, g in enumerate(opt.param_groups) if g is self._mask_group)
        opt.param_groups.pop(i)
        for key in ("lr_lambdas", "base_lrs", "_last_lr"):
            values = getattr(sched, key, None) if sched is not None else None
            if isinstance(values, list) and len(values) > i:
                values.pop(i)
        scale = self.cfg.prune.finetune_lr_scale  # the schedule carries on from base_lrs scaled by it
        if scale != 1.0:  # on_train_begin refused a scheduler without a base_lrs list for this
            for key in ("base_lrs", "_last_lr"):  # _last_lr: what the Trainer logs for the next step
                values = getattr(sched, key, None)
                if isinstance(values, list):
                    values[:] = [lr * scale for lr in values]
        for g in opt.param_groups:
            g["params"] = [named[names[id(p)]] for p in g["params"] if names.get(id(p)) in named]
            g["lr"] *= scale
        opt.state.clear()
        if self.cfg.estimate.optimizer_state != "reset":
            opt.state.update(carry_state(old_state, named, ops))

    # ---- results ----------------------------------------------------------------------------------------
    def result(self) -> LightResult:
        """The pruned model (the Trainer's own model object), the plan and the estimation figures."""
        if self.plan is None:
            raise PrunetuneError("no plan yet: the Trainer has not reached the end of the estimation phase "
                                 f"(t' = {self.window.steps if self.window else '?'} steps)")
        metrics = {"plan": self.plan.summary(), "estimation_steps": self.window.steps,
                   "total_steps": self.window.total, "mask_curve": self.mask_curve, **self.info,
                   "base_params_before": self.params_before, "base_params": base_param_counts(self.hf, self.arch),
                   "predicted_step_speedup": self.plan.meta.get("allocation", {}).get("predicted_speedup")}
        return LightResult(model=self._model, plan=self.plan, metrics=metrics, hf=self.hf)

    def save(self, folder: str | Path, tokenizer=None, merge: bool = False, overwrite: bool = False) -> Path:
        """Write the pruned model as a prunetune export (reload: prunetune.AutoPrunedModel.from_pretrained)."""
        return self.result().save(folder, tokenizer=tokenizer, merge=merge, overwrite=overwrite)


EXPORT_SUBFOLDER = "prunetune"


def _save_exports_too(model, callback: LightPeftCallback) -> None:
    """After surgery, `model.save_pretrained(folder)` (what `trainer.save_model` calls) writes the LoRA adapter
    as usual and the full prunetune export to folder/prunetune: the adapter alone cannot be reloaded (its base
    is pruned, and the head is not in it). `AutoPrunedModel.from_pretrained(folder)` loads that export."""
    original = model.save_pretrained
    busy = []  # the export itself saves the adapter through save_pretrained: no export inside the export

    def save_pretrained(save_directory, *args, **kwargs):
        original(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True) and not busy:
            busy.append(True)
            try:
                callback.save(Path(save_directory) / EXPORT_SUBFOLDER, tokenizer=callback._tokenizer, overwrite=True)
            finally:
                busy.clear()

    model.save_pretrained = save_pretrained


def _refuse_distributed(args) -> None:
    """Data-parallel Trainer runs are refused: the Trainer wraps the model in DistributedDataParallel before
    any callback runs, and DDP's gradient buckets are built for the parameters it saw then. Surgery replaces
    parameters with smaller ones, which the wrapper (held by the Trainer, out of a callback's reach) cannot
    follow; the masks, outside the wrapped model, would not be averaged across ranks either. Use prunetune's
    own loop (`prunetune light` under torchrun) for DDP: it re-wraps after surgery and is exact."""
    world = getattr(args, "world_size", 1) or 1
    if world > 1 or (torch.distributed.is_available() and torch.distributed.is_initialized()
                     and torch.distributed.get_world_size() > 1):
        raise PrunetuneError(f"LightPeftCallback does not support data-parallel training (world size {world}): "
                             "surgery cannot resize the parameters of the Trainer's DistributedDataParallel "
                             "wrapper; run `prunetune light` under torchrun instead")


def _transplant(old, new) -> None:
    """Make the PeftModel object the Trainer holds carry the pruned LoRA model `new` (same HF model inside)."""
    old.base_model = new.base_model
    for key in ("active_adapter", "peft_type", "_adapters_disabled"):
        if key in new.__dict__:
            old.__dict__[key] = new.__dict__[key]


def _inner(obj):
    """accelerate wraps the optimizer and scheduler: the torch objects inside."""
    name = type(obj).__name__
    if name == "AcceleratedOptimizer":
        return obj.optimizer
    if name == "AcceleratedScheduler":
        return obj.scheduler
    return obj


def _mean(params) -> float:
    return float(sum(float(m.detach().mean()) for m in params) / len(params))
