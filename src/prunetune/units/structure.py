"""A PEFT structure: which LoRA modules (with ranks) and which adapters (with sizes) a model carries.

It is the common currency of the methods: Light-PEFT starts from "everything", PrunePEFT searches it,
and both build their model from it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..arch import Arch
from .adapters import PARALLEL, AdapterSet
from .lora import attach_lora, lora_config, set_head_trainable

# Unit types of the PrunePEFT search space: which positions one unit covers in a layer.
UNIT_TYPES = {
    "lora_qv": {"kind": "lora", "roles": ("q", "v")},  # the paper's PA unit: q and v of a layer together
    "lora_ffn": {"kind": "lora", "roles": ("up", "gate", "down")},
    "lora_ko": {"kind": "lora", "roles": ("k", "o")},
    "adapter_ffn": {"kind": "adapter", "roles": ("down",)},  # the paper's SA unit: serial, after the FFN
    "adapter_attn": {"kind": "adapter", "roles": ("o",)},  # serial, after the attention output
    "parallel_ffn": {"kind": "adapter", "roles": ("up", "down"), "parallel": True},  # beside the FFN
}


def unit_positions(arch: Arch, unit_type: str, layer: int) -> list[str]:
    """LoRA module names, or the adapter position, that one unit of `unit_type` covers in `layer`."""
    spec = UNIT_TYPES[unit_type]
    names = arch.layers[layer]
    if spec["kind"] == "adapter":
        if spec.get("parallel"):
            return [f"{names.up}{PARALLEL}{names.down}"]
        return [names.role(spec["roles"][0])]
    out: list[str] = []
    for role in spec["roles"]:
        name = names.role(role)
        if name is not None and name not in out:
            out.append(name)
    return out


@dataclass
class PeftStructure:
    lora: dict[str, int] = field(default_factory=dict)  # module -> rank
    adapters: dict[str, int] = field(default_factory=dict)  # position -> bottleneck size
    lora_alpha: float = 16.0  # scaling = lora_alpha / lora_r_base for every module
    lora_r_base: int = 8
    lora_dropout: float = 0.05
    units: list[str] = field(default_factory=list)  # PrunePEFT unit names, when searched

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PeftStructure":
        return cls(**d)

    def lora_config(self, arch: Arch):
        """A peft LoraConfig; per-module ranks via rank_pattern, alphas keep scaling alpha / r_base."""
        if not self.lora:
            return None
        scale = self.lora_alpha / self.lora_r_base
        ranks = {m: r for m, r in self.lora.items() if r != self.lora_r_base}
        alphas = {m: scale * r for m, r in ranks.items()}
        return lora_config(arch, sorted(self.lora), self.lora_r_base, self.lora_alpha, self.lora_dropout, ranks, alphas)

    def plain_peft_config(self, arch: Arch):
        """The LoraConfig a plain-peft user passes to `get_peft_model(AutoModelFor...(base), config)` to get this
        structure's trainable parameters: task_type, and the task head (trained in full here) as modules_to_save.
        Training itself keeps the head outside peft (its parameter names stay those of the HF model)."""
        config = self.lora_config(arch)
        if config is not None:
            config.task_type = arch.task_type
            config.modules_to_save = list(arch.head_modules) or None
        return config

    def build(self, hf, arch: Arch):
        """Attach the structure to a frozen HF model: returns (forward model, AdapterSet | None)."""
        for p in hf.parameters():
            p.requires_grad_(False)
        model = hf
        if self.lora:
            model = attach_lora(hf, arch, self.lora_config(arch))
        adapters = None
        if self.adapters:
            adapters = AdapterSet(arch.hidden_size, self.adapters).attach(hf)
        set_head_trainable(hf, arch)
        return model, adapters
