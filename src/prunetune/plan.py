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
        if not isinstance(data, dict):
            raise PrunetuneError(f"not a prunetune pruning plan: expected a JSON object, got {type(data).__name__}")
        try:
            plan = cls(**data)
        except TypeError as exc:
            raise PrunetuneError(f"not a prunetune pruning plan: {exc}") from None
        if plan.version != PLAN_VERSION:
            raise PrunetuneError(f"pruning plan version {plan.version} is not supported (expected {PLAN_VERSION})")
        plan.validate()
        return plan

    def validate(self) -> None:
        """Types and ranges of every field surgery indexes with: a hand-edited or damaged plan is refused with
        one clear message instead of an IndexError (or a silently wrong model) later."""
        def bad(msg: str):
            raise PrunetuneError(f"malformed pruning plan: {msg}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def indices(where: str, values, limit: int) -> None:
            if not isinstance(values, list) or not all(is_int(v) for v in values):
                bad(f"{where} must be a list of integers, got {values!r}"[:300])
            if any(v < 0 or v >= limit for v in values):
                bad(f"{where} has indices outside 0..{limit - 1}: {[v for v in values if v < 0 or v >= limit][:5]}")
            if values != sorted(set(values)):
                bad(f"{where} must be sorted without repeats")

        for key in ("family", "model_type", "peft_kind"):
            if not isinstance(getattr(self, key), str):
                bad(f"{key} must be a string, got {getattr(self, key)!r}")
        for key in ("num_layers", "num_units", "heads_per_unit", "head_dim", "intermediate_size"):
            if not is_int(getattr(self, key)) or getattr(self, key) < 1:
                bad(f"{key} must be a positive integer, got {getattr(self, key)!r}")
        for key, limit in (("kept_heads", self.num_units), ("kept_neurons", self.intermediate_size)):
            per_layer = getattr(self, key)
            if not isinstance(per_layer, list) or len(per_layer) != self.num_layers:
                n = len(per_layer) if isinstance(per_layer, list) else type(per_layer).__name__
                bad(f"{key} must list {self.num_layers} layers (num_layers), got {n}")
            for i, kept in enumerate(per_layer):
                indices(f"{key}[{i}]", kept, limit)
        if not isinstance(self.peft_orig_ranks, dict) or not all(
                isinstance(k, str) and is_int(v) and v >= 1 for k, v in self.peft_orig_ranks.items()):
            bad("peft_orig_ranks must map module names to positive ranks")
        if not isinstance(self.peft_ranks, dict):
            bad("peft_ranks must map module names to kept rank indices")
        for name, kept in self.peft_ranks.items():
            if name not in self.peft_orig_ranks:
                bad(f"peft_ranks names {name!r}, which peft_orig_ranks does not list")
            indices(f"peft_ranks[{name!r}]", kept, self.peft_orig_ranks[name])
        if not isinstance(self.meta, dict):
            bad("meta must be an object")

    @classmethod
    def load(cls, path: str | Path) -> "PruningPlan":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, UnicodeDecodeError, RecursionError, json.JSONDecodeError) as exc:
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


def _check_finite(what: str, scores: dict) -> None:
    bad = [name for name, v in scores.items() if not bool(torch.isfinite(torch.as_tensor(v, dtype=torch.float64)).all())]
    if bad:
        raise PrunetuneError(f"cannot make a pruning plan: the {what} scores of {', '.join(bad[:3])}"
                             f"{' and others' if len(bad) > 3 else ''} are not finite (NaN/inf): the estimation "
                             "diverged (lower train.lr, or use train.mixed_precision=bf16 instead of fp16)")


@dataclass
class Scores:
    """What a plan is made from: per layer a score per head unit (`head`) and per FFN neuron (`ffn`), a score
    per PEFT module (`module`) and per rank of each module (`rank`). Higher = more important.

    >>> import torch
    >>> s = Scores(head=[torch.tensor([0.1, 0.9])], ffn=[torch.rand(4)], module={"q": 1.0}, rank={"q": torch.ones(2)})
    >>> len(s.head), sorted(s.module)
    (1, ['q'])
    """
    head: list
    ffn: list
    module: dict[str, float]
    rank: dict[str, torch.Tensor]


