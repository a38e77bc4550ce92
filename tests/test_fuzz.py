"""Fuzz suite for careless input (issue 11): each bad input -> exit code 2, exactly one `prunetune: error:` line
on stderr (no traceback, no warning, nothing on stdout), and nothing on disk changed: the check happens before
any work.

Each row is a `Case`: the argv (with placeholders), files to write first, and a word the error line must contain.
Placeholders (see `world`):
    {model}  tiny BERT folder (64 positions)      {sst2} / {stsb}  tiny GLUE-layout data folders
    {run}    a finished Light-PEFT run folder     {export}         that run's export ({run}/model)
    {tmp}    this test's scratch folder: `files` are written here, it is also the working dir and PRUNETUNE_CACHE
    {out}    the output dir ({tmp}/out, appended as --output-dir to light/search unless the argv names one)
The snapshot covers {tmp} and the shared fixtures, output dir included; a case that may legitimately write inside
its output dir sets `may_touch_output=True`. To add a class of bad input (output dir, export, checkpoint): a new
list of Case rows and one parametrised test calling `check`.

Row ids starting with `guard-` already passed before issue 11 (they keep it so); every other row failed before
(a traceback, a second stderr line, or a silently accepted value)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from helpers import make_tokenizer

from prunetune.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"
POS = ["a charming and often affecting journey", "the movie was good and the actors were great",
       "one of the best films of the year", "a great and wonderful story"]
NEG = ["the plot is bad , boring and too long", "it is not a film i would watch again",
       "a dull and terrible mess", "the worst film of the year"]


@dataclass
class Case:
    id: str
    argv: list[str]
    needle: str  # must appear in the error line
    files: dict[str, str | bytes] = field(default_factory=dict)  # relative to {tmp}: text (UTF-8) or raw bytes
    subprocess: bool = False  # run `python -m prunetune.cli` (a real process: exit status, real stderr)
    may_touch_output: bool = False  # leave the output dir out of the before/after comparison
    needs_model: bool = False  # the check needs the loaded model: the run's banner on stdout is allowed
    output_flag: bool = True  # append `--output-dir {out}` to light/search (False: the config's own value counts)

    def param(self):
        return pytest.param(self, id=self.id)


# ---------------------------------------------------------------- harness

@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("world")
    from transformers import BertConfig, BertForSequenceClassification

    tok = make_tokenizer(POS + NEG)
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64, num_labels=2)).save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    for name, header, row in (("sst2", "sentence\tlabel", lambda i: f"{(POS if i % 2 else NEG)[i % 4]}\t{i % 2}"),
                              ("stsb", "sentence1\tsentence2\tscore", lambda i: f"{POS[i % 4]}\t{NEG[i % 4]}\t{i % 5}.5")):
        (root / name).mkdir()
        for split, n in (("train.tsv", 16), ("dev.tsv", 8)):
            (root / name / split).write_text(header + "\n" + "\n".join(row(i) for i in range(n)) + "\n")
    run = root / "run"
    assert main(["light", "--model", str(root / "bert"), "--data-dir", str(root / "sst2"), "--output-dir", str(run),
                 "--max-steps", "2", "--batch-size", "4"]) == 0
    return {"root": str(root), "model": str(root / "bert"), "sst2": str(root / "sst2"), "stsb": str(root / "stsb"),
            "run": str(run), "export": str(run / "model")}


def snapshot(roots: list[Path], skip: Path | None = None) -> dict[str, str]:
    """Every folder and file under roots -> 'dir' or the file's size and sha256 (skip: a subtree left out)."""
    state = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            here = Path(folder)
            if skip is not None and (here == skip or skip in here.parents):
                dirs[:] = []
                continue
            state[str(here)] = "dir"
            for f in files:
                p = here / f
                if skip is not None and p == skip:
                    continue
                state[str(p)] = f"{p.stat().st_size}:{hashlib.sha256(p.read_bytes()).hexdigest()}"
    return state


def _fill(arg: str, places: dict[str, str]) -> str:
    for key, value in places.items():
        arg = arg.replace("{" + key + "}", value)
    return arg


