"""Fit the cost model's CPU rates to measured step times of many plans, and check its predictions out of sample.

    python benchmarks/cost_fit.py [--steps 20] [--json benchmarks/results/speed/cost_fit.json]

The config of `benchmarks/light_levers.py` (MiniLM SST-2, ROWS=n training rows, default 8000, batch 32,
max_length 128). Plans are drawn from random scores at a grid of fixed ratios (heads, neurons, modules, ranks
removed), some removing the lowest layers' LoRA first (a backward cut), some keeping every module. Each pruned
model trains `--steps` optimizer steps in alternating blocks of 10 with one vanilla LoRA model (same loader), so
machine drift hits both sides alike; the first block of each is warm-up.

The cost model is linear in its rates: step seconds = FLOPs / flops_per_s + bytes / bytes_per_s + ops x
op_seconds, with FLOPs, bytes and ops counted per plan by `CostModel.step_time`. Non-negative least squares on
the relative errors of the measured step times gives the three rates; the script prints, per plan, the default
rates' and the fitted rates' predicted speedup against the measured one, with leave-one-out predictions (each
plan predicted by rates fitted without it). A timing: run it with nothing else on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.optimize import nnls  # noqa: E402

from light_levers import base_config  # noqa: E402  (this folder: the screens' shared run config)
from prunetune.config import from_dict  # noqa: E402
from prunetune.cost import DeviceRates  # noqa: E402
from prunetune.methods import light_peft  # noqa: E402
from prunetune.methods.common import build_model, default_structure, prepare  # noqa: E402
from prunetune.plan import Scores, make_plan  # noqa: E402
from prunetune.train.loop import TrainState  # noqa: E402

ROOT = Path(__file__).resolve().parent
BLOCK = 10
# (name, heads, ffn, modules, ranks removed, module order): "random" scores, or "low-first" (a backward cut)
GRID = [("unpruned", 0, 0, 0, 0, "random"),
        ("heads50", 0.5, 0, 0, 0, "random"), ("ffn50", 0, 0.5, 0, 0, "random"),
        ("heads33-ffn33", 1 / 3, 1 / 3, 0, 0, "random"), ("heads66-ffn66", 2 / 3, 2 / 3, 0, 0, "random"),
        ("modules60", 0, 0, 0.6, 0, "random"), ("ranks50", 0, 0, 0, 0.5, "random"),
        ("modules50-lowfirst", 0, 0, 0.5, 0, "low-first"), ("modules80-lowfirst", 0, 0, 0.8, 0, "low-first"),
        ("mix-paper", 1 / 3, 1 / 3, 0.75, 0.5, "random"), ("mix-target", 1 / 3, 1 / 3, 0.6, 0, "random"),
        ("mix-cut", 1 / 3, 1 / 3, 0.6, 0, "low-first")]


def make(arch, ranks: dict[str, int], heads, ffn, modules, rank_ratio, order: str, seed: int, model_type: str):
    g = torch.Generator().manual_seed(seed)
    names = sorted(ranks)
    layer_of = {n: arch.role_of(n)[0] for n in names}
    module = ({n: float(torch.rand(1, generator=g)) for n in names} if order == "random"
              else {n: layer_of[n] + 0.01 * float(torch.rand(1, generator=g)) for n in names})
    scores = Scores(head=[torch.rand(arch.num_units, generator=g) for _ in range(arch.num_layers)],
                    ffn=[torch.rand(arch.intermediate_size, generator=g) for _ in range(arch.num_layers)],
                    module=module, rank={n: torch.rand(r, generator=g) for n, r in ranks.items()})
    return make_plan(arch=arch, scores=scores, heads=heads, ffn=ffn, modules=modules, ranks=rank_ratio,
                     model_type=model_type)


def components(cost, plan) -> np.ndarray:
    """(FLOPs, bytes, ops) of one step of the plan, as the cost model counts them."""
    out = []
    for rates in (DeviceRates(1.0, 1e300, 0.0, cost.rates.optimizer_ops_per_tensor),
                  DeviceRates(1e300, 1.0, 0.0, cost.rates.optimizer_ops_per_tensor),
                  DeviceRates(1e300, 1e300, 1.0, cost.rates.optimizer_ops_per_tensor)):
        cost.rates = rates
        out.append(cost.step_time([len(k) for k in plan.kept_heads], [len(k) for k in plan.kept_neurons],
                                  {m: len(r) for m, r in plan.peft_ranks.items()}).seconds)
    return np.array(out)


def fit(X: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Rates (1/flops_per_s, 1/bytes_per_s, op_seconds) >= 0 minimising the squared relative time error."""
    w = 1.0 / t
    x, _ = nnls(X * w[:, None], t * w)
    return x


