"""Target mode (prune.target_speedup / target_params): the joint allocator in plan.py against brute force, its
targets, constraints and determinism, the config rules, and what a target-mode run reports."""
from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import BertConfig, LlamaConfig

from prunetune.arch import families
from prunetune.config import from_dict
from prunetune.cost import CostModel, SeqStats
from prunetune.errors import PrunetuneError
from prunetune.plan import PruningPlan, Scores, allocation_summary, make_target_plan


def arch_of(kind: str, **cfg):
    """An Arch from a config alone (no weights): the descriptor functions only read names and dims."""
    model = SimpleNamespace(base_model_prefix="model", model=None)
    if kind == "bert":
        return families.bert(model, BertConfig(**cfg))
    return families.llama(model, LlamaConfig(**cfg))


def scores(arch, peft, seed: int, ranks: int):
    """Random Taylor-like importance (non-negative) for every unit type."""
    g = torch.Generator().manual_seed(seed)
    heads = [torch.rand(arch.num_units, generator=g) for _ in arch.layers]
    ffn = [torch.rand(arch.intermediate_size, generator=g) * 0.3 for _ in arch.layers]
    mods = {m: float(torch.rand(1, generator=g)) * 0.5 for m in peft}
    rank = {m: torch.rand(ranks, generator=g) * 0.2 for m in peft}
    return heads, ffn, mods, rank


def plan_loss(plan: PruningPlan, heads, ffn, mods, rank) -> float:
    """The loss a plan spends: removed heads and neurons, removed modules (whole), removed ranks of kept modules."""
    loss = 0.0
    for l in range(plan.num_layers):
        loss += sum(float(heads[l][j]) for j in range(plan.num_units) if j not in plan.kept_heads[l])
        loss += sum(float(ffn[l][j]) for j in range(plan.intermediate_size) if j not in plan.kept_neurons[l])
    for m, full in plan.peft_orig_ranks.items():
        kept = plan.peft_ranks.get(m)
        loss += mods[m] if kept is None else sum(float(rank[m][i]) for i in range(full) if i not in kept)
    return loss


def subsets(n: int, max_removed: int):
    return [set(c) for k in range(max_removed + 1) for c in itertools.combinations(range(n), k)]


# ------------------------------------------------------------------------------------------ brute force
TINY = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2)


def brute_force(arch, cost, heads, ffn, mods, rank, target: float, ranks: int):
    """Every plan the constraints allow (>= 1 head per layer, >= 1 neuron per layer, >= 1 module): the least loss
    whose predicted speedup reaches the target."""
    modules = sorted(rank)
    options = [None] + [set(c) for k in range(1, ranks + 1) for c in itertools.combinations(range(ranks), k)]
    layer_heads = subsets(arch.num_units, arch.num_units - 1)
    layer_ffn = subsets(arch.intermediate_size, arch.intermediate_size - 1)
    base = cost.unpruned().seconds
    best = math.inf
    for h0, h1, f0, f1 in itertools.product(layer_heads, layer_heads, layer_ffn, layer_ffn):
        struct = sum(float(heads[0][j]) for j in h0) + sum(float(heads[1][j]) for j in h1) + \
            sum(float(ffn[0][j]) for j in f0) + sum(float(ffn[1][j]) for j in f1)
        counts = ([arch.num_units - len(h0), arch.num_units - len(h1)],
                  [arch.intermediate_size - len(f0), arch.intermediate_size - len(f1)])
        for choice in itertools.product(options, repeat=len(modules)):
            if all(c is None for c in choice):
                continue
            loss = struct + sum(mods[m] if c is None else sum(float(rank[m][i]) for i in range(ranks) if i not in c)
                                for m, c in zip(modules, choice))
            if loss >= best:
                continue
            t = cost.step_time(*counts, {m: len(c) for m, c in zip(modules, choice) if c is not None}).seconds
            if base / t >= target:
                best = loss
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocator_against_brute_force(seed):
    arch = arch_of("bert", **TINY)
    peft = [arch.layers[l].q for l in range(2)] + [arch.layers[l].down for l in range(2)]
    ranks = 2
    cost = CostModel(arch, SeqStats(8, 24, 24 * 24), {m: ranks for m in peft})
    heads, ffn, mods, rank = scores(arch, peft, seed, ranks)
    max_speedup = cost.unpruned().seconds / cost.step_time([1, 1], [1, 1], {arch.layers[1].down: 1}).seconds
    target = 1 + (max_speedup - 1) * (0.3 + 0.1 * seed)
    plan = make_target_plan(arch=arch, cost=cost, scores=Scores(heads, ffn, mods, rank),
                            target_speedup=target, ffn_floor=0.0)
    assert cost.predict(plan).speedup >= target
    opt = brute_force(arch, cost, heads, ffn, mods, rank, target, ranks)
    got = plan_loss(plan, heads, ffn, mods, rank)
    # greedy covering knapsack per cut: at least the optimum, and within one unit's loss of it (see plan.py)
    largest = max([float(s.max()) for s in heads + ffn + list(rank.values())] + list(mods.values()))
    assert opt <= got + 1e-12
    assert got <= opt + largest + 1e-12


