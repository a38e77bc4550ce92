"""LoRA via peft, addressed by full module names coming from the architecture layer."""
from __future__ import annotations

import re

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from ..arch import Arch

ADAPTER = "default"


def lora_config(arch: Arch, modules: list[str], r: int, alpha: float, dropout: float,
                ranks: dict[str, int] | None = None, alphas: dict[str, float] | None = None) -> LoraConfig:
    """A LoraConfig over exact module names; per-module ranks/alphas go to rank_pattern/alpha_pattern."""
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(modules),
        rank_pattern={re.escape(k): v for k, v in (ranks or {}).items()},
        alpha_pattern={re.escape(k): v for k, v in (alphas or {}).items()},
        fan_in_fan_out=arch.conv1d,  # GPT-2 uses Conv1D (weight is in x out)
        bias="none",
    )


def attach_lora(hf_model, arch: Arch, config: LoraConfig):
    """Wrap `hf_model` in place; returns the PeftModel. The task head stays trainable."""
    peft_model = get_peft_model(hf_model, config)
    set_head_trainable(hf_model, arch)
    return peft_model


def set_head_trainable(hf_model, arch: Arch) -> None:
    """Parameters outside the transformer body (classifier / score / lm head) train in full."""
    if not arch.body_prefix:
        return
    for name, p in hf_model.named_parameters():
        if not name.startswith(arch.body_prefix + ".") and "lora_" not in name:
            p.requires_grad_(True)
    # a tied LM head shares the input embedding: keep it frozen
    emb = hf_model.get_input_embeddings() if hasattr(hf_model, "get_input_embeddings") else None
    if emb is not None:
        emb.weight.requires_grad_(False)


def lora_layers(hf_model) -> dict[str, LoraLayer]:
    """LoRA-wrapped modules by full name (relative to the HF model)."""
    return {n: m for n, m in hf_model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


def extract_lora(hf_model) -> dict[str, dict]:
    """Detached copies of every LoRA module: A (r x in), B (out x r), scaling."""
    out = {}
    for name, m in lora_layers(hf_model).items():
        out[name] = {
            "A": m.lora_A[ADAPTER].weight.detach().clone(),
            "B": m.lora_B[ADAPTER].weight.detach().clone(),
            "scaling": float(m.scaling[ADAPTER]),
        }
    return out


@torch.no_grad()
def load_lora(hf_model, tensors: dict[str, dict]) -> None:
    layers = lora_layers(hf_model)
    for name, t in tensors.items():
        layers[name].lora_A[ADAPTER].weight.copy_(t["A"])
        layers[name].lora_B[ADAPTER].weight.copy_(t["B"])
