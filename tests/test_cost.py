"""The step-time cost model (prunetune.cost) against hand counts and torch's FLOP counter on tiny models."""
from __future__ import annotations

import pytest
import torch
from models import tiny_lora
from torch.utils.flop_counter import FlopCounterMode

from prunetune.cost import CostModel, DeviceRates, SeqStats, calibrate, seq_stats
from prunetune.plan import PruningPlan
from prunetune.surgery import prune_lora_model

B, L, R = 3, 9, 4
FLOPS_ONLY = DeviceRates(1.0, 1e300, 0.0, 0.0)  # "seconds" = FLOPs


def task_head_flops(family: str, hidden: int, labels: int = 2) -> tuple[int, int]:
    """Hand count of the (forward, backward) FLOPs outside the transformer blocks: BERT's frozen pooler (H x H on
    the first token, input gradient only) and trained classifier; the decoders' score layer on every token."""
    if family == "bert":
        fwd = 2 * B * hidden * hidden + 2 * B * hidden * labels
        return fwd, 2 * B * hidden * hidden + 2 * (2 * B * hidden * labels)
    fwd = 2 * B * L * hidden * labels
    return fwd, 2 * fwd


def counted_flops(model, ids) -> tuple[int, int]:
    model.train()
    with FlopCounterMode(display=False) as fwd:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.zeros(B, dtype=torch.long))
    with FlopCounterMode(display=False) as bwd:
        out.loss.backward()
    return fwd.get_total_flops(), bwd.get_total_flops()


def eager(hf):
    hf.config._attn_implementation = "eager"  # attention as matmuls, which the FLOP counter sees


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2", "opt"])
def test_unpruned_step_flops_match_the_flop_counter(family):
    pm, hf, arch, names = tiny_lora(family, r=R)
    eager(hf)
    ids = torch.randint(3, 60, (B, L), generator=torch.Generator().manual_seed(0))
    fwd, bwd = counted_flops(pm, ids)
    cost = CostModel(arch, SeqStats(B, L, L * L), {n: R for n in names}, FLOPS_ONLY)
    head_fwd, head_bwd = task_head_flops(family, arch.hidden_size)
    assert cost.unpruned(optimizer=False).seconds + head_fwd + head_bwd == fwd + bwd
    # the forward part alone: every head unit, neuron and LoRA rank counted once
    forward = arch.num_layers * (arch.num_units * cost.head_work(False).flops +
                                 arch.intermediate_size * cost.neuron_work(False).flops)
    forward += sum(R * 2 * B * L * sum(arch.role_dims(arch.role_of(n)[1])) for n in names)
    assert forward + head_fwd == fwd


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_pruned_plan_flops_match_the_flop_counter_including_the_skipped_backward(family):
    """Heads / neurons removed, layer 0 without any PEFT module: no backward runs through layer 0 at all."""
    pm, hf, arch, names = tiny_lora(family, r=R)
    layer1 = [n for n in names if arch.role_of(n)[0] == 1]
    plan = PruningPlan(arch.family, "", arch.num_layers, arch.num_units, arch.heads_per_unit, arch.head_dim,
                       arch.intermediate_size, kept_heads=[[0], [0, 2]],
                       kept_neurons=[list(range(0, arch.intermediate_size, 2)), list(range(7))],
                       peft_ranks={n: list(range(1 + i % R)) for i, n in enumerate(layer1)},
                       peft_orig_ranks={n: R for n in names})
    pruned, _ops = prune_lora_model(pm, arch, plan, R, 2.0 * R, 0.0)
    eager(pruned.base_model.model)
    ids = torch.randint(3, 60, (B, L), generator=torch.Generator().manual_seed(0))
    fwd, bwd = counted_flops(pruned, ids)
    cost = CostModel(arch, SeqStats(B, L, L * L), {n: R for n in names}, FLOPS_ONLY)
    step = cost.step_time([len(k) for k in plan.kept_heads], [len(k) for k in plan.kept_neurons],
                          {n: len(r) for n, r in plan.peft_ranks.items()}, optimizer=False)
    assert step.cut_block == 2
    head_fwd, head_bwd = task_head_flops(family, arch.hidden_size)
    assert step.seconds + head_fwd + head_bwd == fwd + bwd
    # hand count of the backward layer 0 would have cost with a module there: the input gradients of its kept
    # head unit (o slice; q/k/v need none at the lowest block; both attention operands) and of its kept neurons
    g, d, h = arch.heads_per_unit, arch.head_dim, arch.hidden_size
    attn0 = len(plan.kept_heads[0]) * (2 * B * L * g * d * h + 8 * B * L * L * d * g)
    ffn0 = len(plan.kept_neurons[0]) * 2 * B * L * h * (3 if arch.gated_ffn else 2)
    assert step.backward_skipped == attn0 + ffn0


def test_hand_counted_unit_flops_bert_and_llama_gqa():
    _, _, bert, _ = tiny_lora("bert", r=R)
    _, _, llama, _ = tiny_lora("llama", r=R)
    n, pairs = B * L, B * L * L
    # BERT head: q, k, v (32 -> 8) and o (8 -> 32) slices, QK^T and AV for one head of dim 8
    c = CostModel(bert, SeqStats(B, L, L * L), {})
    assert c.head_work(False).flops == 4 * 2 * n * 32 * 8 + 2 * 2 * pairs * 8
    assert c.neuron_work(False).flops == 2 * 2 * n * 32  # up (32 -> 1) and down (1 -> 32)
    # Llama GQA unit: 2 query heads share one KV head (dim 8, hidden 48): q 48 -> 16, k and v 48 -> 8, o 16 -> 48
    c = CostModel(llama, SeqStats(B, L, L * L), {})
    assert llama.heads_per_unit == 2
    assert c.head_work(False).flops == 2 * n * (48 * 16 + 48 * 8 + 48 * 8 + 16 * 48) + 2 * (2 * pairs * 8 * 2)
    assert c.neuron_work(False).flops == 3 * 2 * n * 48  # gate, up, down
    # backward (input gradients only): the linears again, both attention operands; at the cut q, k, v need none
    fwd = c.head_work(False).flops
    assert c.head_work(True).flops - fwd == 2 * n * (48 * 16 + 48 * 8 + 48 * 8 + 16 * 48) + 2 * (2 * 2 * pairs * 8 * 2)
    assert c.head_work(True, at_cut=True).flops - fwd == 2 * n * 16 * 48 + 2 * (2 * 2 * pairs * 8 * 2)