def make_plan(*, arch, scores: Scores, heads: float, ffn: float, modules: float, ranks: float,
              ffn_scope: str = "global", ffn_floor: float = 0.05, peft_kind: str = "lora", model_type: str = "",
              meta: dict | None = None) -> PruningPlan:
    """Phase 2 of Light-PEFT (the paper's fixed ratios, fractions REMOVED): heads per layer, neurons globally,
    PEFT modules globally, then ranks globally."""
    head_masks, ffn_masks = scores.head, scores.ffn
    module_importance, rank_importance = scores.module, scores.rank
    # a NaN sorts anywhere: non-finite scores would silently become a keep-by-index plan
    _check_finite("head", {f"layer {i}": m for i, m in enumerate(head_masks)})
    _check_finite("FFN neuron", {f"layer {i}": m for i, m in enumerate(ffn_masks)})
    _check_finite("PEFT module", module_importance)
    _check_finite("PEFT rank", rank_importance)
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


# ---- target mode: heads, neurons, PEFT modules and ranks chosen jointly (prune.target_speedup / target_params) ----
#
# What the allocation assumes. Every score it spends is a first-order Taylor estimate of the task-loss change of
# removing the unit, averaged over the estimation window (same units: loss per step): heads and neurons
# |m dL/dm| of their structure mask, PEFT ranks |sum_o B dL/dB| of the rank, PEFT modules |sum B dL/dB| of the
# whole module. Config validation therefore refuses target mode unless all three scores are "taylor". Removal
# costs are taken as additive (first order: the loss change of a set is the sum of its members' changes).
# Caveat: a LoRA module's Taylor score is the loss of dropping its *current* delta, not of never training it
# (B starts at 0), so PEFT units look cheap early; the estimation window sits at the end of t' for that reason.
#
# Algorithm. The backward saving of removing PEFT modules is not additive: it depends on the lowest block that
# keeps a trainable module (the cut). So the cut c is enumerated exactly (every block that holds a module): all
# modules below c are removed (their loss is charged), the most important module of block c is kept. Given c,
# every unit's time saving is fixed and the problem is a covering knapsack (remove units of least total loss
# whose savings reach the target), solved greedily by loss per second saved, then a pass that puts back the most
# important removals the target does not need. Greedy rather than an exact DP: units are tiny next to the budget
# (one neuron ~1e-4 of a step) and within a layer all units cost the same, so the greedy order is the
# per-layer importance order and its loss exceeds the LP lower bound by at most one unit's loss (tests check this
# against brute force); an exact DP over 10^4-10^5 neurons x a time grid x 2L cuts would cost seconds to minutes
# and still be exact only up to its grid. The plan is then re-predicted exactly (pruned LoRA dims, cut) and the
# requirement raised by any shortfall.

@dataclass(slots=True)
class _Pick:
    kind: str  # head | neuron | tier_h | tier_f | module | rank
    group: object  # layer, module name or None (tiers)
    index: int
    importance: float
    saving: float


