"""Slice q/k/v output rows and o input columns of removed heads, FFN up/gate rows and down columns of
removed neurons. Operates on the plain HF model (PEFT wrappers removed first)."""
from __future__ import annotations

import torch
from torch import nn

from ..arch import Arch, is_conv1d
from ..arch.families import set_head_count
from ..errors import PrunetuneError
from ..plan import PruningPlan

Op = tuple[str, torch.Tensor]  # ("out" | "in", kept indices)


def _span(units: list[int], width: int) -> torch.Tensor:
    return torch.cat([torch.arange(u * width, (u + 1) * width) for u in units]) if units else torch.zeros(0, dtype=torch.long)


def structure_ops(arch: Arch, plan: PruningPlan) -> dict[str, Op]:
    """For every base module touched by the plan, which axis is sliced and which indices are kept."""
    ops: dict[str, Op] = {}
    q_width = arch.heads_per_unit * arch.head_dim
    for i, layer in enumerate(arch.layers):
        units = plan.kept_heads[i]
        if len(units) < plan.num_units:
            q_idx, kv_idx = _span(units, q_width), _span(units, arch.head_dim)
            if layer.fused_qkv:
                e = arch.num_heads * arch.head_dim
                ops[layer.q] = ("out", torch.cat([q_idx, e + q_idx, 2 * e + q_idx]))
            else:
                ops[layer.q] = ("out", q_idx)
                ops[layer.k] = ("out", kv_idx)
                ops[layer.v] = ("out", kv_idx)
            ops[layer.o] = ("in", q_idx)
        neurons = plan.kept_neurons[i]
        if len(neurons) < plan.intermediate_size:
            idx = torch.tensor(neurons, dtype=torch.long)
            ops[layer.up] = ("out", idx)
            if layer.gate:
                ops[layer.gate] = ("out", idx)
            ops[layer.down] = ("in", idx)
    return ops


@torch.no_grad()
def slice_module(module: nn.Module, op: Op) -> None:
    axis, idx = op
    w = module.weight
    idx = idx.to(w.device)
    out_dim, in_dim = (1, 0) if is_conv1d(module) else (0, 1)
    dim = out_dim if axis == "out" else in_dim
    module.weight = nn.Parameter(w.index_select(dim, idx).clone(), requires_grad=w.requires_grad)
    if axis == "out" and getattr(module, "bias", None) is not None:
        b = module.bias
        module.bias = nn.Parameter(b.index_select(0, idx).clone(), requires_grad=b.requires_grad)
    n = len(idx)
    if is_conv1d(module):
        if axis == "out":
            module.nf = n
    elif axis == "out":
        module.out_features = n
    else:
        module.in_features = n


def apply_plan(hf_model, arch: Arch, plan: PruningPlan) -> dict[str, Op]:
    """Physically prune heads and neurons in place; returns the ops so PEFT weights can follow."""
    plan.check_matches(arch)
    ops = structure_ops(arch, plan)
    for name, op in ops.items():
        module = hf_model.get_submodule(name)
        if hasattr(module, "base_layer"):
            raise RuntimeError(f"{name} is still PEFT-wrapped; unload PEFT before base surgery")
        slice_module(module, op)
    for i, layer in enumerate(arch.layers):
        units = len(plan.kept_heads[i])
        set_head_count(arch.family, hf_model.get_submodule(layer.attn), units * arch.heads_per_unit, units, arch.head_dim)
    return ops


def check_compensable(hf_model, arch: Arch) -> None:
    """prune.compensate adds to the o / down biases: refuse a model whose projections have none (before work)."""
    layer = arch.layers[0]
    missing = [n for n in (layer.o, layer.down) if getattr(base_layer(hf_model.get_submodule(n)), "bias", None) is None]
    if missing:
        raise PrunetuneError(f"prune.compensate needs biases on the attention output and FFN down projections; this "
                             f"{arch.family} model has none on {', '.join(missing)}")


def base_layer(module: nn.Module) -> nn.Module:
    """The frozen base projection of a module, LoRA-wrapped or not."""
    return getattr(module, "base_layer", module)


@torch.no_grad()
def compensate_bias(hf_model, arch: Arch, plan: PruningPlan, means, lora: dict[str, dict] | None = None,
                    lora_ranks: dict[str, list[int]] | None = None) -> None:
    """Before slicing: add each removed head's / neuron's mean contribution to the o / down bias, so the pruned
    layer's output keeps its mean over the tokens the means came from. means: (per layer o-input means, per
    layer down-input means). A LoRA module on o / down contributes through its removed input columns too:
    scaling * B[:, r] @ (A[r][:, removed] @ mean) over the ranks r that stay (lora_ranks: module -> kept ranks,
    a module absent from it is dropped; None = all ranks, when removed LoRA is merged into the base)."""
    width = arch.heads_per_unit * arch.head_dim
    for i, layer in enumerate(arch.layers):
        kept_units, kept_neurons = set(plan.kept_heads[i]), set(plan.kept_neurons[i])
        gone_units = [u for u in range(arch.num_units) if u not in kept_units]
        gone_neurons = [j for j in range(arch.intermediate_size) if j not in kept_neurons]
        for name, cols, mean in ((layer.o, _span(gone_units, width), means[0][i]),
                                 (layer.down, torch.tensor(gone_neurons, dtype=torch.long), means[1][i])):
            if len(cols) == 0:
                continue
            module = base_layer(hf_model.get_submodule(name))
            w = module.weight.float()
            cols = cols.to(w.device)
            m = torch.as_tensor(mean, dtype=torch.float32, device=w.device)[cols]
            delta = (m @ w[cols, :]) if is_conv1d(module) else (w[:, cols] @ m)
            ranks = None if lora_ranks is None else lora_ranks.get(name, [])
            if lora and name in lora and (ranks is None or ranks):
                t = lora[name]
                a, b = t["A"].float().to(w.device), t["B"].float().to(w.device)
                if ranks is not None:
                    a, b = a[ranks], b[:, ranks]
                delta = delta + t["scaling"] * (b @ (a[:, cols] @ m))
            module.bias.add_(delta.to(module.bias.dtype))


@torch.no_grad()
def merge_lora_delta(module: nn.Module, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
    """W += scaling * B @ A (A: r x in, B: out x r), in W's layout (Conv1D keeps in x out) and dtype."""
    delta = scaling * (b.float() @ a.float())
    w = module.weight
    w.add_((delta.T if is_conv1d(module) else delta).to(device=w.device, dtype=w.dtype))


@torch.no_grad()
def fold_masks(hf_model, arch: Arch, head_masks, ffn_masks, lora: dict[str, dict] | None = None) -> None:
    """Fold learned mask values into the o / down input columns (and LoRA A columns) before slicing."""
    width = arch.heads_per_unit * arch.head_dim
    for i, layer in enumerate(arch.layers):
        for name, scale in ((layer.o, head_masks[i].repeat_interleave(width)), (layer.down, ffn_masks[i])):
            module = hf_model.get_submodule(name)
            s = scale.to(module.weight)
            if is_conv1d(module):
                module.weight.mul_(s[:, None])
            else:
                module.weight.mul_(s[None, :])
            if lora and name in lora:
                lora[name]["A"] = lora[name]["A"] * s[None, :].to(lora[name]["A"])
