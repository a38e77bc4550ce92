"""Where PrunePEFT's search time goes, against one retrain of the found structure (one task, one seed).

    python benchmarks/search_cost.py --task sst2 --set search.k=0.5 --set search.proxy_samples=32

Runs the warm-up (timing its drop_loss forwards apart from its training rounds), the search and the retrain of
the found structure, on the real MiniLM with the settings of `benchmarks/prune_peft.py` (budget = the smallest
fixed configuration of the space), and prints one JSON object: seconds and steps of each phase, the ratios
search / retrain and (search + warm-up / N) / retrain for N tasks sharing the cached warm-up, evaluation left
out on both sides, and the warm-up's diagnostics (rows, epochs, Spearman of each criterion with drop_loss,
share of units whose removal lowers the held-out loss, per round). Run it on a quiet machine: it is a timing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")  # before torch: importing torch imports tqdm, which reads it then

import torch  # noqa: E402
from prune_peft import GLUE_DIRS, base_config, fixed, overrides, peft_params  # noqa: E402  (benchmarks/ is on sys.path here)

import prunetune.methods.prune_peft as pp  # noqa: E402
from prunetune.arch import get_arch  # noqa: E402
from prunetune.config import from_dict  # noqa: E402
from prunetune.logs import set_verbosity  # noqa: E402
from prunetune.methods.common import prepare, train_fixed  # noqa: E402
from prunetune.models import load_model  # noqa: E402


class Stopwatch:
    """Wraps prune_peft.drop_loss: seconds spent in it, counted apart from the rounds' training."""

    def __init__(self):
        self.seconds, self.inner = 0.0, pp.drop_loss

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="sst2", choices=sorted(GLUE_DIRS))
    p.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--model", default="minilm")
    p.add_argument("--train-samples", type=int, default=2000)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--space", default="lora_qv,lora_ko,lora_ffn,parallel_ffn")
    p.add_argument("--chunk", type=int, default=4)
    p.add_argument("--k", type=float, default=0.25)
    p.add_argument("--data-fraction", type=float, default=0.1)
    p.add_argument("--tasks-sharing-warmup", type=int, default=4, help="N in (search + warm-up / N) / retrain")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override; repeatable")
    args = p.parse_args(argv)
    set_verbosity("warning")
    base = base_config(model=args.model, task=args.task, data_root=args.data_root, train_samples=args.train_samples,
                       max_length=args.max_length, epochs=args.epochs, batch_size=32, lr=args.lr, seed=args.seed,
                       space=args.space.split(","), k=args.k, data_fraction=args.data_fraction, chunk=args.chunk,
                       cache=tempfile.mkdtemp(), output_dir=str(Path(tempfile.mkdtemp()) / "out"),
                       overrides={"search.warmup_by": "prediction", **overrides(args.set)})
    ctx = prepare(from_dict(base))
    sc = ctx.cfg.search
    arch = get_arch(load_model(ctx.model_path, ctx.task.num_labels))
    sc.budget = float(min(peft_params(ctx, fixed(arch, t, sc)) for t in sc.space))  # as prune_peft.py --budget fixed
    watch = Stopwatch()
    pp.drop_loss = watch  # iterative_prune looks drop_loss up in the module at call time

    rows, held = pp._split(ctx)
    t = time.perf_counter()
    wu = pp.warmup(ctx, rows, held)  # a fresh cache folder: always computed
    warm_s, warm_drop = time.perf_counter() - t, watch.seconds
    found = pp.iterative_prune(ctx, pp.search_loader(ctx, rows), wu["mapping"], sc.criteria, sc.round_steps,
                               held_out=held)
    retrain = train_fixed(ctx, found.structure, desc="retrain").metrics
    r_s, n = retrain["train_seconds_no_eval"], args.tasks_sharing_warmup
    print(json.dumps({
        "task": args.task, "seed": args.seed, "threads": torch.get_num_threads(), "settings": args.set,
        "k": sc.k, "data_fraction": sc.data_fraction, "warmup_round_steps": sc.warmup_round_steps,
        "proxy_samples": sc.proxy_samples, "budget": int(sc.budget),
        "warmup": {"seconds": warm_s, "drop_loss_seconds": warm_drop, "steps": wu["steps"], "rows": wu["rows"],
                   "epochs": wu["epochs"], "spearman": wu.get("spearman"),
                   "drop_loss_negative": wu.get("drop_loss_negative")},
        "search": {"seconds": found.seconds, "steps": found.steps, "rounds": len(found.rounds),
                   "drop_loss_seconds": watch.seconds - warm_drop},
        "retrain": {"seconds_no_eval": r_s, "steps": retrain["steps"], "final": retrain["final"]},
        "found_units": found.structure.units,
        "ratio_search": found.seconds / r_s,
        "ratio_with_warmup_shared": (found.seconds + warm_s / n) / r_s, "tasks_sharing_warmup": n,
        "ratio_with_full_warmup": (found.seconds + warm_s) / r_s}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
