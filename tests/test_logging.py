"""Logging: the `prunetune` logger (levels, rank 0 only) and the metric loggers of the training loop
(train.report_to: a registered backend receives loss / lr at the logging steps; a missing one is refused)."""
from __future__ import annotations

import json
import logging
import types

import pytest
import torch
from models import tiny
from torch import nn

from prunetune import PrunetuneError, load_config
from prunetune.cli import main
from prunetune.config import TrainConfig
from prunetune.train import TrainState
from prunetune.train import metric_logging as ml


class Recorder(ml.MetricLogger):
    def __init__(self, log_dir=None):
        self.log_dir, self.records, self.closed = log_dir, [], False

    def log(self, name, value, step):
        self.records.append((name, value, step))

    def close(self):
        self.closed = True


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(2, 1)

    def forward(self, x, labels):
        return types.SimpleNamespace(loss=((self.lin(x).squeeze(-1) - labels) ** 2).mean())


def _loader(n: int = 4):
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(3, 2, generator=g), "labels": torch.randn(3, generator=g)} for _ in range(n)]


def _state(cfg: TrainConfig, **kw) -> TrainState:
    model = Tiny()
    return TrainState(model, model, {}, cfg, _loader(), 6, torch.device("cpu"), desc="fine-tune", **kw)


@pytest.fixture
def fake_backend():
    made: list[Recorder] = []

    def factory(log_dir):
        made.append(Recorder(log_dir))
        return made[-1]

    ml.register_backend("fake", factory)
    yield made
    ml.unregister_backend("fake")


def test_metric_logger_gets_loss_and_lr_at_the_logging_steps():
    rec = Recorder()
    state = _state(TrainConfig(log_every=2, save_every=0, warmup_ratio=0.0, lr=0.1), metric_logger=rec)
    state.run(6)
    steps = sorted({s for _, _, s in rec.records})
    assert steps == [2, 4, 6]
    names = {n for n, _, _ in rec.records}
    assert names == {"fine-tune/loss", "fine-tune/lr"}
    lr = {s: v for n, v, s in rec.records if n == "fine-tune/lr"}
    hist = {h["step"]: h for h in state.history}
    assert lr == {s: pytest.approx(hist[s]["lr"]) for s in (2, 4, 6)}
    loss = {s: v for n, v, s in rec.records if n == "fine-tune/loss"}
    assert loss == {s: pytest.approx(hist[s]["loss"]) for s in (2, 4, 6)}


def test_registered_backend_from_report_to_is_opened_once_and_closed(fake_backend, tmp_path):
    cfg = TrainConfig(log_every=3, save_every=0, report_to=["fake"], logging_dir=str(tmp_path / "logs"))
    a, b = _state(cfg), _state(cfg)  # two phases of one run share the backend
    a.run(3)
    b.run(3)
    assert len(fake_backend) == 1 and fake_backend[0].log_dir == str(tmp_path / "logs")
    assert [s for n, _, s in fake_backend[0].records if n.endswith("/loss")] == [3, 3]
    ml.close_metric_loggers()
    assert fake_backend[0].closed


def test_report_to_default_folder_is_under_output_dir(fake_backend, tmp_path):
    cfg = load_config(None, {"train.report_to": "fake", "output_dir": str(tmp_path / "run")})
    assert cfg.train.report_to == ["fake"] and cfg.train.logging_dir == str(tmp_path / "run" / "logs")


def test_only_rank_0_logs_metrics(fake_backend, monkeypatch):
    monkeypatch.setattr(ml, "is_main", lambda: False)
    logger = ml.get_metric_logger(["fake"], None)
    assert isinstance(logger, ml.NullLogger) and not fake_backend


def test_unknown_backend_is_a_config_error():
    with pytest.raises(PrunetuneError, match="train.report_to"):
        load_config(None, {"train.report_to": ["nosuchbackend"]})


def test_missing_backend_package_is_refused_before_any_work(tmp_path, capsys):
    ml.register_backend("needs-pkg", Recorder, requires="prunetune_no_such_package_xyz")
    try:
        with pytest.raises(PrunetuneError, match="prunetune_no_such_package_xyz.*not installed"):
            load_config(None, {"train.report_to": ["needs-pkg"]})
        out = tmp_path / "out"
        assert main(["light", "--output-dir", str(out), "--set", "train.report_to=[needs-pkg]"]) == 2
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("prunetune: error:") and "not installed" in lines[0]
        assert not out.exists()
    finally:
        ml.unregister_backend("needs-pkg")


