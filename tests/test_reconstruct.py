"""prune.reconstruct (least-squares reconstruction): the kept o / down input columns absorb the removed ones.

The exactness claim: when every removed input column of o / down is a linear function of the kept ones (affine,
with prune.compensate's bias term), the window's moments recover that function and the pruned model computes
exactly what the unpruned masked model computes; without reconstruction it does not. The tests force that
structure with a pre-hook on o / down that rewrites the removed columns from the kept ones."""
from __future__ import annotations

import copy

import pytest
import torch
from models import batch, random_masks, random_plan, tiny, tiny_lora, zero_pruned_lora

from prunetune.arch import get_arch
from prunetune.config import from_dict
from prunetune.errors import PrunetuneError
from prunetune.scores import StructureMasks
from prunetune.surgery import prune_lora_model
from prunetune.surgery.base import _span

R, ALPHA = 4, 8.0
WINDOW = tuple(range(5, 13))  # batches the moments are taken on (more real tokens than kept columns: C_KK invertible)


def _logits(model, b):
    model.eval()
    with torch.no_grad():
        return model(**b).logits


def _kept(kept: list[int], n: int) -> torch.Tensor:
    out = torch.zeros(n, dtype=torch.bool)
    out[list(kept)] = True
    return out


def _columns(arch, plan):
    """(o, down) of every layer: (kept, removed) input column indices."""
    width = arch.heads_per_unit * arch.head_dim
    out = []
    for i in range(len(arch.layers)):
        heads = [u for u in range(arch.num_units) if u not in plan.kept_heads[i]]
        neurons = [j for j in range(arch.intermediate_size) if j not in plan.kept_neurons[i]]
        out.append(((_span(plan.kept_heads[i], width), _span(heads, width)),
                    (torch.tensor(plan.kept_neurons[i]), torch.tensor(neurons, dtype=torch.long))))
    return out


def _force_linear(hf, arch, plan, affine: bool, seed: int = 3) -> None:
    """Pre-hooks (registered before the masks', so they run first) that set each o / down input's removed columns
    to A @ kept columns (+ c when affine): the removed units carry nothing the kept ones do not predict."""
    g = torch.Generator().manual_seed(seed)
    for layer, cols in zip(arch.layers, _columns(arch, plan)):
        for name, (kept, gone) in zip((layer.o, layer.down), cols):
            a = torch.randn(len(gone), len(kept), generator=g, dtype=torch.float64) / len(kept) ** 0.5
            c = torch.randn(len(gone), generator=g, dtype=torch.float64) * affine

            def hook(_m, args, kept=kept, gone=gone, a=a, c=c):
                x = args[0].clone()
                x[..., gone] = x[..., kept] @ a.T + c
                return (x,) + tuple(args[1:])

            hf.get_submodule(name).register_forward_pre_hook(hook)


def _model(family, plan=None, affine=False):
    """float64: the tiny models' attention outputs are ill-conditioned (cond(C_KK) ~ 1e7 on GPT-2), so float32
    activations would leave ~1e-4 of rounding in the solve that exactness is checked to."""
    pm, hf, arch, names = tiny_lora(family, R, ALPHA, seed=40)
    pm.double()
    if plan is not None:
        _force_linear(hf, arch, plan, affine)
    return pm, hf, arch, names


def _window(pm, masks, affine: bool):
    """Collect as the estimation window does (training forwards), then the means / moments surgery uses."""
    masks.collect_means = masks.collect_moments = True
    pm.eval()  # dropout off; the hooks collect on grad-enabled (training) forwards
    for seed in WINDOW:
        b = batch(seed=seed)
        masks.token_mask = b["attention_mask"]
        pm(**b)
        masks.commit_inputs()
    masks.collect_means = masks.collect_moments = False
    return (masks.input_means() if affine else None), masks.take_moments(centered=affine)


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("family,affine", [("bert", False), ("bert", True), ("gpt2", False), ("gpt2", True), ("opt", True),
                                           ("llama", False)])
