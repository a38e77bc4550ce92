"""The CUDA paths on tiny random models: bf16 autocast end to end (classifier and causal decoder), fp16 with the
GradScaler (including overflowing steps), SIGKILL + resume on the GPU (bit-exact, per precision) and the
CUDA memory figures against `torch.cuda.max_memory_allocated`.

Marked `cuda`: skipped without a CUDA device. `PRUNETUNE_GPU_CHECK_ALLOW_CPU=1` runs them on CPU instead (the
device-specific assertions are then skipped inside the tests), so that `benchmarks/gpu_check.sh`'s plumbing and
these tests' own code can be exercised on a machine without a GPU.
"""
from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
from test_causal_lm import chat_tokenizer, instruction_rows, save_tiny_causal_llama, write_jsonl
from test_pipeline import assert_metrics_close, bert_dir, cli_eval, light, sst2_dir, write_sst2  # noqa: F401 (fixtures)
from test_resume import _args, _cli, _summary

import prunetune
import prunetune.methods.common as common_mod
import prunetune.methods.light_peft as light_mod

MB = 2**20
DEVICE = "cuda" if torch.cuda.is_available() else (
    "cpu" if os.environ.get("PRUNETUNE_GPU_CHECK_ALLOW_CPU") == "1" else None)
ON_CUDA = DEVICE == "cuda"

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE is None, reason="needs a CUDA device (PRUNETUNE_GPU_CHECK_ALLOW_CPU=1: run on CPU)"),
]



@pytest.fixture
def spy_models(monkeypatch):
    """Records, for every model Light-PEFT / vanilla builds, the device of its parameters and the dtypes its
    Linear layers compute in while training (autocast shows up there)."""
    seen = {"devices": set(), "train_dtypes": set()}
    real = light_mod.build_model

    def build(ctx, *args, **kwargs):
        out = real(ctx, *args, **kwargs)
        model = out[0]

        def hook(module, _inputs, output):
            if module.training and torch.is_tensor(output):
                seen["train_dtypes"].add(output.dtype)
                seen["devices"].add(output.device.type)

        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.register_forward_hook(hook)
        return out

    monkeypatch.setattr(light_mod, "build_model", build)  # Light-PEFT
    monkeypatch.setattr(common_mod, "build_model", build)  # train_fixed: the vanilla baseline
    return seen


