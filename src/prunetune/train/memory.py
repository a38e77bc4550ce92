"""Peak training memory: tensor accounting (any device) and the CUDA allocator peak (GPU only)."""
from __future__ import annotations

import torch


class PeakMemory:
    """CUDA allocator peak (MB above the level at entry) of a code region; None on CPU, where
    `StepMemory` gives the tensor-level figure instead."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.peak_mb: float | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        return False


class StepMemory:
    """Device-independent peak training memory of one step: parameters + gradients + optimizer state +
    activations saved for backward (counted once per storage with saved-tensor hooks)."""

    def __init__(self):
        self.peak_mb = 0.0
        self._seen: set = set()
        self._saved = 0

    def _pack(self, t: torch.Tensor):
        try:
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in self._seen:
                self._seen.add(key)
                self._saved += t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            self._saved += t.numel() * t.element_size()
        return t

    def saving(self):
        """Context for the forward pass."""
        self._seen.clear()
        self._saved = 0
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def record(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extras=()) -> None:
        """Call after backward, before optimizer.zero_grad."""
        seen, total = set(), 0
        modules = [model, *extras]
        for m in modules:
            for p in m.parameters():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                total += p.numel() * p.element_size()
                if p.grad is not None:
                    total += p.grad.numel() * p.grad.element_size()
        for st in optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
        self.peak_mb = max(self.peak_mb, (total + self._saved) / 2**20)
