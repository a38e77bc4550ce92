"""prune.reconstruct_scores: heads and neurons priced by what least-squares reconstruction cannot rebuild of them."""
from __future__ import annotations

import json

import pytest
import torch
from models import tiny

from prunetune.arch import get_arch
from prunetune.config import from_dict
from prunetune.errors import PrunetuneError
from prunetune.methods.light_peft import _reconstruction_selection
from prunetune.plan import Scores, make_plan
from prunetune.scores import residual_shares, select_kept
from prunetune.scores import residual
from prunetune.scores.residual import _greedy_kept, _layer_shares, ridge


def _data(n: int, cols: int, seed: int, copies: dict[int, int] | None = None) -> torch.Tensor:
    """n rows of correlated columns; copies: column -> the column it is 3x (an exactly predictable input)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=g, dtype=torch.float64) @ (
        torch.eye(cols, dtype=torch.float64) + 0.4 * torch.randn(cols, cols, generator=g, dtype=torch.float64))
    for dst, src in (copies or {}).items():
        x[:, dst] = 3 * x[:, src]
    return x


@pytest.mark.parametrize("width", [1, 2])
def test_shares_are_the_least_squares_residuals_of_each_unit(width):
    """Brute force: regress each unit's columns on the kept units' columns (on the other kept units', for a kept
    unit) and take sqrt(residual energy / energy): the Schur-complement shortcut gives the same."""
    units, kept = 6, [0, 2, 3, 5]
    x = _data(400, units * width, seed=width)
    c = x.T @ x / len(x)
    shares = _layer_shares(c, kept, width, ridge(c, kept, width, 0.0))

    def cols(us):
        return [u * width + j for u in us for j in range(width)]

    for u in range(units):
        others = cols([k for k in kept if k != u])
        y = x[:, cols([u])]
        fit = x[:, others] @ torch.linalg.lstsq(x[:, others], y).solution
        want = ((y - fit).pow(2).sum() / y.pow(2).sum()).sqrt()
        assert float(shares[u]) == pytest.approx(float(want), abs=1e-6), u
    assert 0 < float(shares.min()) and float(shares.max()) < 1  # correlated: each partly predictable


def test_a_copy_is_free_to_remove_while_its_original_stays():
    """A removed input that is 3x a kept one has share 0; the kept original keeps its full share (its copy is
    not there to rebuild it); a layer with nothing kept, and a dead input, leave the scores alone (share 1)."""
    x = _data(300, 5, seed=1, copies={4: 1})
    x[:, 3] = 0.0
    c = x.T @ x / len(x)
    s = _layer_shares(c, [0, 1, 2, 3], 1, ridge(c, [0, 1, 2, 3], 1, 0.0))
    assert float(s[4]) == pytest.approx(0.0, abs=1e-5) and float(s[3]) == 1.0
    both = _layer_shares(c, [0, 1, 2, 3, 4], 1, ridge(c, [0, 1, 2, 3, 4], 1, 0.0))  # both kept: each rebuilds the other
    assert float(both[1]) == pytest.approx(0.0, abs=1e-5) and float(both[4]) == pytest.approx(0.0, abs=1e-5)
    assert torch.equal(_layer_shares(c, [], 1, ridge(c, [], 1, 0.0))[:3], torch.ones(3, dtype=torch.float64))
    damped = _layer_shares(c, [0, 1, 2, 3], 1, ridge(c, [0, 1, 2, 3], 1, 0.01))  # surgery's ridge: the copy is
    assert float(damped[4]) < 0.2  # rebuilt almost fully


@pytest.mark.parametrize("width,spread", [(1, False), (3, False), (1, True), (3, True)])
def test_the_greedy_removal_matches_recomputing_every_share_from_scratch(width, spread):
    """The in-place downdated inverse gives the same removals, in the same order, as recomputing each unit's share
    from the moments given the units still kept, step by step (the naive greedy), with the same ridge; also when
    the inputs' scales spread over three decades (activations with massive channels)."""
    units = 9
    x = _data(300, units * width, seed=7 + width, copies={0: 4} if width == 1 else None)
    if spread:
        x = x * torch.logspace(-1.5, 1.5, units * width, dtype=torch.float64)[torch.randperm(
            units * width, generator=torch.Generator().manual_seed(1))]
    c = x.T @ x / len(x)
    score = torch.rand(units, generator=torch.Generator().manual_seed(width)) + 0.5
    d = ridge(c, list(range(units)), width, 0.01)
    alive = list(range(units))
    for _ in range(5):
        share = _layer_shares(c, alive, width, d)
        u = min(alive, key=lambda j: (float(score[j] * share[j]), j))
        alive.remove(u)
    assert _greedy_kept(c, score, 5, width, d) == alive


def test_wide_layers_remove_several_units_per_step(monkeypatch):
    """Above MAX_STEPS removals a layer removes ceil(n / MAX_STEPS) units per step: the count is exact, the choice
    deterministic, and with steps of one it is the one-at-a-time greedy."""
    x = _data(400, 40, seed=3, copies={5: 6, 7: 8})
    c = x.T @ x / len(x)
    score = torch.rand(40, generator=torch.Generator().manual_seed(2)) + 0.5
    d = ridge(c, list(range(40)), 1, 0.01)
    one_at_a_time = _greedy_kept(c, score, 15, 1, d)
    monkeypatch.setattr(residual, "MAX_STEPS", 4)  # 15 removals: 4 units a step
    chunked = _greedy_kept(c, score, 15, 1, d)
    assert len(chunked) == 25 and chunked == _greedy_kept(c, score, 15, 1, d)
    monkeypatch.setattr(residual, "MAX_STEPS", 15)
    assert _greedy_kept(c, score, 15, 1, d) == one_at_a_time


