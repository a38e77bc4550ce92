"""Learnable structure masks (Light-PEFT m_A, m_F) applied with forward pre-hooks.

m_A[l] has one entry per head unit (per KV group on GQA) and scales that unit's slice of the input of the
attention output projection; m_F[l] scales each FFN neuron at the input of the down projection. Masks are
fp32 parameters initialised to 1.

Besides the learned values, the masks can score their units by first-order Taylor importance (Michel et al.,
2019): |m * dL/dm| is the first-order loss change of zeroing the unit, averaged over the estimation window.
Gradients arrive already averaged across DDP ranks, so the accumulated scores are identical on every rank.
"""
from __future__ import annotations

import torch
from torch import nn

from ..arch import Arch


class StructureMasks(nn.Module):
    def __init__(self, arch: Arch):
        super().__init__()
        self.arch = arch
        self.heads = nn.ParameterList([nn.Parameter(torch.ones(arch.num_units)) for _ in arch.layers])
        self.ffn = nn.ParameterList([nn.Parameter(torch.ones(arch.intermediate_size)) for _ in arch.layers])
        self._handles: list = []
        self.taylor_sum: dict[str, list[torch.Tensor]] = {}
        self.taylor_n = 0

    def attach(self, hf_model) -> "StructureMasks":
        """Hook the (possibly LoRA-wrapped) o and down projections, so PEFT inputs are masked too."""
        self.detach()
        unit_width = self.arch.heads_per_unit * self.arch.head_dim
        for i, layer in enumerate(self.arch.layers):
            o = hf_model.get_submodule(layer.o)
            down = hf_model.get_submodule(layer.down)
            self._handles.append(o.register_forward_pre_hook(_unit_scaler(self.heads[i], unit_width)))
            self._handles.append(down.register_forward_pre_hook(_unit_scaler(self.ffn[i], 1)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def l1(self) -> tuple[torch.Tensor, torch.Tensor]:
        heads = sum(m.abs().sum() for m in self.heads)
        ffn = sum(m.abs().sum() for m in self.ffn)
        return heads, ffn

    def head_values(self) -> list[torch.Tensor]:
        return [m.detach().float().cpu() for m in self.heads]

    def ffn_values(self) -> list[torch.Tensor]:
        return [m.detach().float().cpu() for m in self.ffn]

    @torch.no_grad()
    def accumulate_taylor(self, lambda_heads: float, lambda_ffn: float, finite: bool = True) -> None:
        """After backward: add |m * dL_task/dm| per unit (the L1 term's gradient lambda*sign(m) is removed).
        A step with finite=False (the GradScaler skips it) or with any non-finite term adds nothing and is
        not counted."""
        if not finite:
            return
        terms = {kind: [(p * (p.grad - lam * p.sign())).abs() if p.grad is not None else None for p in params]
                 for kind, params, lam in (("heads", self.heads, lambda_heads), ("ffn", self.ffn, lambda_ffn))}
        present = [t for ts in terms.values() for t in ts if t is not None]
        # one sync; mask gradients are already averaged across DDP ranks, so every rank decides alike
        if present and not bool(torch.stack([torch.isfinite(t).all() for t in present]).all()):
            return
        for kind, params in (("heads", self.heads), ("ffn", self.ffn)):
            sums = self.taylor_sum.setdefault(kind, [torch.zeros_like(p) for p in params])
            for acc, t in zip(sums, terms[kind]):
                if t is not None:
                    acc += t
        self.taylor_n += 1

    def taylor_values(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Mean Taylor importance per unit over the accumulated steps (heads, ffn)."""
        n = max(self.taylor_n, 1)
        out = [[t.detach().float().cpu() / n for t in self.taylor_sum.get(kind, [torch.zeros_like(p) for p in ps])]
               for kind, ps in (("heads", self.heads), ("ffn", self.ffn))]
        return out[0], out[1]

    def structure_scores(self, kind: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """What heads and neurons are ranked by: "mask" (learned values) or "taylor" (accumulated importance)."""
        return (self.head_values(), self.ffn_values()) if kind == "mask" else self.taylor_values()

    def score_state(self) -> dict:
        """CPU copies (nested dict / lists of tensors and plain values), ready for a checkpoint."""
        return {"taylor_sum": {k: [t.detach().cpu().clone() for t in ts] for k, ts in self.taylor_sum.items()},
                "taylor_n": self.taylor_n}

    def load_score_state(self, state: dict) -> None:
        """Restore onto the masks' own device: checkpoints load on the CPU, the masks may live on a GPU."""
        device = self.heads[0].device if len(self.heads) else torch.device("cpu")
        self.taylor_sum = {k: [t.to(device, copy=True) for t in ts] for k, ts in state["taylor_sum"].items()}
        self.taylor_n = state["taylor_n"]

    @torch.no_grad()
    def set_(self, heads: list[torch.Tensor] | None = None, ffn: list[torch.Tensor] | None = None) -> None:
        for dst, src in zip(self.heads, heads or []):
            dst.copy_(src)
        for dst, src in zip(self.ffn, ffn or []):
            dst.copy_(src)


def _unit_scaler(mask: nn.Parameter, width: int):
    def hook(_module, args):
        x = args[0]
        shape = x.shape
        scaled = (x.view(*shape[:-1], -1, width) * mask.to(x.dtype)[:, None]).view(shape)
        return (scaled,) + tuple(args[1:])

    return hook
