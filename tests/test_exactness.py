"""The core correctness claim: a masked model whose pruned units are zeroed computes exactly what the
physically pruned model computes (LoRA and serial adapters, all four families, with mask folding or without)."""
from __future__ import annotations

import pytest
import torch
from models import (LLAMA_SHAPED, batch, random_masks, random_plan, randomize_biases, tiny, tiny_lora, zero_pruned_lora,
                    zero_pruned_masks)

from prunetune.arch import get_arch
from prunetune.methods.common import adapter_positions
from prunetune.plan import n_remove
from prunetune.scores import StructureMasks
from prunetune.surgery import prune_adapter_model, prune_lora_model
from prunetune.surgery.peft import apply_ops
from prunetune.units.adapters import AdapterSet
from prunetune.units.lora import extract_lora, lora_layers

FAMILIES = ["bert", "gpt2", "opt", "llama"]
# Mistral, Qwen2/3, Gemma and OLMo go through arch/'s llama entry (their own norms, Qwen3's per-head q/k norms,
# Gemma's head_dim): the core surgery tests run on them too
ALL_FAMILIES = FAMILIES + LLAMA_SHAPED
R, ALPHA = 4, 8.0
ATOL = 1e-5


def _logits(model, b):
    model.eval()
    with torch.no_grad():
        return model(**b).logits


def _masked_lora(family, kept_value=None, impl="sdpa", seed=0):
    """(masked reference logits, peft model, arch, plan, masks) with pruned units zeroed."""
    pm, hf, arch, names = tiny_lora(family, R, ALPHA, seed=seed)
    hf.set_attn_implementation(impl)
    masks = StructureMasks(arch).attach(hf)
    random_masks(masks, seed + 3)
    plan = random_plan(arch, masks, names, R, 1 / 3, 1 / 3, 0.5, 0.5, seed=seed + 4, model_type=hf.config.model_type)
    zero_pruned_masks(masks, plan, kept_value)
    zero_pruned_lora(hf, plan)
    return pm, hf, arch, plan, masks


def _base(module):
    return getattr(module, "base_layer", module)


