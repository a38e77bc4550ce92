"""Architecture layouts (get_arch) and pruning-plan selection (plan.py)."""
from __future__ import annotations

import json

import pytest
import torch
from models import tiny
from torch import nn

from prunetune.arch import get_arch, supported_families
from prunetune.errors import PrunetuneError
from prunetune.plan import (PruningPlan, Scores, keep_topk, make_plan, n_remove, select_heads, select_modules,
                            select_neurons, select_ranks)

FAMILIES = ["bert", "gpt2", "opt", "llama"]

# family -> (layers, heads, kv heads, heads per unit, head_dim, hidden, intermediate)
EXPECTED = {
    "bert": (2, 4, 4, 1, 8, 32, 48),
    "gpt2": (2, 4, 4, 1, 8, 32, 48),
    "opt": (2, 4, 4, 1, 8, 32, 48),
    "llama": (2, 6, 3, 2, 8, 48, 40),
}


# ------------------------------------------------------------------------------------------- get_arch
@pytest.mark.parametrize("family", FAMILIES)
def test_get_arch_shapes(family):
    arch = get_arch(tiny(family))
    layers, heads, kv, hpu, head_dim, hidden, inter = EXPECTED[family]
    assert arch.family == family
    assert arch.num_layers == layers and len(arch.layers) == layers
    assert arch.num_heads == heads
    assert arch.num_kv_heads == kv
    assert arch.num_units == kv
    assert arch.heads_per_unit == hpu
    assert arch.head_dim == head_dim
    assert arch.hidden_size == hidden
    assert arch.intermediate_size == inter


@pytest.mark.parametrize("family", FAMILIES)
def test_get_arch_module_names_exist_and_have_the_right_shapes(family):
    model = tiny(family)
    arch = get_arch(model)
    modules = dict(model.named_modules())
    assert arch.body_prefix and hasattr(model, arch.body_prefix)

    def dims(name):  # (in, out) for nn.Linear and transformers Conv1D
        m = modules[name]
        if type(m).__name__ == "Conv1D":
            return m.weight.shape[0], m.weight.shape[1]
        return m.in_features, m.out_features

    qw = arch.num_heads * arch.head_dim
    kvw = arch.num_kv_heads * arch.head_dim
    for i, layer in enumerate(arch.layers):
        for role in ("q", "k", "v", "o", "up", "gate", "down", "attn"):
            name = getattr(layer, role)
            if name is None:
                assert role == "gate" and family != "llama"
                continue
            assert name in modules, (role, name)
            assert f".{i}." in name
        assert (layer.gate is not None) == (family == "llama")
        assert layer.fused_qkv == (family == "gpt2")
        if layer.fused_qkv:
            assert dims(layer.q) == (arch.hidden_size, qw + 2 * kvw)
        else:
            assert dims(layer.q) == (arch.hidden_size, qw)
            assert dims(layer.k) == (arch.hidden_size, kvw)
            assert dims(layer.v) == (arch.hidden_size, kvw)
        assert dims(layer.o) == (qw, arch.hidden_size)
        assert dims(layer.up) == (arch.hidden_size, arch.intermediate_size)
        assert dims(layer.down) == (arch.intermediate_size, arch.hidden_size)
        if layer.gate:
            assert dims(layer.gate) == (arch.hidden_size, arch.intermediate_size)
        # role_of inverts the layout
        assert arch.role_of(layer.o) == (i, "o")
        assert arch.role_of(layer.down) == (i, "down")


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_targets_are_distinct_linears(family):
    model = tiny(family)
    arch = get_arch(model)
    names = arch.peft_targets(["q", "k", "v", "o", "up", "gate", "down"])
    assert len(names) == len(set(names))
    per_layer = {"bert": 6, "gpt2": 4, "opt": 6, "llama": 7}[family]  # GPT-2: q/k/v fused in c_attn
    assert len(names) == per_layer * arch.num_layers
    modules = dict(model.named_modules())
    assert all(n in modules for n in names)
    assert arch.peft_targets(["o", "down"]) == [n for layer in arch.layers for n in (layer.o, layer.down)]


def test_llama_gqa_units():
    arch = get_arch(tiny("llama"))
    assert (arch.num_heads, arch.num_kv_heads, arch.heads_per_unit, arch.num_units) == (6, 3, 2, 3)


def test_llama_causal_lm_has_the_same_layout():
    a, b = get_arch(tiny("llama")), get_arch(tiny("llama", causal_lm=True))
    assert a.layers == b.layers and a.num_units == b.num_units


@pytest.mark.parametrize("family, causal_lm, heads, task_type", [
    ("bert", False, ("classifier",), "SEQ_CLS"), ("gpt2", False, ("score",), "SEQ_CLS"),
    ("opt", False, ("score",), "SEQ_CLS"), ("llama", False, ("score",), "SEQ_CLS"),
    ("llama", True, ("lm_head",), "CAUSAL_LM")])
