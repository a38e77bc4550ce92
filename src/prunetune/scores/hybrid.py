"""PrunePEFT hybrid scoring: blocks (unit type x depth band), per-block criteria, and their combination.

Default combination ("calibrated"): every criterion's scores become percentile ranks over the alive units
(random tie-breaking); a unit's statistic is the mean of its block's criteria percentiles, and its hybrid score
is the rank of that statistic among the same statistic of EVERY alive unit (the same criteria applied to all),
with a seeded uniform tie-break inside the rank's cell. Under a null where no unit is better than another
(exchangeable units) each unit's hybrid score is then uniform on [0, 1] whatever its block's criteria are and
however correlated they are (real criteria are: gradient vs taylor Spearman 0.94), so blocks are pruned in
proportion to their size; real signal shifts that. (An analytical calibration, e.g. the Irwin-Hall CDF of a mean
of m uniforms, holds only for independent criteria: at rho = 0.8 a 4-criterion block lost 1.42x its share.)
Criteria whose scale follows a unit's parametrisation (criteria.WEIGHT_SPACE: LoRA's kaiming A against an
adapter's small init) are ranked within the unit's type only. A criterion that cannot tell a unit from the
others it is ranked against (all tied, e.g. `zeros` on trained weights, or a type's last unit) is left out
of that unit's mean; a unit left with none gets a uniform draw. "eq1" is the paper's Eq. 1, kept as an option.
"""
from __future__ import annotations

import bisect

import torch

SPINDLE_BANDS = (0.2, 0.5, 0.8)  # 0-20 / 20-50 / 50-80 / 80-100 % of depth


def band(layer: int, num_layers: int, edges=SPINDLE_BANDS) -> int:
    return bisect.bisect_right(list(edges), layer / max(1, num_layers))


def block_of(unit_type: str, layer: int, num_layers: int, edges=SPINDLE_BANDS) -> str:
    return f"{unit_type}/b{band(layer, num_layers, edges)}"


def percentiles(scores: dict[str, float], generator: torch.Generator) -> dict[str, float]:
    """(rank + 0.5) / n ascending; ties broken at random (seeded)."""
    names = sorted(scores)
    jitter = torch.rand(len(names), generator=generator).tolist()
    order = sorted(range(len(names)), key=lambda i: (scores[names[i]], jitter[i]))
    n = len(names)
    return {names[i]: (r + 0.5) / n for r, i in enumerate(order)}


def _groups(units: list[str], unit_type: dict[str, str] | None, within_type: bool) -> list[list[str]]:
    if not within_type or unit_type is None:
        return [units]
    by_type: dict[str, list[str]] = {}
    for u in units:
        by_type.setdefault(unit_type[u], []).append(u)
    return list(by_type.values())


def informative(scores: dict[str, dict[str, float]], units: list[str], unit_type: dict[str, str] | None = None,
                within_type: set[str] = frozenset()) -> dict[str, set[str]]:
    """criterion -> the units it can rank: those in a comparison group (all units, or the unit's type for
    `within_type` criteria) whose scores are not all equal."""
    out = {}
    for c, s in scores.items():
        out[c] = {u for grp in _groups(units, unit_type, c in within_type) if len({s[v] for v in grp}) > 1
                  for u in grp}
    return out


def combine(scores: dict[str, dict[str, float]], unit_block: dict[str, str], block_criteria: dict[str, list[str]],
            method: str = "calibrated", generator: torch.Generator | None = None,
            unit_type: dict[str, str] | None = None, within_type: set[str] = frozenset(),
            can: dict[str, set[str]] | None = None) -> dict[str, float]:
    """scores: criterion -> unit -> raw score. Returns unit -> hybrid score (lower = prune first).
    unit_type + within_type: criteria ranked within each unit type instead of over all units.
    can: `informative(...)` of the same arguments when the caller has it already."""
    g = generator or torch.Generator().manual_seed(0)
    units = sorted(unit_block)
    if method == "calibrated":
        pct: dict[str, dict[str, float]] = {}
        for c, s in scores.items():
            pct[c] = {}
            for grp in _groups(units, unit_type, c in within_type):
                pct[c].update(percentiles({u: s[u] for u in grp}, g))
        can = can if can is not None else informative(scores, units, unit_type, within_type)
        draws = torch.rand(len(units), generator=g).tolist()  # tie-break in the rank's cell, or a unit's draw
        crits = {u: tuple(c for c in block_criteria[unit_block[u]] if u in can[c]) for u in units}
        stats = {}  # criteria set -> every unit's mean percentile under it (computed once per distinct set)
        out = {}
        for u, draw in zip(units, draws):
            if not crits[u]:
                out[u] = draw  # no criterion can rank this unit: uniform, like everyone's score under the null
                continue
            if crits[u] not in stats:
                stats[crits[u]] = {v: sum(pct[c][v] for c in crits[u]) / len(crits[u]) for v in units}
            st = stats[crits[u]]
            below = sum(st[v] < st[u] for v in units)
            tied = sum(st[v] == st[u] for v in units)  # u itself included: its rank is uniform over the tied cell
            out[u] = (below + draw * tied) / len(units)
        return out
    if method == "eq1":
        return _eq1(scores, unit_block, block_criteria, units)
    raise ValueError(f"unknown combination '{method}' (calibrated | eq1)")


def _eq1(scores, unit_block, block_criteria, units) -> dict[str, float]:
    """Paper Eq. 1 as we read it: per criterion S, Theta = prune-worthiness (1 - min-max scaled score),
    k = sigmoid(rank of m under S by prune-worthiness), p = softmax over units of k * Theta; a unit's p is
    averaged over its block's criteria. Returns -p (lower = prune first)."""
    p: dict[str, dict[str, float]] = {}
    for c, s in scores.items():
        vals = torch.tensor([s[u] for u in units], dtype=torch.float64)
        span = (vals.max() - vals.min()).clamp_min(1e-12)
        theta = 1 - (vals - vals.min()) / span
        rank = torch.empty_like(theta)
        rank[torch.argsort(theta)] = torch.arange(len(units), dtype=torch.float64)
        k = torch.sigmoid(rank / max(1, len(units) - 1))
        probs = torch.softmax(k * theta, 0)
        p[c] = {u: float(probs[i]) for i, u in enumerate(units)}
    return {u: -sum(p[c][u] for c in block_criteria[unit_block[u]]) / len(block_criteria[unit_block[u]]) for u in units}


def lowest(hybrid: dict[str, float], k: int) -> list[str]:
    return [u for u, _ in sorted(hybrid.items(), key=lambda kv: (kv[1], kv[0]))[:k]]


def assign_criteria(counts: dict[str, dict[str, int]], blocks: list[str],
                    fallback: list[str] | None = None) -> dict[str, list[str]]:
    """Warm-up result -> block criteria. counts: criterion -> block -> units that criterion pruned there.
    Each block gets its most frequent criterion(s) (ties keep all); each criterion is also added to the
    block it prunes most. A block no criterion pruned gets `fallback` (default: every criterion)."""
    crits = sorted(counts)
    mapping = {}
    for b in blocks:
        best = max(counts[c].get(b, 0) for c in crits)
        mapping[b] = [c for c in crits if counts[c].get(b, 0) == best] if best or not fallback else list(fallback)
    for c in crits:
        top = max((counts[c].get(b, 0) for b in blocks), default=0)
        if top > 0:
            for b in blocks:
                if counts[c].get(b, 0) == top and c not in mapping[b]:
                    mapping[b].append(c)
    return {b: sorted(v) for b, v in mapping.items()}
