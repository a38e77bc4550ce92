"""PrunePEFT: find which PEFT units belong where by iteratively pruning a supernet with hybrid criteria,
then retrain the found structure from scratch. Orchestration only (units/, scores/, train/, export/).

Optional combined mode (search.prune_foundation): Light-PEFT masks learn during the search rounds and the
retrain runs on the physically pruned foundation.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import RunConfig
from ..data import stratified_split, stratified_subset
from ..dist import is_main, log
from ..errors import PrunetuneError
from ..io import atomic_write_text
from ..plan import PruningPlan, Scores, make_plan
from ..scores import ImportanceTracker, StructureMasks
from ..scores.criteria import DYNAMIC, HELD_OUT, WEIGHT_SPACE, score_units
from ..scores.proxy import TURNED, drop_loss, spearman
from ..scores.hybrid import assign_criteria, block_of, combine, informative
from ..train import TrainState, make_loader
from ..units.structure import PeftStructure
from ..units.supernet import Supernet
from .common import (Context, checkpoint_root, load_base, model_fingerprint, prepare, start_run, task_info,
                     train_fixed)


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
    unit_blocks: dict[str, str] = field(default_factory=dict)  # unit -> its block (type x depth band)
    unit_types: dict[str, str] = field(default_factory=dict)
    rows: int = 0  # training rows the rounds drew from
    epochs: float = 0.0  # passes the rounds made over them (> 1: rows seen again)


def _needs_held_out(sc) -> bool:
    return bool(HELD_OUT & set(sc.criteria)) or (sc.warmup and (sc.warmup_by == "prediction"
                                                                  or bool(HELD_OUT & set(sc.warmup_criteria))))


def _split(ctx: Context):
    """(rows the rounds train on, held-out batches for drop_loss or None). The held-out rows are a stratified
    split of the training data (never the dev set) and are taken out of the rounds' data only when a criterion
    or the warm-up needs them, so searches that don't use them are unchanged."""
    train = ctx.train_loader.dataset
    if not _needs_held_out(ctx.cfg.search):
        return train, None
    held, rest = stratified_split(train, ctx.cfg.search.proxy_samples, ctx.cfg.train.seed)
    if not len(rest):
        raise PrunetuneError(f"search.proxy_samples ({ctx.cfg.search.proxy_samples}) leaves no training rows for "
                             f"the search rounds ({len(train)} rows)")
    loader = make_loader(held, ctx.train_loader.collate_fn, ctx.cfg.train.eval_batch_size, False, 0)
    return rest, list(loader)


def _loader(ctx: Context, size: float, seed: int, rows=None):
    ds = stratified_subset(rows if rows is not None else ctx.train_loader.dataset, size, seed)
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


def per_round(k: int | float, alive: int) -> int:
    """Units a round removes (`search.k`): k itself, or a fraction of the `alive` units (at least one)."""
    return int(k) if k >= 1 else max(1, int(round(k * alive)))


def planned_rounds(sizes: list[int], k: int | float, target: int) -> int:
    """At most how many rounds a search removing k units per round (`search.k`) takes from units of these
    parameter counts down to `target`: the rounds it would take if every round removed the smallest units.

    >>> planned_rounds([10] * 8, 0.5, 20)  # 8 -> 4 -> 2 alive
    2
    """
    alive, left, rounds = sorted(sizes), sum(sizes), 0
    while left > target and len(alive) > 1:
        for _ in range(per_round(k, len(alive))):  # as _units_to_remove: stop once the budget is met or one unit is left
            if left <= target or len(alive) <= 1:
                break
            left -= alive.pop(0)
        rounds += 1
    return rounds