def test_head_modules_and_task_type(family, causal_lm, heads, task_type):
    """What a plain-peft LoraConfig needs: the trained head as modules_to_save, the model class as task_type."""
    model = tiny(family, causal_lm=causal_lm)
    arch = get_arch(model)
    assert (arch.head_modules, arch.task_type) == (heads, task_type)


def test_tied_lm_head_is_not_a_head_module():
    from transformers import LlamaConfig, LlamaForCausalLM

    tied = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=24, tie_word_embeddings=True))
    assert tied.lm_head.weight is tied.get_input_embeddings().weight
    assert get_arch(tied).head_modules == ()  # frozen with the embedding it shares


def _assert_lists_supported(exc_info):
    msg = str(exc_info.value)
    for fam in ("bert", "gpt2", "opt", "llama"):
        assert fam in msg
    assert "supported" in msg


def test_unsupported_t5_raises_with_supported_list():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    with pytest.raises(PrunetuneError) as exc:
        get_arch(T5ForConditionalGeneration(cfg))
    _assert_lists_supported(exc)
    assert "t5" in str(exc.value)


def test_unsupported_plain_module_raises_with_supported_list():
    class Mamba(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Cfg", (), {"model_type": "mamba"})()
            self.lin = nn.Linear(2, 2)

    with pytest.raises(PrunetuneError) as exc:
        get_arch(Mamba())
    _assert_lists_supported(exc)
    assert "mamba" in str(exc.value)
    with pytest.raises(PrunetuneError):
        get_arch(nn.Linear(2, 2))  # no config at all
    assert {"bert", "gpt2", "opt", "llama"} <= set(supported_families())


# ---------------------------------------------------------------------------------------- n_remove
def test_n_remove_round_half_up_counts_not_quantiles():
    assert n_remove(1 / 3, 16) == 5
    assert n_remove(0.333333333, 16) == 5  # the reference code's quantile threshold gave 6 vs 5 here
    assert n_remove(0.0, 16) == 0
    assert n_remove(1.0, 16) == 16
    assert n_remove(0.5, 5) == 3  # 2.5 rounds half UP (Python's round() would give 2)
    assert n_remove(0.5, 3) == 2
    assert n_remove(0.25, 6) == 2  # 1.5 -> 2
    assert n_remove(0.3125, 16) == 5  # paper setting: 5/16 heads removed


def test_select_heads_counts_and_smallest_signed_values():
    g = torch.Generator().manual_seed(0)
    masks = [torch.randn(16, generator=g) for _ in range(3)]
    for rho, removed in ((1 / 3, 5), (0.333333333, 5), (0.0, 0), (0.5, 8)):
        kept = select_heads(masks, rho)
        for m, k in zip(masks, kept):
            assert len(k) == 16 - removed
            assert k == sorted(k)
            gone = [i for i in range(16) if i not in k]
            if gone:
                assert max(float(m[i]) for i in gone) <= min(float(m[i]) for i in k)
    # signed: a large negative value is removed before a small positive one
    m = torch.tensor([0.5, -3.0, 0.1, 2.0])
    assert select_heads([m], 0.25) == [[0, 2, 3]]
    assert select_heads([m], 0.5) == [[0, 3]]
    assert select_heads(masks, 0.0) == [list(range(16))] * 3


def test_select_heads_keeps_at_least_one():
    masks = [torch.randn(16), torch.randn(1), torch.randn(3)]
    kept = select_heads(masks, 0.99)
    assert [len(k) for k in kept] == [1, 1, 1]
    assert kept[0] == [int(masks[0].argmax())]
    assert select_heads(masks, 1.0) == [[int(m.argmax())] for m in masks]


def test_keep_topk_ties_break_by_lower_index():
    assert keep_topk(torch.ones(6), 3) == [0, 1, 2]
    assert keep_topk(torch.tensor([1.0, 2.0, 1.0, 2.0, 1.0]), 3) == [0, 1, 3]
    assert select_heads([torch.zeros(8)], 0.5) == [[0, 1, 2, 3]]
    # deterministic across repeated calls
    m = [torch.tensor([0.3, 0.3, 0.1, 0.3, 0.1, 0.3])]
    assert select_heads(m, 0.5) == select_heads(m, 0.5) == [[0, 1, 3]]


def test_select_neurons_global_exact_count_and_floor():
    g = torch.Generator().manual_seed(1)
    # layer 0 has all the small values: a plain global top-k would empty it
    masks = [torch.rand(40, generator=g) * 0.01, torch.rand(40, generator=g) + 1.0, torch.rand(20, generator=g) + 2.0]
    total = 100
    for rho in (1 / 3, 0.5, 0.1):
        kept = select_neurons(masks, rho, "global", floor=0.05)
        assert sum(len(k) for k in kept) == total - n_remove(rho, total)
        assert all(k == sorted(k) for k in kept)
    kept = select_neurons(masks, 0.5, "global", floor=0.05)
    # floor: ceil(0.05 * 40) = 2 survive in layer 0, the rest of the budget comes from layer 1 (smallest next)
    assert len(kept[0]) == 2
    assert kept[0] == sorted(torch.topk(masks[0], 2).indices.tolist())
    assert len(kept[1]) == 40 - (50 - 38) and len(kept[2]) == 20
    gone1 = [j for j in range(40) if j not in kept[1]]
    assert max(float(masks[1][j]) for j in gone1) <= min(float(masks[1][j]) for j in kept[1])
    # larger floor
    kept = select_neurons(masks, 0.5, "global", floor=0.25)
    assert len(kept[0]) == 10 and sum(len(k) for k in kept) == 50
    # floor >= 1 neuron even with floor 0
    kept = select_neurons(masks, 0.99, "global", floor=0.0)
    assert all(len(k) >= 1 for k in kept)
    assert select_neurons(masks, 0.0) == [list(range(40)), list(range(40)), list(range(20))]


def test_select_neurons_global_removes_globally_smallest():
    masks = [torch.tensor([0.1, 0.9, 0.8, 0.7]), torch.tensor([0.2, 0.3, 0.95, 0.99])]
    # remove 3 of 8 -> 0.1, 0.2, 0.3
    assert select_neurons(masks, 3 / 8, "global", floor=0.0) == [[1, 2, 3], [2, 3]]


def test_select_neurons_layer_scope_uniform():
    g = torch.Generator().manual_seed(2)
    masks = [torch.rand(48, generator=g) * (i + 1) for i in range(3)]
    kept = select_neurons(masks, 1 / 3, "layer")
    assert [len(k) for k in kept] == [32, 32, 32]
    for m, k in zip(masks, kept):
        assert k == keep_topk(m, 32)
    assert [len(k) for k in select_neurons(masks, 0.999, "layer")] == [1, 1, 1]


def test_select_modules():
    imp = {"b": 0.3, "a": 0.1, "c": 0.5, "d": 0.2}
    assert select_modules(imp, 0.5) == ["b", "c"]
    assert select_modules(imp, 0.0) == ["a", "b", "c", "d"]
    assert select_modules(imp, 0.99) == ["c"]  # keeps >= 1
    assert select_modules(imp, 1.0) == ["c"]
    # ties broken deterministically by name order
    assert select_modules({"x": 1.0, "w": 1.0, "v": 1.0}, 1 / 3) == ["v", "w"]


def test_select_ranks_global_and_drops_empty_modules():
    scores = {"m1": torch.tensor([0.1, 0.2, 0.3, 0.4]), "m2": torch.tensor([5.0, 0.05, 6.0, 7.0]),
              "m3": torch.tensor([0.01, 0.02, 0.03, 0.04]), "gone": torch.tensor([9.0, 9.0, 9.0, 9.0])}
    # 'gone' is not a surviving module: its ranks are neither counted nor kept
    out = select_ranks(scores, ["m1", "m2", "m3"], 0.5)  # remove 6 of 12
    assert out == {"m1": [1, 2, 3], "m2": [0, 2, 3]} and "m3" not in out
    assert sum(len(v) for v in out.values()) == 12 - 6
    assert select_ranks(scores, ["m1", "m2"], 0.0) == {"m1": [0, 1, 2, 3], "m2": [0, 1, 2, 3]}
    # ties: lower module position, then lower rank index goes first
    tied = {"a": torch.ones(2), "b": torch.ones(2)}
    assert select_ranks(tied, ["a", "b"], 0.5) == {"b": [0, 1]}
    assert select_ranks(tied, ["a", "b"], 0.25) == {"a": [1], "b": [0, 1]}


# ----------------------------------------------------------------------------------------- make_plan
def _plan(family="bert", heads=1 / 3, ffn=1 / 3, modules=0.5, ranks=0.5, seed=0, **kw):
    model = tiny(family)
    arch = get_arch(model)
    g = torch.Generator().manual_seed(seed)
    names = arch.peft_targets(["q", "k", "v", "o", "up", "gate", "down"])
    scores = Scores(head=[torch.rand(arch.num_units, generator=g) for _ in arch.layers],
                    ffn=[torch.rand(arch.intermediate_size, generator=g) for _ in arch.layers],
                    module={n: float(torch.rand(1, generator=g)) for n in names},
                    rank={n: torch.rand(8, generator=g) for n in names})
    plan = make_plan(arch=arch, scores=scores, heads=heads, ffn=ffn, modules=modules, ranks=ranks,
                     model_type=model.config.model_type, meta={"note": "x", "vals": [1.5, 2]}, **kw)
    return plan, arch, names


@pytest.mark.parametrize("family", FAMILIES)
def test_make_plan_counts(family):
    plan, arch, names = _plan(family)
    assert plan.family == family and plan.num_layers == arch.num_layers
    assert plan.num_units == arch.num_units and plan.heads_per_unit == arch.heads_per_unit
    units_kept = arch.num_units - n_remove(1 / 3, arch.num_units)
    assert [len(k) for k in plan.kept_heads] == [units_kept] * arch.num_layers
    total = arch.num_layers * arch.intermediate_size
    assert sum(len(k) for k in plan.kept_neurons) == total - n_remove(1 / 3, total)
    assert len(plan.peft_ranks) <= len(names) - n_remove(0.5, len(names))
    assert set(plan.peft_ranks) <= set(names)
    assert plan.peft_orig_ranks == {n: 8 for n in names}
    surviving = len(names) - n_remove(0.5, len(names))
    assert sum(len(v) for v in plan.peft_ranks.values()) == 8 * surviving - n_remove(0.5, 8 * surviving)
    assert plan.heads_pruned() and plan.ffn_pruned()
    s = plan.summary()
    assert s["heads_kept"] == f"{units_kept * arch.heads_per_unit * arch.num_layers}/{arch.num_heads * arch.num_layers}"


def test_make_plan_zero_rates_keep_everything():
    plan, arch, names = _plan("llama", 0.0, 0.0, 0.0, 0.0)
    assert not plan.heads_pruned() and not plan.ffn_pruned()
    assert plan.kept_heads == [list(range(arch.num_units))] * arch.num_layers
    assert plan.peft_ranks == {n: list(range(8)) for n in names}
    assert plan.uniform_heads() == arch.num_units and plan.uniform_neurons() == arch.intermediate_size


def test_make_plan_is_deterministic():
    a, _, _ = _plan("opt", seed=3)
    b, _, _ = _plan("opt", seed=3)
    assert a == b and a.to_json() == b.to_json()


def test_make_plan_layer_scope_uniform_neurons():
    plan, arch, _ = _plan("llama", ffn_scope="layer")
    assert plan.uniform_neurons() == arch.intermediate_size - n_remove(1 / 3, arch.intermediate_size)


# --------------------------------------------------------------------------------------- plan JSON
def test_plan_json_round_trip(tmp_path):
    plan, _, _ = _plan("llama")
    again = PruningPlan.from_dict(json.loads(plan.to_json()))
    assert again == plan
    plan.save(tmp_path / "plan.json")
    loaded = PruningPlan.load(tmp_path / "plan.json")
    assert loaded == plan
    assert loaded.summary() == plan.summary()
    assert loaded.uniform_heads() == plan.uniform_heads()


def test_plan_load_refuses_bad_files(tmp_path):
    plan, _, _ = _plan("bert")
    data = json.loads(plan.to_json())
    with pytest.raises(PrunetuneError, match="version"):
        PruningPlan.from_dict(dict(data, version=99))
    with pytest.raises(PrunetuneError, match="not a prunetune pruning plan"):
        PruningPlan.from_dict(dict(data, bogus=1))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PrunetuneError, match="cannot read"):
        PruningPlan.load(tmp_path / "bad.json")
    with pytest.raises(PrunetuneError, match="cannot read"):
        PruningPlan.load(tmp_path / "missing.json")


def test_check_matches_refuses_other_model_shapes():
    plan, arch, _ = _plan("bert")
    plan.check_matches(arch)  # its own model: fine
    plan.check_matches(get_arch(tiny("bert", seed=5)))  # same shape, other weights: fine
    for other in ("gpt2", "opt", "llama"):
        with pytest.raises(PrunetuneError, match="does not match"):
            plan.check_matches(get_arch(tiny(other)))
    from transformers import BertConfig, BertForSequenceClassification

    wider = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=64))
    with pytest.raises(PrunetuneError, match="does not match"):
        plan.check_matches(get_arch(wider))
    deeper = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3,
                                                      num_attention_heads=4, intermediate_size=48))
    with pytest.raises(PrunetuneError, match="does not match"):
        plan.check_matches(get_arch(deeper))


def test_apply_plan_refuses_a_foreign_plan():
    from prunetune.surgery import apply_plan

    plan, _, _ = _plan("llama")
    model = tiny("opt")
    with pytest.raises(PrunetuneError):
        apply_plan(model, get_arch(model), plan)
