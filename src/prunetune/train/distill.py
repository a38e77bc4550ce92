"""Distillation after surgery (prune.distill): a frozen copy of the model as it was just before surgery teaches
the pruned model its outputs while the pruned model fine-tunes.

The loss is (1 - w) * task loss + w * distillation loss:
- classification: T^2 * KL(teacher || student) of the logits softened by temperature T (Hinton et al.);
- regression (one output): the squared difference of the two predictions;
- causal LM: the same KL per response token (the positions whose next-token label is not -100).

>>> import torch
>>> s = torch.tensor([[2.0, 0.0]]); t = torch.tensor([[2.0, 0.0]])
>>> float(kd_loss(s, t, temperature=2.0))
0.0
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float, labels: torch.Tensor | None = None,
            causal: bool = False) -> torch.Tensor:
    """The distillation term for one batch of logits (see the module docstring)."""
    if causal:  # logits at position i predict token i + 1: keep the positions whose next token is scored
        keep = labels[..., 1:] != -100
        student, teacher = student[..., :-1, :][keep], teacher[..., :-1, :][keep]
        if student.numel() == 0:
            return student.sum()
    student, teacher = student.float(), teacher.float()
    if student.shape[-1] == 1:  # regression head
        return F.mse_loss(student, teacher)
    t = temperature
    return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                    reduction="batchmean") * t * t


class Distiller:
    """loss_fn for TrainState.run: (batch, student outputs) -> the loss to minimise. The teacher is a deep copy
    taken by `Distiller.of(model)`, frozen and in eval mode (no dropout: its targets are a function of the row)."""

    def __init__(self, teacher: nn.Module, *, weight: float, temperature: float, causal: bool):
        self.teacher, self.weight, self.temperature, self.causal = teacher, weight, temperature, causal
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    @classmethod
    def of(cls, model: nn.Module, **kw) -> tuple["Distiller", dict[str, torch.Tensor]]:
        """A Distiller over a copy of `model` and the copy's trained tensors by name (what a checkpoint must
        hold to rebuild the teacher: everything that trained before the copy)."""
        teacher = copy.deepcopy(model)
        trained = {n: p.detach().cpu().clone() for n, p in teacher.named_parameters() if p.requires_grad}
        return cls(teacher, **kw), trained

    @torch.no_grad()
    def load_trained(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore the teacher's trained tensors (resume after surgery: the rebuilt model has not trained)."""
        named = dict(self.teacher.named_parameters())
        for n, v in tensors.items():
            named[n].copy_(v)

    def __call__(self, batch: dict, out) -> torch.Tensor:
        with torch.no_grad():
            teacher = self.teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
        kd = kd_loss(out.logits, teacher, temperature=self.temperature, labels=batch.get("labels"),
                     causal=self.causal)
        return (1.0 - self.weight) * out.loss + self.weight * kd
