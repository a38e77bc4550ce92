"""Predicted vs measured step speedup of one Light-PEFT plan, without training either side to the end.

    python benchmarks/light_speed.py SEED NAME [section.key=value ...]
    # e.g. 42 target prune.target_speedup=1.6 prune.backward_cut=false prune.bounded=true prune.modules=0.6

The config of `benchmarks/light_levers.py` (MiniLM SST-2, ROWS=n training rows, default 8000, batch 32,
max_length 128): the estimation phase runs as in a real run and makes the plan, surgery runs, then the pruned
model and a fresh vanilla LoRA model (same config, same loader, started at the pruned side's step so that both
train on the same batches with the same learning rate; checked) train STEPS optimizer steps each (default 60), in
alternating blocks of 10 so that machine drift hits both sides alike; the first block of each is warm-up and
not counted. Prints and writes benchmarks/results/speed/NAME-SEED.json: predicted step speedup (the cost model's),
measured (mean step time vanilla / pruned), and their ratio. A timing: run it with nothing else on the machine.

MODEL=smollm2 times SmolLM2-135M instead, on the causal instruction task of the committed SmolLM2 target rows
(`smollm.py --tasks causal --train-samples 1024 --max-length 64 --epochs 1 --batch-size 8 --ffn-scope layer`);
the overrides are that script's `--set` (ROWS is then ignored). Writes speed/smollm2-NAME-SEED.json.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import smollm  # noqa: E402  (this folder: SmolLM2's run config)
from light_levers import base_config  # noqa: E402  (this folder: the screens' shared run config)
from prunetune.config import from_dict  # noqa: E402
from prunetune.methods import light_peft  # noqa: E402
from prunetune.methods.common import build_model, prepare  # noqa: E402
from prunetune.train.loop import TrainState  # noqa: E402

ROOT = Path(__file__).resolve().parent
BLOCK = 10
SMOLLM_ARGS = ["--tasks=causal", "--train-samples=1024", "--eval-samples=200", "--max-length=64", "--epochs=1",
               "--batch-size=8", "--ffn-scope=layer"]


def main(argv: list[str]) -> int:
    seed, name, overrides = int(argv[0]), argv[1], argv[2:]
    rows, steps = int(os.environ.get("ROWS", "8000")), int(os.environ.get("STEPS", "60"))
    model_name = os.environ.get("MODEL", "minilm")
    if model_name == "smollm2":
        name = f"smollm2-{name}"
        args = smollm.parse_args(smollm.parser(), SMOLLM_ARGS + [f"--out=runs/speed/{name}-{seed}"]
                                 + [f"--set={o}" for o in overrides])
        base, _ = smollm.run_config("causal", args, seed)
        base["train"]["eval_each_epoch"] = False
        rows = args.train_samples
    elif model_name == "minilm":
        base = base_config(seed, rows, f"runs/speed/{name}-{seed}", overrides, eval_each_epoch=False)
    else:
        raise SystemExit(f"light_speed.py: MODEL must be minilm or smollm2, got {model_name!r}")
    ctx = prepare(from_dict(base))
    t0 = time.perf_counter()
    run = light_peft._LightRun(ctx, checkpoints=False)
    est = light_peft.estimate(run)  # the plan a real run would make
    light_peft.prune_phase(run, est)
    estimation_s = time.perf_counter() - t0
    pruned = run.state
    model, hf, _arch, adapters = build_model(ctx)  # vanilla LoRA, same config and loader, from the pruned side's step
    vanilla = TrainState(model, hf, {"adapters": adapters} if adapters is not None else {}, ctx.cfg.train,
                         ctx.train_loader, ctx.total_steps, ctx.device, desc="vanilla")
    vanilla.seek(pruned.step)  # the same batches (their padded lengths set the step time) and lr on both sides
    times = {"vanilla": [], "pruned": []}
    shapes = {"vanilla": [], "pruned": []}
    for block in range(max(2, steps // BLOCK + 1)):  # alternate, so drift of the machine hits both sides alike
        for side, state in (("vanilla", vanilla), ("pruned", pruned)):
            state.step_times.clear()
            state.run(BLOCK, before_forward=lambda batch, side=side: shapes[side].append(tuple(batch["input_ids"].shape)))
            if block > 0:  # block 0 is warm-up (allocator, caches)
                times[side] += state.step_times
    if shapes["vanilla"] != shapes["pruned"]:
        raise SystemExit("light_speed.py: the two sides saw batches of different shapes; the timing would compare "
                         "different work")
    mean = {k: statistics.fmean(v) for k, v in times.items()}
    median = {k: statistics.median(v) for k, v in times.items()}
    alloc = est.plan.meta["allocation"]
    predicted = alloc["predicted_speedup"]
    measured = mean["vanilla"] / mean["pruned"]
    out = {"name": name, "model": model_name, "seed": seed, "rows": rows, "overrides": overrides,
           "threads": torch.get_num_threads(),
           "plan": est.plan.summary(), "cut_block": alloc.get("cut_block"),
           "predicted_step_speedup": predicted, "measured_step_speedup": measured,
           "measured_median_speedup": median["vanilla"] / median["pruned"],
           "predicted_over_measured": predicted / measured,
           "vanilla_step_ms": 1e3 * mean["vanilla"], "pruned_step_ms": 1e3 * mean["pruned"],
           "timed_steps_each": len(times["vanilla"]), "estimation_and_surgery_s": estimation_s,
           "cost_rates": alloc.get("prediction", {}).get("rates"),
           "prediction": alloc.get("prediction"),  # the rates' values and the modelled parts of both steps
           "command": ("MODEL=smollm2 " if model_name == "smollm2" else "") + "python benchmarks/light_speed.py "
           + " ".join(argv)}
    path = ROOT / "results" / "speed" / f"{name}-{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("name", "plan", "predicted_step_speedup", "measured_step_speedup",
                                          "measured_median_speedup", "vanilla_step_ms", "pruned_step_ms")}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
