"""Label-stratified subsets (PrunePEFT warm-up and low-fidelity search)."""
from __future__ import annotations

import math
import random

from .base import EncodedDataset


def stratified_subset(dataset: EncodedDataset, size: float, seed: int = 0) -> EncodedDataset:
    """`size` < 1: that fraction of the rows; >= 1: that many rows (capped). Classes keep their proportions
    (at least one row each); regression targets are stratified by quintile."""
    return stratified_split(dataset, size, seed)[0]


def stratified_split(dataset: EncodedDataset, size: float, seed: int = 0) -> tuple[EncodedDataset, EncodedDataset]:
    """(the stratified subset of `stratified_subset`, every other row): e.g. a held-out split of training data."""
    n = len(dataset)
    want = min(n, max(1, int(round(size * n)) if size < 1 else int(size)))
    if want >= n:
        return dataset, EncodedDataset([])
    labels = [item["labels"] for item in dataset.items]
    if any(isinstance(y, float) for y in labels):
        order = sorted(range(n), key=lambda i: labels[i])
        strata_of = {i: 5 * rank // n for rank, i in enumerate(order)}
    else:
        strata_of = {i: labels[i] for i in range(n)}
    strata: dict = {}
    for i in range(n):
        strata.setdefault(strata_of[i], []).append(i)
    rng = random.Random(seed)
    picked: list[int] = []
    for key in sorted(strata):
        members = strata[key]
        rng.shuffle(members)
        picked += members[: max(1, math.floor(want * len(members) / n))]
    taken = set(picked)
    rest = [i for key in sorted(strata) for i in strata[key] if i not in taken]
    rng.shuffle(rest)
    picked += rest[: max(0, want - len(picked))]
    chosen = set(picked[:want])
    return (EncodedDataset([dataset.items[i] for i in sorted(chosen)]),
            EncodedDataset([item for i, item in enumerate(dataset.items) if i not in chosen]))
