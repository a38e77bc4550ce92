"""Pair two screened levers over seeds: the paired difference METHOD - BASE (95% t interval) of
`light_levers.py` runs, and each against that seed's vanilla run.

    python benchmarks/levers_paired.py BASE METHOD 42,43,44 [--json benchmarks/results/NAME.json]
    python benchmarks/levers_paired.py vanilla METHOD 42,...,46    # METHOD against each seed's vanilla run
    python benchmarks/levers_paired.py vanilla METHOD 42,43,44 --timed results/QUIET.json   # + its timings

Reads benchmarks/results/levers/{BASE,METHOD}-SEED.json (written by light_levers.py, same base config, so the
two sides of a seed share the estimation and, when the lever does not change it, the plan). BASE may instead be
`results:NAME.json[#VARIANT]`: the Light-PEFT side of a committed `light_peft.py` run (benchmarks/results/NAME.json;
the variant is needed when it holds several) of the same config, e.g. `results:light_stsb_target.json` for a
TASK=stsb screen.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from light_levers import _vanilla_final, overrides_touch_base  # this folder: the screens' vanilla pairs
from prunetune.report.stats import paired_summary

LEVERS = Path(__file__).resolve().parent / "results" / "levers"


def _vanilla_of(run: dict, seed: int) -> float | None:
    """This screen's paired vanilla metric: the one it recorded, else one committed since (only for a screen
    that records its rows and leaves the base config alone)."""
    if run["summary"]["baseline_mean"] is not None:
        return run["summary"]["baseline_mean"]
    if "rows" not in run or overrides_touch_base(run["overrides"]):
        return None
    return _vanilla_final(seed, run["rows"], run["summary"]["task"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("base")
    p.add_argument("method")
    p.add_argument("seeds", help="comma-separated")
    p.add_argument("--json")
    p.add_argument("--timed", help="a light_peft.py JSON of the same plan timed on a quiet machine: its step and "
                                   "end-to-end speedups fill the summary's (the screens themselves are not timed)")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    runs = {name: [_run(name, s) for s in seeds] for name in (args.base, args.method) if name != "vanilla"}
    metric = runs[args.method][0]["summary"]["metric"]
    acc = {name: [r["final"][metric] for r in rs] for name, rs in runs.items()}
    # against vanilla: over the seeds whose vanilla run is committed (the screens may add seeds beyond them)
    vanilla = [_vanilla_of(r, s) for r, s in zip(runs[args.method], seeds)]
    if args.base == "vanilla":  # BASE = each seed's own vanilla run: every seed needs one
        if None in vanilla:
            sys.exit(f"levers_paired.py: no vanilla run for seed(s) "
                     f"{[s for s, v in zip(seeds, vanilla) if v is None]}")
        acc = {"vanilla": vanilla, **acc}
    ps = paired_summary(acc[args.base], acc[args.method])
    with_vanilla = [i for i, v in enumerate(vanilla) if v is not None]
    vs_vanilla = {name: paired_summary([vanilla[i] for i in with_vanilla], [a[i] for i in with_vanilla])
                  for name, a in acc.items() if name != "vanilla"} if len(with_vanilla) >= 2 else {}
    summary = {"task": runs[args.method][0]["summary"]["task"], "metric": metric, "model": "minilm", "seeds": seeds,
               "variant": f"{args.method} vs {args.base}", "baseline_mean": ps.baseline_mean,
               "method_mean": ps.method_mean, "paired_diff_mean": ps.diff_mean,
               "paired_diff_ci95": list(ps.diff_ci95) if ps.diff_ci95 else None,
               "step_speedup_mean": None, "e2e_speedup_mean": None,
               "predicted_step_speedup": runs[args.method][0]["predicted_step_speedup"],
               "target_speedup": runs[args.method][0]["summary"]["target_speedup"],
               "vs_vanilla": {name: {"diff_mean": s.diff_mean, "ci95": list(s.diff_ci95) if s.diff_ci95 else None,
                                     "seeds": [seeds[i] for i in with_vanilla]} for name, s in vs_vanilla.items()},
               "note": ("baseline = each seed's vanilla run" if args.base == "vanilla" else
                        "baseline = the BASE lever's runs (not vanilla)") + "; one-thread runs beside other jobs: no timings"}
    if args.timed:
        timed = json.loads(Path(args.timed).read_text())["summary"]
        summary |= {"step_speedup_mean": timed["step_speedup_mean"], "e2e_speedup_mean": timed["e2e_speedup_mean"],
                    "timed_seeds": timed["seeds"], "timed_predicted_step_speedup": timed["predicted_step_speedup"]}
        summary["note"] += f"; step / e2e speedups: seed(s) {timed['seeds']} timed quietly in {args.timed}"
    rows = [{"seed": s, **{name: {metric: runs[name][i]["final"][metric], "plan": runs[name][i]["plan"],
                                  "step_ms": runs[name][i]["step_ms"]} for name in runs}}
            for i, s in enumerate(seeds)]
    print(f"{args.method} - {args.base}: {100 * ps.diff_mean:+.2f} points"
          + (" [{:+.2f}, {:+.2f}]".format(*(100 * x for x in ps.diff_ci95)) if ps.diff_ci95 else "")
          + f" over seeds {seeds} ({ps.baseline_mean:.4f} -> {ps.method_mean:.4f})")
    for name, s in vs_vanilla.items():
        print(f"{name} - vanilla: {100 * s.diff_mean:+.2f} points"
              + (" [{:+.2f}, {:+.2f}]".format(*(100 * x for x in s.diff_ci95)) if s.diff_ci95 else "")
              + f" over seeds {[seeds[i] for i in with_vanilla]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "rows": rows,
                                               "command": "python benchmarks/levers_paired.py "
                                                          + " ".join(sys.argv[1:] if argv is None else argv)},
                                              indent=1))
    return 0


def _run(name: str, seed: int) -> dict:
    """One seed of a screened lever, or (`results:NAME.json`) the Light-PEFT side of a committed light_peft.py
    row in the same shape (final metric, plan, step time, paired vanilla); `A|B|...`: the first of these
    sources that holds this seed (seeds run by different scripts, e.g. screens and later light_peft.py runs)."""
    if "|" in name:
        for source in name.split("|"):
            if _has_seed(source, seed):
                return _run(source, seed)
        sys.exit(f"levers_paired.py: none of {name.split('|')} has seed {seed}")
    if not name.startswith("results:"):
        return json.loads((LEVERS / f"{name}-{seed}.json").read_text())
    file, variant, rows = _committed_rows(name, seed)
    if len(rows) != 1:
        sys.exit(f"levers_paired.py: {file} has {len(rows)} rows for seed {seed}"
                 + ("" if variant else "; name the variant: results:FILE.json#VARIANT"))
    row = rows[0]
    return {"final": {row["metric"]: row["light_final"]}, "plan": row["plan"], "step_ms": row["light_step_ms"],
            "predicted_step_speedup": row["predicted_step_speedup"],
            "summary": {"task": row["task"], "metric": row["metric"], "baseline_mean": row["vanilla_final"],
                        "target_speedup": row.get("target_speedup")}}


def _committed_rows(name: str, seed: int) -> tuple[str, str, list[dict]]:
    """`results:FILE.json[#VARIANT]` -> (file, variant, its rows of this seed and variant; none if no file)."""
    file, _, variant = name.split(":", 1)[1].partition("#")
    path = LEVERS.parent / file
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    return file, variant, [r for r in rows if r["seed"] == seed and variant in ("", r["variant"])]


def _has_seed(name: str, seed: int) -> bool:
    if not name.startswith("results:"):
        return (LEVERS / f"{name}-{seed}.json").exists()
    return bool(_committed_rows(name, seed)[2])


if __name__ == "__main__":
    sys.exit(main())
