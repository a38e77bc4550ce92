"""PrunePEFT criteria and hybrid scoring: hand-computed criteria, per-unit training statistics (no
accumulation across units), spindle bands, random tie-breaking, the Irwin-Hall calibration, the
block-size / criteria-count bias test of the combination, weight-space criteria ranked within a unit type,
uninformative (tied) criteria left out, and the warm-up criteria assignment."""
from __future__ import annotations

import pytest
import torch
from models import batch, tiny

from prunetune.arch import get_arch
from prunetune.scores import ImportanceTracker
from prunetune.scores.criteria import CRITERIA, DYNAMIC, HELD_OUT, score_units
from prunetune.scores.criteria import PER_PARAMETER, WEIGHT_SPACE
from prunetune.scores.hybrid import (assign_criteria, band, block_of, combine, informative,
                                     lowest, percentiles)
from prunetune.units.lora import ADAPTER
from prunetune.units.supernet import Supernet


def _t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is faster and immune to CPU oversubscription; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# ------------------------------------------------------------------------------------------- criteria
def test_static_criteria_hand_computed():
    units = {"a": [_t(0.0, 1.0, 0.0, 2.0), _t(0.0, 0.0)],  # 4 of 6 exactly zero
             "b": [_t(0.1, -0.4), _t(0.6, -2.0)],
             "c": [_t(1e-4, -5e-4, 2e-3, 0.0)]}
    assert score_units("zeros", units, None, {}) == pytest.approx({"a": -4 / 6, "b": 0.0, "c": -0.25})
    # threshold: -(fraction |w| < t); t from ctx, default 1e-3
    assert score_units("threshold", units, None, {"threshold": 0.5}) == pytest.approx(
        {"a": -4 / 6, "b": -0.5, "c": -1.0})
    assert score_units("threshold", units, None, {}) == pytest.approx({"a": -4 / 6, "b": 0.0, "c": -0.75})
    # magnitude: mean w^2 over all the unit's parameters
    assert score_units("magnitude", units, None, {}) == pytest.approx(
        {"a": 5 / 6, "b": (0.01 + 0.16 + 0.36 + 4) / 4, "c": (1e-8 + 25e-8 + 4e-6) / 4})


def test_direction_lower_is_pruned_first():
    units = {"dead": [torch.zeros(4, 3), torch.zeros(5)], "live": [torch.full((4, 3), 0.5), torch.ones(5)]}
    for name in ("zeros", "threshold", "magnitude"):
        s = score_units(name, units, None, {})
        assert s["dead"] < s["live"], name
        assert lowest(s, 1) == ["dead"], name


@pytest.mark.parametrize("name", sorted(DYNAMIC))
def test_dynamic_criteria_read_their_statistic(name):
    stats = {key: {"u1": 0.3, "u2": 0.1, "u3": 0.2} for key in DYNAMIC}
    stats[name] = {"u1": 7.0, "u2": -1.0, "u3": 0.5}
    units = {u: [torch.ones(2)] for u in ("u1", "u2", "u3")}
    assert score_units(name, units, stats, {}) == stats[name]


@pytest.mark.parametrize("name", sorted(DYNAMIC))
def test_per_parameter_divides_cross_type_criteria_by_unit_size(name):
    """A LoRA on the FFN (4x wider) moves the output more than one on q+v by size alone; per parameter of
    budget the smaller unit can come out ahead. Weight-space criteria (already per-weight means) are unchanged."""
    stats = {key: {"small": 1.0, "big": 3.0} for key in DYNAMIC}
    units = {"small": [torch.ones(4, 2), torch.ones(2, 4)], "big": [torch.ones(4, 5), torch.ones(5, 4)]}
    per = score_units(name, units, stats, {"per_parameter": True})
    if name in PER_PARAMETER:
        assert per == pytest.approx({"small": 1.0 / 16, "big": 3.0 / 40})
        assert lowest(per, 1) == ["small"] and lowest(score_units(name, units, stats, {}), 1) == ["small"]
        stats[name]["big"] = 2.0  # 2/40 < 1/16: now the big unit goes first per parameter, not raw
        assert lowest(score_units(name, units, stats, {"per_parameter": True}), 1) == ["big"]
        assert lowest(score_units(name, units, stats, {}), 1) == ["small"]
    else:
        assert per == stats[name]
    assert PER_PARAMETER <= DYNAMIC | HELD_OUT and not PER_PARAMETER & WEIGHT_SPACE
    assert score_units("magnitude", units, None, {"per_parameter": True}) == {"small": 1.0, "big": 1.0}


