"""Data loading, encoding/collation and metrics."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_tokenizer

from prunetune.config import DataConfig
from prunetune.data import Task, compute_metrics, encode, load_task, make_collate, sample_path
from prunetune.errors import PrunetuneError

GLUE = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_glue = pytest.mark.skipif(not GLUE.is_dir(), reason="GLUE data folder not present")


# ---------------------------------------------------------------- GLUE tasks

@needs_glue
@pytest.mark.parametrize("task,folder,n_train,n_dev,pair,label_type", [
    ("sst2", "SST-2", 67349, 872, False, int),
    ("CoLA", "CoLA", 8551, 1043, False, int),
    ("rte", "RTE", 2490, 277, True, int),
    ("sts-b", "STS-B", 5749, 1500, True, float),
])
def test_glue_tasks_load(task, folder, n_train, n_dev, pair, label_type):
    t, train, dev = load_task(DataConfig(task=task, data_dir=str(GLUE / folder)))
    assert (len(train), len(dev)) == (n_train, n_dev)
    for row in train[:50] + dev[:50]:
        assert isinstance(row["text"], str) and row["text"]
        assert (row["text_pair"] is not None) == pair
        assert type(row["label"]) is label_type
    assert t.num_labels == (1 if label_type is float else 2)


@needs_glue
def test_glue_label_details():
    t, _, dev = load_task(DataConfig(task="rte", data_dir=str(GLUE / "RTE")))
    assert t.label_names == ["entailment", "not_entailment"] and t.metric == "accuracy"
    assert dev[0]["label"] == 1  # first RTE dev row is not_entailment
    t, _, dev = load_task(DataConfig(task="stsb", data_dir=str(GLUE / "STS-B")))
    assert t.metric == "pearson" and dev[0]["label"] == 5.0 and all(0 <= r["label"] <= 5 for r in dev)
    t, train, _ = load_task(DataConfig(task="cola", data_dir=str(GLUE / "CoLA")))
    assert t.metric == "matthews" and {r["label"] for r in train} == {0, 1}
    assert train[0]["text"].startswith("Our friends won't buy this analysis")


def test_bundled_sample_and_limits():
    assert (sample_path() / "train.tsv").is_file()
    t, train, dev = load_task(DataConfig())
    assert t.name == "sst2" and len(train) == 4000 and len(dev) == 872
    _, a, d = load_task(DataConfig(max_train_samples=10, max_eval_samples=5))
    _, b, _ = load_task(DataConfig(max_train_samples=10))
    assert a == b and len(a) == 10 and a != train[:10]  # seeded shuffle, deterministic
    assert d == dev[:5]


# ---------------------------------------------------------------- custom files

def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_custom_csv_string_labels(tmp_path):
    tr = _write(tmp_path / "tr.csv", 'review,stars\n"good, really",pos\nbad,neg\nok,neutral\n')
    dv = _write(tmp_path / "dv.csv", "review,stars\nfine,pos\n")
    t, train, dev = load_task(DataConfig(task="custom", train_file=tr, dev_file=dv, text_fields=["review"], label_field="stars"))
    assert t.label_names == ["neg", "neutral", "pos"] and t.num_labels == 3 and t.metric == "accuracy"
    assert train[0] == {"text": "good, really", "text_pair": None, "label": 2} and dev[0]["label"] == 2


def test_custom_jsonl_pairs_regression(tmp_path):
    lines = [{"a": "x y", "b": "y z", "label": 0.5}, {"a": "p", "b": "q", "label": 3}]
    tr = _write(tmp_path / "train.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n")
    _write(tmp_path / "dev.jsonl", json.dumps(lines[1]) + "\n")
    t, train, dev = load_task(DataConfig(task="custom", data_dir=str(tmp_path), text_fields=["a", "b"]))
    assert t.num_labels == 1 and t.metric == "pearson" and tr
    assert train[1] == {"text": "p", "text_pair": "q", "label": 3.0} and isinstance(dev[0]["label"], float)


def test_custom_tsv_int_labels_and_forced_regression(tmp_path):
    tr = _write(tmp_path / "train.tsv", 'text\tlabel\nsay "hi\t1\nbye\t0\nmeh\t2\n')
    cfg = DataConfig(task="custom", train_file=tr, dev_file=tr, text_fields=["text"])
    t, train, _ = load_task(cfg)
    assert t.num_labels == 3 and t.label_names is None and [r["label"] for r in train] == [1, 0, 2]
    assert train[0]["text"] == 'say "hi'  # quotes kept verbatim in TSV
    cfg.num_labels = 1
    t, train, _ = load_task(cfg)
    assert t.num_labels == 1 and train[0]["label"] == 1.0


def test_custom_json_list(tmp_path):
    f = _write(tmp_path / "d.json", json.dumps([{"s": "a", "label": "yes"}, {"s": "b", "label": "no"}]))
    t, train, _ = load_task(DataConfig(task="custom", train_file=f, dev_file=f, text_fields=["s"]))
    assert t.label_names == ["no", "yes"] and [r["label"] for r in train] == [1, 0]


# ---------------------------------------------------------------- errors

def _err(cfg: DataConfig) -> str:
    with pytest.raises(PrunetuneError) as exc:
        load_task(cfg)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_error_missing_file(tmp_path):
    m = _err(DataConfig(task="sst2", data_dir=str(tmp_path)))
    assert "not found" in m and str(tmp_path / "train.tsv") in m
    assert "data_dir" in _err(DataConfig(task="cola"))


def test_error_empty_file(tmp_path):
    f = _write(tmp_path / "train.tsv", "sentence\tlabel\n")
    assert "empty" in (m := _err(DataConfig(task="sst2", train_file=f, dev_file=f))) and "train.tsv" in m
    j = _write(tmp_path / "e.jsonl", "\n")
    assert "empty" in _err(DataConfig(task="custom", train_file=j, dev_file=j, text_fields=["t"]))


def test_error_malformed_row(tmp_path):
    f = _write(tmp_path / "train.tsv", "sentence\tlabel\ngood\t1\nextra\tcol\t0\n")
    m = _err(DataConfig(task="sst2", train_file=f, dev_file=f))
    assert "malformed" in m and "train.tsv line 3" in m and "got 3" in m
    j = _write(tmp_path / "x.jsonl", '{"t": "a", "label": 1}\n{oops\n')
    assert "x.jsonl line 2" in _err(DataConfig(task="custom", train_file=j, dev_file=j, text_fields=["t"]))


def test_error_label_column_missing(tmp_path):
    f = _write(tmp_path / "train.csv", "text,target\na,1\n")
    m = _err(DataConfig(task="custom", train_file=f, dev_file=f, text_fields=["text"], label_field="label"))
    assert "'label'" in m and "train.csv" in m and "text, target" in m
    m = _err(DataConfig(task="custom", train_file=f, dev_file=f, text_fields=["body"], label_field="target"))
    assert "'body'" in m


def test_error_unparsable_label(tmp_path):
    f = _write(tmp_path / "train.tsv", "sentence\tlabel\ngood\t1\nbad\tmaybe\n")
    m = _err(DataConfig(task="sst2", train_file=f, dev_file=f))
    assert "'maybe'" in m and "train.tsv line 3" in m
    s = _write(tmp_path / "s.tsv", "sentence1\tsentence2\tscore\na\tb\tfive\n")
    assert "'five'" in _err(DataConfig(task="stsb", train_file=s, dev_file=s))
    c = _write(tmp_path / "c.csv", "t,label\na,x\n")
    assert "regression" in _err(DataConfig(task="custom", train_file=c, dev_file=c, text_fields=["t"], num_labels=1))


def test_hub_failure_is_one_line(monkeypatch):
    import datasets

    def boom(*args, **kwargs):
        raise ConnectionError("no route to host\nsecond line")
    monkeypatch.setattr(datasets, "load_dataset", boom)
    m = _err(DataConfig(task="someone/thing"))
    assert "could not load dataset 'someone/thing' from the hub (offline?)" in m
    assert "could not load dataset 'nosuchtask'" in _err(DataConfig(task="nosuchtask"))


def test_hub_dataset_mapping(monkeypatch):
    import datasets
    feats = datasets.Features({"sentence": datasets.Value("string"), "idx": datasets.Value("int32"),
                               "label": datasets.ClassLabel(names=["negative", "positive"])})
    data = {"sentence": ["good", "bad", "fine"], "idx": [0, 1, 2], "label": [1, 0, 1]}
    ds = datasets.DatasetDict({s: datasets.Dataset.from_dict(data, features=feats) for s in ("train", "validation")})
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a) or ds)
    t, train, dev = load_task(DataConfig(task="glue/sst2", max_eval_samples=2))
    assert calls[0] == ("glue", "sst2") and t.metric == "accuracy" and t.label_names == ["negative", "positive"]
    assert train[0] == {"text": "good", "text_pair": None, "label": 1} and len(dev) == 2


# ---------------------------------------------------------------- encode + collate

def test_encode_and_collate_single():
    tok = make_tokenizer()
    rows = [{"text": "the movie was good", "text_pair": None, "label": 1},
            {"text": "bad", "text_pair": None, "label": 0}]
    ds = encode(rows, tok, max_length=4)
    assert len(ds) == 2 and ds[0]["labels"] == 1 and isinstance(ds[0]["input_ids"], list)
    assert len(ds[0]["input_ids"]) == 4 and ds[0]["input_ids"][0] == tok.cls_token_id  # truncated
    assert ds[1]["input_ids"] == [tok.cls_token_id, tok.convert_tokens_to_ids("bad"), tok.sep_token_id]
    batch = make_collate(tok)([ds[0], ds[1]])
    assert batch["input_ids"].shape == (2, 4) and batch["labels"].dtype == torch.long
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0] and batch["input_ids"][1, 3] == tok.pad_token_id


def test_encode_and_collate_pairs_regression():
    tok = make_tokenizer()
    rows = [{"text": "a man", "text_pair": "a plane is taking off", "label": 3.5},
            {"text": "a flute", "text_pair": "a man", "label": 1.0}]
    ds = encode(rows, tok, max_length=64)
    assert "token_type_ids" in ds[0] and ds[0]["token_type_ids"][-1] == 1 and isinstance(ds[0]["labels"], float)
    batch = make_collate(tok)(list(ds))
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [3.5, 1.0]
    assert batch["token_type_ids"].shape == batch["input_ids"].shape


def test_collate_requires_pad_token():
    tok = make_tokenizer()
    tok.pad_token = None
    with pytest.raises(PrunetuneError, match="pad token"):
        make_collate(tok)


# ---------------------------------------------------------------- metrics

CLS = Task("t", ["sentence"], 2, "accuracy", None)
REG = Task("r", ["a", "b"], 1, "pearson", None)


def test_classification_metrics():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]])  # preds 0 1 1 0
    m = compute_metrics(CLS, logits, np.array([0, 1, 0, 0]))
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(2 / 3)  # tp=1 fp=1 fn=0
    assert m["matthews"] == pytest.approx(1 / np.sqrt(3))  # (1*2 - 1*0) / sqrt(2*2*3*1)
    assert all(type(v) is float for v in m.values())
    const = compute_metrics(CLS, np.tile([1.0, 0.0], (4, 1)), np.array([0, 1, 0, 1]))
    assert const["matthews"] == 0.0 and const["f1"] == 0.0 and const["accuracy"] == 0.5
    macro = compute_metrics(Task("m", ["s"], 3, "accuracy", None), np.eye(3), np.array([0, 1, 1]))
    assert macro["f1"] == pytest.approx((1 + 0 + 2 / 3) / 3)


def test_regression_metrics():
    y = np.array([0.0, 1.0, 2.0, 3.0])
    m = compute_metrics(REG, (2 * y + 1).reshape(-1, 1), y)
    assert m["pearson"] == pytest.approx(1.0) and m["spearman"] == pytest.approx(1.0) and m["combined"] == pytest.approx(1.0)
    const = compute_metrics(REG, np.full(4, 2.0), y)
    assert const == {"pearson": 0.0, "spearman": 0.0, "combined": 0.0}
