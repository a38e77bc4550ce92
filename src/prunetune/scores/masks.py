"""Learnable structure masks (Light-PEFT m_A, m_F) applied with forward pre-hooks.

m_A[l] has one entry per head unit (per KV group on GQA) and scales that unit's slice of the input of the
attention output projection; m_F[l] scales each FFN neuron at the input of the down projection. Masks are
fp32 parameters initialised to 1.
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
