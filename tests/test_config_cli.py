"""Configuration validation (load_config / from_dict) and the CLI's error contract:
bad input -> exit code 2, exactly one 'prunetune: error:' line on stderr, no output folder left behind."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_tokenizer

from prunetune import PrunetuneError, RunConfig, load_config
from prunetune.cli import main
from prunetune.config import from_dict

SRC = Path(__file__).resolve().parents[1] / "src"
POS = ["a charming and often affecting journey", "the movie was good and the actors were great",
       "one of the best films of the year", "a great and wonderful story"]
NEG = ["the plot is bad , boring and too long", "it is not a film i would watch again",
       "a dull and terrible mess", "the worst film of the year"]


# ---------------------------------------------------------------- fixtures

def _write_sst2(folder: Path, n_train: int = 16, n_dev: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        rows = [f"{(POS if i % 2 else NEG)[i % 4]}\t{i % 2}" for i in range(n)]
        (folder / name).write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return _write_sst2(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    tok = make_tokenizer(POS + NEG)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64, num_labels=2))
    path = tmp_path_factory.mktemp("bert")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def unsupported_dir(tmp_path_factory) -> Path:
    """A valid HF model folder of a family prunetune does not support (DistilBERT), with a tokenizer."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    tok = make_tokenizer(POS + NEG)
    torch.manual_seed(0)
    model = DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=len(tok), dim=32, n_layers=1, n_heads=4, hidden_dim=48, max_position_embeddings=64))
    path = tmp_path_factory.mktemp("distilbert")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, bert_dir, data_dir) -> Path:
    """A tiny finished Light-PEFT run (with its export in run/model)."""
    out = tmp_path_factory.mktemp("run") / "run"
    code = main(["light", "--model", str(bert_dir), "--data-dir", str(data_dir), "--output-dir", str(out),
                 "--max-steps", "3", "--batch-size", "4"])
    assert code == 0
    assert (out / "model" / "prunetune.json").is_file()
    return out


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected exactly one stderr line, got {len(lines)}:\n{err}"
    assert lines[0].startswith("prunetune: error:"), lines[0]
    return lines[0]


# ---------------------------------------------------------------- load_config / from_dict

def test_defaults_are_valid():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert cfg == from_dict({}) == from_dict(None) == RunConfig()
    assert cfg.model.name_or_path == "minilm" and cfg.data.task == "sst2" and cfg.peft.kind == "lora"
    assert cfg.prune.heads == pytest.approx(1 / 3)
    assert from_dict(cfg.to_dict()) == cfg  # round trip


def test_values_are_applied_and_coerced(tmp_path):
    cfg = from_dict({"prune": {"heads": 0.5, "ffn": 0}, "train": {"epochs": 2, "lr": 1}, "peft": {"targets": "q, v"},
                     "baseline": True})
    assert cfg.prune.heads == 0.5 and cfg.prune.ffn == 0.0
    assert isinstance(cfg.train.epochs, float) and cfg.train.epochs == 2.0 and isinstance(cfg.train.lr, float)
    assert cfg.peft.targets == ["q", "v"] and cfg.baseline is True
    cfg = from_dict({"train": {"batch_size": 16.0, "max_steps": 4.0}})  # integral floats (YAML "16.0") -> int
    assert cfg.train.batch_size == 16 and type(cfg.train.batch_size) is int and type(cfg.train.max_steps) is int
    if hasattr(RunConfig(), "search"):  # float-annotated key with an int default keeps fractions
        assert from_dict({"search": {"k": 0.5}}).search.k == 0.5
    p = tmp_path / "c.yaml"
    p.write_text("prune:\n  heads: 0.25\ntrain:\n  batch_size: 4\n")
    cfg = load_config(p, {"train.batch_size": 16, "estimate.optimizer_state": "reset"})
    assert (cfg.prune.heads, cfg.train.batch_size, cfg.estimate.optimizer_state) == (0.25, 16, "reset")


@pytest.mark.parametrize("data,key", [
    ({"bogus": 1}, "bogus"),
    ({"prune": {"headz": 0.5}}, "prune.headz"),
    ({"train": {"epochs": 1, "learning_rate": 1e-3}}, "train.learning_rate"),
    ({"model": {"name": "x"}}, "model.name"),
])
def test_unknown_keys_are_named(data, key):
    with pytest.raises(PrunetuneError, match=f"'{key}'"):
        from_dict(data)
    with pytest.raises(PrunetuneError, match=f"'{key}'"):
        load_config(None, {key: 1})


