"""PrunePEFT hybrid scoring: blocks (unit type x depth band), per-block criteria, and their combination.

Default combination ("calibrated"): every criterion's scores become global percentile ranks over the alive
units (random tie-breaking, so all-tied criteria carry no structural bias); a unit's hybrid score is the mean
of its block's criteria percentiles, mapped through the Irwin-Hall CDF of a mean of m uniforms. Under
i.i.d. scores every unit's hybrid score is then uniform on [0, 1] whatever m its block has, so blocks are
pruned in proportion to their size; real signal shifts that. "eq1" is the paper's Eq. 1, kept as an option.
"""
from __future__ import annotations

import bisect
import math

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


def irwin_hall_mean_cdf(x: float, m: int) -> float:
    """P(mean of m i.i.d. U(0,1) <= x)."""
    s = x * m
    if s <= 0:
        return 0.0
    if s >= m:
        return 1.0
    total = sum((-1) ** k * math.comb(m, k) * (s - k) ** m for k in range(int(math.floor(s)) + 1))
    return min(1.0, max(0.0, total / math.factorial(m)))


def combine(scores: dict[str, dict[str, float]], unit_block: dict[str, str], block_criteria: dict[str, list[str]],
            method: str = "calibrated", generator: torch.Generator | None = None) -> dict[str, float]:
    """scores: criterion -> unit -> raw score. Returns unit -> hybrid score (lower = prune first)."""
    g = generator or torch.Generator().manual_seed(0)
    units = sorted(unit_block)
    if method == "calibrated":
        pct = {c: percentiles({u: s[u] for u in units}, g) for c, s in scores.items()}
        out = {}
        for u in units:
            crits = block_criteria[unit_block[u]]
            out[u] = irwin_hall_mean_cdf(sum(pct[c][u] for c in crits) / len(crits), len(crits))
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


def assign_criteria(counts: dict[str, dict[str, int]], blocks: list[str]) -> dict[str, list[str]]:
    """Warm-up result -> block criteria. counts: criterion -> block -> units that criterion pruned there.
    Each block gets its most frequent criterion(s) (ties keep all); each criterion is also added to the
    block it prunes most."""
    crits = sorted(counts)
    mapping = {}
    for b in blocks:
        best = max(counts[c].get(b, 0) for c in crits)
        mapping[b] = [c for c in crits if counts[c].get(b, 0) == best]
    for c in crits:
        top = max((counts[c].get(b, 0) for b in blocks), default=0)
        if top > 0:
            for b in blocks:
                if counts[c].get(b, 0) == top and c not in mapping[b]:
                    mapping[b].append(c)
    return {b: sorted(v) for b, v in mapping.items()}
