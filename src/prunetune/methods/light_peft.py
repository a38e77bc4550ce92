"""Light-PEFT: estimate (masks + importance, first t' steps), prune once, fine-tune the smaller model.

Orchestration only: the work lives in scores/, plan.py, surgery/, train/ and export/.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import RunConfig, run_config
from ..dist import all_reduce_sum_, is_main, log, world_size
from ..errors import PrunetuneError
from ..io import atomic_write_text
from ..cost import CostModel, DeviceRates, calibrate, seq_stats
from ..plan import PruningPlan, Scores, allocation_summary, make_plan, make_target_plan
from ..scores import ImportanceTracker, StructureMasks
from ..surgery import base_layer, check_compensable, prune_adapter_model, prune_lora_model, structure_ops
from ..train import PeakMemory, TrainState
from ..train.checkpoint import load_checkpoint, save_checkpoint
from ..train.distill import Distiller
from ..train.memory import StepMemory
from .common import (Context, base_param_counts, build_model, checkpoint_root, epoch_evaluator, eval_seconds,
                     final_eval, mean_step, prepare, start_run, summarize_evals, task_info, train_fixed, TrainResult,
                     peft_inner_model)


def estimation_steps(cfg: RunConfig, total: int, train_rows: int) -> int:
    """t': explicit steps, else a fraction of the schedule (default 5%, 10% for small tasks)."""
    fraction = cfg.estimate.fraction
    if fraction is None:
        fraction = 0.10 if train_rows < cfg.estimate.small_task_rows else 0.05
    steps = cfg.estimate.steps or int(round(fraction * total))
    return max(1, min(steps, total - 1))


def train_vanilla(ctx: Context) -> TrainResult:
    """The baseline: PEFT at every position, same hyperparameters and seed, no pruning."""
    return train_fixed(ctx, desc="vanilla", checkpoint_dir=checkpoint_root(ctx) / "vanilla")


@dataclass
class Window:
    """When Light-PEFT estimates: steps [0, steps) train with masks; importance is accumulated over
    [start, steps); the plan's removed units then fade out over [steps, steps + fade) (prune.gradual); surgery
    runs after step `cut` = steps + fade of `total`."""
    steps: int
    start: int
    total: int
    fade: int = 0

    @property
    def cut(self) -> int:
        return self.steps + self.fade

    @classmethod
    def of(cls, cfg: RunConfig, total: int, train_rows: int) -> "Window":
        est = estimation_steps(cfg, total, train_rows)
        fade = min(int(round(cfg.prune.gradual * total)), max(0, total - 1 - est))
        return cls(steps=est, start=est - max(1, int(round(cfg.estimate.window * est))), total=total, fade=fade)


@dataclass
class Estimate:
    """What the estimation phase leaves: the plan, the mask values to fold into o / down weights
    (prune.fold_masks) as (head masks, ffn masks) of plain lists, else None, the mask values the gradual
    fade starts from (prune.gradual > 0), else None, and the window's mean o / down inputs per layer that
    surgery compensates removed units with (prune.compensate), else None, and their mean x x^T per layer
    (covariance with prune.compensate; (layers, width, width) tensors for o and down) that surgery
    reconstructs with (prune.reconstruct), else
    None. A resumed fine-tune restores the weights surgery produced instead (altered_base)."""
    plan: PruningPlan
    fold_values: tuple[list, list] | None = None
    fade_from: tuple[list, list] | None = None
    means: tuple[list, list] | None = None
    moments: tuple[torch.Tensor, torch.Tensor] | None = None
    mask_values: tuple[list, list] | None = None  # prune.reconstruct: what the hooks applied (used if dropped)


@dataclass
class Pruned:
    """The physically pruned model after surgery: forward model, HF model, the modules outside it that train
    (adapters), and per-parameter slicing ops for the optimizer state."""
    model: torch.nn.Module
    hf: torch.nn.Module
    extras: dict
    ops: dict


@dataclass
class LightResult:
    """A finished Light-PEFT run: the pruned (fine-tuned) model, its plan and the metrics (JSON-ready)."""
    model: torch.nn.Module
    plan: PruningPlan
    metrics: dict
    hf: torch.nn.Module | None = None
    adapters: object = None

    def save(self, folder: str | Path, tokenizer=None, merge: bool = False, overwrite: bool = False,
             task_info: dict | None = None) -> Path:
        """Write a prunetune export of the pruned model (reload: prunetune.AutoPrunedModel.from_pretrained);
        with a tokenizer, AutoTokenizer.from_pretrained(folder) loads it too."""
        from .common import save_trained

        return save_trained(folder, model=self.model, hf=self.hf, plan=self.plan, adapters=self.adapters,
                            tokenizer=tokenizer, task_info=task_info, merge=merge, overwrite=overwrite)