def _greedy(items: list[_Pick], caps: dict, need: float, module_extra: dict, module_ranks: dict,
            allow_short: bool = False, totals: dict | None = None, layer_caps: dict | None = None):
    """Take items by importance per saving until `need` is saved. caps: (kind, group) -> max removals; totals:
    kind -> max removals over all groups (a module gone with its last rank counts as a module); layer_caps:
    (module -> its layer, layer -> max modules removed there) or None.
    module_extra: module -> saving of its overhead (earned when its last rank goes, or with the module item).
    Returns (taken items, saved) or None when the items cannot reach `need`."""
    order = sorted(items, key=lambda p: (p.importance / p.saving, p.kind, str(p.group), p.index))
    totals = totals or {}
    kind_counts: dict = {}
    layer_of, per_layer = layer_caps or ({}, {})
    layer_gone: dict = {}

    def room(kind: str, module: str | None = None) -> bool:
        if module is not None and module in layer_of and \
                layer_gone.get(layer_of[module], 0) >= per_layer[layer_of[module]]:
            return False
        return kind not in totals or kind_counts.get(kind, 0) < totals[kind]

    def module_gone(module: str) -> None:
        gone_modules.add(module)
        kind_counts["module"] = kind_counts.get("module", 0) + 1
        if module in layer_of:
            layer_gone[layer_of[module]] = layer_gone.get(layer_of[module], 0) + 1

    counts: dict = {}
    gone_modules: set = set()
    taken: list[_Pick] = []
    saved = 0.0
    rank_saving = {p.group: p.saving for p in items if p.kind == "rank"}
    for p in order:
        if saved >= need:
            break
        key = (p.kind, p.group)
        if p.kind == "module":
            if p.group in gone_modules or not room("module", p.group):
                continue
            left = module_ranks[p.group] - counts.get(("rank", p.group), 0)
            module_gone(p.group)
            saved += module_extra[p.group] + left * rank_saving.get(p.group, 0.0)
        elif p.kind == "rank" and p.group in gone_modules:
            continue
        elif counts.get(key, 0) >= caps.get(key, 0) or not room(p.kind):
            continue
        elif p.kind == "rank" and counts.get(key, 0) + 1 == module_ranks[p.group] and not room("module", p.group):
            continue  # its last rank would remove the module past the module bound (or its layer's floor)
        else:
            counts[key] = counts.get(key, 0) + 1
            kind_counts[p.kind] = kind_counts.get(p.kind, 0) + 1
            saved += p.saving
            if p.kind == "rank" and counts[key] == module_ranks[p.group]:
                module_gone(p.group)  # every rank removed: the module goes, with its overhead
                saved += module_extra[p.group]
        taken.append(p)
    if saved < need:
        return (taken, saved) if allow_short else None
    # put back the most important removals the target does not need (not modules, not a module's last rank)
    for p in sorted(taken, key=lambda p: (-p.importance, p.kind, str(p.group), -p.index)):
        if p.kind == "module" or (p.kind == "rank" and p.group in gone_modules):
            continue
        if p.kind.startswith("tier") and any(q.kind == p.kind and q.index > p.index for q in taken):
            continue  # uniform tiers stay contiguous (tier k = the k-th least important unit of every layer)
        if saved - p.saving >= need:
            taken.remove(p)
            saved -= p.saving
    return taken, saved


def _lora_shrink(cost, arch, alive: dict[str, int], cut: int) -> tuple[list[float], list[float]]:
    """Per layer: what one head unit / neuron less saves in the LoRA factors on its projections (q/k/v/o lose
    output / input width with a head, up/gate/down with a neuron), assuming those modules keep their ranks."""
    sec = cost.rates.seconds
    heads, neurons = [0.0] * arch.num_layers, [0.0] * arch.num_layers
    U, inter = arch.num_units, arch.intermediate_size
    for m, r in alive.items():
        layer, role = arch.role_of(m)
        if role in ("q", "k", "v", "o"):
            full, less = {"units": U}, {"units": U - 1}
            target = heads
        else:
            full, less = {"neurons": inter}, {"neurons": inter - 1}
            target = neurons
        target[layer] += r * (sec(cost.rank_work(m, cut=cut, **full)) - sec(cost.rank_work(m, cut=cut, **less))) + \
            sec(cost.module_work(m, **full)) - sec(cost.module_work(m, **less))
    return heads, neurons


def _sorted_idx(scores: list[float]) -> list[int]:
    """Unit indices by increasing importance, ties by index (deterministic)."""
    return sorted(range(len(scores)), key=lambda j: (scores[j], j))


