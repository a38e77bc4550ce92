"""PrunePEFT: find which PEFT units belong where by iteratively pruning a supernet with hybrid criteria,
then retrain the found structure from scratch. Orchestration only (units/, scores/, train/, export/).

Optional combined mode (search.prune_foundation): Light-PEFT masks learn during the search rounds and the
retrain runs on the physically pruned foundation.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import RunConfig
from ..data import stratified_subset
from ..dist import is_main, log
from ..io import atomic_write_text
from ..models import load_model
from ..arch import get_arch
from ..plan import PruningPlan, make_plan
from ..scores import ImportanceTracker, StructureMasks
from ..scores.criteria import DYNAMIC, WEIGHT_SPACE, score_units
from ..scores.hybrid import assign_criteria, block_of, combine, informative
from ..train import TrainState, make_loader
from ..units.structure import PeftStructure
from ..units.supernet import Supernet
from .common import Context, checkpoint_root, prepare, seed_everything, start_run, task_info, train_fixed


@dataclass
class SearchResult:
    structure: PeftStructure
    plan: PruningPlan | None
    rounds: list[dict] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    supernet_params: int = 0
    budget_params: int = 0
    arch: object = None
    blocks: list[str] = field(default_factory=list)
    fill: dict[str, int] = field(default_factory=dict)  # last-round units brought back to fill the budget: width


def _loader(ctx: Context, size: float, seed: int):
    ds = stratified_subset(ctx.train_loader.dataset, size, seed)
    return make_loader(ds, ctx.train_loader.collate_fn, ctx.cfg.train.batch_size, True, seed)


def _units_to_remove(order: list[str], supernet: Supernet, k: int, target: int) -> list[str]:
    """Up to k units in hybrid order, stopping as soon as the budget is met."""
    out, left = [], supernet.trainable()
    for u in order:
        if len(out) >= k or left <= target or len(out) >= len(supernet.alive) - 1:
            break
        out.append(u)
        left -= supernet.unit_size(u)
    return out


def iterative_prune(ctx: Context, loader, block_criteria: dict[str, list[str]] | None, criteria: list[str],
                    round_steps: int | None, desc: str = "search", with_masks: bool = False) -> SearchResult:
    """From the full supernet: train a round, score alive units, remove the k lowest hybrid scores; repeat
    until the trainable-parameter budget is met. block_criteria None = every block uses `criteria`."""
    cfg, sc = ctx.cfg, ctx.cfg.search
    seed_everything(cfg.train.seed)
    hf = load_model(ctx.model_path, ctx.task.num_labels, dtype=cfg.model.dtype, gguf_file=cfg.model.gguf_file,
                    pad_token_id=ctx.tokenizer.pad_token_id)
    arch = get_arch(hf)
    net = Supernet(hf, arch, sc.space, sc.lora_r, sc.lora_alpha, cfg.peft.dropout, sc.adapter_size)
    extras = {"adapters": net.adapters} if net.adapters is not None else {}
    masks = StructureMasks(arch).attach(hf) if with_masks else None
    if masks is not None:
        extras["masks"] = masks
    full = net.trainable()
    target = int(sc.budget * full) if sc.budget <= 1 else int(sc.budget)
    steps = round_steps or max(1, math.ceil(len(loader) / cfg.train.grad_accum))
    state = TrainState(net.model, hf, extras, cfg.train, loader, steps, ctx.device, desc=desc, constant_lr=True)
    blocks = {u.name: block_of(u.type, u.layer, arch.num_layers, sc.bands) for u in net.units}
    kind = {u.name: u.type for u in net.units}
    mapping = block_criteria or {b: list(criteria) for b in set(blocks.values())}
    gen = torch.Generator().manual_seed(cfg.train.seed)
    result = SearchResult(PeftStructure(), None, supernet_params=full, budget_params=target, arch=arch,
                          blocks=sorted(set(blocks.values())))
    t0 = time.perf_counter()

    def l1():
        h, f = masks.l1()
        return cfg.estimate.lambda_heads * h + cfg.estimate.lambda_ffn * f

    def after_backward(tracker):
        tracker.after_backward()
        if masks is not None:
            masks.accumulate_taylor(cfg.estimate.lambda_heads, cfg.estimate.lambda_ffn)

    while net.trainable() > target and len(net.alive) > 1:
        tracker = ImportanceTracker(hf, net.adapters, groups=net.groups()).start()
        state.run(steps, extra_loss=l1 if masks is not None else None,
                  before_forward=lambda b: setattr(tracker, "token_mask", b.get("attention_mask")),
                  after_backward=lambda _s: after_backward(tracker), desc=f"{desc} round {len(result.rounds) + 1}")
        tracker.stop()
        needed = sorted({c for u in net.alive for c in mapping[blocks[u]]})
        stats = tracker.unit_stats() if DYNAMIC & set(needed) else None
        params = {u: net.unit_params(u) for u in net.alive}
        crit_ctx = {"generator": gen, "threshold": sc.threshold, "per_parameter": sc.per_parameter}
        scores = {c: score_units(c, params, stats, crit_ctx) for c in needed}
        can = informative(scores, sorted(net.alive), kind, WEIGHT_SPACE)  # which units each criterion can rank
        hybrid = combine(scores, {u: blocks[u] for u in net.alive}, mapping, sc.combine, gen, kind, WEIGHT_SPACE, can)
        order = sorted(hybrid, key=lambda u: (hybrid[u], u))
        k = int(sc.k) if sc.k >= 1 else max(1, int(round(sc.k * len(net.alive))))
        removed = _units_to_remove(order, net, k, target)
        drawn = [u for u in removed if not any(u in can[c] for c in mapping[blocks[u]])]
        net.remove(removed)
        if sc.reinit:
            net.reinit(cfg.train.seed + len(result.rounds))
        state.set_model(net.model, hf, extras, reset=sc.reinit)  # fresh weights: fresh AdamW moments too
        result.rounds.append({"round": len(result.rounds) + 1, "removed": removed,
                              "blocks_removed": [blocks[u] for u in removed], "drawn": drawn,
                              "trainable": net.trainable(),
                              "alive": len(net.alive), "step": state.step})
    result.steps, result.seconds = state.step, time.perf_counter() - t0
    if sc.fill and result.rounds:
        result.fill = net.fill(list(reversed(result.rounds[-1]["removed"])), target)
    result.structure = net.structure(result.fill)
    if masks is not None:
        p = cfg.prune
        heads, ffn = masks.structure_scores(cfg.estimate.structure_score)
        result.plan = make_plan(arch, heads, ffn, {}, {}, p.heads, p.ffn, 0.0, 0.0, p.ffn_scope, p.ffn_floor,
                                "searched", hf.config.model_type)
        masks.detach()
    return result


def _cache_file(ctx: Context) -> Path:
    sc = ctx.cfg.search
    root = Path(sc.warmup_cache or os.environ.get("PRUNETUNE_CACHE") or Path.home() / ".cache" / "prunetune")
    model = os.path.abspath(ctx.model_path) if os.path.exists(ctx.model_path) else ctx.model_path
    key = json.dumps({"version": 2, "model": model,  # version: what a cached mapping means (2: drawn units ignored)
                      "space": sc.space, "r": sc.lora_r, "size": sc.adapter_size, "budget": sc.budget, "k": sc.k,
                      "bands": sc.bands, "criteria": sc.warmup_criteria, "steps": sc.warmup_round_steps,
                      "samples": sc.warmup_samples, "combine": sc.combine, "per_parameter": sc.per_parameter},
                     sort_keys=True)
    return root / "warmup" / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".json")


def warmup(ctx: Context) -> dict:
    """Run the iterative pruning once per criterion on a small stratified subset; blocks get the criteria
    that prune them most often. Cached per model and search space (reusable across tasks)."""
    path = _cache_file(ctx)
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            log(f"warm-up mapping reused from {path}")
            return dict(cached, cached=True)
        except json.JSONDecodeError:
            pass  # a corrupt cache entry is recomputed
    sc = ctx.cfg.search
    loader = _loader(ctx, sc.warmup_samples, ctx.cfg.train.seed)
    counts: dict[str, dict[str, int]] = {}
    blocks: set[str] = set()
    t0, steps = time.perf_counter(), 0
    for c in sc.warmup_criteria:
        r = iterative_prune(ctx, loader, None, [c], sc.warmup_round_steps, desc=f"warm-up {c}")
        steps += r.steps
        counts[c] = {}
        for rd in r.rounds:  # units drawn at random (the criterion could not rank them) say nothing of it
            for u, b in zip(rd["removed"], rd["blocks_removed"]):
                if u not in rd["drawn"]:
                    counts[c][b] = counts[c].get(b, 0) + 1
        blocks.update(r.blocks)
    mapping = assign_criteria(counts, sorted(blocks), sc.criteria)
    out = {"mapping": mapping, "counts": counts, "steps": steps, "seconds": time.perf_counter() - t0}
    if is_main():
        atomic_write_text(path, json.dumps(out, indent=1))
    return dict(out, cached=False)


def search_loader(ctx: Context):
    """The rounds' data: all of it, or a label-stratified fraction in low-fidelity mode."""
    sc = ctx.cfg.search
    return _loader(ctx, sc.data_fraction, ctx.cfg.train.seed) if sc.data_fraction < 1 else ctx.train_loader