def score_step(*, cfg: RunConfig, masks: StructureMasks, tracker: ImportanceTracker, finite: bool) -> None:
    """One window step's scoring, on unscaled, fully accumulated, not yet clipped gradients (mask gradients
    include the L1 term, which accumulate_taylor takes out). A non-finite step adds nothing."""
    tracker.after_backward(finite=finite)
    masks.accumulate_taylor(cfg.estimate.lambda_heads, cfg.estimate.lambda_ffn, finite=finite)
    masks.commit_inputs(finite=finite)  # prune.compensate: the step's o / down input sums


def path_step(*, cfg: RunConfig, tracker: ImportanceTracker, finite: bool) -> None:
    """Every estimation step from step 0, before the update (module_score=path: what each module's own
    updates buy is summed over the whole phase, not only the window)."""
    if cfg.estimate.module_score == "path":
        tracker.accumulate_path(finite=finite)


def mask_l1(cfg: RunConfig, masks: StructureMasks) -> torch.Tensor:
    """The Light-PEFT sparsity term lambda_A |m_A|_1 + lambda_F |m_F|_1 added to the loss while estimating."""
    h, f = masks.l1()
    return cfg.estimate.lambda_heads * h + cfg.estimate.lambda_ffn * f


def plan_from_scores(*, cfg: RunConfig, arch, model_type: str, masks: StructureMasks, tracker: ImportanceTracker,
                     window: Window, cost_of, body_params: int) -> Estimate:
    """Estimation -> plan (shared by prunetune's loop and the Trainer callback): finalize the window's scores,
    make the plan (fixed ratios or target mode) and its allocation report. cost_of(peft_ranks) -> CostModel."""
    tracker.stop()
    masks.collect_means = masks.collect_moments = False  # before cost_of: the probe's passes go through the hooks
    means = masks.input_means() if cfg.prune.compensate else None
    # CPU copies; the device's sums (layers x width^2) are freed
    moments = masks.take_moments(centered=cfg.prune.compensate) if cfg.prune.reconstruct else None
    for name, got in (("compensate", means), ("reconstruct", moments)):
        if getattr(cfg.prune, name) and got is None:
            raise PrunetuneError(f"prune.{name}: no training token reached the masks during the estimation window")
    if tracker.rank_n == 0:  # nothing to rank PEFT modules by: a plan would drop them all
        raise PrunetuneError(f"none of the {window.steps - window.start} steps of the estimation window could be "
                             "scored (non-finite gradients: fp16 overflow or divergence); lower train.lr, use "
                             "train.mixed_precision=bf16, or widen estimate.window")
    norm_ratio, rank_imp = tracker.finalize()
    module_taylor = tracker.module_taylor()
    path_modules, path_ranks = tracker.path_scores()
    module_imp = {"taylor": module_taylor, "norm_ratio": norm_ratio, "path": path_modules}[cfg.estimate.module_score]
    if cfg.estimate.module_score == "path":  # ranks by what they bought too (the point Taylor term is ~0 early)
        rank_imp = path_ranks
    head_vals, ffn_vals = masks.head_values(), masks.ffn_values()
    head_scores, ffn_scores = masks.structure_scores(cfg.estimate.structure_score)
    scores = Scores(head=head_scores, ffn=ffn_scores, module=module_imp, rank=rank_imp)
    p = cfg.prune
    cost = cost_of({n: len(v) for n, v in rank_imp.items()})
    meta = {"estimation_steps": window.steps, "window_start": window.start, "total_steps": window.total,
            "window_skipped_steps": tracker.skipped,
            "module_importance": module_imp,  # the chosen score; both kept for reports
            "module_norm_ratio": norm_ratio, "module_taylor": module_taylor, "module_path": path_modules,
            "rank_importance": {k: v.tolist() for k, v in rank_imp.items()},
            "structure_score": cfg.estimate.structure_score,
            "module_score": cfg.estimate.module_score,
            "head_masks": [m.tolist() for m in head_vals],
            "head_taylor": [m.tolist() for m in masks.taylor_values()[0]],
            "ffn_mask_summary": [[float(m.min()), float(m.mean()), float(m.max())] for m in ffn_vals],
            # canonical roles (q, k, v, o, up, down) for reports, from the arch descriptor
            "peft_roles": {n: [arch.role_of(n)[0], arch.role_label(arch.role_of(n)[1])] for n in rank_imp}}
    if p.target_speedup is not None or p.target_params is not None:  # target mode: joint allocation
        if p.target_speedup is not None and not any(module_imp.values()):
            # LoRA B starts at 0, so its Taylor terms are 0 until B has trained: PEFT removal would look free
            log(f"warning: every PEFT module scored 0 after {window.steps} estimation steps; target mode will "
                "treat removing PEFT modules as free (set estimate.steps higher)")
        plan = _target_plan(cfg=cfg, arch=arch, cost=cost, scores=scores, body_params=body_params,
                            model_type=model_type, meta=meta)
    else:  # the paper's fixed ratios
        plan = make_plan(arch=arch, scores=scores, heads=p.heads, ffn=p.ffn, modules=p.modules, ranks=p.ranks,
                         ffn_scope=p.ffn_scope, ffn_floor=p.ffn_floor, peft_kind=cfg.peft.kind,
                         model_type=model_type, meta=meta)
    plan.meta["allocation"] = allocation_summary(plan, cost=cost, scores=scores)
    values = ([m.tolist() for m in head_vals], [m.tolist() for m in ffn_vals])
    if means is not None or moments is not None:  # what compensation used, for reports and the DDP check
        plan.meta["compensation"] = {"tokens": masks.tokens_seen, "reconstruct": moments is not None}
    if moments is not None:  # per layer: sqrt of the mean diagonal of the moments (RMS, or the std when centred)
        plan.meta["compensation"] |= {
            f"{role}_input_scale": [float(m.diagonal().mean().clamp_min(0).sqrt()) for m in kind]
            for role, kind in (("o", moments[0]), ("down", moments[1]))}
    if means is not None:
        plan.meta["compensation"] |= {
            "o_input_mean_abs": [float(torch.tensor(m).abs().mean()) for m in means[0]],
            "down_input_mean_abs": [float(torch.tensor(m).abs().mean()) for m in means[1]]}
    return Estimate(plan=plan, fold_values=values if p.fold_masks else None,
                    fade_from=values if p.gradual > 0 else None, means=means, moments=moments,
                    mask_values=values if p.reconstruct else None)


