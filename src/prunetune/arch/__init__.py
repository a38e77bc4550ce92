"""Architecture knowledge: the ONLY place that knows module names per model family.

Every other part of prunetune asks an `Arch` for the full dotted names (relative to the Hugging Face
model) of the projections of layer i, and for how head / FFN counts are stored.
"""
from .base import Arch, LayerNames, is_causal_lm, is_conv1d, output_embedding_keys, position_limit_of
from .families import get_arch, supported_families

__all__ = ["Arch", "LayerNames", "get_arch", "supported_families", "is_causal_lm", "is_conv1d",
           "output_embedding_keys", "position_limit_of"]
