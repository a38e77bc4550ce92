"""How the plan moves with the pruning settings, from ONE estimation phase (no fine-tuning: cheap).

    python benchmarks/light_plans.py SEED NAME=section.key=value,... [NAME=...]
    # e.g. 42 target=prune.target_speedup=1.6 bounded=prune.target_speedup=1.6,prune.bounded=true

Runs Light-PEFT's estimation phase once with the config of `benchmarks/light_levers.py` (MiniLM SST-2, ROWS=n
training rows, default 8000, seed SEED), then makes the plan of every NAME from the same scores (only `prune.*`
overrides: anything else would change the estimation itself) and prints, per plan, the predicted step speedup
and what each unit type lost: removed counts, the kept PEFT modules per layer and the backward cut. Writes
benchmarks/results/levers/plans-ROWS-SEED.json. A diagnostic for choosing what to fine-tune, not evidence of
quality.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from light_levers import base_config  # noqa: E402  (this folder: the screens' shared run config)
from prunetune.config import from_dict, set_dotted, yaml_load  # noqa: E402
from prunetune.methods import light_peft  # noqa: E402
from prunetune.methods.common import prepare  # noqa: E402

ROOT = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    seed, variants = int(argv[0]), [a.partition("=") for a in argv[1:]]
    rows = int(os.environ.get("ROWS", "8000"))
    base = base_config(seed, rows, f"runs/levers/plans-{rows}-{seed}")
    ctx = prepare(from_dict(base))
    captured = {}
    original = light_peft.plan_from_scores

    def capture(**kw):  # keep what the estimation hands to the planner, plan each variant from it below
        captured.update(kw)
        return original(**kw)

    light_peft.plan_from_scores = capture
    run = light_peft._LightRun(ctx, checkpoints=False)
    light_peft.estimate(run)
    out = {"seed": seed, "rows": rows, "estimation_steps": run.window.steps, "plans": {},
           "command": "python benchmarks/light_plans.py " + " ".join(argv)}
    for name, _, overrides in variants:
        cfg_dict = json.loads(json.dumps(base))
        for item in filter(None, overrides.split(",")):
            key, _, value = item.partition("=")
            if not key.startswith("prune."):
                raise SystemExit(f"error: {name}: only prune.* settings can be planned from one estimation ({key})")
            set_dotted(cfg_dict, key, yaml_load(value))
        cfg = from_dict(cfg_dict)
        plan = original(**dict(captured, cfg=cfg)).plan
        alloc = plan.meta["allocation"]
        kept_by_layer = [0] * plan.num_layers
        for m in plan.peft_ranks:
            kept_by_layer[run.arch.role_of(m)[0]] += 1
        out["plans"][name] = {
            "overrides": overrides, "predicted_step_speedup": alloc.get("predicted_speedup"),
            "summary": plan.summary(), "heads_per_layer": [len(k) for k in plan.kept_heads],
            "neurons_per_layer": [len(k) for k in plan.kept_neurons], "modules_per_layer": kept_by_layer,
            "types": alloc["types"]}
        print(f"{name:>14}: {alloc.get('predicted_speedup', 0):.2f}x  {plan.summary()}  modules/layer "
              f"{kept_by_layer}  heads/layer {out['plans'][name]['heads_per_layer']}")
    path = ROOT / "results" / "levers" / f"plans-{rows}-{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