# ------------------------------------------------------------------------------------------ targets
MINILM = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
GQA = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
           intermediate_size=688)


def setup(kind: str, cfg: dict, roles=("q", "k", "v", "o", "up", "gate", "down"), r: int = 8, seed: int = 0,
          seq=SeqStats(32, 40, 1700)):
    arch = arch_of(kind, **cfg)
    peft = arch.peft_targets([x for x in roles if x != "gate" or arch.gated_ffn])
    cost = CostModel(arch, seq, {m: r for m in peft})
    return arch, cost, scores(arch, peft, seed, r)


@pytest.mark.parametrize("kind,cfg", [("bert", MINILM), ("llama", GQA)])
@pytest.mark.parametrize("target", [1.3, 1.6, 2.0])
@pytest.mark.parametrize("peft_weight", [1.0, 100.0])
def test_speed_target_met_within_tolerance_with_constraints(kind, cfg, target, peft_weight):
    arch, cost, (heads, ffn, mods, rank) = setup(kind, cfg)
    mods = {m: v * peft_weight for m, v in mods.items()}
    rank = {m: v * peft_weight for m, v in rank.items()}
    plan = make_target_plan(arch=arch, cost=cost, scores=Scores(heads, ffn, mods, rank),
                            target_speedup=target, ffn_floor=0.05)
    speedup = cost.predict(plan).speedup
    assert speedup >= target
    if peft_weight > 1:  # PEFT kept, the cut stays at block 0: only unit granularity separates plan and target
        assert plan.meta["target"]["cut_block"] == 0 and speedup <= target * 1.01
    # (cheap PEFT modules: removing every module below a block can overshoot, when that is the least loss)
    assert all(len(k) >= 1 for k in plan.kept_heads)
    assert all(len(k) >= math.ceil(0.05 * arch.intermediate_size) for k in plan.kept_neurons)
    assert plan.peft_ranks and all(plan.peft_ranks.values())
    # removed units are the least important of their layer (the plan keeps a top-k per layer)
    for l, kept in enumerate(plan.kept_neurons):
        gone = set(range(arch.intermediate_size)) - set(kept)
        if gone:
            assert max(float(ffn[l][j]) for j in gone) <= min(float(ffn[l][j]) for j in kept)


def test_params_target_removes_only_base_units_and_meets_the_fraction():
    arch, cost, (heads, ffn, mods, rank) = setup("llama", GQA)
    body = 10_000_000
    plan = make_target_plan(arch=arch, cost=cost, scores=Scores(heads, ffn, mods, rank),
                            target_params=0.85, body_params=body)
    removed = sum(arch.num_units - len(k) for k in plan.kept_heads) * cost.head_params() + \
        sum(arch.intermediate_size - len(k) for k in plan.kept_neurons) * cost.neuron_params()
    assert body - removed <= 0.85 * body
    assert body - removed > 0.85 * body - max(cost.head_params(), cost.neuron_params()) * 2
    assert {m: len(r) for m, r in plan.peft_ranks.items()} == {m: 8 for m in rank}  # PEFT untouched


def test_uniform_option_gives_the_same_counts_in_every_layer():
    arch, cost, (heads, ffn, mods, rank) = setup("llama", GQA)
    plan = make_target_plan(arch=arch, cost=cost, scores=Scores(heads, ffn, mods, rank),
                            target_speedup=1.5, uniform=True)
    assert plan.uniform_heads() is not None and plan.uniform_neurons() is not None
    assert cost.predict(plan).speedup >= 1.5