def _target_plan(*, cfg: RunConfig, arch, cost: CostModel, scores: Scores, body_params: int, model_type: str,
                 meta: dict | None = None) -> PruningPlan:
    p = cfg.prune
    return make_target_plan(arch=arch, cost=cost, scores=scores, target_speedup=p.target_speedup,
                            target_params=p.target_params, body_params=body_params, uniform=p.ffn_scope == "layer",
                            ffn_floor=p.ffn_floor, peft_kind=cfg.peft.kind, model_type=model_type, meta=meta,
                            bounds=dict(heads=p.max_heads, ffn=p.max_ffn, modules=p.max_modules, ranks=p.max_ranks),
                            backward_cut=p.backward_cut, module_floor=p.min_modules_per_layer)


def check_target(*, cfg: RunConfig, arch, peft_ranks: dict[str, int], cost_of, body_params: int,
                 model_type: str) -> None:
    """Target mode, before the estimation phase trains: refuse a target no plan can reach. Whether one is
    reachable depends on the cost model and the constraints, not on the scores, except for which PEFT module
    the lowest block keeps (prune.backward_cut=false): the check keeps the cheapest, so it refuses only what the
    real plan cannot reach either. cost_of(peft_ranks) -> CostModel, built only in target mode."""
    if not cfg.prune.target_mode:
        return
    cost = cost_of(peft_ranks)
    sec = cost.rates.seconds
    scores = Scores(head=[torch.zeros(arch.num_units) for _ in arch.layers],
                    ffn=[torch.zeros(arch.intermediate_size) for _ in arch.layers],
                    module={m: -sec(cost.module_work(m)) for m in cost.peft_ranks},  # highest = kept = cheapest
                    rank={m: torch.zeros(r) for m, r in cost.peft_ranks.items()})
    _target_plan(cfg=cfg, arch=arch, cost=cost, scores=scores, body_params=body_params, model_type=model_type)


def prune(*, model, hf, arch, adapters, estimate: Estimate, r: int, alpha: float, dropout: float,
          merge_removed: bool = False, damp: float = 0.01) -> Pruned:
    """Surgery (shared by prunetune's loop and the Trainer callback): the physically pruned PEFT model. LoRA:
    a new PeftModel over the same (sliced) HF model (merge_removed: what removed LoRA learned is merged into the
    base first); adapters: sliced in place. estimate.means (prune.compensate): removed units' mean
    contributions go into the o / down biases first; estimate.moments (prune.reconstruct): the kept o / down
    columns absorb the removed ones' predictable part (damp: prune.reconstruct_damp)."""
    fold = [[torch.tensor(v) for v in vals] for vals in estimate.fold_values] if estimate.fold_values else (None, None)
    if adapters is None:
        model, ops = prune_lora_model(model, arch, estimate.plan, r, alpha, dropout, *fold,
                                      merge_removed=merge_removed, means=estimate.means, moments=estimate.moments,
                                      damp=damp, dropped_masks=estimate.mask_values)
        return Pruned(model=model, hf=model.base_model.model, extras={}, ops=ops)
    ops = prune_adapter_model(hf, arch, estimate.plan, adapters, *fold, extras_key="adapters", means=estimate.means,
                              moments=estimate.moments, damp=damp, dropped_masks=estimate.mask_values)
    return Pruned(model=model, hf=hf, extras={"adapters": adapters}, ops=ops)


