"""A small training loop (tqdm, eval each epoch, linear schedule) that survives mid-run surgery."""
from .loop import TrainState, evaluate, make_loader
from .memory import PeakMemory

__all__ = ["TrainState", "evaluate", "make_loader", "PeakMemory"]
