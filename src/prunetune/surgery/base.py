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


def _cut_inputs(arch: Arch, plan: PruningPlan):
    """For every o / down projection the plan slices (structure_ops' input-side ops): (layer index, 0 for o /
    1 for down, module name, kept input columns, removed input columns)."""
    ops = structure_ops(arch, plan)
    widths = (arch.num_units * arch.heads_per_unit * arch.head_dim, arch.intermediate_size)
    for i, layer in enumerate(arch.layers):
        for j, name in enumerate((layer.o, layer.down)):
            if name in ops:
                kept = ops[name][1]
                gone = torch.ones(widths[j], dtype=torch.bool)
                gone[kept] = False
                yield i, j, name, kept, gone.nonzero().flatten()


@torch.no_grad()
def compensate_bias(hf_model, arch: Arch, plan: PruningPlan, means, lora: dict[str, dict] | None = None,
                    lora_ranks: dict[str, list[int]] | None = None) -> None:
    """Before slicing: add each removed head's / neuron's mean contribution to the o / down bias, so the pruned
    layer's output keeps its mean over the tokens the means came from. means: (per layer o-input means, per
    layer down-input means). A LoRA module on o / down contributes through its removed input columns too:
    scaling * B[:, r] @ (A[r][:, removed] @ mean) over the ranks r that stay (lora_ranks: module -> kept ranks,
    a module absent from it is dropped; None = all ranks, when removed LoRA is merged into the base)."""
    for i, j, name, _kept, cols in _cut_inputs(arch, plan):
        module = base_layer(hf_model.get_submodule(name))
        w = module.weight.float()
        cols = cols.to(w.device)
        m = torch.as_tensor(means[j][i], dtype=torch.float32, device=w.device)[cols]
        delta = (m @ w[cols, :]) if is_conv1d(module) else (w[:, cols] @ m)
        staying = _staying_lora(lora, lora_ranks, name, torch.float32, w.device)
        if staying is not None:
            a, b, scaling = staying
            delta = delta + scaling * (b @ (a[:, cols] @ m))
        module.bias.add_(delta.to(module.bias.dtype))


def _staying_lora(lora: dict[str, dict] | None, lora_ranks: dict[str, list[int]] | None, name: str, dtype,
                  device) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(A, B, scaling) of the LoRA that stays on module `name` after surgery (lora_ranks: module -> kept ranks,
    a module absent from it is dropped; None = all ranks), or None when none stays."""
    ranks = None if lora_ranks is None else lora_ranks.get(name, [])
    if not lora or name not in lora or not (ranks is None or ranks):
        return None
    t = lora[name]
    a, b = t["A"].to(device, dtype), t["B"].to(device, dtype)
    if ranks is not None:
        a, b = a[ranks], b[:, ranks]
    return a, b, t["scaling"]


@torch.no_grad()
def reconstruct(hf_model, arch: Arch, plan: PruningPlan, moments, means=None, lora: dict[str, dict] | None = None,
                lora_ranks: dict[str, list[int]] | None = None, damp: float = 0.01, dropped_masks=None) -> None:
    """Before slicing: least-squares reconstruction of every o / down projection the plan slices. The kept input
    columns K absorb what the removed ones R contributed, as far as the kept inputs predict it over the tokens
    the moments came from: W_K += W_R C_RK (C_KK + d I)^-1 (structured optimal brain surgeon on the layer's
    output, as in ZipLM / SlimGPT; d = damp x the mean diagonal of C_KK keeps dead inputs solvable; with
    damp=0 a singular C_KK falls back to its pseudo-inverse).
    moments: (per layer o-input, per layer down-input) mean x x^T of the masked inputs, or with means given
    (prune.compensate) the covariance, and the bias also takes the mean part, b += W_R mu_R - dW_K mu_K (with
    C_RK = 0 this is compensate_bias). W is the effective weight: the base plus the LoRA that stays on the
    projection (lora, lora_ranks as compensate_bias's); the update goes into the frozen base.
    dropped_masks: (head masks, ffn masks) per layer when surgery drops the masks instead of folding them: the
    kept columns then receive unmasked inputs x_K = s_K / m_K, so the update's columns are scaled by m_K (the
    removed part W_R s_R is what is reconstructed; the kept part loses its mask, as without reconstruction).
    The masks train during the window, so the moments mix their values over it; the scaling uses the last ones."""
    width = arch.heads_per_unit * arch.head_dim
    for i, j, name, kept, gone in _cut_inputs(arch, plan):
        module = base_layer(hf_model.get_submodule(name))
        conv = is_conv1d(module)
        w = module.weight.double()
        w = w.T if conv else w  # (out, in)
        staying = _staying_lora(lora, lora_ranks, name, torch.float64, w.device)
        if staying is not None:
            a, b, scaling = staying
            w = w + scaling * (b @ a)
        kept_d, gone_d = kept.to(w.device), gone.to(w.device)
        c = torch.as_tensor(moments[j][i], dtype=torch.float64, device=w.device)
        c_kk, c_kr = c[kept_d][:, kept_d], c[kept_d][:, gone_d]
        c_kk = c_kk + damp * c_kk.diagonal().mean().clamp_min(1e-12) * torch.eye(len(kept), dtype=c.dtype,
                                                                                   device=c.device)
        solved, info = torch.linalg.solve_ex(c_kk, c_kr)
        if int(info) != 0:  # exactly singular (damp=0 with dead inputs): the least-norm solution
            solved = torch.linalg.pinv(c_kk, hermitian=True) @ c_kr
        w_gone = w[:, gone_d]
        delta = w_gone @ solved.T  # W_R C_RK C_KK^-1: (out, |K|), acting on masked kept inputs
        if means is not None:  # the mean part, in masked terms as the moments are
            mu = torch.as_tensor(means[j][i], dtype=torch.float64, device=w.device)
            module.bias.add_((w_gone @ mu[gone_d] - delta @ mu[kept_d]).to(module.bias.dtype))
        if dropped_masks is not None:  # the kept columns will see unmasked inputs
            scale = torch.as_tensor(dropped_masks[j][i], dtype=torch.float64, device=w.device)
            delta = delta * (scale.repeat_interleave(width) if j == 0 else scale)[kept_d][None, :]
        weight = module.weight
        if conv:
            weight[kept_d, :] += delta.T.to(weight.dtype)
        else:
            weight[:, kept_d] += delta.to(weight.dtype)


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
