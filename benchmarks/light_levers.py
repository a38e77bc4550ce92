"""Light-PEFT side only, one seed, for screening quality levers cheaply against an already measured vanilla run.

    python benchmarks/light_levers.py SEED NAME [section.key=value ...]   # e.g. 42 path prune.target_speedup=1.6

Same base config as `benchmarks/light_peft.py --tasks sst2 --train-samples 4000 --epochs 3` (MiniLM, batch 32,
lr 5e-4, max_length 128, full dev set), so a seed's result pairs with that script's vanilla run of the same seed
(vanilla does not depend on any Light-PEFT option). Writes benchmarks/results/levers/NAME-SEED.json. A lever
that screens well must then be run with light_peft.py over paired seeds: one seed is an anecdote.
PATH_SCALE=k (diagnostic) multiplies the path importance of PEFT modules and ranks by k.
ROWS=n changes the training rows (default 4000); SST2_DIR the data folder.
TASK=stsb / TASK=cola screen those tasks instead, with the setup of their committed 3-seed target rows
(STS-B: 6,000 rows = all, max_length 128; CoLA: 9,000 rows = all, max_length 64; 3 epochs), paired with those
rows' vanilla runs; their data folders are ../shared/data/STS-B and ../shared/data/CoLA (DATA_DIR overrides).
TASK=cola_e8 / TASK=rte_e6: CoLA at 8 epochs, RTE (all rows, max_length 128) at 6, paired with the vanilla runs
of light_cola_e8_lrx2.json / light_rte_e6_lrx2.json.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from prunetune.config import from_dict, set_dotted, yaml_load  # noqa: E402
from prunetune.methods.common import prepare  # noqa: E402
from prunetune.methods.light_peft import train_light  # noqa: E402
from prunetune.scores.importance import ImportanceTracker  # noqa: E402

ROOT = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    seed, name, overrides = int(argv[0]), argv[1], argv[2:]
    scale = float(os.environ.get("PATH_SCALE", "1"))
    if scale != 1:  # diagnostic: how the allocation moves when PEFT modules are made k times dearer
        original = ImportanceTracker.path_scores

        def scaled(self):
            modules, ranks = original(self)
            return {k: v * scale for k, v in modules.items()}, {k: v * scale for k, v in ranks.items()}

        ImportanceTracker.path_scores = scaled
    task = os.environ.get("TASK", "sst2")
    if task not in TASKS:
        sys.exit(f"light_levers.py: TASK must be one of {sorted(TASKS)}, got {task!r}")
    rows = int(os.environ.get("ROWS", TASKS[task]["rows"]))
    base = base_config(seed, rows, f"runs/levers/{name}-{seed}", overrides, task=task)
    metric = TASKS[task]["metric"]
    ctx = prepare(from_dict(base))
    t0 = time.time()
    light = train_light(ctx)
    result, plan = light.metrics, light.plan
    out = {"name": name, "seed": seed, "rows": rows, "overrides": overrides, "path_scale": scale,
           "final": result["final"], "evals": result["evals"], "plan": result["plan"],
           "predicted_step_speedup": result["predicted_step_speedup"],
           "step_ms": 1e3 * result["step_seconds"], "wall_s": time.time() - t0,
           "kept_modules": sorted(plan.peft_ranks), "heads_per_layer": [len(k) for k in plan.kept_heads],
           "neurons_per_layer": [len(k) for k in plan.kept_neurons], "allocation": plan.meta["allocation"]["types"],
           "command": "python benchmarks/light_levers.py " + " ".join(argv)}
    # the paired baseline: this seed's vanilla run of the 3-seed evidence at these rows (same base config)
    paired = not overrides_touch_base(overrides)
    vanilla = _vanilla_final(seed, rows, task) if paired else None
    out = {"summary": {"task": task, "metric": metric, "variant": name, "model": "minilm", "seeds": [seed],
                       "baseline_mean": vanilla, "method_mean": result["final"][metric],
                       "paired_diff_mean": None if vanilla is None else result["final"][metric] - vanilla,
                       "paired_diff_ci95": None, "step_speedup_mean": None, "e2e_speedup_mean": None,
                       "predicted_step_speedup": result["predicted_step_speedup"],
                       "target_speedup": base.get("prune", {}).get("target_speedup"),
                       "note": f"one-seed screen; baseline = seed {seed}'s vanilla run in "
                               f"{' / '.join(VANILLA.get((task, rows), ('(none)',)))}; no timings (shared CPU)"}, **out}
    path = ROOT / "results" / "levers" / f"{name}-{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("name", "seed", "final", "plan", "predicted_step_speedup")}))
    return 0


# per task: data folder, default rows, max_length and metric of its committed light_peft.py target row
TASKS = {"sst2": {"folder": "SST-2", "rows": "4000", "max_length": 128, "metric": "accuracy"},
         "stsb": {"folder": "STS-B", "rows": "6000", "max_length": 128, "metric": "pearson"},
         "cola": {"folder": "CoLA", "rows": "9000", "max_length": 64, "metric": "matthews"},
         # the longer schedules where vanilla LoRA clearly learns (light_cola_e8_lrx2.json, light_rte_e6_lrx2.json)
         "cola_e8": {"folder": "CoLA", "rows": "9000", "max_length": 64, "metric": "matthews", "task": "cola",
                     "epochs": 8},
         "rte_e6": {"folder": "RTE", "rows": "8000", "max_length": 128, "metric": "accuracy", "task": "rte",
                    "epochs": 6}}


def base_config(seed: int, rows: int, output_dir: str, overrides=(), task: str = "sst2", **train) -> dict:
    """The screens' run config (MiniLM, batch 32, lr 5e-4, 3 epochs, the task's max_length; that of
    `light_peft.py --tasks TASK`), with `section.key=value` overrides; shared by light_plans.py and
    light_speed.py so all three measure the same setup."""
    default_dir = str(ROOT.parents[1] / "shared" / "data" / TASKS[task]["folder"])
    data_dir = os.environ.get("SST2_DIR" if task == "sst2" else "DATA_DIR", default_dir)
    base = {"model": {"name_or_path": "minilm"},
            "data": {"task": TASKS[task].get("task", task), "data_dir": data_dir, "max_train_samples": rows,
                     "max_length": TASKS[task]["max_length"]},
            "train": {"epochs": TASKS[task].get("epochs", 3), "batch_size": 32, "lr": 5e-4, "seed": seed, **train},
            "output_dir": output_dir}
    for item in overrides:
        key, _, value = item.partition("=")
        set_dotted(base, key, yaml_load(value))
    return base


def overrides_touch_base(overrides: list[str]) -> bool:
    """Whether an override changes what vanilla trains with too (data, schedule, PEFT), so the stored
    vanilla run is no longer its pair."""
    return any(o.split("=")[0].split(".")[0] in ("data", "train", "peft", "model") for o in overrides)


# the committed evidence whose vanilla runs pair with a screen of the same rows and seed (files searched in order)
VANILLA = {("sst2", 4000): ("light_sst2_4k_target.json", "light_sst2_4k_found50_seed45.json",
                            "light_sst2_4k_found50_seed46.json"),
           ("sst2", 8000): ("light_sst2_target.json",), ("stsb", 6000): ("light_stsb_target.json", "light_stsb_lrx2_seed45.json",
                                                              "light_stsb_lrx2_seed46.json"),
           ("cola", 9000): ("light_cola_target.json",), ("cola_e8", 9000): ("light_cola_e8_lrx2.json",),
           ("rte_e6", 8000): ("light_rte_e6_lrx2.json",)}


def _vanilla_final(seed: int, rows: int, task: str = "sst2") -> float | None:
    """Vanilla's final dev metric for this task, seed and row count from the committed evidence (None when
    not there)."""
    for name in VANILLA.get((task, rows), ()):
        path = ROOT / "results" / name
        found = [r["vanilla_final"] for r in (json.loads(path.read_text())["rows"] if path.exists() else [])
                 if r["seed"] == seed]
        if found:
            return found[0]
    return None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
