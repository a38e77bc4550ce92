"""Write an export folder atomically (temp folder, then rename)."""
from __future__ import annotations

import copy
from pathlib import Path

from safetensors.torch import save_file

from ..arch import get_arch, is_causal_lm
from ..arch.families import uniform_config_update
from ..errors import PrunetuneError
from ..io import atomic_dir, check_target
from ..plan import PruningPlan
from .manifest import is_export, write_manifest


def check_export_target(out: str | Path, overwrite: bool = False) -> None:
    """An export replaces its target folder whole: only an empty folder or an earlier export is replaced
    without overwrite=True, and never a file."""
    check_target(out, what="export folder", overwrite=overwrite, replaceable=is_export,
                 hint="is not a prunetune export")


def save_export(out: str | Path, hf_model, plan: PruningPlan, tokenizer=None, peft_model=None, adapters=None,
                task_info: dict | None = None, merge: bool = False, card: str | None = None,
                overwrite: bool = False) -> Path:
    """hf_model: the (pruned) HF model; peft_model: its PeftModel wrapper for LoRA; adapters: AdapterSet.

    merge=True folds LoRA into the base weights and writes a standalone model (LoRA only).
    An existing `out` is replaced only when it is empty or an earlier export (any folder with overwrite=True).
    """
    out = Path(out)
    if merge and adapters is not None:
        raise PrunetuneError("--merge needs a LoRA-only model: bottleneck adapters are non-linear and cannot be merged")
    check_export_target(out, overwrite)
    with atomic_dir(out) as tmp:
        if peft_model is not None:
            clone = copy.deepcopy(peft_model)
            base = clone.merge_and_unload() if merge else clone.unload()
        else:
            base = copy.deepcopy(hf_model)
        heads = plan.uniform_heads() if plan.heads_pruned() else None
        inter = plan.uniform_neurons() if plan.ffn_pruned() else None
        plain = (heads is not None or not plan.heads_pruned()) and (inter is not None or not plan.ffn_pruned())
        if plain:
            plain = uniform_config_update(plan.family, base.config,
                                          heads * plan.heads_per_unit if heads else None, heads, inter)
        base.save_pretrained(tmp, safe_serialization=True)
        plan.save(tmp / "prunetune_plan.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        parts = (["lora"] if peft_model is not None and not merge else []) + (["adapter"] if adapters is not None else [])
        kind = "+".join(parts) or ("merged" if merge else "none")
        if peft_model is not None and not merge:
            peft_model.save_pretrained(tmp / "adapter")
        if adapters is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in adapters.state_dict().items()},
                      str(tmp / "adapters.safetensors"))
        if card:
            from ..report.card import with_front_matter

            # plain from_pretrained rebuilds a merged export with a config-expressible shape: no prunetune needed
            library = "transformers" if merge and plain else "prunetune"
            (tmp / "README.md").write_text(with_front_matter(card, library_name=library))
        write_manifest(tmp, {
            "kind": "export",
            "peft": kind,
            "adapter_sizes": adapters.sizes() if adapters is not None else None,
            "plain_from_pretrained": bool(plain),
            "causal_lm": bool(getattr(base.config, "is_decoder", False)) or is_causal_lm(base),
            "task": task_info or {},
            "hidden_size": get_arch(base).hidden_size,
        })
    return out