def iterative_prune(ctx: Context, loader, block_criteria: dict[str, list[str]] | None, criteria: list[str],
                    round_steps: int | None, desc: str = "search", with_masks: bool = False,
                    held_out: list[dict] | None = None, record: list[str] | None = None) -> SearchResult:
    """From the full supernet: train a round, score alive units, remove the k lowest hybrid scores; repeat
    until the trainable-parameter budget is met. block_criteria None = every block uses `criteria`.
    held_out: batches for the drop_loss criterion; record: criteria whose scores each round keeps (warm-up).
    loader: a DataLoader, or (with round_steps) a function of the number of rows the rounds will consume at
    most (planned_rounds x round_steps x batch) that returns one: the warm-up sizes its rows with it."""
    cfg, sc = ctx.cfg, ctx.cfg.search
    hf, arch = load_base(ctx)  # seeded; causal-LM head for causal_lm tasks; tokenizer checked
    net = Supernet(hf, arch, sc.space, sc.lora_r, sc.lora_alpha, cfg.peft.dropout, sc.adapter_size, chunk=sc.chunk)
    extras = {"adapters": net.adapters} if net.adapters is not None else {}
    masks = StructureMasks(arch).attach(hf) if with_masks else None
    if masks is not None:
        extras["masks"] = masks
    full = net.trainable()
    target = int(sc.budget * full) if sc.budget <= 1 else int(sc.budget)
    if callable(loader):
        if round_steps is None:
            raise ValueError("a loader function needs round_steps")
        rounds = planned_rounds([net.unit_size(u) for u in net.alive], sc.k, target)
        loader = loader(rounds * round_steps * cfg.train.grad_accum * cfg.train.batch_size)
    steps = round_steps or max(1, math.ceil(len(loader) / cfg.train.grad_accum))
    state = TrainState(net.model, hf, extras, cfg.train, loader, steps, ctx.device, desc=desc, constant_lr=True)
    blocks = {u.name: block_of(u.type, u.layer, arch.num_layers, sc.bands) for u in net.units}
    kind = {u.name: u.type for u in net.units}
    mapping = block_criteria or {b: list(criteria) for b in set(blocks.values())}
    gen = torch.Generator().manual_seed(cfg.train.seed)
    result = SearchResult(PeftStructure(), None, supernet_params=full, budget_params=target, arch=arch,
                          blocks=sorted(set(blocks.values())), unit_blocks=blocks, unit_types=kind)
    t0 = time.perf_counter()

    def l1():
        h, f = masks.l1()
        return cfg.estimate.lambda_heads * h + cfg.estimate.lambda_ffn * f

    def after_backward(tracker):  # a step the fp16 scaler skips (non-finite gradients) is not scored
        tracker.after_backward(finite=state.step_finite)
        if masks is not None:
            masks.accumulate_taylor(cfg.estimate.lambda_heads, cfg.estimate.lambda_ffn, finite=state.step_finite)

    while net.trainable() > target and len(net.alive) > 1:
        tracker = ImportanceTracker(hf, net.adapters, groups=net.groups(), spans=net.spans()).start()
        state.run(steps, extra_loss=l1 if masks is not None else None,
                  before_forward=lambda b: setattr(tracker, "token_mask", b.get("attention_mask")),
                  after_backward=lambda _s: after_backward(tracker), desc=f"{desc} round {len(result.rounds) + 1}")
        tracker.stop()
        needed = sorted({c for u in net.alive for c in mapping[blocks[u]]} | set(record or []))
        stats = tracker.unit_stats() if DYNAMIC & set(needed) else {}
        if HELD_OUT & set(needed):
            if held_out is None:
                raise PrunetuneError("the drop_loss criterion needs held-out rows (search.proxy_samples)")
            stats["drop_loss"] = drop_loss(net.model, sorted(net.alive), net.switched_off, held_out, ctx.device,
                                           blocks=net.blocks(), unit_block=net.unit_blocks())
        params = {u: net.unit_params(u) for u in net.alive}
        crit_ctx = {"generator": gen, "threshold": sc.threshold, "per_parameter": sc.per_parameter}
        scores = {c: score_units(c, params, stats, crit_ctx) for c in needed}
        can = informative(scores, sorted(net.alive), kind, WEIGHT_SPACE)  # which units each criterion can rank
        hybrid = combine(scores, {u: blocks[u] for u in net.alive}, mapping, sc.combine, gen, kind, WEIGHT_SPACE, can)
        order = sorted(hybrid, key=lambda u: (hybrid[u], u))
        removed = _units_to_remove(order, net, per_round(sc.k, len(net.alive)), target)
        drawn = [u for u in removed if not any(u in can[c] for c in mapping[blocks[u]])]
        net.remove(removed)
        if sc.reinit:
            net.reinit(cfg.train.seed + len(result.rounds))
        state.set_model(net.model, hf, extras, reset=sc.reinit)  # fresh weights: fresh AdamW moments too
        result.rounds.append({"round": len(result.rounds) + 1, "removed": removed,
                              "blocks_removed": [blocks[u] for u in removed], "drawn": drawn,
                              "trainable": net.trainable(),
                              "alive": len(net.alive), "step": state.step,
                              **({"scores": {c: scores[c] for c in record}} if record else {})})
    result.steps, result.seconds = state.step, time.perf_counter() - t0
    result.rows, result.epochs = len(loader.dataset), state.epoch
    if sc.fill and result.rounds:
        result.fill = net.fill(list(reversed(result.rounds[-1]["removed"])), target)
    result.structure = net.structure(result.fill)
    if masks is not None:
        p = cfg.prune
        heads, ffn = masks.structure_scores(cfg.estimate.structure_score)
        result.plan = make_plan(arch=arch, scores=Scores(heads, ffn, {}, {}), heads=p.heads, ffn=p.ffn, modules=0.0,
                                ranks=0.0, ffn_scope=p.ffn_scope, ffn_floor=p.ffn_floor, peft_kind="searched",
                                model_type=hf.config.model_type)
        masks.detach()
    return result


