"""PrunePEFT: the supernet of PEFT units (all families), unit removal, parallel-adapter math, export round
trips of searched structures, and end-to-end searches on a tiny saved BERT (warm-up + cache, budget, costs,
lora_config.json, combined foundation pruning, reinit, low fidelity, random criterion, CLI errors)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import make_tokenizer
from models import batch, tiny

import prunetune
from prunetune.arch import get_arch
from prunetune.cli import main
from prunetune.config import from_dict
from prunetune.errors import PrunetuneError
from prunetune.methods import prune_peft
from prunetune.methods.common import prepare
from prunetune.plan import PruningPlan
from prunetune.report.search import _prediction_lines
from prunetune.units.lora import ADAPTER, lora_layers
from prunetune.units.structure import PeftStructure, unit_positions
from prunetune.units.supernet import Supernet

FAMILIES = ["bert", "gpt2", "opt", "llama"]
SPACES = [["lora_qv", "adapter_ffn", "adapter_attn", "parallel_ffn"],
          ["lora_qv", "lora_ffn", "adapter_attn", "parallel_ffn"]]  # lora_ffn and adapter_ffn share `down`


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _perturb(net: Supernet, seed: int = 3, std: float = 0.2) -> None:
    """Non-zero values in every unit (LoRA B and adapter up start at zero: the supernet starts as identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for u in net.units:
            for p in net.unit_params(u.name):
                p.add_(torch.randn(p.shape, generator=g) * std)


def _supernet(family: str, space, **kw) -> Supernet:
    hf = tiny(family)
    kw.setdefault("lora_dropout", 0.0)
    return Supernet(hf, get_arch(hf), space, **kw)


@torch.no_grad()
def _logits(model, b=None) -> torch.Tensor:
    model.eval()
    return model(**(b or batch())).logits



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is faster and immune to CPU oversubscription; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# ------------------------------------------------------------------------------------------- supernet
@pytest.mark.parametrize("space", SPACES, ids=["adapters", "lora_ffn"])
@pytest.mark.parametrize("family", FAMILIES)
def test_supernet_units_sizes_and_identity_start(family, space):
    base = _logits(tiny(family))
    net = _supernet(family, space, lora_r=4, adapter_size=6)
    arch = net.arch
    assert len(net.units) == len(space) * arch.num_layers == len(net.alive)
    assert {u.name for u in net.units} == {f"{t}@{l}" for t in space for l in range(arch.num_layers)}
    # trainable() = sum of unit sizes = every trainable PEFT parameter of the model
    sizes = {u.name: net.unit_size(u.name) for u in net.units}
    assert net.trainable() == sum(sizes.values())
    peft_params = sum(p.numel() for n, p in net.hf.named_parameters() if p.requires_grad and "lora_" in n)
    peft_params += sum(p.numel() for p in net.adapters.parameters() if p.requires_grad)
    assert net.trainable() == peft_params
    h = arch.hidden_size
    for u in net.units:
        if u.kind == "adapter":
            assert sizes[u.name] == 2 * h * 6 + 6 + h  # down (h x 6 + 6) + up (6 x h + h)
    if family == "bert":  # q, v: 32 -> 32; FFN up 32 -> 48, down 48 -> 32; r = 4
        assert sizes["lora_qv@0"] == 2 * (4 * 32 + 32 * 4)
        if "lora_ffn" in space:
            assert sizes["lora_ffn@1"] == (4 * 32 + 48 * 4) + (4 * 48 + 32 * 4)
    if family == "llama" and "lora_ffn" in space:
        assert len(net.by_name["lora_ffn@0"].positions) == 3  # up, gate, down
    if family == "gpt2":
        assert len(net.by_name["lora_qv@0"].positions) == 1  # fused c_attn
    # LoRA B and adapter up start at zero: the supernet computes the base model
    torch.testing.assert_close(_logits(net.model), base, atol=1e-6, rtol=0)
    _perturb(net)
    assert not torch.allclose(_logits(net.model), base, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_overlapping_unit_types_raise(family):
    arch = get_arch(tiny(family))
    # a serial adapter after the FFN sits on the LoRA `down` module; after attention on LoRA `o`
    assert set(unit_positions(arch, "adapter_ffn", 0)) <= set(unit_positions(arch, "lora_ffn", 0))
    assert set(unit_positions(arch, "adapter_attn", 0)) <= set(unit_positions(arch, "lora_ko", 0))
    for space in (["lora_ffn", "adapter_ffn"], ["adapter_attn", "lora_ko"], ["lora_qv", "lora_qv"]):
        with pytest.raises(PrunetuneError, match="overlap"):
            _supernet(family, space)
    if family == "gpt2":  # fused qkv: q, k and v are one module
        with pytest.raises(PrunetuneError, match="overlap"):
            _supernet(family, ["lora_qv", "lora_ko"])
    else:
        assert len(_supernet(family, ["lora_qv", "lora_ko"]).units) == 4
    # parallel FFN adapters sit on their own position: they coexist with LoRA on the FFN and serial adapters
    assert len(_supernet(family, ["lora_ffn", "parallel_ffn", "adapter_attn"]).units) == 6
    assert len(_supernet(family, ["adapter_ffn", "parallel_ffn"]).units) == 4
    for space in ([], ["lora_qv", "bogus"]):
        with pytest.raises(PrunetuneError, match="unknown unit type"):
            _supernet(family, space)


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_lora_unit_zeroes_its_delta_and_freezes_it(family):
    space = SPACES[1]
    net, ref = _supernet(family, space), _supernet(family, space)
    _perturb(net)
    _perturb(ref)
    before = _logits(net.model)
    full = net.trainable()
    victim = "lora_qv@0" if family != "llama" else "lora_ffn@1"
    net.remove([victim])
    with torch.no_grad():
        for pos in ref.by_name[victim].positions:
            ref._lora[pos].lora_B[ADAPTER].weight.zero_()
    after = _logits(net.model)
    torch.testing.assert_close(after, _logits(ref.model), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(after, before, atol=1e-4)  # the unit mattered
    assert all(not p.requires_grad for p in net.unit_params(victim))
    assert victim not in net.alive and net.trainable() == full - net.unit_size(victim)
    assert victim not in net.groups()
    st = net.structure()
    assert not set(net.by_name[victim].positions) & set(st.lora)


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_adapter_unit_unhooks_it(family):
    space = SPACES[0]
    net, ref = _supernet(family, space), _supernet(family, space)
    _perturb(net)
    _perturb(ref)
    hooks = _hooks(net.hf)
    net.remove(["adapter_attn@1"])
    assert _hooks(net.hf) == hooks - 1
    net.remove(["parallel_ffn@0"])  # a parallel adapter holds a pre-hook (input of up) and a hook (down)
    assert _hooks(net.hf) == hooks - 3
    with torch.no_grad():
        for name in ("adapter_attn@1", "parallel_ffn@0"):
            ad = ref.adapters.get(ref.by_name[name].positions[0])
            ad.up.weight.zero_()
            ad.up.bias.zero_()
    torch.testing.assert_close(_logits(net.model), _logits(ref.model), atol=1e-6, rtol=1e-5)
    gone = {net.by_name[n].positions[0] for n in ("adapter_attn@1", "parallel_ffn@0")}
    assert not gone & set(net.adapters.names())
    # structure(): only the alive units
    st = net.structure()
    assert st.units == net.alive == [u.name for u in net.units if u.name not in ("adapter_attn@1", "parallel_ffn@0")]
    alive = [net.by_name[n] for n in net.alive]
    assert set(st.adapters) == {p for u in alive if u.kind == "adapter" for p in u.positions}
    assert set(st.lora) == {p for u in alive if u.kind == "lora" for p in u.positions}
    assert net.trainable() == sum(net.unit_size(n) for n in net.alive)


def test_reinit_restores_identity_and_is_seeded():
    net = _supernet("bert", SPACES[1])
    base = _logits(tiny("bert"))
    a_before = net._lora[net.by_name["lora_qv@0"].positions[0]].lora_A[ADAPTER].weight.detach().clone()
    _perturb(net)
    net.reinit(5)
    torch.testing.assert_close(_logits(net.model), base, atol=1e-6, rtol=0)  # B = 0, up = 0 again
    a = net._lora[net.by_name["lora_qv@0"].positions[0]].lora_A[ADAPTER].weight.detach().clone()
    assert a.abs().sum() > 0 and not torch.equal(a, a_before)
    down = net.adapters.get(net.by_name["parallel_ffn@1"].positions[0]).down.weight.detach().clone()
    assert down.abs().sum() > 0
    _perturb(net, seed=9)
    net.reinit(5)
    assert torch.equal(net._lora[net.by_name["lora_qv@0"].positions[0]].lora_A[ADAPTER].weight, a)
    assert torch.equal(net.adapters.get(net.by_name["parallel_ffn@1"].positions[0]).down.weight, down)


@pytest.mark.parametrize("family", FAMILIES)
def test_parallel_adapter_math(family):
    """Parallel adapter: output of the FFN down module + up(act(down(input of the FFN up module)))."""
    net = _supernet(family, ["parallel_ffn"])
    _perturb(net)
    layer = net.arch.layers[1]
    up_mod, down_mod = net.hf.get_submodule(layer.up), net.hf.get_submodule(layer.down)
    seen = {}
    h1 = up_mod.register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0].detach()))
    h2 = down_mod.register_forward_pre_hook(lambda _m, args: seen.__setitem__("down_in", args[0].detach()))
    h3 = down_mod.register_forward_hook(lambda _m, _i, out: seen.__setitem__("out", out.detach()))  # after ours
    _logits(net.model)
    for h in (h1, h2, h3):
        h.remove()
    adapter = net.adapters.get(net.by_name["parallel_ffn@1"].positions[0])
    with torch.no_grad():
        expected = down_mod.forward(seen["down_in"]) + adapter.up(adapter.act(adapter.down(seen["x"])))
        serial = down_mod.forward(seen["down_in"])
        serial = serial + adapter.up(adapter.act(adapter.down(serial)))
    torch.testing.assert_close(seen["out"], expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(seen["out"], serial, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_found_structure_export_round_trip(family, tmp_path):
    space = ["lora_qv", "lora_ffn", "adapter_attn", "parallel_ffn"]
    net = _supernet(family, space, ranks={"lora_ffn": 4})
    net.remove(["lora_qv@1", "adapter_attn@0", "lora_ffn@0"])
    st = PeftStructure.from_dict(json.loads(json.dumps(net.structure().to_dict())))
    assert st.lora and st.adapters
    assert {r for p, r in st.lora.items() if p in net.by_name["lora_ffn@1"].positions} == {4}

    hf = tiny(family)
    arch = get_arch(hf)
    model, adapters = st.build(hf, arch)
    assert {n: l.r[ADAPTER] for n, l in lora_layers(hf).items()} == st.lora
    assert adapters.sizes() == st.adapters
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(hf).values():
            w = layer.lora_B[ADAPTER].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.3)
        for p in adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    b = batch(seed=4)
    expected = _logits(model, b)
    assert not torch.allclose(expected, _logits(tiny(family), b), atol=1e-4)
    out = prunetune.save_export(tmp_path / "exp", hf, PruningPlan.unpruned(arch, hf.config.model_type),
                                peft_model=model, adapters=adapters)
    loaded = prunetune.load(out)
    assert loaded.info["peft"] == "lora+adapter"
    assert loaded.adapters.sizes() == st.adapters
    assert {n: l.r[ADAPTER] for n, l in lora_layers(loaded.model.base_model.model).items()} == st.lora
    torch.testing.assert_close(_logits(loaded.model, b), expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ end to end
POS = ["the movie was good and the actors were great", "a charming and often affecting journey",
       "one of the best films of the year", "a great and wonderful story", "i loved this film , it is great"]
NEG = ["the plot is bad , boring and too long", "it is not a film i would watch again",
       "a dull and terrible mess", "i hated this movie , it is bad", "the worst film of the year"]
METRICS = {"accuracy", "f1", "matthews"}


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("bert")
    tok = make_tokenizer(POS + NEG)
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64, num_labels=2)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sst2_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sst2")
    for name, n in (("train.tsv", 64), ("dev.tsv", 32)):
        rows = [f"{(POS if i % 2 else NEG)[(i // 2) % 5]}\t{i % 2}" for i in range(n)]
        (folder / name).write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _cfg(bert_dir, sst2_dir, out: Path, cache: Path | None = None, **search) -> dict:
    s = {"space": ["lora_qv", "lora_ffn"], "warmup": True, "warmup_samples": 16, "warmup_round_steps": 1,
         "warmup_cache": str(cache) if cache else None, "round_steps": 2, "budget": 0.4, "k": 2}
    s.update(search)
    return {"model": {"name_or_path": str(bert_dir)}, "data": {"data_dir": str(sst2_dir)}, "output_dir": str(out),
            "train": {"epochs": 1, "batch_size": 8, "eval_batch_size": 16, "lr": 5e-3}, "search": s}


def _run(cfg: dict, models: list | None = None, export: bool = True) -> dict:
    """prune_peft.run, keeping the retrained in-memory model (run() drops it from the results)."""
    original = prune_peft.train_fixed

    def keep(*args, **kw):
        res = original(*args, **kw)
        if models is not None:
            models.append(res.model)
        return res

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prune_peft, "train_fixed", keep)
        return prune_peft.run(from_dict(cfg), export=export)


