"""Path importance (estimate.module_score=path): the loss decrease a PEFT module's own updates bought."""
from __future__ import annotations

import pytest
import torch
from models import batch, tiny_lora

from prunetune.scores import ImportanceTracker
from prunetune.units.lora import lora_layers

LABELS = torch.tensor([0, 1, 1])


def _zero_b(hf):
    with torch.no_grad():
        for layer in lora_layers(hf).values():
            layer.lora_B["default"].weight.zero_()  # as peft initialises it: the module starts as a no-op


def _train(pm, hf, tracker, steps: int, lr: float, only: str | None = None):
    """Full-batch SGD on the LoRA factors (of one module when `only`), recording path importance."""
    params = [p for n, p in pm.named_parameters() if "lora_" in n and (only is None or f"{only}.lora_" in n)]
    for p in pm.parameters():
        p.requires_grad_(any(p is q for q in params))
    opt = torch.optim.SGD(params, lr=lr)
    b = dict(batch(seed=1), labels=LABELS)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        pm(**b).loss.backward()
        tracker.accumulate_path()
        opt.step()
    return b


def test_path_is_the_sum_of_minus_g_dot_update():
    """Hand check: sum over steps of -g_t . (theta_{t+1} - theta_t), per module and per rank."""
    pm, hf, arch, names = tiny_lora("bert", seed=3)
    tracker = ImportanceTracker(hf)
    layers = lora_layers(hf)
    expected = {n: torch.zeros(4, dtype=torch.float64) for n in names}
    params = [p for n, p in pm.named_parameters() if "lora_" in n]
    opt = torch.optim.Adam(params, lr=1e-2)
    for seed in (1, 2, 3):
        opt.zero_grad(set_to_none=True)
        pm(**batch(seed=seed), labels=LABELS).loss.backward()
        before = {n: (layers[n].lora_A["default"].weight.detach().clone(), layers[n].lora_A["default"].weight.grad.clone(),
                      layers[n].lora_B["default"].weight.detach().clone(), layers[n].lora_B["default"].weight.grad.clone())
                  for n in names}
        tracker.accumulate_path()
        opt.step()
        for n in names:
            a0, ga, b0, gb = before[n]
            a1, b1 = layers[n].lora_A["default"].weight.detach(), layers[n].lora_B["default"].weight.detach()
            expected[n] += (-(ga * (a1 - a0)).sum(1) - (gb * (b1 - b0)).sum(0)).double()
    modules, ranks = tracker.path_scores()
    assert tracker.path_steps == 3
    for n in names:
        torch.testing.assert_close(ranks[n].double(), expected[n].clamp_min(0), atol=1e-9, rtol=1e-5)
        assert modules[n] == pytest.approx(max(0.0, float(expected[n].sum())), rel=1e-5, abs=1e-9)
    assert any(v > 0 for v in modules.values())


def test_path_measures_what_removal_gives_back_where_point_taylor_sees_nothing():
    """One module trained from B = 0 with small full-batch SGD steps: its path score equals the loss its removal
    gives back (to first order), while the point Taylor term B*dL/dB was exactly 0 at the start."""
    pm, hf, arch, names = tiny_lora("bert", seed=5)
    _zero_b(hf)
    name = names[-1]
    tracker = ImportanceTracker(hf)
    layer = lora_layers(hf)[name]
    b = dict(batch(seed=1), labels=LABELS)
    pm.zero_grad(set_to_none=True)
    start = pm(**b).loss
    start.backward()
    assert float((layer.lora_B["default"].weight * layer.lora_B["default"].weight.grad).sum().detach()) == 0.0
    b = _train(pm, hf, tracker, steps=40, lr=2.0, only=name)
    with torch.no_grad():
        now = float(pm(**b).loss)
        saved = layer.lora_B["default"].weight.clone()
        layer.lora_B["default"].weight.zero_()
        removed = float(pm(**b).loss)
        layer.lora_B["default"].weight.copy_(saved)
    modules, ranks = tracker.path_scores()
    gained = removed - now
    assert gained > 1e-5  # the module has learned something (tiny random model: small gradients)
    assert modules[name] == pytest.approx(gained, rel=0.05)
    assert float(ranks[name].sum()) == pytest.approx(modules[name], rel=1e-4)
    assert all(modules[n] == 0.0 for n in names if n != name)  # no update, nothing bought


def test_skipped_step_adds_nothing_and_state_round_trips():
    """A step the scaler skips is not attributed; a checkpoint taken between steps resumes the sums exactly."""
    pm, hf, arch, names = tiny_lora("bert", seed=7)
    params = [p for n, p in pm.named_parameters() if "lora_" in n]
    opt = torch.optim.SGD(params, lr=0.05)

    def step(tracker, seed, finite=True):
        opt.zero_grad(set_to_none=True)
        pm(**batch(seed=seed), labels=LABELS).loss.backward()
        tracker.accumulate_path(finite=finite)
        if finite:
            opt.step()

    snapshot = {k: v.detach().clone() for k, v in pm.state_dict().items()}
    a = ImportanceTracker(hf)
    for seed, finite in ((1, True), (2, False), (3, True), (4, True)):
        step(a, seed, finite)
    ref_modules, ref_ranks = a.path_scores()
    assert a.path_steps == 3

    pm.load_state_dict(snapshot)
    opt = torch.optim.SGD(params, lr=0.05)
    b = ImportanceTracker(hf)
    for seed, finite in ((1, True), (2, False), (3, True)):
        step(b, seed, finite)
    c = ImportanceTracker(hf)
    c.load_state_dict(b.state_dict())  # the step in flight (params + grads) travels with the checkpoint
    step(c, 4)
    modules, ranks = c.path_scores()
    assert modules == pytest.approx(ref_modules, rel=1e-6, abs=1e-12)
    for n in names:
        torch.testing.assert_close(ranks[n], ref_ranks[n])
