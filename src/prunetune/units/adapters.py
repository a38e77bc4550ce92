"""Bottleneck adapters attached with forward hooks.

A position is named by module names from the architecture layer:
- "M": serial (Houlsby) adapter on the output of module M: h <- h + up(act(down(h)));
- "U=>D": parallel adapter (He et al.): reads the input of module U, adds its output to the output of D
  (U = FFN up projection, D = FFN down projection: an adapter beside the whole FFN).
"""
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
        self.observer = None  # optional callable(delta, h, z) for importance tracking (z: bottleneck activations)
        self.unit_mask: torch.Tensor | None = None  # optional 0/1 per bottleneck unit (rank-granular search)

    @property
    def size(self) -> int:
        return self.down.out_features

    def delta_and_hidden(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(up(z), z) with z = act(down(h)), masked per bottleneck unit when unit_mask is set."""
        z = self.act(self.down(h))
        if self.unit_mask is not None:
            z = z * self.unit_mask.to(device=z.device, dtype=z.dtype)
        return self.up(z), z

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        return self.delta_and_hidden(h)[0]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        d, z = self.delta_and_hidden(h)
        if self.observer is not None:
            self.observer(d, h, z)
        return h + d


def _key(module_name: str) -> str:
    return module_name.replace(".", "__")


def _name(key: str) -> str:
    return key.replace("__", ".")


class AdapterSet(nn.Module):
    """Adapters keyed by the module whose output they transform (e.g. each layer's o and down projection)."""

    def __init__(self, hidden: int, sizes: dict[str, int]):
        super().__init__()
        self.adapters = nn.ModuleDict({_key(n): BottleneckAdapter(hidden, sizes[n]) for n in sorted(sizes)})
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
            name = _name(key)
            if PARALLEL in name:
                src, dst = name.split(PARALLEL)
                slot: dict = {}
                self._handles.append(hf_model.get_submodule(src).register_forward_pre_hook(
                    lambda _m, args, s=slot: s.__setitem__("x", args[0])))
                self._handles.append(hf_model.get_submodule(dst).register_forward_hook(
                    lambda _m, _i, out, a=adapter, s=slot: _add_parallel(a, s.pop("x"), out)))
            else:
                module = hf_model.get_submodule(name)
                self._handles.append(module.register_forward_hook(lambda _m, _i, out, a=adapter: _apply(a, out)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


PARALLEL = "=>"


def _add_parallel(adapter: BottleneckAdapter, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    d, z = adapter.delta_and_hidden(x)
    if adapter.observer is not None:
        adapter.observer(d, out, z)
    return out + d


def _apply(adapter: BottleneckAdapter, out):
    if isinstance(out, tuple):
        return (adapter(out[0]),) + tuple(out[1:])
    return adapter(out)