# Settings that shape neither the warm-up's rounds nor its mapping: the main search's fidelity, what happens
# after the warm-up, where files go and how often the run logs. Everything else in `search`, `train`, `model`
# and data.max_length is part of the cache key; the task's data is not (the mapping is reused across tasks).
_NOT_IN_WARMUP_KEY = {"search": {"round_steps", "data_fraction", "fill", "warmup", "warmup_cache",
                                 "prune_foundation"},
                      "train": {"resume", "save_every", "log_every", "tensorboard_dir", "report_to", "logging_dir",
                                "eval_each_epoch",
                                "eval_batch_size", "epochs", "max_steps", "warmup_ratio"}}  # rounds: constant lr


def warmup_key(cfg: RunConfig, model_path: str) -> dict:
    """What the cached warm-up mapping depends on (version: what a cached mapping means; 2: drawn units ignored,
    3: rank-calibrated hybrid, full settings in the key, 4: the warm-up draws as many rows as its rounds use,
    5: prediction leaves out the rounds where drop_loss had turned)."""
    config = cfg.to_dict()
    model = os.path.abspath(model_path) if os.path.exists(model_path) else model_path
    return {"version": 5, "model": model, "dtype": cfg.model.dtype, "max_length": cfg.data.max_length,
            "peft_dropout": cfg.peft.dropout,
            **{section: {k: v for k, v in config[section].items() if k not in skip}
               for section, skip in _NOT_IN_WARMUP_KEY.items()}}


def _cache_file(ctx: Context) -> Path:
    sc = ctx.cfg.search
    root = Path(sc.warmup_cache or os.environ.get("PRUNETUNE_CACHE") or Path.home() / ".cache" / "prunetune")
    # a model object is named by a digest of its config and weights, as a path names a model on disk
    model = ctx.model_path if ctx.base is None else f"<model object {model_fingerprint(ctx.base)}>"
    key = json.dumps(warmup_key(ctx.cfg, model), sort_keys=True, default=str)
    return root / "warmup" / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".json")


def warmup(ctx: Context, rows=None, held_out: list[dict] | None = None) -> dict:
    """Assign criteria to blocks on a small stratified subset of the rounds' rows; cached per model and search
    settings (reusable across tasks). `search.warmup_by`: frequency (one pruning pass per criterion; a block gets
    the criteria that pruned it most) or prediction (one pass pruning by the held-out drop_loss proxy; a block
    gets the criteria whose ranking of its units agrees best with that proxy)."""
    path = _cache_file(ctx)
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            log(f"warm-up mapping reused from {path}")
            if ctx.task.name not in cached.setdefault("tasks", []) and is_main():
                cached["tasks"].append(ctx.task.name)  # the tasks sharing its cost (search_cost amortises over them)
                atomic_write_text(path, json.dumps(cached, indent=1))
            return dict(cached, cached=True)
        except (json.JSONDecodeError, AttributeError):
            pass  # a corrupt cache entry is recomputed
    sc = ctx.cfg.search
    t0 = time.perf_counter()
    out = (_warmup_by_prediction if sc.warmup_by == "prediction" else _warmup_by_frequency)(
        ctx, _warmup_rows(ctx, rows), held_out)
    out.update(seconds=time.perf_counter() - t0, tasks=[ctx.task.name])
    if is_main():
        atomic_write_text(path, json.dumps(out, indent=1))
    return dict(out, cached=False)


