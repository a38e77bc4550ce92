"""Light-PEFT: estimate (masks + importance, first t' steps), prune once, fine-tune the smaller model.

Orchestration only: the work lives in scores/, plan.py, surgery/, train/ and export/.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..config import RunConfig
from ..dist import all_reduce_sum_, is_main, log, world_size
from ..errors import PrunetuneError
from ..io import atomic_write_text
from ..cost import CostModel, DeviceRates, calibrate, seq_stats
from ..plan import PruningPlan, allocation_summary, make_plan, make_target_plan
from ..scores import ImportanceTracker, StructureMasks
from ..surgery import prune_adapter_model, prune_lora_model
from ..train import PeakMemory, TrainState, evaluate
from ..train.checkpoint import load_checkpoint, save_checkpoint
from ..train.memory import StepMemory
from .common import (Context, base_param_counts, build_model, checkpoint_root, epoch_evaluator, eval_seconds,
                     mean_step, prepare, start_run, summarize_evals, task_info, train_fixed)


def estimation_steps(cfg: RunConfig, total: int, train_rows: int) -> int:
    """t': explicit steps, else a fraction of the schedule (default 5%, 10% for small tasks)."""
    fraction = cfg.estimate.fraction
    if fraction is None:
        fraction = 0.10 if train_rows < cfg.estimate.small_task_rows else 0.05
    steps = cfg.estimate.steps or int(round(fraction * total))
    return max(1, min(steps, total - 1))


def train_vanilla(ctx: Context) -> dict:
    """The baseline: PEFT at every position, same hyperparameters and seed, no pruning."""
    return train_fixed(ctx, desc="vanilla", checkpoint_dir=checkpoint_root(ctx) / "vanilla")


