"""Distillation after surgery (prune.distill): the loss against hand-computed values, the teacher is the trained
pre-surgery model and stays frozen, the run differs from one without it, and a run killed after surgery resumes
to the same curves (the teacher comes back from the checkpoint, not from the untrained rebuilt model)."""
from __future__ import annotations

import math

import pytest
import torch
from test_pipeline import save_tiny_bert, write_sst2
from test_resume import _args, _killed_and_resumed, _summary

from prunetune import PrunetuneError
from prunetune.cli import main
from prunetune.config import from_dict
from prunetune.methods import light_peft
from prunetune.methods.common import prepare
from prunetune.train.distill import Distiller, kd_loss


def test_kd_loss_against_hand_computed_values():
    s, t = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.0, 2.0, 0.0]])
    T = 2.0
    ps, pt = torch.softmax(s / T, -1), torch.softmax(t / T, -1)
    expected = float((pt * (pt.log() - ps.log())).sum()) * T * T
    assert math.isclose(float(kd_loss(s, t, temperature=T)), expected, rel_tol=1e-6)
    assert float(kd_loss(t, t, temperature=T)) == pytest.approx(0.0, abs=1e-7)
    # regression head (one output): squared error of the two predictions
    assert float(kd_loss(torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [3.0]]), temperature=T)) == 0.5


def test_causal_kd_loss_reads_only_the_scored_positions():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, -100, -100]])
    loss = kd_loss(s, t, temperature=1.0, labels=labels, causal=True)
    keep = [(0, 1), (0, 2), (1, 0), (1, 1)]  # logits at i predict label i + 1
    expected = sum(float(torch.nn.functional.kl_div(torch.log_softmax(s[b, i], -1), torch.log_softmax(t[b, i], -1),
                                                    log_target=True, reduction="sum")) for b, i in keep) / len(keep)
    assert math.isclose(float(loss), expected, rel_tol=1e-5)
    changed = s.clone()
    changed[0, 0] += 5.0  # predicts a prompt token: not scored
    changed[1, 4] -= 3.0  # the last position predicts nothing
    assert float(kd_loss(changed, t, temperature=1.0, labels=labels, causal=True)) == pytest.approx(float(loss))


def _ctx(tmp_path, **prune):
    model = save_tiny_bert(tmp_path / "model")
    data = write_sst2(tmp_path / "data", n_train=64, n_dev=16)
    return prepare(from_dict({
        "model": {"name_or_path": str(model)}, "data": {"task": "sst2", "data_dir": str(data)},
        "estimate": {"steps": 4, "mask_lr": 0.05}, "prune": {"heads": 0.5, "ffn": 0.5, **prune},
        "train": {"epochs": 2, "batch_size": 8, "seed": 3, "eval_each_epoch": False, "log_every": 1},
        "output_dir": str(tmp_path / "out")}))


def test_teacher_is_the_trained_pre_surgery_model_and_stays_frozen(tmp_path, monkeypatch):
    seen = {}
    real = light_peft.prune

    def spy(**kw):  # the model surgery receives: what the teacher must compute
        seen["before"] = {n: p.detach().clone() for n, p in kw["model"].named_parameters()}
        return real(**kw)

    monkeypatch.setattr(light_peft, "prune", spy)
    ctx = _ctx(tmp_path, distill=0.5)
    run = light_peft._LightRun(ctx, checkpoints=False)
    est = light_peft.estimate(run)
    light_peft.prune_phase(run, est)
    teacher = dict(run.distiller.teacher.named_parameters())
    assert teacher.keys() == seen["before"].keys()
    assert all(torch.equal(teacher[n], v) for n, v in seen["before"].items())
    lora_b = [v for n, v in seen["before"].items() if "lora_B" in n]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # it trained during estimation (B starts at 0)
    light_peft.finetune(run, est)
    assert all(torch.equal(p, seen["before"][n]) for n, p in run.distiller.teacher.named_parameters())
    assert not any(p.requires_grad for p in run.distiller.teacher.parameters())


def test_distillation_changes_the_fine_tune_and_not_the_estimation(tmp_path):
    curves, peak = {}, {}
    for w in (0.0, 0.5):
        res = light_peft.train_light(_ctx(tmp_path / str(w), distill=w), checkpoints=False)
        curves[w] = [h["task_loss"] for h in res.metrics["loss_curve"]]
        peak[w] = res.metrics["peak_mb"]
    n_est = res.metrics["estimation_steps"]
    assert curves[0.0][:n_est + 1] == curves[0.5][:n_est + 1]  # the first fine-tune step's task loss too
    assert curves[0.0][n_est + 1:] != curves[0.5][n_est + 1:]
    assert peak[0.5] > peak[0.0]  # the teacher's weights are counted in the fine-tune phase's memory


def test_killed_after_surgery_resumes_with_the_trained_teacher(tmp_path):
    model = save_tiny_bert(tmp_path / "model")
    data = write_sst2(tmp_path / "data", n_train=64, n_dev=16)
    extra = ["--set", "prune.distill=0.7", "--set", "prune.distill_temperature=3"]
    assert main(_args(model, data, tmp_path / "ref", *extra)) == 0
    reference = _summary(tmp_path / "ref")
    assert main(_args(model, data, tmp_path / "plain")) == 0
    assert _summary(tmp_path / "plain")[3] != reference[3]  # distillation changed the Light-PEFT loss curve
    assert _killed_and_resumed(model, data, tmp_path / "killed", extra, "fine-tune:14") == reference


def test_distill_needs_lora_and_is_refused_by_the_trainer_callback():
    with pytest.raises(PrunetuneError, match="prune.distill needs peft.kind=lora"):
        from_dict({"peft": {"kind": "adapter"}, "prune": {"distill": 0.5}})
    with pytest.raises(PrunetuneError, match="prune.distill"):
        from_dict({"prune": {"distill": 1.5}})
    from prunetune.integrations.trainer import LightPeftCallback

    with pytest.raises(PrunetuneError, match="prune.distill"):
        LightPeftCallback(prune__distill=0.5)


def test_distiller_loss_mixes_task_and_distillation_terms():
    class Out:
        def __init__(self, logits, loss):
            self.logits, self.loss = logits, loss

    teacher = torch.nn.Linear(2, 2)

    class Wrap(torch.nn.Module):  # model(**batch).logits, as HF models return
        def __init__(self):
            super().__init__()
            self.m = teacher

        def forward(self, x):
            return Out(self.m(x), None)

    d = Distiller(Wrap(), weight=0.25, temperature=1.0, causal=False)
    x = torch.tensor([[1.0, -1.0]])
    student = torch.tensor([[0.3, 0.1]])
    got = d({"x": x, "labels": torch.tensor([0])}, Out(student, torch.tensor(2.0)))
    expected = 0.75 * 2.0 + 0.25 * float(kd_loss(student, teacher(x).detach(), temperature=1.0))
    assert float(got) == pytest.approx(expected)
