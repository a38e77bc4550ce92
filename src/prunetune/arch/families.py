"""The supported families and the registry that finds one for a model. Adding one = one function returning an
`Arch`, registered for its `config.model_type` names."""
from __future__ import annotations

from torch import nn

from ..errors import PrunetuneError
from .base import Arch, LayerNames, body_path, head_modules, join, task_type_of

_FAMILIES: dict[str, "callable"] = {}


def register(*model_types: str):
    def deco(fn):
        for t in model_types:
            _FAMILIES[t] = fn
        return fn

    return deco


def supported_families() -> list[str]:
    return sorted(_FAMILIES)


def get_arch(model: nn.Module) -> Arch:
    """Layout of a Hugging Face PreTrainedModel (any task head)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _FAMILIES:
        raise PrunetuneError(
            f"unsupported architecture '{model_type}' ({type(model).__name__}); supported: {', '.join(supported_families())}"
        )
    arch = _FAMILIES[model_type](model, config)
    arch.head_modules = head_modules(model, arch.body_prefix)
    arch.task_type = task_type_of(model)
    return arch


@register("bert", "roberta", "xlm-roberta", "camembert", "electra")
def bert(model, config) -> Arch:
    root = join(body_path(model), "encoder.layer")
    layers = [
        LayerNames(
            q=f"{root}.{i}.attention.self.query",
            k=f"{root}.{i}.attention.self.key",
            v=f"{root}.{i}.attention.self.value",
            o=f"{root}.{i}.attention.output.dense",
            up=f"{root}.{i}.intermediate.dense",
            down=f"{root}.{i}.output.dense",
            attn=f"{root}.{i}.attention.self",
        )
        for i in range(config.num_hidden_layers)
    ]
    h = config.num_attention_heads
    return Arch("bert", layers, h, h, config.hidden_size // h, config.hidden_size, config.intermediate_size,
                body_path(model), blocks_prefix=root)


@register("gpt2")
def gpt2(model, config) -> Arch:
    root = join(body_path(model), "h")
    layers = [
        LayerNames(
            q=f"{root}.{i}.attn.c_attn",
            k=f"{root}.{i}.attn.c_attn",
            v=f"{root}.{i}.attn.c_attn",
            o=f"{root}.{i}.attn.c_proj",
            up=f"{root}.{i}.mlp.c_fc",
            down=f"{root}.{i}.mlp.c_proj",
            attn=f"{root}.{i}.attn",
        )
        for i in range(config.n_layer)
    ]
    h = config.n_head
    inner = config.n_inner or 4 * config.n_embd
    return Arch("gpt2", layers, h, h, config.n_embd // h, config.n_embd, inner, body_path(model), blocks_prefix=root,
                conv1d=True)


@register("opt")
def opt(model, config) -> Arch:
    root = join(body_path(model), "decoder.layers")
    layers = [
        LayerNames(
            q=f"{root}.{i}.self_attn.q_proj",
            k=f"{root}.{i}.self_attn.k_proj",
            v=f"{root}.{i}.self_attn.v_proj",
            o=f"{root}.{i}.self_attn.out_proj",
            up=f"{root}.{i}.fc1",
            down=f"{root}.{i}.fc2",
            attn=f"{root}.{i}.self_attn",
        )
        for i in range(config.num_hidden_layers)
    ]
    h = config.num_attention_heads
    return Arch("opt", layers, h, h, config.hidden_size // h, config.hidden_size, config.ffn_dim, body_path(model),
                blocks_prefix=root)


@register("llama", "mistral", "qwen2", "qwen3", "gemma", "olmo")
def llama(model, config) -> Arch:
    root = join(body_path(model), "layers")
    layers = [
        LayerNames(
            q=f"{root}.{i}.self_attn.q_proj",
            k=f"{root}.{i}.self_attn.k_proj",
            v=f"{root}.{i}.self_attn.v_proj",
            o=f"{root}.{i}.self_attn.o_proj",
            up=f"{root}.{i}.mlp.up_proj",
            gate=f"{root}.{i}.mlp.gate_proj",
            down=f"{root}.{i}.mlp.down_proj",
            attn=f"{root}.{i}.self_attn",
        )
        for i in range(config.num_hidden_layers)
    ]
    h = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or h
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // h
    return Arch("llama", layers, h, kv, head_dim, config.hidden_size, config.intermediate_size, body_path(model),
                blocks_prefix=root)


# How each family stores head counts on its attention module after slicing.
def set_head_count(family: str, attn, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    if family == "bert":
        attn.num_attention_heads = num_heads
        attn.all_head_size = num_heads * head_dim
    elif family == "gpt2":
        attn.num_heads = num_heads
        attn.split_size = num_heads * head_dim
    elif family == "opt":
        attn.num_heads = num_heads
    elif family == "llama":
        # forward uses view(..., -1, head_dim); num_key_value_groups stays valid because whole KV groups go.
        if hasattr(attn, "num_heads"):
            attn.num_heads = num_heads
        if hasattr(attn, "num_key_value_heads"):
            attn.num_key_value_heads = num_kv_heads


def uniform_config_update(family: str, config, heads: int | None, kv_heads: int | None, inter: int | None) -> bool:
    """Write a uniform pruned shape into the HF config so plain from_pretrained rebuilds it.

    Returns False where the config cannot express it (BERT/GPT-2/OPT derive head_dim from hidden/heads).
    """
    if heads is not None and family != "llama":
        return False
    if heads is not None:
        config.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        config.num_attention_heads = heads
        config.num_key_value_heads = kv_heads
    if inter is not None:
        field = {"bert": "intermediate_size", "llama": "intermediate_size", "opt": "ffn_dim", "gpt2": "n_inner"}[family]
        setattr(config, field, inter)
    return True