def altered_base(hf, arch, plan: PruningPlan, *, compensate: bool, merge_removed: bool,
                 reconstruct: bool = False) -> dict[str, torch.Tensor]:
    """Frozen base tensors whose values surgery changed, not only sliced: the o / down biases compensation
    added to, the o / down weights reconstruction updated, the weights removed LoRA was merged into. Fine-tune checkpoints carry them, because a resumed
    run's surgery runs on the untrained model (its LoRA weights at t' are not the ones surgery used)."""
    out: dict[str, torch.Tensor] = {}

    def keep(name: str, attr: str) -> None:
        out[f"{name}.{attr}"] = getattr(base_layer(hf.get_submodule(name)), attr).detach().cpu().clone()

    if compensate or reconstruct:  # the o / down projections the plan slices are those compensation changed
        sliced = structure_ops(arch, plan)
        for name in (n for layer in arch.layers for n in (layer.o, layer.down) if n in sliced):
            for attr in (("bias",) if compensate else ()) + (("weight",) if reconstruct else ()):
                keep(name, attr)
    if merge_removed:
        for name, r in plan.peft_orig_ranks.items():
            if len(plan.peft_ranks.get(name, [])) < r:
                keep(name, "weight")
    return out


@torch.no_grad()
def restore_altered(hf, saved: dict[str, torch.Tensor]) -> None:
    """Put altered_base's tensors back into a resumed run's pruned model."""
    for key, value in saved.items():
        name, attr = key.rsplit(".", 1)
        getattr(base_layer(hf.get_submodule(name)), attr).copy_(value)


class _LightRun:
    """The live objects of one Light-PEFT run of prunetune's own loop (model, masks, tracker, TrainState, the
    checkpoint being resumed and the figures that outlive a restart)."""

    def __init__(self, ctx: Context, model=None, hf=None, arch=None, adapters=None, checkpoints: bool = True):
        cfg = self.cfg = ctx.cfg
        self.ctx, self.checkpoints = ctx, checkpoints
        self.ckpt_dir = checkpoint_root(ctx) / "light"
        self.ck = load_checkpoint(self.ckpt_dir, cfg.to_dict()) if cfg.train.resume else None
        if model is None:
            model, hf, arch, adapters = build_model(ctx)
        self.model, self.hf, self.arch, self.adapters = model, hf, arch, adapters
        self.params_before = base_param_counts(hf, arch)
        if cfg.prune.compensate:  # a model without o / down biases is refused before any step
            check_compensable(hf, arch)
        self.masks = StructureMasks(arch).attach(hf)
        if cfg.prune.reconstruct:
            log(f"prune.reconstruct: the window's input moments take {self.masks.moment_bytes() / 2**30:.2f} GiB")
        extras = {"masks": self.masks, **({"adapters": adapters} if adapters is not None else {})}
        self.window = Window.of(cfg, ctx.total_steps, len(ctx.train_loader.dataset))
        self.state = TrainState(model, hf, extras, cfg.train, ctx.train_loader, ctx.total_steps, ctx.device,
                                mask_lr=cfg.estimate.mask_lr, desc="light-peft")
        self.tracker = ImportanceTracker(hf, adapters, cfg.estimate.rank_score)
        ck = self.ck
        self.evals: list[dict] = list(ck["evals"]) if ck else []
        self.mask_curve: list[dict] = list(ck["mask_curve"]) if ck else []
        self.on_epoch_end = (epoch_evaluator(ctx, self.state, self.evals)
                             if cfg.train.eval_each_epoch and ctx.dev_loader is not None else None)
        self.info: dict = dict(ck["info"]) if ck else {}  # estimation-phase figures that outlive a restart
        self.distiller: Distiller | None = None  # prune.distill: set at surgery
        self.teacher_state: dict = {}
        self.altered: dict = {}  # base tensors surgery changed in value (altered_base), for fine-tune checkpoints
        self.t0 = time.perf_counter() - self.info.get("elapsed", 0.0)

    def save(self, phase: str, **extra) -> None:
        if is_main() and self.checkpoints:
            save_checkpoint(self.ckpt_dir, {"phase": phase, **self.state.state_dict(), "evals": self.evals,
                                            "mask_curve": self.mask_curve, "info": self.info, **extra},
                            self.cfg.to_dict())


