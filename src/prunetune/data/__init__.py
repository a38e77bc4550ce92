"""Data: task loading (GLUE / custom files / hub), tokenization, collation and metrics."""
from .metrics import compute_metrics
from .subset import stratified_split, stratified_subset
from .tasks import KNOWN_TASKS, EncodedDataset, Task, encode, load_task, make_collate, sample_path

__all__ = ["KNOWN_TASKS", "EncodedDataset", "Task", "compute_metrics", "encode", "load_task", "make_collate", "sample_path", "stratified_split",
           "stratified_subset"]