def _warmup_rows(ctx: Context, rows=None):
    """The warm-up's loader, as a function of the rows its rounds consume: at least search.warmup_samples,
    and as many as the rounds use while the training rows last. On a fixed small subset the later rounds
    re-fit rows they have seen (256 rows, 8 steps of 32 per round: one more epoch each round), the held-out
    loss rises, switching a unit off lowers it, and drop_loss ranks the units that learn most as the least
    important (MiniLM SST-2, k=0.5, round 3: 87% of units negative on 256 rows, 60% on fresh rows; taylor's
    Spearman with drop_loss -0.12 and +0.25)."""
    sc = ctx.cfg.search

    def make(needed: int):
        return _loader(ctx, max(sc.warmup_samples, needed), ctx.cfg.train.seed, rows)

    return make


def _warmup_by_frequency(ctx: Context, loader, held_out) -> dict:
    sc = ctx.cfg.search
    counts: dict[str, dict[str, int]] = {}
    blocks: set[str] = set()
    steps, rows, epochs = 0, 0, 0.0
    for c in sc.warmup_criteria:
        r = iterative_prune(ctx, loader, None, [c], sc.warmup_round_steps, desc=f"warm-up {c}", held_out=held_out)
        steps, rows, epochs = steps + r.steps, max(rows, r.rows), max(epochs, r.epochs)
        counts[c] = {}
        for rd in r.rounds:  # units drawn at random (the criterion could not rank them) say nothing of it
            for u, b in zip(rd["removed"], rd["blocks_removed"]):
                if u not in rd["drawn"]:
                    counts[c][b] = counts[c].get(b, 0) + 1
        blocks.update(r.blocks)
    return {"mapping": assign_criteria(counts, sorted(blocks), sc.criteria), "counts": counts, "steps": steps,
            "rows": rows, "epochs": epochs}


