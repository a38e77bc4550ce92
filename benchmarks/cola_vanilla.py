"""Screen: does vanilla LoRA on MiniLM learn CoLA with more epochs? Prints Matthews per epoch.

    python benchmarks/cola_vanilla.py EPOCHS LR SEED   # writes benchmarks/results/screens/cola_vanilla_eEPOCHS_SEED.json
"""
import json, os, sys
from pathlib import Path
ROOT = Path(__file__).resolve().parent
os.environ.setdefault("TQDM_DISABLE", "1")
from prunetune.config import from_dict
from prunetune.methods.common import prepare
from prunetune.methods.light_peft import train_vanilla
epochs, lr, seed = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
cfg = {"model": {"name_or_path": "minilm"},
       "data": {"task": "cola", "data_dir": str(ROOT.parents[1] / "shared" / "data" / "CoLA"), "max_train_samples": 9000, "max_length": 64},
       "train": {"epochs": epochs, "batch_size": 32, "lr": lr, "seed": seed},
       "output_dir": f"runs/cola_vanilla_e{epochs:g}_lr{lr:g}_s{seed}"}
ctx = prepare(from_dict(cfg))
m = train_vanilla(ctx).metrics
out = {"epochs": epochs, "lr": lr, "seed": seed, "evals": m["evals"], "final": m["final"],
       "step_seconds": m["step_seconds"], "command": "python cola_vanilla.py " + " ".join(sys.argv[1:])}
print(json.dumps(out))
(ROOT / "results" / "screens").mkdir(parents=True, exist_ok=True)
(ROOT / "results" / "screens" / f"cola_vanilla_e{epochs:g}_{seed}.json").write_text(json.dumps(out, indent=1))