def test_plans_are_deterministic():
    a = setup("bert", MINILM, seed=3)
    b = setup("bert", MINILM, seed=3)
    pa = make_target_plan(arch=a[0], cost=a[1], scores=Scores(*a[2]), target_speedup=1.7)
    pb = make_target_plan(arch=b[0], cost=b[1], scores=Scores(*b[2]), target_speedup=1.7)
    assert pa.to_json() == pb.to_json()
    c = setup("bert", MINILM, seed=4)
    pc = make_target_plan(arch=c[0], cost=c[1], scores=Scores(*c[2]), target_speedup=1.7)
    assert pc.to_json() != pa.to_json()  # other scores, another plan: the scores drive it


def test_unreachable_target_is_refused():
    arch, cost, (heads, ffn, mods, rank) = setup("bert", MINILM)
    with pytest.raises(PrunetuneError, match="not reachable"):
        make_target_plan(arch=arch, cost=cost, scores=Scores(heads, ffn, mods, rank),
                         target_speedup=500.0)
    with pytest.raises(PrunetuneError, match="not reachable"):
        make_target_plan(arch=arch, cost=cost, scores=Scores(heads, ffn, mods, rank),
                         target_params=0.001, body_params=10_000_000)


def test_allocation_summary_adds_up_to_the_predicted_saving():
    arch, cost, (heads, ffn, mods, rank) = setup("llama", GQA)
    plan = make_target_plan(arch=arch, cost=cost, scores=Scores(heads, ffn, mods, rank),
                            target_speedup=1.6)
    alloc = allocation_summary(plan, cost=cost, scores=Scores(heads, ffn, mods, rank))
    saved = sum(r["saved"] for r in alloc["types"].values())
    assert saved == pytest.approx(1 - 1 / alloc["predicted_speedup"])
    assert alloc["types"]["heads"]["loss"] + alloc["types"]["neurons"]["loss"] + alloc["types"]["modules"]["loss"] + \
        alloc["types"]["ranks"]["loss"] == pytest.approx(plan_loss(plan, heads, ffn, mods, rank))


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("prune,estimate,match", [
    ({"target_speedup": 1.5, "target_params": 0.5}, {}, "not both"),
    ({"target_speedup": 1.0}, {}, "must be > 1"),
    ({"target_params": 1.0}, {}, r"\(0, 1\)"),
    ({"target_params": 0.0}, {}, r"\(0, 1\)"),
    ({"target_speedup": 1.5, "heads": 0.5}, {}, "prune.heads: fixed ratios"),
    ({"target_speedup": 1.5}, {"structure_score": "mask"}, "estimate.structure_score=mask"),
    ({"target_params": 0.6}, {"module_score": "norm_ratio"}, "estimate.module_score=norm_ratio"),
    ({"target_speedup": 1.5}, {"module_score": "path", "rank_score": "reference"}, "estimate.rank_score=reference"),
    ({"max_modules": 0.5}, {}, "prune.max_modules: apply to target mode only"),
    ({"backward_cut": True, "heads": 0.5}, {}, "prune.backward_cut: apply to target mode only"),
    ({"target_speedup": 1.5, "max_heads": 1.0}, {}, r"prune.max_heads' must lie in \[0, 1\)"),
    ({"min_modules_per_layer": 2}, {}, "prune.min_modules_per_layer: apply to target mode only"),
    ({"target_speedup": 1.5, "min_modules_per_layer": -1}, {}, "min_modules_per_layer"),
])
def test_target_config_is_validated(prune, estimate, match):
    with pytest.raises(PrunetuneError, match=match):
        from_dict({"prune": prune, "estimate": estimate})


def test_merge_removed_needs_lora():
    with pytest.raises(PrunetuneError, match="merge_removed needs peft.kind=lora"):
        from_dict({"prune": {"merge_removed": True}, "peft": {"kind": "adapter"}})
    assert from_dict({"prune": {"merge_removed": True}}).prune.merge_removed is True


