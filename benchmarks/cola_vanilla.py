"""Screen: does vanilla LoRA on MiniLM learn CoLA with more epochs? Prints and stores the Matthews per epoch.

    python benchmarks/cola_vanilla.py EPOCHS LR SEED   # writes benchmarks/results/screens/cola_vanilla_eEPOCHS_SEED.json

The config is the committed CoLA rows' (`light_levers.base_config(task="cola")`: all rows, max_length 64, batch 32)
with the epochs and learning rate given.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

from light_levers import base_config  # noqa: E402  (this folder: the screens' run config)
from prunetune.config import from_dict  # noqa: E402
from prunetune.methods.common import prepare  # noqa: E402
from prunetune.methods.light_peft import train_vanilla  # noqa: E402

ROOT = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    epochs, lr, seed = float(argv[0]), float(argv[1]), int(argv[2])
    cfg = base_config(seed, 9000, f"runs/cola_vanilla_e{epochs:g}_lr{lr:g}_s{seed}",
                      [f"train.epochs={epochs}", f"train.lr={lr}"], task="cola")
    metrics = train_vanilla(prepare(from_dict(cfg))).metrics
    out = {"epochs": epochs, "lr": lr, "seed": seed, "evals": metrics["evals"], "final": metrics["final"],
           "step_seconds": metrics["step_seconds"], "command": "python cola_vanilla.py " + " ".join(argv)}
    print(json.dumps(out))
    path = ROOT / "results" / "screens" / f"cola_vanilla_e{epochs:g}_{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
