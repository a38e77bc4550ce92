"""Masks and importance criteria, accumulated on device, all-reduced under DDP."""
from .importance import ImportanceTracker
from .masks import StructureMasks

__all__ = ["ImportanceTracker", "StructureMasks"]