def test_random_criterion_is_seeded():
    units = {f"u{i}": [torch.ones(3)] for i in range(8)}

    def draw(seed):
        return score_units("random", units, None, {"generator": torch.Generator().manual_seed(seed)})

    a, b, c = draw(3), draw(3), draw(4)
    assert a == b and a != c
    assert all(0.0 <= v < 1.0 for v in a.values()) and len(set(a.values())) == 8


def test_unknown_criterion():
    with pytest.raises(KeyError, match="unknown criterion"):
        score_units("nope", {"u": [torch.ones(1)]}, None, {})
    assert {"zeros", "threshold", "magnitude", "gradient", "taylor", "activation", "random",
            "norm_ratio"} <= set(CRITERIA)


# ------------------------------------------------------------------------- per-unit training statistics
def _masked_act(delta: torch.Tensor, mask: torch.Tensor) -> float:
    per_token = delta.detach().float().abs().mean(-1)
    m = mask.reshape(per_token.shape).float()
    return float((per_token * m).sum() / m.sum())


def test_tracker_unit_stats_are_per_unit_means_over_steps():
    hf = tiny("bert")
    arch = get_arch(hf)
    net = Supernet(hf, arch, ["lora_qv", "adapter_ffn", "parallel_ffn"], lora_r=4, lora_dropout=0.0,
                   adapter_size=4)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # non-zero B / up so every unit has an output and every parameter a gradient
        for u in net.units:
            for p in net.unit_params(u.name):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
        dead = net.adapters.get(net.by_name["adapter_ffn@1"].positions[0])
        dead.up.weight.zero_()
        dead.up.bias.zero_()
    dead.up.weight.requires_grad_(False)
    dead.up.bias.requires_grad_(False)
    net.remove(["lora_qv@1"])  # removed: scaling 0, frozen
    groups = {u.name: list(u.positions) for u in net.units}  # the removed unit too: it must read 0
    assert set(net.groups()) == set(groups) - {"lora_qv@1"}

    # record each unit's output (what the tracker sees) and parameters / gradients at every step
    outputs: dict[str, list] = {}
    handles = []
    for u in net.units:
        for pos in u.positions:
            if u.kind == "adapter":
                mod, scale = net.adapters.get(pos).up, lambda: 1.0
            else:
                layer = net._lora[pos]
                mod, scale = layer.lora_B[ADAPTER], (lambda l=layer: l.scaling[ADAPTER])
            outputs[pos] = []
            handles.append(mod.register_forward_hook(
                lambda _m, _i, out, p=pos, s=scale: outputs[p].append(out.detach() * s())))

    tracker = ImportanceTracker(hf, net.adapters, groups=groups).start()
    params = [p for n in net.alive for p in net.unit_params(n) if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    hf.train()
    masks, grads_seen, taylor_seen = [], {u.name: [] for u in net.units}, {u.name: [] for u in net.units}
    for step in range(2):
        b = batch(seed=10 + step, bsz=4, seq=7)
        b["attention_mask"][1, -2:] = 0
        masks.append(b["attention_mask"])
        tracker.token_mask = b["attention_mask"]
        loss = net.model(**b, labels=torch.tensor([0, 1, 1, 0])).loss
        loss.backward()
        for u in net.units:
            ps = [p for p in net.unit_params(u.name) if p.grad is not None]
            if u.name in ("lora_qv@1",):
                assert not ps  # frozen: no gradient at all
                continue
            if u.name != "adapter_ffn@1":
                assert len(ps) == len(net.unit_params(u.name))
            n = sum(p.numel() for p in ps)
            grads_seen[u.name].append(float(sum(p.grad.abs().sum() for p in ps)) / n)
            # taylor: the removal effect, summed over the output side only (LoRA B, adapter up)
            if u.kind == "adapter":
                out = [w for pos in u.positions for w in (net.adapters.get(pos).up.weight, net.adapters.get(pos).up.bias)]
            else:
                out = [net._lora[pos].lora_B[ADAPTER].weight for pos in u.positions]
                a_side = [net._lora[pos].lora_A[ADAPTER].weight for pos in u.positions]
                # per module sum(A*gA) == sum(B*gB): summing both sides would count LoRA twice
                for w_a, w_b in zip(a_side, out):
                    assert float((w_a * w_a.grad).sum().detach()) == pytest.approx(
                        float((w_b * w_b.grad).sum().detach()), rel=1e-4)
            taylor_seen[u.name].append(float(sum((p.detach() * p.grad).sum() for p in out if p.grad is not None)))
        tracker.after_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    tracker.stop()
    for h in handles:
        h.remove()
    stats = tracker.unit_stats()
    assert set(stats) >= {"gradient", "taylor", "activation", "norm_ratio"}

    for u in net.units:
        if u.name == "lora_qv@1":
            continue
        assert stats["gradient"][u.name] == pytest.approx(sum(grads_seen[u.name]) / 2, rel=1e-5), u.name
        assert stats["taylor"][u.name] == pytest.approx(sum(map(abs, taylor_seen[u.name])) / 2, rel=1e-5), u.name
        # activation: mean over forwards of mean |unit output| over non-padding tokens, averaged over positions
        per_pos = [sum(_masked_act(d, m) for d, m in zip(outputs[pos], masks)) / 2 for pos in u.positions]
        assert stats["activation"][u.name] == pytest.approx(sum(per_pos) / len(per_pos), rel=1e-5), u.name
    live = ["lora_qv@0", "adapter_ffn@0", "parallel_ffn@0", "parallel_ffn@1"]
    assert all(stats["activation"][u] > 0 for u in live)
    assert len({round(stats["activation"][u], 9) for u in live}) == len(live)  # per unit, not shared
    # a unit whose output is zero, and a removed unit, score 0 (nothing accumulated from other units)
    assert stats["activation"]["adapter_ffn@1"] == 0.0
    assert stats["activation"]["lora_qv@1"] == 0.0
    assert stats["gradient"]["lora_qv@1"] == 0.0 and stats["taylor"]["lora_qv@1"] == 0.0
    # the activation of a later unit is its own output, not the running sum of the earlier ones (a defect of the
    # reference code): the exact per-unit check above would fail on a running sum, since @0's output is non-zero
    # taylor is |sum w*g| per step, not signed and not |sum over steps|: some unit changes sign between steps
    assert all(v >= 0 for v in stats["taylor"].values())
    assert any(min(v) < 0 < max(v) for v in taylor_seen.values() if v), taylor_seen


# ---------------------------------------------------------------------------------------------- hybrid
def test_spindle_bands():
    assert [band(i, 6) for i in range(6)] == [0, 0, 1, 2, 2, 3]
    bands24 = [band(i, 24) for i in range(24)]
    # layer l lies in the band of l / L: 0-20% -> 0..4, 20-50% -> 5..11, 50-80% -> 12..19, 80-100% -> 20..23
    assert bands24 == [0] * 5 + [1] * 7 + [2] * 8 + [3] * 4
    # same rule as the reference code (layer index < 20% / 50% / 80% of the layer count)
    for n in (5, 6, 12, 24, 48):
        b = [band(i, n) for i in range(n)]
        assert b == sorted(b) and set(b) == {0, 1, 2, 3}, (n, b)
        assert all((i < 0.2 * n) == (b[i] == 0) and (i >= 0.8 * n) == (b[i] == 3) for i in range(n))
    assert [band(i, 2) for i in range(2)] == [0, 2]
    assert block_of("lora_qv", 23, 24) == "lora_qv/b3" and block_of("adapter_ffn", 0, 24) == "adapter_ffn/b0"
    assert block_of("lora_qv", 1, 2, edges=[0.7]) == "lora_qv/b0"


def test_percentiles_distinct_scores():
    pct = percentiles({"a": 3.0, "b": -1.0, "c": 10.0, "d": 0.5}, torch.Generator().manual_seed(0))
    assert pct == pytest.approx({"b": 0.125, "d": 0.375, "a": 0.625, "c": 0.875})


def test_percentiles_break_ties_at_random():
    names = [f"u{i:02d}" for i in range(20)]
    tied = {n: 1.0 for n in names}

    def order(seed):
        pct = percentiles(tied, torch.Generator().manual_seed(seed))
        assert sorted(pct.values()) == pytest.approx([(r + 0.5) / 20 for r in range(20)])
        return sorted(names, key=pct.get)

    orders = [order(s) for s in range(4)]
    assert all(sorted(o) == names for o in orders)  # permutations
    assert all(o != names for o in orders)  # not index (name) order
    assert len({tuple(o) for o in orders}) == 4  # seed dependent
    assert order(2) == orders[2]  # and reproducible
    # a partial tie keeps the strict order around it
    pct = percentiles({"a": 0.0, "b": 1.0, "c": 1.0, "d": 2.0}, torch.Generator().manual_seed(1))
    assert pct["a"] == 0.125 and pct["d"] == 0.875 and {pct["b"], pct["c"]} == {0.375, 0.625}


def test_combine_single_criterion_is_its_percentile():
    scores = {"magnitude": {"a": 0.3, "b": 0.1, "c": 0.2, "d": 0.9}}
    unit_block = {u: "X" for u in "abcd"}
    h = combine(scores, unit_block, {"X": ["magnitude"]})
    # rank r of n lands in [r/n, (r+1)/n): a seeded uniform position inside the rank's cell
    for u, rank in {"b": 0, "c": 1, "a": 2, "d": 3}.items():
        assert rank / 4 <= h[u] < (rank + 1) / 4, (u, h)
    assert lowest(h, 2) == ["b", "c"]
    assert lowest({"z": 0.1, "a": 0.1, "m": 0.0}, 2) == ["m", "a"]  # ties: by name
    with pytest.raises(ValueError, match="unknown combination"):
        combine(scores, unit_block, {"X": ["magnitude"]}, method="softmax")


def test_combine_scale_free_and_consistent_signal():
    """Percentile ranks: rescaling one criterion changes nothing; a unit lowest under every criterion of its
    block goes first whatever the raw scales."""
    units = [f"u{i}" for i in range(10)]
    unit_block = {u: ("A" if i < 5 else "B") for i, u in enumerate(units)}
    base = {"magnitude": {u: float(i) for i, u in enumerate(units)},
            "taylor": {u: float((3 * i) % 10) for i, u in enumerate(units)}}
    scaled = {"magnitude": {u: 1e6 * v for u, v in base["magnitude"].items()}, "taylor": base["taylor"]}
    crits = {"A": ["magnitude", "taylor"], "B": ["taylor"]}
    h1 = combine(base, unit_block, crits, generator=torch.Generator().manual_seed(0))
    h2 = combine(scaled, unit_block, crits, generator=torch.Generator().manual_seed(0))
    assert h1 == pytest.approx(h2)
    assert lowest(h1, 1) == ["u0"]  # lowest under both magnitude and taylor
    assert all(0.0 <= v <= 1.0 for v in h1.values())


def test_all_tied_criterion_does_not_prune_the_lowest_layers_first():
    """Reference-code defect: zeros/threshold are nearly always tied and a stable sort then removes layer 0, 1,
    ... first. Tied units must be drawn at random."""
    units = {f"adapter_ffn@{l}": [torch.ones(4)] for l in range(24)}
    unit_block = {u: block_of("adapter_ffn", int(u.split("@")[1]), 24) for u in units}
    picks = set()
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        scores = {"zeros": score_units("zeros", units, None, {})}
        assert len(set(scores["zeros"].values())) == 1
        removed = lowest(combine(scores, unit_block, {b: ["zeros"] for b in set(unit_block.values())}, "calibrated",
                                 g), 4)
        picks.add(tuple(removed))
        assert sorted(int(u.split("@")[1]) for u in removed) != [0, 1, 2, 3]
    assert len(picks) == 5


def _two_types(n: int = 12):
    units = [f"{t}@{l}" for t in ("lora_qv", "adapter_ffn") for l in range(n)]
    return units, {u: u.split("@")[0] for u in units}, {u: block_of(u.split("@")[0], int(u[-2:].strip("@")), n)
                                                          for u in units}


def test_weight_space_criteria_are_ranked_within_a_unit_type():
    """Magnitude of a LoRA unit (kaiming A) is ~2x an adapter's (std 0.02 init) before any training: ranked over
    all units it would remove adapters first whatever they do. Within a type it removes types in proportion."""
    units, kind, blocks = _two_types()
    assert {"magnitude", "gradient", "zeros", "threshold"} <= WEIGHT_SPACE
    assert not {"taylor", "activation", "norm_ratio"} & WEIGHT_SPACE
    crits = {b: ["magnitude"] for b in blocks.values()}
    g = torch.Generator().manual_seed(0)
    removed = {"lora_qv": 0, "adapter_ffn": 0}
    globally = {"lora_qv": 0, "adapter_ffn": 0}
    for _ in range(200):
        noise = torch.rand(len(units), generator=g).tolist()
        scale = {"lora_qv": 2.0, "adapter_ffn": 1.0}
        scores = {"magnitude": {u: scale[kind[u]] * (1 + 0.1 * e) for u, e in zip(units, noise)}}
        for u in lowest(combine(scores, blocks, crits, generator=g, unit_type=kind, within_type=WEIGHT_SPACE), 6):
            removed[kind[u]] += 1
        for u in lowest(combine(scores, blocks, crits, generator=g), 6):
            globally[kind[u]] += 1
    assert globally == {"lora_qv": 0, "adapter_ffn": 1200}
    assert abs(removed["lora_qv"] / 1200 - 0.5) < 0.05, removed
    # a function-space criterion still compares types: a type that does less goes first
    taylor = {"taylor": {u: (2.0 if kind[u] == "lora_qv" else 1.0) for u in units}}
    h = combine(taylor, blocks, {b: ["taylor"] for b in blocks.values()}, generator=g, unit_type=kind,
                within_type=WEIGHT_SPACE)
    assert {kind[u] for u in lowest(h, 12)} == {"adapter_ffn"}


def test_uninformative_criterion_is_left_out():
    """zeros on trained weights is all tied: averaged in, it would dilute a block's other criteria with a random
    draw; left out, the other criterion decides alone. A unit no criterion can rank gets a uniform draw."""
    units = [f"u{i}" for i in range(8)]
    taylor = {u: float(i) for i, u in enumerate(units)}
    scores = {"zeros": {u: 0.0 for u in units}, "taylor": taylor}
    for seed in range(5):
        h = combine(scores, {u: "X" for u in units}, {"X": ["taylor", "zeros"]},
                    generator=torch.Generator().manual_seed(seed))
        assert lowest(h, 8) == units  # exactly the taylor order, every seed
        assert 0 <= h["u0"] < 1 / 8  # one criterion left: u0 is its lowest, in the first rank's cell
    assert informative(scores, units) == {"zeros": set(), "taylor": set(units)}
    # only zeros: nothing ranks the units; uniform draws, seed dependent, not the index order
    orders = {tuple(lowest(combine({"zeros": scores["zeros"]}, {u: "X" for u in units}, {"X": ["zeros"]},
                                   generator=torch.Generator().manual_seed(s)), 8)) for s in range(4)}
    assert len(orders) == 4 and tuple(units) not in orders
    # within a type, a type's last unit cannot be ranked by a weight-space criterion; others can
    kind = {"a": "lora_qv", "b": "lora_qv", "c": "adapter_ffn"}
    mag = {"magnitude": {"a": 1.0, "b": 2.0, "c": 0.5}}
    assert informative(mag, sorted(kind), kind, WEIGHT_SPACE) == {"magnitude": {"a", "b"}}
    assert informative(mag, sorted(kind)) == {"magnitude": {"a", "b", "c"}}


def test_calibrated_combination_is_unbiased_with_unit_types():
    """The i.i.d. bias test with two unit types, weight-space criteria ranked within type and one block
    whose only criterion is weight-space in a type of a different size."""
    units, kind, blocks = _two_types(12)
    units = units[:20]  # 12 LoRA + 8 adapters
    kind = {u: kind[u] for u in units}
    blocks = {u: blocks[u] for u in units}
    crits = {b: (["magnitude"] if b.startswith("adapter") else ["taylor", "gradient", "activation"])
             for b in set(blocks.values())}
    g_scores, g = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
    removed = {b: 0 for b in crits}
    trials, k = 400, 5
    for _ in range(trials):
        scores = {c: dict(zip(units, torch.rand(len(units), generator=g_scores).tolist()))
                  for c in ("taylor", "gradient", "activation", "magnitude")}
        for u in lowest(combine(scores, blocks, crits, "calibrated", g, kind, WEIGHT_SPACE), k):
            removed[blocks[u]] += 1
    size = {b: sum(1 for u in units if blocks[u] == b) for b in crits}
    for b in crits:
        assert abs((removed[b] / (trials * k)) / (size[b] / len(units)) - 1) <= 0.2, (b, removed, size)


def _removal_shares(method: str, trials: int = 400, k: int = 6) -> dict[str, float]:
    """Blocks of different sizes and different numbers of criteria; i.i.d. random scores; remove the lowest
    k every trial. Returns each block's share of removals divided by its share of units (1 = unbiased)."""
    blocks = {"A": (12, ["taylor"]), "B": (24, ["taylor", "gradient", "magnitude", "activation"]),
              "C": (6, ["gradient", "magnitude"])}
    unit_block = {f"{b}{i:02d}": b for b, (n, _) in blocks.items() for i in range(n)}
    block_criteria = {b: c for b, (_, c) in blocks.items()}
    units = sorted(unit_block)
    g_scores, g_ties = torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)
    removed = {b: 0 for b in blocks}
    for _ in range(trials):
        scores = {c: dict(zip(units, torch.rand(len(units), generator=g_scores).tolist()))
                  for c in ("taylor", "gradient", "magnitude", "activation")}
        for u in lowest(combine(scores, unit_block, block_criteria, method, g_ties), k):
            removed[unit_block[u]] += 1
    total_units = len(units)
    return {b: (removed[b] / (trials * k)) / (n / total_units) for b, (n, _) in blocks.items()}


