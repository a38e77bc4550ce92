"""The layout types (`Arch`, `LayerNames`) and model-generic helpers; the families themselves are in families.py."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn



ROLES = ("q", "k", "v", "o", "up", "gate", "down")  # the projections of a block (config.PeftRole spells them too)


@dataclass(frozen=True)
class LayerNames:
    """Full dotted module names of one block. For fused qkv (GPT-2) q == k == v == the fused module."""

    q: str
    k: str
    v: str
    o: str
    up: str
    down: str
    gate: str | None = None
    attn: str = ""  # the attention module holding head-count attributes

    @property
    def fused_qkv(self) -> bool:
        return self.q == self.k == self.v

    def role(self, role: str) -> str | None:
        return getattr(self, role)


@dataclass
class Arch:
    """Layout of one model instance. `heads` counts query heads; a head *unit* is a KV group on GQA models."""

    family: str
    layers: list[LayerNames]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    body_prefix: str  # parameters outside this prefix are the task head (trained in full)
    head_modules: tuple[str, ...] = ()  # top-level modules outside the body that train in full (classifier, score)
    task_type: str | None = None  # the model class as a peft TaskType: SEQ_CLS | CAUSAL_LM (None: a bare body)
    blocks_prefix: str = ""  # dotted name of the ModuleList holding the blocks ("bert.encoder.layer")
    conv1d: bool = False  # projections are transformers' Conv1D (weight stored in x out: GPT-2)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def heads_per_unit(self) -> int:
        """Query heads per prunable unit: 1 for MHA, num_heads // num_kv_heads for GQA."""
        return self.num_heads // self.num_kv_heads

    @property
    def num_units(self) -> int:
        return self.num_kv_heads

    def peft_targets(self, roles) -> list[str]:
        """Distinct module names for the given roles (q, k, v, o, up, gate, down) in all layers."""
        names: list[str] = []
        for layer in self.layers:
            for role in roles:
                name = layer.role(role)
                if name is not None and name not in names:
                    names.append(name)
        return names

    @property
    def gated_ffn(self) -> bool:
        """True when the FFN has a gate projection (SwiGLU: up * act(gate) -> down)."""
        return bool(self.layers) and self.layers[0].gate is not None

    @property
    def fused_qkv(self) -> bool:
        return bool(self.layers) and self.layers[0].fused_qkv

    def role_dims(self, role: str, kept_units: int | None = None, kept_neurons: int | None = None) -> tuple[int, int]:
        """(in, out) features of a block projection, optionally after pruning to kept head units / neurons.
        The cost model sizes LoRA factors and base matmuls from these, never from module names."""
        u = self.num_units if kept_units is None else kept_units
        f = self.intermediate_size if kept_neurons is None else kept_neurons
        q_out, kv_out = u * self.heads_per_unit * self.head_dim, u * self.head_dim
        h = self.hidden_size
        if self.fused_qkv and role in ("q", "k", "v"):
            return h, q_out + 2 * kv_out
        return {"q": (h, q_out), "k": (h, kv_out), "v": (h, kv_out), "o": (q_out, h),
                "up": (h, f), "gate": (h, f), "down": (f, h)}[role]

    def role_label(self, role: str) -> str:
        """Canonical short name for reports: q, k, v, o, gate, up, down ('qkv' for a fused projection)."""
        return "qkv" if self.fused_qkv and role in ("q", "k", "v") else role

    def layer_roles(self) -> list[str]:
        """The distinct projections of one block, in forward order (fused qkv counts once, as q)."""
        roles = ["q"] if self.fused_qkv else ["q", "k", "v"]
        return roles + ["o"] + (["gate"] if self.gated_ffn else []) + ["up", "down"]

    def role_of(self, module_name: str) -> tuple[int, str]:
        for i, layer in enumerate(self.layers):
            for role in ROLES:
                if layer.role(role) == module_name:
                    return i, role
        raise KeyError(module_name)


def head_modules(model: nn.Module, body_prefix: str) -> tuple[str, ...]:
    """Children of the top-level model outside the body that hold parameters of their own (an LM head tied to
    the input embedding holds none: it stays frozen, like the embedding)."""
    if not body_prefix:
        return ()
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = {id(emb.weight)} if emb is not None else set()
    return tuple(name for name, child in model.named_children()
                 if name != body_prefix and any(id(p) not in tied for p in child.parameters()))


def task_type_of(model: nn.Module) -> str | None:
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    return None


def body_path(model: nn.Module) -> str:
    """Dotted path from the top-level model to its transformer body ('' if the model is the body)."""
    prefix = getattr(model, "base_model_prefix", "")
    return prefix if prefix and hasattr(model, prefix) else ""


def join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def is_conv1d(module: nn.Module) -> bool:
    """transformers.pytorch_utils.Conv1D (GPT-2): weight is (in, out), the transpose of nn.Linear."""
    return type(module).__name__ == "Conv1D"


def is_causal_lm(model: nn.Module) -> bool:
    return task_type_of(model) == "CAUSAL_LM"


def output_embedding_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the output embedding (an LM head, often tied to the input embedding)."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None:
        return set()
    return {f"{name}.{p}" for name, m in model.named_modules() if m is out for p, _ in m.named_parameters()}


POSITION_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx")  # config fields of the position limit
PADDING_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert")  # positions start after the padding index


def position_limit_of(config) -> int | None:
    """Longest input (tokens) a model config's position embeddings allow; None when unknown."""
    limit = next((getattr(config, k) for k in POSITION_FIELDS if isinstance(getattr(config, k, None), int)), None)
    if limit is not None and getattr(config, "model_type", None) in PADDING_OFFSET_POSITIONS:
        limit -= (getattr(config, "pad_token_id", None) or 0) + 1  # 514 embeddings hold 512 tokens
    return limit if limit and limit > 0 else None
