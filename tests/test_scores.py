"""Light-PEFT scores: norm-ratio module importance, Taylor rank importance, structure masks."""
from __future__ import annotations

import pytest
import torch
from models import batch, random_masks, tiny, tiny_lora

from prunetune.arch import get_arch
from prunetune.methods.common import adapter_positions
from prunetune.scores import ImportanceTracker, StructureMasks
from prunetune.scores.importance import norm_ratio
from prunetune.units.adapters import AdapterSet
from prunetune.units.lora import lora_layers

FAMILIES = ["bert", "gpt2", "opt", "llama"]
LABELS = torch.tensor([0, 1, 1])


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ------------------------------------------------------------------------------------------ norm_ratio
def test_norm_ratio_hand_computed_with_padding():
    delta = torch.tensor([[[3.0, 4.0], [0.0, 1.0], [1.0, 0.0]],
                          [[0.0, 2.0], [6.0, 8.0], [5.0, 0.0]]])
    base = torch.tensor([[[0.0, 5.0], [2.0, 0.0], [10.0, 0.0]],
                         [[1.0, 0.0], [0.0, 5.0], [0.0, 1.0]]])
    # per-token ratios: [1, 0.5, 0.1] and [2, 2, 5]
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert float(norm_ratio(delta, base, mask)) == pytest.approx((1 + 0.5 + 2) / 3)
    assert float(norm_ratio(delta, base, None)) == pytest.approx((1 + 0.5 + 0.1 + 2 + 2 + 5) / 6)
    assert float(norm_ratio(delta, base, torch.ones(2, 3, dtype=torch.long))) == pytest.approx(10.6 / 6)
    # OPT's FFN sees flattened (batch*seq, hidden) tokens: the (batch, seq) mask still applies, row-major
    assert float(norm_ratio(delta.reshape(6, 2), base.reshape(6, 2), mask)) == pytest.approx((1 + 0.5 + 2) / 3)
    # a mask that cannot belong to these tokens is ignored rather than misapplied
    assert float(norm_ratio(delta, base, torch.ones(5))) == pytest.approx(10.6 / 6)
    # the result is detached and fp32 even for half inputs
    r = norm_ratio(delta.half().requires_grad_(), base.half(), mask)
    assert r.dtype == torch.float32 and not r.requires_grad


# ------------------------------------------------------------------------------------ module importance
@pytest.mark.parametrize("family", FAMILIES)
def test_module_importance_is_lora_norm_ratio(family):
    pm, hf, arch, names = tiny_lora(family, seed=1)
    masks = StructureMasks(arch).attach(hf)  # o/down inputs are masked: the tracker must see the same inputs
    random_masks(masks, 2)
    layers = lora_layers(hf)
    inputs: dict[str, list] = {n: [] for n in names}
    handles = [layers[n].base_layer.register_forward_pre_hook(
        lambda _m, args, n=n: inputs[n].append(args[0].detach())) for n in names]
    tracker = ImportanceTracker(hf).start()
    batches = [batch(seed=1), batch(seed=2, bsz=2, seq=7)]
    batches[1]["attention_mask"][1, -4:] = 0
    pm.train()  # only training forwards are recorded (LoRA dropout is 0: the deltas are reproducible)
    for b in batches:
        tracker.token_mask = b["attention_mask"]
        pm(**b)
        tracker.after_backward()  # one optimizer step per batch (no grads: commits the forward statistics)
        assert not tracker._base_out  # nothing kept between forwards
    tracker.stop()
    for h in handles:
        h.remove()
    modules, _ranks = tracker.finalize()
    assert set(modules) == set(names)
    with torch.no_grad():
        for n in names:
            layer = layers[n]
            per_batch = []
            for x, b in zip(inputs[n], batches):
                base = layer.base_layer(x)
                delta = layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
                ratio = delta.norm(dim=-1) / base.norm(dim=-1)
                m = b["attention_mask"].float().reshape(ratio.shape)  # OPT FFN: flattened tokens
                per_batch.append(float((ratio * m).sum() / m.sum()))
            assert modules[n] == pytest.approx(sum(per_batch) / 2, rel=1e-5), n


