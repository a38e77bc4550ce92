"""Vanilla LoRA vs Light-PEFT on the real MiniLM, side by side in one run, per task.

    python benchmarks/light_peft.py --tasks sst2,rte --data-root ../shared/data
    python benchmarks/light_peft.py --tasks sst2 --seeds 3 --json benchmarks/results/light_{task}.json

Prints, per task: dev metric of each, train-step time ratio, end-to-end time ratio (estimation included),
peak training memory ratio, inference-latency ratio. Both runs share seed, data order, schedule and
hyperparameters; only Light-PEFT's estimation/pruning differs. With several seeds (`--seeds N`: N seeds from
`--seed` on, or a comma list), each seed trains both sides again and the summary gives mean +- std of both and
the paired difference (Light-PEFT - vanilla) with a 95% t interval. The JSON (one file per task; `{task}` in
the name) is rewritten after every seed, so a run cut short keeps the seeds it finished; within a seed, each
side's loss and per-epoch dev metrics go to OUT/TASK-seedSEED/logs/SIDE/metrics.jsonl as they come.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")  # before torch: importing torch imports tqdm, which reads it then

import torch  # noqa: E402

from prunetune.config import from_dict, set_dotted, yaml_load  # noqa: E402
from prunetune.methods.common import prepare  # noqa: E402
from prunetune.methods.light_peft import train_light, train_vanilla  # noqa: E402
from prunetune.report.stats import mean_std, paired_summary  # noqa: E402

GLUE_DIRS = {"sst2": "SST-2", "rte": "RTE", "cola": "CoLA", "stsb": "STS-B"}


def latency_ms(model, batch: dict, repeats: int) -> float:
    """Median forward latency of one dev batch (eval mode, no grad), synchronised on CUDA (kernels are async)."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    model.eval()
    times = []
    with torch.no_grad():
        for i in range(3 + repeats):
            sync()
            t0 = time.perf_counter()
            model(**batch)
            sync()
            if i >= 3:  # the first calls warm up kernels and caches
                times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def compare_row(task: str, ctx, van: dict, light: dict) -> dict:
    """One task's vanilla-vs-Light-PEFT figures (both results carry `latency_ms`)."""
    metric = ctx.task.metric
    return {
        "task": task, "metric": metric, "steps": ctx.total_steps,
        "vanilla_final": van["final"][metric], "vanilla_best": van["best"][metric],
        "step_speedup": van["step_seconds"] / light["step_seconds"],
        "e2e_speedup": van["train_seconds"] / light["train_seconds"],
        "memory_ratio": light["peak_mb"] / van["peak_mb"],
        "inference_speedup": van["latency_ms"] / light["latency_ms"],
        "vanilla_step_ms": 1e3 * van["step_seconds"], "vanilla_peak_mb": van["peak_mb"],
        "vanilla_latency_ms": van["latency_ms"], "trainable_vanilla": van["trainable_params_no_head"],
        "vanilla_evals": van["evals"], **light_fields(ctx, light),
    }


def light_fields(ctx, light: dict) -> dict:
    """The Light-PEFT side's own figures in a row (light carries `latency_ms`)."""
    metric = ctx.task.metric
    return {
        "light_final": light["final"][metric], "light_best": light["best"][metric],
        "predicted_step_speedup": light.get("predicted_step_speedup"),  # the cost model's, next to measured
        "light_step_ms": 1e3 * light["step_seconds"], "light_peak_mb": light["peak_mb"],
        "light_latency_ms": light["latency_ms"], "base_kept_pct": light["base_kept_pct"],
        "block_kept_pct": light["block_kept_pct"], "trainable_light": light["trainable_params_no_head"],
        "plan": light["plan"], "light_evals": light["evals"],
    }


def parse_variant(spec: str) -> tuple[str, dict]:
    """"NAME=section.key=value,section.key=value" -> (NAME, {dotted key: value}); values are YAML scalars."""
    name, _, rest = spec.partition("=")
    over = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        over[key.strip()] = yaml_load(value)  # as --set parses it: 1e-3 is a number
    return name.strip(), over


