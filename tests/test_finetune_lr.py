"""prune.finetune_lr_scale: after surgery the pruned model trains at train.lr x the scale on the same schedule
(own loop and LightPeftCallback alike), the estimation is untouched, and a run killed after surgery resumes to
the same curves."""
from __future__ import annotations

import copy

import pytest
from test_distill import _ctx
from test_pipeline import save_tiny_bert, write_sst2
from test_resume import _args, _killed_and_resumed, _summary
from test_trainer_callback import BS, CFG, ROWS, rows, tiny_model, trainer_args

import prunetune
from prunetune import PrunetuneError
from prunetune.cli import main
from prunetune.config import from_dict
from prunetune.methods import light_peft


def test_fine_tune_lr_is_scaled_after_surgery_and_not_before(tmp_path):
    runs = {s: light_peft.train_light(_ctx(tmp_path / str(s), finetune_lr_scale=s), checkpoints=False)
            for s in (1.0, 2.5)}
    n_est = runs[1.0].metrics["estimation_steps"]
    lr = {s: [h["lr"] for h in r.metrics["loss_curve"]] for s, r in runs.items()}
    loss = {s: [h["task_loss"] for h in r.metrics["loss_curve"]] for s, r in runs.items()}
    assert lr[1.0][:n_est] == lr[2.5][:n_est] and loss[1.0][:n_est + 1] == loss[2.5][:n_est + 1]
    after = [(a, b) for a, b in zip(lr[1.0][n_est:], lr[2.5][n_est:]) if a > 0]
    assert after and all(b == pytest.approx(2.5 * a, rel=1e-12) for a, b in after)
    assert loss[1.0][n_est + 1:] != loss[2.5][n_est + 1:]  # larger steps: a different fine-tune
    assert runs[1.0].plan.to_json() == runs[2.5].plan.to_json()  # the plan comes from the estimation alone


def test_killed_after_surgery_resumes_at_the_scaled_lr(tmp_path):
    model = save_tiny_bert(tmp_path / "model")
    data = write_sst2(tmp_path / "data", n_train=64, n_dev=16)
    extra = ["--set", "prune.finetune_lr_scale=3"]
    assert main(_args(model, data, tmp_path / "ref", *extra)) == 0
    reference = _summary(tmp_path / "ref")
    assert main(_args(model, data, tmp_path / "plain")) == 0
    assert _summary(tmp_path / "plain")[3] != reference[3]
    assert _killed_and_resumed(model, data, tmp_path / "killed", extra, "fine-tune:14") == reference


def test_trainer_callback_scales_the_schedule_after_surgery(tmp_path):
    import datasets
    from helpers import make_tokenizer
    from test_trainer_callback import NEG, POS
    from transformers import Trainer

    from prunetune.data import make_collate

    tok = make_tokenizer(POS + NEG)
    base = prunetune.with_peft(tiny_model(tok), CFG)
    logged = {}
    for scale in (1.0, 2.0):
        cfg = copy.deepcopy(CFG)
        cfg["prune"]["finetune_lr_scale"] = scale
        cb = prunetune.LightPeftCallback(cfg)
        trainer = Trainer(model=copy.deepcopy(base), args=trainer_args(tmp_path / str(scale)),
                          data_collator=make_collate(tok), train_dataset=datasets.Dataset.from_list(rows(tok)),
                          callbacks=[cb], processing_class=tok)
        trainer.train()
        logged[scale] = {h["step"]: h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h}
    cut = cb.window.steps
    assert len(logged[1.0]) == ROWS // BS * 3
    for step, lr in logged[1.0].items():
        if step <= cut:  # the Trainer logs after the step: step `cut` is the last estimation step
            assert logged[2.0][step] == pytest.approx(lr, rel=1e-12)
        elif lr > 0:
            assert logged[2.0][step] == pytest.approx(2.0 * lr, rel=1e-12), step


def test_finetune_lr_scale_must_be_positive():
    with pytest.raises(PrunetuneError, match="finetune_lr_scale"):
        from_dict({"prune": {"finetune_lr_scale": 0}})
