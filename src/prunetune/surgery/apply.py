"""One entry point: turn a PEFT-wrapped model + plan into the physically pruned PEFT model."""
from __future__ import annotations

from ..arch import Arch
from ..plan import PruningPlan
from ..units.adapters import AdapterSet
from ..units.lora import attach_lora, extract_lora, load_lora, lora_config
from .base import apply_plan, compensate_bias, fold_masks, merge_lora_delta, reconstruct
from .peft import lora_param_ops, slice_adapters, slice_lora_tensors


def prune_lora_model(peft_model, arch: Arch, plan: PruningPlan, r: int, alpha: float, dropout: float,
                     head_masks=None, ffn_masks=None, merge_removed: bool = False, means=None, moments=None,
                     damp: float = 0.01, dropped_masks=None):
    """Returns (new PeftModel, {param name relative to the HF model: slicing ops}) for optimizer-state carry-over.

    head_masks/ffn_masks (lists of tensors) are folded into o/down weights when given; otherwise dropped.
    merge_removed: the learned update of every removed LoRA module and rank (scaling * B[:, gone] @ A[gone]) is
    merged into its frozen base weight instead of being thrown away: the module stops training, but what it has
    learned stays (with no heads or neurons removed, the pruned model's outputs are unchanged).
    means (prune.compensate): (o-input, down-input) means per layer; removed heads and neurons are replaced by
    their mean contribution in the o / down bias (before folding: the means were taken after the masks).
    moments (prune.reconstruct): (o-input, down-input) mean x x^T per layer; the kept o / down columns absorb
    the removed ones' predictable part (least squares; with means, the bias takes the mean part; damp: its
    ridge term, prune.reconstruct_damp; dropped_masks: the mask values the hooks applied when they are dropped
    rather than folded, see surgery.reconstruct).
    """
    hf = peft_model.base_model.model
    tensors = extract_lora(hf)
    hf = peft_model.unload()
    # the LoRA that stays: kept ranks, or all of it when the removed part is merged into the base
    staying = None if merge_removed else plan.peft_ranks
    if moments is not None:
        reconstruct(hf, arch, plan, moments, means=means, lora=tensors, lora_ranks=staying, damp=damp,
                    dropped_masks=None if head_masks is not None else dropped_masks)
    elif means is not None:
        compensate_bias(hf, arch, plan, means, lora=tensors, lora_ranks=staying)
    if head_masks is not None:
        fold_masks(hf, arch, head_masks, ffn_masks, lora=tensors)
    if merge_removed:  # before the base is sliced: the delta has the unpruned shape
        for name, t in tensors.items():
            kept = set(plan.peft_ranks.get(name, []))
            gone = [i for i in range(t["A"].shape[0]) if i not in kept]
            if gone:
                merge_lora_delta(hf.get_submodule(name), t["A"][gone], t["B"][:, gone], t["scaling"])
    struct = apply_plan(hf, arch, plan)
    sliced, ranks, alphas = slice_lora_tensors(tensors, plan.peft_ranks, struct)
    config = lora_config(arch, list(sliced), r, alpha, dropout, ranks, alphas)
    new = attach_lora(hf, arch, config)
    load_lora(hf, sliced)
    param_ops = {}
    for name, kept in plan.peft_ranks.items():
        for suffix, ops in lora_param_ops(kept, struct.get(name)).items():
            param_ops[f"{name}.{suffix}"] = ops
    return new, param_ops


def prune_adapter_model(hf_model, arch: Arch, plan: PruningPlan, adapters: AdapterSet, head_masks=None, ffn_masks=None,
                        extras_key: str = "adapters", means=None, moments=None,
                        damp: float = 0.01, dropped_masks=None):
    """Adapters are hook-based and live outside the HF model: slice base in place, shrink adapters.

    Returns {parameter name as TrainState names it ("<extras_key>.<name in the AdapterSet>"): slicing ops}
    for optimizer-state carry-over; extras_key is the key the AdapterSet has in TrainState's extras.
    means, moments, damp, dropped_masks: as prune_lora_model's (adapters read hidden states, never a removed unit's output)."""
    if moments is not None:
        reconstruct(hf_model, arch, plan, moments, means=means, damp=damp,
                    dropped_masks=None if head_masks is not None else dropped_masks)
    elif means is not None:
        compensate_bias(hf_model, arch, plan, means)
    if head_masks is not None:
        fold_masks(hf_model, arch, head_masks, ffn_masks)
    apply_plan(hf_model, arch, plan)
    ops = slice_adapters(adapters, plan.peft_ranks)
    if adapters._handles:  # re-hook: the hooks of removed adapters would otherwise keep running them
        adapters.attach(hf_model)
    # names looked up by identity, so they are the AdapterSet's own (whatever its internal layout)
    names = {id(p): n for n, p in adapters.named_parameters()}
    return {f"{extras_key}.{names[id(adapters.get(n).get_parameter(p))]}": o
            for n, pops in ops.items() for p, o in pops.items()}