@pytest.mark.parametrize("key", ["prune.heads", "prune.ffn", "prune.modules", "prune.ranks", "prune.ffn_floor"])
@pytest.mark.parametrize("value", [1.0, -0.1, 1.5, float("nan")])
def test_ratios_outside_unit_interval_rejected(key, value):
    with pytest.raises(PrunetuneError, match=key.replace(".", r"\.")):
        load_config(None, {key: value})


@pytest.mark.parametrize("key,value", [("prune.heads", 0.0), ("prune.heads", 0.99), ("prune.ffn", 0.5)])
def test_ratios_inside_accepted(key, value):
    assert load_config(None, {key: value}).prune.__dict__[key.split(".")[1]] == value


@pytest.mark.parametrize("key,value", [("estimate.fraction", 0.0), ("estimate.fraction", 1.5),
                                       ("estimate.window", 0), ("estimate.window", -1)])
def test_unit_fractions_rejected(key, value):
    with pytest.raises(PrunetuneError, match=key.replace(".", r"\.")):
        load_config(None, {key: value})


@pytest.mark.parametrize("key,value", [
    ("train.epochs", "three"),
    ("train.epochs", [1]),
    ("train.batch_size", "8"),
    ("train.batch_size", True),
    ("train.batch_size", 8.5),
    ("train.lr", "fast"),
    ("baseline", "yes"),
    ("baseline", 1),
    ("train.eval_each_epoch", "no"),
    ("model.name_or_path", 5),
    ("model.dtype", 32),
    ("peft.targets", 5),
    ("peft.r", "eight"),
    ("data.max_train_samples", "abc"),
    ("data.max_train_samples", 2.5),
    ("data.num_labels", "two"),
    ("data.data_dir", 5),
    ("data.text_fields", 5),
    ("train.max_steps", "ten"),
    ("estimate.steps", [3]),
    ("output_dir", ["a"]),
])
def test_wrong_types_rejected(key, value):
    with pytest.raises(PrunetuneError, match=key.replace(".", r"\.")):
        load_config(None, {key: value})


@pytest.mark.parametrize("key,value", [
    ("prune", 3),
    ("train", "fast"),
    ("model", [1, 2]),
])
def test_section_must_be_mapping(key, value):
    with pytest.raises(PrunetuneError, match=key):
        from_dict({key: value})


@pytest.mark.parametrize("key,value", [
    ("train.lr", float("nan")),
    ("train.lr", float("inf")),
    ("train.epochs", float("inf")),
    ("train.epochs", float("nan")),
])
def test_non_finite_numbers_rejected(key, value):
    with pytest.raises(PrunetuneError, match=key.replace(".", r"\.")):
        load_config(None, {key: value})


@pytest.mark.parametrize("key,value", [
    ("peft.r", 0), ("peft.adapter_size", 0), ("train.batch_size", 0), ("train.batch_size", -4),
    ("train.grad_accum", 0), ("data.max_length", 0), ("train.lr", 0), ("train.lr", -1e-3),
    ("train.epochs", 0), ("train.eval_batch_size", 0), ("train.max_steps", -3), ("train.max_steps", 0),
])
def test_non_positive_values_rejected(key, value):
    with pytest.raises(PrunetuneError, match=key.replace(".", r"\.")):
        load_config(None, {key: value})


def test_epochs_zero_allowed_with_max_steps():
    cfg = load_config(None, {"train.epochs": 0, "train.max_steps": 5})
    assert cfg.train.max_steps == 5


@pytest.mark.parametrize("key,value", [
    ("model.dtype", "float64"),
    ("peft.kind", "prefix"),
    ("estimate.rank_score", "magnitude"),
    ("estimate.optimizer_state", "keep"),
    ("prune.ffn_scope", "model"),
    ("train.mixed_precision", "fp8"),
    ("peft.targets", ["q", "qkv"]),
    ("peft.targets", []),
])
def test_bad_choices_rejected(key, value):
    with pytest.raises(PrunetuneError, match=key.replace(".", r"\.")) as info:
        load_config(None, {key: value})
    assert repr(value) in str(info.value) or str(value) in str(info.value)


