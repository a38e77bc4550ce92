"""Masks and importance criteria, accumulated on device, all-reduced under DDP."""
from .importance import ImportanceTracker
from .masks import StructureMasks
from .residual import residual_shares, select_kept

__all__ = ["ImportanceTracker", "StructureMasks", "residual_shares", "select_kept"]