def bench_task(task: str, args, seed: int) -> list[dict]:
    """One seed of one task: vanilla once, then every variant against it."""
    out = Path(args.out) / f"{task}-seed{seed}"
    base = {
        "model": {"name_or_path": args.model},
        "data": {"task": task, "data_dir": str(Path(args.data_root) / GLUE_DIRS[task]),
                 "max_train_samples": args.train_samples, "max_eval_samples": args.eval_samples,
                 "max_length": args.max_length},
        "prune": {"heads": args.heads, "ffn": args.ffn, "modules": args.modules, "ranks": args.ranks},
        # loss and dev metrics as they come (kept when a long run is cut short): OUT/TASK-seedSEED/logs/SIDE
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": seed,
                  "report_to": ["jsonl"], "logging_dir": str(out / "logs" / "vanilla")},
        "output_dir": str(out),
    }
    for dotted, value in args.common.items():  # --set: applied to both sides
        set_dotted(base, dotted, value)
    variants = [parse_variant(v) for v in args.variant] or [("light-peft", {})]
    ctx = prepare(from_dict(base))
    print(f"== {task} (seed {seed}): {len(ctx.train_loader.dataset)} train / {len(ctx.dev_loader.dataset)} dev, "
          f"{ctx.total_steps} steps, batch {ctx.cfg.train.batch_size}", flush=True)
    batch = next(iter(ctx.dev_loader))
    batch = {k: v for k, v in batch.items() if k != "labels"}
    done = train_vanilla(ctx)
    van = done.metrics
    van["latency_ms"] = latency_ms(done.model, batch, args.repeats)
    del done
    rows = []
    for name, over in variants:  # every variant against the one vanilla run (same seed, data order, schedule)
        merged = copy.deepcopy(base)
        for dotted, value in over.items():
            set_dotted(merged, dotted, value)
        merged["train"]["logging_dir"] = str(out / "logs" / name)
        ctx.cfg = from_dict(merged)  # validated like a user config
        done = train_light(ctx)
        light = done.metrics
        light["latency_ms"] = latency_ms(done.model, batch, args.repeats)
        del done
        row = dict(compare_row(task, ctx, van, light), variant=name, overrides=over, seed=seed,
                   predicted_step_speedup=light.get("predicted_step_speedup"),
                   target_speedup=getattr(ctx.cfg.prune, "target_speedup", None))
        print(json.dumps(row, indent=1), flush=True)
        rows.append(row)
    return rows


def summarize(rows: list[dict], model: str) -> dict:
    """The evidence summary of one task and variant over its seeds (final dev metric, paired by seed)."""
    rows = sorted(rows, key=lambda r: r["seed"])
    s = paired_summary([r["vanilla_final"] for r in rows], [r["light_final"] for r in rows])
    predicted = [r["predicted_step_speedup"] for r in rows if r.get("predicted_step_speedup") is not None]
    return {
        "task": rows[0]["task"], "metric": rows[0]["metric"], "variant": rows[0]["variant"], "model": model,
        "seeds": [r["seed"] for r in rows],
        "baseline_mean": s.baseline_mean, "baseline_std": s.baseline_std,
        "method_mean": s.method_mean, "method_std": s.method_std,
        "paired_diff_mean": s.diff_mean, "paired_diff_std": s.diff_std,
        "paired_diff_ci95": list(s.diff_ci95) if s.diff_ci95 else None,
        "step_speedup_mean": _timed_mean(rows, "step_speedup"),
        "e2e_speedup_mean": _timed_mean(rows, "e2e_speedup"),
        "memory_ratio_mean": _timed_mean(rows, "memory_ratio"),
        "inference_speedup_mean": _timed_mean(rows, "inference_speedup"),
        "predicted_step_speedup": mean_std(predicted)[0] if predicted else None,
        "target_speedup": rows[0].get("target_speedup"),
    }