def test_calibrated_combination_is_unbiased_across_blocks():
    shares = _removal_shares("calibrated")
    for b, ratio in shares.items():
        assert abs(ratio - 1) <= 0.15, (b, shares)


def test_eq1_combination_is_biased_documented_contrast():
    """Eq. 1 (kept as an option) averages softmax probabilities over the block's criteria: blocks with one
    criterion have high-variance scores and are over-pruned, blocks with many criteria under-pruned."""
    shares = _removal_shares("eq1")
    calibrated = _removal_shares("calibrated")
    worst = max(abs(r - 1) for r in shares.values())
    assert worst > 0.3, shares
    assert worst > 2 * max(abs(r - 1) for r in calibrated.values())
    assert shares["A"] > 1.3 and shares["B"] < 0.8, shares


def test_assign_criteria():
    counts = {"zeros": {"A": 3, "B": 1}, "taylor": {"A": 3, "C": 2}, "gradient": {"B": 2, "C": 1},
              "magnitude": {"B": 1, "C": 1}, "activation": {}}
    mapping = assign_criteria(counts, ["A", "B", "C"])
    assert mapping == {
        "A": ["taylor", "zeros"],  # tie at 3: both kept
        "B": ["gradient", "magnitude"],  # gradient most frequent; magnitude prunes B (and C) most
        "C": ["magnitude", "taylor"],  # taylor most frequent; magnitude added
    }
    # a criterion is added to the block it prunes most even where another criterion is more frequent
    mapping = assign_criteria({"zeros": {"A": 5, "B": 4}, "taylor": {"A": 1}}, ["A", "B"])
    assert mapping == {"A": ["taylor", "zeros"], "B": ["zeros"]}
    # a block no criterion pruned: every criterion (ties at 0), or the fallback when one is given
    counts = {"zeros": {}, "taylor": {"A": 2}}
    assert assign_criteria(counts, ["A", "B"]) == {"A": ["taylor"], "B": ["taylor", "zeros"]}
    assert assign_criteria(counts, ["A", "B"], ["magnitude", "taylor"]) == {"A": ["taylor"],
                                                                            "B": ["magnitude", "taylor"]}