def _warmup_by_prediction(ctx: Context, loader, held_out) -> dict:
    """Per round, every candidate criterion's percentile of each alive unit (within the unit's type for
    weight-space criteria, as the hybrid ranks them) is compared with the drop_loss percentile in the same
    grouping: a block's agreement is the mean over its units and the rounds of 1 - |difference| (1: the same
    ranking, 2/3: unrelated). It works for blocks of one unit, where a per-block correlation cannot. The
    Spearman correlation of each criterion with drop_loss over all alive units is reported alongside.
    Rounds where the proxy has turned (more than TURNED of the units' removal LOWERS the held-out loss: the
    supernet over-fits or overshoots) rank units backwards, so they are left out of both; with no healthy round
    at all every block keeps `search.criteria`."""
    from ..scores.hybrid import _groups, percentiles

    sc = ctx.cfg.search
    candidates = [c for c in sc.warmup_criteria if c not in HELD_OUT]
    r = iterative_prune(ctx, loader, None, ["drop_loss"], sc.warmup_round_steps, desc="warm-up (prediction)",
                        held_out=held_out, record=candidates + sorted(HELD_OUT))
    g = torch.Generator().manual_seed(ctx.cfg.train.seed)
    agree: dict[str, dict[str, list[float]]] = {b: {c: [] for c in candidates} for b in r.blocks}
    rho: dict[str, list[float]] = {c: [] for c in candidates}
    # share of units whose removal LOWERS the held-out loss, per round: high = the supernet over-fits its rows
    negative = [sum(v < 0 for v in rd["scores"]["drop_loss"].values()) / max(1, len(rd["scores"]["drop_loss"]))
                for rd in r.rounds]
    healthy = [i for i, share in enumerate(negative) if share <= TURNED]
    for rd in (r.rounds[i] for i in healthy):
        target = rd["scores"]["drop_loss"]
        units = sorted(target)
        for c in candidates:
            pc, pt = {}, {}
            for grp in _groups(units, r.unit_types, c in WEIGHT_SPACE):
                pc.update(percentiles({u: rd["scores"][c][u] for u in grp}, g))
                pt.update(percentiles({u: target[u] for u in grp}, g))
            for u in units:
                agree[r.unit_blocks[u]][c].append(1 - abs(pc[u] - pt[u]))
            rho[c].append(spearman([rd["scores"][c][u] for u in units], [target[u] for u in units]))
    turned = [i + 1 for i, share in enumerate(negative) if share > TURNED]
    if turned:  # one warning line: which rounds were dropped, why, and what to change
        msg = (f"warning: warm-up round(s) {', '.join(map(str, turned))} of {len(negative)} are left out of the "
               "mapping (drop_loss had turned there)")
        if negative[-1] > TURNED:  # the proxy ends turned: the supernet over-fits its rows or overshoots
            msg += (f"; in the warm-up's last round switching off {negative[-1]:.0%} of the units lowers the "
                    "held-out loss: fewer search.warmup_round_steps or a lower train.lr give drop_loss its "
                    "meaning back")
        if not healthy:
            msg += f"; no round is left, so every block uses search.criteria {list(sc.criteria)}"
        log(msg)
    mean = {b: {c: sum(v) / len(v) for c, v in per.items() if v} for b, per in agree.items()}
    mapping = {b: sorted(c for c, v in m.items() if v == max(m.values())) if m else list(sc.criteria)
               for b, m in mean.items()}
    return {"mapping": mapping, "agreement": mean, "steps": r.steps, "rows": r.rows, "epochs": r.epochs,
            "spearman": {c: sum(v) / len(v) for c, v in rho.items() if v}, "drop_loss_negative": negative,
            "rounds_used": [i + 1 for i in healthy]}


def search_loader(ctx: Context, rows=None):
    """The rounds' data (`rows`: the training rows left after the held-out split; None: all of them), whole or
    a label-stratified fraction in low-fidelity mode."""
    sc, seed = ctx.cfg.search, ctx.cfg.train.seed
    if sc.data_fraction < 1:
        return _loader(ctx, sc.data_fraction, seed, rows)
    if rows is None or rows is ctx.train_loader.dataset:
        return ctx.train_loader
    return make_loader(rows, ctx.train_loader.collate_fn, ctx.cfg.train.batch_size, True, seed)


def search(ctx: Context) -> tuple[SearchResult, dict | None]:
    sc = ctx.cfg.search
    rows, held_out = _split(ctx)
    wu = warmup(ctx, rows, held_out) if sc.warmup else None
    result = iterative_prune(ctx, search_loader(ctx, rows), wu["mapping"] if wu else None, sc.criteria,
                             sc.round_steps, with_masks=sc.prune_foundation, held_out=held_out)
    return result, wu


def search_cost(found: SearchResult, wu: dict | None, retrain: dict) -> dict:
    """Search cost against one retrain, both without evaluation: without the warm-up, with all of it (what a
    first task pays), and with its share amortised over the tasks that have used this cached mapping so far."""
    steps, seconds = max(1, retrain["steps"]), max(1e-9, retrain["train_seconds_no_eval"])
    w_steps, w_seconds = (wu["steps"], wu["seconds"]) if wu else (0, 0.0)
    uses = max(1, len((wu or {}).get("tasks") or []))
    return {"steps": found.steps, "seconds": found.seconds, "warmup_steps": w_steps, "warmup_seconds": w_seconds,
            "warmup_cached": bool(wu and wu.get("cached")), "warmup_tasks": uses,
            "ratio_steps": found.steps / steps, "ratio_seconds": found.seconds / seconds,
            "ratio_steps_with_warmup": (found.steps + w_steps) / steps,
            "ratio_seconds_with_warmup": (found.seconds + w_seconds) / seconds,
            "ratio_steps_amortised": (found.steps + w_steps / uses) / steps,
            "ratio_seconds_amortised": (found.seconds + w_seconds / uses) / seconds}