def search(ctx: Context) -> tuple[SearchResult, dict | None]:
    sc = ctx.cfg.search
    wu = warmup(ctx) if sc.warmup else None
    result = iterative_prune(ctx, search_loader(ctx), wu["mapping"] if wu else None, sc.criteria, sc.round_steps,
                             with_masks=sc.prune_foundation)
    return result, wu


def lora_config_dict(result: SearchResult) -> dict | None:
    """The found structure as a peft LoraConfig (LoRA-only structures), JSON-ready."""
    st = result.structure
    if st.adapters or not st.lora:
        return None
    d = st.lora_config(result.arch).to_dict()
    return json.loads(json.dumps(d, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


def run(cfg: RunConfig, export: bool = True) -> dict:
    out = Path(cfg.output_dir)
    start_run(cfg, export)
    ctx = prepare(cfg)
    log(f"prunetune search: {ctx.model_path} on {ctx.task.name} — space {cfg.search.space}, "
          f"budget {cfg.search.budget}, {ctx.total_steps} retrain steps on {ctx.device}")
    found, wu = search(ctx)
    log(f"found {len(found.structure.units)} units ({found.budget_params:,} budget): {found.structure.units}"
        + (f"; brought back to fill the budget (unit: width): {found.fill}" if found.fill else ""))
    retrain = train_fixed(ctx, found.structure, found.plan, out / "model" if export else None, desc="retrain",
                          checkpoint_dir=checkpoint_root(ctx) / "retrain")
    retrain.pop("_model", None)
    metric = ctx.task.metric
    results = {
        "config": cfg.to_dict(), "task": task_info(ctx),
        "structure": found.structure.to_dict(), "lora_config": lora_config_dict(found),
        "rounds": found.rounds, "fill": found.fill,
        "supernet_params": found.supernet_params, "budget_params": found.budget_params,
        "warmup": wu, "plan": found.plan.summary() if found.plan else None,
        "search_cost": {"steps": found.steps, "seconds": found.seconds,
                        "warmup_steps": (wu or {}).get("steps", 0) if wu and not wu.get("cached") else 0,
                        "warmup_seconds": (wu or {}).get("seconds", 0.0) if wu and not wu.get("cached") else 0.0},
        "retrain_cost": {"steps": retrain["steps"], "seconds": retrain["train_seconds"]},
        "retrain": retrain,
    }
    results["search_cost"]["ratio_steps"] = found.steps / max(1, retrain["steps"])
    results["search_cost"]["ratio_seconds"] = found.seconds / max(1e-9, retrain["train_seconds"])
    if not is_main():
        return results
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "found_structure.json", json.dumps(found.structure.to_dict(), indent=1))
    if results["lora_config"]:
        atomic_write_text(out / "lora_config.json", json.dumps(results["lora_config"], indent=1))
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=str))
    from ..report import write_search_report

    write_search_report(out, results)
    sc = results["search_cost"]
    log(f"search: {found.steps} steps / {found.seconds:.1f}s; retrain: {retrain['steps']} steps / "
          f"{retrain['train_seconds']:.1f}s; search cost = {sc['ratio_steps']:.2f}x retrain (steps), "
          f"{sc['ratio_seconds']:.2f}x (time)")
    log(f"dev {metric}: final {retrain['final'][metric]:.4f}, best {retrain['best'][metric]:.4f}; "
          f"trainable params {retrain['trainable_params_no_head']:,} (no head)")
    return results
