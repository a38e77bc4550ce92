"""Serial bottleneck adapters (Houlsby-style), attached with forward hooks: h <- h + up(act(down(h)))."""
from __future__ import annotations

import torch
from torch import nn


class BottleneckAdapter(nn.Module):
    def __init__(self, hidden: int, size: int):
        super().__init__()
        self.down = nn.Linear(hidden, size)
        self.up = nn.Linear(size, hidden)
        self.act = nn.GELU()
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)  # starts as the identity
        nn.init.zeros_(self.up.bias)
        self.observer = None  # optional callable(delta, h) for importance tracking

    @property
    def size(self) -> int:
        return self.down.out_features

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(h)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        d = self.delta(h)
        if self.observer is not None:
            self.observer(d, h)
        return h + d


def _key(module_name: str) -> str:
    return module_name.replace(".", "__")


def _name(key: str) -> str:
    return key.replace("__", ".")


class AdapterSet(nn.Module):
    """Adapters keyed by the module whose output they transform (e.g. each layer's o and down projection)."""

    def __init__(self, hidden: int, sizes: dict[str, int]):
        super().__init__()
        self.adapters = nn.ModuleDict({_key(n): BottleneckAdapter(hidden, s) for n, s in sizes.items()})
        self._handles: list = []

    def names(self) -> list[str]:
        return [_name(k) for k in self.adapters]

    def get(self, module_name: str) -> BottleneckAdapter:
        return self.adapters[_key(module_name)]

    def remove(self, module_name: str) -> None:
        del self.adapters[_key(module_name)]

    def sizes(self) -> dict[str, int]:
        return {_name(k): a.size for k, a in self.adapters.items()}

    def attach(self, hf_model) -> "AdapterSet":
        self.detach()
        for key, adapter in self.adapters.items():
            module = hf_model.get_submodule(_name(key))
            self._handles.append(module.register_forward_hook(lambda _m, _i, out, a=adapter: _apply(a, out)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _apply(adapter: BottleneckAdapter, out):
    if isinstance(out, tuple):
        return (adapter(out[0]),) + tuple(out[1:])
    return adapter(out)
