"""Reloadable exports: pruned base (safetensors) + pruning plan + PEFT adapter, checksummed."""
from .load import Loaded, load
from .save import save_export

__all__ = ["Loaded", "load", "save_export"]
