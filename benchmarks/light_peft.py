"""Vanilla LoRA vs Light-PEFT on the real MiniLM, side by side in one run, per task.

    python benchmarks/light_peft.py --tasks sst2,rte --data-root ../shared/data

Prints, per task: dev metric of each, train-step time ratio, end-to-end time ratio (estimation included),
peak training memory ratio, inference-latency ratio. Both runs share seed, data order, schedule and
hyperparameters; only Light-PEFT's estimation/pruning differs.
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
import yaml  # noqa: E402

from prunetune.config import from_dict, set_dotted  # noqa: E402
from prunetune.methods.common import prepare  # noqa: E402
from prunetune.methods.light_peft import train_light, train_vanilla  # noqa: E402

GLUE_DIRS = {"sst2": "SST-2", "rte": "RTE", "cola": "CoLA", "stsb": "STS-B"}


@torch.no_grad()
def latency_ms(model, batch: dict, repeats: int) -> float:
    """Median forward latency of one dev batch (eval mode, no grad)."""
    model.eval()
    for _ in range(3):
        model(**batch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(**batch)
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def compare_row(task: str, ctx, van: dict, light: dict) -> dict:
    """One task's vanilla-vs-Light-PEFT figures (both results carry `latency_ms`)."""
    metric = ctx.task.metric
    return {
        "task": task, "metric": metric, "steps": ctx.total_steps,
        "vanilla_final": van["final"][metric], "light_final": light["final"][metric],
        "vanilla_best": van["best"][metric], "light_best": light["best"][metric],
        "step_speedup": van["step_seconds"] / light["step_seconds"],
        "predicted_step_speedup": light.get("predicted_step_speedup"),  # the cost model's, next to measured
        "e2e_speedup": van["train_seconds"] / light["train_seconds"],
        "memory_ratio": light["peak_mb"] / van["peak_mb"],
        "inference_speedup": van["latency_ms"] / light["latency_ms"],
        "vanilla_step_ms": 1e3 * van["step_seconds"], "light_step_ms": 1e3 * light["step_seconds"],
        "vanilla_peak_mb": van["peak_mb"], "light_peak_mb": light["peak_mb"],
        "vanilla_latency_ms": van["latency_ms"], "light_latency_ms": light["latency_ms"],
        "base_kept_pct": light["base_kept_pct"], "block_kept_pct": light["block_kept_pct"],
        "trainable_vanilla": van["trainable_params_no_head"], "trainable_light": light["trainable_params_no_head"],
        "plan": light["plan"], "vanilla_evals": van["evals"], "light_evals": light["evals"],
    }


def parse_variant(spec: str) -> tuple[str, dict]:
    """"NAME=section.key=value,section.key=value" -> (NAME, {dotted key: value}); values are YAML scalars."""
    name, _, rest = spec.partition("=")
    over = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        over[key.strip()] = yaml.safe_load(value)
    return name.strip(), over


def bench_task(task: str, args) -> list[dict]:
    base = {
        "model": {"name_or_path": args.model},
        "data": {"task": task, "data_dir": str(Path(args.data_root) / GLUE_DIRS[task]),
                 "max_train_samples": args.train_samples, "max_eval_samples": args.eval_samples,
                 "max_length": args.max_length},
        "prune": {"heads": args.heads, "ffn": args.ffn, "modules": args.modules, "ranks": args.ranks},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed},
        "output_dir": str(Path(args.out) / task),
    }
    variants = [parse_variant(v) for v in args.variant] or [("light-peft", {})]
    ctx = prepare(from_dict(base))
    print(f"== {task}: {len(ctx.train_loader.dataset)} train / {len(ctx.dev_loader.dataset)} dev, "
          f"{ctx.total_steps} steps, batch {args.batch_size}", flush=True)
    batch = next(iter(ctx.dev_loader))
    batch = {k: v for k, v in batch.items() if k != "labels"}
    van = train_vanilla(ctx)
    van["latency_ms"] = latency_ms(van.pop("_model"), batch, args.repeats)
    rows = []
    for name, over in variants:  # every variant against the one vanilla run (same seed, data order, schedule)
        merged = copy.deepcopy(base)
        for dotted, value in over.items():
            set_dotted(merged, dotted, value)
        ctx.cfg = from_dict(merged)  # validated like a user config
        light = train_light(ctx)
        light.pop("_plan")
        light["latency_ms"] = latency_ms(light.pop("_model"), batch, args.repeats)
        row = dict(compare_row(task, ctx, van, light), variant=name, overrides=over)
        print(json.dumps(row, indent=1), flush=True)
        rows.append(row)
    return rows


def _predicted(row: dict) -> str:
    pred = row.get("predicted_step_speedup")
    return "" if pred is None else f"; predicted {pred:.2f}x"


def table(rows: list[dict]) -> str:
    head = ("| task | dev metric vanilla -> Light-PEFT (final / best) | step speedup | end-to-end speedup | "
            "peak train memory ratio | inference speedup | body / block params kept | trainable (no head) |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        variant = f" {r['variant']}" if r.get("variant", "light-peft") != "light-peft" else ""
        lines.append(
            f"| {r['task']} ({r['metric']}){variant} | {r['vanilla_final']:.4f} -> {r['light_final']:.4f} / "
            f"{r['vanilla_best']:.4f} -> {r['light_best']:.4f} | {r['step_speedup']:.2f}x "
            f"({r['vanilla_step_ms']:.0f} -> {r['light_step_ms']:.0f} ms{_predicted(r)}) | {r['e2e_speedup']:.2f}x | "
            f"{r['memory_ratio']:.2f} ({r['vanilla_peak_mb']:.0f} -> {r['light_peak_mb']:.0f} MB) | "
            f"{r['inference_speedup']:.2f}x | {r['base_kept_pct']:.1f}% / {r['block_kept_pct']:.1f}% | "
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
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=section.key=value,... : a Light-PEFT variant trained against the same vanilla run "
                        "(repeatable; e.g. mask=estimate.structure_score=mask)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default="runs/bench_light")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"device {'cuda' if torch.cuda.is_available() else 'cpu'}", flush=True)
    rows = [row for t in args.tasks.split(",") if t.strip() for row in bench_task(t.strip(), args)]
    print("\n" + table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