def _all_finite(value) -> bool:
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_all_finite(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return True


def _assert_scores_finite(out) -> None:
    """Every score the plan was made from (heads, neurons, PEFT modules, ranks) is a finite number."""
    meta = json.loads((out / "plan.json").read_text())["meta"]
    for key in ("module_importance", "module_norm_ratio", "module_taylor", "rank_importance", "head_masks",
                "head_taylor", "ffn_mask_summary"):
        assert meta[key], key
        assert _all_finite(meta[key]), (key, meta[key])


def _assert_run_finite(results: dict) -> None:
    for method in ("vanilla", "light_peft"):
        res = results[method]
        assert res["evals"] and _all_finite(res["evals"]), res["evals"]
        assert res["loss_curve"] and all(math.isfinite(h["loss"]) for h in res["loss_curve"]), res["loss_curve"]


# ---------------------------------------------------------------- bf16

def test_bf16_light_peft_end_to_end(bert_dir, sst2_dir, tmp_path, spy_models, capsys):
    out = tmp_path / "run"
    results = light(bert_dir, {"data_dir": str(sst2_dir)}, out, baseline=True,
                    train={"mixed_precision": "bf16", "epochs": 2})
    assert spy_models["devices"] == {DEVICE}
    assert torch.bfloat16 in spy_models["train_dtypes"]  # autocast was on while training
    _assert_run_finite(results)
    _assert_scores_finite(out)
    lp = results["light_peft"]
    assert lp["plan"]["heads_kept"] == "6/8"  # 4 heads per layer, round(4/3) = 1 removed, 2 layers
    assert [e["epoch"] for e in lp["evals"]] == [1, 2]
    # the export of a bf16-trained run reloads and evaluates (fp32, no autocast) to the run's final metrics
    assert_metrics_close(cli_eval(capsys, out / "model", "--data-dir", str(sst2_dir)), lp["final"], tol=1e-5)


def test_bf16_causal_decoder(tmp_path, spy_models):
    tok = chat_tokenizer()
    model_dir = save_tiny_causal_llama(tmp_path / "llama", tok)
    train = write_jsonl(tmp_path / "train.jsonl", instruction_rows(32))
    dev = write_jsonl(tmp_path / "dev.jsonl", instruction_rows(8))
    out = tmp_path / "run"
    results = prunetune.light_peft({
        "model": {"name_or_path": str(model_dir)},
        "data": {"task": "causal_lm", "train_file": str(train), "dev_file": str(dev), "max_length": 48},
        "prune": {"ffn_scope": "layer"},
        "train": {"epochs": 2, "batch_size": 8, "eval_batch_size": 8, "lr": 5e-3, "mixed_precision": "bf16",
                  "log_every": 1},
        "output_dir": str(out), "baseline": True})
    assert spy_models["devices"] == {DEVICE} and torch.bfloat16 in spy_models["train_dtypes"]
    _assert_run_finite(results)
    _assert_scores_finite(out)
    for method in ("vanilla", "light_peft"):
        assert 1.0 < results[method]["final"]["perplexity"] < 1e4
    assert results["light_peft"]["plan"]["heads_kept"] == "8/12"  # GQA: 1 of 3 KV groups removed per layer


# ---------------------------------------------------------------- fp16 + GradScaler

def test_fp16_grad_scaler_with_overflowing_steps(bert_dir, sst2_dir, tmp_path, spy_models, monkeypatch):
    """fp16 autocast with the GradScaler, started at a scale high enough that the first steps overflow (as real
    runs do while the scale settles): those steps are skipped, and no inf/nan reaches the scores or the metrics."""
    calls = {"update": 0, "skipped": 0}
    real_scaler = torch.amp.GradScaler

    class SpyScaler(real_scaler):
        def __init__(self, *args, **kwargs):
            kwargs["init_scale"] = 2.0**22
            super().__init__(*args, **kwargs)

        def update(self, *args, **kwargs):
            before = self.get_scale()
            super().update(*args, **kwargs)
            calls["update"] += 1
            calls["skipped"] += int(self.get_scale() < before)  # the scale backs off only after an inf/nan step

    monkeypatch.setattr(torch.amp, "GradScaler", SpyScaler)
    out = tmp_path / "run"
    results = light(bert_dir, {"data_dir": str(sst2_dir)}, out, baseline=True,
                    train={"mixed_precision": "fp16", "epochs": 2},
                    estimate={"steps": 8, "window": 1.0})  # scores accumulate from step 0: overflows included
    assert spy_models["devices"] == {DEVICE} and torch.float16 in spy_models["train_dtypes"]
    lp, van = results["light_peft"], results["vanilla"]
    if ON_CUDA:  # every optimizer step went through the scaler, and some were skipped (the case under test)
        assert calls["update"] == lp["total_steps"] + van["steps"]
        assert calls["skipped"] >= 1
    else:  # no scaler on CPU (fp16 autocast only)
        assert calls["update"] == 0
    _assert_run_finite(results)
    _assert_scores_finite(out)
    assert lp["plan"]["heads_kept"] == "6/8"


# ---------------------------------------------------------------- resume on the device

# (the vanilla phase, train_fixed, keeps no device-specific state of its own: tests/test_resume.py covers it)
RESUME_CASES = [("no", "estimate:4"), ("no", "fine-tune:14"), ("bf16", "estimate:4"), ("fp16", "fine-tune:14")]
if not ON_CUDA:  # CPU mode checks the plumbing only (tests/test_resume.py covers CPU; CPU autocast is slow)
    RESUME_CASES = [("no", "estimate:4"), ("bf16", "fine-tune:14")]


@pytest.fixture(scope="module")
def resume_root(tmp_path_factory, bert_dir):
    root = tmp_path_factory.mktemp("resume")
    return root, write_sst2(root / "data", n_train=64, n_dev=16), {}


def _device_args(precision: str) -> list[str]:
    return [] if precision == "no" else ["--set", f"train.mixed_precision={precision}"]  # (YAML reads no as false)


def _run_ok(args) -> str:
    proc = _cli(args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.parametrize(("precision", "kill_at"), RESUME_CASES)
def test_sigkill_then_resume_on_device_is_bit_exact(bert_dir, resume_root, precision, kill_at):
    """Same as tests/test_resume.py, on the device and per precision: a run SIGKILLed after a checkpoint and
    resumed ends with the same plan, metrics and loss curves, bit for bit, as an uninterrupted run."""
    root, data, refs = resume_root
    if precision not in refs:
        ref = root / f"ref-{precision}"
        stdout = _run_ok(_args(bert_dir, data, ref, *_device_args(precision)))
        assert f"steps on {DEVICE}" in stdout, stdout[-1000:]
        refs[precision] = _summary(ref)
    out = root / f"killed-{precision}-{kill_at.replace(':', '-')}"
    proc = _cli(_args(bert_dir, data, out, *_device_args(precision)), {"PRUNETUNE_DEBUG_KILL_AT": kill_at})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / "results.json").exists()
    _run_ok(_args(bert_dir, data, out, "--resume", *_device_args(precision)))
    assert _summary(out) == refs[precision]


# ---------------------------------------------------------------- memory accounting

def test_peak_memory_is_max_memory_allocated():
    from prunetune.train.memory import PeakMemory

    if not ON_CUDA:
        with PeakMemory("cpu") as mem:
            pass
        assert mem.peak_mb is None and mem.above_entry_mb is None
        return
    dev = torch.device("cuda")
    before = torch.empty(8 * MB, dtype=torch.uint8, device=dev)  # live at entry: part of the peak
    with PeakMemory(dev) as mem:
        inside = torch.empty(16 * MB, dtype=torch.uint8, device=dev)
        del inside
    assert mem.peak_mb == torch.cuda.max_memory_allocated(dev) / MB
    assert mem.entry_mb >= 8 and mem.peak_mb >= mem.entry_mb + 16
    assert mem.above_entry_mb == pytest.approx(mem.peak_mb - mem.entry_mb)
    del before


def test_reported_cuda_peak_covers_the_training_state(bert_dir, sst2_dir, tmp_path):
    """The run's `cuda_peak_mb` is the allocator peak of training: it holds at least the weights, and everything
    the tensor accounting (`peak_mb`) counts as live together at the end of a forward pass (weights, optimizer
    state, saved activations; the gradients and optimizer state of the trainable parameters may come later)."""
    results = light(bert_dir, {"data_dir": str(sst2_dir)}, tmp_path / "run", baseline=True)
    from transformers import AutoModelForSequenceClassification

    weights_mb = sum(p.numel() * p.element_size()
                     for p in AutoModelForSequenceClassification.from_pretrained(bert_dir).parameters()) / MB
    for method in ("vanilla", "light_peft"):
        res = results[method]
        assert res["peak_mb"] > 0
        if not ON_CUDA:
            assert res["cuda_peak_mb"] is None
            continue
        # fp32 grads + AdamW's two moments, and a little for AdamW's step counters (kept on the CPU)
        later_mb = 3 * res["trainable_params"] * 4 / MB + 1 / 16
        assert res["cuda_peak_mb"] >= res["peak_mb"] - later_mb, (method, res["cuda_peak_mb"], res["peak_mb"])
    if ON_CUDA:
        assert results["vanilla"]["cuda_peak_mb"] >= weights_mb
        assert results["light_peft"]["cuda_estimation_peak_mb"] >= weights_mb