def test_reconstructed_pruning_equals_the_masked_model_when_removed_inputs_are_predictable(family, affine, merge,
                                                                                           fold):
    """With the LoRA that stays on o / down in the effective weight (kept ranks; all of it with merge_removed),
    and the bias taking the mean part when affine (prune.compensate + prune.reconstruct). Masks folded: the
    reference is the masked model. Masks dropped (the default): the kept units lose their mask as without
    reconstruction, so the reference has them at 1 and the removed units at their window values."""
    pm, hf, arch, names = _model(family)
    masks = StructureMasks(arch)
    random_masks(masks, 43)
    plan = random_plan(arch, masks, names, R, 1 / 3, 1 / 3, 0.5, 0.5, seed=44, model_type=hf.config.model_type)
    assert plan.heads_pruned() and plan.ffn_pruned()
    od = [n for layer in arch.layers for n in (layer.o, layer.down)]
    assert any(n in plan.peft_ranks and len(plan.peft_ranks[n]) < R for n in od)
    pm, hf, arch, _ = _model(family, plan, affine)  # the same model, its removed columns made predictable
    heads, ffn = masks.head_values(), masks.ffn_values()
    masks = StructureMasks(arch).attach(hf)
    masks.set_(heads, ffn)
    means, moments = _window(pm, masks, affine)
    masks.detach()

    def reference(b):
        ref, ref_hf, ref_arch, _ = _model(family, plan, affine)
        if not merge:
            zero_pruned_lora(ref_hf, plan)
        values = (heads, ffn)
        if not fold:  # kept units at 1, removed ones as in the window
            values = tuple([torch.where(_kept(kept, len(v)), torch.ones_like(v), v) for v, kept in zip(vals, keeps)]
                           for vals, keeps in ((heads, plan.kept_heads), (ffn, plan.kept_neurons)))
        StructureMasks(ref_arch).attach(ref_hf).set_(*values)
        return _logits(ref, b)

    folded = (heads, ffn) if fold else (None, None)
    other, other_hf, other_arch, _ = _model(family, plan, affine)
    plain, _ = prune_lora_model(other, other_arch, plan, R, ALPHA, 0.0, *folded, merge_removed=merge, means=means)
    new, _ = prune_lora_model(pm, arch, plan, R, ALPHA, 0.0, *folded, merge_removed=merge, means=means,
                              moments=moments, damp=0.0, dropped_masks=(heads, ffn))
    for seed in (5, 9):  # exact on inputs the moments were not taken from too
        ref = reference(batch(seed=seed))
        torch.testing.assert_close(_logits(new, batch(seed=seed)), ref, atol=1e-6, rtol=0)  # fp64 model, fp32 mask values
        assert (_logits(plain, batch(seed=seed)) - ref).abs().max() > 1e-3  # reconstruction makes them equal


@pytest.mark.parametrize("family,autocast", [("bert", False), ("opt", False), ("bert", True)])
def test_moments_are_taken_over_real_tokens_after_the_masks(family, autocast):
    """mean x x^T of an o / down input: masked values, padding left out (OPT's FFN sees (batch x seq)
    flattened); an evaluation forward and a non-finite step add nothing, and the step after a discarded one
    counts only itself; a checkpoint round trip keeps the sums. Under bf16 autocast (mixed-precision training)
    the product stays in fp32: the moments match the bf16 activations' fp64 x x^T."""
    hf = tiny(family)
    arch = get_arch(hf)
    masks = StructureMasks(arch).attach(hf)
    random_masks(masks, 3)
    seen = {"o": [], "down": []}
    for role in seen:  # after the masks' hook: what the projection receives
        hf.get_submodule(getattr(arch.layers[1], role)).register_forward_pre_hook(
            lambda _m, args, role=role: seen[role].append(args[0].detach().clone()))
    masks.collect_means = masks.collect_moments = True
    real = {"o": [], "down": []}

    def step(seed, finite=True):
        b = batch(seed=seed)
        masks.token_mask = b["attention_mask"]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            hf(**b)
        masks.commit_inputs(finite=finite)
        if finite:
            for role, xs in seen.items():
                real[role].append(xs[-1].reshape(-1, xs[-1].shape[-1])[b["attention_mask"].reshape(-1) > 0])

    step(1)
    step(2)
    with torch.no_grad():
        hf(**batch(seed=3))
    step(4, finite=False)  # a step the fp16 scaler skips adds nothing ...
    step(5)  # ... and leaves nothing behind for the next one
    state = masks.score_state()
    heads, ffn = masks.take_moments()
    for got, role in ((heads, "o"), (ffn, "down")):
        x = torch.cat(real[role]).double()
        assert seen[role][-1].dtype == (torch.bfloat16 if autocast else torch.float32)
        torch.testing.assert_close(got[1], x.T @ x / len(x), atol=1e-6, rtol=1e-5)
        assert got.shape == (len(arch.layers), x.shape[1], x.shape[1]) and got.dtype == torch.float64
    assert masks.tokens_seen == len(real["o"][0]) + len(real["o"][1]) + len(real["o"][2])
    assert "ffn2" not in masks.input_sum and masks.take_moments() is None  # taken: freed on the device
    fresh = StructureMasks(arch)
    fresh.load_score_state(state)
    torch.testing.assert_close(fresh.take_moments()[1], ffn, atol=0, rtol=0)


def test_surgery_scales_the_update_by_the_masks_it_drops():
    """light_peft.prune passes the estimate's mask values to surgery when the masks are dropped (the default),
    and none when they are folded: the result equals the explicit call, and differs without the values."""
    from prunetune.methods.light_peft import Estimate, prune

    pm, hf, arch, names = _model("bert")
    masks = StructureMasks(arch).attach(hf)
    random_masks(masks, 43)
    plan = random_plan(arch, masks, names, R, 1 / 3, 1 / 3, 0.5, 0.5, seed=44, model_type=hf.config.model_type)
    _, moments = _window(pm, masks, affine=False)
    values = ([m.tolist() for m in masks.head_values()], [m.tolist() for m in masks.ffn_values()])
    masks.detach()

    def weights(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("dense.weight")}

    got = {}
    for name, est, kwargs in (
            ("estimate", Estimate(plan=plan, moments=moments, mask_values=values), None),
            ("explicit", None, dict(dropped_masks=values)),
            ("unscaled", Estimate(plan=plan, moments=moments), None)):
        model = copy.deepcopy(pm)
        if est is not None:
            out = prune(model=model, hf=model.base_model.model, arch=arch, adapters=None, estimate=est, r=R,
                        alpha=ALPHA, dropout=0.0).model
        else:
            out = prune_lora_model(model, arch, plan, R, ALPHA, 0.0, moments=moments, **kwargs)[0]
        got[name] = weights(out)
    assert all(torch.equal(got["estimate"][n], got["explicit"][n]) for n in got["explicit"])
    assert any(not torch.allclose(got["estimate"][n], got["unscaled"][n]) for n in got["explicit"])


