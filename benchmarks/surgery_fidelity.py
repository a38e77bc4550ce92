"""How much of the trained model survives surgery: the dev metric right after the cut, before any fine-tune step.

    python benchmarks/surgery_fidelity.py SEED [section.key=value ...]   # e.g. 42 prune.target_speedup=1.6

Runs Light-PEFT's estimation phase once (the screens' setup of light_levers.py: MiniLM, SST-2 4,000 rows by
default, TASK / ROWS as there), then cuts copies of the estimated model with the same plan four ways: plain
(the paper: removed units dropped), bias compensation (prune.compensate), least-squares reconstruction
(prune.reconstruct) and both; and scores each on the dev set, next to the unpruned masked model, with the
relative error of the last hidden states against the masked model's (on the first dev batches). It separates
what a compensation lever buys at the cut from what the fine-tune recovers afterwards (light_levers.py measures
the end of the run). Writes benchmarks/results/screens/fidelity-TASK-SEED.json (NAME=... changes the
stem).
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from light_levers import TASKS, base_config  # noqa: E402

from prunetune.config import from_dict  # noqa: E402
from prunetune.methods.common import prepare  # noqa: E402
from prunetune.methods.light_peft import Estimate, _LightRun, estimate, prune  # noqa: E402
from prunetune.train.loop import evaluate  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent
BATCHES = 8  # dev batches the feature error is taken on


@torch.no_grad()
def last_hidden(model, loader, device) -> list[torch.Tensor]:
    """The encoder's last hidden states at real tokens, per dev batch (what the task head and the fine-tune
    build on: after 10% of the steps the head has barely learned, so the metric alone says little)."""
    model.eval()
    out = []
    for i, batch in enumerate(loader):
        if i == BATCHES:
            break
        batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        h = model(**batch, output_hidden_states=True).hidden_states[-1]
        out.append(h[batch["attention_mask"] > 0].float())
    return out


def relative_error(hs: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    return float(sum(((h - r) ** 2).sum() for h, r in zip(hs, ref)) / sum((r ** 2).sum() for r in ref)) ** 0.5


VARIANTS = {"plain": (False, False), "compensate": (True, False), "reconstruct": (False, True),
            "compensate+reconstruct": (True, True)}


def main(argv: list[str]) -> int:
    seed, overrides = int(argv[0]), argv[1:]
    task = os.environ.get("TASK", "sst2")
    rows = int(os.environ.get("ROWS", TASKS[task]["rows"]))
    # both statistics are collected; each variant below uses the ones its options would have
    base = base_config(seed, rows, f"runs/fidelity/{seed}", [*overrides, "prune.compensate=true",
                                                             "prune.reconstruct=true"], task=task)
    cfg = from_dict(base)
    ctx = prepare(cfg)
    run = _LightRun(ctx, checkpoints=False)
    t0 = time.time()
    est = estimate(run)
    metric = TASKS[task]["metric"]
    scores = {"masked (before the cut)": evaluate(run.model, ctx.dev_loader, ctx.task, ctx.device)[metric]}
    ref = last_hidden(run.model, ctx.dev_loader, ctx.device)
    errors = {}
    run.masks.detach()
    scores["unmasked, nothing cut"] = evaluate(run.model, ctx.dev_loader, ctx.task, ctx.device)[metric]
    errors["unmasked, nothing cut"] = relative_error(last_hidden(run.model, ctx.dev_loader, ctx.device), ref)
    # the run collected the covariance (prune.compensate is on); reconstruction alone uses mean x x^T
    second = tuple(c + torch.stack([torch.outer(v, v) for v in torch.tensor(m, dtype=torch.float64)])
                   for c, m in zip(est.moments, est.means))
    for name, (comp, recon) in VARIANTS.items():
        model = copy.deepcopy(run.model)
        variant = Estimate(plan=est.plan, means=est.means if comp else None,
                           moments=(est.moments if comp else second) if recon else None)
        pruned = prune(model=model, hf=model.base_model.model, arch=run.arch, adapters=None, estimate=variant,
                       r=cfg.peft.r, alpha=cfg.peft.alpha, dropout=cfg.peft.dropout,
                       damp=cfg.prune.reconstruct_damp)
        scores[name] = evaluate(pruned.model, ctx.dev_loader, ctx.task, ctx.device)[metric]
        errors[name] = relative_error(last_hidden(pruned.model, ctx.dev_loader, ctx.device), ref)
        print(f"{name}: {metric} {scores[name]:.4f}, last hidden state relative error {errors[name]:.4f}",
              flush=True)
    out = {"seed": seed, "task": task, "rows": rows, "overrides": overrides, "metric": metric,
           "estimation_steps": run.window.steps, "plan": est.plan.summary(), "dev_right_after_surgery": scores,
           "last_hidden_relative_error": errors,
           "seconds": time.time() - t0, "command": "python benchmarks/surgery_fidelity.py " + " ".join(argv)}
    path = ROOT / "results" / "screens" / f"{os.environ.get('NAME', 'fidelity')}-{task}-{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("dev_right_after_surgery", "last_hidden_relative_error")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