def estimate(run: _LightRun) -> Estimate:
    """Phase 1: train with masks for t' steps, scoring over the window; returns the plan (or the one the
    checkpoint being resumed already made)."""
    cfg, ck, state, masks, tracker, win = run.cfg, run.ck, run.state, run.masks, run.tracker, run.window
    if ck is not None and ck["phase"] != "estimate":
        return Estimate(plan=PruningPlan.from_dict(ck["plan"]), fold_values=ck.get("fold_values"),
                        fade_from=ck.get("fade_from"), means=ck.get("means"))
    if ck is not None:
        state.load_state_dict(ck)
        tracker.load_state_dict(ck["tracker"])
        masks.load_score_state(ck["mask_scores"])
    elif not cfg.prune.cost_probe:  # an unreachable target fails now, not after t' steps (probe rates: later)
        check_target(cfg=cfg, arch=run.arch, peft_ranks=tracker.peft_ranks(), body_params=run.params_before["body"],
                     cost_of=lambda ranks: _cost_model(run.ctx, run.arch, ranks), model_type=run.hf.config.model_type)

    def before_forward(batch):
        tracker.token_mask = masks.token_mask = batch.get("attention_mask")
        if state.step >= win.start and not tracker._handles:
            tracker.start()
            # the window's tokens give the removed units' means (and second moments, prune.reconstruct)
            masks.collect_means = cfg.prune.compensate or cfg.prune.reconstruct
            masks.collect_moments = cfg.prune.reconstruct

    def after_backward(step):
        path_step(cfg=cfg, tracker=tracker, finite=state.step_finite)
        if step >= win.start:  # a step the fp16 scaler skips (non-finite gradients) is not scored
            score_step(cfg=cfg, masks=masks, tracker=tracker, finite=state.step_finite)
        if step % max(1, cfg.train.log_every) == 0 or step == win.steps - 1:
            run.mask_curve.append({"step": step, "heads_mean": _mean(masks.heads), "ffn_mean": _mean(masks.ffn)})

    with PeakMemory(run.ctx.device) as mem:
        state.run(win.steps - state.step, extra_loss=lambda: mask_l1(cfg, masks), before_forward=before_forward,
                  after_backward=after_backward, on_epoch_end=run.on_epoch_end, desc="estimate",
                  on_checkpoint=lambda: run.save("estimate", tracker=tracker.state_dict(),
                                                 mask_scores=masks.score_state()))
    probe = run.model if cfg.prune.cost_probe else None
    est = plan_from_scores(cfg=cfg, arch=run.arch, model_type=run.hf.config.model_type, masks=masks,
                           tracker=tracker, window=win, body_params=run.params_before["body"],
                           cost_of=lambda ranks: _cost_model(run.ctx, run.arch, ranks, probe))
    run.info.update(estimation_seconds=time.perf_counter() - run.t0, estimation_peak_mb=state.memory.peak_mb,
                    cuda_estimation_peak_mb=mem.peak_mb)
    return est


def fade_targets(plan: PruningPlan, start: tuple[list, list], fold: bool) -> tuple[list, list]:
    """Where the gradual fade ends: removed heads and neurons at 0, kept ones at 1 (their mask is dropped at
    surgery) or at their own value (prune.fold_masks folds it into o / down): the masked model at the end of
    the fade computes what the pruned one computes."""
    out = []
    for values, kept_lists in zip(start, (plan.kept_heads, plan.kept_neurons)):
        layers = []
        for vals, kept in zip(values, kept_lists):
            t = torch.zeros(len(vals))
            t[list(kept)] = torch.tensor(vals)[list(kept)] if fold else 1.0
            layers.append(t)
        out.append(layers)
    return out[0], out[1]


def fade(run: _LightRun, est: Estimate) -> None:
    """Phase 1b (prune.gradual > 0): the masks are frozen and the plan's removed heads and neurons fade out
    linearly over window.fade steps while everything trains at full size, so the PEFT modules adapt to the
    removal before the cut (one-shot surgery removes a third of the heads between two steps)."""
    win, ck, state, masks = run.window, run.ck, run.state, run.masks
    if win.fade == 0 or (ck is not None and ck["phase"] == "finetune"):
        return
    start = [[torch.tensor(v) for v in vals] for vals in est.fade_from]
    end = fade_targets(est.plan, est.fade_from, run.cfg.prune.fold_masks)
    for p in masks.parameters():  # set by the schedule, not trained (and not saved: a function of the step)
        p.requires_grad_(False)
        p.grad = None
    if ck is not None and ck["phase"] == "fade":
        state.load_state_dict(ck)
    plan_dict = json.loads(est.plan.to_json())

    def before_forward(_batch):
        t = min(1.0, (state.step - win.steps + 1) / win.fade)  # reaches the targets exactly on the last step
        masks.set_(heads=[a + t * (b - a) for a, b in zip(start[0], end[0])],
                   ffn=[a + t * (b - a) for a, b in zip(start[1], end[1])])

    t0 = time.perf_counter()
    state.run(win.cut - state.step, before_forward=before_forward, on_epoch_end=run.on_epoch_end, desc="fade",
              on_checkpoint=lambda: run.save("fade", plan=plan_dict, fold_values=est.fold_values,
                                             fade_from=est.fade_from, means=est.means))
    run.info["fade_seconds"] = run.info.get("fade_seconds", 0.0) + time.perf_counter() - t0