def _null_shares(rho: float, blocks: dict[str, tuple[int, list[str]]], k: int, trials: int = 400,
                 kind: dict[str, str] | None = None, within: frozenset = frozenset(), by: str = "block"):
    """No unit is better than another; the criteria are correlated at `rho` (a shared normal factor, as real
    criteria are: gradient vs taylor Spearman 0.94). Returns each block's (or type's) share of removals over its
    share of units (1 = proportional)."""
    unit_block = {f"{b}{i:02d}": b for b, (n, _) in blocks.items() for i in range(n)}
    block_criteria = {b: c for b, (_, c) in blocks.items()}
    units = sorted(unit_block)
    group = kind if by == "type" else unit_block
    g_scores, g_ties = torch.Generator().manual_seed(21), torch.Generator().manual_seed(22)
    removed = dict.fromkeys(set(group.values()), 0)
    for _ in range(trials):
        shared = torch.randn(len(units), generator=g_scores)
        scores = {c: dict(zip(units, (rho ** 0.5 * shared + (1 - rho) ** 0.5 *
                                      torch.randn(len(units), generator=g_scores)).tolist()))
                  for c in ("taylor", "gradient", "magnitude", "activation")}
        for u in lowest(combine(scores, unit_block, block_criteria, "calibrated", g_ties, kind, within), k):
            removed[group[u]] += 1
    size = {b: sum(1 for u in units if group[u] == b) for b in removed}
    return {b: (removed[b] / (trials * k)) / (size[b] / len(units)) for b in removed}


