"""Causal-LM fine-tuning: instruction data (prompt masking, padding), an end-to-end Light-PEFT run on a tiny
random GQA Llama causal LM, a merged uniform export that loads with plain `from_pretrained` and generates,
and GGUF conversion/caching (the real SmolLM2-135M-Instruct GGUF: tests/test_smollm2_slow.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import make_tokenizer

import prunetune
from prunetune.cli import main
from prunetune.config import DataConfig
from prunetune.data import encode, load_task, make_collate
from prunetune.data.causal import IGNORE
from prunetune.errors import PrunetuneError

POS = ["the movie was good and the actors were great", "a charming and often affecting journey",
       "one of the best films of the year", "a great and wonderful story"]
NEG = ["the plot is bad , boring and too long", "it is not a film i would watch again",
       "a dull and terrible mess", "the worst film of the year"]
QUESTION = "is this review positive or negative ?"
VOCAB_TEXTS = POS + NEG + [QUESTION, "positive negative user assistant : hello world once upon a time"]
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [SEP] {% endfor %}"
            "{% if add_generation_prompt %}assistant :{% endif %}")


def chat_tokenizer(template: bool = True):
    tok = make_tokenizer(VOCAB_TEXTS)
    tok.eos_token = "[SEP]"
    if template:
        tok.chat_template = TEMPLATE
    return tok


def instruction_rows(n: int) -> list[dict]:
    return [{"prompt": f"{QUESTION} {(POS if i % 2 else NEG)[(i // 2) % 4]}",
             "response": "positive" if i % 2 else "negative"} for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def save_tiny_causal_llama(path: Path, tok, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3,
        head_dim=8, intermediate_size=40, max_position_embeddings=128, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# ---------------------------------------------------------------- data: loading, masking, padding

@pytest.fixture
def files(tmp_path):
    rows = instruction_rows(6) + [{"text": "once upon a time"}]
    return (write_jsonl(tmp_path / "train.jsonl", rows), write_jsonl(tmp_path / "dev.jsonl", rows[:3]))


def test_load_task_causal_lm(files):
    task, train, dev = load_task(DataConfig(task="causal_lm", train_file=str(files[0]), dev_file=str(files[1])))
    assert task.name == "causal_lm" and task.causal_lm and task.metric == "perplexity"
    assert not task.greater_is_better
    assert len(train) == 7 and len(dev) == 3
    assert train[0] == {"prompt": instruction_rows(1)[0]["prompt"], "response": "negative"}
    assert train[-1] == {"prompt": None, "response": "once upon a time"}


def test_prompt_tokens_are_masked_with_chat_template(files):
    tok = chat_tokenizer()
    _, train, _ = load_task(DataConfig(task="causal_lm", train_file=str(files[0]), dev_file=str(files[1])))
    ds = encode(train, tok, max_length=64)
    for row, item in zip(train[:6], ds.items[:6]):
        head = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True,
                                       tokenize=False)
        prompt_ids = tok(head, add_special_tokens=False)["input_ids"]
        n = len(prompt_ids)
        assert item["input_ids"][:n] == prompt_ids
        assert item["labels"][:n] == [IGNORE] * n  # no loss on the prompt
        assert item["labels"][n:] == item["input_ids"][n:]  # loss on the response (and end-of-turn)
        assert tok.decode(item["input_ids"][n:]) == f"{row['response']} [SEP]"
        assert len(item["attention_mask"]) == len(item["input_ids"])
    text = ds.items[6]  # plain text row: every token is trained, eos appended
    assert text["labels"] == text["input_ids"] and text["input_ids"][-1] == tok.eos_token_id


def test_prompt_masking_without_template_and_truncation():
    tok = chat_tokenizer(template=False)
    row = instruction_rows(1)[0]
    item = encode([row], tok, max_length=64).items[0]
    prompt_ids = tok(row["prompt"])["input_ids"]  # [CLS] ... [SEP]: the tokenizer's own special tokens
    response_ids = tok(row["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert item["input_ids"] == prompt_ids + response_ids
    assert item["labels"] == [IGNORE] * len(prompt_ids) + response_ids
    # too long: the response (here 2 tokens) survives, the prompt keeps its end
    short = encode([row], tok, max_length=5).items[0]
    assert len(short["input_ids"]) == 5 and short["input_ids"] == prompt_ids[-3:] + response_ids
    assert short["labels"] == [IGNORE] * 3 + response_ids


def test_collate_pads_labels_with_ignore(files):
    tok = chat_tokenizer()
    _, train, _ = load_task(DataConfig(task="causal_lm", train_file=str(files[0]), dev_file=str(files[1])))
    items = encode(train, tok, 64).items
    batch = make_collate(tok)([items[0], items[-1]])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    short = min(items[0], items[-1], key=lambda it: len(it["input_ids"]))
    row = 0 if short is items[0] else 1
    n = len(short["input_ids"])
    assert batch["attention_mask"][row, n:].eq(0).all() and batch["labels"][row, n:].eq(IGNORE).all()
    assert batch["input_ids"][row, n:].eq(tok.pad_token_id).all()
    assert batch["labels"][row, :n].tolist() == short["labels"]


def test_bad_causal_rows(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hello", "answer": "world"}])
    with pytest.raises(PrunetuneError, match="needs 'prompt' and 'response', or 'text'"):
        load_task(DataConfig(task="causal_lm", train_file=str(bad), dev_file=str(bad)))
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "hello", "response": " "}])
    with pytest.raises(PrunetuneError, match="must not be empty"):
        load_task(DataConfig(task="causal_lm", train_file=str(empty), dev_file=str(empty)))
    # other column names via data.text_fields
    other = write_jsonl(tmp_path / "other.jsonl", [{"q": "hello", "a": "world"}])
    _, rows, _ = load_task(DataConfig(task="causal_lm", train_file=str(other), dev_file=str(other),
                                      text_fields=["q", "a"]))
    assert rows == [{"prompt": "hello", "response": "world"}]


def test_best_epoch_lower_is_better():
    from prunetune.methods.common import summarize_evals

    evals = [{"epoch": 1, "perplexity": 9.0}, {"epoch": 2, "perplexity": 4.0}, {"epoch": 3, "perplexity": 5.0}]
    assert summarize_evals(evals, "perplexity")["best"]["epoch"] == 2
    assert summarize_evals(evals, "perplexity", greater_is_better=True)["best"]["epoch"] == 1
    acc = [{"epoch": 1, "accuracy": 0.5}, {"epoch": 2, "accuracy": 0.7}]
    assert summarize_evals(acc, "accuracy")["best"]["epoch"] == 2


# ---------------------------------------------------------------- end to end on a tiny causal Llama

@pytest.fixture(scope="module")
def causal_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal")
    tok = chat_tokenizer()
    model_dir = save_tiny_causal_llama(root / "llama", tok)
    train = write_jsonl(root / "train.jsonl", instruction_rows(48))
    dev = write_jsonl(root / "dev.jsonl", instruction_rows(16))
    out = root / "run"
    results = prunetune.light_peft({
        "model": {"name_or_path": str(model_dir)},
        "data": {"task": "causal_lm", "train_file": str(train), "dev_file": str(dev), "max_length": 48},
        "prune": {"ffn_scope": "layer"},
        "train": {"epochs": 2, "batch_size": 8, "eval_batch_size": 16, "lr": 5e-3, "log_every": 2},
        "output_dir": str(out), "baseline": True})
    return out, results, dev


def test_causal_light_peft_run(causal_run):
    out, results, _ = causal_run
    assert results["task"]["name"] == "causal_lm" and results["task"]["metric"] == "perplexity"
    for method in ("vanilla", "light_peft"):
        res = results[method]
        assert [e["epoch"] for e in res["evals"]] == [1, 2]
        for e in res["evals"]:
            assert e["perplexity"] == pytest.approx(torch.tensor(e["loss"]).exp().item(), rel=1e-5)
            assert 1.0 < e["perplexity"] < 1e4
        assert res["best"]["perplexity"] == min(e["perplexity"] for e in res["evals"])  # lower is better
    # the LM learns something: dev perplexity falls, and is below the uniform-guess level (vocab size)
    van = results["vanilla"]["evals"]
    assert van[1]["perplexity"] < van[0]["perplexity"] < len(chat_tokenizer())
    lp = results["light_peft"]
    plan = prunetune.PruningPlan.load(out / "plan.json")
    # GQA: 3 KV groups of 2 query heads; 1 group removed per layer; FFN uniform per layer: round(40/3) = 13 removed
    assert plan.family == "llama" and plan.num_units == 3 and plan.heads_per_unit == 2
    assert lp["plan"]["heads_kept"] == "8/12" and lp["plan"]["neurons_kept"] == "54/80"
    assert [len(k) for k in plan.kept_neurons] == [27, 27]
    assert lp["trainable_params"] < results["vanilla"]["trainable_params"]
    manifest = json.loads((out / "model" / "prunetune.json").read_text())
    assert manifest["causal_lm"] is True and manifest["plain_from_pretrained"] is True
    assert manifest["task"]["name"] == "causal_lm"


def test_causal_export_loads_and_evals(causal_run, capsys):
    out, results, dev = causal_run
    loaded = prunetune.load(out / "model")
    assert type(loaded.model.base_model.model).__name__ == "LlamaForCausalLM"
    capsys.readouterr()
    assert main(["eval", str(out / "model"), "--dev-file", str(dev)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["task"] == "causal_lm" and got["rows"] == 16
    final = results["light_peft"]["final"]
    assert got["perplexity"] == pytest.approx(final["perplexity"], rel=1e-5)
    assert got["loss"] == pytest.approx(final["loss"], rel=1e-5)


def test_merged_uniform_export_plain_from_pretrained_generates(causal_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _, _ = causal_run
    merged = tmp_path / "merged"
    assert main(["export", str(out), "--out", str(merged), "--merge"]) == 0
    model = AutoModelForCausalLM.from_pretrained(merged).eval()  # plain transformers, no prunetune
    tok = AutoTokenizer.from_pretrained(merged)
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (4, 2, 8, 27)
    assert model.model.layers[0].self_attn.k_proj.out_features == 16
    assert not any("lora_" in n for n, _ in model.named_parameters())

    prompt = tok.apply_chat_template([{"role": "user", "content": f"{QUESTION} {POS[0]}"}],
                                     add_generation_prompt=True, tokenize=False)
    enc = tok(prompt, add_special_tokens=False, return_tensors="pt")
    enc = {k: enc[k] for k in ("input_ids", "attention_mask")}  # (the test tokenizer also emits token_type_ids)
    reference = prunetune.load(out / "model").model  # LoRA not merged: same function
    with torch.no_grad():
        torch.testing.assert_close(model(**enc).logits, reference(**enc).logits, atol=1e-4, rtol=1e-4)
        generated = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    new = generated[0, enc["input_ids"].shape[1]:]
    assert 1 <= len(new) <= 4 and isinstance(tok.decode(new), str)


# ---------------------------------------------------------------- GGUF conversion and cache

def test_gguf_cache_reuse_and_errors(tmp_path, monkeypatch):
    import importlib.util

    from prunetune import models

    monkeypatch.setenv("PRUNETUNE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    with pytest.raises(PrunetuneError, match="needs the `gguf` package"):
        models.resolve_model_path(str(gguf))
    with pytest.raises(PrunetuneError, match="GGUF file not found"):
        models.resolve_model_path(str(tmp_path / "missing.gguf"))
    with pytest.raises(PrunetuneError, match="GGUF file not found"):
        models.resolve_model_path(str(tmp_path), gguf_file="missing.gguf")
    # an existing conversion of this very file is reused (no conversion attempted: gguf is "missing")
    target = models.cache_dir() / f"tiny-{__import__('hashlib').sha256(str(gguf.resolve()).encode()).hexdigest()[:10]}"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"")
    (target / models.GGUF_MARKER).write_text(json.dumps({"size": gguf.stat().st_size, "file": gguf.name}))
    assert models.resolve_model_path(str(gguf)) == str(target)
    assert models.resolve_model_path(str(tmp_path), gguf_file="tiny.gguf") == str(target)
    assert models.resolve_model_path(str(target), gguf_file="tiny.gguf") == str(target)  # idempotent
    gguf.write_bytes(b"GGUF" + b"\0" * 80)  # the source changed: the cache is stale, conversion is attempted
    with pytest.raises(PrunetuneError, match="needs the `gguf` package"):
        models.resolve_model_path(str(gguf))


def test_gguf_error_on_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PRUNETUNE_CACHE", str(tmp_path / "cache"))
    assert main(["light", "--model", str(tmp_path / "nope.gguf"), "--output-dir", str(tmp_path / "o"),
                 "--max-steps", "1"]) == 2
    assert "GGUF file not found" in capsys.readouterr().err


def test_prune_peft_search_on_a_causal_lm(tmp_path, monkeypatch):
    """PrunePEFT builds its supernet through methods/common.load_base: a causal-LM task gets the LM head (its
    former copy of the model building loaded a sequence classifier and skipped the tokenizer check)."""
    from prunetune.config import from_dict
    from prunetune.methods import common, prune_peft

    built = []
    real = common.load_base

    def spy(ctx, plan=None):
        hf, arch = real(ctx, plan)
        built.append(type(hf).__name__)
        return hf, arch

    monkeypatch.setattr(prune_peft, "load_base", spy)
    tok = chat_tokenizer()
    model_dir = save_tiny_causal_llama(tmp_path / "llama", tok)
    train = write_jsonl(tmp_path / "train.jsonl", instruction_rows(32))
    dev = write_jsonl(tmp_path / "dev.jsonl", instruction_rows(8))
    results = prune_peft.run(from_dict({
        "model": {"name_or_path": str(model_dir)},
        "data": {"task": "causal_lm", "train_file": str(train), "dev_file": str(dev), "max_length": 48},
        "train": {"max_steps": 2, "batch_size": 8, "eval_batch_size": 8},
        "search": {"warmup": False, "round_steps": 2, "criteria": ["taylor", "magnitude"],
                   "warmup_cache": str(tmp_path / "cache")},
        "output_dir": str(tmp_path / "run")}), export=False)
    assert built and all(name.endswith("ForCausalLM") for name in built)
    assert results["rounds"] and "perplexity" in results["retrain"]["final"]