def _cli_eval(capsys, export: Path, data: Path) -> dict:
    capsys.readouterr()
    assert main(["eval", str(export), "--data-dir", str(data)]) == 0
    return json.loads(capsys.readouterr().out)


def _assert_metrics_equal(got: dict, want: dict) -> None:
    a = {k: v for k, v in got.items() if k in METRICS}
    b = {k: v for k, v in want.items() if k in METRICS}
    assert a and a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=1e-9), (k, got, want)


def _assert_export_matches_memory(export: Path, model, tokenizer) -> None:
    enc = tokenizer(POS[:3] + NEG[:2], padding=True, return_tensors="pt")
    loaded = prunetune.load(export)
    torch.testing.assert_close(_logits(loaded.model, dict(enc)), _logits(model, dict(enc)), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def lora_run(bert_dir, sst2_dir, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lora"
    models: list = []
    results = _run(_cfg(bert_dir, sst2_dir, out, cache_dir), models)
    return out, results, models[0]


def test_search_meets_budget_and_records_rounds(lora_run):
    out, results, _ = lora_run
    # 2 layers; q, v: 32 -> 32 at r = 8: 2 x 512 per lora_qv unit; FFN 32 -> 48 -> 32: 640 + 640 per lora_ffn
    assert results["supernet_params"] == 2 * 1024 + 2 * 1280
    assert results["budget_params"] == int(0.4 * results["supernet_params"])
    rounds = results["rounds"]
    assert rounds and [r["round"] for r in rounds] == list(range(1, len(rounds) + 1))
    trainable = [results["supernet_params"]] + [r["trainable"] for r in rounds]
    assert all(b < a for a, b in zip(trainable, trainable[1:]))
    assert trainable[-1] <= results["budget_params"] < trainable[-2]  # stops as soon as the budget is met
    assert all(1 <= len(r["removed"]) <= 2 and len(r["blocks_removed"]) == len(r["removed"]) for r in rounds)
    assert [r["step"] for r in rounds] == [2 * (i + 1) for i in range(len(rounds))]  # round_steps = 2
    removed = [u for r in rounds for u in r["removed"]]
    st = results["structure"]
    fill = results["fill"]  # the budget left by the last removal, spent on a unit that round removed
    assert len(fill) == 1 and 0 < next(iter(fill.values())) < 8  # 0.4 x 4608 is met by no set of whole units
    assert set(fill) <= set(rounds[-1]["removed"])
    alive = [u for u in st["units"] if u not in fill]
    assert sorted(alive + removed) == sorted(f"{t}@{l}" for t in ("lora_qv", "lora_ffn") for l in range(2))
    assert rounds[-1]["alive"] == len(alive)
    # the retrain trains exactly the found structure, within the budget
    per_rank = {"lora_qv": 2 * 64, "lora_ffn": 80 + 80}
    filled = sum(w * per_rank[u.split("@")[0]] for u, w in fill.items())
    assert results["retrain"]["trainable_params_no_head"] == trainable[-1] + filled <= results["budget_params"]
    assert json.loads((out / "found_structure.json").read_text()) == st
    assert not st["adapters"] and st["lora"]


def test_search_report_shows_every_unit(lora_run):
    from prunetune.report.search import unit_grid

    out, results, _ = lora_run
    types, layers, cells = unit_grid(results)
    assert types == ["lora_qv", "lora_ffn"] and layers == 2 and len(cells) == 4
    (name, width), = results["fill"].items()
    t, layer = name.split("@")
    assert cells[(t, int(layer))] == f"kept, width {width}"
    kept = [k for k, c in cells.items() if c == "kept"]
    assert sorted(f"{t}@{l}" for t, l in kept) == sorted(u for u in results["structure"]["units"] if u != name)
    for rd in results["rounds"]:
        for u in rd["removed"]:
            if u != name:
                t, layer = u.split("@")
                assert cells[(t, int(layer))] == f"round {rd['round']}"
    report = (out / "report.md").read_text()
    assert "| lora_qv | " in report and f"budget {results['budget_params']:,}" in report
    assert "## Criteria per block (warm-up)" in report and (out / "units.png").stat().st_size > 1000
    drawn = [u for rd in results["rounds"] for u in rd["drawn"]]
    assert all(u in report for u in drawn) and (("random draw" in report) == bool(drawn))


def test_search_cost_amortises_the_warmup_over_the_tasks_that_use_it():
    from types import SimpleNamespace

    found = SimpleNamespace(steps=30, seconds=6.0)
    retrain = {"steps": 200, "train_seconds_no_eval": 40.0, "train_seconds": 55.0}
    wu = {"steps": 120, "seconds": 24.0, "cached": True, "tasks": ["sst2", "cola", "rte"]}
    c = prune_peft.search_cost(found, wu, retrain)
    assert (c["ratio_steps"], c["ratio_seconds"]) == (30 / 200, 6.0 / 40.0)
    assert (c["ratio_steps_with_warmup"], c["ratio_seconds_with_warmup"]) == (150 / 200, 30.0 / 40.0)
    assert (c["ratio_steps_amortised"], c["ratio_seconds_amortised"]) == ((30 + 40) / 200, (6.0 + 8.0) / 40.0)
    assert c["warmup_cached"] and c["warmup_tasks"] == 3
    none = prune_peft.search_cost(found, None, retrain)
    assert none["ratio_steps_with_warmup"] == none["ratio_steps"] and none["warmup_steps"] == 0


def test_search_and_retrain_costs(lora_run):
    _, results, _ = lora_run
    sc, rc = results["search_cost"], results["retrain_cost"]
    assert sc["steps"] == 2 * len(results["rounds"]) and sc["seconds"] > 0
    assert rc["steps"] == 8 and rc["seconds"] > 0  # 64 rows / batch 8, one epoch
    assert sc["ratio_steps"] == pytest.approx(sc["steps"] / rc["steps"])
    assert sc["ratio_seconds"] == pytest.approx(sc["seconds"] / rc["seconds"])
    # evaluation treated alike: the retrain's seconds leave its epoch-end dev evaluation out, as the search's do
    rt = results["retrain"]
    assert rc["seconds"] == rt["train_seconds_no_eval"] < rt["train_seconds"]
    wu = results["warmup"]
    assert wu["cached"] is False and sc["warmup_steps"] == wu["steps"] > 0 and sc["warmup_seconds"] > 0
    assert sc["warmup_tasks"] == 1 and sc["ratio_steps_amortised"] == sc["ratio_steps_with_warmup"]
    assert sc["ratio_steps_with_warmup"] == pytest.approx((sc["steps"] + wu["steps"]) / rc["steps"])
    # one pruning pass per warm-up criterion; every block gets at least one criterion
    assert set(wu["counts"]) == set(from_dict({}).search.warmup_criteria)
    assert set(wu["mapping"]) == {"lora_qv/b0", "lora_qv/b2", "lora_ffn/b0", "lora_ffn/b2"}
    assert all(wu["mapping"].values())
    saved = json.loads((Path(results["config"]["output_dir"]) / "results.json").read_text())
    assert saved["search_cost"] == sc and saved["rounds"] == results["rounds"]


def test_lora_config_json_is_a_valid_peft_config(lora_run, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    out, results, _ = lora_run
    data = json.loads((out / "lora_config.json").read_text())
    assert data == results["lora_config"]
    init = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    cfg = LoraConfig(**{k: v for k, v in data.items() if k in init})
    st = results["structure"]
    assert set(cfg.target_modules) == set(st["lora"]) and cfg.r == 8 and cfg.lora_alpha == 16
    # the same file as an adapter_config.json loads through peft's own reader
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    again = LoraConfig.from_pretrained(str(tmp_path))
    assert set(again.target_modules) == set(st["lora"]) and again.r == cfg.r
    # and applied to the base model it places exactly the found LoRA modules
    hf = AutoModelForSequenceClassification.from_pretrained(results["config"]["model"]["name_or_path"])
    get_peft_model(hf, again)
    assert {n: l.r[ADAPTER] for n, l in lora_layers(hf).items()} == st["lora"]


def test_lora_config_json_reproduces_the_retrain_with_plain_peft(lora_run, tmp_path):
    """get_peft_model(AutoModelForSequenceClassification(base), lora_config.json) must give exactly the retrain's
    trainable structure (LoRA modules + ranks, the task head trained) and, given the same weights, its outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    out, results, retrained = lora_run
    (tmp_path / "adapter_config.json").write_text((out / "lora_config.json").read_text())
    config = LoraConfig.from_pretrained(str(tmp_path))
    assert config.task_type == "SEQ_CLS" and config.modules_to_save == ["classifier"]
    plain = get_peft_model(AutoModelForSequenceClassification.from_pretrained(results["config"]["model"]["name_or_path"]),
                           config)
    trainable = lambda m: {n: p.numel() for n, p in m.named_parameters() if p.requires_grad}  # noqa: E731
    ours, theirs = trainable(retrained), trainable(plain)
    # same parameters under peft's names for the head copy (classifier.modules_to_save.default.*)
    assert sorted(ours.values()) == sorted(theirs.values()) and sum(ours.values()) == sum(theirs.values())
    rename = lambda n: n.replace(".modules_to_save.default", "")  # noqa: E731
    assert {rename(n) for n in theirs} == set(ours)
    # the retrain's weights loaded under those names give the retrain's outputs
    state = retrained.state_dict()
    plain.load_state_dict({k: state[rename(k).replace(".original_module", "")] for k in plain.state_dict()})
    retrained.eval(), plain.eval()
    batch = {"input_ids": torch.tensor([[2, 5, 6, 7, 3], [2, 8, 9, 3, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])}
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, retrained(**batch).logits, atol=1e-6, rtol=0)


def test_warmup_mapping_is_cached(lora_run, bert_dir, sst2_dir, cache_dir, tmp_path):
    _, first, _ = lora_run
    calls: list[str] = []
    original = prune_peft.iterative_prune

    def spy(*args, **kw):
        calls.append(kw.get("desc", "search"))
        return original(*args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prune_peft, "iterative_prune", spy)
        again = _run(_cfg(bert_dir, sst2_dir, tmp_path / "again", cache_dir), export=False)
    assert calls == ["search"]  # no warm-up pruning passes
    wu = again["warmup"]
    assert wu["cached"] is True and wu["mapping"] == first["warmup"]["mapping"]
    # a cached warm-up still costs what it cost: reported, flagged as cached, shared by the tasks that use it
    sc = again["search_cost"]
    assert sc["warmup_cached"] and sc["warmup_steps"] == first["warmup"]["steps"] > 0
    assert sc["warmup_tasks"] == 1  # the same task again does not dilute it
    assert again["structure"] == first["structure"]  # same seed, same mapping: same search
    assert again["rounds"] == first["rounds"]
    assert not (tmp_path / "again" / "model").exists()
    # another search space is another cache entry
    ctx = prepare(from_dict(_cfg(bert_dir, sst2_dir, tmp_path / "a", cache_dir)))
    other = prepare(from_dict(_cfg(bert_dir, sst2_dir, tmp_path / "b", cache_dir, space=["lora_qv"])))
    assert prune_peft._cache_file(other) != prune_peft._cache_file(ctx)
    assert prune_peft._cache_file(ctx).is_file() and not prune_peft._cache_file(other).exists()
    raw = prepare(from_dict(_cfg(bert_dir, sst2_dir, tmp_path / "c", cache_dir, per_parameter=False)))
    assert prune_peft._cache_file(raw) != prune_peft._cache_file(ctx)  # other scores, other mapping


@pytest.mark.parametrize("dotted, value", [
    ("search.criteria", ["taylor"]), ("search.threshold", 1e-2), ("search.lora_alpha", 8.0),
    ("search.reinit", True), ("train.lr", 1e-3), ("train.seed", 7), ("train.batch_size", 8),
    ("data.max_length", 64), ("search.space", ["lora_qv"]), ("search.per_parameter", False),
    ("search.warmup_samples", 64), ("train.max_grad_norm", 0.5), ("peft.dropout", 0.1), ("model.dtype", "bfloat16")])
def test_warmup_cache_key_covers_what_changes_the_mapping(dotted, value):
    from prunetune.config import set_dotted

    base = prune_peft.warmup_key(from_dict({}), "m")
    raw: dict = {}
    set_dotted(raw, dotted, value)
    assert prune_peft.warmup_key(from_dict(raw), "m") != base, dotted


@pytest.mark.parametrize("dotted, value", [("search.data_fraction", 0.5), ("search.round_steps", 3),
                                           ("train.epochs", 1.0), ("train.save_every", 7), ("output_dir", "x")])
def test_warmup_cache_key_ignores_what_the_warmup_does_not_see(dotted, value):
    from prunetune.config import set_dotted

    raw: dict = {}
    set_dotted(raw, dotted, value)
    assert prune_peft.warmup_key(from_dict(raw), "m") == prune_peft.warmup_key(from_dict({}), "m")


def test_corrupt_warmup_cache_is_recomputed(bert_dir, sst2_dir, tmp_path):
    ctx = prepare(from_dict(_cfg(bert_dir, sst2_dir, tmp_path / "o", tmp_path / "cache", space=["lora_qv"],
                                 warmup_criteria=["magnitude", "random"])))
    path = prune_peft._cache_file(ctx)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    wu = prune_peft.warmup(ctx)
    assert wu["cached"] is False and wu["steps"] > 0 and set(wu["counts"]) == {"magnitude", "random"}
    assert json.loads(path.read_text())["mapping"] == wu["mapping"]
    assert prune_peft.warmup(ctx)["cached"] is True


def test_warmup_does_not_count_units_a_tied_criterion_drew_at_random(bert_dir, sst2_dir, tmp_path):
    """zeros is all tied on trained weights: its removals are random draws and must not earn it blocks
    (the reference defect's cousin: a random criterion looking like a block specialist)."""
    ctx = prepare(from_dict(_cfg(bert_dir, sst2_dir, tmp_path / "o", tmp_path / "cache", space=["lora_qv", "lora_ffn"],
                                 warmup_criteria=["zeros", "magnitude"], criteria=["taylor", "activation"])))
    r = prune_peft.iterative_prune(ctx, ctx.train_loader, None, ["zeros"], 1, desc="zeros")
    assert r.rounds and all(rd["drawn"] == rd["removed"] for rd in r.rounds)
    r = prune_peft.iterative_prune(ctx, ctx.train_loader, None, ["magnitude"], 1, desc="magnitude")
    assert r.rounds[0]["drawn"] == []  # two units of each type: ranked within type (a type's last one is not)
    wu = prune_peft.warmup(ctx)
    assert wu["counts"]["zeros"] == {} and sum(wu["counts"]["magnitude"].values()) > 0
    for block, crits in wu["mapping"].items():
        assert "zeros" not in crits
        assert crits == (["magnitude"] if wu["counts"]["magnitude"].get(block) else ["activation", "taylor"])


def test_units_to_remove_stops_at_the_budget():
    net = _supernet("bert", ["lora_qv", "adapter_ffn"])
    order = ["adapter_ffn@1", "lora_qv@0", "lora_qv@1", "adapter_ffn@0"]
    size = {n: net.unit_size(n) for n in order}
    assert size["lora_qv@0"] == 1024 and size["adapter_ffn@0"] == 1072 and net.trainable() == 4192
    assert prune_peft._units_to_remove(order, net, 4, 3000) == order[:2]  # 4192 -> 3120 -> 2096 <= 3000
    assert prune_peft._units_to_remove(order, net, 1, 3000) == order[:1]
    assert prune_peft._units_to_remove(order, net, 10, 0) == order[:3]  # never the last unit
    assert prune_peft._units_to_remove(order, net, 4, 5000) == []


@pytest.mark.parametrize("k", [1, 2, 3, 0.25, 0.5])
@pytest.mark.parametrize("budget", [0, 1500, 2500, 4000])
def test_planned_rounds_bounds_the_rounds_of_any_removal_order(k, budget):
    """planned_rounds sizes the warm-up's rows before it knows the order: it must not undercount, whatever
    the criterion ranks first (every order of a 2-layer supernet with units of two sizes)."""
    import itertools

    net = _supernet("bert", ["lora_qv", "adapter_ffn"])
    names = list(net.alive)
    plan = prune_peft.planned_rounds([net.unit_size(u) for u in names], k, budget)
    worst = 0
    for order in itertools.permutations(names):
        alive, rounds = list(order), 0
        fake = SimpleNamespace(unit_size=net.unit_size, alive=alive,
                               trainable=lambda: sum(net.unit_size(u) for u in alive))
        while fake.trainable() > budget and len(alive) > 1:
            for u in prune_peft._units_to_remove(list(alive), fake, prune_peft.per_round(k, len(alive)), budget):
                alive.remove(u)
            rounds += 1
        worst = max(worst, rounds)
    assert worst == plan  # the bound is tight: the smallest-first order reaches it


def test_warmup_draws_as_many_rows_as_its_rounds_consume(bert_dir, sst2_dir, tmp_path):
    """A warm-up on a fixed small subset re-fits rows its rounds have seen (over-fitting poisons drop_loss):
    it draws at least warmup_samples rows and as many as its rounds use, and sees none twice while rows last."""
    ctx = prepare(from_dict(_cfg(bert_dir, sst2_dir, tmp_path / "o", tmp_path / "cache", space=["lora_qv", "lora_ffn"],
                                 warmup_samples=4, warmup_round_steps=2, k=1, budget=0.3,
                                 warmup_criteria=["magnitude"])))
    wu = prune_peft.warmup(ctx)
    batch = ctx.cfg.train.batch_size
    assert wu["rows"] == wu["steps"] * batch > 4  # 8-row batches, 2 steps per round: 16 fresh rows a round
    assert wu["epochs"] == pytest.approx(1.0)
    # more rounds than rows: every training row, each seen about as often
    many = prepare(from_dict(_cfg(bert_dir, sst2_dir, tmp_path / "m", tmp_path / "cache", space=["lora_qv", "lora_ffn"],
                                  warmup_samples=4, warmup_round_steps=6, k=1, budget=0.3,
                                  warmup_criteria=["magnitude"])))
    wu = prune_peft.warmup(many)
    assert wu["rows"] == len(many.train_loader.dataset) == 64 and wu["epochs"] > 1
    # at least warmup_samples, when the rounds need fewer
    few = prepare(from_dict(_cfg(bert_dir, sst2_dir, tmp_path / "f", tmp_path / "cache", space=["lora_qv", "lora_ffn"],
                                 warmup_samples=40, warmup_round_steps=1, k=1, budget=0.3,
                                 warmup_criteria=["magnitude"])))
    assert prune_peft.warmup(few)["rows"] == 40


def test_fill_spends_the_leftover_budget_at_a_smaller_width():
    net = _supernet("bert", ["lora_qv", "adapter_ffn"])  # h = 32; r = 8, adapter size 16
    assert net.size_at("lora_qv@0", 3) == 3 * 2 * (32 + 32)
    assert net.size_at("adapter_ffn@1", 5) == 5 * (2 * 32 + 1) + 32
    assert net.size_at("lora_qv@0", 8) == net.unit_size("lora_qv@0")
    assert net.size_at("adapter_ffn@1", 16) == net.unit_size("adapter_ffn@1")
    net.remove(["adapter_ffn@0", "lora_qv@1"])  # alive: lora_qv@0 (1024) + adapter_ffn@1 (1072) = 2096
    # 2096 + 600 budget: lora_qv@1 fits at rank 4 (512); then 88 left: the adapter needs 97 at width 1
    assert net.fill(["lora_qv@1", "adapter_ffn@0"], 2096 + 600) == {"lora_qv@1": 4}
    got = net.fill(["adapter_ffn@0", "lora_qv@1"], 2096 + 600)  # 8 x 65 + 32 = 552; 48 left < 128
    assert got == {"adapter_ffn@0": 8}
    assert net.fill(["lora_qv@1"], 2096 + 100) == {}  # below one rank
    assert net.fill(["lora_qv@1", "adapter_ffn@0"], 2096 + 1100) == {"lora_qv@1": 8}  # 76 left < 97
    assert net.fill(["adapter_ffn@0"], 2096 + 5000) == {"adapter_ffn@0": 16}  # never beyond its own width
    # the structure carries the smaller widths; built on a fresh model it has exactly the counted parameters
    st = net.structure({"lora_qv@1": 4})
    assert st.units == ["lora_qv@0", "lora_qv@1", "adapter_ffn@1"]
    arch = net.arch
    assert st.lora == {p: 8 for p in unit_positions(arch, "lora_qv", 0)} | \
        {p: 4 for p in unit_positions(arch, "lora_qv", 1)}
    assert st.adapters == {unit_positions(arch, "adapter_ffn", 1)[0]: 16}
    hf = tiny("bert")
    _model, adapters = st.build(hf, get_arch(hf))
    n = sum(p.numel() for name, p in hf.named_parameters() if "lora_" in name) + \
        sum(p.numel() for p in adapters.parameters())
    assert n == 2096 + 512


def test_absolute_budget_and_fractional_k(bert_dir, sst2_dir, tmp_path):
    ctx = prepare(from_dict(_cfg(bert_dir, sst2_dir, tmp_path / "o", warmup=False, criteria=["magnitude"],
                                 round_steps=1, budget=2500, k=0.5)))
    found, wu = prune_peft.search(ctx)
    assert wu is None and found.budget_params == 2500 and found.supernet_params == 4608
    assert len(found.rounds[0]["removed"]) == 2  # k = 0.5 of 4 alive units
    assert found.rounds[-1]["trainable"] <= 2500
    assert len(found.structure.units) == found.rounds[-1]["alive"] + len(found.fill)


def test_lora_export_reloads_with_identical_outputs(lora_run, sst2_dir, capsys):
    out, results, model = lora_run
    manifest = json.loads((out / "model" / "prunetune.json").read_text())
    assert manifest["peft"] == "lora"
    loaded = prunetune.load(out / "model")
    assert {n: l.r[ADAPTER] for n, l in lora_layers(loaded.model.base_model.model).items()} == \
        results["structure"]["lora"]
    _assert_export_matches_memory(out / "model", model, loaded.tokenizer)
    got = _cli_eval(capsys, out / "model", sst2_dir)
    assert got["rows"] == 32
    _assert_metrics_equal(got, results["retrain"]["final"])


def test_combined_mode_prunes_heads_and_reloads(bert_dir, sst2_dir, tmp_path, capsys):
    out = tmp_path / "combined"
    models: list = []
    cfg = _cfg(bert_dir, sst2_dir, out, space=["lora_qv", "adapter_ffn", "adapter_attn", "parallel_ffn"],
               warmup=False, prune_foundation=True, reinit=True)
    cfg["prune"] = {"heads": 1 / 3}
    results = _run(cfg, models)
    plan = results["plan"]
    assert plan["heads_kept"] == "6/8"  # 4 heads x 2 layers, round(4/3) = 1 removed per layer
    assert plan["neurons_kept"] == "64/96"
    assert results["config"]["search"]["reinit"] is True and results["warmup"] is None
    assert results["rounds"][-1]["trainable"] <= results["budget_params"]
    assert results["lora_config"] is None and not (out / "lora_config.json").exists()
    assert (out / "found_structure.json").is_file()
    loaded = prunetune.load(out / "model")
    assert loaded.plan.summary()["heads_kept"] == "6/8"
    st = results["structure"]
    assert loaded.info["peft"] == "+".join((["lora"] if st["lora"] else []) + (["adapter"] if st["adapters"] else []))
    bert = (loaded.model.base_model.model if st["lora"] else loaded.model).bert
    assert all(layer.attention.self.num_attention_heads == 3 for layer in bert.encoder.layer)
    _assert_export_matches_memory(out / "model", models[0], loaded.tokenizer)
    _assert_metrics_equal(_cli_eval(capsys, out / "model", sst2_dir), results["retrain"]["final"])


def test_reinit_resets_optimizer_state_between_rounds(bert_dir, sst2_dir, tmp_path):
    """reinit: surviving units restart from fresh weights, so their AdamW moments must restart too;
    without reinit they carry over."""
    from prunetune.train import TrainState

    seen: dict[bool, list[int]] = {}

    class Spy(TrainState):
        def run(self, *args, **kw):
            seen.setdefault(self._reinit, []).append(len(self.optimizer.state))
            return super().run(*args, **kw)

    for reinit in (False, True):
        ctx = prepare(from_dict(_cfg(bert_dir, sst2_dir, tmp_path / str(reinit), space=["lora_qv", "adapter_ffn"],
                                     warmup=False, round_steps=1, k=1, budget=0.3, reinit=reinit)))
        with pytest.MonkeyPatch.context() as mp:
            Spy._reinit = reinit
            mp.setattr(prune_peft, "TrainState", Spy)
            found, _ = prune_peft.search(ctx)
        assert len(found.rounds) >= 2
    assert seen[False][0] == 0 and all(n > 0 for n in seen[False][1:])
    assert all(n == 0 for n in seen[True])


def test_low_fidelity_random_criterion_search(bert_dir, sst2_dir, tmp_path):
    rows: list[int] = []
    original = prune_peft._loader

    def spy(ctx, size, seed, rows_from=None):
        loader = original(ctx, size, seed, rows_from)
        rows.append(len(loader.dataset))
        return loader

    cfg = _cfg(bert_dir, sst2_dir, tmp_path / "lowfi", space=["lora_qv", "adapter_ffn"], warmup=False,
               criteria=["random"], data_fraction=0.25, round_steps=None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prune_peft, "_loader", spy)
        results = _run(cfg)
    assert rows == [16]  # 25% of 64 rows, label-stratified
    steps = [r["step"] for r in results["rounds"]]
    assert steps == [2 * (i + 1) for i in range(len(steps))]  # one epoch of 16 rows at batch 8 per round
    assert results["retrain_cost"]["steps"] == 8  # the retrain still sees all the data
    assert results["rounds"][-1]["trainable"] <= results["budget_params"]
    assert results["config"]["search"]["criteria"] == ["random"] and results["warmup"] is None
    assert results["search_cost"]["ratio_steps"] == pytest.approx(steps[-1] / 8)
    assert prunetune.load(tmp_path / "lowfi" / "model").info["peft"] in {"lora", "adapter", "lora+adapter"}


def test_drop_loss_search_holds_its_rows_out_of_the_rounds(bert_dir, sst2_dir, tmp_path):
    """drop_loss scores units on training rows the rounds never train on (never the dev set)."""
    seen: list[int] = []
    original = prune_peft.drop_loss

    def spy(model, units, switched_off, batches, device, **kw):
        seen.append(sum(len(b["labels"]) for b in batches))
        return original(model, units, switched_off, batches, device, **kw)

    cfg = _cfg(bert_dir, sst2_dir, tmp_path / "drop", warmup=False, criteria=["drop_loss"], proxy_samples=16)
    ctx = prepare(from_dict(cfg))
    rows, held = prune_peft._split(ctx)
    assert len(rows) == 48 and sum(len(b["labels"]) for b in held) == 16  # a split of the 64 training rows
    assert prune_peft.search_loader(ctx, rows).dataset is rows  # the rounds train on the other 48 rows
    # a search that uses no held-out criterion keeps all its rows
    plain = prepare(from_dict(_cfg(bert_dir, sst2_dir, tmp_path / "plain", warmup=False)))
    assert prune_peft._split(plain) == (plain.train_loader.dataset, None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prune_peft, "drop_loss", spy)
        results = _run(cfg, export=False)
    assert seen and set(seen) == {16} and len(seen) == len(results["rounds"])
    assert results["rounds"][-1]["trainable"] <= results["budget_params"]


def test_warmup_by_prediction_picks_the_criteria_that_agree_with_drop_loss(bert_dir, sst2_dir, tmp_path):
    cfg = _cfg(bert_dir, sst2_dir, tmp_path / "pred", tmp_path / "cache", warmup_by="prediction",
               warmup_criteria=["magnitude", "taylor", "random"], proxy_samples=16)
    results = _run(cfg, export=False)
    wu = results["warmup"]
    assert wu["cached"] is False and set(wu["mapping"]) == set(wu["agreement"])
    for block, crits in wu["mapping"].items():
        best = max(wu["agreement"][block].values())
        assert crits == sorted(c for c, v in wu["agreement"][block].items() if v == best)
        assert set(crits) <= {"magnitude", "taylor", "random"}  # drop_loss is the target, not a candidate
        assert all(0.0 <= v <= 1.0 for v in wu["agreement"][block].values())
    assert set(wu["spearman"]) == {"magnitude", "taylor", "random"}
    assert all(-1.0 <= v <= 1.0 for v in wu["spearman"].values())
    # one pruning pass (by drop_loss), not one per criterion
    assert results["search_cost"]["warmup_steps"] == wu["steps"] > 0
    # the report shows how well each criterion predicted drop_loss, overall and per block
    report = (tmp_path / "pred" / "report.md").read_text()
    assert "How well each criterion predicts drop_loss" in report
    row = next(ln for ln in report.splitlines() if ln.startswith("| Spearman (all units)"))
    assert all(f"{wu['spearman'][c]:+.2f}" in row for c in wu["spearman"])
    assert all(any(ln.startswith(f"| {b} |") and f"{wu['agreement'][b]['taylor']:.2f}" in ln
                   for ln in report.splitlines()) for b in wu["agreement"])
    # and how healthy the proxy was: the share of removals that lowered the held-out loss, round by round
    assert wu["drop_loss_negative"] and all(0.0 <= v <= 1.0 for v in wu["drop_loss_negative"])
    shares = ", ".join(f"{v:.0%}" for v in wu["drop_loss_negative"])
    assert f"per warm-up round: {shares} (the warm-up trained on {wu['rows']} rows" in report


def test_warmup_warns_when_drop_loss_has_turned_negative(bert_dir, sst2_dir, tmp_path, capsys):
    """A supernet that over-fits its rows makes switching units off LOWER the held-out loss: the criteria
    that predict drop_loss would then rank units backwards, and the user is told (with what to change)."""
    cfg = _cfg(bert_dir, sst2_dir, tmp_path / "neg", tmp_path / "cache", warmup_by="prediction",
               warmup_criteria=["magnitude", "taylor"], proxy_samples=16)
    ctx = prepare(from_dict(cfg))
    rows, held = prune_peft._split(ctx)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prune_peft, "drop_loss", lambda model, units, *a, **k: {u: -1.0 - i for i, u in enumerate(units)})
        capsys.readouterr()
        wu = prune_peft.warmup(ctx, rows, held)
    assert wu["drop_loss_negative"] and all(v == 1.0 for v in wu["drop_loss_negative"])
    out = capsys.readouterr().out
    assert "in the warm-up's last round switching off 100% of the units lowers the held-out loss" in out
    assert "search.warmup_round_steps" in out
    # and a backwards proxy chooses nothing: no round is used, every block keeps search.criteria
    assert wu["rounds_used"] == [] and wu["spearman"] == {} and wu["agreement"] == {b: {} for b in wu["mapping"]}
    assert wu["mapping"] and all(c == list(ctx.cfg.search.criteria) for c in wu["mapping"].values())
    assert "no round is left, so every block uses search.criteria" in out
    assert len([ln for ln in out.splitlines() if "warning" in ln]) == 1  # one line says what, why and the remedy
    report = "\n".join(_prediction_lines(wu))
    assert "rounds used: none: every block keeps search.criteria" in report and "100%" in report
    # a healthy proxy (every unit's removal raises the loss) says nothing
    cfg = _cfg(bert_dir, sst2_dir, tmp_path / "pos", tmp_path / "cache2", warmup_by="prediction",
               warmup_criteria=["magnitude", "taylor"], proxy_samples=16)
    ctx = prepare(from_dict(cfg))
    rows, held = prune_peft._split(ctx)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prune_peft, "drop_loss", lambda model, units, *a, **k: {u: 1.0 + i for i, u in enumerate(units)})
        capsys.readouterr()
        wu = prune_peft.warmup(ctx, rows, held)
    assert all(v == 0.0 for v in wu["drop_loss_negative"]) and "warning" not in capsys.readouterr().out
    assert wu["rounds_used"] == list(range(1, len(wu["drop_loss_negative"]) + 1))


def test_warmup_by_prediction_leaves_out_the_rounds_where_drop_loss_turned(bert_dir, sst2_dir, tmp_path, capsys):
    """A healthy first round, turned later ones (the supernet over-fits as the rounds go on): only round 1 shapes
    the mapping, so two runs that differ only in what the turned rounds say map alike, and the user is told."""

    def turning(later):  # round 1: every removal raises the held-out loss; later rounds: `later(i, n)` (< 0)
        calls = []

        def proxy(model, units, *a, **k):
            calls.append(1)
            n = len(units)
            return {u: (1.0 + i if len(calls) == 1 else later(i, n)) for i, u in enumerate(units)}
        return proxy

    def warmup_with(proxy_fn, name):
        cfg = _cfg(bert_dir, sst2_dir, tmp_path / name, tmp_path / f"cache-{name}", warmup_by="prediction",
                   warmup_criteria=["magnitude", "taylor"], proxy_samples=16)
        ctx = prepare(from_dict(cfg))
        rows, held = prune_peft._split(ctx)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(prune_peft, "drop_loss", proxy_fn)
            return prune_peft.warmup(ctx, rows, held)

    capsys.readouterr()
    a = warmup_with(turning(lambda i, n: -1.0 - i), "a")
    out = capsys.readouterr().out
    rounds = len(a["drop_loss_negative"])
    assert rounds >= 2 and a["drop_loss_negative"][0] == 0.0 and a["rounds_used"] == [1]
    assert f"warm-up round(s) {', '.join(map(str, range(2, rounds + 1)))} of {rounds} are left out" in out
    # the turned rounds ranked the other way round: were they used, the percentile agreement would change
    b = warmup_with(turning(lambda i, n: -100.0 * (n - i)), "b")
    assert b["rounds_used"] == [1] and b["mapping"] == a["mapping"] and b["agreement"] == a["agreement"]
    assert b["spearman"] == a["spearman"]


# ------------------------------------------------------------------------------------------------- CLI
def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("prunetune: error:"), lines[0]
    return lines[0]


def test_cli_search_bad_space(tmp_path, capsys):
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["search", "--output-dir", str(out), "--set", "search.space=[lora_qv,bogus]"]) == 2
    assert "search.space" in _one_error_line(capsys)
    assert not out.exists()


def test_cli_search_overlapping_space(bert_dir, sst2_dir, tmp_path, capsys):
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["search", "--model", str(bert_dir), "--data-dir", str(sst2_dir), "--output-dir", str(out),
                 "--set", "search.space=[lora_ffn,adapter_ffn]", "--set", "search.warmup=false"]) == 2
    assert "overlap" in _one_error_line(capsys)
    assert not out.exists()


