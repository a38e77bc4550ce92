"""The config dataclasses themselves: help text and types for every key, Literal choices, checks at
construction, dict / YAML / JSON round trips, the generated CLI help and `prunetune config`, and the README's
configuration reference listing every key."""
from __future__ import annotations

import dataclasses
import doctest
import json
import re
import typing
from pathlib import Path

import pytest
import yaml

import prunetune.config as config_module
from prunetune import PrunetuneError
from prunetune.cli import RUN_FLAGS, build_parser, main
from prunetune.config import (ConfigBase, DataConfig, EstimateConfig, LightPeftConfig, PeftModulesConfig,
                              PruneConfig, PrunePeftConfig, RunConfig, TrainConfig, config_keys, field_type,
                              key_info, load_config)

README = Path(__file__).resolve().parents[1] / "README.md"
KEYS = config_keys()
SECTIONS = [RunConfig, LightPeftConfig, config_module.ModelConfig, DataConfig, PeftModulesConfig, EstimateConfig,
            PruneConfig, TrainConfig, PrunePeftConfig]


def test_every_field_has_help_text():
    for cls in SECTIONS:
        for f in dataclasses.fields(cls):
            assert len(f.metadata.get("help", "").strip()) > 5, f"{cls.__name__}.{f.name} has no help text"
    assert len(KEYS) > 80 and all(k.help for k in KEYS)


def test_key_paths_stay_backward_compatible():
    keys = {k.key for k in KEYS}
    for prefix in ("model.", "data.", "peft.", "estimate.", "prune.", "train.", "search."):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert {"output_dir", "overwrite", "baseline", "estimate.module_score", "prune.heads", "search.budget",
            "train.tensorboard_dir", "train.report_to"} <= keys
    assert not any(k.startswith("light.") for k in keys)  # LightPeftConfig's sections sit at the top level
    assert list(RunConfig().to_dict()) == ["model", "data", "peft", "estimate", "prune", "train", "search",
                                           "output_dir", "overwrite", "baseline"]


LITERALS = [k for k in KEYS if k.choices and typing.get_origin(field_type(k.key)) is typing.Literal]


def test_fixed_choices_are_literal_types():
    assert {k.key for k in LITERALS} >= {"model.dtype", "peft.kind", "estimate.module_score", "estimate.rank_score",
                                         "estimate.structure_score", "estimate.optimizer_state", "prune.ffn_scope",
                                         "train.mixed_precision", "search.combine", "search.warmup_by"}
    assert "_CHOICES" not in vars(config_module) and "_RANGES" not in vars(config_module)


@pytest.mark.parametrize("key", [k.key for k in LITERALS])
def test_literal_choice_errors_name_the_key_and_the_choices(key):
    info = key_info(key)
    with pytest.raises(PrunetuneError) as exc:
        RunConfig.from_dict(_nested(key, "no-such-choice"))
    msg = str(exc.value)
    assert f"'{key}'" in msg and "'no-such-choice'" in msg
    assert all(c in msg for c in info.choices)
    for choice in info.choices:  # and every listed choice is accepted (unless another key forbids the combination)
        assert _get(RunConfig.from_dict(_nested(key, choice)), key) == choice


def test_peft_roles_are_the_arch_roles():
    from prunetune.arch.base import ROLES

    assert config_module.PEFT_ROLES == ROLES  # the Literal type of peft.targets names the projections arch/ has


def test_list_of_literals_checks_each_item():
    with pytest.raises(PrunetuneError, match=r"'peft.targets' must list names from \['q'"):
        PeftModulesConfig(targets=["q", "qkv"])
    assert PeftModulesConfig(targets="q, v").targets == ["q", "v"]


def _nested(dotted: str, value) -> dict:
    data: dict = {}
    config_module.set_dotted(data, dotted, value)
    return data


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


# ---------------------------------------------------------------- checks at construction

def test_sections_check_values_when_constructed():
    with pytest.raises(PrunetuneError, match=r"'prune.heads' must lie in \[0, 1\)"):
        PruneConfig(heads=1.0)
    with pytest.raises(PrunetuneError, match="'train.batch_size' must be a whole number"):
        TrainConfig(batch_size=8.5)
    assert type(TrainConfig(batch_size=16.0).batch_size) is int and type(TrainConfig(epochs=2).epochs) is float
    with pytest.raises(PrunetuneError, match="'model.dtype' must be one of"):
        config_module.ModelConfig(dtype="float64")
    with pytest.raises(PrunetuneError, match="search.budget must be > 0"):
        PrunePeftConfig(budget=0)
    with pytest.raises(PrunetuneError, match="'search.space' must list names from"):
        PrunePeftConfig(space=["lora_everywhere"])
    with pytest.raises(PrunetuneError, match="estimate.structure_score=mask"):  # across estimate and prune
        LightPeftConfig(estimate=EstimateConfig(structure_score="mask"), prune=PruneConfig(target_speedup=1.5))
    with pytest.raises(PrunetuneError, match="'train.lr' must be a number"):
        RunConfig(train={"lr": "fast"})  # a dict for a section is built (and checked) as that section
    assert RunConfig(train={"lr": 1e-3}).train.lr == 1e-3