def test_module_importance_of_adapters():
    hf = tiny("opt")
    arch = get_arch(hf)
    names = adapter_positions(arch)
    raw = {}
    # registered before the adapters: these hooks see the module output h before its adapter
    handles = [hf.get_submodule(n).register_forward_hook(
        lambda _m, _i, out, n=n: raw.__setitem__(n, (out[0] if isinstance(out, tuple) else out).detach()))
        for n in names]
    adapters = AdapterSet(arch.hidden_size, {n: 4 for n in names}).attach(hf)
    with torch.no_grad():
        for ad in adapters.adapters.values():
            ad.up.weight.normal_(0, 0.3)
    tracker = ImportanceTracker(hf, adapters).start()
    b = batch()
    tracker.token_mask = b["attention_mask"]
    hf.train()  # a training forward (the adapters have no dropout: h and delta(h) are reproducible)
    hf(**b)
    tracker.after_backward()
    tracker.stop()
    for h in handles:
        h.remove()
    assert all(adapters.get(n).observer is None for n in names)
    modules, _ = tracker.finalize()
    assert set(modules) == set(names)
    m = b["attention_mask"].float()
    with torch.no_grad():
        for n in names:
            h = raw[n]
            ratio = adapters.get(n).delta(h).norm(dim=-1) / h.norm(dim=-1)
            mm = m.reshape(ratio.shape)  # fc2 (OPT) works on flattened tokens
            assert modules[n] == pytest.approx(float((ratio * mm).sum() / mm.sum()), rel=1e-5), n


# -------------------------------------------------------------------------------------- rank importance
def _grad_step(pm, b):
    pm.zero_grad(set_to_none=True)
    pm(**b, labels=LABELS[: b["input_ids"].shape[0]]).loss.backward()


@pytest.mark.parametrize("family", FAMILIES)
def test_taylor_rank_importance_matches_both_forms(family):
    pm, hf, arch, names = tiny_lora(family, seed=3)
    tracker = ImportanceTracker(hf, rank_score="taylor")
    layers = lora_layers(hf)
    expected_b = {n: torch.zeros(4) for n in names}
    expected_a = {n: torch.zeros(4) for n in names}
    for seed in (1, 2):
        _grad_step(pm, batch(seed=seed))
        tracker.after_backward()
        for n in names:
            A, B = layers[n].lora_A["default"].weight, layers[n].lora_B["default"].weight
            s_b = (B * B.grad).sum(0)  # sum_o B[o,i] dL/dB[o,i]
            s_a = (A * A.grad).sum(1)  # sum_j A[i,j] dL/dA[i,j]
            # the identity from the spec: both are the first-order loss change of removing rank i
            torch.testing.assert_close(s_a, s_b, atol=1e-7, rtol=1e-4)
            expected_b[n] += s_b.abs() / 2
            expected_a[n] += s_a.abs() / 2
    _, ranks = tracker.finalize()
    assert set(ranks) == set(names)
    for n in names:
        assert ranks[n].shape == (4,)
        torch.testing.assert_close(ranks[n], expected_b[n], atol=1e-9, rtol=1e-5)
        torch.testing.assert_close(ranks[n], expected_a[n], atol=1e-7, rtol=1e-4)
    assert any(float(v.sum()) > 0 for v in ranks.values())


def test_module_taylor_is_abs_sum_of_signed_rank_terms():
    """Module score = mean over steps of |sum_i S_i| (signed rank terms summed first, then abs)."""
    pm, hf, arch, names = tiny_lora("bert", seed=6)
    tracker = ImportanceTracker(hf)
    layers = lora_layers(hf)
    expected = {n: 0.0 for n in names}
    for seed in (1, 2, 3):
        _grad_step(pm, batch(seed=seed))
        tracker.after_backward()
        for n in names:
            B = layers[n].lora_B["default"].weight
            expected[n] += float((B * B.grad).sum(0).sum().abs().detach()) / 3
    got = tracker.module_taylor()
    assert set(got) == set(names)
    for n in names:
        assert got[n] == pytest.approx(expected[n], rel=1e-5, abs=1e-12)
    assert any(v > 0 for v in got.values())