# ------------------------------------------------------------------------------ rank-granular (search.chunk)
def _lora_count(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunk_units_and_their_removal_is_exact(family):
    """Chunks of 2 ranks: removing one == zeroing its B columns / adapter up columns; its slices get no gradient;
    switched_off restores exactly; trainable() counts what the retrain of the structure holds."""
    space = ["lora_qv", "adapter_attn"]
    net = _supernet(family, space, lora_r=4, adapter_size=4, chunk=2)
    assert len(net.units) == 2 * 2 * 2 and {u.span for u in net.units} == {(0, 2), (2, 4)}
    full = net.trainable()
    assert full == _supernet(family, space, lora_r=4, adapter_size=4).trainable()
    _perturb(net)
    b = batch()
    before = _logits(net.model, b)
    lora_chunk, ad_chunk = "lora_qv@1#0", "adapter_attn@0#1"
    with net.switched_off(lora_chunk):
        off = _logits(net.model, b)
    torch.testing.assert_close(_logits(net.model, b), before, atol=0, rtol=0)
    assert (off - before).abs().max() > 1e-6
    # reference: the same function with the chunk's output side zeroed by hand
    with torch.no_grad():
        saved = {}
        for pos in net.by_name[lora_chunk].positions:
            w = net._lora[pos].lora_B[ADAPTER].weight
            saved[pos] = w.clone()
            w[:, 0:2] = 0
        up = net.adapters.get(net.by_name[ad_chunk].positions[0]).up.weight
        saved_up = up.clone()
        up[:, 2:4] = 0
        ref = _logits(net.model, b)
        for pos, w in saved.items():
            net._lora[pos].lora_B[ADAPTER].weight.copy_(w)
        up.copy_(saved_up)
    net.remove([lora_chunk, ad_chunk])
    torch.testing.assert_close(_logits(net.model, b), ref, atol=1e-6, rtol=0)
    assert lora_chunk not in net.alive and "lora_qv@1#1" in net.alive
    # gradients: zero on the removed chunks' slices, non-zero on the others
    net.model.train()
    net.model(**b, labels=torch.tensor([0, 1, 1])).loss.backward()
    for name in (lora_chunk, ad_chunk):
        params = net.unit_params(name)
        full_params = [p for pos in net.by_name[name].positions for p in
                       ((net._lora[pos].lora_A[ADAPTER].weight, net._lora[pos].lora_B[ADAPTER].weight)
                        if net.by_name[name].kind == "lora" else (net.adapters.get(pos).up.weight,))]
        assert params and all(p.grad is not None for p in full_params)
    lo_grads = [net._lora[pos].lora_B[ADAPTER].weight.grad for pos in net.by_name[lora_chunk].positions]
    assert all(float(g[:, 0:2].abs().max()) == 0.0 and float(g[:, 2:4].abs().max()) > 0 for g in lo_grads)
    up_grad = net.adapters.get(net.by_name[ad_chunk].positions[0]).up.weight.grad
    assert float(up_grad[:, 2:4].abs().max()) == 0.0 and float(up_grad[:, 0:2].abs().max()) > 0
    # the structure a retrain builds holds exactly trainable() PEFT parameters
    structure = net.structure()
    assert sorted(set(structure.lora.values())) == [2, 4] and sorted(set(structure.adapters.values())) == [2, 4]
    hf = tiny(family)
    model, adapters = structure.build(hf, get_arch(hf))
    assert _lora_count(model) + sum(p.numel() for p in adapters.parameters()) == net.trainable() < full


def test_last_chunk_removes_the_module_and_chunk_must_divide_the_width():
    net = _supernet("bert", ["lora_qv", "adapter_ffn"], lora_r=4, adapter_size=4, chunk=2)
    net.remove(["lora_qv@0#0", "lora_qv@0#1", "adapter_ffn@1#0", "adapter_ffn@1#1"])
    structure = net.structure()
    assert not any(".0." in m for m in structure.lora) and len(structure.adapters) == 1
    pos = net.by_name["lora_qv@0#0"].positions[0]
    assert net._lora[pos].scaling[ADAPTER] == 0.0 and not net._lora[pos].lora_A[ADAPTER].weight.requires_grad
    hf = tiny("bert")
    model, adapters = structure.build(hf, get_arch(hf))
    assert _lora_count(model) + sum(p.numel() for p in adapters.parameters()) == net.trainable()
    with pytest.raises(PrunetuneError, match="must be >= 1 and divide"):
        _supernet("bert", ["lora_qv"], lora_r=4, chunk=3)
    with pytest.raises(PrunetuneError, match="search.chunk=3 must divide search.lora_r=8"):
        from_dict({"search": {"chunk": 3, "space": ["lora_qv"]}})
    assert from_dict({"search": {"chunk": 4, "space": ["lora_qv"], "adapter_size": 6}}).search.chunk == 4


def test_tracker_statistics_per_chunk_are_the_chunks_own():
    """gradient / taylor over the chunk's slices; activation and norm_ratio of the chunk's own output
    (B[:, lo:hi] (A x)[lo:hi] * scaling), hand-computed from the same forward."""
    from prunetune.scores import ImportanceTracker

    net = _supernet("bert", ["lora_qv"], lora_r=4, chunk=2)
    _perturb(net)
    name = "lora_qv@1#1"
    pos = net.by_name[name].positions[0]
    layer = net._lora[pos]
    seen = {}
    h1 = layer.lora_B[ADAPTER].register_forward_hook(lambda _m, inp, _o: seen.__setitem__("z", inp[0].detach()))
    h2 = layer.base_layer.register_forward_hook(lambda _m, _i, out: seen.__setitem__("base", out.detach()))
    tracker = ImportanceTracker(net.hf, None, groups=net.groups(), spans=net.spans()).start()
    b = batch()
    tracker.token_mask = b["attention_mask"]
    net.model.train()
    net.model.zero_grad()
    net.model(**b, labels=torch.tensor([0, 1, 1])).loss.backward()
    tracker.after_backward()
    tracker.stop()
    h1.remove()
    h2.remove()
    stats = tracker.unit_stats()
    both = [(net._lora[p].lora_A[ADAPTER].weight, net._lora[p].lora_B[ADAPTER].weight)
            for p in net.by_name[name].positions]  # the unit covers q and v of layer 1
    grads = torch.cat([t for a, b_ in both for t in (a.grad[2:4].reshape(-1), b_.grad[:, 2:4].reshape(-1))])
    assert stats["gradient"][name] == pytest.approx(float(grads.abs().mean()), rel=1e-5)
    taylor = sum((b_[:, 2:4] * b_.grad[:, 2:4]).sum() for _a, b_ in both)
    assert stats["taylor"][name] == pytest.approx(float(taylor.abs().detach()), rel=1e-5)
    B = layer.lora_B[ADAPTER].weight
    delta = seen["z"][..., 2:4] @ B[:, 2:4].detach().T * layer.scaling[ADAPTER]
    mask = b["attention_mask"].float()
    act = float((delta.abs().mean(-1) * mask).sum() / mask.sum())
    ratio = delta.norm(dim=-1) / seen["base"].norm(dim=-1)
    # forward statistics: the mean over both positions; check q's share by hand
    other = net.by_name[name].positions[1]
    assert len(net.by_name[name].positions) == 2 and other != pos
    modules, _ = tracker.finalize()
    assert modules[f"{pos}#2"] == pytest.approx(float((ratio * mask).sum() / mask.sum()), rel=1e-4)
    assert tracker.act_sum[f"{pos}#2"] == pytest.approx(act, rel=1e-4)
    assert stats["norm_ratio"][name] == pytest.approx((modules[f"{pos}#2"] + modules[f"{other}#2"]) / 2, rel=1e-6)
    # whole-unit statistics are unchanged by the chunk bookkeeping
    assert f"{pos}" in modules


def test_rank_granular_search_meets_the_budget_and_reports(bert_dir, sst2_dir, tmp_path):
    from prunetune.report.search import unit_grid

    cfg = _cfg(bert_dir, sst2_dir, tmp_path / "o", warmup=False, criteria=["taylor", "magnitude"], round_steps=1,
               budget=0.3, k=3, chunk=2, fill=False)
    ctx = prepare(from_dict(cfg))
    found, _ = prune_peft.search(ctx)
    assert found.rounds and found.rounds[-1]["trainable"] <= found.budget_params
    assert all("#" in u for r in found.rounds for u in r["removed"])
    widths = list(found.structure.lora.values())
    assert widths and all(w % 2 == 0 and 0 < w <= 8 for w in widths)
    assert any(0 < w < 8 for w in widths)  # some module lost chunks, not only whole modules
    results = {"rounds": found.rounds, "fill": found.fill, "config": ctx.cfg.to_dict(),
               "structure": found.structure.to_dict()}
    types, layers, cells = unit_grid(results)
    assert types == ["lora_qv", "lora_ffn"] and layers == 2 and len(cells) == 4
    assert all(c == "kept" or c.startswith("kept, width ") or c.startswith("round ") for c in cells.values())


def test_adapter_chunk_activation_is_its_own_output():
    from prunetune.scores import ImportanceTracker

    net = _supernet("bert", ["adapter_attn"], adapter_size=4, chunk=2)
    _perturb(net)
    name = "adapter_attn@0#0"
    pos = net.by_name[name].positions[0]
    ad = net.adapters.get(pos)
    seen = {}
    hook = ad.register_forward_pre_hook(lambda _m, args: seen.__setitem__("h", args[0].detach()))
    tracker = ImportanceTracker(net.hf, net.adapters, groups=net.groups(), spans=net.spans()).start()
    b = batch()
    tracker.token_mask = b["attention_mask"]
    net.model.train()
    net.model(**b, labels=torch.tensor([0, 1, 1])).loss.backward()
    tracker.after_backward()
    tracker.stop()
    hook.remove()
    with torch.no_grad():
        z = ad.act(ad.down(seen["h"]))
        delta = z[..., 0:2] @ ad.up.weight[:, 0:2].T
    mask = b["attention_mask"].float()
    act = float((delta.abs().mean(-1) * mask).sum() / mask.sum())
    assert tracker.unit_stats()["activation"][name] == pytest.approx(act, rel=1e-4)
    g = torch.cat([ad.down.weight.grad[0:2].reshape(-1), ad.down.bias.grad[0:2], ad.up.weight.grad[:, 0:2].reshape(-1)])
    assert tracker.unit_stats()["gradient"][name] == pytest.approx(float(g.abs().mean()), rel=1e-5)


# --------------------------------------------------------------------------------- model-object route
def test_model_object_route_matches_the_path_route(bert_dir, sst2_dir, tmp_path):
    """prune_peft_model on the model and loaders the path route builds finds the same structure in the same rounds
    and retrains to the same model; the caller's model is left as it was; the result saves a reloadable export."""
    from prunetune.methods.common import load_base

    cfg = _cfg(bert_dir, sst2_dir, tmp_path / "path", tmp_path / "cache-path")
    models: list = []
    by_path = _run(cfg, models, export=False)
    ctx = prepare(from_dict(cfg))
    hf, _ = load_base(ctx)  # what the path route loads (same seed: same random head)
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    obj_cfg = dict(cfg, search=dict(cfg["search"], warmup_cache=str(tmp_path / "cache-object")))
    res = prunetune.prune_peft_model(hf, ctx.train_loader, dev_data=ctx.dev_loader, tokenizer=ctx.tokenizer,
                                     task=ctx.task, config=obj_cfg)
    assert isinstance(res, prunetune.PruneResult)
    assert res.structure.to_dict() == by_path["structure"]
    assert [r["removed"] for r in res.metrics["rounds"]] == [r["removed"] for r in by_path["rounds"]]
    assert res.metrics["warmup"]["mapping"] == by_path["warmup"]["mapping"]
    assert res.lora_config == by_path["lora_config"]
    _assert_metrics_equal(res.metrics["retrain"]["final"], by_path["retrain"]["final"])
    enc = dict(ctx.tokenizer(POS[:3] + NEG[:2], padding=True, return_tensors="pt"))
    torch.testing.assert_close(_logits(res.model, enc), _logits(models[0], enc), atol=1e-6, rtol=1e-6)
    after = hf.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any("lora_" in n for n, _ in hf.named_parameters()) and _hooks(hf) == 0
    export = res.save(tmp_path / "export", ctx.tokenizer)
    _assert_export_matches_memory(export, res.model, ctx.tokenizer)
    assert not (tmp_path / "path").exists() or not (tmp_path / "path" / "model").exists()


def test_model_object_route_takes_datasets_rows_and_no_dev_data(bert_dir, tmp_path):
    """A datasets.Dataset of tokenized rows trains; without dev data the retrain reports no dev metric."""
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bert_dir)
    texts = [(POS if i % 2 else NEG)[(i // 2) % 5] for i in range(24)]
    enc = tok(texts)
    ds = datasets.Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                                     "labels": [i % 2 for i in range(24)]})
    hf = AutoModelForSequenceClassification.from_pretrained(bert_dir)
    res = prunetune.prune_peft_model(hf, ds, tokenizer=tok, train__epochs=1, train__batch_size=8,
                                     search__space=["lora_qv", "adapter_ffn"], search__budget=0.5,
                                     search__warmup=False, search__round_steps=1)
    assert res.structure.units and "final" not in res.metrics["retrain"]
    assert res.metrics["task"]["name"] == "custom" and res.model is not None


def test_model_object_warmup_cache_tells_models_apart(bert_dir, sst2_dir, tmp_path):
    """The warm-up cache key of a model object is a digest of its config and weights: the same weights reuse
    the mapping, other weights compute their own."""
    from prunetune.methods.common import model_fingerprint
    from transformers import AutoModelForSequenceClassification

    a = AutoModelForSequenceClassification.from_pretrained(bert_dir)
    b = AutoModelForSequenceClassification.from_pretrained(bert_dir)
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        next(b.parameters()).add_(1e-3)
    assert model_fingerprint(a) != model_fingerprint(b)
    ctx = prepare(from_dict(_cfg(bert_dir, sst2_dir, tmp_path / "unused")))
    kw = dict(dev_data=ctx.dev_loader, tokenizer=ctx.tokenizer, task=ctx.task, train__epochs=1,
              train__batch_size=8, search__warmup_samples=16, search__warmup_round_steps=1,
              search__round_steps=1, search__warmup_cache=str(tmp_path / "cache"), search__space=["lora_qv", "lora_ffn"])
    first = prunetune.prune_peft_model(a, ctx.train_loader, **kw).metrics["warmup"]
    again = prunetune.prune_peft_model(a, ctx.train_loader, **kw).metrics["warmup"]
    other = prunetune.prune_peft_model(b, ctx.train_loader, **kw).metrics["warmup"]
    assert (first["cached"], again["cached"], other["cached"]) == (False, True, False)
    assert len(list((tmp_path / "cache" / "warmup").glob("*.json"))) == 2


def test_model_object_route_refuses_what_it_cannot_search(bert_dir, sst2_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    ctx = prepare(from_dict(_cfg(bert_dir, sst2_dir, tmp_path / "unused")))
    hf = AutoModelForSequenceClassification.from_pretrained(bert_dir)
    with pytest.raises(PrunetuneError, match="train.batch_size=8"):
        prunetune.prune_peft_model(hf, ctx.train_loader, train__batch_size=4)
    with pytest.raises(PrunetuneError, match="input_ids and labels"):
        prunetune.prune_peft_model(hf, [{"input_ids": [1, 2, 3]}] * 4, train__batch_size=2)
    with pytest.raises(PrunetuneError, match="train.resume"):
        prunetune.prune_peft_model(hf, ctx.train_loader, train__resume=True)


def test_model_object_route_searches_the_base_of_a_peft_model(bert_dir, sst2_dir, tmp_path):
    """A LoRA PeftModel is searched on its base (LoRA layers set aside on a copy): the same structure as on the
    unwrapped model; the PeftModel itself keeps its LoRA."""
    from transformers import AutoModelForSequenceClassification

    ctx = prepare(from_dict(_cfg(bert_dir, sst2_dir, tmp_path / "unused")))
    kw = dict(dev_data=ctx.dev_loader, tokenizer=ctx.tokenizer, task=ctx.task, train__epochs=1, train__batch_size=8,
              search__warmup=False, search__round_steps=2, search__budget=0.4, search__space=["lora_qv", "lora_ffn"])
    plain = prunetune.prune_peft_model(AutoModelForSequenceClassification.from_pretrained(bert_dir), ctx.train_loader,
                                       **kw)
    wrapped = prunetune.with_peft(AutoModelForSequenceClassification.from_pretrained(bert_dir))
    lora_before = sum(1 for n, _ in wrapped.named_parameters() if "lora_" in n)
    res = prunetune.prune_peft_model(wrapped, ctx.train_loader, **kw)
    assert res.structure.to_dict() == plain.structure.to_dict()
    _assert_metrics_equal(res.metrics["retrain"]["final"], plain.metrics["retrain"]["final"])
    assert lora_before and sum(1 for n, _ in wrapped.named_parameters() if "lora_" in n) == lora_before
