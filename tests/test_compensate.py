"""prune.compensate (bias compensation): removed heads and FFN neurons are replaced by their mean contribution.

The exactness claim: when every removed unit feeds its projection a constant (v and up weights zeroed, so a head
outputs its v bias and a neuron act(its up bias)), the window mean IS that constant, and the pruned model with
compensation computes exactly what the unpruned masked model computes; without compensation it does not."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from models import batch, random_masks, random_plan, tiny, tiny_lora, zero_pruned_lora

from prunetune.arch import get_arch, is_conv1d
from prunetune.config import from_dict
from prunetune.errors import PrunetuneError
from prunetune.scores import StructureMasks
from prunetune.surgery import check_compensable, compensate_bias, prune_lora_model
from prunetune.units.lora import lora_layers

R, ALPHA = 4, 8.0


def _logits(model, b):
    model.eval()
    with torch.no_grad():
        return model(**b).logits


def _constant_units(hf, arch) -> None:
    """Zero the v and up weights (and their LoRA B): every head outputs its v bias, every neuron act(up bias);
    those biases are made large, so what a removed unit contributed is visible in the logits."""
    e = arch.num_heads * arch.head_dim
    lora = lora_layers(hf)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for layer in arch.layers:
            for name in (layer.v, layer.up):
                module = getattr(hf.get_submodule(name), "base_layer", hf.get_submodule(name))
                module.bias.add_(2.0 * torch.randn(module.bias.shape, generator=g))
                if name == layer.v and layer.fused_qkv:  # GPT-2 c_attn: the v third of the fused output
                    (module.weight[:, 2 * e:] if is_conv1d(module) else module.weight[2 * e:]).zero_()
                    if name in lora:
                        lora[name].lora_B["default"].weight[2 * e:].zero_()
                else:
                    module.weight.zero_()
                    if name in lora:
                        lora[name].lora_B["default"].weight.zero_()


def _collect(pm, masks, b) -> tuple[list, list]:
    masks.collect_means, masks.token_mask = True, b["attention_mask"]
    pm.eval()  # dropout off; the hooks collect on grad-enabled (training) forwards
    pm(**b)
    masks.commit_inputs()
    masks.collect_means = False
    return masks.input_means()


def _masked(family, plan, heads, ffn, zero_removed_lora: bool):
    """The reference: the same model, masked with the given values, every head and neuron live."""
    pm, hf, arch, _ = tiny_lora(family, R, ALPHA, seed=40)
    _constant_units(hf, arch)
    if zero_removed_lora:
        zero_pruned_lora(hf, plan)
    StructureMasks(arch).attach(hf).set_(heads, ffn)
    return pm, arch


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("family", ["bert", "gpt2", "opt"])
def test_compensated_pruning_equals_the_masked_model_when_removed_units_are_constant(family, merge):
    """Removed LoRA modules and ranks are live while the means are taken. Without merge_removed they are
    dropped, so the reference has them zeroed and compensation counts only the LoRA that stays; with it,
    they stay in the base and the reference keeps them."""
    pm, hf, arch, names = tiny_lora(family, R, ALPHA, seed=40)
    _constant_units(hf, arch)
    masks = StructureMasks(arch).attach(hf)
    random_masks(masks, 43)
    plan = random_plan(arch, masks, names, R, 1 / 3, 1 / 3, 0.5, 0.5, seed=44, model_type=hf.config.model_type)
    assert plan.heads_pruned() and plan.ffn_pruned()
    # LoRA on o / down, kept with some ranks removed and removed outright: every case of the LoRA term
    od = [n for layer in arch.layers for n in (layer.o, layer.down)]
    assert any(n in plan.peft_ranks and len(plan.peft_ranks[n]) < R for n in od)
    assert any(n not in plan.peft_ranks for n in od)
    b = batch(seed=5)
    means = _collect(pm, masks, b)
    heads, ffn = masks.head_values(), masks.ffn_values()
    masks.detach()
    other, other_arch = _masked(family, plan, heads, ffn, False)  # the same model, pruned without compensation
    plain, _ = prune_lora_model(other, other_arch, plan, R, ALPHA, 0.0, heads, ffn, merge_removed=merge)
    new, _ = prune_lora_model(pm, arch, plan, R, ALPHA, 0.0, heads, ffn, means=means, merge_removed=merge)
    for seed in (5, 9):  # exact on inputs the means were not taken from too (the removed units are constant)
        ref = _logits(_masked(family, plan, heads, ffn, zero_removed_lora=not merge)[0], batch(seed=seed))
        torch.testing.assert_close(_logits(new, batch(seed=seed)), ref, atol=1e-5, rtol=0)
        assert (_logits(plain, batch(seed=seed)) - ref).abs().max() > 1e-3  # compensation makes them equal


@pytest.mark.parametrize("family", ["bert", "gpt2", "opt"])
def test_means_are_taken_over_real_tokens_after_the_masks(family):
    """The window mean of an o / down input: masked values, padding left out (OPT's FFN sees (batch x seq)
    flattened), summed across committed steps; an evaluation forward and a non-finite step add nothing."""
    hf = tiny(family)
    arch = get_arch(hf)
    masks = StructureMasks(arch).attach(hf)
    random_masks(masks, 3)
    seen = {"o": [], "down": []}
    handles = [hf.get_submodule(getattr(arch.layers[1], role)).register_forward_pre_hook(  # after the masks
        lambda _m, args, role=role: seen[role].append(args[0].detach().clone())) for role in seen]
    masks.collect_means = True
    real = {"o": [], "down": []}
    for seed in (1, 2):
        b = batch(seed=seed)
        masks.token_mask = b["attention_mask"]
        hf(**b)
        masks.commit_inputs(finite=True)
        for role, xs in seen.items():
            real[role].append(xs[-1].reshape(-1, xs[-1].shape[-1])[b["attention_mask"].reshape(-1) > 0])
    with torch.no_grad():  # an evaluation forward adds nothing
        hf(**batch(seed=3))
    masks.token_mask = batch(seed=4)["attention_mask"]
    hf(**batch(seed=4))
    masks.commit_inputs(finite=False)  # a step the fp16 scaler skips adds nothing
    hf(**batch(seed=4))
    masks._pending_sum["ffn"][0, 0] = float("inf")  # nor does a step whose activations overflowed
    masks.commit_inputs(finite=True)
    for h in handles:
        h.remove()
    heads, ffn = masks.input_means()
    torch.testing.assert_close(torch.tensor(heads[1]), torch.cat(real["o"]).mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(ffn[1]), torch.cat(real["down"]).mean(0), atol=1e-6, rtol=0)
    assert masks.tokens_seen == sum(len(t) for t in real["o"]) < 2 * 3 * 9  # padding left out
    # a checkpoint round trip keeps the running sums (rank 0); another data-parallel rank starts from zero
    fresh = StructureMasks(arch)
    fresh.load_score_state(masks.score_state())
    assert fresh.input_means() == masks.input_means()
    import prunetune.scores.masks as masks_module

    original = masks_module.rank
    masks_module.rank = lambda: 1
    try:
        other = StructureMasks(arch)
        other.load_score_state(masks.score_state())
    finally:
        masks_module.rank = original
    assert float(other.input_n["heads"].sum()) == 0 and float(other.input_sum["ffn"].abs().sum()) == 0


def test_compensate_bias_keeps_a_projections_mean_output():
    """On one Linear with LoRA: mean over tokens of the pruned layer's output == the full layer's."""
    g = torch.Generator().manual_seed(0)
    hf = tiny("bert")
    arch = get_arch(hf)
    x = torch.randn(50, arch.intermediate_size, generator=g) + 1.0
    down = hf.get_submodule(arch.layers[0].down)
    a = torch.randn(R, arch.intermediate_size, generator=g)
    bm = torch.randn(arch.hidden_size, R, generator=g)
    full = down(x) + 2.0 * x @ a.T @ bm.T
    kept = list(range(0, arch.intermediate_size, 3))
    all_heads, all_neurons = list(range(arch.num_units)), list(range(arch.intermediate_size))
    plan = SimpleNamespace(kept_heads=[all_heads, all_heads], kept_neurons=[kept, all_neurons],
                           num_units=arch.num_units, intermediate_size=arch.intermediate_size)
    means = ([[0.0] * arch.hidden_size] * 2, [x.mean(0).tolist(), [0.0] * arch.intermediate_size])
    compensate_bias(hf, arch, plan, means, lora={arch.layers[0].down: {"A": a, "B": bm, "scaling": 2.0}})
    with torch.no_grad():
        pruned = x[:, kept] @ down.weight[:, kept].T + down.bias + 2.0 * x[:, kept] @ a[:, kept].T @ bm.T
    torch.testing.assert_close(pruned.mean(0), full.detach().mean(0), atol=1e-5, rtol=1e-6)  # outputs ~70: fp32


def test_models_without_output_biases_and_the_fade_are_refused():
    hf = tiny("llama")
    with pytest.raises(PrunetuneError, match="prune.compensate needs biases"):
        check_compensable(hf, get_arch(hf))
    check_compensable(tiny("bert"), get_arch(tiny("bert")))  # BERT has them
    with pytest.raises(PrunetuneError, match="cannot be combined with prune.gradual"):
        from_dict({"prune": {"compensate": True, "gradual": 0.1}})
    assert from_dict({"prune": {"compensate": True}}).prune.compensate is True