@pytest.mark.parametrize("rho", [0.0, 0.8, 0.95])
def test_calibrated_combination_is_unbiased_under_correlated_criteria(rho):
    """A block scored by four correlated criteria against one scored by one: under the null both lose units
    in proportion to their size (the Irwin-Hall calibration gave 1.42x / 0.32x at rho = 0.8)."""
    blocks = {"many": (6, ["taylor", "gradient", "magnitude", "activation"]), "one": (6, ["taylor"])}
    for k in (1, 3):
        shares = _null_shares(rho, blocks, k)
        assert all(abs(r - 1) <= 0.15 for r in shares.values()), (rho, k, shares)


def test_ties_between_unit_types_are_broken_at_random():
    """6 LoRA + 6 adapters, within-type criteria, i.i.d. scores, k = 1: each type's lowest unit has the same
    within-type percentile; which type loses it must be a coin flip, not the unit name (adapter_ffn < lora_qv
    alphabetically was removed every time)."""
    blocks = {"adapter_ffn/b0": (6, ["magnitude", "gradient"]), "lora_qv/b0": (6, ["magnitude", "gradient"])}
    kind = {f"{b}{i:02d}": b.split("/")[0] for b, (n, _) in blocks.items() for i in range(n)}
    shares = _null_shares(0.5, blocks, 1, kind=kind, within=WEIGHT_SPACE, by="type")
    assert all(abs(r - 1) <= 0.15 for r in shares.values()), shares


