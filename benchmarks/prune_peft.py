"""PrunePEFT vs fixed PEFT configurations at equal budget, on the real MiniLM, per task, in one run.

    python benchmarks/prune_peft.py --tasks rte,cola,sst2 --data-root ../shared/data

Compares, with identical retrain hyperparameters and seed:
  lora-everywhere    LoRA on q+v of every layer (the search space's LoRA unit at every layer)
  adapters-everywhere serial bottleneck adapter after every FFN (the space's adapter unit at every layer)
  uniform-lora       LoRA on every projection the space's LoRA units cover, at the largest uniform rank that
                     fits the budget (what a user picks by default, at PrunePEFT's budget)
  uniform-lora-up    the same at the smallest uniform rank that reaches the budget (with uniform-lora it
                     brackets the budget when no uniform rank spends it exactly)
  random-prune       the supernet pruned to the budget with the `random` criterion (no warm-up)
  prunepeft          the supernet pruned to the budget with the hybrid criteria (warm-up mapping, cached)
  chosen-fixed       (--select-fixed) the fixed configuration that wins on a held-out split of the TRAINING
                     data (each trained on the rest), scored on dev: best fixed without peeking at dev
Both pruned configurations spend what the last whole-unit removal leaves of the budget on that round's best
removed unit at a smaller rank / bottleneck size (`search.fill`). Budget (`--budget`): `fixed` = the smaller
of the two fixed configurations' PEFT parameters, or a fraction of the supernet (e.g. 0.1). Search cost is
reported next to the retrain cost (steps and seconds, evaluation excluded on both sides), with and without
the warm-up, and with the warm-up's share amortised over the tasks of the run.

With several seeds the summary gives each configuration's mean +- std and PrunePEFT's paired difference to
each (95% t interval). `--json runs/prune_{task}.json` writes one file per task with a top-level `summary`,
rewritten after every seed. Within a seed, each training's result goes to OUT/TASK-seedSEED/progress.json as it
ends: a seed cut short (a session's end) goes on where it stopped when the same command runs again.

`--space` widens the search (e.g. lora_qv,lora_ffn,adapter_attn; the fixed configurations stay the two above).
`--configs prunepeft --reuse earlier.json` retrains only PrunePEFT and takes the other rows of the same task and
seed from an earlier run's JSON (fixed configurations retrain deterministically given the seed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")  # before torch: importing torch imports tqdm, which reads it then

import torch  # noqa: E402
from light_peft import GLUE_DIRS  # noqa: E402  (benchmarks/ is on sys.path when a script here runs)

from prunetune.arch import get_arch  # noqa: E402
from prunetune.config import from_dict, set_dotted, yaml_load  # noqa: E402
from prunetune.io import atomic_write_text  # noqa: E402
from prunetune.methods.common import prepare, train_fixed  # noqa: E402
from prunetune.methods.prune_peft import iterative_prune, search, search_cost, search_loader  # noqa: E402
from prunetune.report.stats import mean_std, paired_summary  # noqa: E402
from prunetune.units.structure import UNIT_TYPES, PeftStructure, unit_positions  # noqa: E402

CONFIGS = ("lora-everywhere", "adapters-everywhere", "uniform-lora", "uniform-lora-up", "random-prune", "prunepeft",
           "chosen-fixed")
FIXED = ("lora-everywhere", "adapters-everywhere")


def fixed(arch, unit_type: str, sc) -> PeftStructure:
    pos = [p for layer in range(arch.num_layers) for p in unit_positions(arch, unit_type, layer)]
    if unit_type.startswith("lora"):
        return PeftStructure(lora={p: sc.lora_r for p in pos}, lora_alpha=sc.lora_alpha, lora_r_base=sc.lora_r)
    return PeftStructure(adapters={p: sc.adapter_size for p in pos})


def peft_params(ctx, structure: PeftStructure) -> int:
    """PEFT parameters of a structure, counted on a freshly built model (task head excluded)."""
    from prunetune.models import load_model

    hf = load_model(ctx.model_path, ctx.task.num_labels)
    _model, adapters = structure.build(hf, get_arch(hf))
    n = sum(p.numel() for name, p in hf.named_parameters() if "lora_" in name)
    return n + (sum(p.numel() for p in adapters.parameters()) if adapters is not None else 0)


def uniform_lora(ctx, arch, sc, budget: int, up: bool = False) -> PeftStructure:
    """LoRA on every projection the space's LoRA unit types cover (q+v when it has none), at the largest
    uniform rank whose parameters fit the budget (at least 1); up: the smallest that reaches it."""
    types = [t for t in sc.space if UNIT_TYPES[t]["kind"] == "lora"] or ["lora_qv"]
    pos = [p for t in types for layer in range(arch.num_layers) for p in unit_positions(arch, t, layer)]
    per_rank = peft_params(ctx, PeftStructure(lora={p: 1 for p in pos}, lora_r_base=1))
    r = max(1, -(-budget // per_rank) if up else budget // per_rank)
    # alpha scales with the rank as in the space's units (alpha / r constant), so only the width differs
    return PeftStructure(lora={p: r for p in pos}, lora_alpha=sc.lora_alpha * r / sc.lora_r, lora_r_base=r)


class Progress:
    """A seed's finished trainings, written to OUT/TASK-seedSEED/progress.json as each one ends, so a seed cut short
    (a session's end: a seed at a learning size trains 12 models, for hours on a CPU) goes on where it stopped when
    the same command runs again. The search is not stored: it is deterministic given the seed and cheap, and
    its warm-up is cached. A file written with other settings is refused, not mixed in."""

    KEYS = ("model", "data_root", "train_samples", "eval_samples", "max_length", "epochs", "batch_size", "lr",
            "space", "k", "chunk", "data_fraction", "budget", "fixed", "common")

    def __init__(self, args, task: str, seed: int):
        self.path = Path(args.out) / f"{task}-seed{seed}" / "progress.json"
        settings = json.loads(json.dumps({k: getattr(args, k) for k in self.KEYS}))
        self.data = {"settings": settings, "select": {}, "rows": {}}
        if self.path.is_file():
            old = json.loads(self.path.read_text())
            if old.get("settings") != settings:
                raise SystemExit(f"error: {self.path} holds this seed's trainings under other settings: "
                                 "use another --out, or delete it to start the seed again")
            self.data = old
            print(f"   continuing from {self.path}: {len(old['select'])} split and {len(old['rows'])} dev "
                  "trainings done", flush=True)

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=1))  # a kill mid-write leaves the previous file


def choose_fixed(ctx, structures: dict[str, PeftStructure], seed: int, progress: Progress,
                 fraction: float = 0.2) -> tuple[str, dict]:
    """The fixed configuration that scores best on a stratified split of the TRAINING rows, each trained on
    the other rows (the dev set is never looked at)."""
    import dataclasses

    from prunetune.data import stratified_split
    from prunetune.train import make_loader

    held, rest = stratified_split(ctx.train_loader.dataset, fraction, seed)
    collate, t = ctx.train_loader.collate_fn, ctx.cfg.train
    sub = dataclasses.replace(ctx, train_loader=make_loader(rest, collate, t.batch_size, True, seed),
                              dev_loader=make_loader(held, collate, t.eval_batch_size, False, seed))
    metric = ctx.task.metric
    scores = {}
    done = progress.data["select"]
    for name, st in structures.items():
        if name in done:  # trained before this run was cut short
            scores[name] = done[name]
            continue
        t0 = time.perf_counter()
        r = train_fixed(sub, st, desc=f"select {name}").metrics
        scores[name] = done[name] = r["final"][metric]
        progress.save()
        print(f"-- select {name}: {metric} {scores[name]:.4f} on the training split "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)  # a seed runs for an hour: show where it is
    from prunetune.data.metrics import greater_is_better

    pick = (max if greater_is_better(metric) else min)(scores, key=scores.get)
    return pick, scores


def base_config(*, model: str, task: str, data_root: str, train_samples: int | None, max_length: int, epochs: float,
                batch_size: int, lr: float, seed: int, space: list[str], k: float, data_fraction: float,
                chunk: int | None, cache: str, output_dir: str, eval_samples: int | None = None,
                overrides: dict | None = None) -> dict:
    """The run config of one task and seed (shared with search_cost.py, so both measure the same setup);
    overrides: {dotted key: value}, applied last (--set)."""
    base = {
        "model": {"name_or_path": model},
        "data": {"task": task, "data_dir": str(Path(data_root) / GLUE_DIRS[task]), "max_train_samples": train_samples,
                 "max_eval_samples": eval_samples, "max_length": max_length},
        "train": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed},
        "search": {"space": space, "k": k, "data_fraction": data_fraction, "warmup_cache": cache, "chunk": chunk},
        "output_dir": output_dir,
    }
    for dotted, value in (overrides or {}).items():
        set_dotted(base, dotted, value)
    return base


def bench_task(task: str, args, seed: int) -> dict:
    base = base_config(model=args.model, task=task, data_root=args.data_root, train_samples=args.train_samples,
                       eval_samples=args.eval_samples, max_length=args.max_length, epochs=args.epochs,
                       batch_size=args.batch_size, lr=args.lr, seed=seed, space=args.space, k=args.k,
                       data_fraction=args.data_fraction, chunk=args.chunk, cache=args.cache,
                       output_dir=str(Path(args.out) / f"{task}-seed{seed}"), overrides=args.common)
    ctx = prepare(from_dict(base))
    from prunetune.models import load_model

    arch = get_arch(load_model(ctx.model_path, ctx.task.num_labels))
    sc = ctx.cfg.search
    if args.fixed == "each":  # one fixed configuration per unit type of the space, at its full width
        configs = {f"{t}-everywhere": fixed(arch, t, sc) for t in sc.space}
    else:
        configs = {"lora-everywhere": fixed(arch, "lora_qv", sc), "adapters-everywhere": fixed(arch, "adapter_ffn", sc)}
    fixed_names = list(configs)
    if args.budget == "fixed":
        budget = min(peft_params(ctx, s) for s in configs.values())
    else:  # a fraction of the supernet: the whole space at full width
        whole = [fixed(arch, t, sc) for t in sc.space]
        supernet = PeftStructure(lora={k: v for st in whole for k, v in st.lora.items()},
                                 adapters={k: v for st in whole for k, v in st.adapters.items()},
                                 lora_alpha=sc.lora_alpha, lora_r_base=sc.lora_r)
        budget = int(float(args.budget) * peft_params(ctx, supernet))
    ctx.cfg.search.budget = float(budget)
    if "uniform-lora" in args.configs:
        configs["uniform-lora"] = uniform_lora(ctx, arch, sc, budget)
    if "uniform-lora-up" in args.configs:
        configs["uniform-lora-up"] = uniform_lora(ctx, arch, sc, budget, up=True)
    print(f"== {task} (seed {seed}): {len(ctx.train_loader.dataset)} train / {len(ctx.dev_loader.dataset)} dev, "
          f"{ctx.total_steps} retrain steps, budget {budget:,} PEFT params", flush=True)

    found, wu = search(ctx)
    if "random-prune" in args.configs:
        configs["random-prune"] = iterative_prune(ctx, search_loader(ctx), None, ["random"], sc.round_steps,
                                                  desc="random").structure
    configs["prunepeft"] = found.structure
    metric = ctx.task.metric
    rows = _reused(args, task, seed)
    progress = Progress(args, task, seed)
    selection = None
    if "chosen-fixed" in args.configs:
        pick, on_split = choose_fixed(ctx, {n: configs[n] for n in fixed_names}, seed, progress)
        selection = {"picked": pick, "train_split_scores": on_split}
    have = {r["config"] for r in rows}  # reused from earlier runs
    # --fixed each retrains every fixed configuration, except those an earlier run's JSON already has
    wanted = set(args.configs) | ((set(fixed_names) - have) if args.fixed == "each" else set())
    for name, structure in configs.items():
        if name not in wanted and not (name in fixed_names and "chosen-fixed" in args.configs and name not in have):
            continue
        if name in progress.data["rows"] and progress.data["rows"][name]["units"] == (structure.units or None):
            rows.append(progress.data["rows"][name])  # trained before this run was cut short (same structure)
            continue
        print(f"-- {name}: {len(structure.lora)} LoRA modules, {len(structure.adapters)} adapters", flush=True)
        r = train_fixed(ctx, structure, desc=name).metrics
        rows.append({"task": task, "seed": seed, "metric": metric, "config": name, "final": r["final"][metric],
                     "best": r["best"][metric], "trainable_no_head": r["trainable_params_no_head"],
                     "retrain_steps": r["steps"], "retrain_seconds": r["train_seconds_no_eval"],
                     "units": structure.units or None})
        print(f"   {name}: dev {metric} {rows[-1]['final']:.4f}, {r['train_seconds_no_eval']:.0f} s of training",
              flush=True)
        progress.data["rows"][name] = rows[-1]
        progress.save()
    if selection is None and any(r["config"] == "chosen-fixed" for r in rows):  # reused with its row
        selection = next(r for _path, r in _earlier_runs(args, task, seed) if r.get("selection"))["selection"]
    elif selection is not None:  # the picked configuration's dev row, under its own name
        picked = next(r for r in rows if r["config"] == selection["picked"])
        rows.append(dict(picked, config="chosen-fixed", chosen=selection["picked"]))
    rows.sort(key=lambda r: CONFIGS.index(r["config"]) if r["config"] in CONFIGS else 0.5)
    retrain = next(r for r in rows if r["config"] == "prunepeft")
    cost = {**search_cost(found, wu, {"steps": retrain["retrain_steps"],
                                      "train_seconds_no_eval": retrain["retrain_seconds"]}),
            "search_steps": found.steps, "search_seconds": found.seconds, "retrain_steps": retrain["retrain_steps"],
            "found_units": found.structure.units, "fill": found.fill, "mapping": (wu or {}).get("mapping")}
    print(json.dumps({"rows": rows, "cost": cost, "selection": selection}, indent=1), flush=True)
    return {"task": task, "seed": seed, "space": args.space, "budget": budget, "rows": rows, "cost": cost,
            "selection": selection}


def _reused(args, task: str, seed: int) -> list[dict]:
    """Rows of the configurations not retrained in this run, from earlier runs' JSON (same task and seed;
    the fixed configurations' retrains are deterministic given the seed; random pruning only from a run whose
    units lie in this run's search space)."""
    rows = []
    for path, res in _earlier_runs(args, task, seed):
        rows += [dict(r, reused=r.get("reused", path)) for r in res["rows"]
                 if r["config"] not in args.configs and r["config"] not in {x["config"] for x in rows}
                 and (r["config"] != "random-prune" or _in_space(r["units"], args.space))]
    required = {"random-prune", *(FIXED if args.fixed == "paper" else ())}  # --fixed each: retrained if missing
    missing = sorted(required - set(args.configs) - {r["config"] for r in rows})
    if missing:
        raise SystemExit(f"error: no row for {', '.join(missing)} ({task}, seed {seed}): retrain it or --reuse a JSON")
    return rows


def _earlier_runs(args, task: str, seed: int) -> list[tuple[str, dict]]:
    """(file, run) of this task and seed in the --reuse files, in their order."""
    out = []
    for path in args.reuse:
        data = json.loads(Path(path).read_text())
        runs = data["runs"] if isinstance(data, dict) else data  # a --json / --merge file, or a bare list
        out += [(path, r) for r in runs if r["task"] == task and r["seed"] == seed]
    return out


def overrides(items: list[str]) -> dict:
    """--set KEY=VALUE items as {dotted key: value} (values parsed as YAML)."""
    return {k.strip(): yaml_load(v) for k, _, v in (item.partition("=") for item in items)}


def _in_space(units: list[str] | None, space: list[str]) -> bool:
    return all(u.split("@")[0] in space for u in units or [])


def table(results: list[dict]) -> str:
    lines = ["| task | config | dev final | dev best | trainable PEFT params (no head) |", "|---|---|---|---|---|"]
    for res in results:
        for r in res["rows"]:
            lines.append(f"| {r['task']} ({r['metric']}) | {r['config']} | {r['final']:.4f} | {r['best']:.4f} | "
                         f"{r['trainable_no_head']:,} |")
    lines += ["", "| task | search steps / retrain steps | search s / retrain s | incl. warm-up (steps; amortised) "
              "| found units |", "|---|---|---|---|---|"]
    for res in results:
        c = res["cost"]
        warm = (f"{c['ratio_steps_with_warmup']:.2f}x; {c['ratio_steps_amortised']:.2f}x over {c['warmup_tasks']} "
                f"task(s){' (cached)' if c['warmup_cached'] else ''}")
        lines.append(f"| {res['task']} (seed {res['seed']}) | {c['search_steps']} / {next(r for r in res['rows'] if r['config'] == 'prunepeft')['retrain_steps']}"
                     f" = {c['ratio_steps']:.2f}x | {c['ratio_seconds']:.2f}x | {warm} | {_units(c)} |")
    return "\n".join(lines)


def _units(cost: dict) -> str:
    """Found units; one brought back at a smaller width by the budget fill shows it, e.g. lora_qv@2 (width 5)."""
    fill = cost.get("fill") or {}
    return ", ".join(f"{u} (width {fill[u]})" if u in fill else u for u in cost["found_units"])


def task_summary(runs: list[dict], n_tasks: int, model: str) -> dict:
    """One task over its seeds: each configuration's mean, PrunePEFT's paired difference to each (prunepeft -
    config, 95% t interval), and the search cost against one retrain, without the warm-up and with its share
    amortised over the `n_tasks` tasks of this run that reuse the cached mapping."""
    runs = sorted(runs, key=lambda r: r["seed"])
    configs = list(dict.fromkeys(row["config"] for r in runs for row in r["rows"]))
    finals = {c: [_final(r, c) for r in runs] for c in configs}
    method = finals["prunepeft"]
    paired = {}
    for c in configs:
        if c != "prunepeft":
            ps = paired_summary(finals[c], method)
            paired[c] = {"diff_mean": ps.diff_mean, "diff_std": ps.diff_std,
                         "ci95": list(ps.diff_ci95) if ps.diff_ci95 else None}
    # Seconds are the headline: a search or warm-up step (the whole supernet, scoring, drop_loss forwards per
    # unit) costs several retrain steps, so a step ratio understates what the search costs.
    cost = [r["cost"] for r in runs]
    n = max(1, n_tasks)
    ratio = mean_std([c["ratio_seconds"] for c in cost])[0]
    retrain_s = [next(row for row in r["rows"] if row["config"] == "prunepeft")["retrain_seconds"] for r in runs]
    with_wu = mean_std([(c["search_seconds"] + c["warmup_seconds"] / n) / t for c, t in zip(cost, retrain_s)])[0]
    ratio_steps = mean_std([c["ratio_steps"] for c in cost])[0]
    with_wu_steps = mean_std([(c["search_steps"] + c["warmup_steps"] / n) / c["retrain_steps"] for c in cost])[0]
    return {"task": runs[0]["task"], "metric": runs[0]["rows"][0]["metric"], "model": model,
            "seeds": [r["seed"] for r in runs], "budget": runs[0].get("budget"), "space": runs[0]["space"],
            "means": {c: mean_std(v)[0] for c, v in finals.items()},
            "stds": {c: mean_std(v)[1] for c, v in finals.items()},
            "paired_vs": paired, "search_cost_ratio": ratio, "search_cost_ratio_with_warmup": with_wu,
            "search_cost_ratio_with_full_warmup": mean_std([c["ratio_seconds_with_warmup"] for c in cost])[0],
            "search_cost_unit": "seconds (evaluation excluded on both sides)",
            "search_cost_ratio_steps": ratio_steps, "search_cost_ratio_steps_with_warmup": with_wu_steps,
            "warmup_amortised_over_tasks": n_tasks,
            "chosen_fixed": [r["selection"]["picked"] for r in runs if r.get("selection")] or None}


def seed_summary(summaries: list[dict]) -> str:
    lines = ["| task | config | dev final, mean +- std over seeds | prunepeft - config, mean [95% CI] | seeds |",
             "|---|---|---|---|---|"]
    for s in summaries:
        for c, mean in s["means"].items():
            pv = s["paired_vs"].get(c)
            diff = "" if pv is None else f"{pv['diff_mean']:+.4f}" + (
                " [{:+.4f}, {:+.4f}]".format(*pv["ci95"]) if pv["ci95"] else "")
            lines.append(f"| {s['task']} ({s['metric']}) | {c} | {mean:.4f} +- {s['stds'][c]:.4f} | {diff} | "
                         f"{len(s['seeds'])} |")
        lines.append(f"| {s['task']} | search cost / one retrain (seconds) | {s['search_cost_ratio']:.2f}x; with the "
                     f"warm-up amortised over {s['warmup_amortised_over_tasks']} task(s) "
                     f"{s['search_cost_ratio_with_warmup']:.2f}x (steps: {s['search_cost_ratio_steps']:.2f}x; "
                     f"{s['search_cost_ratio_steps_with_warmup']:.2f}x) | | |")
    return "\n".join(lines)


def _final(result: dict, config: str) -> float:
    return next(row["final"] for row in result["rows"] if row["config"] == config)


def write_json(pattern: str, task: str, results: list[dict], n_tasks: int, model: str, argv: list[str]) -> None:
    runs = [r for r in results if r["task"] == task]
    path = Path(pattern.format(task=task))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"summary": task_summary(runs, n_tasks, model),
                                "command": "python benchmarks/prune_peft.py " + " ".join(argv), "runs": runs},
                               indent=1))


