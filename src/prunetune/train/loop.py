"""Training state that can swap in a pruned model mid-run and carry AdamW state over by slicing."""
from __future__ import annotations

import math
import os
import random
import signal
import time
from contextlib import nullcontext
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..arch.base import body_path
from ..data.metrics import compute_metrics
from ..errors import PrunetuneError
from ..dist import GlobalBatchSampler, average_gradients, is_main
from ..surgery.peft import apply_ops
from .memory import StepMemory
from .metric_logging import MetricLogger, get_metric_logger

if TYPE_CHECKING:  # the config layer sits above train/: no runtime import (no cycle)
    from ..config import TrainConfig

AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def make_loader(dataset, collate, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    """Training loaders (shuffle=True) yield this rank's shard of seeded global batches of `batch_size`;
    evaluation loaders are plain sequential batches."""
    # Each loader owns a generator: creating an iterator then draws its base seed from it, not from the global
    # RNG, so dropout masks do not depend on how often loaders were iterated (exact resume).
    g = torch.Generator().manual_seed(seed)
    if not shuffle:
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate, generator=g)
    return DataLoader(dataset, batch_sampler=GlobalBatchSampler(len(dataset), batch_size, seed), collate_fn=collate,
                      generator=g)


def carry_state(old_state: dict[str, dict], named: dict[str, nn.Parameter], param_ops: dict | None = None) -> dict:
    """Optimizer state (by parameter name) carried onto the parameters after surgery: tensors sliced with
    param_ops where the parameter shrank; state whose shapes still do not fit (or of removed parameters) is
    dropped. Returns {parameter: state}."""
    out = {}
    for name, p in named.items():
        if name in old_state:
            st = {k: (apply_ops(v, (param_ops or {}).get(name, [])) if torch.is_tensor(v) and v.ndim else v)
                  for k, v in old_state[name].items()}
            if all(not torch.is_tensor(v) or v.ndim == 0 or v.shape == p.shape for v in st.values()):
                out[p] = st
    return out