def make_target_plan(*, arch, cost, scores: Scores, target_speedup: float | None = None,
                     target_params: float | None = None, body_params: int | None = None, uniform: bool = False,
                     ffn_floor: float = 0.05, peft_kind: str = "lora", model_type: str = "",
                     meta: dict | None = None, bounds: dict | None = None, backward_cut: bool = True,
                     module_floor: int = 0) -> PruningPlan:
    """The least-estimated-loss plan whose predicted step speedup (cost model) reaches target_speedup, or whose
    base (body) parameters are at most target_params of body_params. Constraints: >= 1 head unit per layer,
    >= ffn_floor of each layer's neurons, >= 1 PEFT module; uniform: the same head / neuron count in every layer
    (exports load with plain from_pretrained where the config can say so). bounds: the most of each type the
    plan may remove, as fixed-ratio fractions {"heads": per layer, "ffn": of all neurons (per layer if uniform),
    "modules": of all PEFT modules, "ranks": of all PEFT ranks, removed within kept modules}; a missing key is
    unbounded. backward_cut=False keeps a PEFT module in the lowest block that has one (the backward pass still
    reaches it: no plan buys speed by freezing the lower layers' adaptation). module_floor: every layer keeps at
    least this many of its PEFT modules (all it has, if fewer), so the modules kept are spread over the depth
    (a backward cut may then not empty a layer). With bounds the greedy is no longer within one unit of the
    optimum (a cardinality cap per type makes it a multi-constraint knapsack); tests bound its gap against brute
    force."""
    head_scores, ffn_scores, module_importance, rank_importance = scores.head, scores.ffn, scores.module, scores.rank
    if (target_speedup is None) == (target_params is None):
        raise PrunetuneError("target mode needs exactly one of prune.target_speedup and prune.target_params")
    L, U, inter = arch.num_layers, arch.num_units, arch.intermediate_size
    # plain floats once: indexing tensors element by element dominates the run time otherwise
    head_scores = [[float(v) for v in torch.as_tensor(s).tolist()] for s in head_scores]
    ffn_scores = [[float(v) for v in torch.as_tensor(s).tolist()] for s in ffn_scores]
    rank_importance = {m: [float(v) for v in torch.as_tensor(s).tolist()] for m, s in rank_importance.items()}
    modules = sorted(rank_importance)
    ranks_full = {m: len(rank_importance[m]) for m in modules}
    ffn_cap = inter - max(1, math.ceil(ffn_floor * inter))
    h_order = [_sorted_idx(s) for s in head_scores]
    f_order = [_sorted_idx(s) for s in ffn_scores]
    sec = cost.rates.seconds
    bounds = {k: v for k, v in (bounds or {}).items() if v is not None}
    head_cap = min(U - 1, n_remove(bounds["heads"], U)) if "heads" in bounds else U - 1
    if "ffn" in bounds and uniform:
        ffn_cap = min(ffn_cap, n_remove(bounds["ffn"], inter))
    structure_totals = {"neuron": n_remove(bounds["ffn"], L * inter)} if "ffn" in bounds and not uniform else {}

    def structure_items(head_saving, neuron_saving):
        hs, ns = [head_saving(l) for l in range(L)], [neuron_saving(l) for l in range(L)]
        head_saving, neuron_saving = hs.__getitem__, ns.__getitem__  # one evaluation per layer, not per unit
        items, caps = [], {}
        if uniform:
            for k in range(head_cap):
                items.append(_Pick("tier_h", None, k, sum(head_scores[l][h_order[l][k]] for l in range(L)),
                                   sum(head_saving(l) for l in range(L))))
            for k in range(ffn_cap):
                items.append(_Pick("tier_f", None, k, sum(ffn_scores[l][f_order[l][k]] for l in range(L)),
                                   sum(neuron_saving(l) for l in range(L))))
            caps[("tier_h", None)], caps[("tier_f", None)] = head_cap, ffn_cap
        else:
            for l in range(L):
                hs_l, ns_l = head_saving(l), neuron_saving(l)
                items += [_Pick("head", l, j, v, hs_l) for j, v in enumerate(head_scores[l])]
                items += [_Pick("neuron", l, j, v, ns_l) for j, v in enumerate(ffn_scores[l])]
                caps[("head", l)], caps[("neuron", l)] = head_cap, ffn_cap
        return items, caps

    def build(taken, removed_modules, cut) -> PruningPlan:
        n_heads = {l: 0 for l in range(L)}
        n_neurons = {l: 0 for l in range(L)}
        gone_ranks: dict[str, set] = {m: set() for m in modules}
        for p in taken:
            if p.kind in ("head", "neuron"):
                (n_heads if p.kind == "head" else n_neurons)[p.group] += 1
            elif p.kind == "tier_h":
                n_heads = {l: n_heads[l] + 1 for l in range(L)}
            elif p.kind == "tier_f":
                n_neurons = {l: n_neurons[l] + 1 for l in range(L)}
            elif p.kind == "module":
                removed_modules.add(p.group)
            else:
                gone_ranks[p.group].add(p.index)
        # the units removed are the least important of each layer (the greedy takes them in that order)
        kept_heads = [sorted(h_order[l][n_heads[l]:]) for l in range(L)]
        kept_neurons = [sorted(f_order[l][n_neurons[l]:]) for l in range(L)]
        peft = {}
        for m in modules:
            kept = [i for i in range(ranks_full[m]) if i not in gone_ranks[m]]
            if m not in removed_modules and kept:
                peft[m] = kept
        return PruningPlan(arch.family, model_type, L, U, arch.heads_per_unit, arch.head_dim, inter, kept_heads,
                           kept_neurons, peft_kind=peft_kind, peft_ranks=peft, peft_orig_ranks=dict(ranks_full),
                           meta=dict(meta or {}, target={"speedup": target_speedup, "params": target_params,
                                                         "cut_block": cut, "uniform": uniform}))

    if target_params is not None:  # size target: only heads and neurons hold base parameters
        if body_params is None:
            raise PrunetuneError("prune.target_params needs the base parameter count")
        need = body_params * (1.0 - target_params)
        items, caps = structure_items(lambda l: float(cost.head_params()), lambda l: float(cost.neuron_params()))
        found = _greedy(items, caps, need, {}, ranks_full, totals=structure_totals)
        if found is None:
            most = body_params - _greedy(items, caps, math.inf, {}, ranks_full, allow_short=True,
                                         totals=structure_totals)[1]
            raise PrunetuneError(f"prune.target_params={target_params} is not reachable: with >= 1 head per layer, "
                                 f"the FFN floor{' and the bounds' if bounds else ''} the base keeps at least "
                                 f"{most / body_params:.3f} of its parameters")
        return build(found[0], set(), cost.cut_of(modules))

    base = cost.unpruned().seconds
    goal = base / target_speedup
    most = 1.0

    def prepare(c: int):
        """The problem at cut c: modules below it removed (forced), the best module of block c protected."""
        forced = [m for m in modules if cost.block_of(m) < c]
        in_block = [m for m in modules if cost.block_of(m) == c]
        protected = max(in_block, key=lambda m: (module_importance.get(m, 0.0), -modules.index(m)))
        alive = {m: ranks_full[m] for m in modules if m not in forced}
        lora_h, lora_f = _lora_shrink(cost, arch, alive, c)
        items, caps = structure_items(lambda l: sec(cost._unit_work(0, 2 * l, c)) + lora_h[l],
                                      lambda l: sec(cost._unit_work(1, 2 * l + 1, c)) + lora_f[l])
        extra = {m: sec(cost.module_work(m)) for m in alive}
        for m in alive:
            rank_sec = sec(cost.rank_work(m, cut=c))
            items += [_Pick("rank", m, i, float(rank_importance[m][i]), rank_sec) for i in range(ranks_full[m])]
            caps[("rank", m)] = ranks_full[m] - (1 if m == protected else 0)
            if m != protected:
                items.append(_Pick("module", m, 0, float(module_importance.get(m, 0.0)),
                                   extra[m] + ranks_full[m] * rank_sec))
        totals = dict(structure_totals)
        layer_caps = None
        if module_floor > 0:  # removable per layer: what it has above the floor, less what the cut removed
            layer_caps = ({m: arch.role_of(m)[0] for m in alive},
                          {l: len(ms) - min(module_floor, len(ms)) - sum(m in forced for m in ms)
                           for l, ms in in_layer.items()})
        if "modules" in bounds:  # the modules below the cut count against the module bound
            totals["module"] = n_remove(bounds["modules"], len(modules)) - len(forced)
        if "ranks" in bounds:
            totals["rank"] = n_remove(bounds["ranks"], sum(ranks_full.values()))
        start = cost.step_time([U] * L, [inter] * L, alive).seconds
        return {"cut": c, "forced": set(forced), "start": start, "items": items, "caps": caps, "extra": extra,
                "totals": totals, "layer_caps": layer_caps,
                "forced_loss": sum(float(module_importance.get(m, 0.0)) for m in forced)}

    def solve(prob, margin: float):
        """(loss, taken) at this cut for `goal` plus margin seconds, or None when the cut cannot reach it."""
        need = prob["start"] - goal + margin
        found = ([], 0.0) if need <= 0 else _greedy(prob["items"], prob["caps"], need, prob["extra"], ranks_full,
                                                    totals=prob["totals"], layer_caps=prob["layer_caps"])
        if found is None:
            return None
        return prob["forced_loss"] + sum(p.importance for p in found[0]), found[0]

    def everything(prob):
        """Every removal the constraints allow at this cut (the fastest plan there)."""
        taken = _greedy(prob["items"], prob["caps"], math.inf, prob["extra"], ranks_full, allow_short=True,
                        totals=prob["totals"], layer_caps=prob["layer_caps"])[0]
        return prob["forced_loss"] + sum(p.importance for p in taken), taken

    best = None
    in_layer = {l: [m for m in modules if arch.role_of(m)[0] == l] for l in range(L)}  # for module_floor
    for c in sorted({cost.block_of(m) for m in modules})[:None if backward_cut else 1]:
        forced_loss = sum(float(module_importance.get(m, 0.0)) for m in modules if cost.block_of(m) < c)
        if best is not None and forced_loss > best[1][0]:
            break  # the forced loss only grows with the cut: no higher cut can beat the best plan found
        if "modules" in bounds and sum(cost.block_of(m) < c for m in modules) > n_remove(bounds["modules"],
                                                                                   len(modules)):
            break  # the cut alone removes more modules than the bound allows (and higher cuts remove more)
        if module_floor and any(sum(cost.block_of(m) < c for m in ms) > len(ms) - min(module_floor, len(ms))
                                for ms in in_layer.values()):
            break  # the cut removes modules a layer's floor keeps (and higher cuts remove more)
        prob = prepare(c)
        fastest = cost.predict(build(everything(prob)[1], set(prob["forced"]), c)).pruned.seconds
        most = max(most, base / fastest)
        if fastest > goal:  # exact: not even removing everything allowed at this cut reaches the target
            continue
        sol = solve(prob, 0.0) or everything(prob)
        if best is None or (sol[0], c) < (best[1][0], best[0]["cut"]):
            best = (prob, sol)
    if best is None:
        raise PrunetuneError(f"prune.target_speedup={target_speedup} is not reachable for this model and batch "
                             f"shape under the constraints (>= 1 head per layer, FFN floor, >= 1 PEFT module"
                             f"{', prune.bounds' if bounds else ''}"
                             f"{', prune.min_modules_per_layer' if module_floor else ''}): "
                             f"the cost model predicts at most about {most:.2f}x")
    prob, sol = best

    def exact_short(sol) -> float:
        return cost.predict(build(sol[1], set(prob["forced"]), prob["cut"])).pruned.seconds - goal

    # the item savings approximate the exact prediction (LoRA widths after pruning, a module whose ranks went
    # first): find the smallest extra margin at this cut whose plan meets the target exactly (grow, then bisect)
    lo, hi, short = 0.0, None, exact_short(sol)
    if short > 1e-12 * base:
        margin = short
        for _ in range(30):
            cand = solve(prob, margin) or everything(prob)  # the fastest plan meets it (checked above)
            if exact_short(cand) <= 1e-12 * base:
                hi, sol = margin, cand
                break
            lo, margin = margin, 2 * margin
        if hi is None:
            raise PrunetuneError(f"prune.target_speedup={target_speedup}: the allocation did not reach the target "
                                 "exactly; lower it slightly")
        for _ in range(12):
            mid = (lo + hi) / 2
            cand = solve(prob, mid)
            if cand is not None and exact_short(cand) <= 1e-12 * base:
                hi, sol = mid, cand
            else:
                lo = mid
    return build(sol[1], set(prob["forced"]), prob["cut"])