def train_light(ctx: Context, export_dir: Path | None = None) -> dict:
    """Estimate for t' steps, prune, fine-tune. Resumes from output_dir/checkpoints/light with train.resume."""
    cfg = ctx.cfg
    ckpt_dir = checkpoint_root(ctx) / "light"
    ck = load_checkpoint(ckpt_dir, cfg.to_dict()) if cfg.train.resume else None
    model, hf, arch, adapters = build_model(ctx)
    params_before = base_param_counts(hf, arch)
    masks = StructureMasks(arch).attach(hf)
    extras = {"masks": masks, **({"adapters": adapters} if adapters is not None else {})}
    total = ctx.total_steps
    est = estimation_steps(cfg, total, len(ctx.train_loader.dataset))
    window_start = est - max(1, int(round(cfg.estimate.window * est)))
    state = TrainState(model, hf, extras, cfg.train, ctx.train_loader, total, ctx.device,
                       mask_lr=cfg.estimate.mask_lr, desc="light-peft")
    tracker = ImportanceTracker(hf, adapters, cfg.estimate.rank_score)
    evals: list[dict] = list(ck["evals"]) if ck else []
    mask_curve: list[dict] = list(ck["mask_curve"]) if ck else []
    on_epoch_end = epoch_evaluator(ctx, state, evals) if cfg.train.eval_each_epoch else None
    info: dict = dict(ck["info"]) if ck else {}  # estimation-phase figures that outlive a restart

    def save(phase: str, **extra):
        if is_main():
            save_checkpoint(ckpt_dir, {"phase": phase, **state.state_dict(), "evals": evals, "mask_curve": mask_curve,
                                       "info": info, **extra}, cfg.to_dict())

    t0 = time.perf_counter() - info.get("elapsed", 0.0)
    if ck is None or ck["phase"] == "estimate":
        if ck is not None:
            state.load_state_dict(ck)
            tracker.load_state_dict(ck["tracker"])
            masks.load_score_state(ck["mask_scores"])

        def l1():
            h, f = masks.l1()
            return cfg.estimate.lambda_heads * h + cfg.estimate.lambda_ffn * f

        def before_forward(batch):
            tracker.token_mask = batch.get("attention_mask")
            if state.step >= window_start and not tracker._handles:
                tracker.start()

        def after_backward(step):
            tracker.accumulate_path(finite=state.step_finite)  # path importance counts every estimation step
            if step >= window_start:  # a step the fp16 scaler skips (non-finite gradients) is not scored
                tracker.after_backward(finite=state.step_finite)
                masks.accumulate_taylor(cfg.estimate.lambda_heads, cfg.estimate.lambda_ffn, finite=state.step_finite)
            if step % max(1, cfg.train.log_every) == 0 or step == est - 1:
                mask_curve.append({"step": step, "heads_mean": _mean(masks.heads), "ffn_mean": _mean(masks.ffn)})

        with PeakMemory(ctx.device) as mem_est:
            state.run(est - state.step, extra_loss=l1, before_forward=before_forward, after_backward=after_backward,
                      on_epoch_end=on_epoch_end, desc="estimate",
                      on_checkpoint=lambda: save("estimate", tracker=tracker.state_dict(),
                                                 mask_scores=masks.score_state()))
        tracker.stop()
        if tracker.rank_n == 0:  # nothing to rank PEFT modules by: a plan would drop them all
            raise PrunetuneError(f"none of the {est - window_start} steps of the estimation window could be scored "
                                 "(non-finite gradients: fp16 overflow or divergence); lower train.lr, use "
                                 "train.mixed_precision=bf16, or widen estimate.window")
        norm_ratio, rank_imp = tracker.finalize()
        module_taylor = tracker.module_taylor()
        path_modules, path_ranks = tracker.path_scores()
        module_imp = {"taylor": module_taylor, "norm_ratio": norm_ratio, "path": path_modules}[cfg.estimate.module_score]
        if cfg.estimate.module_score == "path":  # ranks by what they bought too (the point Taylor term is ~0 early)
            rank_imp = path_ranks
        head_vals, ffn_vals = masks.head_values(), masks.ffn_values()
        head_scores, ffn_scores = masks.structure_scores(cfg.estimate.structure_score)
        p = cfg.prune
        cost = _cost_model(ctx, arch, {n: len(v) for n, v in rank_imp.items()}, model if p.cost_probe else None)
        plan_meta = {"estimation_steps": est, "window_start": window_start, "total_steps": total,
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
                log(f"warning: every PEFT module scored 0 after {est} estimation steps; target mode will treat "
                    "removing PEFT modules as free (set estimate.steps higher)")
            plan = make_target_plan(arch, cost, head_scores, ffn_scores, module_imp, rank_imp, p.target_speedup,
                                    p.target_params, params_before["body"], p.ffn_scope == "layer", p.ffn_floor,
                                    cfg.peft.kind, hf.config.model_type, meta=plan_meta)
        else:  # the paper's fixed ratios
            plan = make_plan(arch, head_scores, ffn_scores, module_imp, rank_imp, p.heads, p.ffn, p.modules, p.ranks,
                             p.ffn_scope, p.ffn_floor, cfg.peft.kind, hf.config.model_type, meta=plan_meta)
        plan.meta["allocation"] = allocation_summary(plan, cost, head_scores, ffn_scores, module_imp, rank_imp)
        info.update(estimation_seconds=time.perf_counter() - t0, estimation_peak_mb=state.memory.peak_mb,
                    cuda_estimation_peak_mb=mem_est.peak_mb)
        fold_values = ([m.tolist() for m in head_vals], [m.tolist() for m in ffn_vals]) if p.fold_masks else None
    else:
        plan = PruningPlan.from_dict(ck["plan"])
        fold_values = ck.get("fold_values")

    t1 = time.perf_counter()
    masks.detach()
    fold = [[torch.tensor(v) for v in vals] for vals in fold_values] if fold_values else (None, None)
    if adapters is None:
        model, ops = prune_lora_model(model, arch, plan, cfg.peft.r, cfg.peft.alpha, cfg.peft.dropout, *fold,
                                      merge_removed=cfg.prune.merge_removed)
        hf = model.base_model.model
        extras = {}
    else:
        ops = prune_adapter_model(hf, arch, plan, adapters, *fold, extras_key="adapters")
        extras = {"adapters": adapters}
    state.set_model(model, hf, extras, ops, reset=cfg.estimate.optimizer_state == "reset")
    state.memory = StepMemory()
    info.setdefault("surgery_seconds", time.perf_counter() - t1)
    plan_dict = json.loads(plan.to_json())
    if ck is not None and ck["phase"] == "finetune":
        state.load_state_dict(ck)
    else:
        save("finetune", plan=plan_dict, fold_values=fold_values)

    def save_finetune():
        info["elapsed"] = time.perf_counter() - t0
        save("finetune", plan=plan_dict, fold_values=fold_values)

    with PeakMemory(ctx.device) as mem_ft:
        state.run(total - state.step, on_epoch_end=on_epoch_end, desc="fine-tune", on_checkpoint=save_finetune)
    wall = time.perf_counter() - t0
    if not evals or evals[-1]["step"] != state.step:
        evals.append({"epoch": round(state.epoch, 2), "step": state.step,
                      **evaluate(state.model, ctx.dev_loader, ctx.task, ctx.device)})
    params_after = base_param_counts(hf, arch)
    result = {
        "evals": evals, **summarize_evals(evals, ctx.task.metric),
        "plan": plan.summary(), "estimation_steps": est, "total_steps": total,
        "step_seconds": mean_step(state.step_times[est:]), "estimation_step_seconds": mean_step(state.step_times[:est]),
        "estimation_seconds": info["estimation_seconds"], "surgery_seconds": info["surgery_seconds"],
        "train_seconds": wall, "peak_mb": state.memory.peak_mb, "estimation_peak_mb": info["estimation_peak_mb"],
        "cuda_peak_mb": mem_ft.peak_mb, "cuda_estimation_peak_mb": info["cuda_estimation_peak_mb"],
        "trainable_params": state.trainable_count(), "trainable_params_no_head": state.trainable_count(False),
        "base_params_before": params_before, "base_params": params_after,
        "base_kept_pct": 100.0 * params_after["body"] / params_before["body"],
        "block_kept_pct": 100.0 * params_after["blocks"] / max(1, params_before["blocks"]),
        "eval_seconds": eval_seconds(ctx, state.model), "loss_curve": state.history, "mask_curve": mask_curve,
        "resumed": ck is not None,
        "predicted_step_speedup": plan.meta.get("allocation", {}).get("predicted_speedup"),
        "cost_rates": plan.meta.get("allocation", {}).get("prediction", {}).get("rates"),
    }
    if export_dir is not None and is_main():
        from ..export import save_export

        from ..report.card import model_card

        save_export(export_dir, hf, plan, ctx.tokenizer, peft_model=model if adapters is None else None,
                    adapters=adapters, task_info=task_info(ctx), card=model_card(plan, task_info(ctx), result, base_model=cfg.model.name_or_path),
                    overwrite=cfg.overwrite)
        result["export"] = str(export_dir)
    result["_plan"], result["_model"] = plan, state.model
    return result


def _cost_model(ctx, arch, peft_ranks: dict[str, int], probe_model=None) -> CostModel:
    """Step-time model at this run's batch shape (the training rows' real token lengths); with probe_model, its
    rates are fitted to a few timed forward/backward passes of the (still unpruned) model on this device."""
    cfg = ctx.cfg
    dataset = ctx.train_loader.dataset
    lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    seq = seq_stats(lengths, cfg.train.batch_size, cfg.train.grad_accum, seed=cfg.train.seed)
    act = 2 if cfg.train.mixed_precision in ("bf16", "fp16") or cfg.model.dtype != "float32" else 4
    cost = CostModel(arch, seq, peft_ranks, DeviceRates.for_device(ctx.device.type), cfg.peft.kind, act,
                     2 if cfg.model.dtype != "float32" else 4)
    if probe_model is None:
        return cost
    rates = calibrate(cost, lambda b: _time_passes(ctx, probe_model, b))
    return CostModel(arch, seq, peft_ranks, rates, cfg.peft.kind, act, cost.wb)


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
        results["vanilla"] = train_vanilla(ctx)
        results["vanilla"].pop("_model", None)
    log(f"[{2 if cfg.baseline else 1}/{2 if cfg.baseline else 1}] Light-PEFT")
    light = train_light(ctx, out / "model" if export else None)
    plan = light.pop("_plan")
    light.pop("_model")
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
