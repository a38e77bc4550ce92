"""Exports: pruned base + plan + PEFT, checksummed; prunetune.load rebuilds any pruned shape exactly."""
from __future__ import annotations

import json

import pytest
import torch
from models import (batch, random_masks, random_plan, randomize_biases, tiny, tiny_lora, zero_pruned_lora,
                    zero_pruned_masks)

import prunetune
from prunetune.arch import get_arch
from prunetune.errors import PrunetuneError
from prunetune.methods.common import adapter_positions
from prunetune.scores import StructureMasks
from prunetune.surgery import prune_adapter_model, prune_lora_model
from prunetune.units.adapters import AdapterSet

FAMILIES = ["bert", "gpt2", "opt", "llama"]
R, ALPHA = 4, 8.0
ATOL = 1e-5


def _logits(model, b):
    model.eval()
    with torch.no_grad():
        return model(**b).logits


def _pruned_lora(family, seed=0, heads=1 / 3, ffn=1 / 3, ffn_scope="global", causal_lm=False):
    """A physically pruned PeftModel (masks folded) and its plan."""
    pm, hf, arch, names = tiny_lora(family, R, ALPHA, seed=seed, causal_lm=causal_lm)
    masks = StructureMasks(arch).attach(hf)
    random_masks(masks, seed + 3)
    plan = random_plan(arch, masks, names, R, heads, ffn, 0.5, 0.5, seed=seed + 4, ffn_scope=ffn_scope,
                       model_type=hf.config.model_type)
    zero_pruned_masks(masks, plan)
    zero_pruned_lora(hf, plan)
    masks.detach()
    new, _ = prune_lora_model(pm, arch, plan, R, ALPHA, 0.0, masks.head_values(), masks.ffn_values())
    with torch.no_grad():  # a trained-looking head, so the classifier weights matter in the comparison
        for n, p in new.base_model.model.named_parameters():
            if p.requires_grad and "lora_" not in n:
                p.mul_(5.0)
    return new.eval(), plan


def _manifest(path):
    return json.loads((path / "prunetune.json").read_text())