def prune_phase(run: _LightRun, est: Estimate) -> Pruned:
    """Phase 2: masks off, surgery, the TrainState carries on with the smaller model (AdamW state sliced)."""
    cfg, state = run.cfg, run.state
    t1 = time.perf_counter()
    run.masks.detach()
    r, alpha, dropout = cfg.peft.r, cfg.peft.alpha, cfg.peft.dropout
    lora = getattr(run.model, "peft_config", {}).get("default") if run.adapters is None else None
    if lora is not None:  # a PeftModel given by the caller: its own LoRA hyperparameters
        r, alpha, dropout = lora.r, lora.lora_alpha, lora.lora_dropout
    if cfg.prune.distill > 0:  # the teacher: the model as it is now, before surgery slices it
        run.distiller, run.teacher_state = Distiller.of(
            run.model, weight=cfg.prune.distill, temperature=cfg.prune.distill_temperature,
            causal=bool(getattr(run.ctx.task, "causal_lm", False)))
        if run.ck is not None and run.ck["phase"] == "finetune":  # resumed: the rebuilt model has not trained
            run.teacher_state = run.ck["teacher"]
            run.distiller.load_trained(run.teacher_state)
    pruned = prune(model=run.model, hf=run.hf, arch=run.arch, adapters=run.adapters, estimate=est,
                   r=r, alpha=alpha, dropout=dropout, merge_removed=cfg.prune.merge_removed,
                   damp=cfg.prune.reconstruct_damp)
    est.moments = None  # used: layers x width^2 that the fine-tune does not need
    if run.ck is not None and run.ck["phase"] == "finetune":  # resumed: surgery ran on the untrained model
        restore_altered(pruned.hf, run.ck.get("altered", {}))
    run.altered = altered_base(pruned.hf, run.arch, est.plan, compensate=cfg.prune.compensate,
                               reconstruct=cfg.prune.reconstruct,
                               merge_removed=cfg.prune.merge_removed and run.adapters is None)
    # the teacher rides along as a frozen extra: nothing of it trains, but peak_mb counts its weights
    extras = {**pruned.extras, **({"teacher": run.distiller.teacher} if run.distiller is not None else {})}
    state.lr_scale = cfg.prune.finetune_lr_scale  # set before the optimizer is rebuilt: its groups carry base_lr
    state.set_model(pruned.model, pruned.hf, extras, pruned.ops, reset=cfg.estimate.optimizer_state == "reset")
    run.model, run.hf = pruned.model, pruned.hf
    state.memory = StepMemory()
    run.info.setdefault("surgery_seconds", time.perf_counter() - t1)
    return pruned


def finetune(run: _LightRun, est: Estimate) -> dict:
    """Phase 3: train the pruned model to the end of the schedule; returns the run's metrics."""
    ctx, state, plan = run.ctx, run.state, est.plan
    plan_dict = json.loads(plan.to_json())
    teacher = {"teacher": run.teacher_state} if run.distiller is not None else {}
    if run.ck is not None and run.ck["phase"] == "finetune":
        state.load_state_dict(run.ck)
    else:
        run.save("finetune", plan=plan_dict, fold_values=est.fold_values, means=est.means, altered=run.altered,
                 **teacher)

    def save_finetune():
        run.info["elapsed"] = time.perf_counter() - run.t0
        run.save("finetune", plan=plan_dict, fold_values=est.fold_values, means=est.means, altered=run.altered,
                 **teacher)

    with PeakMemory(ctx.device) as mem:
        state.run(run.window.total - state.step, on_epoch_end=run.on_epoch_end, desc="fine-tune",
                  on_checkpoint=save_finetune, loss_fn=run.distiller)
    wall = time.perf_counter() - run.t0
    evals, info, n_est, cut = run.evals, run.info, run.window.steps, run.window.cut
    final_eval(ctx, state, evals)
    before, after = run.params_before, base_param_counts(run.hf, run.arch)
    alloc = plan.meta.get("allocation", {})
    return {
        "evals": evals, **summarize_evals(evals, ctx.task.metric),
        "plan": plan.summary(), "estimation_steps": n_est, "fade_steps": run.window.fade,
        "total_steps": run.window.total,
        "step_seconds": mean_step(state.step_times[cut:]),  # the pruned model's steps
        "fade_seconds": info.get("fade_seconds", 0.0),
        "estimation_step_seconds": mean_step(state.step_times[:n_est]),
        "estimation_seconds": info["estimation_seconds"], "surgery_seconds": info["surgery_seconds"],
        "train_seconds": wall, "peak_mb": state.memory.peak_mb, "estimation_peak_mb": info["estimation_peak_mb"],
        "cuda_peak_mb": mem.peak_mb, "cuda_estimation_peak_mb": info["cuda_estimation_peak_mb"],
        "trainable_params": state.trainable_count(), "trainable_params_no_head": state.trainable_count(False),
        "base_params_before": before, "base_params": after,
        "base_kept_pct": 100.0 * after["body"] / before["body"],
        "block_kept_pct": 100.0 * after["blocks"] / max(1, before["blocks"]),
        "eval_seconds": eval_seconds(ctx, state.model) if ctx.dev_loader is not None else 0.0,
        "loss_curve": state.history, "mask_curve": run.mask_curve,
        "resumed": run.ck is not None,
        "predicted_step_speedup": alloc.get("predicted_speedup"),
        "cost_rates": alloc.get("prediction", {}).get("rates"),
    }