def check(case: Case, world: dict, tmp_path: Path, capsys, monkeypatch) -> str:
    """Run the case; assert the error contract; return the error line."""
    monkeypatch.chdir(tmp_path)  # a relative output dir / file lands in the snapshot
    monkeypatch.setenv("PRUNETUNE_CACHE", str(tmp_path / "cache"))  # warm-up / GGUF caches too
    places = {**world, "tmp": str(tmp_path), "out": str(tmp_path / "out")}
    for rel, content in case.files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    argv = [_fill(a, places) for a in case.argv]
    if case.output_flag and argv and argv[0] in ("light", "search") and "--output-dir" not in argv:
        argv += ["--output-dir", places["out"]]
    roots = [tmp_path, Path(world["root"])]
    out = Path(places["out"])
    skip = out if case.may_touch_output else None
    before = snapshot(roots, skip)
    capsys.readouterr()
    if case.subprocess:
        env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run([sys.executable, "-m", "prunetune.cli", *argv], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=300)
        code, err, stdout = proc.returncode, proc.stderr, proc.stdout
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # a warning would be a second stderr line in a real process
            code = main(argv)
        captured = capsys.readouterr()
        err = captured.err + "".join(f"{w.category.__name__}: {w.message}\n" for w in caught)
        stdout = captured.out
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, f"exit code {code}, stderr:\n{err}"
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"expected exactly one stderr line, got {len(lines)}:\n{err}"
    assert lines[0].startswith("prunetune: error: "), lines[0]
    assert case.needle in lines[0], f"{case.needle!r} not in {lines[0]!r}"
    assert case.needs_model or stdout.strip() == "", stdout
    after = snapshot(roots, skip)
    changed = sorted(set(before) ^ set(after) | {k for k in before if k in after and before[k] != after[k]})
    assert not changed, f"bad input changed files: {changed[:5]}"
    return lines[0]


LIGHT = ["light", "--model", "{model}", "--data-dir", "{sst2}", "--max-steps", "2", "--batch-size", "4"]
SEARCH = ["search", "--model", "{model}", "--data-dir", "{sst2}", "--max-steps", "2", "--batch-size", "4"]
CUSTOM = ["light", "--model", "{model}", "--task", "custom", "--data-dir", "{tmp}/d", "--max-steps", "2",
          "--set", "data.text_fields=[text]"]


def _set(key_value: str, base=LIGHT) -> list[str]:
    return [*base, "--set", key_value]


# ---------------------------------------------------------------- config values (--set / config keys)