def test_taylor_matches_removing_a_rank_to_first_order():
    """S_i approximates L(without rank i) - L: check on a rank whose B is scaled by a tiny epsilon."""
    pm, hf, arch, names = tiny_lora("bert", seed=4)
    pm.double()  # the loss change is ~1e-6 of a 0.7 loss: float32 would resolve it to a few ulps only
    b = dict(batch(), labels=LABELS)
    layer = lora_layers(hf)[names[2]]
    B = layer.lora_B["default"].weight
    with torch.no_grad():
        B[:, 1] *= 1e-3  # removing rank 1 is now a small perturbation
    pm.zero_grad()
    loss = pm(**b).loss
    loss.backward()
    s = float((B * B.grad).sum(0)[1].detach())
    with torch.no_grad():
        saved = B[:, 1].clone()
        B[:, 1] = 0
        removed = pm(**b).loss
        B[:, 1] = saved
    assert float((loss - removed).detach()) == pytest.approx(s, rel=1e-2, abs=1e-9)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_reference_rank_score(family):
    pm, hf, arch, names = tiny_lora(family, seed=5)
    tracker = ImportanceTracker(hf, rank_score="reference")
    layers = lora_layers(hf)
    expected = {n: torch.zeros(4) for n in names}
    for seed in (1, 2, 3):
        _grad_step(pm, batch(seed=seed))
        tracker.after_backward()
        for n in names:
            A, B = layers[n].lora_A["default"].weight, layers[n].lora_B["default"].weight
            expected[n] += ((A * A.grad).mean(1).abs() + (B * B.grad).mean(0).abs()) / 3
    _, ranks = tracker.finalize()
    for n in names:
        torch.testing.assert_close(ranks[n], expected[n], atol=1e-9, rtol=1e-5)


def test_adapter_rank_importance_uses_up_columns():
    hf = tiny("bert")
    arch = get_arch(hf)
    names = adapter_positions(arch)
    adapters = AdapterSet(arch.hidden_size, {n: 4 for n in names}).attach(hf)
    with torch.no_grad():
        for ad in adapters.adapters.values():
            ad.up.weight.normal_(0, 0.3)
    tracker = ImportanceTracker(hf, adapters)
    adapters.zero_grad()
    hf(**batch(), labels=LABELS).loss.backward()
    tracker.after_backward()
    _, ranks = tracker.finalize()
    assert set(ranks) == set(names)
    for n in names:
        up = adapters.get(n).up.weight
        torch.testing.assert_close(ranks[n], (up * up.grad).sum(0).abs(), atol=1e-9, rtol=1e-5)


# ------------------------------------------------------------------------------------------ stop()
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_tracker_stop_removes_every_hook(family):
    pm, hf, arch, names = tiny_lora(family, seed=6)
    b = batch()
    with torch.no_grad():
        before_logits = pm(**b).logits
    n_hooks = _hook_count(hf)
    tracker = ImportanceTracker(hf).start()
    assert _hook_count(hf) == n_hooks + 2 * len(names)
    tracker.start()  # restarting does not stack hooks
    assert _hook_count(hf) == n_hooks + 2 * len(names)
    tracker.token_mask = b["attention_mask"]
    with torch.no_grad():
        during = pm(**b).logits
    torch.testing.assert_close(during, before_logits, atol=0, rtol=0)  # tracking never changes the forward
    pm.train()
    for _ in range(2):  # a training forward, then the step ends: recorded once
        pm(**b)
        tracker.after_backward()
    counts = dict(tracker.module_n)
    assert counts == {n: 2 for n in names}
    tracker.stop()
    assert _hook_count(hf) == n_hooks
    for layer in lora_layers(hf).values():
        assert not layer.base_layer._forward_hooks and not layer.lora_B["default"]._forward_hooks
    pm(**b)
    tracker.after_backward()
    assert tracker.module_n == counts  # nothing recorded after stop
    pm.eval()
    with torch.no_grad():
        after = pm(**b).logits
    torch.testing.assert_close(after, before_logits, atol=0, rtol=0)
    tracker.stop()  # idempotent


def test_tracker_stop_clears_adapter_observers():
    hf = tiny("gpt2")
    arch = get_arch(hf)
    adapters = AdapterSet(arch.hidden_size, {n: 4 for n in adapter_positions(arch)}).attach(hf)
    tracker = ImportanceTracker(hf, adapters).start()
    assert all(adapters.get(n).observer is not None for n in adapters.names())
    tracker.stop()
    assert all(adapters.get(n).observer is None for n in adapters.names())
    with torch.no_grad():
        hf(**batch())
    assert tracker.module_n == {}