def grads_finite(params) -> bool:
    """Whether every gradient is finite (one sync). Called after GradScaler.unscale_, this is the scaler's own
    decision: it skips exactly the steps whose gradients hold inf/NaN (fp16 overflow), and such a step must
    not be scored either."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


class TrainState:
    """model: what forward() is called on (PeftModel or HF model); hf: the HF model (naming root);
    extras: modules outside the HF model whose parameters also train (masks, adapters); metric_logger: where
    loss / lr go every cfg.log_every steps (default: the train.report_to backends, rank 0 only)."""

    def __init__(self, model: nn.Module, hf: nn.Module, extras: dict[str, nn.Module], cfg: TrainConfig,
                 loader: DataLoader, total_steps: int, device: torch.device, mask_lr: float | None = None,
                 desc: str = "train", constant_lr: bool = False, metric_logger: MetricLogger | None = None):
        self.cfg, self.loader, self.total_steps, self.device = cfg, loader, total_steps, device
        self.mask_lr = mask_lr or cfg.lr
        self.lr_scale = 1.0  # multiplies cfg.lr for the model's parameters (prune.finetune_lr_scale after surgery)
        self.constant_lr = constant_lr  # search rounds: warm-up then flat (their number is not known ahead)
        self.warmup = int(round(cfg.warmup_ratio * total_steps))
        self.step = 0
        self.epoch = 0.0
        self.step_finite = True  # this step's gradients are finite (read by after_backward callbacks)
        self.step_times: list[float] = []
        self.history: list[dict] = []
        self.desc = desc
        self.memory = StepMemory()  # reset by the caller per phase
        self.metric_logger = metric_logger if metric_logger is not None else get_metric_logger(cfg.report_to, cfg.logging_dir)
        self._batches = self._batch_iter()
        self.steps_per_epoch = max(1, math.ceil(len(loader) / cfg.grad_accum))
        amp = AMP.get(cfg.mixed_precision)
        self.autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else nullcontext
        self.scaler = torch.amp.GradScaler(device.type) if cfg.mixed_precision == "fp16" and device.type == "cuda" else None
        self.set_model(model, hf, extras)

    # ---- parameters and optimizer ------------------------------------------------------------------
    def named_trainable(self) -> dict[str, nn.Parameter]:
        named = {n: p for n, p in self.hf.named_parameters() if p.requires_grad}
        for key, module in self.extras.items():
            named.update({f"{key}.{n}": p for n, p in module.named_parameters() if p.requires_grad})
        return named

    def set_model(self, model, hf, extras, param_ops: dict | None = None, reset: bool = False) -> None:
        """(Re)build the optimizer; with an old optimizer and reset=False, state of kept params is carried
        over (sliced with param_ops where the parameter shrank)."""
        old = getattr(self, "optimizer", None)
        old_state = {}
        if old is not None and not reset:
            old_state = {self._names[id(p)]: s for p, s in old.state.items() if id(p) in self._names}
        self.model, self.hf, self.extras = model.to(self.device), hf, extras
        for m in extras.values():
            m.to(self.device)
        named = self.named_trainable()
        masks = [p for n, p in named.items() if n.startswith("masks.")]
        decay = [p for n, p in named.items() if not n.startswith("masks.") and p.ndim > 1]
        no_decay = [p for n, p in named.items() if not n.startswith("masks.") and p.ndim <= 1]
        lr = self.cfg.lr * self.lr_scale
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay, "base_lr": lr},
                  {"params": no_decay, "weight_decay": 0.0, "base_lr": lr}]
        if masks:
            groups.append({"params": masks, "weight_decay": 0.0, "base_lr": self.mask_lr})
        groups = [g for g in groups if g["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=lr)
        self._names = {id(p): n for n, p in named.items()}  # names as of this build (surgery renames nothing)
        # clipped: the model's trainable parameters in the model's order, masks excluded, as a transformers
        # Trainer clips model.parameters() (the Trainer callback and this loop then take identical steps)
        self._clip_params = [p for n, p in named.items() if not n.startswith("masks.")]
        self.optimizer.state.update(carry_state(old_state, named, param_ops))

    def trainable_count(self, include_head: bool = True) -> int:
        n = 0
        for name, p in self.named_trainable().items():
            if name.startswith("masks."):
                continue
            if not include_head and _is_head(name, self.hf):
                continue
            n += p.numel()
        return n

    # ---- the loop ----------------------------------------------------------------------------------
    def _batch_iter(self, consumed: int = 0) -> Iterator[dict]:
        """Endless batches, a fresh seeded order per epoch; starts after `consumed` batches (resume)."""
        n = len(self.loader)
        epoch, skip = divmod(consumed, n)
        while True:
            sampler = getattr(self.loader, "batch_sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch, skip)
            for i, batch in enumerate(self.loader, start=skip):
                self.epoch = epoch + (i + 1) / n
                yield batch
            epoch, skip = epoch + 1, 0

    # ---- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue bit-for-bit: trainable tensors and AdamW state by name, step,
        RNG states and logs."""
        named = self.named_trainable()
        names = {id(p): n for n, p in named.items()}
        return {
            "step": self.step,
            "params": {n: p.detach().cpu().clone() for n, p in named.items()},
            "optimizer": {names[id(p)]: {k: (v.cpu().clone() if torch.is_tensor(v) else v) for k, v in st.items()}
                          for p, st in self.optimizer.state.items() if id(p) in names},
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "history": self.history, "step_times": self.step_times,
            # fp16: the loss scale and its growth counter decide which later steps overflow and are skipped
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    @torch.no_grad()
    def load_state_dict(self, payload: dict) -> None:
        named = self.named_trainable()
        missing = sorted(set(named) - set(payload["params"]))
        if missing:
            raise PrunetuneError(f"checkpoint does not match this model: no values for {missing[:3]}")
        for n, p in named.items():
            if payload["params"][n].shape != p.shape:
                raise PrunetuneError(f"checkpoint does not match this model: {n} has shape "
                                     f"{tuple(payload['params'][n].shape)}, expected {tuple(p.shape)}")
            p.copy_(payload["params"][n])
        for n, st in payload["optimizer"].items():
            if n in named:
                self.optimizer.state[named[n]] = {k: (v.to(self.device) if torch.is_tensor(v) and v.ndim else v)
                                                  for k, v in st.items()}
        rng = payload["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if self.scaler is not None and payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        self.history, self.step_times = list(payload["history"]), list(payload["step_times"])
        self.seek(payload["step"])

    def seek(self, step: int) -> None:
        """Continue from optimizer step `step` of the schedule (its learning rate and its batches) without
        training the steps before it: e.g. to time a fresh model on the same batches as one that has trained."""
        self.step = step
        self._batches = self._batch_iter(step * self.cfg.grad_accum)

    def run(self, n_steps: int, extra_loss: Callable[[], torch.Tensor] | None = None,
            before_forward: Callable[[dict], None] | None = None, after_backward: Callable[[int], None] | None = None,
            on_epoch_end: Callable[[int], None] | None = None, desc: str | None = None,
            on_checkpoint: Callable[[], None] | None = None,
            loss_fn: Callable[[dict, object], torch.Tensor] | None = None) -> None:
        """n_steps optimizer steps. on_checkpoint() is called every cfg.save_every steps and after the last;
        loss_fn(batch, outputs) replaces outputs.loss as what is minimised (e.g. distillation)."""
        self.model.train()
        bar = tqdm(total=n_steps, desc=desc or self.desc, leave=False, dynamic_ncols=True,
                   **({} if is_main() else {"disable": True}))
        for i in range(n_steps):
            t0 = time.perf_counter()
            loss_value, task_loss = 0.0, 0.0  # task_loss: without extra_loss (the L1 mask term), for the curves
            for _micro in range(self.cfg.grad_accum):
                batch = {k: v.to(self.device) for k, v in next(self._batches).items()}
                if before_forward:
                    before_forward(batch)
                with self.autocast(), self.memory.saving():
                    out = self.model(**batch)
                    task_loss = task_loss + out.loss.detach() / self.cfg.grad_accum
                    loss = (loss_fn(batch, out) if loss_fn is not None else out.loss) / self.cfg.grad_accum
                    if extra_loss is not None:
                        loss = loss + extra_loss() / self.cfg.grad_accum
                (self.scaler.scale(loss) if self.scaler else loss).backward()
                loss_value += float(loss.detach())
            average_gradients([p for g in self.optimizer.param_groups for p in g["params"]])
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            if after_backward:  # unscaled, fully accumulated, not yet clipped gradients
                # scores must skip what the scaler skips: the callback reads state.step_finite
                self.step_finite = grads_finite(params)
                after_backward(self.step)
            if self.cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self._clip_params, self.cfg.max_grad_norm)
            f = min(1.0, (self.step + 1) / max(1, self.warmup)) if self.constant_lr else \
                lr_factor(self.step, self.total_steps, self.warmup)
            for g in self.optimizer.param_groups:
                g["lr"] = g["base_lr"] * f
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            if i < 3 or self.step % 50 == 0:  # cheap, but no need on every step
                self.memory.record(self.model, self.optimizer, self.extras.values())
            self.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.step_times.append(time.perf_counter() - t0)
            self.step += 1
            bar.update(1)
            if self.step % max(1, self.cfg.log_every) == 0:
                bar.set_postfix(loss=f"{loss_value:.4f}")
                lr = self.cfg.lr * self.lr_scale * f
                self.history.append({"step": self.step, "loss": loss_value, "task_loss": float(task_loss), "lr": lr})
                self.metric_logger.log_dict({f"{self.desc}/loss": loss_value, f"{self.desc}/lr": lr}, self.step)
            if on_epoch_end and self.step % self.steps_per_epoch == 0:
                on_epoch_end(self.step // self.steps_per_epoch)
                self.model.train()
            if on_checkpoint and ((self.cfg.save_every and self.step % self.cfg.save_every == 0) or i == n_steps - 1):
                on_checkpoint()
                _debug_kill(desc or self.desc, self.step)
        bar.close()


def _debug_kill(phase: str, step: int) -> None:
    """Test hook: PRUNETUNE_DEBUG_KILL_AT=<phase>:<step> (e.g. fine-tune:14) SIGKILLs the process right after
    that checkpoint, the way an OOM killer or a pre-empted node would."""
    if os.environ.get("PRUNETUNE_DEBUG_KILL_AT") == f"{phase}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _is_head(name: str, hf) -> bool:
    prefix = body_path(hf)
    return bool(prefix) and not name.startswith(prefix + ".") and not name.startswith(("masks.", "adapters."))


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    preds, labels = [], []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        y = batch.pop("labels")
        logits = model(**batch).logits
        preds.append(logits.float().cpu().numpy())
        labels.append(y.cpu().numpy())
    return np.concatenate(preds), np.concatenate(labels)


def evaluate(model: nn.Module, loader: DataLoader, task, device: torch.device) -> dict[str, float]:
    if getattr(task, "causal_lm", False):  # token-level dev loss / perplexity (no logits gathered)
        from ..data.causal import evaluate_causal

        return evaluate_causal(model, loader, device)
    preds, labels = predict(model, loader, device)
    return compute_metrics(task, preds, labels)
