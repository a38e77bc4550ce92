"""Model cards carry Hub front matter (a YAML block at the top of README.md) that parses with yaml.safe_load."""
from __future__ import annotations

import pytest
import torch
import yaml

from prunetune.arch import get_arch
from prunetune.models import hub_id
from prunetune.plan import PruningPlan
from prunetune.report.card import model_card, read_front_matter, with_front_matter

TASK = {"name": "sst2", "num_labels": 2, "metric": "accuracy"}
RESULT = {"final": {"accuracy": 0.875}, "best": {"accuracy": 0.9}, "trainable_params_no_head": 1234}


@pytest.fixture(scope="module")
def tiny():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    hf = BertForSequenceClassification(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2,
                                                  num_attention_heads=2, intermediate_size=24,
                                                  max_position_embeddings=32, num_labels=2))
    arch = get_arch(hf)
    return hf, PruningPlan.unpruned(arch, "bert", peft_kind="lora")


def _front(card: str) -> dict:
    assert card.startswith("---\n")
    block = card[4:card.index("\n---\n", 4)]
    return yaml.safe_load(block)


def test_front_matter_has_the_hub_keys(tiny):
    _, plan = tiny
    card = model_card(plan, TASK, RESULT, base_model="minilm")
    meta = _front(card)
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["library_name"] == "prunetune"
    assert {"prunetune", "light-peft", "pruning", "lora"} <= set(meta["tags"])
    assert meta["datasets"] == ["nyu-mll/glue"] and meta["metrics"] == ["accuracy"]
    result = meta["model-index"][0]["results"][0]
    assert result["metrics"][0] == {"type": "accuracy", "value": 0.875, "name": "dev accuracy"}
    assert result["dataset"]["config"] == "sst2" and result["task"]["type"] == "text-classification"
    assert "# bert pruned with prunetune (Light-PEFT)" in card  # the body follows the front matter


def test_local_models_and_custom_data_are_left_out(tiny, tmp_path):
    _, plan = tiny
    meta = _front(model_card(plan, {"name": "custom", "num_labels": 3, "metric": "matthews"}, None,
                             method="PrunePEFT", base_model=str(tmp_path)))
    assert "base_model" not in meta and "datasets" not in meta and "model-index" not in meta
    assert meta["metrics"] == ["matthews_correlation"] and "prune-peft" in meta["tags"]


@pytest.mark.parametrize("name,expected", [("minilm", "sentence-transformers/all-MiniLM-L6-v2"),
                                           ("HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M"),
                                           ("./models/x", None), ("/abs/path", None), ("model.gguf", None),
                                           ("a/b/c", None)])
def test_hub_id(name, expected):
    assert hub_id(name) == expected


def test_with_front_matter_updates_in_place():
    card = with_front_matter("# title\n", library_name="prunetune", tags=["a"])
    again = with_front_matter(card, library_name="transformers")
    assert read_front_matter(again) == {"library_name": "transformers", "tags": ["a"]}
    assert again.endswith("---\n# title\n") and again.count("---\n") == 2


@pytest.mark.parametrize("merge,library", [(False, "prunetune"), (True, "transformers")])
def test_export_card_says_which_library_loads_it(tiny, tmp_path, merge, library):
    from prunetune.export import save_export

    hf, plan = tiny
    out = save_export(tmp_path / "exp", hf, plan, merge=merge, task_info=TASK,
                      card=model_card(plan, TASK, RESULT, base_model="minilm"))
    meta = read_front_matter((out / "README.md").read_text())
    assert meta["library_name"] == library and meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