def test_seq_stats_from_real_lengths_is_seeded():
    lengths = [5, 9, 12, 30, 7, 7, 8, 16] * 8
    a = seq_stats(lengths, batch_size=4, grad_accum=2, seed=3)
    assert a == seq_stats(lengths, batch_size=4, grad_accum=2, seed=3)
    assert a.batch == 8 and min(lengths) < a.length <= max(lengths)
    assert a.length_sq >= a.length ** 2  # E[L^2] >= E[L]^2
    same = seq_stats([11] * 20, batch_size=4)
    assert (same.length, same.length_sq) == (11, 121)


def test_pruning_speeds_up_and_peft_pruning_skips_backward():
    _, _, arch, names = tiny_lora("llama", r=R)
    cost = CostModel(arch, SeqStats(8, 32, 32 * 32), {n: R for n in names})
    full = cost.unpruned()
    upper = {n: R for n in names if arch.role_of(n)[0] == 1}
    cut = cost.step_time([arch.num_units] * 2, [arch.intermediate_size] * 2, upper)
    assert full.backward_skipped == 0 and full.cut_block == 0
    assert cut.cut_block == 2 and cut.backward_skipped > 0 and cut.seconds < full.seconds
    fewer = cost.step_time([1, 1], [4, 4], {n: R for n in names})
    assert fewer.attention < full.attention and fewer.ffn < full.ffn and fewer.peft < full.peft


def test_calibrate_recovers_the_rates_that_produced_the_timings():
    _, _, arch, names = tiny_lora("bert", r=R)
    cost = CostModel(arch, SeqStats(16, 20, 400), {n: R for n in names})
    truth = DeviceRates(cost.rates.flops_per_s / 3.0, cost.rates.bytes_per_s / 3.0, 4e-5, 10.0)

    def measure(rows):  # what the device would report if the model were right with the true rates
        seq = SeqStats(rows, 20, 400)
        return CostModel(arch, seq, cost.peft_ranks, truth).unpruned(optimizer=False).seconds, 20.0

    fitted = calibrate(cost, measure)
    assert fitted.source == "probe"
    assert fitted.flops_per_s == pytest.approx(truth.flops_per_s, rel=1e-6)
    assert fitted.op_seconds == pytest.approx(truth.op_seconds, rel=1e-6)


def test_calibrate_names_a_uniform_rescale_when_timings_grow_faster_than_the_batch():
    # measured on a 2-core CPU (SmolLM2, 8 vs 2 rows: 4.4x the time): no non-negative overhead fits, so the probe
    # can only rescale every rate by one factor, which must leave every predicted ratio unchanged and say so
    _, _, arch, names = tiny_lora("bert", r=R)
    cost = CostModel(arch, SeqStats(8, 20, 400), {n: R for n in names})
    fitted = calibrate(cost, lambda rows: (0.3 * rows ** 1.1, 20.0))
    assert fitted.source == "probe-uniform"
    assert fitted.flops_per_s / cost.rates.flops_per_s == pytest.approx(cost.rates.op_seconds / fitted.op_seconds)
    rescaled = CostModel(arch, cost.seq, cost.peft_ranks, fitted)
    plan = ([1, 2], [3, 8], {n: (R // 2 if i % 2 else 0) for i, n in enumerate(names)})
    assert rescaled.step_time(*plan).seconds / rescaled.unpruned().seconds == pytest.approx(
        cost.step_time(*plan).seconds / cost.unpruned().seconds, rel=1e-12)
    assert rescaled.unpruned(optimizer=False).seconds == pytest.approx(0.3 * 8 ** 1.1, rel=1e-9)


@pytest.mark.parametrize("stats", ["", "compensate", "reconstruct"])
def test_timing_probe_leaves_the_run_unchanged(tmp_path, stats):
    """The optional probe (prune.cost_probe) times passes of the unpruned model: same plan, same losses after
    (prune.compensate / prune.reconstruct: its training passes are not counted in the window's statistics)."""
    from test_pipeline import light, save_tiny_bert, write_sst2

    model_dir, data = save_tiny_bert(tmp_path / "bert"), write_sst2(tmp_path / "sst2")
    runs = [light(model_dir, {"data_dir": str(data)}, tmp_path / f"r{probe}", train={"max_steps": 6, "seed": 3},
                  estimate={"steps": 3}, prune={"cost_probe": probe, "compensate": stats == "compensate",
                         "reconstruct": stats == "reconstruct"})["light_peft"]
            for probe in (False, True)]
    # probe-uniform: the timed passes fitted one factor on every rate (timing noise decides which)
    assert runs[0]["cost_rates"] == "fitted-cpu" and runs[1]["cost_rates"] in ("probe", "probe-uniform")
    assert runs[0]["plan"] == runs[1]["plan"]
    assert [p["loss"] for p in runs[0]["loss_curve"]] == [p["loss"] for p in runs[1]["loss_curve"]]
    assert runs[0]["final"] == runs[1]["final"]
