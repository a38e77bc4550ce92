"""Tiny random models of every supported family, built from configs (no downloads)."""
from __future__ import annotations

import torch
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification,
                          LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, OPTConfig,
                          OPTForSequenceClassification)

VOCAB = 64
LLAMA_SHAPED = ["mistral", "qwen2", "qwen3", "gemma", "olmo"]  # the other model types arch/ registers as llama


def tiny(family: str, num_labels: int = 2, causal_lm: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    if family == "bert":
        cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, max_position_embeddings=64, num_labels=num_labels)
        model = BertForSequenceClassification(cfg)
    elif family == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=64,
                         num_labels=num_labels, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = GPT2ForSequenceClassification(cfg)
    elif family == "opt":
        cfg = OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48,
                        word_embed_proj_dim=32, max_position_embeddings=64, num_labels=num_labels, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2)
        model = OPTForSequenceClassification(cfg)
    elif family == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                          num_key_value_heads=3, intermediate_size=40, max_position_embeddings=64,
                          num_labels=num_labels, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = (LlamaForCausalLM if causal_lm else LlamaForSequenceClassification)(cfg)
    elif family in LLAMA_SHAPED:  # registered in the llama family: the same layout under other names and norms
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
        cfg = AutoConfig.for_model(family, vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2,
                                   num_attention_heads=6, num_key_value_heads=3, head_dim=8, intermediate_size=40,
                                   max_position_embeddings=64, num_labels=num_labels, pad_token_id=0,
                                   bos_token_id=1, eos_token_id=2)
        model = (AutoModelForCausalLM if causal_lm else AutoModelForSequenceClassification).from_config(cfg)
    else:
        raise ValueError(family)
    return model.eval()


def batch(seed: int = 1, bsz: int = 3, seq: int = 9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (bsz, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # some right padding
    return {"input_ids": ids, "attention_mask": mask}


# ---- helpers for the pruning tests (added; the functions above are unchanged) ---------------------------
ALL_ROLES = ["q", "k", "v", "o", "up", "gate", "down"]


def randomize_biases(model, seed: int = 7, std: float = 0.1) -> None:
    """Non-zero biases everywhere (tiny() initialises them to 0), so mask folding is exercised on biased layers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g) * std)


def tiny_lora(family: str, r: int = 4, alpha: float = 8.0, seed: int = 0, causal_lm: bool = False):
    """Tiny model with LoRA (dropout 0) on every block linear and random non-zero B.

    Returns (peft_model, hf_model, arch, module_names)."""
    from prunetune.arch import get_arch
    from prunetune.units.lora import attach_lora, lora_config, lora_layers

    hf = tiny(family, seed=seed, causal_lm=causal_lm)
    randomize_biases(hf, seed + 1)
    arch = get_arch(hf)
    for p in hf.parameters():
        p.requires_grad_(False)
    names = arch.peft_targets(ALL_ROLES)
    pm = attach_lora(hf, arch, lora_config(arch, names, r, alpha, 0.0))
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for layer in lora_layers(hf).values():
            w = layer.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.5)
    pm.eval()
    return pm, hf, arch, names


def random_masks(masks, seed: int = 3, low: float = 0.25, high: float = 1.5) -> None:
    """Fill StructureMasks with random (non-trivial) values."""
    g = torch.Generator().manual_seed(seed)
    arch = masks.arch
    masks.set_([low + (high - low) * torch.rand(arch.num_units, generator=g) for _ in arch.layers],
               [low + (high - low) * torch.rand(arch.intermediate_size, generator=g) for _ in arch.layers])


def random_plan(arch, masks, names, units: int, heads=1 / 3, ffn=1 / 3, modules=0.5, ranks=0.5, seed: int = 4,
                **kw):
    """make_plan from the masks' values and random module / rank importance (units = rank or adapter size)."""
    from prunetune.plan import Scores, make_plan

    g = torch.Generator().manual_seed(seed)
    rank_imp = {n: torch.rand(units, generator=g) for n in names}
    mod_imp = {n: float(torch.rand(1, generator=g)) for n in names}
    return make_plan(arch=arch, scores=Scores(masks.head_values(), masks.ffn_values(), mod_imp, rank_imp), heads=heads,
                     ffn=ffn, modules=modules, ranks=ranks, **kw)


def zero_pruned_masks(masks, plan, kept_value: float | None = None) -> None:
    """Masks -> 0 on the units the plan removes; kept units keep their value (or are set to kept_value)."""
    hv, fv = masks.head_values(), masks.ffn_values()
    for values, kept_lists in ((hv, plan.kept_heads), (fv, plan.kept_neurons)):
        for l, kept in enumerate(kept_lists):
            z = torch.zeros_like(values[l])
            z[kept] = values[l][kept] if kept_value is None else kept_value
            values[l] = z
    masks.set_(hv, fv)


def zero_pruned_lora(hf, plan) -> None:
    """Zero B columns of removed ranks and the whole B of removed modules (so their LoRA delta is 0)."""
    from prunetune.units.lora import lora_layers

    with torch.no_grad():
        for name, layer in lora_layers(hf).items():
            B = layer.lora_B["default"].weight
            keep = torch.zeros(B.shape[1], dtype=torch.bool)
            keep[plan.peft_ranks.get(name, [])] = True
            B[:, ~keep] = 0
