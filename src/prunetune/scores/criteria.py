"""PrunePEFT pruning criteria, pluggable by name. One convention: LOWER score = prune first.

Static criteria read the unit's weights; dynamic ones read statistics that `ImportanceTracker`
accumulated over the round's training steps (per unit, never across units).
"""
from __future__ import annotations

import torch

CRITERIA: dict[str, callable] = {}
DYNAMIC = {"gradient", "taylor", "activation", "norm_ratio"}  # need training statistics
HELD_OUT = {"drop_loss"}  # need forward passes on held-out training rows (scores/proxy.py)
# Scale set by the unit's parametrisation (init scale, fan-in, LoRA's alpha / r), not by what it does: ranked
# within a unit type only. taylor (invariant to rescaling w -> c*w), activation and norm_ratio (the unit's
# output) compare across types.
WEIGHT_SPACE = {"zeros", "threshold", "magnitude", "gradient"}
# What a unit does, compared across types of different sizes: divided by the unit's parameter count they rank
# value per parameter of budget (the greedy knapsack order); raw, a LoRA on the 4x wider FFN outranks LoRA on q+v
# by size alone.
PER_PARAMETER = {"taylor", "activation", "norm_ratio", "drop_loss"}


def criterion(name: str):
    def deco(fn):
        CRITERIA[name] = fn
        return fn

    return deco


def _flat(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in params]) if params else torch.zeros(1)


@criterion("zeros")
def zeros(params, stats, unit, ctx) -> float:
    """-(fraction of exact zeros): units full of zeros go first."""
    return -float((_flat(params) == 0).float().mean())


@criterion("threshold")
def threshold(params, stats, unit, ctx) -> float:
    """-(fraction of weights with |w| < t)."""
    return -float((_flat(params).abs() < ctx.get("threshold", 1e-3)).float().mean())


@criterion("magnitude")
def magnitude(params, stats, unit, ctx) -> float:
    """mean w^2."""
    return float(_flat(params).pow(2).mean())


@criterion("gradient")
def gradient(params, stats, unit, ctx) -> float:
    """mean over steps of mean |g|."""
    return stats["gradient"][unit]


@criterion("taylor")
def taylor(params, stats, unit, ctx) -> float:
    """mean over steps of |sum(w * g)| over the unit's output side (LoRA B, adapter up): its removal effect."""
    return stats["taylor"][unit]


@criterion("activation")
def activation(params, stats, unit, ctx) -> float:
    """mean |unit output| over training batches."""
    return stats["activation"][unit]


@criterion("norm_ratio")
def norm_ratio(params, stats, unit, ctx) -> float:
    """Light-PEFT's ||delta(x)|| / ||base(x)||."""
    return stats["norm_ratio"][unit]


@criterion("drop_loss")
def drop_loss(params, stats, unit, ctx) -> float:
    """Held-out loss increase when the unit is switched off (forward only; no first-order approximation)."""
    return stats["drop_loss"][unit]


@criterion("random")
def random_(params, stats, unit, ctx) -> float:
    """Ablation: a seeded uniform draw."""
    return float(torch.rand(1, generator=ctx["generator"]))


def score_units(name: str, units: dict[str, list[torch.Tensor]], stats: dict | None, ctx: dict) -> dict[str, float]:
    """Scores of every unit under criterion `name` (units: unit name -> its parameters). ctx["per_parameter"]:
    PER_PARAMETER criteria divided by the unit's parameter count."""
    if name not in CRITERIA:
        raise KeyError(f"unknown criterion '{name}' (known: {', '.join(sorted(CRITERIA))})")
    scale = ctx.get("per_parameter") and name in PER_PARAMETER
    return {u: CRITERIA[name](params, stats, u, ctx) / (sum(p.numel() for p in params) if scale else 1)
            for u, params in sorted(units.items())}
