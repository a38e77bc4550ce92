"""PrunePEFT supernet: every candidate unit of the search space at every layer, individually removable."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..arch import Arch
from ..errors import PrunetuneError
from .lora import ADAPTER, lora_layers
from .structure import UNIT_TYPES, PeftStructure, unit_positions


@dataclass(frozen=True)
class Unit:
    name: str  # "<type>@<layer>", or "<type>@<layer>#<chunk>" in a rank-granular search
    type: str
    layer: int
    positions: tuple[str, ...]  # LoRA module names or adapter positions
    span: tuple[int, int] | None = None  # rank-granular: the [lo, hi) ranks / bottleneck units it owns there

    @property
    def kind(self) -> str:
        return UNIT_TYPES[self.type]["kind"]

    @property
    def group(self) -> str:
        """The whole unit (type at layer) a chunk belongs to."""
        return f"{self.type}@{self.layer}"


class Supernet:
    """Builds the full structure on a frozen HF model; `remove()` switches a unit off for good
    (adapters are unhooked; LoRA modules get scaling 0 and frozen weights).

    chunk: rank-granular search. Every unit type at every layer becomes width / chunk units of `chunk` ranks
    (LoRA) or bottleneck units (adapters) each, switched off by a 0/1 mask on the rank axis (LoRA: the input of
    B, i.e. A x; adapters: the bottleneck activations), so a removed chunk contributes nothing and gets zero
    gradients; when the last chunk of a module goes, the module is removed as a whole unit would be."""

    def __init__(self, hf, arch: Arch, space: list[str], lora_r: int = 8, lora_alpha: float = 16.0,
                 lora_dropout: float = 0.05, adapter_size: int = 16, ranks: dict[str, int] | None = None,
                 chunk: int | None = None):
        unknown = [t for t in space if t not in UNIT_TYPES]
        if unknown or not space:
            raise PrunetuneError(f"unknown unit type(s) {unknown} in search space (known: {', '.join(UNIT_TYPES)})")
        self.hf, self.arch, self.chunk = hf, arch, chunk
        size = {t: (ranks or {}).get(t) for t in space}
        full = {t: size[t] or (lora_r if UNIT_TYPES[t]["kind"] == "lora" else adapter_size) for t in space}
        if chunk is not None and (chunk < 1 or any(full[t] % chunk for t in space)):
            raise PrunetuneError(f"search.chunk={chunk} must be >= 1 and divide every unit's width "
                                 f"({', '.join(f'{t}: {w}' for t, w in full.items())})")
        self.units = []
        for t in space:
            for layer in range(arch.num_layers):
                positions = tuple(unit_positions(arch, t, layer))
                if chunk is None:
                    self.units.append(Unit(f"{t}@{layer}", t, layer, positions))
                else:
                    self.units += [Unit(f"{t}@{layer}#{c}", t, layer, positions, (c * chunk, (c + 1) * chunk))
                                   for c in range(full[t] // chunk)]
        twice = sorted({t for t in space if space.count(t) > 1})
        if twice:
            raise PrunetuneError(f"search space units overlap: {', '.join(twice)} listed twice")
        owner: dict[str, str] = {}
        for u in self.units:
            for pos in u.positions:
                if owner.setdefault(pos, u.group) != u.group:
                    raise PrunetuneError(f"search space units overlap: {owner[pos]} and {u.group} both use {pos}")
        structure = PeftStructure(
            lora={p: size[u.type] or lora_r for u in self.units if u.kind == "lora" for p in u.positions},
            adapters={p: size[u.type] or adapter_size for u in self.units if u.kind == "adapter" for p in u.positions},
            lora_alpha=lora_alpha, lora_r_base=lora_r, lora_dropout=lora_dropout,
        )
        self.base_structure = structure
        self.model, self.adapters = structure.build(hf, arch)
        self._lora = lora_layers(hf)
        self.alive: list[str] = [u.name for u in self.units]
        self.by_name = {u.name: u for u in self.units}
        self._masks: dict[str, torch.Tensor] = {}  # rank-granular: position -> 0/1 per rank / bottleneck unit
        self._handles: list = []
        if chunk is not None:
            for pos in owner:
                if pos in structure.adapters:
                    self._masks[pos] = torch.ones(structure.adapters[pos])
                    self.adapters.get(pos).unit_mask = self._masks[pos]
                else:
                    self._masks[pos] = torch.ones(structure.lora[pos])
                    self._handles.append(self._lora[pos].lora_B[ADAPTER].register_forward_pre_hook(
                        lambda _m, args, mask=self._masks[pos]: (args[0] * mask.to(args[0]),) + tuple(args[1:])))

    def blocks(self) -> list[torch.nn.Module] | None:
        """The model's layer stack in order (None when the architecture names none): drop_loss replays the
        blocks below a unit instead of recomputing them."""
        return list(self.hf.get_submodule(self.arch.blocks_prefix)) if self.arch.blocks_prefix else None

    def unit_blocks(self) -> dict[str, int]:
        """unit -> the first block it changes (its layer: every unit type lives inside one block)."""
        return {u.name: u.layer for u in self.units}

    def unit_params(self, name: str) -> list[torch.Tensor]:
        """The unit's parameters; a chunk's are views of its rank rows / columns (LoRA A[lo:hi], B[:, lo:hi];
        adapter down rows and bias, up columns: the up bias is shared by the chunks and owned by none)."""
        u = self.by_name[name]
        if u.span is not None:
            lo, hi = u.span
            if u.kind == "adapter":
                return [t for pos in u.positions for ad in (self.adapters.get(pos),)
                        for t in (ad.down.weight[lo:hi], ad.down.bias[lo:hi], ad.up.weight[:, lo:hi])]
            return [t for pos in u.positions for t in (self._lora[pos].lora_A[ADAPTER].weight[lo:hi],
                                                       self._lora[pos].lora_B[ADAPTER].weight[:, lo:hi])]
        if u.kind == "adapter":
            return [p for pos in u.positions for p in self.adapters.get(pos).parameters()]
        return [w for pos in u.positions for w in (self._lora[pos].lora_A[ADAPTER].weight, self._lora[pos].lora_B[ADAPTER].weight)]

    @contextmanager
    @torch.no_grad()
    def switched_off(self, name: str):
        """The unit contributes nothing inside the block (LoRA scaling 0; an adapter's up projection, its output
        side, zeroed), and is restored exactly afterwards. For forward-only probes (the held-out loss proxy)."""
        u = self.by_name[name]
        if u.span is not None:  # a chunk: its mask entries off
            lo, hi = u.span
            saved = [self._masks[pos][lo:hi].clone() for pos in u.positions]
            for pos in u.positions:
                self._masks[pos][lo:hi] = 0.0
            try:
                yield
            finally:
                for pos, m in zip(u.positions, saved):
                    self._masks[pos][lo:hi] = m
            return
        if u.kind == "adapter":
            ups = [self.adapters.get(pos).up for pos in u.positions]
            saved = [(m.weight.clone(), m.bias.clone()) for m in ups]
            for m in ups:
                m.weight.zero_()
                m.bias.zero_()
        else:
            layers = [self._lora[pos] for pos in u.positions]
            saved = [layer.scaling[ADAPTER] for layer in layers]
            for layer in layers:
                layer.scaling[ADAPTER] = 0.0
        try:
            yield
        finally:
            if u.kind == "adapter":
                for m, (w, b) in zip(ups, saved):
                    m.weight.copy_(w)
                    m.bias.copy_(b)
            else:
                for layer, scale in zip(layers, saved):
                    layer.scaling[ADAPTER] = scale

    def unit_size(self, name: str) -> int:
        return sum(p.numel() for p in self.unit_params(name))

    def width(self, name: str) -> int:
        """A unit's LoRA rank or adapter bottleneck size (a chunk's: its number of ranks)."""
        u = self.by_name[name]
        if u.span is not None:
            return u.span[1] - u.span[0]
        table = self.base_structure.adapters if u.kind == "adapter" else self.base_structure.lora
        return table[u.positions[0]]

    def size_at(self, name: str, width: int) -> int:
        """Parameters of the unit at another rank / bottleneck size: LoRA w*(in+out) per module,
        adapter w*(2h+1) + h (down weight+bias, up weight, up bias)."""
        u = self.by_name[name]
        # a chunk brings an adapter's shared up bias back only where no chunk of that adapter is alive
        alive = self._alive_width() if u.span is not None else {}
        return sum(self._position_size(p, width, shared=not alive.get(p)) for p in u.positions)

    def _position_size(self, position: str, width: int, shared: bool = True) -> int:
        """Parameters at one position at a width: LoRA w*(in+out); adapter w*(2h+1) (down weight+bias, up
        weight) plus, with `shared`, its up bias h."""
        if position in self.base_structure.adapters:
            h = self.arch.hidden_size
            return width * (2 * h + 1) + (h if shared else 0)
        layer = self._lora[position]
        return width * (layer.lora_A[ADAPTER].weight.shape[1] + layer.lora_B[ADAPTER].weight.shape[0])

    def trainable(self) -> int:
        """Trainable PEFT parameters of the alive units (task head excluded): per position, its alive width."""
        return sum(self._position_size(pos, w) for pos, w in self._alive_width().items() if w)

    def _alive_width(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n in self.alive:
            for pos in self.by_name[n].positions:
                out[pos] = out.get(pos, 0) + self.width(n)
        return out

    def groups(self) -> dict[str, list[str]]:
        return {n: list(self.by_name[n].positions) for n in self.alive}

    def spans(self) -> dict[str, tuple[int, int]]:
        """Rank-granular search: alive chunk -> the ranks it owns (for the tracker's per-chunk statistics)."""
        return {n: self.by_name[n].span for n in self.alive if self.by_name[n].span is not None}

    @torch.no_grad()
    def remove(self, names: list[str]) -> None:
        for name in names:
            u = self.by_name[name]
            self.alive.remove(name)
            if u.span is not None:  # a chunk: masked off; the module goes with its last chunk
                for pos in u.positions:
                    self._masks[pos][u.span[0]:u.span[1]] = 0.0
                if any(self.by_name[n].group == u.group for n in self.alive):
                    continue
            if u.kind == "adapter":
                for pos in u.positions:
                    self.adapters.remove(pos)
            else:
                for pos in u.positions:
                    layer = self._lora[pos]
                    layer.scaling[ADAPTER] = 0.0
                    for w in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight):
                        w.requires_grad_(False)
                        w.grad = None
        if self.adapters is not None:
            self.adapters.attach(self.hf)

    @torch.no_grad()
    def reinit(self, seed: int) -> None:
        """Re-initialise the alive units (the `reinit` option between rounds)."""
        g = torch.Generator().manual_seed(seed)
        # per alive module once (its chunks share it; a removed chunk's slice stays masked off)
        first: dict[str, Unit] = {}
        for n in self.alive:
            first.setdefault(self.by_name[n].group, self.by_name[n])
        for u in first.values():
            if u.kind == "adapter":
                for pos in u.positions:
                    ad = self.adapters.get(pos)
                    ad.down.weight.copy_(torch.randn(ad.down.weight.shape, generator=g) * 0.02)
                    ad.up.weight.zero_()
                    ad.up.bias.zero_()
                    ad.down.bias.zero_()
            else:
                for pos in u.positions:
                    a = self._lora[pos].lora_A[ADAPTER].weight
                    bound = (6 / a.shape[1]) ** 0.5 / 5 ** 0.5  # kaiming-uniform(a=sqrt(5)) as peft does
                    a.copy_((torch.rand(a.shape, generator=g) * 2 - 1) * bound)
                    self._lora[pos].lora_B[ADAPTER].weight.zero_()

    def structure(self, partial: dict[str, int] | None = None) -> PeftStructure:
        """The alive units as a PeftStructure (what the retrain builds), plus removed units brought back
        at a smaller width (`partial`: unit name -> rank / bottleneck size)."""
        base, partial = self.base_structure, partial or {}
        width = self._alive_width()
        for n, w in partial.items():
            for p in self.by_name[n].positions:
                width[p] = width.get(p, 0) + w
        return PeftStructure(
            lora={p: width[p] for p in base.lora if p in width},
            adapters={p: width[p] for p in base.adapters if p in width},
            lora_alpha=base.lora_alpha, lora_r_base=base.lora_r_base, lora_dropout=base.lora_dropout,
            units=[u.name for u in self.units if u.name in self.alive or u.name in partial],
        )

    def fill(self, candidates: list[str], budget: int) -> dict[str, int]:
        """Spend the budget the last whole-unit removal left over: bring back removed units, best first,
        each at the largest width that still fits (the unit that crossed the budget only partly). Returns
        unit name -> width."""
        out, slack = {}, budget - self.trainable()
        for name in candidates:
            w = max((w for w in range(1, self.width(name) + 1) if self.size_at(name, w) <= slack), default=0)
            if w:
                out[name] = w
                slack -= self.size_at(name, w)
        return out
