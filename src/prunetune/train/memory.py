"""Peak training memory: tensor accounting (any device) and the CUDA allocator peak (GPU only)."""
from __future__ import annotations

import torch

MB = 2**20


class PeakMemory:
    """CUDA allocator peak of a code region, in MB: `peak_mb` is what `torch.cuda.max_memory_allocated` reports
    for the region (everything live on the device, weights included, so it compares with `StepMemory` and with
    what an out-of-memory error counts); `above_entry_mb` is the part allocated on top of the level at entry.
    Both are None on CPU, where `StepMemory` gives the tensor-level figure instead.

    Entering resets the device's peak counter (`torch.cuda.reset_peak_memory_stats`): a caller measuring a
    wider region around this one reads a peak that starts here."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.peak_mb: float | None = None
        self.above_entry_mb: float | None = None
        self.entry_mb: float | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.entry_mb = self._base / MB
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.peak_mb = peak / MB
            self.above_entry_mb = (peak - self._base) / MB
        return False


def _storage_key(t: torch.Tensor):
    return t.untyped_storage().data_ptr(), t.device


class StepMemory:
    """Device-independent peak training memory of one step: parameters + gradients + optimizer state +
    activations saved for backward (counted once per storage with saved-tensor hooks; a parameter that autograd
    saves, e.g. a frozen weight kept to back-propagate through its layer, is already counted as a parameter)."""

    def __init__(self):
        self.peak_mb = 0.0
        self._saved: dict = {}  # storage key -> bytes, for the current forward pass
        self._unkeyed = 0  # bytes of saved tensors without an addressable storage

    def _pack(self, t: torch.Tensor):
        try:
            key = _storage_key(t)
            if key not in self._saved:
                self._saved[key] = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            self._unkeyed += t.numel() * t.element_size()
        return t

    def saving(self):
        """Context for the forward pass."""
        self._saved = {}
        self._unkeyed = 0
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def record(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extras=()) -> None:
        """Call after backward, before optimizer.zero_grad."""
        seen, storages, total = set(), set(), 0
        modules = [model, *extras]
        for m in modules:
            for p in m.parameters():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                total += p.numel() * p.element_size()
                try:
                    storages.add(_storage_key(p))
                except (RuntimeError, NotImplementedError):
                    pass
                if p.grad is not None:
                    total += p.grad.numel() * p.grad.element_size()
        for st in optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
        saved = sum(n for key, n in self._saved.items() if key not in storages) + self._unkeyed
        self.peak_mb = max(self.peak_mb, (total + saved) / MB)
