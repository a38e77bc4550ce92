"""Shared set-up for the methods: data, model + PEFT construction, parameter counting, epoch evaluation."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch

from ..arch import Arch, get_arch
from ..config import RunConfig
from ..data import encode, load_task, make_collate
from ..models import check_tokenizer_matches, load_model, load_tokenizer, resolve_model_path
from ..train import evaluate, make_loader
from ..units.adapters import AdapterSet
from ..units.lora import attach_lora, lora_config, set_head_trainable


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Context:
    cfg: RunConfig
    task: object
    tokenizer: object
    model_path: str
    train_loader: object
    dev_loader: object
    device: torch.device

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(len(self.train_loader) / self.cfg.train.grad_accum))

    @property
    def total_steps(self) -> int:
        t = self.cfg.train
        return t.max_steps or max(1, int(round(t.epochs * self.steps_per_epoch)))


def prepare(cfg: RunConfig) -> Context:
    task, train_rows, dev_rows = load_task(cfg.data)
    path = resolve_model_path(cfg.model.name_or_path)
    tok = load_tokenizer(path, cfg.model.gguf_file)
    collate = make_collate(tok)
    train_ds = encode(train_rows, tok, cfg.data.max_length)
    dev_ds = encode(dev_rows, tok, cfg.data.max_length)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return Context(cfg, task, tok, path,
                   make_loader(train_ds, collate, cfg.train.batch_size, True, cfg.train.seed),
                   make_loader(dev_ds, collate, cfg.train.eval_batch_size, False, cfg.train.seed), device)


def build_model(ctx: Context):
    """Fresh base model with PEFT attached at every candidate position (seeded: identical across runs)."""
    cfg = ctx.cfg
    seed_everything(cfg.train.seed)
    hf = load_model(ctx.model_path, ctx.task.num_labels, dtype=cfg.model.dtype, gguf_file=cfg.model.gguf_file,
                    pad_token_id=ctx.tokenizer.pad_token_id)
    check_tokenizer_matches(ctx.tokenizer, hf)
    arch = get_arch(hf)
    for p in hf.parameters():
        p.requires_grad_(False)
    if cfg.peft.kind == "lora":
        names = arch.peft_targets(cfg.peft.targets)
        model = attach_lora(hf, arch, lora_config(arch, names, cfg.peft.r, cfg.peft.alpha, cfg.peft.dropout))
        return model, hf, arch, None
    adapters = AdapterSet(arch.hidden_size, {n: cfg.peft.adapter_size for n in adapter_positions(arch)})
    adapters.attach(hf)
    set_head_trainable(hf, arch)
    return hf, hf, arch, adapters


def adapter_positions(arch: Arch) -> list[str]:
    """Serial adapters after the attention output and after the FFN output of every layer."""
    return [name for layer in arch.layers for name in (layer.o, layer.down)]


def base_param_counts(hf, arch: Arch) -> dict[str, int]:
    """Base (non-PEFT) parameters: whole body, and transformer blocks only."""
    body = blocks = 0
    block_prefix = arch.layers[0].q.rsplit(".0.", 1)[0] + "." if arch.layers else ""
    for name, p in hf.named_parameters():
        if "lora_" in name or not name.startswith(arch.body_prefix):
            continue
        body += p.numel()
        if block_prefix and name.startswith(block_prefix):
            blocks += p.numel()
    return {"body": body, "blocks": blocks}


def epoch_evaluator(ctx: Context, state, log: list):
    def on_epoch_end(epoch: int) -> None:
        metrics = evaluate(state.model, ctx.dev_loader, ctx.task, ctx.device)
        log.append({"epoch": epoch, "step": state.step, **metrics})
        main = metrics.get(ctx.task.metric)
        print(f"  epoch {epoch}: dev {ctx.task.metric} = {main:.4f}", flush=True)

    return on_epoch_end


def summarize_evals(evals: list[dict], metric: str) -> dict:
    if not evals:
        return {}
    best = max(evals, key=lambda e: e[metric])
    return {"final": evals[-1], "best": best}


def mean_step(times: list[float], skip: int = 2) -> float:
    t = times[skip:] if len(times) > skip + 2 else times
    return float(sum(t) / max(1, len(t)))