@pytest.mark.parametrize("backend", ["wandb", "mlflow", "tensorboard"])
def test_known_backend_missing_or_installed(backend):
    if ml.installed(backend):
        assert load_config(None, {"train.report_to": backend}).train.report_to == [backend]
    else:
        with pytest.raises(PrunetuneError, match=f"pip install {backend}"):
            load_config(None, {"train.report_to": backend})


def test_tensorboard_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = TrainConfig(log_every=1, save_every=0, report_to=["tensorboard"], logging_dir=str(tmp_path / "tb"))
    _state(cfg).run(2)
    ml.close_metric_loggers()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_deprecated_tensorboard_dir_maps_onto_report_to(tmp_path):
    cfg = TrainConfig(tensorboard_dir=str(tmp_path / "tb"))
    assert cfg.report_to == ["tensorboard"] and cfg.logging_dir == str(tmp_path / "tb")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # the mapping is idempotent
    with pytest.raises(PrunetuneError, match="not both"):
        TrainConfig(tensorboard_dir=str(tmp_path / "tb"), logging_dir=str(tmp_path / "other"))


# ---------------------------------------------------------------- the prunetune logger

def test_log_goes_through_the_prunetune_logger(capsys):
    from prunetune.dist import log

    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger = logging.getLogger("prunetune")
    log("hello")  # configures the logger on first use
    logger.addHandler(handler)
    try:
        log("step 1 done")
        log("warning: something odd")
    finally:
        logger.removeHandler(handler)
    assert [(r.levelno, r.getMessage()) for r in seen] == [(logging.INFO, "step 1 done"),
                                                           (logging.WARNING, "warning: something odd")]
    assert "step 1 done" in capsys.readouterr().out  # the default handler prints to stdout, as before


def test_log_levels_and_rank_0(capsys, monkeypatch):
    from prunetune import logs
    from prunetune.dist import log

    logs.set_verbosity("warning")
    try:
        log("quiet info")
        log("warning: loud")
    finally:
        logs.set_verbosity("info")
    out = capsys.readouterr().out
    assert "quiet info" not in out and "warning: loud" in out
    monkeypatch.setattr(logs, "_rank", lambda: 1)
    log("from rank 1")
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------- wandb / mlflow through fake modules
def _fake_module(name: str, **attrs) -> types.ModuleType:
    import importlib.machinery

    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)  # find_spec (installed()) reads it
    for k, v in attrs.items():
        setattr(mod, k, v)
    return mod


def _fake_wandb(active=None):
    calls = {"init": [], "log": [], "finish": 0}

    class Run:
        def log(self, payload):
            calls["log"].append(dict(payload))

        def finish(self):
            calls["finish"] += 1

    def init(**kw):
        calls["init"].append(kw)
        return Run()

    return _fake_module("wandb", run=active() if active else None, init=init), calls, Run


def test_wandb_logger_logs_steps_and_finishes_its_own_run(monkeypatch, tmp_path):
    mod, calls, _ = _fake_wandb()
    monkeypatch.setitem(__import__("sys").modules, "wandb", mod)
    monkeypatch.setenv("WANDB_PROJECT", "proj")
    assert ml.installed("wandb")
    cfg = TrainConfig(log_every=1, save_every=0, report_to=["wandb"], logging_dir=str(tmp_path / "wb"))
    _state(cfg).run(2)
    ml.close_metric_loggers()
    assert calls["init"] == [{"project": "proj", "dir": str(tmp_path / "wb")}]
    losses = [c for c in calls["log"] if any(k.endswith("loss") for k in c)]
    assert [c["step"] for c in losses] == [1, 2] and all(isinstance(v, float) for c in losses for v in c.values()
                                                         if not isinstance(v, int))
    assert calls["finish"] == 1  # the run it started is finished once