def _timed_mean(rows: list[dict], key: str) -> float | None:
    """Mean of a speed / memory ratio over the rows that timed both sides (None where a row reused its vanilla
    side from another run: ratios across two processes are not measurements)."""
    values = [r[key] for r in rows if r.get(key) is not None]
    return mean_std(values)[0] if values else None


def _x(value: float | None, unit: str = "x") -> str:
    return "n/a" if value is None else f"{value:.2f}{unit}"


def summaries(rows: list[dict], model: str) -> list[dict]:
    keys = dict.fromkeys((r["task"], r["variant"]) for r in rows)
    return [summarize([r for r in rows if (r["task"], r["variant"]) == k], model) for k in keys]


def seed_table(sums: list[dict]) -> str:
    lines = ["| task | variant | seeds | vanilla mean +- std | Light-PEFT mean +- std | paired diff [95% CI] | "
             "step / e2e speedup (predicted) |", "|" + "---|" * 7]
    for s in sums:
        ci = "[{:+.4f}, {:+.4f}]".format(*s["paired_diff_ci95"]) if s["paired_diff_ci95"] else "(one seed)"
        pred = f" ({s['predicted_step_speedup']:.2f}x)" if s["predicted_step_speedup"] is not None else ""
        lines.append(f"| {s['task']} ({s['metric']}) | {s['variant']} | {len(s['seeds'])} | "
                     f"{s['baseline_mean']:.4f} +- {s['baseline_std']:.4f} | {s['method_mean']:.4f} +- "
                     f"{s['method_std']:.4f} | {s['paired_diff_mean']:+.4f} {ci} | "
                     f"{_x(s['step_speedup_mean'])} / {_x(s['e2e_speedup_mean'])}{pred} |")
    return "\n".join(lines)


def write_json(path_pattern: str, task: str, rows: list[dict], model: str, argv: list[str],
               script: str = "light_peft.py", extend=None, sources: list[str] | None = None) -> None:
    """One file per task: `summary` (the target-mode variant when one ran, else the first), `summaries` (all
    variants), the command and every row. extend(summary, rows), if given, adds a script's own figures to each
    summary from its variant's rows."""
    task_rows = [r for r in rows if r["task"] == task]
    sums = summaries(task_rows, model)
    sums.sort(key=lambda s: s["target_speedup"] is None)  # stable: target mode first, then the given order
    for s in sums if extend else []:
        extend(s, [r for r in task_rows if r["variant"] == s["variant"]])
    path = Path(path_pattern.format(task=task))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"summary": sums[0], "summaries": sums,
                                "command": f"python benchmarks/{script} " + " ".join(argv),
                                **({"sources": sources} if sources else {}), "rows": task_rows}, indent=1))


def check_seeds(p: argparse.ArgumentParser, spec: str) -> None:
    """`--seeds 43` means 43 seeds from --seed: almost surely a seed meant as a list of one."""
    if "," not in spec and spec.strip().isdigit() and int(spec) > 20:
        p.error(f"--seeds {spec} asks for {spec} seeds; for one seed {spec} write "
                f"--seed {spec} --seeds 1 (or a list: --seeds {spec},{int(spec) + 1})")


def merge_json(files: list[str], out: str | None, argv: list[str], script: str = "light_peft.py",
               extend=None) -> int:
    """One evidence file from runs of the same task and variants on different seeds (e.g. processes run side by
    side): the rows joined, the summary recomputed over all seeds, each source's command kept."""
    if not out:
        raise SystemExit(f"{script}: --merge needs --json OUT")
    sources = [json.loads(Path(f).read_text()) for f in files]
    rows = [r for src in sources for r in src["rows"]]
    keys = [(r["task"], r["variant"], r["seed"]) for r in rows]
    if len(set(keys)) != len(keys):
        raise SystemExit(f"{script}: --merge: a task, variant and seed appears in more than one file")
    tasks = {r["task"] for r in rows}
    models = {src["summary"]["model"] for src in sources}
    if len(tasks) != 1 or len(models) != 1:
        raise SystemExit(f"{script}: --merge: the files hold different tasks or models ({sorted(tasks)}, "
                         f"{sorted(models)})")
    model = models.pop()
    write_json(out, tasks.pop(), rows, model, argv, script=script, extend=extend,
               sources=[src["command"] for src in sources])
    print(seed_table(summaries(rows, model)))
    return 0