def test_construction_does_not_touch_the_file_system(tmp_path):
    """Values are checked at construction; paths only by check_environment (load_config / from_dict)."""
    missing = str(tmp_path / "nope")
    cfg = RunConfig(data=DataConfig(data_dir=missing))
    with pytest.raises(PrunetuneError, match="data.data_dir: no such file"):
        config_module.check_environment(cfg)
    assert config_module.DataConfig(data_dir="~/x").data_dir == str(Path("~/x").expanduser())


def test_float_or_int_key_keeps_what_was_given():
    assert PrunePeftConfig(k=0.5).k == 0.5 and type(PrunePeftConfig(k=4).k) is int


# ---------------------------------------------------------------- round trips

def _changed() -> RunConfig:
    return RunConfig.from_dict({
        "model": {"dtype": "bfloat16"}, "data": {"task": "custom", "text_fields": ["a", "b"], "label_field": "y",
                                                 "max_length": 64, "num_labels": 3},
        "peft": {"kind": "adapter", "targets": ["q", "v"], "alpha": 8}, "estimate": {"steps": 7, "window": 0.25},
        "prune": {"target_speedup": 1.6, "ffn_scope": "layer"}, "train": {"lr": 1e-3, "report_to": "tensorboard"},
        "search": {"space": ["lora_qv"], "k": 0.5, "bands": [0.3, 0.6]}, "output_dir": "runs/x", "baseline": True})


@pytest.mark.parametrize("cfg", [RunConfig(), _changed()], ids=["defaults", "changed"])
def test_round_trips(cfg):
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert RunConfig.from_yaml(cfg.to_yaml()) == cfg
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert yaml.safe_load(cfg.to_yaml()) == cfg.to_dict()
    for section in (cfg.train, cfg.light, cfg.search, cfg.peft):
        assert type(section).from_dict(section.to_dict()) == section


def test_changed_values_survive():
    cfg = _changed()
    assert cfg.estimate.steps == 7 and cfg.prune.target_speedup == 1.6 and cfg.search.k == 0.5
    assert cfg.train.logging_dir == str(Path("runs/x") / "logs")


# ---------------------------------------------------------------- generated CLI and reference

def test_flags_take_type_choices_and_help_from_the_fields():
    sub = build_parser()._subparsers._group_actions[0].choices["light"]
    actions = {a.dest: a for a in sub._actions}
    for flag, key in RUN_FLAGS.items():
        assert actions[flag].help.startswith(key_info(key).help), flag
        assert actions[flag].type is {"int": int, "float": float}.get(field_type(key).__name__, str), flag


def test_light_help_lists_every_key(capsys):
    with pytest.raises(SystemExit):
        main(["light", "--help"])
    out = capsys.readouterr().out
    for k in KEYS:
        assert f"  {k.key}  (" in out, k.key


def test_config_list_and_show(capsys, tmp_path):
    assert main(["config", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(k.key in out for k in KEYS) and key_info("prune.ffn_scope").help.split()[0] in out
    assert main(["config", "--set", "prune.heads=0.5", "--set", "train.lr=1e-3"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["prune"]["heads"] == 0.5 and RunConfig.from_dict(shown) == load_config(
        None, {"prune.heads": 0.5, "train.lr": 1e-3})
    assert main(["config", "--set", "peft.kind=prefix"]) == 2
    assert "peft.kind" in capsys.readouterr().err


def test_readme_reference_lists_every_key():
    text = README.read_text()
    ref = text[text.index("## Configuration reference"):]
    ref = ref[:ref.index("\n## ", 5)]
    named = set(re.findall(r"`([a-z_]+(?:\.[a-z_]+)?)`", ref))
    missing = [k.key for k in KEYS if k.key not in named]
    assert not missing, f"README's configuration reference does not list {missing}"


@pytest.mark.parametrize("module", ["prunetune.config", "prunetune.train.metric_logging", "prunetune.logs",
                                    "prunetune.train.distill"])
def test_docstring_examples(module):
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.failed == 0 and result.attempted > 0


def test_readme_config_example_runs():
    text = README.read_text()
    block = text[text.index("from prunetune.config import LightPeftConfig"):]
    code = block[:block.index("```")].replace("print(cfg.to_yaml())", "out = cfg.to_yaml()")
    scope: dict = {}
    exec(code, scope)
    assert scope["cfg"].prune.heads == 0.5 and "heads: 0.5" in scope["out"]


def test_config_base_is_shared():
    assert all(issubclass(cls, ConfigBase) for cls in SECTIONS)