def analyse(rows: list[dict], unpruned: np.ndarray) -> dict:
    """Fit the rates to the plans' step times and predict each plan's speedup with them (and leave-one-out).
    Each plan's pruned time is corrected for machine drift by its own vanilla blocks: scaled by the mean
    vanilla time over its vanilla time, so the fit sees the measured speedups on one time scale."""
    vanilla_ms = statistics.fmean(r["vanilla_ms"] for r in rows)
    X = np.array([r["components"] for r in rows] + [unpruned.tolist()])
    t = np.array([r["pruned_ms"] * vanilla_ms / r["vanilla_ms"] / 1e3 for r in rows] + [vanilla_ms / 1e3])
    x = fit(X, t)
    for k, row in enumerate(rows):
        keep = [j for j in range(len(t)) if j != k]
        xl = fit(X[keep], t[keep])
        row["predicted_fit"] = float(unpruned @ x / (X[k] @ x))
        row["predicted_loo"] = float(unpruned @ xl / (X[k] @ xl))
    inv = lambda v: float(1 / v) if v > 0 else float("inf")  # noqa: E731
    err = {key: [abs(r[key] / r["measured_speedup"] - 1) for r in rows if r["name"] != "unpruned"]
           for key in ("predicted_default", "predicted_fit", "predicted_loo")}
    return {"rows": rows, "vanilla_ms": vanilla_ms,
            "fitted_rates": {"flops_per_s": inv(x[0]), "bytes_per_s": inv(x[1]), "op_seconds": float(x[2])},
            "mean_abs_rel_error": {k: statistics.fmean(v) for k, v in err.items()},
            "max_abs_rel_error": {k: max(v) for k, v in err.items()}}


def report(out: dict) -> None:
    print("\n| plan | measured | default rates | fitted | leave-one-out |\n|---|---|---|---|---|")
    for r in out["rows"]:
        print(f"| {r['name']} | {r['measured_speedup']:.2f}x | {r['predicted_default']:.2f}x | "
              f"{r['predicted_fit']:.2f}x | {r['predicted_loo']:.2f}x |")
    print(json.dumps({k: out[k] for k in ("fitted_rates", "mean_abs_rel_error", "max_abs_rel_error")}, indent=1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per plan (after one warm-up block)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--plans", default=",".join(g[0] for g in GRID))
    p.add_argument("--json", default=str(ROOT / "results" / "speed" / "cost_fit.json"))
    p.add_argument("--refit", metavar="JSON", help="refit the rates to the rows of an earlier run's JSON (no timing)")
    args = p.parse_args(argv)
    if args.refit:
        old = json.loads(Path(args.refit).read_text())
        unpruned = np.array(next(r for r in old["rows"] if r["name"] == "unpruned")["components"])
        old.update(analyse(old["rows"], unpruned))
        Path(args.json).write_text(json.dumps(old, indent=1))
        report(old)
        return 0
    rows = int(os.environ.get("ROWS", "8000"))
    ctx = prepare(from_dict(base_config(args.seed, rows, "runs/cost_fit", [], eval_each_epoch=False)))
    cfg = ctx.cfg
    model, hf, arch, _ = build_model(ctx)
    ranks = dict(default_structure(arch, cfg).lora)
    cost = light_peft._cost_model(ctx, arch, ranks)
    default_rates = cost.rates
    vanilla = TrainState(model, hf, {}, cfg.train, ctx.train_loader, 10 ** 6, ctx.device, desc="vanilla")
    wanted = set(args.plans.split(","))
    rows_out = []
    for i, (name, h, f, m, r, order) in enumerate(g for g in GRID if g[0] in wanted):
        plan = make(arch, ranks, h, f, m, r, order, args.seed + i, hf.config.model_type)
        pm, phf, parch, _ = build_model(ctx)
        pruned = light_peft.prune(model=pm, hf=phf, arch=parch, adapters=None,
                                  estimate=light_peft.Estimate(plan=plan), r=cfg.peft.r, alpha=cfg.peft.alpha,
                                  dropout=cfg.peft.dropout)
        state = TrainState(pruned.model, pruned.hf, {}, cfg.train, ctx.train_loader, 10 ** 6, ctx.device,
                           desc=name)
        state.seek(vanilla.step)  # the same batches as the vanilla side (padded lengths set the step time)
        times = {"vanilla": [], "pruned": []}
        t0 = time.perf_counter()
        for block in range(max(2, args.steps // BLOCK + 1)):
            for side, st in (("vanilla", vanilla), ("pruned", state)):
                st.step_times.clear()
                st.run(BLOCK)
                if block > 0:
                    times[side] += st.step_times
        cost.rates = default_rates
        pred_default = cost.predict(plan).speedup
        row = {"name": name, "heads": h, "ffn": f, "modules": m, "ranks": r, "order": order,
               "plan": plan.summary(), "vanilla_ms": 1e3 * statistics.fmean(times["vanilla"]),
               "pruned_ms": 1e3 * statistics.fmean(times["pruned"]),
               "components": components(cost, plan).tolist(), "seconds": time.perf_counter() - t0,
               "predicted_default": pred_default}
        row["measured_speedup"] = row["vanilla_ms"] / row["pruned_ms"]
        rows_out.append(row)
        print(json.dumps({k: row[k] for k in ("name", "vanilla_ms", "pruned_ms", "measured_speedup",
                                              "predicted_default")}), flush=True)
        del state, pruned, pm, phf
    cost.rates = default_rates
    out = analyse(rows_out, components(cost, make(arch, ranks, 0, 0, 0, 0, "random", 0, hf.config.model_type)))
    out.update(default_rates=default_rates.__dict__, threads=torch.get_num_threads(),
               command="python benchmarks/cost_fit.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    report(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