def test_hybrid_scores_are_distinct_and_seeded():
    scores = {"magnitude": {u: 1.0 for u in "abcdef"}, "taylor": {u: float(i % 2) for i, u in enumerate("abcdef")}}
    blocks = {u: "X" for u in "abcdef"}
    h1 = combine(scores, blocks, {"X": ["magnitude", "taylor"]}, generator=torch.Generator().manual_seed(3))
    h2 = combine(scores, blocks, {"X": ["magnitude", "taylor"]}, generator=torch.Generator().manual_seed(3))
    assert h1 == h2 and len(set(h1.values())) == 6  # no exact ties left for a by-name order to decide


def _real_criteria_scores(seed: int = 0):
    """Real criteria on a tiny BERT supernet (6 layers, LoRA on q+v and on the FFN, adapters after the FFN)
    after a few training steps: unit -> score for taylor, gradient, magnitude, activation, norm_ratio."""
    from transformers import BertConfig, BertForSequenceClassification

    from prunetune.config import TrainConfig
    from prunetune.train import TrainState

    torch.manual_seed(seed)
    hf = BertForSequenceClassification(BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=6,
                                                  num_attention_heads=4, intermediate_size=48,
                                                  max_position_embeddings=32))
    net = Supernet(hf, get_arch(hf), ["lora_qv", "lora_ffn", "adapter_attn"], lora_r=4, adapter_size=4,
                   lora_dropout=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    batches = []
    for _ in range(8):  # the label is whether token 7 occurs: something to learn, so gradients are not noise
        ids = torch.randint(1, 60, (8, 12), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                        "labels": (ids == 7).any(1).long()})
    tracker = ImportanceTracker(hf, net.adapters, groups=net.groups(), spans=net.spans()).start()
    state = TrainState(net.model, hf, {"adapters": net.adapters}, TrainConfig(lr=5e-3, batch_size=8), batches, 8,
                       torch.device("cpu"), desc="null", constant_lr=True)
    state.run(8, before_forward=lambda b: setattr(tracker, "token_mask", b.get("attention_mask")),
              after_backward=lambda _s: tracker.after_backward(finite=True))
    tracker.stop()
    stats = tracker.unit_stats()
    params = {u: net.unit_params(u) for u in net.alive}
    ctx = {"generator": torch.Generator().manual_seed(0), "threshold": 1e-3, "per_parameter": True}
    crits = ("taylor", "gradient", "magnitude", "activation", "norm_ratio")
    kind = {u.name: u.type for u in net.units}
    layer = {u.name: u.layer for u in net.units}
    return {c: score_units(c, params, stats, ctx) for c in crits}, kind, layer, net.arch.num_layers