def test_each_layer_loses_as_many_units_but_the_predictable_ones():
    """A plan's counts per layer stay; which units go changes: on a tiny BERT, neuron m of layer 0 (the plan's
    lowest-scored kept neuron) carries 3x the input of the layer's best neuron o, so one of the two goes in place
    of a removed independent neuron (the other rebuilds it), and the removed units' mean residual share falls."""
    hf = tiny("bert")
    arch = get_arch(hf)
    layers, inter = len(arch.layers), arch.intermediate_size
    width = arch.num_units * arch.heads_per_unit * arch.head_dim
    g = torch.Generator().manual_seed(0)
    scores = Scores(head=[torch.rand(arch.num_units, generator=g) for _ in range(layers)],
                    ffn=[torch.rand(inter, generator=g) + 1.0 for _ in range(layers)], module={}, rank={})
    plan = make_plan(arch=arch, scores=scores, heads=0.25, ffn=0.25, modules=0.0, ranks=0.0)
    kept0 = sorted(plan.kept_neurons[0], key=lambda j: float(scores.ffn[0][j]))
    m, o = kept0[0], kept0[-1]

    def moment(x):
        return x.T @ x / len(x)

    moments = (torch.stack([moment(_data(200, width, seed=10 + i)) for i in range(layers)]),
               torch.stack([moment(_data(300, inter, seed=20 + i, copies={m: o} if i == 0 else None))
                            for i in range(layers)]))
    chosen, summary = _reconstruction_selection(plan, scores, moments, arch=arch, damp=0.01)
    assert len({m, o} & set(chosen.kept_neurons[0])) == 1  # one goes, rebuilt from the other (which must stay)
    assert [len(k) for k in chosen.kept_neurons] == [len(k) for k in plan.kept_neurons]
    assert [len(k) for k in chosen.kept_heads] == [len(k) for k in plan.kept_heads]
    assert chosen.peft_ranks == plan.peft_ranks and chosen.meta is plan.meta
    assert summary["ffn"]["changed"] >= 1
    assert summary["ffn"]["removed_share"] < summary["ffn"]["removed_share_first_plan"]
    assert 0 < summary["heads"]["removed_share"] <= 1


def test_gqa_heads_are_priced_and_chosen_per_kv_group():
    """Llama with GQA: one share per KV group (its query heads' columns together); of two groups that copy each
    other one goes, whatever their scores, before a group nothing rebuilds."""
    hf = tiny("llama")
    arch = get_arch(hf)
    width = arch.heads_per_unit * arch.head_dim
    x = torch.randn(4000, arch.num_units * width, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x[:, :width] = x[:, width:2 * width] * 2  # group 0 copies group 1; the others are independent
    c = (x.T @ x / len(x))[None]
    ffn = torch.eye(arch.intermediate_size, dtype=torch.float64)[None]
    heads, neurons = residual_shares((c, ffn), kept_heads=[[1, 2]], kept_neurons=[list(range(5))],
                                     head_width=width, damp=0.0)
    assert heads[0].shape == (arch.num_units,) and float(heads[0][0]) == pytest.approx(0.0, abs=1e-5)
    assert float(heads[0][1]) == pytest.approx(1.0, abs=0.01)  # kept, its copy removed: nothing rebuilds it
    assert torch.allclose(neurons[0], torch.ones(arch.intermediate_size, dtype=torch.float64))  # independent
    score = torch.tensor([3.0, 2.0, 1.0])[:arch.num_units]
    kept_h, kept_f = select_kept((c, ffn), head_scores=[score], ffn_scores=[torch.ones(arch.intermediate_size)],
                                 kept_heads=[[0, 1]], kept_neurons=[list(range(arch.intermediate_size))],
                                 head_width=width, damp=0.01)
    # group 2 scores lowest but nothing rebuilds it: one of the copies goes instead
    assert 2 in kept_h[0] and len(kept_h[0]) == 2 and kept_f == [list(range(arch.intermediate_size))]


def test_the_option_needs_reconstruction_and_a_run_records_the_selection(tmp_path):
    with pytest.raises(PrunetuneError, match="reconstruct_scores needs prune.reconstruct"):
        from_dict({"model": {"name_or_path": "x"}, "prune": {"reconstruct_scores": True}})
    with pytest.raises(PrunetuneError, match="structure_score=mask is a signed mask value"):
        from_dict({"model": {"name_or_path": "x"}, "estimate": {"structure_score": "mask"},
                   "prune": {"reconstruct": True, "reconstruct_scores": True}})
    from test_pipeline import light, save_tiny_bert, write_sst2

    model_dir, data = save_tiny_bert(tmp_path / "bert"), write_sst2(tmp_path / "sst2")
    out = tmp_path / "run"
    light(model_dir, {"data_dir": str(data)}, out, train={"max_steps": 8, "seed": 3}, estimate={"steps": 4},
          prune={"reconstruct": True, "reconstruct_scores": True, "target_speedup": 1.3})
    meta = json.loads((out / "plan.json").read_text())["meta"]
    rs = meta["reconstruct_scores"]
    assert set(rs) == {"heads", "ffn"}
    for kind in ("heads", "ffn"):
        shares = [rs[kind][k] for k in ("removed_share", "removed_share_first_plan") if rs[kind][k] is not None]
        assert all(0 <= v <= 1 for v in shares) and rs[kind]["changed"] >= 0
    assert meta["compensation"]["reconstruct"]
