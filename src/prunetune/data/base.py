"""Data types shared by the task loaders, causal-LM data and metrics (imports nothing else from data/)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

LOWER_IS_BETTER = {"loss", "perplexity"}


def greater_is_better(metric: str) -> bool:
    """Whether a larger value of `metric` is better (False for loss / perplexity)."""
    return metric not in LOWER_IS_BETTER


Row = dict  # {"text": str, "text_pair": str | None, "label": int | float}


@dataclass
class Task:
    name: str
    text_fields: list[str]
    num_labels: int  # 1 = regression
    metric: str  # main metric key in compute_metrics' output
    label_names: list[str] | None = None
    causal_lm: bool = False  # causal-LM fine-tuning (data/causal.py): token labels, loss / perplexity

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def greater_is_better(self) -> bool:
        """Direction of the main metric (perplexity / loss: lower is better)."""
        return greater_is_better(self.metric)


class EncodedDataset(torch.utils.data.Dataset):
    """A list of tokenized examples (dicts of python lists/ints/floats)."""

    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]