def train_light(ctx: Context, export_dir: Path | None = None, model=None, hf=None, arch=None,
                adapters=None, checkpoints: bool = True) -> LightResult:
    """Estimate for t' steps, prune, fine-tune. Resumes from output_dir/checkpoints/light with train.resume.
    model/hf/arch/adapters: a model built by the caller (default: build_model(ctx)); checkpoints=False writes
    none."""
    run = _LightRun(ctx, model, hf, arch, adapters, checkpoints)
    est = estimate(run)
    fade(run, est)
    prune_phase(run, est)
    metrics = finetune(run, est)
    if export_dir is not None and is_main():
        from ..export import save_export
        from ..report.card import model_card

        save_export(export_dir, run.hf, est.plan, ctx.tokenizer,
                    peft_model=run.model if run.adapters is None else None, adapters=run.adapters,
                    task_info=task_info(ctx), card=model_card(est.plan, task_info(ctx), metrics),
                    overwrite=ctx.cfg.overwrite)
        metrics["export"] = str(export_dir)
    return LightResult(model=run.state.model, plan=est.plan, metrics=metrics, hf=run.hf, adapters=run.adapters)


def _cost_model(ctx, arch, peft_ranks: dict[str, int], probe_model=None) -> CostModel:
    """Step-time model at this run's batch shape (the training rows' real token lengths); with probe_model, its
    rates are fitted to a few timed forward/backward passes of the (still unpruned) model on this device."""
    cfg = ctx.cfg
    timed: list[tuple[int, float]] = []

    def probe(rows):
        seconds, length = _time_passes(ctx, probe_model, rows)
        timed.append((rows, seconds))
        return seconds, length

    cost = cost_model(cfg=cfg, arch=arch, peft_ranks=peft_ranks, lengths=token_lengths(ctx.train_loader.dataset),
                      batch_size=cfg.train.batch_size, grad_accum=cfg.train.grad_accum, device=ctx.device,
                      probe=probe if probe_model is not None else None)
    if cost.rates.source == "probe-uniform":  # say it: this calibration cannot change the plan or the prediction
        passes = ", ".join(f"{rows} rows {seconds:.3f}s" for rows, seconds in timed)
        log(f"prune.cost_probe: timed passes ({passes}) grow at least as fast as the batch, so no fixed per-op "
            "overhead can be fitted; the probe only rescales every rate by one factor, which leaves the plan and "
            "the predicted speedup as the default rates make them")
    return cost


def token_lengths(dataset) -> list[int]:
    """Real token count of every training row (rows hold input_ids)."""
    return [len(dataset[i]["input_ids"]) for i in range(len(dataset))]


def cost_model(*, cfg: RunConfig, arch, peft_ranks: dict[str, int], lengths: list[int], batch_size: int,
               grad_accum: int, device: torch.device, probe=None) -> CostModel:
    """The step-time cost model for batches of `batch_size` x `grad_accum` rows of these token lengths;
    probe(rows) -> (seconds, padded length) fits the rates to timed passes on this device."""
    seq = seq_stats(lengths, batch_size, grad_accum, seed=cfg.train.seed)
    act = 2 if cfg.train.mixed_precision in ("bf16", "fp16") or cfg.model.dtype != "float32" else 4
    cost = CostModel(arch, seq, peft_ranks, DeviceRates.for_device(device.type), cfg.peft.kind, act,
                     2 if cfg.model.dtype != "float32" else 4)
    if probe is None:
        return cost
    return CostModel(arch, seq, peft_ranks, calibrate(cost, probe), cfg.peft.kind, act, cost.wb)


