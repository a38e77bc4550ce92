"""Physical slicing of the base model and of PEFT weights, driven by a PruningPlan."""
from .base import apply_plan, base_layer, check_compensable, compensate_bias, fold_masks, reconstruct, structure_ops
from .apply import prune_adapter_model, prune_lora_model
from .peft import lora_param_ops, slice_adapters, slice_lora_tensors

__all__ = ["prune_adapter_model", "prune_lora_model", "apply_plan", "base_layer", "check_compensable", "compensate_bias", "fold_masks", "reconstruct", "structure_ops", "lora_param_ops", "slice_adapters", "slice_lora_tensors"]
