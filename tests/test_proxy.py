"""Held-out loss proxy (drop_loss), the supernet's switched_off probe, the held-out split, rank correlation."""
import pytest
import torch

from models import batch, tiny
from prunetune.arch import get_arch
from prunetune.data import EncodedDataset, stratified_split, stratified_subset
from prunetune.scores.criteria import score_units
from prunetune.scores.proxy import drop_loss, mean_loss, spearman
from prunetune.units.supernet import Supernet


def _net(seed: int = 5):
    hf = tiny("bert")
    net = Supernet(hf, get_arch(hf), ["lora_qv", "adapter_ffn", "parallel_ffn"], lora_r=4, lora_dropout=0.0,
                   adapter_size=4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-zero B / up: every unit changes the output
        for u in net.units:
            for p in net.unit_params(u.name):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return net.model.eval(), net


@pytest.mark.parametrize("unit", ["lora_qv@0", "adapter_ffn@1", "parallel_ffn@0"])
def test_switched_off_equals_removed_and_restores_exactly(unit):
    model, net = _net()
    b = batch(seed=3, bsz=2, seq=6)
    before = model(**b).logits
    with net.switched_off(unit):
        off = model(**b).logits
    after = model(**b).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)  # restored bit for bit
    assert not torch.allclose(off, before)
    net.remove([unit])  # the permanent removal gives the same function as the probe
    torch.testing.assert_close(model(**b).logits, off, atol=1e-6, rtol=0)


def test_drop_loss_is_the_held_out_loss_increase():
    model, net = _net()
    model.train()  # drop_loss evaluates without dropout and gives the mode back
    batches = [dict(batch(seed=s, bsz=3, seq=7), labels=torch.tensor([0, 1, 1])) for s in (1, 2)]
    units = sorted(net.alive)
    d = drop_loss(model, units, net.switched_off, batches, torch.device("cpu"))
    assert model.training
    model.eval()
    base = mean_loss(model, batches, torch.device("cpu"))
    for u in units:
        with net.switched_off(u):
            assert d[u] == pytest.approx(mean_loss(model, batches, torch.device("cpu")) - base, abs=1e-7)
    # a unit whose output is zero changes nothing
    with torch.no_grad():
        dead = net.adapters.get(net.by_name["adapter_ffn@0"].positions[0])
        dead.up.weight.zero_()
        dead.up.bias.zero_()
    assert drop_loss(model, ["adapter_ffn@0"], net.switched_off, batches, torch.device("cpu"))["adapter_ffn@0"] == 0.0
    # as a criterion (lower = prune first), per parameter like taylor
    params = {u: net.unit_params(u) for u in units}
    raw = score_units("drop_loss", params, {"drop_loss": d}, {})
    per = score_units("drop_loss", params, {"drop_loss": d}, {"per_parameter": True})
    assert raw == d and all(per[u] == pytest.approx(d[u] / sum(p.numel() for p in params[u])) for u in units)


def test_stratified_split_is_a_partition_with_the_subset_first():
    rows = EncodedDataset([{"input_ids": [i], "labels": i % 3} for i in range(30)])
    held, rest = stratified_split(rows, 9, seed=4)
    ids = lambda ds: [r["input_ids"][0] for r in ds.items]  # noqa: E731
    assert len(held) == 9 and len(rest) == 21 and set(ids(held)).isdisjoint(ids(rest))
    assert sorted(ids(held) + ids(rest)) == list(range(30))
    assert ids(held) == ids(stratified_subset(rows, 9, seed=4))
    assert sorted(r["labels"] for r in held.items) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    whole, none = stratified_split(rows, 100, seed=4)
    assert whole is rows and len(none) == 0


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [10, 30, 20]) == pytest.approx(0.5)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254)  # average ranks for ties
    assert spearman([1, 1, 1], [1, 2, 3]) == 0.0


@pytest.mark.parametrize("family", ["bert", "gpt2", "opt", "llama"])
@pytest.mark.parametrize("space,chunk", [(["lora_qv", "lora_ko", "lora_ffn", "parallel_ffn"], 2),
                                         (["lora_qv", "adapter_ffn", "adapter_attn"], None)])
def test_drop_loss_replaying_the_blocks_below_a_unit_gives_the_same_numbers(family, space, chunk):
    """The fast path (blocks below the unit replayed from the all-on pass) against recomputing every block:
    every unit type on each architecture, rank chunks and whole units, with padding and labels."""
    hf = tiny(family)
    if get_arch(hf).fused_qkv:  # GPT-2's c_attn holds q, k and v: lora_qv and lora_ko would share it
        space = [t for t in space if t != "lora_ko"]
    net = Supernet(hf, get_arch(hf), space, lora_r=4, lora_dropout=0.0, adapter_size=4, chunk=chunk)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for u in net.units:
            for p in net.unit_params(u.name):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    batches = [dict(batch(seed=s, bsz=3, seq=7), labels=torch.tensor([0, 1, 1])) for s in (1, 2)]
    units = sorted(net.alive)
    net.model.eval()
    before = mean_loss(net.model, batches, torch.device("cpu"))
    assert net.blocks() is not None and len(net.blocks()) == 2 and {net.unit_blocks()[u] for u in units} == {0, 1}
    slow = drop_loss(net.model, units, net.switched_off, batches, torch.device("cpu"))
    fast = drop_loss(net.model, units, net.switched_off, batches, torch.device("cpu"), blocks=net.blocks(),
                     unit_block=net.unit_blocks())
    assert fast.keys() == slow.keys() and all(abs(slow[u]) > 1e-6 for u in units)  # every unit matters here
    for u in units:
        assert fast[u] == pytest.approx(slow[u], rel=1e-6, abs=1e-12), u
    # the blocks are given back as they were: the model computes the same loss afterwards, bit for bit
    assert all("forward" not in blk.__dict__ for blk in net.blocks())
    assert mean_loss(net.model, batches, torch.device("cpu")) == before
