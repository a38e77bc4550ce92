"""Importance scores are never poisoned: dev evaluation inside the estimation window, fp16 steps the GradScaler
skips, and a resume on another device than the checkpoint's leave the window's statistics exactly those of
the training steps that were applied; non-finite scores never become a plan."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from models import batch, tiny_lora
from test_pipeline import bert_dir, light, save_tiny_bert, sst2_dir, write_sst2  # noqa: F401 (fixtures)

from prunetune.errors import PrunetuneError
from prunetune.plan import Scores, make_plan
from prunetune.scores import ImportanceTracker, StructureMasks
from prunetune.train import TrainState

LABELS = torch.tensor([0, 1, 1])
SCORE_KEYS = ("module_norm_ratio", "module_taylor", "rank_importance", "head_taylor", "head_masks", "ffn_mask_summary")



def _plan(out) -> dict:
    return json.loads((out / "plan.json").read_text())


def _flat(value) -> list[float]:
    if isinstance(value, dict):
        return [x for k in sorted(value) for x in _flat(value[k])]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flat(v)]
    return [float(value)]


# ------------------------------------------------------------------------------- dev evaluation in window
@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_dev_evaluation_inside_the_window_leaves_scores_unchanged(bert_dir, sst2_dir, tmp_path, kind):
    # 64 rows / batch 8 = 8 steps an epoch; estimation = 12 steps, window = steps 6..11, so the epoch-1 dev
    # evaluation (after step 8) runs while the importance hooks are attached
    plans = {}
    for ev in (True, False):
        res = light(bert_dir, {"data_dir": str(sst2_dir)}, tmp_path / f"eval-{ev}",
                    train={"max_steps": 14, "eval_each_epoch": ev}, estimate={"steps": 12},
                    peft={"kind": kind, "adapter_size": 4})
        assert res["light_peft"]["estimation_steps"] == 12
        plans[ev] = _plan(tmp_path / f"eval-{ev}")
    assert plans[True]["meta"]["window_start"] == 6
    assert len(json.loads((tmp_path / "eval-True" / "results.json").read_text())["light_peft"]["evals"]) >= 2
    for key in SCORE_KEYS:
        assert plans[True]["meta"][key] == plans[False]["meta"][key], key
    for key in ("kept_heads", "kept_neurons", "peft_ranks"):
        assert plans[True][key] == plans[False][key]


def test_tracker_ignores_evaluation_forwards():
    pm, hf, _arch, names = tiny_lora("bert", seed=3)
    tracker = ImportanceTracker(hf).start()
    b = batch()
    tracker.token_mask = b["attention_mask"]
    pm.train()
    pm(**b, labels=LABELS).loss.backward()  # a training forward: recorded
    pm.eval()
    with torch.no_grad():
        pm(**batch(seed=4))  # how evaluate() runs the model: not recorded
    tracker.after_backward()
    tracker.stop()
    assert tracker.module_n == {n: 1 for n in names}
    assert all(len(steps) == 1 for steps in tracker.module_sum.values())


# ----------------------------------------------------------------------------------- skipped fp16 steps
def test_grads_finite_decides_on_every_gradient():
    from prunetune.train.loop import grads_finite

    ps = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(1))]
    assert grads_finite(ps)  # no gradients at all
    ps[0].grad = torch.tensor([1.0, -2.0, 3e38])
    ps[1].grad = torch.zeros(2)
    assert grads_finite(ps)  # ps[2] has none: ignored
    for bad in (float("nan"), float("inf"), -float("inf")):
        ps[1].grad = torch.tensor([0.0, bad])
        assert not grads_finite(ps)
    half = torch.nn.Parameter(torch.ones(2, dtype=torch.float16))
    half.grad = torch.tensor([65504.0, 65504.0], dtype=torch.float16) * 2  # fp16 overflow: inf
    ps[1].grad = torch.zeros(2)
    assert grads_finite(ps) and not grads_finite(ps + [half])


def _window_step(pm, tracker, b, seed: int, poison: bool = False, finite=None):
    """One training step through the tracker (no optimizer: every step sees the same weights; seeded
    dropout: the same step draws the same masks in every run)."""
    torch.manual_seed(seed)
    pm.zero_grad(set_to_none=True)
    tracker.token_mask = b["attention_mask"]
    pm(**b, labels=LABELS[: b["input_ids"].shape[0]]).loss.backward()
    if poison:  # an fp16 overflow: the scaler finds inf/NaN in the unscaled gradients
        for p in pm.parameters():
            if p.grad is not None:
                p.grad[..., 0] = float("nan")
    if finite is None:
        tracker.after_backward()
    else:
        tracker.after_backward(finite=finite)


@pytest.mark.parametrize("told", [True, False])
def test_skipped_step_contributes_nothing(told):
    """A step the scaler skips adds nothing (numerator nor step count), whether the loop says so (told) or
    the tracker only sees the non-finite gradients."""
    results = []
    for with_bad in (True, False):
        pm, hf, _arch, names = tiny_lora("opt", seed=5)
        pm.train()
        groups = {n: [n] for n in names[:3]}
        tracker = ImportanceTracker(hf, groups=groups).start()
        _window_step(pm, tracker, batch(seed=1), seed=1)
        if with_bad:
            _window_step(pm, tracker, batch(seed=2, bsz=2), seed=2, poison=True, finite=False if told else None)
        _window_step(pm, tracker, batch(seed=3), seed=3)
        tracker.stop()
        modules, ranks = tracker.finalize()
        results.append((tracker.rank_n, dict(tracker.module_n), modules, ranks, tracker.module_taylor(),
                        tracker.unit_stats()))
    (n_bad, mn_bad, mod_bad, rk_bad, mt_bad, us_bad), (n_ok, mn_ok, mod_ok, rk_ok, mt_ok, us_ok) = results
    assert n_bad == n_ok == 2 and mn_bad == mn_ok
    assert mod_bad == mod_ok and mt_bad == mt_ok and us_bad == us_ok
    assert rk_bad.keys() == rk_ok.keys()
    for n in rk_ok:
        torch.testing.assert_close(rk_bad[n], rk_ok[n], atol=0, rtol=0)
    assert all(math.isfinite(x) for x in _flat(mod_bad) + _flat(mt_bad) + _flat(us_bad))


def test_skipped_step_leaves_mask_taylor_untouched():
    pm, hf, arch, _names = tiny_lora("bert", seed=7)
    masks = StructureMasks(arch).attach(hf)
    pm.train()
    for p in masks.parameters():
        p.grad = torch.full_like(p, 0.5)
    masks.accumulate_taylor(0.0, 0.0)
    before = [t.clone() for t in masks.taylor_values()[0]], masks.taylor_n
    for p in masks.parameters():
        p.grad = torch.full_like(p, float("inf"))
    masks.accumulate_taylor(0.0, 0.0, finite=False)
    masks.accumulate_taylor(0.0, 0.0)  # not told, but the gradients say it: dropped too
    assert masks.taylor_n == before[1] == 1
    for a, b in zip(masks.taylor_values()[0], before[0]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


class OverflowAt(torch.amp.GradScaler):
    """A real GradScaler (CPU) whose scaled loss overflows on the given steps, the way fp16 does: the scaler
    then finds inf/NaN gradients in unscale_, skips optimizer.step and backs the scale off."""

    def __init__(self, steps):
        super().__init__("cpu", init_scale=1.0, growth_interval=10**6)
        self.overflow, self.calls, self.skipped = set(steps), 0, 0

    def scale(self, outputs):
        out = super().scale(outputs)
        hit = self.calls in self.overflow
        self.calls += 1
        return out * float("inf") if hit else out

    def step(self, optimizer, *args, **kwargs):
        found = sum(float(v) for v in self._found_inf_per_device(optimizer).values())
        self.skipped += bool(found)
        return super().step(optimizer, *args, **kwargs)


def test_fp16_overflow_in_the_window_is_not_scored(bert_dir, sst2_dir, tmp_path, monkeypatch):
    scalers = []
    init = TrainState.__init__

    def with_overflow(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.scaler = OverflowAt({8})  # estimation 12 steps, window 6..11
        scalers.append(self.scaler)

    monkeypatch.setattr(TrainState, "__init__", with_overflow)
    light(bert_dir, {"data_dir": str(sst2_dir)}, tmp_path / "run", train={"max_steps": 14, "eval_each_epoch": False},
          estimate={"steps": 12})
    assert scalers and scalers[-1].skipped == 1  # the step really was skipped by the scaler
    meta = _plan(tmp_path / "run")["meta"]
    for key in SCORE_KEYS:
        assert all(math.isfinite(x) for x in _flat(meta[key])), key
    assert meta["window_skipped_steps"] == 1


@pytest.mark.parametrize("where", ["module", "rank", "heads", "ffn"])
def test_plan_refuses_non_finite_scores(where):
    pm, hf, arch, names = tiny_lora("bert", seed=9)
    heads = [torch.rand(arch.num_units) for _ in arch.layers]
    ffn = [torch.rand(arch.intermediate_size) for _ in arch.layers]
    modules = {n: float(i) for i, n in enumerate(names)}
    ranks = {n: torch.rand(4) for n in names}
    make_plan(arch=arch, scores=Scores(heads, ffn, modules, ranks), heads=0.3, ffn=0.3, modules=0.5, ranks=0.5)  # finite: fine
    if where == "module":
        modules[names[2]] = float("nan")
    elif where == "rank":
        ranks[names[1]][2] = float("inf")
    elif where == "heads":
        heads[1][0] = float("nan")
    else:
        ffn[0][5] = -float("inf")
    with pytest.raises(PrunetuneError, match="not finite"):
        make_plan(arch=arch, scores=Scores(heads, ffn, modules, ranks), heads=0.3, ffn=0.3, modules=0.5, ranks=0.5)


# ----------------------------------------------------------------------------------- resume on a device
def _tracker_step(pm, tracker, masks, b, seed: int = 0):
    torch.manual_seed(seed)
    pm.zero_grad(set_to_none=True)
    masks.zero_grad(set_to_none=True)
    tracker.token_mask = b["attention_mask"]
    pm(**b, labels=LABELS.to(b["input_ids"].device)).loss.backward()
    tracker.after_backward()
    masks.accumulate_taylor(1e-4, 1e-4)


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def test_restored_score_state_follows_the_live_model_device():
    """Checkpoints load on the CPU; the restored sums must live where the model now is (meta stands in for
    a GPU here: a CPU sum would fail to combine with it the same way)."""
    pm, hf, arch, _names = tiny_lora("bert", seed=11)
    masks = StructureMasks(arch).attach(hf)
    pm.train()
    tracker = ImportanceTracker(hf).start()
    _tracker_step(pm, tracker, masks, batch())
    tracker.stop()
    t_state, m_state = tracker.state_dict(), masks.score_state()
    assert all(t.device.type == "cpu" for t in _tensors(t_state))
    pm.to("meta")
    masks.to("meta")
    restored = ImportanceTracker(hf)
    restored.load_state_dict(t_state)
    masks.load_score_state(m_state)
    assert restored.rank_n == tracker.rank_n == 1
    moved = [t for acc in (restored.module_sum, restored.rank_sum, restored.module_taylor_sum, masks.taylor_sum)
             for t in _tensors(acc)]
    assert moved and all(t.device.type == "meta" for t in moved)


def test_restored_tracker_state_accepts_string_step_keys():
    """A JSON-backed checkpoint turns the per-step keys into strings: they come back as step numbers."""
    pm, hf, _arch, _names = tiny_lora("opt", seed=12)
    pm.train()
    tracker = ImportanceTracker(hf).start()
    for s in range(2):
        _window_step(pm, tracker, batch(seed=s), seed=s)
    tracker.stop()
    state = tracker.state_dict()
    state["module_sum"] = {n: {str(k): v for k, v in steps.items()} for n, steps in state["module_sum"].items()}
    restored = ImportanceTracker(hf)
    restored.load_state_dict(state)
    assert all(set(steps) == {0, 1} for steps in restored.module_sum.values())
    assert restored.finalize()[0] == tracker.finalize()[0]


def _interrupted_window(tmp_path, dev: torch.device) -> None:
    """Sums saved through a checkpoint (which loads on the CPU) keep accumulating on `dev`, and end where an
    uninterrupted window ends."""
    from prunetune.train.checkpoint import load_checkpoint, save_checkpoint

    batches = [{k: v.to(dev) for k, v in batch(seed=s).items()} for s in range(3)]
    finals = []
    for interrupted in (False, True):
        pm, hf, arch, _names = tiny_lora("bert", seed=13)
        pm.to(dev).train()
        masks = StructureMasks(arch).to(dev).attach(hf)
        tracker = ImportanceTracker(hf).start()
        for i, b in enumerate(batches):
            if interrupted and i == 2:
                save_checkpoint(tmp_path / "ck", {"phase": "estimate", "tracker": tracker.state_dict(),
                                                  "mask_scores": masks.score_state()}, {"x": 1})
                ck = load_checkpoint(tmp_path / "ck", {"x": 1})
                tracker.stop()
                tracker = ImportanceTracker(hf).start()
                tracker.load_state_dict(ck["tracker"])
                masks.load_score_state(ck["mask_scores"])
            _tracker_step(pm, tracker, masks, b, seed=i)
        tracker.stop()
        assert tracker.rank_n == 3
        modules, ranks = tracker.finalize()
        finals.append((modules, {n: r.tolist() for n, r in ranks.items()}, tracker.module_taylor(),
                       [t.tolist() for t in masks.taylor_values()[0]]))
    assert finals[0][0].keys() == finals[1][0].keys()
    for a, b in zip(finals[0], finals[1]):
        assert _flat(a) == pytest.approx(_flat(b), rel=1e-5, abs=1e-7)


def test_window_interrupted_by_a_checkpoint_ends_as_uninterrupted(tmp_path):
    _interrupted_window(tmp_path, torch.device("cpu"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_resume_on_gpu_inside_the_window(tmp_path):
    """The real thing: a CPU-loaded checkpoint resumed by a model on the GPU."""
    _interrupted_window(tmp_path, torch.device("cuda"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_light_run_killed_inside_the_window_resumes_on_gpu(tmp_path):
    """End to end on the GPU: SIGKILL at an estimation checkpoint inside the window, resume, same plan."""
    import signal

    from test_resume import _cli

    model = save_tiny_bert(tmp_path / "model")
    data = write_sst2(tmp_path / "data", n_train=64, n_dev=16)

    def args(out, *extra):  # estimation 6 steps, window 3..5, checkpoints every 2 steps: step 4 is inside
        return ["light", "--model", str(model), "--data-dir", str(data), "--output-dir", str(out), "--epochs", "2",
                "--batch-size", "8", "--set", "train.save_every=2", "--set", "estimate.steps=6", *extra]

    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}  # the CLI runs this checkout
    ref = _cli(args(tmp_path / "ref"), env)
    assert ref.returncode == 0, ref.stderr[-2000:]
    killed = _cli(args(tmp_path / "run"), dict(env, PRUNETUNE_DEBUG_KILL_AT="estimate:4"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = _cli(args(tmp_path / "run", "--resume"), env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _plan(tmp_path / "ref"), _plan(tmp_path / "run")
    assert a["meta"]["window_start"] == 3
    for key in ("kept_heads", "kept_neurons", "peft_ranks"):
        assert a[key] == b[key], key
    for key in SCORE_KEYS:
        assert _flat(a["meta"][key]) == pytest.approx(_flat(b["meta"][key]), rel=1e-4, abs=1e-6), key


def test_fp16_loss_scale_survives_a_checkpoint(tmp_path):
    """Resuming fp16 must continue with the scale the run had backed off to: a fresh scale would overflow (and skip)
    other steps than the uninterrupted run."""
    from prunetune.config import TrainConfig
    from prunetune.train.checkpoint import load_checkpoint, save_checkpoint

    pm, hf, arch, names = tiny_lora("bert", seed=9)
    data = [dict(batch(seed=s), labels=LABELS) for s in range(4)]

    def fresh():
        st = TrainState(pm, hf, {}, TrainConfig(log_every=0, save_every=0), data, 8, torch.device("cpu"))
        st.scaler = OverflowAt({1})  # step 1 overflows: the scale backs off from 1.0 to 0.5
        return st

    state = fresh()
    state.run(3)
    assert state.scaler.skipped == 1 and state.scaler.get_scale() == 0.5
    save_checkpoint(tmp_path / "ck", state.state_dict(), {"x": 1})
    again = fresh()
    again.load_state_dict(load_checkpoint(tmp_path / "ck", {"x": 1}))
    assert again.scaler.get_scale() == 0.5
    assert again.scaler.state_dict() == state.scaler.state_dict()