# ----------------------------------------------------------------------------------------- masks
def test_structure_masks_l1_and_values():
    arch = get_arch(tiny("llama"))
    masks = StructureMasks(arch)
    assert [m.shape for m in masks.heads] == [torch.Size([3])] * 2  # one per KV group
    assert [m.shape for m in masks.ffn] == [torch.Size([40])] * 2
    assert all(torch.equal(m.detach(), torch.ones_like(m)) for m in list(masks.heads) + list(masks.ffn))
    g = torch.Generator().manual_seed(0)
    hv = [torch.randn(3, generator=g) for _ in range(2)]
    fv = [torch.randn(40, generator=g) for _ in range(2)]
    masks.set_(hv, fv)
    h, f = masks.l1()
    assert float(h.detach()) == pytest.approx(float(sum(v.abs().sum() for v in hv)), rel=1e-6)
    assert float(f.detach()) == pytest.approx(float(sum(v.abs().sum() for v in fv)), rel=1e-6)
    (h + f).backward()
    for m, v in zip(masks.heads, hv):
        torch.testing.assert_close(m.grad, torch.sign(v))
    assert all(torch.equal(a, b) for a, b in zip(masks.head_values(), hv))
    assert all(m.dtype == torch.float32 for m in masks.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_masks_at_one_leave_logits_unchanged(family):
    b = batch()
    for with_lora in (False, True):
        if with_lora:
            model, hf, arch, _ = tiny_lora(family, seed=7)
        else:
            model = hf = tiny(family, seed=7)
            arch = get_arch(hf)
        with torch.no_grad():
            ref = model(**b).logits
        n_hooks = _hook_count(hf)
        masks = StructureMasks(arch).attach(hf)
        assert _hook_count(hf) == n_hooks + 2 * arch.num_layers
        with torch.no_grad():
            out = model(**b).logits
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
        # non-trivial masks change the output and receive gradients
        random_masks(masks, 1)
        body = getattr(hf, hf.base_model_prefix)  # (output_hidden_states would add transformers' own hooks)
        with torch.no_grad():
            h_ref = body(**b).last_hidden_state
            masks.set_([torch.ones(arch.num_units)] * arch.num_layers, [torch.ones(arch.intermediate_size)] * arch.num_layers)
            h_one = body(**b).last_hidden_state
        assert (h_ref - h_one).abs().max() > 1e-2
        random_masks(masks, 1)
        out = model(**b).logits
        (out.sum() + sum(masks.l1())).backward()
        assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in masks.parameters())
        masks.detach()
        assert _hook_count(hf) == n_hooks
        with torch.no_grad():
            torch.testing.assert_close(model(**b).logits, ref, atol=1e-6, rtol=0)


def test_head_mask_scales_exactly_its_unit():
    """Zeroing m_A[l, u] equals zeroing unit u's slice of the o-projection input (GQA: a whole KV group)."""
    hf = tiny("llama")
    arch = get_arch(hf)
    b = batch()
    masks = StructureMasks(arch).attach(hf)
    masks.heads[1].data[2] = 0.0
    with torch.no_grad():
        masked = hf(**b).logits
    masks.detach()
    o = hf.get_submodule(arch.layers[1].o)
    width = arch.heads_per_unit * arch.head_dim
    with torch.no_grad():
        o.weight[:, 2 * width:3 * width] = 0
        torch.testing.assert_close(hf(**b).logits, masked, atol=1e-6, rtol=0)