def test_calibrated_combination_is_unbiased_on_real_correlated_criteria():
    """The null on real criteria: scores from a trained tiny supernet (correlated as real criteria are), with
    every unit made equal by handing each unit the whole score vector of a randomly drawn unit (a permutation
    per trial keeps the criteria's joint distribution). Blocks get 1 to 5 criteria, as warm-up mappings do.
    Per block (type x depth band) and per type, removals stay within tolerance of proportional to size."""
    from prunetune.scores.proxy import spearman

    real, kind, layer, layers = _real_criteria_scores()
    units = sorted(real["taylor"])
    rho = spearman([real["gradient"][u] for u in units], [real["taylor"][u] for u in units])
    assert rho > 0.5, rho  # the point of the test: real criteria agree with each other
    blocks = {u: block_of(kind[u], layer[u], layers) for u in units}
    lists = [["taylor"], ["taylor", "gradient", "magnitude", "activation"], ["gradient", "norm_ratio"],
             ["magnitude"], ["taylor", "gradient", "magnitude", "activation", "norm_ratio"], ["activation", "taylor"]]
    mapping = {b: lists[i % len(lists)] for i, b in enumerate(sorted(set(blocks.values())))}
    g_perm, g_ties = torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)
    trials = 4000
    for k in (1, 4):
        by_block = dict.fromkeys(set(blocks.values()), 0)
        by_type = dict.fromkeys(set(kind.values()), 0)
        for _ in range(trials):
            perm = torch.randperm(len(units), generator=g_perm).tolist()
            scores = {c: {u: s[units[perm[i]]] for i, u in enumerate(units)} for c, s in real.items()}
            can = informative(scores, units, kind, WEIGHT_SPACE)
            hybrid = combine(scores, blocks, mapping, "calibrated", g_ties, kind, WEIGHT_SPACE, can)
            for u in lowest(hybrid, k):
                by_block[blocks[u]] += 1
                by_type[kind[u]] += 1
        for counts, group in ((by_block, blocks), (by_type, kind)):
            for name, n in counts.items():
                p = sum(1 for u in units if group[u] == name) / len(units)
                share = (n / (trials * k)) / p
                # 4 binomial standard deviations (blocks of 1-2 units are small) or 10%, whichever is larger
                tol = max(0.1, 4 * ((1 - p) / (p * trials * k)) ** 0.5)
                assert abs(share - 1) <= tol, (k, name, share, tol, counts)
    # the test has power: the paper's Eq. 1 on the same null is far from proportional (measured 0.33x-1.5x)
    by_block = dict.fromkeys(set(blocks.values()), 0)
    for _ in range(1000):
        perm = torch.randperm(len(units), generator=g_perm).tolist()
        scores = {c: {u: s[units[perm[i]]] for i, u in enumerate(units)} for c, s in real.items()}
        hybrid = combine(scores, blocks, mapping, "eq1", g_ties, kind, WEIGHT_SPACE,
                         informative(scores, units, kind, WEIGHT_SPACE))
        for u in lowest(hybrid, 4):
            by_block[blocks[u]] += 1
    size = {b: sum(1 for u in units if blocks[u] == b) for b in by_block}
    assert max(abs(by_block[b] / 4000 / (size[b] / len(units)) - 1) for b in by_block) > 0.4, by_block