CONFIG_VALUES = [
    # seeds outside numpy's [0, 2**32) were a ValueError / OverflowError traceback from the RNG
    Case("seed-negative", [*LIGHT, "--seed", "-1"], "train.seed"),
    Case("seed-2**32", [*LIGHT, "--seed", str(2**32)], "train.seed"),
    Case("seed-2**70", _set(f"train.seed={2**70}"), "train.seed"),
    # dropout >= 1 (or < 0): a traceback from torch, or every activation dropped without a word
    Case("dropout-1", _set("peft.dropout=1"), "peft.dropout"),
    Case("dropout-1.5", _set("peft.dropout=1.5"), "peft.dropout"),
    Case("dropout-negative", _set("peft.dropout=-0.1"), "peft.dropout"),
    # nested lists where names are expected: TypeError unhashable list
    Case("nested-peft.targets", _set("peft.targets=[[q, v]]"), "peft.targets"),
    Case("nested-text_fields", _set("data.text_fields=[[sentence]]"), "data.text_fields"),
    Case("nested-search.space", _set("search.space=[[lora_qv]]", SEARCH), "search.space"),
    Case("nested-search.criteria", _set("search.criteria=[[taylor]]", SEARCH), "search.criteria"),
    Case("nested-search.warmup_criteria", _set("search.warmup_criteria=[[taylor]]", SEARCH), "search.warmup_criteria"),
    Case("nested-search.bands", _set("search.bands=[[0.5]]", SEARCH), "search.bands"),
    # null for a key that has no "unset" meaning
    Case("null-output_dir", _set("output_dir=null"), "output_dir"),
    Case("null-output_dir-tilde", _set("output_dir=~"), "output_dir"),
    Case("null-model", _set("model.name_or_path=null"), "model.name_or_path"),
    Case("empty-output_dir", _set("output_dir=''"), "output_dir"),
    # silently accepted before: values that flip, zero or invert what they control
    Case("max_grad_norm-negative", _set("train.max_grad_norm=-1"), "train.max_grad_norm"),
    Case("weight_decay-negative", _set("train.weight_decay=-0.01"), "train.weight_decay"),
    Case("warmup_ratio-negative", _set("train.warmup_ratio=-0.1"), "train.warmup_ratio"),
    Case("warmup_ratio-above-1", _set("train.warmup_ratio=2"), "train.warmup_ratio"),
    Case("mask_lr-negative", _set("estimate.mask_lr=-0.001"), "estimate.mask_lr"),
    Case("lambda_heads-negative", _set("estimate.lambda_heads=-1"), "estimate.lambda_heads"),
    Case("lambda_ffn-negative", _set("estimate.lambda_ffn=-1"), "estimate.lambda_ffn"),
    Case("alpha-negative", _set("peft.alpha=-16"), "peft.alpha"),
    Case("search.lora_alpha-zero", _set("search.lora_alpha=0", SEARCH), "search.lora_alpha"),
    Case("estimate.steps-negative", _set("estimate.steps=-1"), "estimate.steps"),
    Case("estimate.steps-zero", _set("estimate.steps=0"), "estimate.steps"),  # `steps or ...`: 0 meant "unset"
    Case("round_steps-negative", _set("search.round_steps=-1", SEARCH), "search.round_steps"),
    Case("round_steps-zero", _set("search.round_steps=0", SEARCH), "search.round_steps"),
    Case("epochs-negative-with-max_steps", [*LIGHT, "--epochs", "-1"], "train.epochs"),
    Case("save_every-negative", _set("train.save_every=-1"), "train.save_every"),
    Case("small_task_rows-negative", _set("estimate.small_task_rows=-1"), "estimate.small_task_rows"),
    Case("search.threshold-negative", _set("search.threshold=-1", SEARCH), "search.threshold"),
    Case("num_labels-zero", _set("data.num_labels=0"), "data.num_labels"),
    Case("num_labels-negative-custom", [*CUSTOM, "--set", "data.num_labels=-3"], "'data.num_labels' must lie",
         files={"d/train.tsv": "text\tlabel\ngood\t1\nbad\t0\n", "d/dev.tsv": "text\tlabel\ngood\t1\n"}),
    Case("num_labels-vs-known-task", _set("data.num_labels=3"), "data.num_labels"),  # was ignored for sst2
    Case("num_labels-2-for-stsb", [*LIGHT, "--task", "stsb", "--data-dir", "{stsb}", "--set", "data.num_labels=2"],
         "data.num_labels"),
    # lists: duplicates, wrong length, the label as input
    Case("dup-peft.targets", _set("peft.targets=[q, q]"), "peft.targets"),
    Case("dup-search.criteria", _set("search.criteria=[taylor, taylor]", SEARCH), "search.criteria"),
    Case("dup-search.bands", _set("search.bands=[0.5, 0.5]", SEARCH), "search.bands"),
    Case("text_fields-empty", _set("data.text_fields=[]"), "data.text_fields"),  # fell back to the default
    Case("text_fields-three", _set("data.text_fields=[sentence, label, other]"), "data.text_fields"),  # 3rd dropped
    Case("label-as-text-config", [*LIGHT, "--set", "data.text_fields=[label]", "--set", "data.label_field=label"],
         "label_field"),
    # folders the run writes into later, mid-run: a file there was a NotADirectoryError / FileExistsError
    Case("warmup_cache-is-file", _set("search.warmup_cache={tmp}/cachefile", SEARCH), "search.warmup_cache",
         files={"cachefile": "x"}),
    Case("warmup_cache-under-file", _set("search.warmup_cache={tmp}/cachefile/sub", SEARCH), "search.warmup_cache",
         files={"cachefile": "x"}),
    Case("tensorboard_dir-is-file", _set("train.tensorboard_dir={tmp}/tb"), "train.tensorboard_dir",
         files={"tb": "x"}),
    # YAML 1.1 read `1e12` as a string
    Case("budget-exponent-string-now-number", _set("search.budget=-1e3", SEARCH), "search.budget must be > 0"),
    Case("guard-lr-negative", _set("train.lr=-1e-3"), "train.lr"),
    Case("guard-max_train_samples-zero", [*LIGHT, "--max-train-samples", "0"], "max_train_samples"),
    Case("guard-ratio", _set("prune.heads=1.0"), "prune.heads"),
    Case("guard-unknown-key", _set("train.learning_rate=1"), "train.learning_rate"),
]


