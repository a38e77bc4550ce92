"""A run SIGKILLed mid-estimation or mid-fine-tuning resumes with --resume and ends with the same plan and
metrics as an uninterrupted run; corrupt or foreign checkpoints are refused."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from test_pipeline import save_tiny_bert, write_sst2

from prunetune.cli import main


def _args(model, data, out, *extra):
    return ["light", "--model", str(model), "--data-dir", str(data), "--output-dir", str(out), "--epochs", "3",
            "--batch-size", "8", "--set", "train.save_every=2", "--set", "estimate.steps=6",
            "--set", "estimate.mask_lr=0.05", "--set", "train.log_every=1", "--baseline", *extra]


def _cli(args, env_extra=None):
    env = dict(os.environ, TQDM_DISABLE="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "prunetune.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def _summary(out):
    plan = json.loads((out / "plan.json").read_text())
    res = json.loads((out / "results.json").read_text())
    # plan, dev metrics per epoch, and the training-loss curves (bit-exact: same data order and dropout masks)
    return ({k: plan[k] for k in ("kept_heads", "kept_neurons", "peft_ranks")},
            [e["accuracy"] for e in res["light_peft"]["evals"]], [e["accuracy"] for e in res["vanilla"]["evals"]],
            [h["loss"] for h in res["light_peft"]["loss_curve"]], [h["loss"] for h in res["vanilla"]["loss_curve"]])


def _killed_and_resumed(model, data, out, extra: list[str], kill_at: str):
    """A CLI run SIGKILLed right after the checkpoint at `kill_at`, then resumed: its summary."""
    proc = _cli(_args(model, data, out, *extra), {"PRUNETUNE_DEBUG_KILL_AT": kill_at})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    proc = _cli(_args(model, data, out, *extra, "--resume"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return _summary(out)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = save_tiny_bert(root / "model")
    data = write_sst2(root / "data", n_train=64, n_dev=16)
    assert main(_args(model, data, root / "ref")) == 0
    return root, model, data, _summary(root / "ref")


@pytest.mark.parametrize("kill_at", ["vanilla:4", "estimate:4", "fine-tune:14"])
def test_sigkill_then_resume_matches_uninterrupted(setup, kill_at):
    root, model, data, reference = setup
    out = root / f"killed-{kill_at.replace(':', '-')}"
    proc = _cli(_args(model, data, out), {"PRUNETUNE_DEBUG_KILL_AT": kill_at})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / "results.json").exists()
    proc = _cli(_args(model, data, out, "--resume"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _summary(out) == reference


def test_corrupt_and_foreign_checkpoints_are_refused(setup, capsys):
    root, model, data, _ref = setup
    out = root / "ref"
    # another configuration: refused with one clear line
    assert main(_args(model, data, out, "--resume", "--set", "prune.heads=0.5")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different configuration" in err[0]
    state = out / "checkpoints" / "light" / "tensors.safetensors"
    data_bytes = bytearray(state.read_bytes())
    data_bytes[len(data_bytes) // 2] ^= 0xFF
    state.write_bytes(bytes(data_bytes))
    assert main(_args(model, data, out, "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checksum" in err[0]


@pytest.mark.parametrize("kill_at", ["estimate:4", "fine-tune:14"])
def test_path_scores_and_merge_resume_exactly(setup, kill_at):
    """module_score=path keeps the step in flight (its parameters and gradients) in the checkpoint: a run killed
    mid-estimation resumes to the same plan and curves. merge_removed's surgery is part of the same run; killed
    after it, the resumed run gets the merged weights from the checkpoint (its own surgery merges untrained LoRA)."""
    root, model, data, _ = setup
    extra = ["--set", "estimate.module_score=path", "--set", "prune.merge_removed=true"]
    if not (root / "ref-path" / "results.json").exists():
        assert main(_args(model, data, root / "ref-path", *extra)) == 0
    reference = _summary(root / "ref-path")
    plan = json.loads((root / "ref-path" / "plan.json").read_text())
    assert any(v > 0 for v in plan["meta"]["module_path"].values())
    assert _killed_and_resumed(model, data, root / f"killed-path-{kill_at[:3]}", extra, kill_at) == reference


def test_seek_continues_on_the_batches_and_lr_of_a_state_that_trained_there():
    """TrainState.seek(k): the batches and learning rate a state has after k trained steps, without training
    them (light_speed.py times a fresh vanilla model against the pruned one on the same batches)."""
    import torch
    from test_logging import Tiny

    from prunetune.config import TrainConfig
    from prunetune.train import TrainState
    from prunetune.train.loop import make_loader

    rows = [{"x": torch.tensor([float(i), 0.0]), "labels": torch.tensor(float(i))} for i in range(10)]  # x[0]: row id
    collate = lambda items: {k: torch.stack([it[k] for it in items]) for k in items[0]}  # noqa: E731
    cfg = TrainConfig(batch_size=3, lr=1e-2)

    def state():
        model = Tiny()
        return TrainState(model, model, {}, cfg, make_loader(rows, collate, 3, True, 7), 20, torch.device("cpu"))

    trained, seeked = state(), state()
    trained.run(5)  # 4 batches per epoch: the next steps are in the second epoch's shuffled order
    seeked.seek(5)
    seen = {"trained": [], "seeked": []}
    lrs = {}
    for name, s in (("trained", trained), ("seeked", seeked)):
        s.run(4, before_forward=lambda b, name=name: seen[name].append(b["x"][:, 0].tolist()))
        lrs[name] = [g["lr"] for g in s.optimizer.param_groups]
    assert seen["trained"] == seen["seeked"] and len(seen["trained"]) == 4
    assert seen["trained"][0] != [0.0, 1.0, 2.0]  # shuffled: the test would pass trivially on a sequential order
    assert lrs["trained"] == lrs["seeked"] and seeked.step == trained.step == 9


def test_gradual_fade_resumes_exactly(setup):
    """prune.gradual: a run killed during the fade (masks set by the schedule, not saved) resumes to the same
    plan and curves."""
    root, model, data, _ = setup
    extra = ["--set", "prune.gradual=0.2"]
    assert main(_args(model, data, root / "ref-fade", *extra)) == 0
    reference = _summary(root / "ref-fade")
    res = json.loads((root / "ref-fade" / "results.json").read_text())
    assert res["light_peft"]["fade_steps"] == 5
    assert _killed_and_resumed(model, data, root / "killed-fade", extra, "fade:8") == reference


@pytest.mark.parametrize("kill_at", ["estimate:4", "fine-tune:14"])
@pytest.mark.parametrize("options", [("compensate",), ("compensate", "reconstruct")])
def test_compensation_resumes_exactly(setup, kill_at, options):
    """prune.compensate (and prune.reconstruct): the window's input sums and moment sums are in mid-estimation
    checkpoints, and what surgery changed in the base (o / down biases; reconstructed weights) is in fine-tune
    checkpoints (a resumed run's surgery runs on the untrained model, without the moments), so a killed run
    ends where an uninterrupted one does."""
    root, model, data, plain = setup
    extra = [arg for o in options for arg in ("--set", f"prune.{o}=true")]
    ref_dir = root / f"ref-{'-'.join(options)}"
    if not (ref_dir / "results.json").exists():
        assert main(_args(model, data, ref_dir, *extra)) == 0
    reference = _summary(ref_dir)
    assert reference[0] == plain[0] and reference[3] != plain[3]  # same plan, other fine-tune losses
    killed = root / f"killed-{'-'.join(options)}-{kill_at[:3]}"
    assert _killed_and_resumed(model, data, killed, extra, kill_at) == reference
