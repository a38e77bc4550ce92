"""prunetune.load(path): rebuild an export (any pruned shape) and its PEFT modules."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..arch import get_arch, output_embedding_keys
from ..errors import PrunetuneError
from ..plan import PruningPlan
from ..surgery.base import apply_plan
from ..units.adapters import AdapterSet
from .manifest import read_manifest

PEFT_KINDS = {"lora", "adapter", "lora+adapter", "merged", "none"}
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


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
    for f in _weight_files(path, info):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    tied |= output_embedding_keys(model)  # an LM head tied to the input embedding is not saved separately
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise PrunetuneError(f"export {path} does not match its plan: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def _weight_files(path: Path, info: dict) -> list[Path]:
    """The base weight files the manifest lists (never a glob of the folder: an added file is not loaded)."""
    names = sorted(rel for rel in info["files"] if "/" not in rel and rel.startswith("model")
                   and rel.endswith(".safetensors"))
    if not names:
        raise PrunetuneError(f"export {path} is incomplete: its manifest lists no model*.safetensors file")
    return [path / n for n in names]


def check_info(path: Path, info: dict) -> None:
    """The manifest fields load() relies on, with their types: one clear error instead of a KeyError later."""
    def bad(msg: str):
        raise PrunetuneError(f"export {path} has a malformed prunetune.json: {msg}")

    if info.get("kind", "export") != "export":
        raise PrunetuneError(f"{path} is a prunetune {info.get('kind')}, not an export")
    if info.get("peft") not in PEFT_KINDS:
        bad(f"peft is {info.get('peft')!r}, expected one of {sorted(PEFT_KINDS)}")
    if "adapter" in info["peft"].split("+"):
        sizes = info.get("adapter_sizes")
        if not isinstance(sizes, dict) or not sizes or not all(
                isinstance(k, str) and type(v) is int and v > 0 for k, v in sizes.items()):
            bad(f"adapter_sizes must map module names to positive sizes, got {sizes!r}")
        if type(info.get("hidden_size")) is not int or info["hidden_size"] <= 0:
            bad(f"hidden_size must be a positive integer, got {info.get('hidden_size')!r}")
    if not isinstance(info.get("task", {}), dict):
        bad("task must be an object")
    for key in ("plain_from_pretrained", "causal_lm"):
        if not isinstance(info.get(key, False), bool):
            bad(f"{key} must be true or false")
    if "prunetune_plan.json" not in info["files"]:
        bad("its file list does not include prunetune_plan.json")
    pickled = [rel for rel in info["files"] if Path(rel).suffix.lower() in PICKLE_SUFFIXES]
    if pickled:  # exports hold safetensors only; a pickle-based file could run code when a loader reads it
        raise PrunetuneError(f"export {path} is refused: {pickled[0]} is a pickle-based file (exports hold "
                             "safetensors weights only)")


def load(path: str | Path, verify: bool = True) -> Loaded:
    path = Path(path)
    info = read_manifest(path, verify=verify)
    check_info(path, info)
    plan = PruningPlan.load(path / "prunetune_plan.json")
    try:
        return _load(path, info, plan)
    except PrunetuneError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged export can make any loader fail: one clear line
        msg = (str(exc).strip().splitlines() or [""])[0][:300]
        raise PrunetuneError(f"export {path} cannot be loaded: {type(exc).__name__}: {msg}") from None


def _load(path: Path, info: dict, plan: PruningPlan) -> Loaded:
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


class AutoPrunedModel:
    """Load a prunetune export as the model itself: a PeftModel (LoRA exports), or the HF model (merged
    exports; adapter exports with their adapters hooked). The tokenizer saved with it loads with
    `transformers.AutoTokenizer.from_pretrained(path)`; the plan is on `model.prunetune_plan`.

    >>> import prunetune
    >>> prunetune.AutoPrunedModel.from_pretrained("/nonexistent")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    prunetune.errors.PrunetuneError: /nonexistent is not a prunetune export (no prunetune.json)
    """

    def __init__(self):
        raise TypeError("use AutoPrunedModel.from_pretrained(path)")

    @classmethod
    def from_pretrained(cls, path: str | Path, verify: bool = True) -> torch.nn.Module:
        """The model of the export at `path` (eval mode); checksums verified unless verify=False. A folder
        written by `trainer.save_model` in a LightPeftCallback run holds the export in path/prunetune."""
        path = Path(path)
        if not (path / "prunetune.json").is_file() and (path / "prunetune" / "prunetune.json").is_file():
            path = path / "prunetune"
        loaded = load(path, verify=verify)
        loaded.model.prunetune_plan = loaded.plan
        return loaded.model
