"""Architecture knowledge: the ONLY place that knows module names per model family.

Every other part of prunetune asks an `Arch` for the full dotted names (relative to the Hugging Face
model) of the projections of layer i, and for how head / FFN counts are stored.
"""
from .base import Arch, LayerNames, get_arch, supported_families

__all__ = ["Arch", "LayerNames", "get_arch", "supported_families"]