@pytest.mark.parametrize("case", [c.param() for c in CONFIG_VALUES])
def test_bad_config_values(case, world, tmp_path, capsys, monkeypatch):
    check(case, world, tmp_path, capsys, monkeypatch)


# ---------------------------------------------------------------- config file format

CONFIG_FILES = [
    Case("config-not-utf8", [*LIGHT, "--config", "{tmp}/c.yaml"], "UTF-8",
         files={"c.yaml": "train:\n  lr: 0.001  # caf\xe9\n".encode("latin-1")}),
    Case("config-not-utf8-process", [*LIGHT, "--config", "{tmp}/c.yaml"], "UTF-8", subprocess=True,
         files={"c.yaml": b"model:\n  name_or_path: \xff\xfe\n"}),
    Case("config-duplicate-key", [*LIGHT, "--config", "{tmp}/c.yaml"], "duplicate key 'lr'",
         files={"c.yaml": "train:\n  lr: 0.1\n  lr: 0.2\n"}),
    Case("config-duplicate-section", [*LIGHT, "--config", "{tmp}/c.yaml"], "duplicate key 'train'",
         files={"c.yaml": "train:\n  lr: 0.1\ntrain:\n  seed: 3\n"}),
    Case("config-null-output_dir", [*LIGHT, "--config", "{tmp}/c.yaml"], "output_dir", output_flag=False,
         files={"c.yaml": "output_dir:\n"}),
    Case("config-exponent-is-number", [*LIGHT, "--config", "{tmp}/c.yaml"], "train.lr must be > 0",
         files={"c.yaml": "train:\n  lr: -1e-3\n"}),  # was "must be a number, got '-1e-3'": now the sign is named
    Case("guard-config-list", [*LIGHT, "--config", "{tmp}/c.yaml"], "mapping", files={"c.yaml": "- a\n- b\n"}),
    Case("guard-config-invalid-yaml", [*LIGHT, "--config", "{tmp}/c.yaml"], "not valid YAML",
         files={"c.yaml": "prune: [1, 2\n"}),
    Case("guard-config-python-tag", [*LIGHT, "--config", "{tmp}/c.yaml"], "not valid YAML",
         files={"c.yaml": "train: !!python/object:os.system {}\n"}),
    Case("guard-config-is-folder", [*LIGHT, "--config", "{tmp}"], "config file not found"),
]


@pytest.mark.parametrize("case", [c.param() for c in CONFIG_FILES])
def test_bad_config_files(case, world, tmp_path, capsys, monkeypatch):
    check(case, world, tmp_path, capsys, monkeypatch)


# ---------------------------------------------------------------- data files

def _sst2(train: str | bytes, dev: str = "sentence\tlabel\ngood\t1\nbad\t0\n") -> dict:
    return {"d/train.tsv": train, "d/dev.tsv": dev}


SST2_D = ["light", "--model", "{model}", "--data-dir", "{tmp}/d", "--max-steps", "2", "--batch-size", "4"]
STSB_D = [*SST2_D, "--task", "stsb"]
STS_HEAD = "sentence1\tsentence2\tscore\n"


def _custom(train: str, dev: str = "text\tlabel\ngood\t1\nbad\t0\n", ext: str = ".tsv") -> dict:
    return {f"d/train{ext}": train, f"d/dev{ext}": dev}


