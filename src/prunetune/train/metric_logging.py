"""Metric loggers for the training loop: a small pluggable interface (`log(name, value, step)`, `log_dict`,
`close`), backends for TensorBoard, Weights & Biases and MLflow (each used only when installed and asked for
in `train.report_to`), a dependency-free `jsonl` backend (`logging_dir/metrics.jsonl`, one line per logging
step), and a registry so other backends can be added.

Only rank 0 logs; other ranks get a `NullLogger`. A run opens one logger per (backends, folder) and reuses it
across its phases and runs; tags carry the run, so a vanilla baseline and Light-PEFT trained in one command
land side by side: `light-peft/loss`, `light-peft/lr`, `vanilla/loss`, and at each epoch end the dev metrics
(`light-peft/dev_accuracy`, `vanilla/dev_perplexity`, ...). PrunePEFT's search rounds and retrain log under
their own names (`search`, `retrain`, ...). They are closed at exit.

>>> class Printer(MetricLogger):
...     def log(self, name, value, step):
...         print(name, value, step)
>>> register_backend("printer", lambda log_dir: Printer())
>>> get_metric_logger(["printer"], None).log_dict({"train/loss": 0.5}, step=10)
train/loss 0.5 10
>>> unregister_backend("printer")
"""
from __future__ import annotations

import atexit
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Callable, Mapping

from ..dist import is_main
from ..errors import PrunetuneError


class MetricLogger:
    """Interface: scalar metrics by name and optimizer step."""

    def log(self, name: str, value: float, step: int) -> None:
        raise NotImplementedError

    def log_dict(self, payload: Mapping[str, float], step: int) -> None:
        for name, value in payload.items():
            self.log(name, value, step)

    def close(self) -> None:
        """Flush and release (idempotent)."""


class NullLogger(MetricLogger):
    def log(self, name: str, value: float, step: int) -> None:
        pass


class MultiLogger(MetricLogger):
    """Several loggers behind one."""

    def __init__(self, loggers: list[MetricLogger]):
        self.loggers = loggers

    def log(self, name: str, value: float, step: int) -> None:
        for lg in self.loggers:
            lg.log(name, value, step)

    def log_dict(self, payload: Mapping[str, float], step: int) -> None:
        for lg in self.loggers:
            lg.log_dict(payload, step)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()


class TensorBoardLogger(MetricLogger):
    def __init__(self, log_dir: str | None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir)

    def log(self, name: str, value: float, step: int) -> None:
        self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbLogger(MetricLogger):
    """One wandb run (the active one, or a new one in project $WANDB_PROJECT, default prunetune). Phases restart
    their step count, so the step is logged as a metric (`step`) rather than as wandb's monotonic step."""

    def __init__(self, log_dir: str | None):
        import wandb

        self.wandb = wandb
        self._own = wandb.run is None
        if log_dir:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.run or wandb.init(project=os.environ.get("WANDB_PROJECT", "prunetune"), dir=log_dir)

    def log(self, name: str, value: float, step: int) -> None:
        self.run.log({name: value, "step": step})

    def log_dict(self, payload: Mapping[str, float], step: int) -> None:
        self.run.log({**payload, "step": step})

    def close(self) -> None:
        if self._own:
            self.run.finish()
            self._own = False


class MLflowLogger(MetricLogger):
    """MLflow metrics in the active run (or a new one); with no $MLFLOW_TRACKING_URI they go to log_dir/mlruns."""

    def __init__(self, log_dir: str | None):
        import mlflow

        self.mlflow = mlflow
        if log_dir and not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri((Path(log_dir).resolve() / "mlruns").as_uri())
        self._own = mlflow.active_run() is None
        if self._own:
            mlflow.start_run()

    def log(self, name: str, value: float, step: int) -> None:
        self.mlflow.log_metric(name, value, step=step)

    def close(self) -> None:
        if self._own:
            self.mlflow.end_run()
            self._own = False


class JsonlLogger(MetricLogger):
    """Appends one JSON object per logging step to `log_dir/metrics.jsonl` ({"step": .., "time": unix seconds,
    tag: value, ...}); each line is flushed, so a run that is killed keeps what it logged. Appending (never
    truncating) keeps an earlier run's lines and lets a resumed run continue the file."""

    def __init__(self, log_dir: str | None):
        if not log_dir:  # never a file dropped in the working directory unasked
            raise PrunetuneError("the jsonl metric logger needs a folder (train.logging_dir)")
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(log_dir) / "metrics.jsonl"
        self._file = None

    def log(self, name: str, value: float, step: int) -> None:
        self.log_dict({name: value}, step)

    def log_dict(self, payload: Mapping[str, float], step: int) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held open until close()
        line = {"step": int(step), "time": round(time.time(), 3), **{k: float(v) for k, v in payload.items()}}
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# name -> (factory(log_dir) -> MetricLogger, the package it needs or None)
_BACKENDS: dict[str, tuple[Callable[[str | None], MetricLogger], str | None]] = {
    "tensorboard": (TensorBoardLogger, "tensorboard"),
    "wandb": (WandbLogger, "wandb"),
    "mlflow": (MLflowLogger, "mlflow"),
    "jsonl": (JsonlLogger, None),
}
_OPEN: dict[tuple, MetricLogger] = {}


def register_backend(name: str, factory: Callable[[str | None], MetricLogger], requires: str | None = None) -> None:
    """Make `name` a valid `train.report_to` entry; factory(log_dir) builds its logger."""
    _BACKENDS[name] = (factory, requires)


def unregister_backend(name: str) -> None:
    _BACKENDS.pop(name, None)
    for key in [k for k in _OPEN if name in k[0]]:
        _OPEN.pop(key).close()


def backends() -> list[str]:
    """The names `train.report_to` accepts."""
    return sorted(_BACKENDS)


def installed(name: str) -> bool:
    requires = _BACKENDS[name][1]
    return requires is None or importlib.util.find_spec(requires) is not None


def check_backends(names: list[str]) -> None:
    """Before any work: every requested backend is known and its package installed."""
    for name in names:
        if name not in _BACKENDS:
            raise PrunetuneError(f"config key 'train.report_to' must list names from {backends()}, got {names!r}")
        if not installed(name):
            pkg = _BACKENDS[name][1]
            raise PrunetuneError(f"train.report_to asks for {name}, but the `{pkg}` package is not installed "
                                 f"(pip install {pkg}, or drop it from train.report_to)")


def get_metric_logger(names: list[str] | tuple[str, ...], log_dir: str | None) -> MetricLogger:
    """The logger for these backends (opened once per process and folder); a NullLogger for none, or off rank 0."""
    if not names or not is_main():
        return NullLogger()
    key = (tuple(names), log_dir)
    if key not in _OPEN:
        check_backends(list(names))
        loggers = []
        for name in names:
            try:
                loggers.append(_BACKENDS[name][0](log_dir))
            except ImportError as exc:
                raise PrunetuneError(f"train.report_to: cannot start {name}: {exc}") from None
        _OPEN[key] = loggers[0] if len(loggers) == 1 else MultiLogger(loggers)
    return _OPEN[key]


def close_metric_loggers() -> None:
    """Flush and close every open logger (called at exit and at the end of a CLI command)."""
    while _OPEN:
        _OPEN.popitem()[1].close()


atexit.register(close_metric_loggers)