def merge(args, argv: list[str]) -> int:
    """--merge: the runs of several JSON files (one seed each, say) into one file per task, summarised; a task
    and seed found twice is refused (two runs of one seed would count as two seeds)."""
    files = [f for f in args.merge.split(",") if f.strip()]
    if not args.json or not files:
        raise SystemExit("error: --merge needs files and --json")
    runs, seen, commands = [], set(), []
    for f in files:
        data = json.loads(Path(f).read_text())
        commands.append(data["command"])
        for r in data["runs"]:
            if (r["task"], r["seed"]) in seen:
                raise SystemExit(f"error: {r['task']} seed {r['seed']} is in more than one merged file ({f})")
            seen.add((r["task"], r["seed"]))
            runs.append(r)
    tasks = list(dict.fromkeys(r["task"] for r in runs))
    n = args.warmup_tasks or len(tasks)
    summaries = []
    for task in tasks:
        path = Path(args.json.format(task=task))
        path.parent.mkdir(parents=True, exist_ok=True)
        mine = [r for r in runs if r["task"] == task]
        summaries.append(task_summary(mine, n, args.model))
        path.write_text(json.dumps({"summary": summaries[-1], "commands": commands,
                                    "merged_by": "python benchmarks/prune_peft.py " + " ".join(argv),
                                    "runs": sorted(mine, key=lambda r: r["seed"])}, indent=1))
    print(seed_summary(summaries))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="rte,cola,sst2")
    p.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--model", default="minilm")
    p.add_argument("--train-samples", type=int, default=2000)
    p.add_argument("--eval-samples", type=int, default=None)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--space", default="lora_qv,adapter_ffn", help="search space (unit types); the fixed "
                   "configurations stay LoRA on q+v and the FFN adapter at every layer")
    p.add_argument("--k", type=float, default=2)
    p.add_argument("--chunk", type=int, default=None, help="rank-granular search: ranks / bottleneck units per "
                   "searched unit (search.chunk); unset = whole units")
    p.add_argument("--data-fraction", type=float, default=0.1)
    p.add_argument("--seeds", default="42", help="comma-separated; search and retrains are repeated per seed")
    p.add_argument("--cache", default="runs/bench_prune/cache")
    p.add_argument("--out", default="runs/bench_prune")
    p.add_argument("--configs", default=",".join(CONFIGS), help="configurations to retrain this run")
    p.add_argument("--reuse", default="", help="comma-separated JSON files of earlier runs: rows of the "
                   "configurations not retrained here (matched by task and seed)")
    p.add_argument("--budget", default="fixed", help="`fixed` (the smaller fixed configuration's PEFT "
                   "parameters) or a fraction of the supernet, e.g. 0.1")
    p.add_argument("--fixed", choices=("paper", "each"), default="paper", help="fixed configurations: the "
                   "paper's two (LoRA q+v everywhere, adapters after every FFN) or one per unit type of --space")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run (e.g. search.warmup_by=prediction); repeatable")
    p.add_argument("--json", help="one file per task (`{task}` in the name), rewritten after every seed")
    p.add_argument("--merge", default="", help="comma-separated JSON files of runs made side by side (e.g. one "
                   "process per seed): train nothing, write their runs into --json with one summary per task")
    p.add_argument("--warmup-tasks", type=int, default=None, help="with --merge: tasks sharing each seed's cached "
                   "warm-up (its cost is amortised over them); default: the tasks in the merged files")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    args.reuse = [f for f in args.reuse.split(",") if f.strip()]
    args.space = [t.strip() for t in args.space.split(",") if t.strip()]
    args.common = overrides(args.set)
    if missing := [f for f in args.reuse if not Path(f).is_file()]:
        p.error(f"--reuse: no such file: {', '.join(missing)}")
    if not set(args.configs) <= set(CONFIGS) or "prunepeft" not in args.configs:
        p.error(f"--configs takes prunepeft and any of {', '.join(c for c in CONFIGS if c != 'prunepeft')}; "
                f"got {','.join(args.configs)}")
    if args.budget != "fixed" and not 0 < float(args.budget) <= 1:
        p.error(f"--budget takes `fixed` or a fraction in (0, 1], got {args.budget}")
    if args.merge:
        return merge(args, argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.json and len(tasks) > 1 and "{task}" not in args.json:
        p.error("--json needs `{task}` in the file name when several tasks run (one file per task)")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    results = []
    for task in tasks:
        for seed in seeds:
            results.append(bench_task(task, args, seed))
            if args.json:  # partial results survive a run cut short
                write_json(args.json, task, results, len(tasks), args.model, argv)
    print("\n" + table(results))
    print("\n" + seed_summary([task_summary([r for r in results if r["task"] == t], len(tasks), args.model)
                               for t in dict.fromkeys(r["task"] for r in results)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