DATA_FILES = [
    Case("label-inf", SST2_D, "'inf'", files=_sst2("sentence\tlabel\ngood\tinf\nbad\t0\n")),  # OverflowError
    Case("label-1e400", SST2_D, "'1e400'", files=_sst2("sentence\tlabel\ngood\t1e400\nbad\t0\n")),
    Case("label-100000-custom", CUSTOM, "100001-class head", files=_custom("text\tlabel\ngood\t0\nbad\t100000\n")),
    Case("label-column-as-text-custom", [*CUSTOM, "--set", "data.text_fields=[label]"], "also a text column",
         files=_custom("text\tlabel\ngood\t0\nbad\t1\n")),
    Case("label-column-as-text-sst2", _set("data.text_fields=[label]"), "also a text column"),
    Case("single-class-custom", CUSTOM, "2 or more distinct labels",
         files=_custom("text\tlabel\ngood\tpos\nbad\tpos\n", "text\tlabel\nok\tpos\n")),
    Case("duplicate-header", CUSTOM, "more than once",
         files=_custom("text\ttext\tlabel\na\tb\t1\nc\td\t0\n")),
    Case("jsonl-text-null", CUSTOM, "text field 'text'", files=_custom(
        '{"text": "good", "label": 1}\n{"text": null, "label": 0}\n', '{"text": "ok", "label": 1}\n', ".jsonl")),
    Case("jsonl-text-list", CUSTOM, "text field 'text'", files=_custom(
        '{"text": "good", "label": 1}\n{"text": ["a"], "label": 0}\n', '{"text": "ok", "label": 1}\n', ".jsonl")),
    Case("data_dir-is-a-file", [*LIGHT, "--data-dir", "{sst2}/train.tsv"], "is a file"),
    Case("train_file-is-a-folder", [*LIGHT, "--train-file", "{sst2}", "--dev-file", "{sst2}/dev.tsv"], "is a folder"),
    Case("guard-empty-file", SST2_D, "empty", files=_sst2("")),
    Case("guard-header-only", SST2_D, "empty", files=_sst2("sentence\tlabel\n")),
    Case("guard-wrong-columns", SST2_D, "not found", files=_sst2("text\ty\ngood\t1\n")),
    Case("guard-ragged-row", SST2_D, "malformed row", files=_sst2("sentence\tlabel\ngood\t1\textra\n")),
    Case("guard-label-nan-sst2", SST2_D, "'nan'", files=_sst2("sentence\tlabel\ngood\tnan\nbad\t0\n")),
    Case("guard-stsb-label-string", STSB_D, "'high'", files={"d/train.tsv": STS_HEAD + "a\tb\thigh\n",
                                                             "d/dev.tsv": STS_HEAD + "a\tb\t1.0\n"}),
    Case("guard-stsb-nan", STSB_D, "'NaN'", files={"d/train.tsv": STS_HEAD + "a\tb\t1.0\nc\td\tNaN\n",
                                                   "d/dev.tsv": STS_HEAD + "a\tb\t1.0\n"}),
    Case("guard-stsb-on-sst2-columns", [*LIGHT, "--task", "stsb"], "'score'"),
    Case("guard-data-not-utf8", SST2_D, "cannot read", files=_sst2(b"sentence\tlabel\ncaf\xe9\t1\n")),
    Case("guard-regression-label-string", [*CUSTOM, "--set", "data.num_labels=1"], "'high'",
         files=_custom("text\tlabel\ngood\thigh\nbad\t0.5\n")),
    Case("guard-too-many-labels", [*CUSTOM, "--set", "data.num_labels=2"], "distinct labels but data.num_labels=2",
         files=_custom("text\tlabel\na\tx\nb\ty\nc\tz\n")),
    Case("guard-unknown-task", [*LIGHT, "--task", "sst3"], "sst3"),
    Case("guard-missing-dev", SST2_D, "dev.tsv", files={"d/train.tsv": "sentence\tlabel\ngood\t1\n"}),
]


@pytest.mark.parametrize("case", [c.param() for c in DATA_FILES])
def test_bad_data_files(case, world, tmp_path, capsys, monkeypatch):
    check(case, world, tmp_path, capsys, monkeypatch)


# ---------------------------------------------------------------- model