def parse_seeds(spec: str, first: int) -> list[int]:
    """"3" -> three seeds from `first`; "42,7" -> exactly those."""
    if "," in spec:
        return [int(s) for s in spec.split(",") if s.strip()]
    return list(range(first, first + int(spec)))


def _predicted(row: dict) -> str:
    pred = row.get("predicted_step_speedup")
    return "" if pred is None else f"; predicted {pred:.2f}x"


def table(rows: list[dict]) -> str:
    head = ("| task | dev metric vanilla -> Light-PEFT (final / best) | step speedup | end-to-end speedup | "
            "peak train memory ratio | inference speedup | body / block params kept | trainable (no head) |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        variant = f" {r['variant']}" if r.get("variant", "light-peft") != "light-peft" else ""
        variant += f" seed {r['seed']}" if "seed" in r else ""
        lines.append(
            f"| {r['task']} ({r['metric']}){variant} | {r['vanilla_final']:.4f} -> {r['light_final']:.4f} / "
            f"{r['vanilla_best']:.4f} -> {r['light_best']:.4f} | {_x(r['step_speedup'])} "
            f"({r['vanilla_step_ms']:.0f} -> {r['light_step_ms']:.0f} ms{_predicted(r)}) | {_x(r['e2e_speedup'])} | "
            f"{_x(r['memory_ratio'], '')} ({r['vanilla_peak_mb']:.0f} -> {r['light_peak_mb']:.0f} MB) | "
            f"{_x(r['inference_speedup'])} | {r['base_kept_pct']:.1f}% / {r['block_kept_pct']:.1f}% | "
            f"{r['trainable_vanilla']:,} -> {r['trainable_light']:,} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="sst2,rte")
    p.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--model", default="minilm")
    p.add_argument("--train-samples", type=int, default=8000)
    p.add_argument("--eval-samples", type=int, default=None)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--heads", type=float, default=1 / 3)
    p.add_argument("--ffn", type=float, default=1 / 3)
    p.add_argument("--modules", type=float, default=0.75, help="fraction of LoRA modules removed")
    p.add_argument("--ranks", type=float, default=0.5, help="fraction of the surviving ranks removed")
    p.add_argument("--seed", type=int, default=42, help="first seed")
    p.add_argument("--seeds", default="1", help="N (seeds --seed .. --seed+N-1) or a comma-separated list; "
                   "both sides are retrained per seed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for both sides (repeatable), e.g. data.max_length=64")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=section.key=value,... : a Light-PEFT variant trained against the same vanilla run "
                        "(repeatable; e.g. mask=estimate.structure_score=mask)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default="runs/bench_light")
    p.add_argument("--json", help="write summary + rows here, rewritten after each seed; `{task}` in the name "
                   "is replaced by the task (needed with several tasks)")
    p.add_argument("--merge", metavar="A.json,B.json", help="train nothing: join these runs' rows (other seeds "
                   "of the same task) into --json with the summary over all their seeds")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    check_seeds(p, args.seeds)
    if args.merge:
        return merge_json(args.merge.split(","), args.json, argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.json and len(tasks) > 1 and "{task}" not in args.json:
        p.error("--json needs `{task}` in the file name when several tasks run (one file per task)")
    args.common = {k.strip(): yaml_load(v) for k, _, v in (item.partition("=") for item in args.set)}
    seeds = parse_seeds(args.seeds, args.seed)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"device {'cuda' if torch.cuda.is_available() else 'cpu'}, seeds {seeds}", flush=True)
    rows = []
    for task in tasks:
        for seed in seeds:
            rows += bench_task(task, args, seed)
            if args.json:  # partial results survive a run cut short
                write_json(args.json, task, rows, args.model, argv)
    print("\n" + table(rows))
    print("\n" + seed_table(summaries(rows, args.model)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