def test_the_ridge_term_and_the_fade_are_checked():
    with pytest.raises(PrunetuneError, match="prune.reconstruct cannot be combined with prune.gradual"):
        from_dict({"prune": {"reconstruct": True, "gradual": 0.1}})
    with pytest.raises(PrunetuneError, match="reconstruct_damp"):
        from_dict({"prune": {"reconstruct": True, "reconstruct_damp": -1.0}})
    assert from_dict({"prune": {"reconstruct": True}}).prune.reconstruct_damp == 0.01


def test_a_singular_moment_matrix_without_ridge_falls_back_to_the_pseudo_inverse():
    """damp=0 with a dead kept input (a zero row and column in C_KK): no error, the least-norm update, which
    leaves the dead column alone and still reconstructs what the live kept inputs predict."""
    from types import SimpleNamespace

    from prunetune.surgery import reconstruct

    g = torch.Generator().manual_seed(0)
    hf = tiny("bert")
    arch = get_arch(hf)
    n = arch.intermediate_size
    x = torch.randn(200, n, generator=g, dtype=torch.float64)
    x[:, 0] = 0.0  # a dead neuron, kept
    x[:, -1] = x[:, 1] - 2.0 * x[:, 2]  # a removed neuron the kept ones predict
    kept = list(range(n - 1))
    all_heads = list(range(arch.num_units))
    plan = SimpleNamespace(kept_heads=[all_heads, all_heads], kept_neurons=[kept, list(range(n))],
                           num_units=arch.num_units, intermediate_size=n)
    moments = (torch.zeros(2, arch.hidden_size, arch.hidden_size, dtype=torch.float64),
               torch.stack([x.T @ x / len(x), torch.eye(n, dtype=torch.float64)]))
    down = hf.get_submodule(arch.layers[0].down)
    with torch.no_grad():
        full = down(x.float())
        reconstruct(hf, arch, plan, moments, damp=0.0)
        pruned = x[:, kept].float() @ down.weight[:, kept].T + down.bias
    assert torch.isfinite(down.weight).all()
    torch.testing.assert_close(pruned, full, atol=1e-4, rtol=1e-4)


def test_adapters_and_the_export_reconstruct_end_to_end(tmp_path):
    """The adapter path (hook-based, no LoRA term) through a whole run with prune.compensate + reconstruct:
    the same plan and estimation, and the exports carry other FFN down weights than the run without them
    (compensation alone changes only biases, so the weights differ by reconstruction)."""
    import json

    from test_pipeline import light, save_tiny_bert, write_sst2

    import prunetune

    model_dir, data = save_tiny_bert(tmp_path / "bert"), write_sst2(tmp_path / "sst2")
    runs = {}
    for recon in (False, True):
        out = tmp_path / f"r{recon}"
        runs[recon] = light(model_dir, {"data_dir": str(data)}, out, peft={"kind": "adapter"},
                            train={"max_steps": 8, "seed": 3}, estimate={"steps": 4},
                            prune={"reconstruct": recon, "compensate": recon})["light_peft"]
        runs[recon]["dir"] = out
    plan = json.loads((tmp_path / "rTrue" / "plan.json").read_text())
    assert plan["meta"]["compensation"]["reconstruct"] and plan["meta"]["compensation"]["tokens"] > 0
    assert runs[True]["plan"] == runs[False]["plan"]
    losses = [[p["loss"] for p in runs[r]["loss_curve"]] for r in (False, True)]
    assert losses[0][:2] == losses[1][:2] and losses[0][2:] != losses[1][2:]  # same estimation (logged every 2nd
    # step), other fine-tune
    # the exports carry the base weights surgery made: same shapes, reconstructed values only with the option
    weights = []
    for recon in (False, True):
        export = next(p for p in (tmp_path / f"r{recon}").rglob("prunetune.json") if "checkpoint" not in str(p))
        model = prunetune.load(export.parent)
        weights.append({n: p for n, p in model.model.named_parameters() if n.endswith("output.dense.weight")})
    cut = [n for n in weights[0] if "attention" not in n and weights[0][n].shape[1] < 48]  # FFN 48 wide
    assert cut and all(weights[0][n].shape == weights[1][n].shape for n in weights[0])
    assert all(not torch.allclose(weights[0][n], weights[1][n]) for n in cut)