# ----------------------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_lora_masked_equals_pruned_with_fold(family, impl):
    pm, hf, arch, plan, masks = _masked_lora(family, impl=impl)
    assert plan.heads_pruned() and plan.ffn_pruned()
    assert 0 < len(plan.peft_ranks) < len(plan.peft_orig_ranks)
    b = batch()
    ref = _logits(pm, b)
    masks.detach()
    unmasked = _logits(pm, b)
    assert (ref - unmasked).abs().max() > 1e-3  # the masks really matter, so folding is tested
    new, _ops = prune_lora_model(pm, arch, plan, R, ALPHA, 0.0, masks.head_values(), masks.ffn_values())
    out = _logits(new, b)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    # the pruned model really is smaller
    n_before = sum(p.numel() for p in tiny(family).parameters())
    new_hf = new.base_model.model
    n_after = sum(p.numel() for n, p in new_hf.named_parameters() if "lora_" not in n)
    assert n_after < n_before


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_lora_masks_one_dropped_without_fold(family):
    pm, hf, arch, plan, masks = _masked_lora(family, kept_value=1.0, seed=10)
    b = batch(seed=2)
    ref = _logits(pm, b)
    masks.detach()
    new, _ = prune_lora_model(pm, arch, plan, R, ALPHA, 0.0)  # no masks: dropped
    torch.testing.assert_close(_logits(new, b), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_lora_ranks_and_scaling(family):
    pm, hf, arch, plan, masks = _masked_lora(family, seed=20)
    old = extract_lora(hf)
    masks.detach()
    new, ops = prune_lora_model(pm, arch, plan, R, ALPHA, 0.0, masks.head_values(), masks.ffn_values())
    layers = lora_layers(new.base_model.model)
    assert set(layers) == set(plan.peft_ranks)  # removed modules carry no LoRA at all
    for name, kept in plan.peft_ranks.items():
        layer = layers[name]
        assert layer.r["default"] == len(kept)
        # alpha_pattern keeps scaling = alpha / r_original for the kept ranks
        assert layer.scaling["default"] == pytest.approx(ALPHA / R)
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert A.shape[0] == B.shape[1] == len(kept)
        # the optimizer-state slicing ops map the old tensors to the new ones (modulo folded o/down A columns)
        a_ops, b_ops = ops[f"{name}.lora_A.default.weight"], ops[f"{name}.lora_B.default.weight"]
        assert apply_ops(old[name]["B"], b_ops).shape == B.shape
        assert apply_ops(old[name]["A"], a_ops).shape == A.shape
        torch.testing.assert_close(apply_ops(old[name]["B"], b_ops), B.detach())
        role = arch.role_of(name)[1]
        if role not in ("o", "down"):
            torch.testing.assert_close(apply_ops(old[name]["A"], a_ops), A.detach())


# ------------------------------------------------------------------------------------------ shapes
def test_llama_gqa_prunes_whole_kv_groups():
    pm, hf, arch, plan, masks = _masked_lora("llama", seed=30)
    hd, hpu = arch.head_dim, arch.heads_per_unit
    assert (hd, hpu, arch.num_units) == (8, 2, 3)
    b = batch()
    ref = _logits(pm, b)
    masks.detach()
    new, _ = prune_lora_model(pm, arch, plan, R, ALPHA, 0.0, masks.head_values(), masks.ffn_values())
    new_hf = new.base_model.model
    for i, layer in enumerate(arch.layers):
        units = len(plan.kept_heads[i])
        removed = arch.num_units - units
        assert removed == n_remove(1 / 3, 3) == 1
        q, k, v, o = (_base(new_hf.get_submodule(getattr(layer, r))) for r in ("q", "k", "v", "o"))
        assert q.out_features == q.weight.shape[0] == arch.num_heads * hd - removed * hpu * hd
        assert k.out_features == k.weight.shape[0] == arch.num_kv_heads * hd - removed * hd
        assert v.out_features == v.weight.shape[0] == arch.num_kv_heads * hd - removed * hd
        assert o.in_features == o.weight.shape[1] == q.out_features
        attn = new_hf.get_submodule(layer.attn)
        assert attn.num_key_value_groups == hpu  # stays uniform: whole groups went
        up, gate, down = (_base(new_hf.get_submodule(getattr(layer, r))) for r in ("up", "gate", "down"))
        assert up.out_features == gate.out_features == down.in_features == len(plan.kept_neurons[i])
    torch.testing.assert_close(_logits(new, b), ref, atol=ATOL, rtol=0)


def test_llama_gqa_kept_rows_are_the_kept_groups():
    hf = tiny("llama")
    arch = get_arch(hf)
    orig = {n: p.detach().clone() for n, p in hf.named_parameters()}
    from prunetune.plan import PruningPlan
    from prunetune.surgery import apply_plan

    plan = PruningPlan("llama", "llama", 2, 3, 2, 8, 40, [[0, 2], [1]], [list(range(40))] * 2)
    apply_plan(hf, arch, plan)
    for i, groups in enumerate(plan.kept_heads):
        layer = arch.layers[i]
        q_rows = torch.cat([torch.arange(g * 16, g * 16 + 16) for g in groups])
        kv_rows = torch.cat([torch.arange(g * 8, g * 8 + 8) for g in groups])
        assert torch.equal(hf.get_submodule(layer.q).weight, orig[layer.q + ".weight"][q_rows])
        assert torch.equal(hf.get_submodule(layer.k).weight, orig[layer.k + ".weight"][kv_rows])
        assert torch.equal(hf.get_submodule(layer.v).weight, orig[layer.v + ".weight"][kv_rows])
        assert torch.equal(hf.get_submodule(layer.o).weight, orig[layer.o + ".weight"][:, q_rows])
    with torch.no_grad():
        hf(**batch())  # layers with different head counts still run


def test_gpt2_fused_c_attn_shrinks_by_three_head_dims_per_head():
    pm, hf, arch, plan, masks = _masked_lora("gpt2", seed=40)
    b = batch()
    ref = _logits(pm, b)
    masks.detach()
    orig = tiny("gpt2", seed=40)
    e = arch.num_heads * arch.head_dim
    new, _ = prune_lora_model(pm, arch, plan, R, ALPHA, 0.0, masks.head_values(), masks.ffn_values())
    new_hf = new.base_model.model
    for i, layer in enumerate(arch.layers):
        removed = arch.num_units - len(plan.kept_heads[i])
        assert removed == 1
        c_attn = _base(new_hf.get_submodule(layer.q))
        assert c_attn.weight.shape == (arch.hidden_size, 3 * e - 3 * removed * arch.head_dim)  # Conv1D: (in, out)
        assert c_attn.nf == c_attn.weight.shape[1] and c_attn.bias.shape == (c_attn.nf,)
        c_proj = _base(new_hf.get_submodule(layer.o))
        assert c_proj.weight.shape == (e - removed * arch.head_dim, arch.hidden_size)
        attn = new_hf.get_submodule(layer.attn)
        assert attn.split_size == e - removed * arch.head_dim
        # q, k and v of the same heads are kept (columns of the fused weight)
        cols = torch.cat([torch.arange(h * 8, h * 8 + 8) for h in plan.kept_heads[i]])
        w0 = orig.get_submodule(layer.q).weight
        assert torch.equal(c_attn.weight, torch.cat([w0[:, cols], w0[:, e + cols], w0[:, 2 * e + cols]], 1))
        fc = _base(new_hf.get_submodule(layer.up))
        assert fc.nf == fc.weight.shape[1] == len(plan.kept_neurons[i])
    torch.testing.assert_close(_logits(new, b), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_attention_respects_padding(family, impl):
    """After head surgery, a right-padded row gives the same logits as the same row without padding."""
    pm, hf, arch, plan, masks = _masked_lora(family, impl=impl, seed=50)
    masks.detach()
    new, _ = prune_lora_model(pm, arch, plan, R, ALPHA, 0.0, masks.head_values(), masks.ffn_values())
    b = batch(seed=5, bsz=3, seq=10)
    b["attention_mask"][1, -5:] = 0
    b["input_ids"][b["attention_mask"] == 0] = 0  # pad id: the decoder heads pool the last non-pad token
    full = _logits(new, b)
    for row in range(3):
        n = int(b["attention_mask"][row].sum())
        alone = _logits(new, {k: v[row:row + 1, :n] for k, v in b.items()})
        torch.testing.assert_close(full[row:row + 1], alone, atol=ATOL, rtol=0)


def test_heads_only_and_ffn_only_plans():
    for heads, ffn in ((0.5, 0.0), (0.0, 0.5)):
        pm, hf, arch, names = tiny_lora("opt", R, ALPHA, seed=60)
        masks = StructureMasks(arch).attach(hf)
        random_masks(masks, 61)
        plan = random_plan(arch, masks, names, R, heads, ffn, 0.0, 0.0, seed=62)
        assert plan.heads_pruned() == (heads > 0) and plan.ffn_pruned() == (ffn > 0)
        zero_pruned_masks(masks, plan)
        b = batch()
        ref = _logits(pm, b)
        masks.detach()
        new, _ = prune_lora_model(pm, arch, plan, R, ALPHA, 0.0, masks.head_values(), masks.ffn_values())
        torch.testing.assert_close(_logits(new, b), ref, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------ adapters
def _masked_adapters(family, seed=0, size=6):
    hf = tiny(family, seed=seed)
    randomize_biases(hf, seed + 1)
    arch = get_arch(hf)
    for p in hf.parameters():
        p.requires_grad_(False)
    names = adapter_positions(arch)
    adapters = AdapterSet(arch.hidden_size, {n: size for n in names}).attach(hf)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for p in adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    masks = StructureMasks(arch).attach(hf)
    random_masks(masks, seed + 3)
    plan = random_plan(arch, masks, names, size, 1 / 3, 1 / 3, 0.5, 0.5, seed=seed + 4, peft_kind="adapter")
    zero_pruned_masks(masks, plan)
    with torch.no_grad():
        for name in names:
            ad = adapters.get(name)
            keep = torch.zeros(size, dtype=torch.bool)
            keep[plan.peft_ranks.get(name, [])] = True
            if name not in plan.peft_ranks:  # the whole adapter goes: its delta must be 0
                ad.up.weight.zero_()
                ad.up.bias.zero_()
            ad.up.weight[:, ~keep] = 0
            ad.down.weight[~keep] = 0
            ad.down.bias[~keep] = 0
    return hf, arch, plan, masks, adapters


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_adapter_masked_equals_pruned(family):
    hf, arch, plan, masks, adapters = _masked_adapters(family)
    assert 0 < len(plan.peft_ranks) < len(plan.peft_orig_ranks)
    b = batch()
    ref = _logits(hf, b)
    masks.detach()
    removed = [adapters.get(n) for n in adapters.names() if n not in plan.peft_ranks]
    assert removed
    old = {f"adapters.{n}": p.detach().clone() for n, p in adapters.named_parameters()}
    ops = prune_adapter_model(hf, arch, plan, adapters, masks.head_values(), masks.ffn_values())
    torch.testing.assert_close(_logits(hf, b), ref, atol=ATOL, rtol=0)
    assert adapters.sizes() == {n: len(k) for n, k in plan.peft_ranks.items()}
    # removed adapters are really gone from the forward: making them non-zero changes nothing
    with torch.no_grad():
        for ad in removed:
            ad.up.bias.fill_(3.0)
    torch.testing.assert_close(_logits(hf, b), ref, atol=ATOL, rtol=0)
    assert sum(len(m._forward_hooks) for m in hf.modules()) == len(plan.peft_ranks)
    for name, kept in plan.peft_ranks.items():
        ad = adapters.get(name)
        assert ad.down.weight.shape == (len(kept), arch.hidden_size)
        assert ad.up.weight.shape == (arch.hidden_size, len(kept))
    # the optimizer-state slicing ops are keyed the way TrainState names the parameters it trains
    # ("<extras key>.<name in the AdapterSet>"), for every parameter of every kept adapter
    trained = {f"adapters.{n}": p for n, p in adapters.named_parameters()}
    assert set(ops) == set(trained)
    for n, p in trained.items():  # the ops map each old tensor onto its kept part
        torch.testing.assert_close(apply_ops(old[n], ops[n]), p.detach(), atol=0, rtol=0)


# ------------------------------------------------------------------------------------- training after
@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_lora_model_trains(family):
    pm, hf, arch, plan, masks = _masked_lora(family, seed=70)
    masks.detach()
    new, _ = prune_lora_model(pm, arch, plan, R, ALPHA, 0.0, masks.head_values(), masks.ffn_values())
    new_hf = new.base_model.model
    trainable = {n: p for n, p in new_hf.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable)
    assert all("lora_" in n or not n.startswith(arch.body_prefix + ".") for n in trainable)  # base stays frozen
    assert any(not n.startswith(arch.body_prefix + ".") for n in trainable)  # the task head trains
    b = dict(batch(), labels=torch.tensor([0, 1, 1]))
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    new.eval()  # dropout off: a deterministic loss curve (gradients flow all the same)
    losses = []
    for _ in range(4):
        loss = new(**b).loss
        opt.zero_grad()
        loss.backward()
        for n, p in trainable.items():
            assert p.grad is not None and p.grad.shape == p.shape and torch.isfinite(p.grad).all(), n
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_pruned_adapter_model_trains(family):
    hf, arch, plan, masks, adapters = _masked_adapters(family, seed=80)
    masks.detach()
    prune_adapter_model(hf, arch, plan, adapters, masks.head_values(), masks.ffn_values())
    params = list(adapters.parameters())
    b = dict(batch(), labels=torch.tensor([0, 1, 1]))
    opt = torch.optim.AdamW(params, lr=1e-2)
    hf.eval()  # dropout off: a deterministic loss curve
    losses = []
    for _ in range(4):
        loss = hf(**b).loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------------------- AdamW state over surgery
@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_kept_parameters_keep_their_sliced_adamw_state(kind):
    """After surgery every kept PEFT parameter carries exp_avg / exp_avg_sq sliced from its old state."""
    from prunetune.config import TrainConfig
    from prunetune.train import TrainState

    if kind == "lora":
        pm, hf, arch, plan, masks = _masked_lora("bert", seed=90)
        model, extras = pm, {"masks": masks}
    else:
        hf, arch, plan, masks, adapters = _masked_adapters("bert", seed=90)
        model, extras = hf, {"masks": masks, "adapters": adapters}
    state = TrainState(model, hf, extras, TrainConfig(), [batch()], 10, torch.device("cpu"))
    model.train()
    for step in range(2):  # two AdamW steps: non-trivial moments on every trained parameter
        state.optimizer.zero_grad(set_to_none=True)
        (model(**batch(seed=step), labels=torch.tensor([0, 1, 1])).loss + sum(m.sum() for m in masks.parameters())).backward()
        state.optimizer.step()
    before = {n: {k: v.clone() for k, v in state.optimizer.state[p].items()} for n, p in state.named_trainable().items()}
    masks.detach()
    if kind == "lora":
        model, ops = prune_lora_model(pm, arch, plan, R, ALPHA, 0.0)
        hf, extras = model.base_model.model, {}
    else:
        ops = prune_adapter_model(hf, arch, plan, adapters)
        extras = {"adapters": adapters}
    state.set_model(model, hf, extras, ops)
    kept = {n: p for n, p in state.named_trainable().items() if n in ops}
    assert kept and len(kept) == len(ops)
    for n, p in kept.items():
        st = state.optimizer.state.get(p)
        assert st, f"{n}: AdamW state lost at surgery"
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(st[k], apply_ops(before[n][k], ops[n]), atol=0, rtol=0)
        assert int(st["step"]) == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_removed_keeps_what_removed_lora_learned(family):
    """prune.merge_removed: masked model with every LoRA rank still live == pruned model whose removed modules and
    ranks were merged into the base (heads and neurons removed too, masks folded)."""
    pm, hf, arch, names = tiny_lora(family, R, ALPHA, seed=30)
    masks = StructureMasks(arch).attach(hf)
    random_masks(masks, 33)
    plan = random_plan(arch, masks, names, R, 1 / 3, 1 / 3, 0.5, 0.5, seed=34, model_type=hf.config.model_type)
    assert 0 < len(plan.peft_ranks) < len(plan.peft_orig_ranks)
    assert any(len(v) < R for v in plan.peft_ranks.values())  # rank pruning inside kept modules is covered too
    zero_pruned_masks(masks, plan)  # removed heads / neurons are off; removed LoRA is NOT zeroed
    b = batch(seed=3)
    ref = _logits(pm, b)
    dropped = None
    if family == "bert":  # without the merge the same plan changes the outputs (the merge really matters)
        pm2, hf2, arch2, _ = tiny_lora(family, R, ALPHA, seed=30)
        masks2 = StructureMasks(arch2).attach(hf2)
        random_masks(masks2, 33)
        zero_pruned_masks(masks2, plan)
        masks2.detach()
        dropped = _logits(prune_lora_model(pm2, arch2, plan, R, ALPHA, 0.0, masks2.head_values(),
                                           masks2.ffn_values())[0], b)
    masks.detach()
    new, _ = prune_lora_model(pm, arch, plan, R, ALPHA, 0.0, masks.head_values(), masks.ffn_values(),
                              merge_removed=True)
    out = _logits(new, b)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    if dropped is not None:
        assert (dropped - ref).abs().max() > 1e-3
    kept = {n: layer.lora_A["default"].weight.shape[0] for n, layer in lora_layers(new.base_model.model).items()}
    assert kept == {n: len(v) for n, v in plan.peft_ranks.items()}  # still pruned: only what they learned stayed
