"""PrunePEFT vs fixed PEFT configurations at equal budget, on the real MiniLM, per task, in one run.

    python benchmarks/prune_peft.py --tasks rte,cola,sst2 --data-root ../shared/data

Compares, with identical retrain hyperparameters and seed:
  lora-everywhere    LoRA on q+v of every layer (the search space's LoRA unit at every layer)
  adapters-everywhere serial bottleneck adapter after every FFN (the space's adapter unit at every layer)
  random-prune       the supernet pruned to the budget with the `random` criterion (no warm-up)
  prunepeft          the supernet pruned to the budget with the hybrid criteria (warm-up mapping, cached)
Both pruned configurations spend what the last whole-unit removal leaves of the budget on that round's best
removed unit at a smaller rank / bottleneck size (`search.fill`). Budget = the smaller of the two fixed
configurations' PEFT parameters. Search cost is reported next to the retrain cost (steps and seconds), with
and without the one-off warm-up.

`--space` widens the search (e.g. lora_qv,lora_ffn,adapter_attn; the fixed configurations stay the two above).
`--configs prunepeft --reuse earlier.json` retrains only PrunePEFT and takes the other rows of the same task and
seed from an earlier run's JSON (fixed configurations retrain deterministically given the seed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")  # before torch: importing torch imports tqdm, which reads it then

import torch  # noqa: E402

from prunetune.arch import get_arch  # noqa: E402
from prunetune.config import from_dict  # noqa: E402
from prunetune.methods.common import prepare, train_fixed  # noqa: E402
from prunetune.methods.prune_peft import iterative_prune, search, search_cost, search_loader  # noqa: E402
from prunetune.units.structure import PeftStructure, unit_positions  # noqa: E402

GLUE_DIRS = {"sst2": "SST-2", "rte": "RTE", "cola": "CoLA", "stsb": "STS-B"}
CONFIGS = ("lora-everywhere", "adapters-everywhere", "random-prune", "prunepeft")


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


def bench_task(task: str, args, seed: int) -> dict:
    base = {
        "model": {"name_or_path": args.model},
        "data": {"task": task, "data_dir": str(Path(args.data_root) / GLUE_DIRS[task]),
                 "max_train_samples": args.train_samples, "max_eval_samples": args.eval_samples,
                 "max_length": args.max_length},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": seed},
        "search": {"space": args.space, "k": args.k, "data_fraction": args.data_fraction,
                   "warmup_cache": args.cache},
        "output_dir": str(Path(args.out) / f"{task}-seed{seed}"),
    }
    ctx = prepare(from_dict(base))
    from prunetune.models import load_model

    arch = get_arch(load_model(ctx.model_path, ctx.task.num_labels))
    sc = ctx.cfg.search
    configs = {"lora-everywhere": fixed(arch, "lora_qv", sc), "adapters-everywhere": fixed(arch, "adapter_ffn", sc)}
    budget = min(peft_params(ctx, s) for s in configs.values())
    ctx.cfg.search.budget = float(budget)
    print(f"== {task} (seed {seed}): {len(ctx.train_loader.dataset)} train / {len(ctx.dev_loader.dataset)} dev, "
          f"{ctx.total_steps} retrain steps, budget {budget:,} PEFT params", flush=True)

    found, wu = search(ctx)
    if "random-prune" in args.configs:
        configs["random-prune"] = iterative_prune(ctx, search_loader(ctx), None, ["random"], sc.round_steps,
                                                  desc="random").structure
    configs["prunepeft"] = found.structure
    metric = ctx.task.metric
    rows = _reused(args, task, seed)
    for name, structure in configs.items():
        if name not in args.configs:
            continue
        print(f"-- {name}: {len(structure.lora)} LoRA modules, {len(structure.adapters)} adapters", flush=True)
        r = train_fixed(ctx, structure, desc=name)
        r.pop("_model")
        rows.append({"task": task, "seed": seed, "metric": metric, "config": name, "final": r["final"][metric],
                     "best": r["best"][metric], "trainable_no_head": r["trainable_params_no_head"],
                     "retrain_steps": r["steps"], "retrain_seconds": r["train_seconds_no_eval"],
                     "units": structure.units or None})
    rows.sort(key=lambda r: CONFIGS.index(r["config"]))
    retrain = next(r for r in rows if r["config"] == "prunepeft")
    cost = {**search_cost(found, wu, {"steps": retrain["retrain_steps"],
                                      "train_seconds_no_eval": retrain["retrain_seconds"]}),
            "search_steps": found.steps, "search_seconds": found.seconds,
            "found_units": found.structure.units, "fill": found.fill, "mapping": (wu or {}).get("mapping")}
    print(json.dumps({"rows": rows, "cost": cost}, indent=1), flush=True)
    return {"task": task, "seed": seed, "space": args.space, "rows": rows, "cost": cost}


def _reused(args, task: str, seed: int) -> list[dict]:
    """Rows of the configurations not retrained in this run, from earlier runs' JSON (same task and seed;
    the fixed configurations' retrains are deterministic given the seed; random pruning only from a run whose
    units lie in this run's search space)."""
    rows = []
    for path in args.reuse:
        for res in json.loads(Path(path).read_text()):
            if res["task"] == task and res["seed"] == seed:
                rows += [dict(r, reused=path) for r in res["rows"]
                         if r["config"] not in args.configs and r["config"] not in {x["config"] for x in rows}
                         and (r["config"] != "random-prune" or _in_space(r["units"], args.space))]
    missing = sorted(set(CONFIGS) - set(args.configs) - {r["config"] for r in rows})
    if missing:
        raise SystemExit(f"error: no row for {', '.join(missing)} ({task}, seed {seed}): retrain it or --reuse a JSON")
    return rows


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