def test_target_config_accepted_and_fixed_ratio_mode_stays_the_default():
    assert from_dict({"prune": {"target_speedup": 1.6}, "estimate": {"module_score": "path"}})
    cfg = from_dict({"prune": {"target_speedup": 1.6}})
    assert cfg.prune.target_speedup == 1.6 and cfg.prune.target_params is None
    d = from_dict({}).prune
    assert d.target_speedup is None and d.target_params is None and d.cost_probe is False
    assert d.backward_cut is False and (d.max_heads, d.max_ffn, d.max_modules, d.max_ranks) == (1 / 3, 1 / 3, 0.6, 0.0)
    b = from_dict({"prune": {"target_speedup": 2.0, "backward_cut": True, "max_heads": None, "max_ranks": 0.5}}).prune
    assert b.backward_cut and b.max_heads is None and b.max_ranks == 0.5


def test_cli_refuses_two_targets_with_one_error_line(capsys):
    from prunetune.cli import main

    assert main(["light", "--set", "prune.target_speedup=1.5", "--set", "prune.target_params=0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prunetune: error:") and "not both" in err[0]


# ------------------------------------------------------------------------------------------ a run
def test_target_mode_run_reports_allocation_and_predicted_vs_measured(tmp_path):
    from test_pipeline import light, save_tiny_bert, write_sst2

    from prunetune.report.write import peft_role

    model_dir, data = save_tiny_bert(tmp_path / "bert"), write_sst2(tmp_path / "sst2")
    plans = []
    for i in range(2):
        res = light(model_dir, {"data_dir": str(data)}, tmp_path / f"r{i}", train={"max_steps": 6, "seed": 5},
                    estimate={"steps": 3}, prune={"target_speedup": 1.4}, baseline=i == 0)
        plans.append((tmp_path / f"r{i}" / "plan.json").read_text())
    assert plans[0] == plans[1]  # same seed, same plan
    plan = PruningPlan.from_dict(json.loads(plans[0]))
    assert plan.meta["target"]["speedup"] == 1.4 and plan.meta["allocation"]["predicted_speedup"] >= 1.4
    results = json.loads((tmp_path / "r0" / "results.json").read_text())["light_peft"]
    assert results["predicted_step_speedup"] == plan.meta["allocation"]["predicted_speedup"]
    assert results["measured_step_speedup"] > 0
    report = (tmp_path / "r0" / "report.md").read_text()
    assert "## Allocation" in report and "target mode (step speedup 1.4x" in report
    assert "predicted (cost model) / measured" in report
    # canonical module names (BERT's three `dense` become o / up / down)
    assert {peft_role(plan, n)[1] for n in plan.peft_orig_ranks} == {"q", "k", "v", "o", "up", "down"}
    # the curves plot the task loss: during estimation the optimised loss adds the L1 mask term on top
    curve = res["light_peft"]["loss_curve"]
    est = [p for p in curve if p["step"] <= 3]
    fine = [p for p in curve if p["step"] > 3]
    assert est and all(p["loss"] > p["task_loss"] for p in est)
    assert fine and all(p["loss"] == pytest.approx(p["task_loss"]) for p in fine)


def test_fixed_ratio_plans_get_the_same_allocation_report():
    """The paper's mode is unchanged (make_plan) and its allocation is reported the same way."""
    from prunetune.plan import make_plan

    arch, cost, (heads, ffn, mods, rank) = setup("bert", MINILM)
    plan = make_plan(arch=arch, scores=Scores(heads, ffn, mods, {m: torch.as_tensor(v) for m, v in rank.items()}),
                     heads=1 / 3, ffn=1 / 3, modules=0.75, ranks=0.5)
    alloc = allocation_summary(plan, cost=cost, scores=Scores(heads, ffn, mods, rank))
    types = alloc["types"]
    assert types["heads"]["removed"] == 6 * 4 and types["modules"]["removed"] == 27
    assert sum(r["saved"] for r in types.values()) == pytest.approx(1 - 1 / alloc["predicted_speedup"])
    assert alloc["predicted_speedup"] == cost.predict(plan).speedup > 1


# ------------------------------------------------------------------------------------------ bounds
def brute_force_bounded(arch, cost, heads, ffn, mods, rank, target: float, ranks: int, bounds: dict,
                        floor: int = 0):
    """brute_force with per-type ceilings (plan.make_target_plan's `bounds`): heads per layer, neurons in all,
    modules removed, ranks removed within kept modules; floor: PEFT modules every layer keeps (module_floor)."""
    from prunetune.plan import n_remove
    modules = sorted(rank)
    options = [None] + [set(c) for k in range(1, ranks + 1) for c in itertools.combinations(range(ranks), k)]
    h_max = n_remove(bounds["heads"], arch.num_units)
    layer_heads = [h for h in subsets(arch.num_units, arch.num_units - 1) if len(h) <= h_max]
    layer_ffn = subsets(arch.intermediate_size, arch.intermediate_size - 1)
    f_max = n_remove(bounds["ffn"], 2 * arch.intermediate_size)
    m_max, r_max = n_remove(bounds["modules"], len(modules)), n_remove(bounds["ranks"], ranks * len(modules))
    base = cost.unpruned().seconds
    best = math.inf
    for h0, h1, f0, f1 in itertools.product(layer_heads, layer_heads, layer_ffn, layer_ffn):
        if len(f0) + len(f1) > f_max:
            continue
        struct = sum(float(heads[0][j]) for j in h0) + sum(float(heads[1][j]) for j in h1) + \
            sum(float(ffn[0][j]) for j in f0) + sum(float(ffn[1][j]) for j in f1)
        counts = ([arch.num_units - len(h0), arch.num_units - len(h1)],
                  [arch.intermediate_size - len(f0), arch.intermediate_size - len(f1)])
        for choice in itertools.product(options, repeat=len(modules)):
            if all(c is None for c in choice) or sum(c is None for c in choice) > m_max or \
                    sum(ranks - len(c) for c in choice if c is not None) > r_max:
                continue
            kept_in = [sum(c is not None for m, c in zip(modules, choice) if arch.role_of(m)[0] == l)
                       for l in range(arch.num_layers)]
            if min(kept_in) < floor:
                continue
            loss = struct + sum(mods[m] if c is None else sum(float(rank[m][i]) for i in range(ranks) if i not in c)
                                for m, c in zip(modules, choice))
            if loss >= best:
                continue
            t = cost.step_time(*counts, {m: len(c) for m, c in zip(modules, choice) if c is not None}).seconds
            if base / t >= target:
                best = loss
    return best


def removed_counts(plan: PruningPlan) -> dict:
    return {"heads": [plan.num_units - len(k) for k in plan.kept_heads],
            "ffn": sum(plan.intermediate_size - len(k) for k in plan.kept_neurons),
            "modules": sum(m not in plan.peft_ranks for m in plan.peft_orig_ranks),
            "ranks": sum(full - len(plan.peft_ranks[m]) for m, full in plan.peft_orig_ranks.items()
                         if m in plan.peft_ranks)}


@pytest.mark.parametrize("seed", range(6))
def test_bounded_allocator_against_brute_force(seed):
    """With ceilings per type: every ceiling holds, the target is met, and the loss is the brute-force optimum's
    or at most two units' loss above it (the greedy is not exact under cardinality caps; see plan.py)."""
    arch = arch_of("bert", **TINY)
    peft = [arch.layers[l].q for l in range(2)] + [arch.layers[l].down for l in range(2)]
    ranks = 2
    cost = CostModel(arch, SeqStats(8, 24, 24 * 24), {m: ranks for m in peft})
    heads, ffn, mods, rank = scores(arch, peft, seed, ranks)
    bounds = {"heads": 0.5, "ffn": 0.25, "modules": 0.5, "ranks": 0.25}
    from prunetune.plan import n_remove
    fastest = cost.step_time([1, 1], [2, 1], {arch.layers[1].q: 1, arch.layers[1].down: 2}).seconds
    target = 1 + (cost.unpruned().seconds / fastest - 1) * (0.3 + 0.1 * seed)
    plan = make_target_plan(arch=arch, cost=cost, scores=Scores(heads, ffn, mods, rank), target_speedup=target,
                            ffn_floor=0.0, bounds=bounds)
    assert cost.predict(plan).speedup >= target
    got = removed_counts(plan)
    assert max(got["heads"]) <= n_remove(0.5, 2) and got["ffn"] <= n_remove(0.25, 4)
    assert got["modules"] <= n_remove(0.5, 4) and got["ranks"] <= n_remove(0.25, 8)
    opt = brute_force_bounded(arch, cost, heads, ffn, mods, rank, target, ranks, bounds)
    loss = plan_loss(plan, heads, ffn, mods, rank)
    largest = max([float(s.max()) for s in heads + ffn + list(rank.values())] + list(mods.values()))
    assert opt <= loss + 1e-12
    assert loss <= opt + 2 * largest + 1e-12


@pytest.mark.parametrize("seed", range(6))
def test_module_floor_against_brute_force(seed):
    """module_floor=1: every layer keeps a PEFT module, the target is met, and the loss is within two units'
    loss of the brute-force optimum under the same floor (modules made cheap, so the floor binds)."""
    arch = arch_of("bert", **TINY)
    peft = [arch.layers[l].q for l in range(2)] + [arch.layers[l].down for l in range(2)]
    ranks = 2
    cost = CostModel(arch, SeqStats(8, 24, 24 * 24), {m: ranks for m in peft})
    heads, ffn, mods, rank = scores(arch, peft, seed, ranks)
    mods = {m: v * 0.05 for m, v in mods.items()}
    bounds = {"heads": 0.5, "ffn": 0.25, "modules": 0.75, "ranks": 0.25}
    fastest = cost.step_time([1, 1], [2, 1], {arch.layers[0].q: 1, arch.layers[1].q: 1}).seconds
    target = 1 + (cost.unpruned().seconds / fastest - 1) * (0.3 + 0.1 * seed)
    plan = make_target_plan(arch=arch, cost=cost, scores=Scores(heads, ffn, mods, rank), target_speedup=target,
                            ffn_floor=0.0, bounds=bounds, backward_cut=False, module_floor=1)
    assert cost.predict(plan).speedup >= target
    assert all(any(arch.role_of(m)[0] == l for m in plan.peft_ranks) for l in range(2))
    opt = brute_force_bounded(arch, cost, heads, ffn, mods, rank, target, ranks, bounds, floor=1)
    loss = plan_loss(plan, heads, ffn, mods, rank)
    largest = max([float(s.max()) for s in heads + ffn + list(rank.values())] + list(mods.values()))
    assert opt <= loss + 1e-12
    assert loss <= opt + 2 * largest + 1e-12


@pytest.mark.parametrize("kind,cfg", [("bert", MINILM), ("llama", GQA)])
def test_module_floor_spreads_the_kept_modules_over_every_layer(kind, cfg):
    """Scores that favour the top layers' modules (as early Taylor scores do): without a floor the plan empties
    the lower layers, with module_floor=2 every layer keeps two, at the same target and module ceiling."""
    arch, cost, (heads, ffn, mods, rank) = setup(kind, cfg)
    mods = {m: (1 + arch.role_of(m)[0]) ** 3 * 1e-3 * v for m, v in mods.items()}
    bounds = {"heads": 1 / 3, "ffn": 1 / 3, "modules": 0.6, "ranks": 0.0}
    kw = dict(arch=arch, cost=cost, scores=Scores(heads, ffn, mods, rank), target_speedup=1.5, bounds=bounds,
              backward_cut=False)

    def per_layer(plan):
        return [sum(arch.role_of(m)[0] == l for m in plan.peft_ranks) for l in range(arch.num_layers)]

    free, floored = make_target_plan(**kw), make_target_plan(**kw, module_floor=2)
    assert min(per_layer(free)) < 2
    assert min(per_layer(floored)) >= 2
    assert cost.predict(floored).speedup >= 1.5
    assert removed_counts(floored)["modules"] <= round(0.6 * len(mods))
    with pytest.raises(PrunetuneError, match="min_modules_per_layer"):  # a floor of all modules leaves no route
        make_target_plan(**dict(kw, target_speedup=1.6, bounds=dict(bounds, heads=0.0, ffn=0.0)), module_floor=7)


@pytest.mark.parametrize("kind,cfg", [("bert", MINILM), ("llama", GQA)])
@pytest.mark.parametrize("uniform", [False, True])
def test_bounds_hold_at_scale_and_unreachable_targets_say_so(kind, cfg, uniform):
    from prunetune.plan import n_remove
    arch, cost, (heads, ffn, mods, rank) = setup(kind, cfg)
    bounds = {"heads": 1 / 3, "ffn": 1 / 3, "modules": 0.6, "ranks": 0.0}
    plan = make_target_plan(arch=arch, cost=cost, scores=Scores(heads, ffn, mods, rank), target_speedup=1.3,
                            ffn_floor=0.05, uniform=uniform, bounds=bounds)
    got = removed_counts(plan)
    assert cost.predict(plan).speedup >= 1.3
    assert max(got["heads"]) <= n_remove(1 / 3, arch.num_units)
    assert got["ffn"] <= n_remove(1 / 3, arch.num_layers * arch.intermediate_size)
    assert got["modules"] <= n_remove(0.6, len(mods)) and got["ranks"] == 0
    unbounded = make_target_plan(arch=arch, cost=cost, scores=Scores(heads, ffn, mods, rank), target_speedup=3.0,
                                 ffn_floor=0.05, uniform=uniform)
    assert cost.predict(unbounded).speedup >= 3.0
    with pytest.raises(PrunetuneError, match="prune.bounds"):  # 3x needs more than the ceilings allow
        make_target_plan(arch=arch, cost=cost, scores=Scores(heads, ffn, mods, rank), target_speedup=3.0,
                         ffn_floor=0.05, uniform=uniform, bounds=bounds)


@pytest.mark.parametrize("kind,cfg", [("bert", MINILM), ("llama", GQA)])
def test_no_backward_cut_keeps_a_module_in_the_lowest_block(kind, cfg):
    """backward_cut=False: cheap PEFT modules (which make the cut the least-loss plan) still leave one in the
    lowest block, and the target is met from the other unit types."""
    arch, cost, (heads, ffn, mods, rank) = setup(kind, cfg)
    mods = {m: v * 1e-3 for m, v in mods.items()}
    rank = {m: v * 1e-3 for m, v in rank.items()}
    cut = make_target_plan(arch=arch, cost=cost, scores=Scores(heads, ffn, mods, rank), target_speedup=1.6)
    assert cut.meta["target"]["cut_block"] > 0  # the setup does make the cut the cheap route
    plan = make_target_plan(arch=arch, cost=cost, scores=Scores(heads, ffn, mods, rank), target_speedup=1.6,
                            backward_cut=False)
    lowest = min(cost.block_of(m) for m in mods)
    assert plan.meta["target"]["cut_block"] == lowest
    assert any(cost.block_of(m) == lowest for m in plan.peft_ranks)
    assert cost.predict(plan).speedup >= 1.6


def test_an_unreachable_target_is_refused_before_the_estimation_trains(tmp_path, capsys, monkeypatch):
    """The reachable speed does not depend on the scores: a target no plan can reach stops with one error line
    before the first training step (it used to surface after t' steps of estimation)."""
    from test_pipeline import save_tiny_bert, write_sst2

    from prunetune.cli import main
    from prunetune.train import TrainState

    model_dir, data = save_tiny_bert(tmp_path / "bert"), write_sst2(tmp_path / "sst2")
    steps = []
    original = TrainState.run
    monkeypatch.setattr(TrainState, "run", lambda self, n, **kw: (steps.append(n), original(self, n, **kw))[1])
    args = ["light", "--model", str(model_dir), "--data-dir", str(data), "--output-dir", str(tmp_path / "out"),
            "--set", "train.max_steps=6", "--set", "estimate.steps=3"]
    capsys.readouterr()  # the model writer's progress bar
    assert main([*args, "--set", "prune.target_speedup=50"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prunetune: error:") and "not reachable" in err[0], err
    assert steps == []  # nothing trained
    assert main([*args, "--set", "prune.target_speedup=1.2"]) == 0 and steps  # a reachable one runs


def test_the_up_front_check_sees_the_modules_the_plan_is_made_from(tmp_path):
    """tracker.peft_ranks() (before any step) names the modules and ranks the estimation scores."""
    from test_pipeline import save_tiny_llama, write_sst2

    from prunetune.config import from_dict
    from prunetune.methods import light_peft
    from prunetune.methods.common import prepare

    ctx = prepare(from_dict({"model": {"name_or_path": str(save_tiny_llama(tmp_path / "m"))},
                             "data": {"task": "sst2", "data_dir": str(write_sst2(tmp_path / "d"))},
                             "estimate": {"steps": 2}, "prune": {"target_speedup": 1.2},
                             "train": {"max_steps": 4, "eval_each_epoch": False}, "output_dir": str(tmp_path / "o")}))
    run = light_peft._LightRun(ctx, checkpoints=False)
    before = run.tracker.peft_ranks()
    est = light_peft.estimate(run)
    assert before == {n: len(v) for n, v in est.plan.meta["rank_importance"].items()} and len(before) == 14  # q, k, v, o, gate, up, down x 2 layers
