"""The pruning plan: what survives, JSON-serialisable, computed with deterministic top-k counts."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import PrunetuneError
from .io import atomic_write_text

PLAN_VERSION = 1


@dataclass
class PruningPlan:
    family: str
    model_type: str
    num_layers: int
    num_units: int  # head units per layer before pruning (KV groups on GQA)
    heads_per_unit: int
    head_dim: int
    intermediate_size: int
    kept_heads: list[list[int]]  # per layer: kept head-unit indices (sorted)
    kept_neurons: list[list[int]]  # per layer: kept FFN neuron indices (sorted)
    peft_kind: str = "lora"
    peft_ranks: dict[str, list[int]] = field(default_factory=dict)  # module -> kept rank (adapter unit) indices
    peft_orig_ranks: dict[str, int] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    version: int = PLAN_VERSION

    # ---- derived ---------------------------------------------------------------------------------
    def uniform_heads(self) -> int | None:
        counts = {len(k) for k in self.kept_heads}
        return counts.pop() if len(counts) == 1 else None

    def uniform_neurons(self) -> int | None:
        counts = {len(k) for k in self.kept_neurons}
        return counts.pop() if len(counts) == 1 else None

    def heads_pruned(self) -> bool:
        return any(len(k) < self.num_units for k in self.kept_heads)

    def ffn_pruned(self) -> bool:
        return any(len(k) < self.intermediate_size for k in self.kept_neurons)

    def summary(self) -> dict:
        heads = sum(len(k) for k in self.kept_heads)
        neurons = sum(len(k) for k in self.kept_neurons)
        ranks = sum(len(v) for v in self.peft_ranks.values())
        return {
            "heads_kept": f"{heads * self.heads_per_unit}/{self.num_layers * self.num_units * self.heads_per_unit}",
            "neurons_kept": f"{neurons}/{self.num_layers * self.intermediate_size}",
            "peft_modules_kept": f"{len(self.peft_ranks)}/{len(self.peft_orig_ranks)}",
            "peft_ranks_kept": f"{ranks}/{sum(self.peft_orig_ranks.values())}",
        }

    @classmethod
    def unpruned(cls, arch, model_type: str = "", peft_kind: str = "searched") -> "PruningPlan":
        """A plan that keeps everything (exports of unpruned bases go through the same format)."""
        return cls(arch.family, model_type, arch.num_layers, arch.num_units, arch.heads_per_unit, arch.head_dim,
                   arch.intermediate_size, [list(range(arch.num_units)) for _ in arch.layers],
                   [list(range(arch.intermediate_size)) for _ in arch.layers], peft_kind=peft_kind)

    # ---- io ----------------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_json())

    @classmethod
    def from_dict(cls, data: dict) -> "PruningPlan":
        try:
            plan = cls(**data)
        except TypeError as exc:
            raise PrunetuneError(f"not a prunetune pruning plan: {exc}") from None
        if plan.version != PLAN_VERSION:
            raise PrunetuneError(f"pruning plan version {plan.version} is not supported (expected {PLAN_VERSION})")
        return plan

    @classmethod
    def load(cls, path: str | Path) -> "PruningPlan":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise PrunetuneError(f"cannot read pruning plan {path}: {exc}") from None

    def check_matches(self, arch) -> None:
        """Refuse a plan made for another model shape."""
        mine = (self.family, self.num_layers, self.num_units, self.heads_per_unit, self.head_dim, self.intermediate_size)
        theirs = (arch.family, arch.num_layers, arch.num_units, arch.heads_per_unit, arch.head_dim, arch.intermediate_size)
        if mine != theirs:
            raise PrunetuneError(
                "pruning plan does not match this model: plan (family, layers, head units, heads/unit, head_dim, ffn) = "
                f"{mine}, model = {theirs}"
            )


# ---- selection (fractions are of units REMOVED; counts are round(rho * N)) --------------------------------
def n_remove(rho: float, n: int) -> int:
    return int(math.floor(rho * n + 0.5))


def keep_topk(scores: torch.Tensor, n_keep: int) -> list[int]:
    """Indices of the n_keep largest scores, sorted; ties broken by lower index (deterministic)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:n_keep])


def select_heads(masks: list[torch.Tensor], rho: float) -> list[list[int]]:
    """Per layer, remove the rho fraction of head units with the smallest (signed) mask; keep >= 1."""
    return [keep_topk(m, max(1, len(m) - n_remove(rho, len(m)))) for m in masks]


def select_neurons(masks: list[torch.Tensor], rho: float, scope: str = "global", floor: float = 0.05) -> list[list[int]]:
    if scope == "layer":
        return [keep_topk(m, max(1, len(m) - n_remove(rho, len(m)))) for m in masks]
    total = sum(len(m) for m in masks)
    budget = n_remove(rho, total)
    min_keep = [max(1, math.ceil(floor * len(m))) for m in masks]
    kept = [len(m) for m in masks]
    removed: list[set[int]] = [set() for _ in masks]
    flat = sorted(((float(v), l, j) for l, m in enumerate(masks) for j, v in enumerate(m.tolist())))
    for _v, l, j in flat:
        if budget == 0:
            break
        if kept[l] > min_keep[l]:
            removed[l].add(j)
            kept[l] -= 1
            budget -= 1
    return [[j for j in range(len(m)) if j not in removed[l]] for l, m in enumerate(masks)]


def select_modules(importance: dict[str, float], rho: float) -> list[str]:
    """Globally keep the PEFT modules with the highest importance (at least one)."""
    names = sorted(importance)
    keep = max(1, len(names) - n_remove(rho, len(names)))
    order = sorted(names, key=lambda n: (-importance[n], names.index(n)))
    return sorted(order[:keep], key=names.index)


def select_ranks(rank_scores: dict[str, torch.Tensor], modules: list[str], rho: float) -> dict[str, list[int]]:
    """Globally remove the rho fraction of ranks (over surviving modules); modules left empty are dropped."""
    flat = sorted((float(rank_scores[n][i]), modules.index(n), i) for n in modules for i in range(len(rank_scores[n])))
    drop = {(m, i) for _s, m, i in flat[: min(n_remove(rho, len(flat)), len(flat) - 1)]}  # keep >= 1 (PEFT needs a module)
    out = {}
    for mi, n in enumerate(modules):
        kept = [i for i in range(len(rank_scores[n])) if (mi, i) not in drop]
        if kept:
            out[n] = kept
    return out


def make_plan(arch, head_masks, ffn_masks, module_importance: dict[str, float], rank_importance: dict[str, torch.Tensor],
              heads: float, ffn: float, modules: float, ranks: float, ffn_scope: str = "global", ffn_floor: float = 0.05,
              peft_kind: str = "lora", model_type: str = "", meta: dict | None = None) -> PruningPlan:
    """Phase 2 of Light-PEFT: heads per layer, neurons globally, PEFT modules globally, then ranks globally."""
    kept_modules = select_modules(module_importance, modules)
    return PruningPlan(
        family=arch.family,
        model_type=model_type,
        num_layers=arch.num_layers,
        num_units=arch.num_units,
        heads_per_unit=arch.heads_per_unit,
        head_dim=arch.head_dim,
        intermediate_size=arch.intermediate_size,
        kept_heads=select_heads(head_masks, heads),
        kept_neurons=select_neurons(ffn_masks, ffn, ffn_scope, ffn_floor),
        peft_kind=peft_kind,
        peft_ranks=select_ranks(rank_importance, kept_modules, ranks),
        peft_orig_ranks={n: len(v) for n, v in rank_importance.items()},
        meta=meta or {},
    )