def seed_summary(results: list[dict]) -> str:
    """Per task and configuration: mean +- std of the final dev metric over seeds, and in how many seeds
    PrunePEFT matched or beat the best fixed configuration of that seed."""
    lines = ["| task | config | dev final, mean +- std over seeds | trainable PEFT params (no head), mean | seeds |",
             "|---|---|---|---|---|"]
    for task in dict.fromkeys(r["task"] for r in results):
        runs = [r for r in results if r["task"] == task]
        for config in dict.fromkeys(row["config"] for r in runs for row in r["rows"]):
            rows = [row for r in runs for row in r["rows"] if row["config"] == config]
            vals = torch.tensor([row["final"] for row in rows], dtype=torch.float64)
            std = float(vals.std()) if len(vals) > 1 else 0.0
            params = sum(row["trainable_no_head"] for row in rows) / len(rows)
            lines.append(f"| {task} ({rows[0]['metric']}) | {config} | {float(vals.mean()):.4f} +- {std:.4f} | "
                         f"{params:,.0f} | {len(rows)} |")
        wins = sum(_final(r, "prunepeft") >= max(_final(r, "lora-everywhere"), _final(r, "adapters-everywhere"))
                   for r in runs)
        lines.append(f"| {task} | prunepeft >= best fixed | {wins} of {len(runs)} seeds | | |")
    return "\n".join(lines)


def _final(result: dict, config: str) -> float:
    return next(row["final"] for row in result["rows"] if row["config"] == config)


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
    p.add_argument("--data-fraction", type=float, default=0.1)
    p.add_argument("--seeds", default="42", help="comma-separated; search and retrains are repeated per seed")
    p.add_argument("--cache", default="runs/bench_prune/cache")
    p.add_argument("--out", default="runs/bench_prune")
    p.add_argument("--configs", default=",".join(CONFIGS), help="configurations to retrain this run")
    p.add_argument("--reuse", default="", help="comma-separated JSON files of earlier runs: rows of the "
                   "configurations not retrained here (matched by task and seed)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    args.reuse = [f for f in args.reuse.split(",") if f.strip()]
    args.space = [t.strip() for t in args.space.split(",") if t.strip()]
    if missing := [f for f in args.reuse if not Path(f).is_file()]:
        p.error(f"--reuse: no such file: {', '.join(missing)}")
    if not set(args.configs) <= set(CONFIGS) or "prunepeft" not in args.configs:
        p.error(f"--configs takes prunepeft and any of {', '.join(CONFIGS[:3])}; got {','.join(args.configs)}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    results = [bench_task(t.strip(), args, seed) for t in args.tasks.split(",") if t.strip() for seed in seeds]
    print("\n" + table(results))
    print("\n" + seed_summary(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
