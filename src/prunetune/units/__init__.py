"""PEFT units: LoRA (through the `peft` library) and our own hook-based bottleneck adapters."""
from .adapters import AdapterSet, BottleneckAdapter
from .lora import attach_lora, extract_lora, lora_layers, set_head_trainable

__all__ = ["AdapterSet", "BottleneckAdapter", "attach_lora", "extract_lora", "lora_layers", "set_head_trainable"]