MODEL = [
    # an export's pruned tensors were silently re-initialised by from_pretrained(ignore_mismatched_sizes=True)
    Case("export-as-model", ["light", "--model", "{export}", "--data-dir", "{sst2}", "--max-steps", "2"],
         "prunetune.load"),
    Case("export-as-model-search", ["search", "--model", "{export}", "--data-dir", "{sst2}", "--max-steps", "2"],
         "prunetune.load"),
    Case("run-folder-as-model", ["light", "--model", "{run}", "--data-dir", "{sst2}", "--max-steps", "2"],
         "prunetune eval"),
    Case("empty-model-name", ["light", "--model", "", "--data-dir", "{sst2}", "--max-steps", "2"],
         "model.name_or_path"),
    # was an AttributeError in surgery: LoRA had wrapped nothing (BERT has no gate projection)
    Case("peft-targets-not-in-model", _set("peft.targets=[gate]"), "match no module", needs_model=True),
    Case("guard-missing-model-folder", ["light", "--model", "{tmp}/nope", "--data-dir", "{sst2}"], "nope"),
    Case("guard-folder-without-tokenizer", ["light", "--model", "{tmp}/m", "--data-dir", "{sst2}"], "tokenizer",
         files={"m/config.json": "{}"}),
    Case("guard-gguf-file-missing", [*LIGHT, "--gguf-file", "nope.gguf"], "nope.gguf"),
]


@pytest.mark.parametrize("case", [c.param() for c in MODEL])
def test_bad_model(case, world, tmp_path, capsys, monkeypatch):
    check(case, world, tmp_path, capsys, monkeypatch)


# ---------------------------------------------------------------- CLI flags (light / search / eval)

CLI_FLAGS = [
    # argparse printed usage + error: two lines, not the `prunetune: error:` one
    Case("flag-not-an-int", [*LIGHT, "--seed", "abc"], "--seed"),
    Case("flag-not-an-int-process", [*LIGHT, "--epochs", "three"], "--epochs", subprocess=True),
    Case("unknown-flag", [*LIGHT, "--learning-rate", "1"], "--learning-rate"),
    Case("no-command", [], "command"),
    Case("eval-batch-size-0", ["eval", "{export}", "--data-dir", "{sst2}", "--batch-size", "0"], "--batch-size"),
    Case("eval-batch-size-negative", ["eval", "{export}", "--data-dir", "{sst2}", "--batch-size", "-1"],
         "--batch-size"),
    # was a ValueError from scipy after the whole dev set ran through a 2-class head
    Case("eval-stsb-on-classifier", ["eval", "{export}", "--task", "stsb", "--data-dir", "{stsb}"], "regression"),
    # was rejected only after the export loaded, with a transformers FutureWarning on stderr first
    Case("eval-max-eval-samples-0", ["eval", "{export}", "--data-dir", "{sst2}", "--max-eval-samples", "0"],
         "--max-eval-samples"),
    Case("eval-batch-size-not-int", ["eval", "{export}", "--batch-size", "abc"], "--batch-size"),
    Case("guard-light-batch-size-0", [*LIGHT, "--batch-size", "0"], "batch_size"),
    Case("guard-epochs-0", ["light", "--model", "{model}", "--data-dir", "{sst2}", "--epochs", "0"], "epochs"),
    Case("guard-set-without-equals", [*LIGHT, "--set", "prune"], "--set"),
    Case("guard-eval-missing-export", ["eval", "{tmp}/nothing", "--data-dir", "{sst2}"], "not a prunetune export"),
    # the export was loaded first: a transformers FutureWarning came before the error line
    Case("eval-bad-data-dir-before-load", ["eval", "{export}", "--data-dir", "{tmp}/nope"], "data.data_dir"),
]


@pytest.mark.parametrize("case", [c.param() for c in CLI_FLAGS])
def test_bad_cli_flags(case, world, tmp_path, capsys, monkeypatch):
    check(case, world, tmp_path, capsys, monkeypatch)


# ---------------------------------------------------------------- the fixes keep good input working

def test_exponent_numbers_parse_as_floats(tmp_path):
    """YAML 1.1 reads `1e-3` as a string; --set values and config files take it as the number it is."""
    from prunetune.cli import _overrides, build_parser
    from prunetune.config import load_config

    args = build_parser().parse_args(["light", "--set", "train.lr=1e-3", "--set", "search.budget=2E5"])
    overrides = _overrides(args)
    assert overrides == {"train.lr": 0.001, "search.budget": 200000.0}
    assert load_config(None, overrides).train.lr == 0.001
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 5e-4\n  weight_decay: 1E-2\n")
    cfg = load_config(p)
    assert (cfg.train.lr, cfg.train.weight_decay) == (5e-4, 1e-2)