# ------------------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_export_reloads_identically(family, tmp_path):
    new, plan = _pruned_lora(family)
    b = batch()
    ref = _logits(new, b)
    out = prunetune.save_export(tmp_path / "exp", new.base_model.model, plan, None, peft_model=new)
    assert out == tmp_path / "exp"
    torch.testing.assert_close(_logits(new, b), ref, atol=0, rtol=0)  # exporting does not touch the live model
    info = _manifest(out)
    assert info["peft"] == "lora" and info["format"] == 1
    assert info["plain_from_pretrained"] is False  # global FFN scope: per-layer widths differ
    assert "model.safetensors" in info["files"] and "prunetune_plan.json" in info["files"]
    assert any(f.startswith("adapter/") for f in info["files"])
    assert not (out / "tokenizer_config.json").exists()

    loaded = prunetune.load(out)
    assert loaded.tokenizer is None and loaded.adapters is None
    assert loaded.plan == plan
    from peft import PeftModel

    assert isinstance(loaded.model, PeftModel)
    torch.testing.assert_close(_logits(loaded.model, b), ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(_logits(loaded.model, batch(seed=9)), _logits(new, batch(seed=9)), atol=ATOL, rtol=0)
    # the reloaded model has the pruned shapes and the same parameter count
    n_new = sum(p.numel() for p in new.parameters())
    assert sum(p.numel() for p in loaded.model.parameters()) == n_new


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_export_matches_unmerged(family, tmp_path):
    new, plan = _pruned_lora(family, seed=1)
    b = batch()
    ref = _logits(new, b)
    prunetune.save_export(tmp_path / "lora", new.base_model.model, plan, peft_model=new)
    prunetune.save_export(tmp_path / "merged", new.base_model.model, plan, peft_model=new, merge=True)
    assert _manifest(tmp_path / "merged")["peft"] == "merged"
    assert not (tmp_path / "merged" / "adapter").exists()
    unmerged = prunetune.load(tmp_path / "lora").model
    merged = prunetune.load(tmp_path / "merged").model
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, b), _logits(unmerged, b), atol=ATOL, rtol=0)
    torch.testing.assert_close(_logits(merged, b), ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(_logits(new, b), ref, atol=0, rtol=0)  # merging worked on a copy


def test_llama_layer_scope_is_plain_from_pretrained(tmp_path):
    from transformers import AutoModelForSequenceClassification

    new, plan = _pruned_lora("llama", seed=2, ffn_scope="layer")
    assert plan.uniform_heads() == 2 and plan.uniform_neurons() == 40 - 13
    b = batch()
    ref = _logits(new, b)
    prunetune.save_export(tmp_path / "merged", new.base_model.model, plan, peft_model=new, merge=True)
    prunetune.save_export(tmp_path / "lora", new.base_model.model, plan, peft_model=new)
    for sub in ("merged", "lora"):
        assert _manifest(tmp_path / sub)["plain_from_pretrained"] is True
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["intermediate_size"]) == (
        4, 2, 8, 27)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(plain, b), ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(_logits(prunetune.load(tmp_path / "merged").model, b), ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(_logits(prunetune.load(tmp_path / "lora").model, b), ref, atol=ATOL, rtol=0)
    # the in-memory model's config is not rewritten by the export
    assert new.base_model.model.config.num_attention_heads == 6


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_ffn_only_is_plain_from_pretrained(family, tmp_path):
    from transformers import AutoModelForSequenceClassification

    new, plan = _pruned_lora(family, seed=3, heads=0.0, ffn_scope="layer")
    assert not plan.heads_pruned() and plan.uniform_neurons() is not None
    b = batch()
    ref = _logits(new, b)
    prunetune.save_export(tmp_path / "m", new.base_model.model, plan, peft_model=new, merge=True)
    assert _manifest(tmp_path / "m")["plain_from_pretrained"] is True
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(_logits(plain, b), ref, atol=ATOL, rtol=0)


def test_bert_heads_pruned_is_not_plain_but_loads(tmp_path):
    from transformers import AutoModelForSequenceClassification

    new, plan = _pruned_lora("bert", seed=4, ffn_scope="layer")  # uniform, but BERT derives head_dim
    assert plan.uniform_heads() is not None and plan.heads_pruned()
    b = batch()
    ref = _logits(new, b)
    prunetune.save_export(tmp_path / "m", new.base_model.model, plan, peft_model=new, merge=True)
    assert _manifest(tmp_path / "m")["plain_from_pretrained"] is False
    with pytest.raises(RuntimeError, match="mismatched_sizes|size mismatch"):  # the config: the unpruned shape
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(_logits(prunetune.load(tmp_path / "m").model, b), ref, atol=ATOL, rtol=0)


def test_causal_lm_export(tmp_path):
    new, plan = _pruned_lora("llama", seed=5, causal_lm=True)
    b = batch()
    ref = _logits(new, b)
    prunetune.save_export(tmp_path / "m", new.base_model.model, plan, peft_model=new)
    assert _manifest(tmp_path / "m")["causal_lm"] is True
    loaded = prunetune.load(tmp_path / "m")
    assert type(loaded.model.base_model.model).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(_logits(loaded.model, b), ref, atol=ATOL, rtol=0)


def test_tokenizer_is_saved_when_given(tmp_path):
    from helpers import make_tokenizer

    new, plan = _pruned_lora("bert", seed=6)
    tok = make_tokenizer()
    prunetune.save_export(tmp_path / "m", new.base_model.model, plan, tok, peft_model=new)
    loaded = prunetune.load(tmp_path / "m")
    assert loaded.tokenizer is not None
    assert loaded.tokenizer("the movie was good")["input_ids"] == tok("the movie was good")["input_ids"]


def test_export_overwrites_atomically(tmp_path):
    a, plan_a = _pruned_lora("opt", seed=7)
    b_model, plan_b = _pruned_lora("opt", seed=8)
    prunetune.save_export(tmp_path / "m", a.base_model.model, plan_a, peft_model=a)
    prunetune.save_export(tmp_path / "m", b_model.base_model.model, plan_b, peft_model=b_model)
    loaded = prunetune.load(tmp_path / "m")
    assert loaded.plan == plan_b
    torch.testing.assert_close(_logits(loaded.model, batch()), _logits(b_model, batch()), atol=ATOL, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp folders left behind


# ---------------------------------------------------------------------------------------- adapters
@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_export_reloads_identically(family, tmp_path):
    hf = tiny(family, seed=9)
    randomize_biases(hf, 10)
    arch = get_arch(hf)
    names = adapter_positions(arch)
    adapters = AdapterSet(arch.hidden_size, {n: 6 for n in names}).attach(hf)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    masks = StructureMasks(arch).attach(hf)
    random_masks(masks, 12)
    plan = random_plan(arch, masks, names, 6, 1 / 3, 1 / 3, 0.5, 0.5, seed=13, peft_kind="adapter",
                       model_type=hf.config.model_type)
    masks.detach()
    prune_adapter_model(hf, arch, plan, adapters, masks.head_values(), masks.ffn_values())
    b = batch()
    ref = _logits(hf, b)
    prunetune.save_export(tmp_path / "m", hf, plan, None, adapters=adapters)
    info = _manifest(tmp_path / "m")
    assert info["peft"] == "adapter" and info["adapter_sizes"] == adapters.sizes()
    loaded = prunetune.load(tmp_path / "m")
    assert loaded.adapters is not None and loaded.adapters.sizes() == adapters.sizes()
    torch.testing.assert_close(_logits(loaded.model, b), ref, atol=ATOL, rtol=0)
    with pytest.raises(PrunetuneError, match="merge"):
        prunetune.save_export(tmp_path / "x", hf, plan, adapters=adapters, merge=True)


# ------------------------------------------------------------------------------------------ refusals
def test_corrupted_export_is_refused(tmp_path):
    new, plan = _pruned_lora("gpt2", seed=14)
    out = prunetune.save_export(tmp_path / "m", new.base_model.model, plan, peft_model=new)
    f = out / "model.safetensors"
    data = bytearray(f.read_bytes())
    for i in range(len(data) - 64, len(data) - 32):  # tensor bytes, not the header
        data[i] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(PrunetuneError, match="checksum"):
        prunetune.load(out)
    with pytest.raises(PrunetuneError, match="model.safetensors"):
        prunetune.load(out)


def test_incomplete_export_is_refused(tmp_path):
    new, plan = _pruned_lora("bert", seed=15)
    out = prunetune.save_export(tmp_path / "m", new.base_model.model, plan, peft_model=new)
    (out / "prunetune_plan.json").unlink()
    with pytest.raises(PrunetuneError, match="prunetune_plan.json"):
        prunetune.load(out)


def test_folder_without_manifest_is_refused(tmp_path):
    hf = tiny("bert")
    hf.save_pretrained(tmp_path / "plain")  # a perfectly good HF folder, but no prunetune export
    with pytest.raises(PrunetuneError, match="not a prunetune export"):
        prunetune.load(tmp_path / "plain")
    with pytest.raises(PrunetuneError, match="not a prunetune export"):
        prunetune.load(tmp_path / "does-not-exist")


def test_corrupt_manifest_is_refused(tmp_path):
    new, plan = _pruned_lora("opt", seed=16)
    out = prunetune.save_export(tmp_path / "m", new.base_model.model, plan, peft_model=new)
    (out / "prunetune.json").write_text("{broken")
    with pytest.raises(PrunetuneError, match="corrupt"):
        prunetune.load(out)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_non_uniform_heads_export(family, tmp_path):
    """A hand-made plan with different head counts per layer still reloads exactly (not plain-loadable)."""
    from prunetune.plan import PruningPlan

    pm, hf, arch, names = tiny_lora(family, R, ALPHA, seed=17)
    heads = [[0, 2], [1]] if family == "llama" else [[1, 2, 3], [0]]
    plan = PruningPlan(arch.family, hf.config.model_type, arch.num_layers, arch.num_units, arch.heads_per_unit,
                       arch.head_dim, arch.intermediate_size, heads,
                       [list(range(0, arch.intermediate_size, 2)), list(range(arch.intermediate_size - 3))],
                       peft_ranks={n: [0, 3] for n in names[::2]}, peft_orig_ranks={n: R for n in names})
    new, _ = prune_lora_model(pm, arch, plan, R, ALPHA, 0.0)
    b = batch()
    ref = _logits(new, b)
    prunetune.save_export(tmp_path / "m", new.base_model.model, plan, peft_model=new)
    assert _manifest(tmp_path / "m")["plain_from_pretrained"] is False
    loaded = prunetune.load(tmp_path / "m")
    torch.testing.assert_close(_logits(loaded.model, b), ref, atol=ATOL, rtol=0)
    o = loaded.model.base_model.model.get_submodule(arch.layers[1].o)
    assert getattr(o, "base_layer", o).in_features == len(heads[1]) * arch.heads_per_unit * arch.head_dim