def test_taylor_structure_scores_hand_computed():
    """|m * (g - lambda*sign m)| per unit, averaged over accumulated steps; the L1 term's gradient is removed."""
    arch = get_arch(tiny("llama"))
    masks = StructureMasks(arch)
    hv = [torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.5, 1.0, 1.0])]
    masks.set_(hv, [torch.ones(40)] * 2)
    lam = 0.1
    grads = [[torch.tensor([0.3, 0.2, -0.1]), torch.tensor([0.0, -1.0, 0.5])],
             [torch.tensor([0.1, 0.2, 0.3]), torch.tensor([2.0, 0.0, -0.5])]]
    for step in grads:
        for m, g in zip(masks.heads, step):
            m.grad = g + lam * m.detach().sign()  # what backward gives with the L1 term in the loss
        for m in masks.ffn:
            m.grad = torch.full_like(m, lam)
        masks.accumulate_taylor(lam, lam)
    heads, ffn = masks.structure_scores("taylor")
    # layer 0: step 1 |[1*.3, -.5*.2, 2*-.1]| = [.3,.1,.2]; step 2 |[.1, -.1, .6]| = [.1,.1,.6] -> mean [.2,.1,.4]
    torch.testing.assert_close(heads[0], torch.tensor([0.2, 0.1, 0.4]))
    torch.testing.assert_close(heads[1], torch.tensor([0.5, 0.5, 0.5]))
    assert all(float(f.abs().max()) == 0.0 for f in ffn)  # only the L1 gradient: no task importance
    assert all(torch.equal(a, b) for a, b in zip(masks.structure_scores("mask")[0], hv))
    restored = StructureMasks(arch)
    restored.load_score_state(masks.score_state())
    torch.testing.assert_close(restored.taylor_values()[0][0], heads[0])


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_taylor_structure_score_is_first_order_loss_change(family):
    """dL/dm at m=1 times m is the first-order change of zeroing the unit: check against really zeroing a
    unit whose contribution was made small."""
    hf = tiny(family, seed=3).double()  # float64: the loss change is far below float32 resolution
    arch = get_arch(hf)
    b = dict(batch(), labels=LABELS)
    o = hf.get_submodule(arch.layers[0].o)
    width = arch.heads_per_unit * arch.head_dim
    with torch.no_grad():  # unit 1 of layer 0 now contributes little: first order is accurate
        o.weight[:, width:2 * width] *= 1e-3
    masks = StructureMasks(arch).attach(hf)
    loss = hf(**b).loss
    loss.backward()
    masks.accumulate_taylor(0.0, 0.0)
    score = float(masks.taylor_values()[0][0][1])
    with torch.no_grad():
        masks.heads[0][1] = 0.0
        removed = hf(**b).loss
    assert abs(float((removed - loss).detach())) == pytest.approx(score, rel=2e-2, abs=1e-9)
    assert score > 0


def test_tracker_checkpoint_keeps_every_ranks_activation_statistics(monkeypatch):
    """Under DDP only rank 0 writes the checkpoint: the per-rank (activation) statistics are saved summed over
    the ranks and reloaded on rank 0 only, so a run resumed mid-window does not count rank 0's batches once per
    rank; gradient statistics (already averaged by DDP) are saved and reloaded as they are on every rank."""
    import prunetune.scores.importance as importance

    pm, hf, _arch, _names = tiny_lora("bert", seed=1)
    tracker = ImportanceTracker(hf, rank_score="taylor").start()
    pm.train()
    b = batch(seed=1)
    tracker.token_mask = b["attention_mask"]
    pm(**b).logits.sum().backward()
    tracker.after_backward()
    tracker.stop()
    name = sorted(tracker.module_sum)[0]
    tracker.act_sum[name] = torch.tensor(1.5)  # activation sums are kept for PrunePEFT's unit groups only
    single = tracker.state_dict()
    monkeypatch.setattr(importance, "world_size", lambda: 2)  # a second rank with the same statistics
    monkeypatch.setattr(importance, "all_reduce_sum_", lambda t: t.mul_(2))
    doubled = tracker.state_dict()
    assert torch.equal(doubled["module_sum"][name]["0"], 2 * single["module_sum"][name]["0"])
    assert doubled["module_n"][name] == 2 * single["module_n"][name] > 0
    assert torch.equal(doubled["act_sum"][name], 2 * single["act_sum"][name])
    assert torch.equal(doubled["rank_sum"][name], single["rank_sum"][name])  # gradients: as they are
    other = ImportanceTracker(hf, rank_score="taylor")
    monkeypatch.setattr(importance, "rank", lambda: 1)
    other.load_state_dict(doubled)
    assert float(other.module_sum[name][0].abs().sum()) == 0 and other.module_n[name] == 0
    assert float(other.act_sum[name].abs().sum()) == 0
    assert torch.equal(other.rank_sum[name], single["rank_sum"][name])
    monkeypatch.setattr(importance, "rank", lambda: 0)
    first = ImportanceTracker(hf, rank_score="taylor")
    first.load_state_dict(doubled)
    assert torch.equal(first.module_sum[name][0], doubled["module_sum"][name]["0"])