def _time_passes(ctx, model, rows: int, repeats: int = 3) -> tuple[float, float]:
    """(seconds per forward+backward, padded length) on the first `rows` training rows; RNG and gradients are
    restored so the run continues exactly as without the probe."""
    dataset = ctx.train_loader.dataset
    batch = ctx.train_loader.collate_fn([dataset[i] for i in range(min(rows, len(dataset)))])
    batch = {k: v.to(ctx.device) for k, v in batch.items()}
    rng = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad for p in params]
    times = []
    model.train()
    for i in range(repeats + 1):  # the first pass warms up allocators and kernels
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        if i:
            times.append(time.perf_counter() - t0)
    for p, g in zip(params, grads):
        p.grad = g
    torch.set_rng_state(rng[0])
    if rng[1] is not None:
        torch.cuda.set_rng_state_all(rng[1])
    # every DDP rank must fit the same rates (target-mode plans must agree): the mean of the ranks' medians
    median = all_reduce_sum_(torch.tensor([sorted(times)[len(times) // 2]], dtype=torch.float64, device=ctx.device))
    return float(median[0]) / world_size(), float(batch["input_ids"].shape[1])


def _mean(params) -> float:
    return float(sum(float(m.detach().mean()) for m in params) / len(params))


def run(cfg: RunConfig, export: bool = True) -> dict:
    """The full Light-PEFT job (plus the vanilla baseline when cfg.baseline); writes results to cfg.output_dir."""
    out = Path(cfg.output_dir)
    start_run(cfg, export)
    ctx = prepare(cfg)
    log(f"prunetune light: {ctx.model_path} on {ctx.task.name} — {len(ctx.train_loader.dataset)} train / "
          f"{len(ctx.dev_loader.dataset)} dev rows, {ctx.total_steps} steps on {ctx.device}")
    results: dict = {"config": cfg.to_dict(), "task": task_info(ctx)}
    if cfg.baseline:
        log("[1/2] vanilla PEFT baseline (same hyperparameters)")
        results["vanilla"] = train_vanilla(ctx).metrics
    log(f"[{2 if cfg.baseline else 1}/{2 if cfg.baseline else 1}] Light-PEFT")
    done = train_light(ctx, out / "model" if export else None)
    plan, light = done.plan, done.metrics
    results["light_peft"] = light
    if "vanilla" in results:  # measured next to predicted (the cost model predicts against unpruned PEFT)
        light["measured_step_speedup"] = results["vanilla"]["step_seconds"] / max(light["step_seconds"], 1e-12)
    if not is_main():
        return results
    out.mkdir(parents=True, exist_ok=True)
    plan.save(out / "plan.json")
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=str))
    from ..report import summary_table, write_report

    write_report(out, results, plan)
    log(summary_table(results))
    return results


# ---- the model-object API ----------------------------------------------------------------------------------
def with_peft(model, config: RunConfig | dict | None = None, **overrides):
    """The LoRA PeftModel prunetune trains: LoRA on config.peft.targets (r, alpha, dropout from config.peft),
    the task head trainable in full. Seeded with train.seed (LoRA A's initialisation).

    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> import prunetune
    >>> tiny = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
    ...                   intermediate_size=32, max_position_embeddings=32)
    >>> peft_model = prunetune.with_peft(BertForSequenceClassification(tiny), peft__r=4)
    >>> type(peft_model).__name__
    'PeftModel'
    """
    from ..arch import get_arch
    from .common import default_structure, seed_everything

    cfg = run_config(config, overrides)
    if cfg.peft.kind != "lora":
        raise PrunetuneError(f"with_peft builds LoRA models; peft.kind={cfg.peft.kind!r} models are built by "
                             "prunetune.light_peft_model itself")
    if hasattr(model, "peft_config"):
        raise PrunetuneError("the model is already a PeftModel")
    arch = get_arch(model)
    seed_everything(cfg.train.seed)
    peft_model, _adapters = default_structure(arch, cfg).build(model, arch)
    return peft_model


def light_peft_model(model, train_data, *, config: RunConfig | dict | None = None, dev_data=None, tokenizer=None,
                     collate_fn=None, task=None, **overrides) -> LightResult:
    """Light-PEFT on a model object: estimate, prune, fine-tune; returns the pruned model, its plan and the
    metrics (nothing is written to disk; `result.save(folder, tokenizer)` writes an export).

    model: a supported HF model (LoRA or adapters are attached as config.peft says) or a LoRA PeftModel.
    train_data / dev_data: a DataLoader, or a dataset of tokenized rows (input_ids, attention_mask, labels),
    e.g. a `datasets.Dataset`, batched with collate_fn, else with padding by `tokenizer`, else stacked as they
    are. task: a prunetune Task for dev metrics (default: accuracy, or pearson for one regression label).

    >>> import torch, prunetune
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> tiny = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
    ...                   intermediate_size=32, max_position_embeddings=32)
    >>> rows = [{"input_ids": torch.randint(1, 50, (8,)), "attention_mask": torch.ones(8, dtype=torch.long),
    ...          "labels": i % 2} for i in range(16)]
    >>> res = prunetune.light_peft_model(BertForSequenceClassification(tiny), rows, dev_data=rows,
    ...                                  train__epochs=1, train__batch_size=4, train__eval_each_epoch=False,
    ...                                  estimate__steps=2, prune__heads=0.5)
    >>> res.plan.summary()["heads_kept"], "accuracy" in res.metrics["final"]
    ('1/2', True)
    """
    from ..arch import get_arch
    from .common import default_structure, object_context, seed_everything

    cfg = run_config(config, overrides)
    wrapped = hasattr(model, "peft_config")
    if wrapped:  # a PeftModel: LoRA as the caller set it up
        if cfg.peft.kind != "lora":
            raise PrunetuneError(f"the model is a PeftModel (LoRA) but peft.kind is {cfg.peft.kind!r}")
        hf = peft_inner_model(model)
        arch, adapters = get_arch(hf), None
    else:
        hf, arch = model, get_arch(model)
    ctx = object_context(cfg, hf, train_data=train_data, dev_data=dev_data, tokenizer=tokenizer,
                         collate_fn=collate_fn, task=task)
    if not wrapped:  # PEFT as config.peft says, attached once the data and config have been checked
        seed_everything(cfg.train.seed)
        model, adapters = default_structure(arch, cfg).build(hf, arch)
    return train_light(ctx, None, model=model, hf=hf, arch=arch, adapters=adapters, checkpoints=False)