def test_wandb_logger_joins_an_active_run_and_leaves_it_open(monkeypatch, tmp_path):
    holder = {}
    mod, calls, Run = _fake_wandb()
    mod.run = holder["run"] = Run()
    monkeypatch.setitem(__import__("sys").modules, "wandb", mod)
    _state(TrainConfig(log_every=1, save_every=0, report_to=["wandb"])).run(1)
    ml.close_metric_loggers()
    assert calls["init"] == [] and calls["log"] and calls["finish"] == 0


def test_mlflow_logger_logs_metrics_in_its_own_run(monkeypatch, tmp_path):
    calls = {"uri": [], "start": 0, "end": 0, "metrics": []}
    active = {"run": None}

    def start_run():
        calls["start"] += 1
        active["run"] = object()

    def end_run():
        calls["end"] += 1
        active["run"] = None

    mod = _fake_module("mlflow", set_tracking_uri=calls["uri"].append, active_run=lambda: active["run"],
                       start_run=start_run, end_run=end_run,
                       log_metric=lambda name, value, step: calls["metrics"].append((name, value, step)))
    monkeypatch.setitem(__import__("sys").modules, "mlflow", mod)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _state(TrainConfig(log_every=1, save_every=0, report_to=["mlflow"], logging_dir=str(tmp_path / "ml"))).run(2)
    ml.close_metric_loggers()
    assert calls["uri"] == [(tmp_path / "ml" / "mlruns").resolve().as_uri()]
    assert (calls["start"], calls["end"]) == (1, 1)
    steps = sorted({s for n, _, s in calls["metrics"] if n.endswith("loss")})
    assert steps == [1, 2] and all(isinstance(v, float) for _, v, _ in calls["metrics"])


def _tiny_rows(n: int = 16):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(1, 50, (8,), generator=g), "attention_mask": torch.ones(8, dtype=torch.long),
             "labels": i % 2} for i in range(n)]


@pytest.mark.parametrize("each_epoch", [True, False])
def test_dev_metrics_reach_the_metric_loggers(fake_backend, tmp_path, each_epoch):
    import prunetune

    rows = _tiny_rows()
    res = prunetune.light_peft_model(tiny("bert"), rows, dev_data=rows, train__epochs=2, train__batch_size=4,
                                     train__eval_each_epoch=each_epoch, train__report_to=["fake"],
                                     train__logging_dir=str(tmp_path / "logs"), estimate__steps=2,
                                     prune__heads=0.5)
    dev = [(n, v, s) for n, v, s in fake_backend[0].records if "/dev_" in n]
    evals = res.metrics["evals"]
    # one accuracy point per dev evaluation (each epoch end, or the final one), at the step it was made
    assert [(v, s) for n, v, s in dev if n == "light-peft/dev_accuracy"] == \
        [(pytest.approx(e["accuracy"]), e["step"]) for e in evals]
    assert len(evals) == (2 if each_epoch else 1) and evals[-1]["step"] == 8
    assert {n for n, _, _ in dev} >= {"light-peft/dev_accuracy"}
    assert all(n.startswith("light-peft/") for n, _, _ in fake_backend[0].records)


def test_jsonl_backend_appends_flushed_lines(tmp_path):
    cfg = load_config(None, {"train.report_to": "jsonl", "output_dir": str(tmp_path / "run"),
                             "train.log_every": 1, "train.save_every": 0, "train.warmup_ratio": 0.0})
    state = _state(cfg.train)
    state.run(3)
    path = tmp_path / "run" / "logs" / "metrics.jsonl"
    lines = [json.loads(ln) for ln in path.read_text().splitlines()]  # readable before close: flushed per line
    assert [ln["step"] for ln in lines] == [1, 2, 3]
    assert all(set(ln) == {"step", "time", "fine-tune/loss", "fine-tune/lr"} for ln in lines)
    assert [ln["fine-tune/loss"] for ln in lines] == [pytest.approx(h["loss"]) for h in state.history]
    ml.close_metric_loggers()
    _state(cfg.train).run(1)  # a second run (or a resumed one) appends: the earlier lines stay
    ml.close_metric_loggers()
    assert [json.loads(ln)["step"] for ln in path.read_text().splitlines()] == [1, 2, 3, 1]


def test_jsonl_backend_needs_a_folder():
    with pytest.raises(PrunetuneError, match="logging_dir"):
        ml.get_metric_logger(["jsonl"], None)