@pytest.mark.parametrize("key", ["data.data_dir", "data.train_file", "data.dev_file"])
def test_missing_data_paths_rejected(tmp_path, key):
    missing = tmp_path / "nope" / "train.tsv"
    with pytest.raises(PrunetuneError, match=key.replace(".", r"\.")) as info:
        load_config(None, {key: str(missing)})
    assert str(missing) in str(info.value)


def test_existing_data_paths_accepted(data_dir):
    cfg = load_config(None, {"data.data_dir": str(data_dir), "data.train_file": str(data_dir / "train.tsv")})
    assert cfg.data.data_dir == str(data_dir)


def test_config_file_not_found(tmp_path):
    with pytest.raises(PrunetuneError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(PrunetuneError, match="config file not found"):
        load_config(tmp_path)  # a folder is not a config file


@pytest.mark.parametrize("text", ["prune: [1, 2\n", "a: b: c\n", "train:\n  epochs: 1\n bad_indent: 2\n", "\t- x"])
def test_invalid_yaml_rejected(tmp_path, text):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(PrunetuneError, match="not valid YAML") as info:
        load_config(p)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_yaml_rejected(tmp_path, text):
    p = tmp_path / "list.yaml"
    p.write_text(text)
    with pytest.raises(PrunetuneError, match="mapping"):
        load_config(p)


def test_empty_yaml_is_defaults(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("# nothing\n")
    assert load_config(p) == RunConfig()


def test_yaml_unknown_nested_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("prune:\n  heads: 0.5\n  typo_key: 1\n")
    with pytest.raises(PrunetuneError, match="'prune.typo_key'"):
        load_config(p)


# ---------------------------------------------------------------- CLI error contract

def _light(tmp_path, *extra) -> tuple[list[str], Path]:
    out = tmp_path / "out"
    return ["light", "--output-dir", str(out), *extra], out


@pytest.mark.parametrize("extra,needle", [
    (["--set", "bogus.key=1"], "'bogus'"),
    (["--set", "prune.nope=1"], "prune.nope"),
    (["--set", "prune.heads=2"], "prune.heads"),
    (["--set", "prune.heads=-0.1"], "prune.heads"),
    (["--set", "prune.heads=1.0"], "prune.heads"),
    (["--set", "prune.ffn=1"], "prune.ffn"),
    (["--set", "train.epochs=abc"], "train.epochs"),
    (["--set", "peft.kind=prefix"], "peft.kind"),
    (["--set", "prune"], "--set"),
    (["--set", "train.lr=[1"], "train.lr"),  # value that is not valid YAML
    (["--epochs", "0"], "epochs"),
    (["--batch-size", "0"], "batch_size"),
    (["--train-file", "/nonexistent/train.tsv"], "data.train_file"),
    (["--data-dir", "/nonexistent/glue"], "data.data_dir"),
    (["--config", "/nonexistent/config.yaml"], "config file not found"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, extra, needle):
    argv, out = _light(tmp_path, *extra)
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert needle in line
    assert not out.exists()


def test_cli_bad_yaml_config(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("prune: [1, 2\n")
    argv, out = _light(tmp_path, "--config", str(p))
    assert main(argv) == 2
    assert "not valid YAML" in _one_error_line(capsys)
    assert not out.exists()
    p.write_text("prune:\n  heads: 1.0\n")
    assert main(argv) == 2
    assert "prune.heads" in _one_error_line(capsys)
    assert not out.exists()


def test_cli_missing_data_file_in_existing_folder(tmp_path, capsys, bert_dir):
    folder = tmp_path / "glue"
    folder.mkdir()
    (folder / "train.tsv").write_text("sentence\tlabel\nok\t1\n")  # dev.tsv missing
    argv, out = _light(tmp_path, "--model", str(bert_dir), "--data-dir", str(folder))
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert "dev.tsv" in line
    assert not out.exists()


def test_cli_malformed_data_file(tmp_path, capsys, bert_dir):
    folder = _write_sst2(tmp_path / "glue")
    (folder / "dev.tsv").write_text("sentence\tlabel\nfine\t1\nbroken row\tmaybe\n")
    argv, out = _light(tmp_path, "--model", str(bert_dir), "--data-dir", str(folder))
    assert main(argv) == 2
    assert "maybe" in _one_error_line(capsys)
    assert not out.exists()


def test_cli_missing_model_folder(tmp_path, capsys, data_dir):
    argv, out = _light(tmp_path, "--model", str(tmp_path / "no-such-model"), "--data-dir", str(data_dir))
    assert main(argv) == 2
    _one_error_line(capsys)
    assert not out.exists()


def test_cli_unsupported_architecture(tmp_path, capsys, unsupported_dir, data_dir):
    argv, out = _light(tmp_path, "--model", str(unsupported_dir), "--data-dir", str(data_dir), "--max-steps", "2")
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert "unsupported architecture" in line and "distilbert" in line
    assert not out.exists()


def test_cli_tokenizer_model_mismatch(tmp_path, capsys, data_dir):
    """A tokenizer with more tokens than the model embeds (another model's tokenizer) is refused up front."""
    from transformers import BertConfig, BertForSequenceClassification

    small = tmp_path / "small-vocab"
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(
        vocab_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64, num_labels=2)).save_pretrained(small)
    make_tokenizer(POS + NEG).save_pretrained(small)  # the tokenizer bert_dir ships: far more than 8 tokens
    capsys.readouterr()  # drop save_pretrained's progress bar
    argv, out = _light(tmp_path, "--model", str(small), "--data-dir", str(data_dir), "--max-steps", "2")
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert "tokenizer/model mismatch" in line and "embeds only 8" in line
    assert not out.exists()


def _corrupt_copy(src: Path, dst: Path, how: str) -> Path:
    import shutil

    shutil.copytree(src, dst)
    if how == "weights":
        f = dst / "model.safetensors"
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF
        f.write_bytes(bytes(data))
    elif how == "manifest":
        (dst / "prunetune.json").write_text("{not json")
    elif how == "missing":
        (dst / "prunetune_plan.json").unlink()
    elif how == "no-manifest":
        (dst / "prunetune.json").unlink()
    return dst


@pytest.mark.parametrize("how,needle", [("weights", "checksum"), ("manifest", "corrupt"), ("missing", "missing"),
                                        ("no-manifest", "not a prunetune export")])
def test_cli_eval_corrupt_export(tmp_path, capsys, run_dir, data_dir, how, needle):
    bad = _corrupt_copy(run_dir / "model", tmp_path / "bad", how)
    capsys.readouterr()
    assert main(["eval", str(bad), "--data-dir", str(data_dir)]) == 2
    assert needle in _one_error_line(capsys)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("how,needle", [("weights", "checksum"), ("manifest", "corrupt"), ("missing", "missing"),
                                        ("no-manifest", "not a prunetune export")])
@pytest.mark.parametrize("merge", [False, True])
def test_cli_export_corrupt_export(tmp_path, capsys, run_dir, how, needle, merge):
    bad = _corrupt_copy(run_dir / "model", tmp_path / "bad", how)
    out = tmp_path / "re-export"
    capsys.readouterr()
    assert main(["export", str(bad), "--out", str(out)] + (["--merge"] if merge else [])) == 2
    assert needle in _one_error_line(capsys)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".re-export")]  # no temp folder either


def test_cli_eval_missing_path(tmp_path, capsys, data_dir):
    assert main(["eval", str(tmp_path / "nothing"), "--data-dir", str(data_dir)]) == 2
    _one_error_line(capsys)


def test_cli_eval_bad_data_dir(tmp_path, capsys, run_dir):
    assert main(["eval", str(run_dir / "model"), "--data-dir", str(tmp_path / "nope")]) == 2
    assert "data.data_dir" in _one_error_line(capsys)


def test_cli_export_merge_refuses_adapters(tmp_path, capsys, bert_dir, data_dir):
    run = tmp_path / "run"
    assert main(["light", "--model", str(bert_dir), "--data-dir", str(data_dir), "--output-dir", str(run),
                 "--max-steps", "2", "--batch-size", "4", "--set", "peft.kind=adapter"]) == 0
    capsys.readouterr()
    out = tmp_path / "merged"
    assert main(["export", str(run), "--out", str(out), "--merge"]) == 2
    assert "--merge" in _one_error_line(capsys)
    assert not out.exists()


def test_console_script_nonzero_exit(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "prunetune.cli", "light", "--set", "prune.heads=2",
                           "--output-dir", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("prunetune: error:") and "prune.heads" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
