"""Slice LoRA / adapter weights on the same axes as the base surgery, plus rank (unit) pruning."""
from __future__ import annotations

import torch

from ..units.adapters import AdapterSet
from ..units.lora import ADAPTER

ParamOps = list[tuple[int, torch.Tensor]]  # (dim, kept indices), applied in order


def lora_param_ops(kept_ranks: list[int], op) -> dict[str, ParamOps]:
    """Ops for '<module>.lora_A.default.weight' (r x in) and '.lora_B...' (out x r)."""
    r = torch.tensor(kept_ranks, dtype=torch.long)
    a_ops, b_ops = [(0, r)], [(1, r)]
    if op is not None:
        axis, idx = op
        (a_ops if axis == "in" else b_ops).append((1 if axis == "in" else 0, idx))
    return {f"lora_A.{ADAPTER}.weight": a_ops, f"lora_B.{ADAPTER}.weight": b_ops}


def apply_ops(t: torch.Tensor, ops: ParamOps) -> torch.Tensor:
    for dim, idx in ops:
        t = t.index_select(dim, idx.to(t.device))
    return t.contiguous()


def slice_lora_tensors(tensors: dict[str, dict], kept: dict[str, list[int]], struct_ops: dict) -> tuple[dict, dict, dict]:
    """Returns (sliced tensors, rank per module, alpha per module); alpha keeps scaling = alpha / r_original."""
    out, ranks, alphas = {}, {}, {}
    for name, kept_ranks in kept.items():
        t = tensors[name]
        ops = lora_param_ops(kept_ranks, struct_ops.get(name))
        out[name] = {
            "A": apply_ops(t["A"], ops[f"lora_A.{ADAPTER}.weight"]),
            "B": apply_ops(t["B"], ops[f"lora_B.{ADAPTER}.weight"]),
            "scaling": t["scaling"],
        }
        ranks[name] = len(kept_ranks)
        alphas[name] = t["scaling"] * len(kept_ranks)
    return out, ranks, alphas


@torch.no_grad()
def slice_adapters(adapters: AdapterSet, kept: dict[str, list[int]]) -> dict[str, dict[str, ParamOps]]:
    """Remove adapters not in `kept`, shrink the rest to their kept units; returns per-parameter ops."""
    ops = {}
    for name in adapters.names():
        if name not in kept:
            adapters.remove(name)
            continue
        ad = adapters.get(name)
        idx = torch.tensor(kept[name], dtype=torch.long, device=ad.down.weight.device)
        param_ops = {"down.weight": [(0, idx)], "down.bias": [(0, idx)], "up.weight": [(1, idx)], "up.bias": []}
        for pname, pops in param_ops.items():
            mod, attr = pname.split(".")
            p = getattr(getattr(ad, mod), attr)
            setattr(getattr(ad, mod), attr, torch.nn.Parameter(apply_ops(p.data, pops), requires_grad=p.requires_grad))
        ad.down.out_features = ad.up.in_features = len(idx)
        ops[name] = param_ops
    return ops