def allocation_summary(plan: PruningPlan, *, cost, scores: Scores) -> dict:
    """What the plan spends: per unit type the units removed, their summed Taylor loss estimate and the predicted
    step time they save (fraction of the unpruned step); per layer what went. Works for either mode."""
    head_scores, ffn_scores, module_importance, rank_importance = scores.head, scores.ffn, scores.module, scores.rank
    pred = cost.predict(plan)
    sec, base = cost.rates.seconds, pred.unpruned.seconds
    cut = pred.pruned.cut_block
    rows = {k: {"removed": 0, "of": 0, "loss": 0.0, "saved": 0.0} for k in ("heads", "neurons", "modules", "ranks")}
    layers = []
    for l in range(plan.num_layers):
        gone_h = sorted(set(range(plan.num_units)) - set(plan.kept_heads[l]))
        gone_f = sorted(set(range(plan.intermediate_size)) - set(plan.kept_neurons[l]))
        for key, gone, n, scores, half in (("heads", gone_h, plan.num_units, head_scores, 0),
                                           ("neurons", gone_f, plan.intermediate_size, ffn_scores, 1)):
            r = rows[key]
            r["removed"] += len(gone)
            r["of"] += n
            r["loss"] += float(sum(float(scores[l][j]) for j in gone))
            r["saved"] += len(gone) * sec(cost._unit_work(half, 2 * l + half, cut))
        layers.append({"layer": l, "heads_removed": len(gone_h), "neurons_removed": len(gone_f),
                       "modules_removed": [], "ranks_removed": 0})
    for m, full in plan.peft_orig_ranks.items():
        layer, role = cost.arch.role_of(m)
        kept = plan.peft_ranks.get(m)
        rows["modules"]["of"] += 1
        rows["ranks"]["of"] += full
        if kept is None:
            rows["modules"]["removed"] += 1
            rows["modules"]["loss"] += float(module_importance.get(m, 0.0))
            rows["modules"]["saved"] += sec(cost.module_work(m)) + full * sec(cost.rank_work(m))
            layers[layer]["modules_removed"].append(cost.arch.role_label(role))
        else:
            gone = [i for i in range(full) if i not in kept]
            rows["ranks"]["removed"] += len(gone)
            rows["ranks"]["loss"] += float(sum(float(rank_importance[m][i]) for i in gone))
            rows["ranks"]["saved"] += len(gone) * sec(cost.rank_work(m))
            layers[layer]["ranks_removed"] += len(gone)
    total_saved = base - pred.pruned.seconds
    rows["backward cut"] = {"removed": cut, "of": cost.num_blocks, "loss": 0.0,
                            "saved": total_saved - sum(r["saved"] for r in rows.values())}
    for r in rows.values():
        r["saved"] /= base
    return {"types": rows, "layers": layers, "predicted_speedup": pred.speedup, "cut_block": cut,
            "prediction": pred.to_dict()}