def lora_config_dict(result: SearchResult) -> dict | None:
    """The found structure as a plain-peft LoraConfig, JSON-ready: LoRA-only structures on an unpruned base (a
    base whose heads / neurons the combined mode pruned, and adapters, load through prunetune only)."""
    st = result.structure
    pruned = result.plan is not None and (result.plan.heads_pruned() or result.plan.ffn_pruned())
    if st.adapters or not st.lora or pruned:
        return None
    d = st.plain_peft_config(result.arch).to_dict()
    return json.loads(json.dumps(d, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


@dataclass
class PruneResult:
    """A finished PrunePEFT run: the retrained model with the found PEFT structure, that structure, the base plan
    of the combined mode (None: base unpruned), the plain-peft LoraConfig dict of a LoRA-only structure and the
    metrics (the JSON-ready results: search rounds, warm-up, search cost, retrain)."""
    model: torch.nn.Module | None
    structure: PeftStructure
    plan: PruningPlan | None
    metrics: dict
    lora_config: dict | None = None
    hf: torch.nn.Module | None = None
    adapters: object = None
    arch: object = None

    def save(self, folder: str | Path, tokenizer=None, merge: bool = False, overwrite: bool = False,
             task_info: dict | None = None) -> Path:
        """Write a prunetune export of the retrained model (reload: prunetune.AutoPrunedModel.from_pretrained);
        with a tokenizer, AutoTokenizer.from_pretrained(folder) loads it too."""
        from .common import save_trained

        if self.model is None:
            raise PrunetuneError("this result holds no model (its retrain was restored as done from a checkpoint)")
        plan = self.plan or PruningPlan.unpruned(self.arch, self.hf.config.model_type)
        return save_trained(folder, model=self.model, hf=self.hf, plan=plan, adapters=self.adapters,
                            tokenizer=tokenizer, task_info=task_info, merge=merge, overwrite=overwrite)


def search_and_retrain(ctx: Context, export_dir: Path | None = None) -> PruneResult:
    """The method on a prepared Context: search, then retrain the found structure from scratch (exported to
    export_dir when given). Shared by the path route (`run`) and the model-object route (`prune_peft_model`)."""
    cfg = ctx.cfg
    log(f"prunetune search: {ctx.model_path} on {ctx.task.name} — space {cfg.search.space}, "
        f"budget {cfg.search.budget}, {ctx.total_steps} retrain steps on {ctx.device}")
    found, wu = search(ctx)
    log(f"found {len(found.structure.units)} units ({found.budget_params:,} budget): {found.structure.units}"
        + (f"; brought back to fill the budget (unit: width): {found.fill}" if found.fill else ""))
    done = train_fixed(ctx, found.structure, found.plan, export_dir, desc="retrain",
                       checkpoint_dir=checkpoint_root(ctx) / "retrain" if ctx.base is None else None)
    retrain = done.metrics
    lora = lora_config_dict(found)
    results = {
        "config": cfg.to_dict(), "task": task_info(ctx),
        "structure": found.structure.to_dict(), "lora_config": lora,
        "rounds": found.rounds, "fill": found.fill,
        "supernet_params": found.supernet_params, "budget_params": found.budget_params,
        "warmup": wu, "plan": found.plan.summary() if found.plan else None,
        "search_cost": search_cost(found, wu, retrain),
        "retrain_cost": {"steps": retrain["steps"], "seconds": retrain["train_seconds_no_eval"]},
        "retrain": retrain,
    }
    sc, metric = results["search_cost"], ctx.task.metric
    log(f"search: {found.steps} steps / {found.seconds:.1f}s; retrain: {retrain['steps']} steps / "
        f"{retrain['train_seconds_no_eval']:.1f}s (evaluation excluded on both sides); search cost = "
        f"{sc['ratio_steps']:.2f}x retrain (steps), {sc['ratio_seconds']:.2f}x (time); with the warm-up "
        f"{sc['ratio_steps_with_warmup']:.2f}x, amortised over {sc['warmup_tasks']} task(s) "
        f"{sc['ratio_steps_amortised']:.2f}x (steps)")
    if "final" in retrain:
        log(f"dev {metric}: final {retrain['final'][metric]:.4f}, best {retrain['best'][metric]:.4f}; "
            f"trainable params {retrain['trainable_params_no_head']:,} (no head)")
    return PruneResult(model=done.model, structure=found.structure, plan=found.plan, metrics=results,
                       lora_config=lora, hf=done.hf, adapters=done.adapters, arch=found.arch)


def run(cfg: RunConfig, export: bool = True) -> dict:
    """The full PrunePEFT job from paths; writes the structure, results and report to cfg.output_dir."""
    out = Path(cfg.output_dir)
    start_run(cfg, export)
    ctx = prepare(cfg)
    done = search_and_retrain(ctx, out / "model" if export else None)
    results = done.metrics
    if not is_main():
        return results
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "found_structure.json", json.dumps(done.structure.to_dict(), indent=1))
    if results["lora_config"]:
        atomic_write_text(out / "lora_config.json", json.dumps(results["lora_config"], indent=1))
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=str))
    from ..report import write_search_report

    write_search_report(out, results)
    return results


