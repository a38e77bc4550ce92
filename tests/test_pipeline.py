"""End to end on tiny random models: Light-PEFT runs (classification, regression, custom files, adapters,
GQA decoder), the run folder, the export, and the `eval` / `export` CLI round trips."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import make_tokenizer

import prunetune
from prunetune.cli import main

POS = ["the movie was good and the actors were great", "a charming and often affecting journey",
       "one of the best films of the year", "a great and wonderful story", "i loved this film , it is great"]
NEG = ["the plot is bad , boring and too long", "it is not a film i would watch again",
       "a dull and terrible mess", "i hated this movie , it is bad", "the worst film of the year"]
PAIRS = [("a man is playing a flute", "a man plays the flute", 4.8), ("a plane is taking off", "an airplane takes off", 4.5),
         ("a cat is eating", "a dog is running", 0.6), ("a woman is cutting onions", "a man is playing a guitar", 0.2),
         ("a boy is reading a book", "a child reads a book", 4.0), ("the sun is shining", "it is raining hard", 1.0)]
VOCAB_TEXTS = POS + NEG + [a + " " + b for a, b, _ in PAIRS] + ["review stars pos neg"]

METRIC_KEYS = {"accuracy", "f1", "matthews", "pearson", "spearman", "combined"}


# ---------------------------------------------------------------- builders

def save_tiny_bert(path: Path, seed: int = 0) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    tok = make_tokenizer(VOCAB_TEXTS)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64, num_labels=2))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_tiny_llama(path: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = make_tokenizer(VOCAB_TEXTS)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3,
        intermediate_size=40, max_position_embeddings=64, num_labels=2, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_sst2(folder: Path, n_train: int = 64, n_dev: int = 32) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        rows = [f"{(POS if i % 2 else NEG)[(i // 2) % 5]}\t{i % 2}" for i in range(n)]
        (folder / name).write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return folder


def write_stsb(folder: Path, n_train: int = 48, n_dev: int = 24) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        rows = []
        for i in range(n):
            a, b, score = PAIRS[i % len(PAIRS)]
            rows.append(f"{i}\t{a}\t{b}\t{score + 0.01 * (i % 7):.3f}")
        (folder / name).write_text("index\tsentence1\tsentence2\tscore\n" + "\n".join(rows) + "\n")
    return folder


def write_custom_csv(folder: Path, n_train: int = 48, n_dev: int = 16) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.csv", n_train), ("dev.csv", n_dev)):
        rows = [f"\"{(POS if i % 2 else NEG)[(i // 2) % 5]}\",{'pos' if i % 2 else 'neg'},{i}" for i in range(n)]
        (folder / name).write_text("review,stars,id\n" + "\n".join(rows) + "\n")
    return folder


def light(model_dir: Path, data: dict, out: Path, **sections) -> dict:
    cfg = {"model": {"name_or_path": str(model_dir)}, "data": data, "output_dir": str(out),
           "train": {"epochs": 2, "batch_size": 8, "eval_batch_size": 16, "log_every": 2}}
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    return prunetune.light_peft(cfg)


def out_features(module) -> int:
    """Output width of a Linear, or of the base layer of a LoRA-wrapped Linear."""
    return getattr(module, "base_layer", module).out_features


def metrics_of(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k in METRIC_KEYS}


def assert_metrics_close(a: dict, b: dict, tol: float = 1e-6) -> None:
    a, b = metrics_of(a), metrics_of(b)
    assert a and set(a) == set(b), (a, b)
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=tol), (k, a, b)


def cli_eval(capsys, export: Path, *args) -> dict:
    capsys.readouterr()
    assert main(["eval", str(export), *args]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def sst2_dir(tmp_path_factory) -> Path:
    return write_sst2(tmp_path_factory.mktemp("sst2"))


@pytest.fixture(scope="module")
def main_run(tmp_path_factory, bert_dir, sst2_dir):
    out = tmp_path_factory.mktemp("runs") / "light"
    results = light(bert_dir, {"data_dir": str(sst2_dir)}, out, baseline=True)
    return out, results


# ---------------------------------------------------------------- the main classification run

def test_results_have_both_methods_with_evals_per_epoch(main_run):
    out, results = main_run
    assert results["task"]["name"] == "sst2" and results["task"]["metric"] == "accuracy"
    for method in ("vanilla", "light_peft"):
        res = results[method]
        assert [e["epoch"] for e in res["evals"]] == [1, 2]
        assert [e["step"] for e in res["evals"]] == [8, 16]  # 64 rows / batch 8 = 8 steps per epoch
        for e in res["evals"]:
            assert 0.0 <= e["accuracy"] <= 1.0 and {"f1", "matthews"} <= set(e)
        assert res["final"] == res["evals"][-1]
        assert res["best"]["accuracy"] == max(e["accuracy"] for e in res["evals"])
    lp = results["light_peft"]
    assert lp["total_steps"] == 16 and 1 <= lp["estimation_steps"] < 16
    assert lp["base_params"]["body"] < lp["base_params_before"]["body"] == results["vanilla"]["base_params"]["body"]
    assert 0 < lp["base_kept_pct"] < 100 and 0 < lp["block_kept_pct"] < 100
    assert lp["trainable_params"] < results["vanilla"]["trainable_params"]
    assert lp["export"] == str(out / "model")


def test_plan_counts_are_deterministic(main_run):
    out, results = main_run
    summary = results["light_peft"]["plan"]
    # heads: 4 per layer, rho 1/3 -> round(4/3) = 1 removed per layer -> 3 kept x 2 layers
    assert summary["heads_kept"] == "6/8"
    # FFN: global, 2 x 48 neurons, round(96/3) = 32 removed
    assert summary["neurons_kept"] == "64/96"
    # PEFT: 6 LoRA modules per BERT layer (q k v o up down) = 12; 75% removed -> 3 kept (at most: a module whose
    # ranks are all removed is dropped); ranks: 3 x r=8 = 24 survive, half of them removed -> 12 of 96
    kept_modules, total_modules = map(int, summary["peft_modules_kept"].split("/"))
    assert total_modules == 12 and 1 <= kept_modules <= 3
    assert summary["peft_ranks_kept"] == "12/96"

    plan = prunetune.PruningPlan.load(out / "plan.json")
    assert plan.summary() == summary
    assert [len(k) for k in plan.kept_heads] == [3, 3]
    assert sum(len(k) for k in plan.kept_neurons) == 64
    assert all(len(k) >= 3 for k in plan.kept_neurons)  # 5% floor: ceil(0.05 * 48) = 3
    assert plan.num_units == 4 and plan.heads_per_unit == 1 and plan.family == "bert"


def test_run_folder_contents(main_run):
    out, results = main_run
    for name in ("results.json", "plan.json", "report.md", "heads.png", "ffn.png", "peft.png", "curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    assert set(saved) >= {"config", "task", "vanilla", "light_peft"}
    assert saved["light_peft"]["plan"] == results["light_peft"]["plan"]
    assert saved["config"]["data"]["data_dir"] == results["config"]["data"]["data_dir"]
    report = (out / "report.md").read_text()
    assert "heads kept" in report and "6/8" in report and "![" in report
    export = out / "model"
    manifest = json.loads((export / "prunetune.json").read_text())
    assert manifest["peft"] == "lora" and manifest["task"]["name"] == "sst2"
    for rel in manifest["files"]:
        assert (export / rel).is_file()
    assert (export / "adapter" / "adapter_config.json").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_loaded_export_matches_plan(main_run):
    out, _ = main_run
    loaded = prunetune.load(out / "model")
    assert loaded.plan.to_json() == prunetune.PruningPlan.load(out / "plan.json").to_json()
    bert = loaded.model.base_model.model.bert
    for layer in bert.encoder.layer:
        assert out_features(layer.attention.self.query) == 3 * 8  # 3 heads x head_dim 8
        assert layer.attention.self.num_attention_heads == 3
    assert sum(out_features(layer.intermediate.dense) for layer in bert.encoder.layer) == 64


def test_cli_eval_matches_final_metrics(main_run, sst2_dir, capsys):
    out, results = main_run
    got = cli_eval(capsys, out / "model", "--data-dir", str(sst2_dir))
    assert got["task"] == "sst2" and got["rows"] == 32
    assert_metrics_close(got, results["light_peft"]["final"])
    # small batches (more padding variation) give the same numbers
    assert_metrics_close(cli_eval(capsys, out / "model", "--data-dir", str(sst2_dir), "--batch-size", "3"), got)


def test_cli_export_merge_round_trip(main_run, sst2_dir, capsys, tmp_path):
    out, results = main_run
    merged = tmp_path / "merged"
    capsys.readouterr()
    assert main(["export", str(out), "--out", str(merged), "--merge"]) == 0
    assert "wrote" in capsys.readouterr().out
    loaded = prunetune.load(merged)
    assert loaded.info["peft"] == "merged"
    assert not any("lora_" in n for n, _ in loaded.model.named_parameters())
    assert_metrics_close(cli_eval(capsys, merged, "--data-dir", str(sst2_dir)), results["light_peft"]["final"])

    # non-merged re-export of an export folder, and the logits of all three agree
    again = tmp_path / "again"
    assert main(["export", str(out / "model"), "--out", str(again)]) == 0
    tok = loaded.tokenizer
    batch = tok(["the movie was good", "a dull and terrible mess , boring"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = [prunetune.load(p).model(**batch).logits for p in (out / "model", merged, again)]
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[0], logits[2], atol=0, rtol=0)


def test_cli_light_run(bert_dir, sst2_dir, tmp_path, capsys):
    out = tmp_path / "cli-run"
    assert main(["light", "--model", str(bert_dir), "--data-dir", str(sst2_dir), "--output-dir", str(out),
                 "--max-steps", "4", "--batch-size", "8", "--set", "prune.heads=0.5", "--no-export"]) == 0
    printed = capsys.readouterr().out
    assert "Light-PEFT" in printed and "heads kept" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["light_peft"]["plan"]["heads_kept"] == "4/8"  # round(0.5 * 4) = 2 removed per layer
    assert results["config"]["prune"]["heads"] == 0.5 and "vanilla" not in results
    assert not (out / "model").exists()


# ---------------------------------------------------------------- other tasks and options

def test_regression_stsb(bert_dir, tmp_path, capsys):
    data = write_stsb(tmp_path / "stsb")
    out = tmp_path / "run"
    # the checkpoint has a 2-label head: a regression run re-initialises it (1 output).
    # max_length 12 truncates most pairs: `eval` must evaluate the export the way the run did
    results = light(bert_dir, {"task": "stsb", "data_dir": str(data), "max_length": 12}, out)
    assert results["task"]["num_labels"] == 1 and results["task"]["metric"] == "pearson"
    lp = results["light_peft"]
    assert [e["epoch"] for e in lp["evals"]] == [1, 2]
    assert {"pearson", "spearman"} <= set(lp["final"])
    assert lp["plan"]["heads_kept"] == "6/8" and lp["plan"]["neurons_kept"] == "64/96"
    loaded = prunetune.load(out / "model")
    assert loaded.model.base_model.model.config.num_labels == 1
    got = cli_eval(capsys, out / "model", "--data-dir", str(data))
    assert got["task"] == "stsb" and got["rows"] == 24
    assert_metrics_close(got, lp["final"])


def test_custom_csv_task(bert_dir, tmp_path, capsys):
    data = write_custom_csv(tmp_path / "custom")
    out = tmp_path / "run"
    results = light(bert_dir, {"task": "custom", "data_dir": str(data), "text_fields": ["review"],
                               "label_field": "stars"}, out, train={"epochs": 1})
    task = results["task"]
    assert task["name"] == "custom" and task["num_labels"] == 2 and task["label_names"] == ["neg", "pos"]
    lp = results["light_peft"]
    assert [e["epoch"] for e in lp["evals"]] == [1] and lp["plan"]["heads_kept"] == "6/8"
    got = cli_eval(capsys, out / "model", "--dev-file", str(data / "dev.csv"))
    assert got["task"] == "custom" and got["rows"] == 16
    assert_metrics_close(got, lp["final"])

    # a dev file holding one class only must keep the training label ids ('pos' = 1, not 0)
    pos_only = data / "pos_only.csv"
    pos_only.write_text("review,stars,id\n" + "\n".join(f"\"{t}\",pos,{i}" for i, t in enumerate(POS)) + "\n")
    loaded = prunetune.load(out / "model")
    batch = loaded.tokenizer(POS, padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = loaded.model(**batch).logits.argmax(-1)
    expected = float((predicted == 1).float().mean())
    got = cli_eval(capsys, out / "model", "--dev-file", str(pos_only))
    assert got["rows"] == 5 and got["accuracy"] == pytest.approx(expected, abs=1e-6)


def test_adapter_run(bert_dir, sst2_dir, tmp_path, capsys):
    out = tmp_path / "run"
    results = light(bert_dir, {"data_dir": str(sst2_dir)}, out, peft={"kind": "adapter", "adapter_size": 4})
    lp = results["light_peft"]
    assert lp["plan"]["heads_kept"] == "6/8" and lp["plan"]["neurons_kept"] == "64/96"
    # 4 adapter positions (attention output + FFN output, 2 layers) of 4 units: 1 module kept (75% of 4 removed)
    assert lp["plan"]["peft_modules_kept"] == "1/4" and lp["plan"]["peft_ranks_kept"] == "2/16"
    manifest = json.loads((out / "model" / "prunetune.json").read_text())
    assert manifest["peft"] == "adapter" and (out / "model" / "adapters.safetensors").is_file()
    loaded = prunetune.load(out / "model")
    assert loaded.adapters is not None and sum(loaded.adapters.sizes().values()) == 2
    assert_metrics_close(cli_eval(capsys, out / "model", "--data-dir", str(sst2_dir)), lp["final"])


def test_optimizer_state_reset(bert_dir, sst2_dir, tmp_path):
    train = {"max_steps": 4, "epochs": 1}
    reset = light(bert_dir, {"data_dir": str(sst2_dir)}, tmp_path / "reset", train=train,
                  estimate={"steps": 2, "optimizer_state": "reset"})
    sliced = light(bert_dir, {"data_dir": str(sst2_dir)}, tmp_path / "slice", train=train,
                   estimate={"steps": 2, "optimizer_state": "slice"})
    assert reset["config"]["estimate"]["optimizer_state"] == "reset"
    assert reset["light_peft"]["estimation_steps"] == sliced["light_peft"]["estimation_steps"] == 2
    # identical estimation phase -> identical plan; only the fine-tuning optimizer state differs
    plan_r = json.loads((tmp_path / "reset" / "plan.json").read_text())
    plan_s = json.loads((tmp_path / "slice" / "plan.json").read_text())
    assert plan_r == plan_s
    assert reset["light_peft"]["plan"]["heads_kept"] == "6/8"
    assert prunetune.load(tmp_path / "reset" / "model").plan.summary() == reset["light_peft"]["plan"]


def test_same_seed_same_plan(bert_dir, sst2_dir, tmp_path):
    runs = []
    for i in range(2):
        light(bert_dir, {"data_dir": str(sst2_dir)}, tmp_path / f"r{i}", train={"max_steps": 5, "seed": 7},
              estimate={"steps": 3})
        runs.append((tmp_path / f"r{i}" / "plan.json").read_text())
    assert runs[0] == runs[1]
    plan = json.loads(runs[0])
    assert plan["meta"]["estimation_steps"] == 3
    # modules are ranked by the chosen score (taylor by default); the other is kept beside it for reports
    meta = plan["meta"]
    assert meta["module_score"] == "taylor" and meta["module_importance"] == meta["module_taylor"]
    assert meta["module_norm_ratio"].keys() == meta["module_taylor"].keys() and meta["module_norm_ratio"]
    assert meta["module_norm_ratio"] != meta["module_taylor"]
    assert json.loads((tmp_path / "r0" / "results.json").read_text())["light_peft"]["final"] == \
        json.loads((tmp_path / "r1" / "results.json").read_text())["light_peft"]["final"]


def test_llama_gqa_decoder(tmp_path, sst2_dir, capsys):
    model_dir = save_tiny_llama(tmp_path / "llama")
    out = tmp_path / "run"
    results = light(model_dir, {"data_dir": str(sst2_dir)}, out, train={"epochs": 1})
    lp = results["light_peft"]
    plan = prunetune.PruningPlan.load(out / "plan.json")
    assert plan.family == "llama" and plan.num_units == 3 and plan.heads_per_unit == 2
    # 3 KV groups of 2 query heads per layer; round(3/3) = 1 group removed -> 2 groups = 4 query heads kept
    assert lp["plan"]["heads_kept"] == "8/12" and [len(k) for k in plan.kept_heads] == [2, 2]
    assert lp["plan"]["neurons_kept"] == "53/80"  # round(80/3) = 27 removed globally
    # 7 LoRA modules per layer (q k v o up gate down) = 14; round(0.75 * 14) = 11 removed -> <= 3 kept, 12 ranks
    assert lp["plan"]["peft_modules_kept"].endswith("/14") and lp["plan"]["peft_ranks_kept"] == "12/112"
    loaded = prunetune.load(out / "model")
    attn = loaded.model.base_model.model.model.layers[0].self_attn
    assert out_features(attn.k_proj) == 2 * 8 and out_features(attn.q_proj) == 4 * 8  # KV groups x head_dim 8
    assert_metrics_close(cli_eval(capsys, out / "model", "--data-dir", str(sst2_dir)), lp["final"])


def test_dead_units_are_pruned_first(tmp_path, sst2_dir, score="taylor"):
    """Heads and neurons that cannot affect the output (their o / down input columns are zero) have zero
    Taylor importance, so they are removed first. (The paper's mask ranking fails this test: under AdamW every
    mask moves by about lr per step whatever its gradient's size, so a dead neuron pulled down by L1 alone ties
    with live neurons whose gradient happened to point the same way.)"""
    from transformers import AutoModelForSequenceClassification

    model_dir = save_tiny_bert(tmp_path / "bert", seed=1)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    dead_heads, dead_neurons = {0: 1, 1: 3}, {0: list(range(0, 20, 2)), 1: [5, 7, 40]}
    with torch.no_grad():
        for layer, head in dead_heads.items():
            model.bert.encoder.layer[layer].attention.output.dense.weight[:, head * 8:(head + 1) * 8] = 0
        for layer, neurons in dead_neurons.items():
            model.bert.encoder.layer[layer].output.dense.weight[:, neurons] = 0
    model.save_pretrained(model_dir)
    light(model_dir, {"data_dir": str(sst2_dir)}, tmp_path / "run", train={"max_steps": 6},
          estimate={"steps": 4, "structure_score": score}, peft={"targets": ["q", "v"]},
          prune={"modules": 0.0, "ranks": 0.0})
    plan = prunetune.PruningPlan.load(tmp_path / "run" / "plan.json")
    assert plan.meta["structure_score"] == score
    for layer, head in dead_heads.items():
        assert head not in plan.kept_heads[layer] and len(plan.kept_heads[layer]) == 3
    for layer, neurons in dead_neurons.items():
        assert not set(neurons) & set(plan.kept_neurons[layer])
