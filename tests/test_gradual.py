"""Gradual pruning (prune.gradual): after estimation the plan's removed heads and FFN neurons fade out linearly
through their frozen masks while the model trains at full size; at the end of the fade the masked model computes
what the physically pruned one computes, so surgery changes nothing (masked == pruned, atol 1e-5) once what the
removed PEFT modules and ranks learned is kept too (prune.merge_removed; without it they are cut as in one-shot
pruning)."""
from __future__ import annotations

import pytest
import torch
from test_pipeline import save_tiny_bert, save_tiny_llama, write_sst2

from prunetune import PrunetuneError
from prunetune.config import from_dict
from prunetune.methods import light_peft
from prunetune.methods.common import prepare
from prunetune.plan import PruningPlan


def _ctx(tmp_path, model, **prune):
    data = write_sst2(tmp_path / "data", n_train=64, n_dev=16)
    return prepare(from_dict({
        "model": {"name_or_path": str(model)}, "data": {"task": "sst2", "data_dir": str(data)},
        "estimate": {"steps": 4, "mask_lr": 0.05}, "prune": {"heads": 0.5, "ffn": 0.5, **prune},
        "train": {"epochs": 2, "batch_size": 8, "seed": 3, "eval_each_epoch": False},
        "output_dir": str(tmp_path / "out")}))


def test_window_places_the_fade_between_estimation_and_surgery():
    cfg = from_dict({"estimate": {"steps": 10}, "prune": {"gradual": 0.1}})
    win = light_peft.Window.of(cfg, total=200, train_rows=5000)
    assert (win.steps, win.fade, win.cut) == (10, 20, 30)
    long = from_dict({"estimate": {"steps": 10}, "prune": {"gradual": 0.9}})
    assert light_peft.Window.of(long, total=25, train_rows=5000).cut == 24  # never past the last step
    assert light_peft.Window.of(from_dict({"estimate": {"steps": 10}}), total=200, train_rows=5000).fade == 0


def test_fade_targets_zero_removed_units_and_keep_or_reset_kept_ones():
    plan = PruningPlan(family="bert", model_type="bert", num_layers=1, num_units=3, heads_per_unit=1, head_dim=2,
                       intermediate_size=4, kept_heads=[[0, 2]], kept_neurons=[[1]])
    start = ([[0.9, 0.8, 0.7]], [[0.5, 0.6, 0.7, 0.8]])
    heads, ffn = light_peft.fade_targets(plan, start, fold=False)
    assert heads[0].tolist() == [1.0, 0.0, 1.0] and ffn[0].tolist() == [0.0, 1.0, 0.0, 0.0]
    heads, ffn = light_peft.fade_targets(plan, start, fold=True)
    assert torch.allclose(heads[0], torch.tensor([0.9, 0.0, 0.7])) and torch.allclose(ffn[0], torch.tensor([0, 0.6, 0, 0]))


@pytest.mark.parametrize("family,fold", [("bert", False), ("bert", True), ("llama", False)])
def test_after_the_fade_surgery_changes_nothing(tmp_path, family, fold):
    model = (save_tiny_bert if family == "bert" else save_tiny_llama)(tmp_path / "model")
    ctx = _ctx(tmp_path, model, gradual=0.25, fold_masks=fold, merge_removed=True)
    run = light_peft._LightRun(ctx, checkpoints=False)
    est = light_peft.estimate(run)
    assert est.fade_from is not None and run.window.fade == 4  # 25% of 16 steps
    lora_before = {n: p.detach().clone() for n, p in run.model.named_parameters() if "lora_" in n}
    light_peft.fade(run, est)
    assert run.state.step == run.window.cut == 8
    heads, ffn = light_peft.fade_targets(est.plan, est.fade_from, fold)
    assert all(torch.equal(m.detach().cpu(), t) for m, t in zip(run.masks.heads, heads))
    assert all(torch.equal(m.detach().cpu(), t) for m, t in zip(run.masks.ffn, ffn))
    assert any(not torch.equal(p, lora_before[n]) for n, p in run.model.named_parameters() if "lora_" in n)
    assert any(len(k) < est.plan.num_units for k in est.plan.kept_heads)  # the fade removed something
    batch = {k: v for k, v in next(iter(ctx.dev_loader)).items() if k != "labels"}
    run.model.eval()
    with torch.no_grad():
        masked = run.model(**batch).logits
    light_peft.prune_phase(run, est)
    run.model.eval()
    with torch.no_grad():
        pruned = run.model(**batch).logits
    assert torch.allclose(masked, pruned, atol=1e-5), (masked - pruned).abs().max()


def test_gradual_run_reports_fade_steps_and_times_only_the_pruned_steps(tmp_path):
    ctx = _ctx(tmp_path, save_tiny_bert(tmp_path / "model"), gradual=0.25)
    res = light_peft.train_light(ctx, checkpoints=False)
    m = res.metrics
    assert (m["estimation_steps"], m["fade_steps"], m["total_steps"]) == (4, 4, 16)
    assert m["fade_seconds"] > 0 and len(m["loss_curve"]) > 0


def test_trainer_callback_refuses_gradual():
    from prunetune import LightPeftCallback

    with pytest.raises(PrunetuneError, match="prune.gradual"):
        LightPeftCallback(prune__gradual=0.1)