def test_long_fields_and_byte_order_mark_load(tmp_path):
    """A field longer than csv's 131072-character limit (was _csv.Error), and a UTF-8 BOM (glued onto the first
    column name), both load."""
    from prunetune.config import DataConfig
    from prunetune.data import load_task

    long = "good " * 40000
    (tmp_path / "train.tsv").write_text("\ufeffsentence\tlabel\n" + long + "\t1\nbad\t0\n", encoding="utf-8")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nok\t1\n")
    task, train, dev = load_task(DataConfig(task="sst2", data_dir=str(tmp_path)))
    assert train[0]["text"] == long.strip() and train[0]["label"] == 1 and len(dev) == 1
    import csv

    assert csv.field_size_limit() == 131072  # the module-wide limit is put back


def test_max_length_capped_at_position_limit(world, tmp_path, capsys):
    """Inputs longer than the model's 64 positions were a RuntimeError in the embeddings; data.max_length is now
    capped at max_position_embeddings (the run records the capped value as the task's)."""
    d = tmp_path / "d"
    d.mkdir()
    for split in ("train.tsv", "dev.tsv"):
        (d / split).write_text("sentence\tlabel\n" + ("good " * 300) + "\t1\nbad\t0\n" * 3)
    out = tmp_path / "out"
    assert main(["light", "--model", world["model"], "--data-dir", str(d), "--output-dir", str(out),
                 "--max-steps", "1", "--batch-size", "2", "--set", "data.max_length=1000"]) == 0
    assert "capped at 64" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["task"]["max_length"] == 64  # what ran (and what eval truncates to)
    assert results["config"]["data"]["max_length"] == 1000  # what the user asked


def test_eval_accepts_a_run_folder(world, capsys):
    """`prunetune eval RUN` evaluates RUN/model (as `prunetune export RUN` already did)."""
    capsys.readouterr()
    assert main(["eval", world["run"], "--data-dir", world["sst2"]]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 8


@pytest.mark.parametrize("labels,n", [("1 2 3 4 5", 6), ("0 1 3", 4), ("-1 1", 2)])
def test_dense_class_ids_still_inferred(tmp_path, labels, n):
    """Guard: the sparse-label refusal leaves ordinary class ids alone (star ratings 1..5, a class missing, -1/1)."""
    from prunetune.config import DataConfig
    from prunetune.data import load_task

    rows = "".join(f"t{i}\t{v}\n" for i, v in enumerate(labels.split()))
    for split in ("train.tsv", "dev.tsv"):
        (tmp_path / split).write_text("text\tlabel\n" + rows)
    task, _, _ = load_task(DataConfig(task="custom", data_dir=str(tmp_path), text_fields=["text"]))
    assert task.num_labels == n


@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_extreme_rank_pruning_keeps_one_rank(world, tmp_path, kind):
    """prune.ranks=0.99 removed every rank (peft: NoMatchingPeftModuleError); at least one is kept, like modules."""
    out = tmp_path / "out"
    assert main(["light", "--model", world["model"], "--data-dir", world["sst2"], "--output-dir", str(out),
                 "--max-steps", "2", "--batch-size", "4", "--set", f"peft.kind={kind}", "--set", "prune.ranks=0.99",
                 "--set", "prune.modules=0.99"]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert sum(len(v) for v in plan["peft_ranks"].values()) == 1


def test_home_folder_in_config_paths_is_expanded(tmp_path, monkeypatch):
    """`output_dir: ~/runs` in YAML (no shell expands it) made a folder named '~' in the working dir."""
    from prunetune.config import load_config

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "data").mkdir()
    p = tmp_path / "c.yaml"
    p.write_text("output_dir: ~/runs/a\ndata:\n  data_dir: ~/data\nsearch:\n  warmup_cache: ~/cache\n")
    cfg = load_config(p)
    assert (cfg.output_dir, cfg.data.data_dir, cfg.search.warmup_cache) == (
        str(tmp_path / "runs" / "a"), str(tmp_path / "data"), str(tmp_path / "cache"))
