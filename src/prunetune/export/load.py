"""prunetune.load(path): rebuild an export (any pruned shape) and its PEFT modules."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..arch import get_arch
from ..errors import PrunetuneError
from ..plan import PruningPlan
from ..surgery.base import apply_plan
from ..units.adapters import AdapterSet
from .manifest import read_manifest


@dataclass
class Loaded:
    model: torch.nn.Module  # PeftModel (LoRA), or HF model with adapters hooked / merged
    tokenizer: object
    plan: PruningPlan
    info: dict
    adapters: AdapterSet | None = None


def _model_class(info: dict):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if info.get("causal_lm") else AutoModelForSequenceClassification


def load_base(path: Path, info: dict, plan: PruningPlan):
    cls = _model_class(info)
    if info.get("plain_from_pretrained"):
        return cls.from_pretrained(path)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    model = cls.from_config(config)
    apply_plan(model, get_arch(model), plan)
    state = {}
    for f in sorted(path.glob("model*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise PrunetuneError(f"export {path} does not match its plan: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def load(path: str | Path, verify: bool = True) -> Loaded:
    path = Path(path)
    info = read_manifest(path, verify=verify)
    plan = PruningPlan.load(path / "prunetune_plan.json")
    model = load_base(path, info, plan).eval()
    tokenizer = None
    if (path / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    adapters = None
    parts = info["peft"].split("+")
    hf = model
    if "lora" in parts:  # LoRA first: adapters hook the LoRA-wrapped modules, as in training
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path / "adapter").eval()
    if "adapter" in parts:
        adapters = AdapterSet(info["hidden_size"], info["adapter_sizes"])
        adapters.load_state_dict(load_file(str(path / "adapters.safetensors")))
        adapters.attach(hf)
        hf.prunetune_adapters = adapters  # keep them alive with the model (and moved by .to())
    return Loaded(model, tokenizer, plan, info, adapters)