def prune_peft_model(model, train_data, *, config: RunConfig | dict | None = None, dev_data=None, tokenizer=None,
                     collate_fn=None, task=None, **overrides) -> PruneResult:
    """PrunePEFT on a model object: search the PEFT structure on a supernet built on a copy of `model`, retrain
    it from scratch on another copy and return the retrained model, the structure and the metrics (`model`
    itself is left unchanged; nothing is written but the warm-up cache; `result.save(folder, tokenizer)` writes
    an export, `result.lora_config` is the plain-peft LoraConfig of a LoRA-only structure).

    model: a supported HF model, or a LoRA PeftModel, whose base (a copy, LoRA layers taken out unmerged) is
    searched: the search attaches its own units. train_data / dev_data: as for
    light_peft_model (a DataLoader or a dataset of tokenized rows); the search draws subsets of the training
    rows, so a training DataLoader gives its rows and collate_fn and is batched by train.batch_size.

    >>> import torch, prunetune
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> tiny = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
    ...                   intermediate_size=32, max_position_embeddings=32)
    >>> rows = [{"input_ids": torch.randint(1, 50, (8,)), "attention_mask": torch.ones(8, dtype=torch.long),
    ...          "labels": i % 2} for i in range(16)]
    >>> import tempfile
    >>> prunetune.logs.set_verbosity("warning")  # the search logs its rounds at info
    >>> res = prunetune.prune_peft_model(BertForSequenceClassification(tiny), rows, dev_data=rows,
    ...         train__epochs=1, train__batch_size=4, train__eval_each_epoch=False, search__warmup=False,
    ...         search__space=["lora_qv", "adapter_ffn"], search__budget=0.5, search__lora_r=2,
    ...         search__adapter_size=2, search__warmup_cache=tempfile.mkdtemp())
    >>> 0 < len(res.structure.units) < 4, "accuracy" in res.metrics["retrain"]["final"]
    (True, True)
    >>> prunetune.logs.set_verbosity("info")
    """
    from ..config import run_config
    from .common import object_context

    cfg = run_config(config, overrides)
    if hasattr(model, "peft_config"):  # the search brings its own PEFT units: it starts from the base inside
        model = base_of_peft_model(model)
    ctx = object_context(cfg, model, train_data=train_data, dev_data=dev_data, tokenizer=tokenizer,
                         collate_fn=collate_fn, task=task, base=model, rows=True)
    return search_and_retrain(ctx)


def base_of_peft_model(model):
    """A copy of a LoRA PeftModel's base model with its LoRA layers taken out (not merged): what the model was
    before it was wrapped (the caller's model is not changed)."""
    from .common import peft_inner_model

    peft_inner_model(model)  # a LoRA PeftModel without modules_to_save wrappers, or a clear refusal
    log("prunetune search: the PeftModel's own LoRA modules are set aside; the search builds its units on its base")
    return copy.deepcopy(model).unload()
