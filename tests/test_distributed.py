"""Two CPU processes (torchrun, gloo) with the same global batch produce the same pruning plan as one."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from helpers import make_tokenizer
from test_pipeline import VOCAB_TEXTS, write_sst2

import prunetune


def _tiny_bert_without_dropout(path):
    from transformers import BertConfig, BertForSequenceClassification

    tok = make_tokenizer(VOCAB_TEXTS)
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _overrides(model, data, out, stats=""):
    return {"model.name_or_path": str(model), "data.data_dir": str(data), "output_dir": str(out),
            "train.epochs": 2, "train.batch_size": 8, "train.seed": 3, "peft.dropout": 0.0,
            "estimate.steps": 4, "estimate.mask_lr": 0.05, "prune.modules": 0.5, "prune.ranks": 0.5,
            "prune.compensate": stats == "compensate", "prune.reconstruct": stats == "reconstruct"}


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
@pytest.mark.parametrize("stats", ["", "compensate", "reconstruct"])
def test_two_processes_give_the_single_process_plan(tmp_path, stats):
    """prune.compensate / prune.reconstruct: each rank sums its own batches' inputs (and their outer products);
    the sums are all-reduced, so both ranks compensate with the single process's statistics (over the same
    global batches)."""
    model = _tiny_bert_without_dropout(tmp_path / "model")
    data = write_sst2(tmp_path / "data", n_train=64, n_dev=16)
    single = _overrides(model, data, tmp_path / "single", stats)
    prunetune.light_peft(None, **{k.replace(".", "__"): v for k, v in single.items()})

    ddp = _overrides(model, data, tmp_path / "ddp", stats)
    sets = [arg for k, v in ddp.items() for arg in ("--set", f"{k}={v}")]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    proc = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "prunetune.cli", "light",
                           *sets, "--no-export"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads((tmp_path / "single" / "plan.json").read_text())
    b = json.loads((tmp_path / "ddp" / "plan.json").read_text())
    for key in ("kept_heads", "kept_neurons", "peft_ranks"):
        assert a[key] == b[key], key
    # importance scores agree numerically too (all-reduced means over the same global batches)
    for name, value in a["meta"]["module_importance"].items():
        assert b["meta"]["module_importance"][name] == pytest.approx(value, rel=1e-3, abs=1e-6)
    if stats:  # the same tokens, means and moments: the ranks' sums were all-reduced
        ca, cb = a["meta"]["compensation"], b["meta"]["compensation"]
        assert ca["tokens"] == cb["tokens"] > 0 and ca["reconstruct"] == cb["reconstruct"] == (stats == "reconstruct")
        keys = (["o_input_scale", "down_input_scale"] if stats == "reconstruct"
                else ["o_input_mean_abs", "down_input_mean_abs"])
        for key in keys:
            assert cb[key] == pytest.approx(ca[key], rel=1e-4, abs=1e-7)
    else:
        assert "compensation" not in a["meta"]
    ra = json.loads((tmp_path / "single" / "results.json").read_text())["light_peft"]["final"]
    rb = json.loads((tmp_path / "ddp" / "results.json").read_text())["light_peft"]["final"]
    assert ra["accuracy"] == pytest.approx(rb["accuracy"], abs=1e-6)
