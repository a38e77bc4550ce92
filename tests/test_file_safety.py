"""Files a user can be handed never run code; what the user did not ask to replace is never deleted or replaced.

CLI cases: exit code 2, exactly one `prunetune: error:` line on stderr, and nothing on disk changed (a snapshot
of every file's bytes and mtime, and of every path, before and after)."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_pipeline import save_tiny_bert, write_sst2

import prunetune
from prunetune.cli import main
from prunetune.errors import PrunetuneError
from prunetune.export.manifest import MANIFEST, sha256, write_manifest
from prunetune.io import RUN_MARKER, atomic_dir, old_version
from prunetune.train.checkpoint import load_checkpoint, save_checkpoint


def _args(model, data, out, *extra):
    return ["light", "--model", str(model), "--data-dir", str(data), "--output-dir", str(out), "--max-steps", "6",
            "--batch-size", "8", "--set", "train.save_every=2", "--set", "estimate.steps=2",
            "--set", "train.eval_each_epoch=false", *extra]


def _snapshot(root: Path) -> dict:
    """Every path under root; for files their bytes' hash and mtime (folder mtimes are not compared)."""
    snap = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            snap[rel] = (st.st_mtime_ns, st.st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        else:
            snap[rel] = "dir" if p.is_dir() else "other"
    return snap


def _refused(capsys, argv, root: Path, needle: str) -> str:
    """Run the CLI, expect exit 2 with one error line containing needle and no change anywhere under root."""
    before = _snapshot(root)
    capsys.readouterr()
    assert main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("prunetune: error:"), err[0]
    assert needle in err[0], err[0]
    assert _snapshot(root) == before
    return err[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished short Light-PEFT run (checkpoints + export); tests copy what they modify."""
    root = tmp_path_factory.mktemp("safety")
    model = save_tiny_bert(root / "model")
    data = write_sst2(root / "data", n_train=32, n_dev=8)
    out = root / "run"
    assert main(_args(model, data, out)) == 0
    assert (out / "model" / MANIFEST).is_file() and (out / "checkpoints" / "light" / MANIFEST).is_file()
    return root, model, data, out


@pytest.fixture
def work(tmp_path, run):
    """A scratch folder with a copy of the run (same model and data paths, so its checkpoints resume)."""
    root, model, data, out = run
    shutil.copytree(out, tmp_path / "run")
    return tmp_path, model, data, tmp_path / "run"


# ------------------------------------------------------------------------------------- no code execution
class _Payload:
    """Unpickling this creates a file: proof that the pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_checkpoint_is_never_unpickled(tmp_path, run, capsys):
    _root, model, data, _out = run
    out = tmp_path / "run"
    folder = out / "checkpoints" / "light"
    folder.mkdir(parents=True)
    (out / RUN_MARKER).write_text("{}")  # a prunetune run folder, so the checkpoint itself is what is judged
    marker = tmp_path / "pwned"
    torch.save({"phase": "estimate", "x": _Payload(marker)}, folder / "state.pt")
    write_manifest(folder, {"kind": "checkpoint", "phase": "estimate"})  # a checksum that matches
    line = _refused(capsys, _args(model, data, out, "--resume"), tmp_path, "old pickle format")
    assert "state.pt" in line
    assert not marker.exists()


def test_pickle_planted_beside_a_sound_checkpoint_is_refused(work, capsys):
    tmp, model, data, out = work
    marker = tmp / "pwned"
    folder = out / "checkpoints" / "light"
    torch.save(_Payload(marker), folder / "state.pt")
    write_manifest(folder, {"kind": "checkpoint", "phase": "finetune"})  # resealed: every checksum matches
    _refused(capsys, _args(model, data, out, "--resume"), tmp, "old pickle format")
    assert not marker.exists()


def test_unlisted_file_in_checkpoint_is_refused(work, capsys):
    tmp, model, data, out = work
    save_file({"x": torch.zeros(2)}, str(out / "checkpoints" / "light" / "extra.safetensors"))
    _refused(capsys, _args(model, data, out, "--resume"), tmp, "not listed")


def test_checkpoint_payload_round_trips_rng_states_exactly(tmp_path):
    import random

    import numpy as np

    random.seed(1), np.random.seed(2), random.gauss(0, 1), np.random.randn()  # gauss caches set
    payload = {"phase": "p", "step": 7, "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                                                "torch": torch.get_rng_state()},
               "tracker": {"module_sum": {"m": {0: torch.ones(2), 3: torch.arange(3.0)}}, "n": {"m": 2}},
               "loss": [0.1, float("inf")], "half": torch.ones(2, dtype=torch.bfloat16), "$odd": (1, None)}
    save_checkpoint(tmp_path / "ck", payload, {"a": 1})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [MANIFEST, "state.json", "tensors.safetensors"]
    back = load_checkpoint(tmp_path / "ck", {"a": 1})

    def draws(state):  # the next draws after restoring a state (gauss uses the cached value first)
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        return random.gauss(0, 1), random.random(), np.random.randn(), np.random.randint(1 << 30)

    assert draws(back["rng"]) == draws(payload["rng"])
    assert torch.equal(back["rng"]["torch"], payload["rng"]["torch"])
    assert list(back["tracker"]["module_sum"]["m"]) == [0, 3]
    assert torch.equal(back["tracker"]["module_sum"]["m"][3], torch.arange(3.0))
    assert back["half"].dtype == torch.bfloat16 and back["$odd"] == (1, None) and back["loss"] == [0.1, float("inf")]


# ----------------------------------------------------------------------------------------- resume checks
def test_resume_with_nothing_to_resume(tmp_path, run, capsys):
    _root, model, data, _out = run
    _refused(capsys, _args(model, data, tmp_path / "typo", "--resume"), tmp_path, "nothing to resume")
    assert not (tmp_path / "typo").exists()


def test_resume_refuses_changed_data(work, capsys):
    tmp, model, data, out = work
    f = data / "train.tsv"
    original = f.read_bytes()
    try:
        f.write_bytes(original.replace(b"\t1\n", b"\t0\n", 1))  # same paths and config, one label changed
        _refused(capsys, _args(model, data, out, "--resume"), tmp, "data files")
    finally:
        f.write_bytes(original)


def test_resume_refuses_changed_model(work, capsys):
    tmp, model, data, out = work
    f = model / "model.safetensors"
    original = f.read_bytes()
    try:
        weights = load_file(str(f))
        name = sorted(weights)[0]
        weights[name] = weights[name] + 1.0
        save_file(weights, str(f), metadata={"format": "pt"})
        _refused(capsys, _args(model, data, out, "--resume"), tmp, "model's files")
    finally:
        f.write_bytes(original)


def test_kill_between_the_two_renames_keeps_the_previous_checkpoint(tmp_path):
    folder = tmp_path / "ck"
    save_checkpoint(folder, {"phase": "x", "step": 1}, {})
    save_checkpoint(folder, {"phase": "x", "step": 2}, {})
    # the state a kill leaves after the first rename of the next save: current moved aside, new one in a temp
    os.replace(folder, old_version(folder))
    orphan = tmp_path / ".ck.abcd1234.tmp"
    orphan.mkdir()
    (orphan / "state.json").write_text("{half")
    assert load_checkpoint(folder, {})["step"] == 2
    save_checkpoint(folder, {"phase": "x", "step": 3}, {})
    assert load_checkpoint(folder, {})["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # old version and orphan cleaned


def test_cli_resumes_from_the_previous_version_after_a_cut_swap(work):
    _tmp, model, data, out = work
    light = out / "checkpoints" / "light"
    os.replace(light, old_version(light))
    assert main(_args(model, data, out, "--resume")) == 0
    assert json.loads((out / "results.json").read_text())["light_peft"]["resumed"] is True
    assert light.is_dir() and not old_version(light).exists()


def test_failed_swap_puts_the_previous_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "t"
    target.mkdir()
    (target / "keep").write_text("mine")
    real = os.replace

    def failing(src, dst):
        if Path(src).name.endswith(".tmp"):
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr("prunetune.io.os.replace", failing)
    with pytest.raises(OSError):
        with atomic_dir(target) as tmp:
            (tmp / "new").write_text("x")
    assert (target / "keep").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


# ------------------------------------------------------------------------------------------- output folder
def test_output_dir_with_users_model_folder_is_refused_before_loading(tmp_path, run, capsys):
    _root, model, data, _out = run
    project = tmp_path / "project"
    shutil.copytree(model, project / "model")  # the user's base model, where the export would go
    (project / "notes.txt").write_text("mine")
    # a model path that does not exist: the output folder is judged first, before anything is loaded
    argv = _args(tmp_path / "no-such-model", data, project)
    _refused(capsys, argv, tmp_path, "not a prunetune run folder")
    _refused(capsys, _args(project / "model", data, project), tmp_path, "--overwrite")


def test_run_dir_with_foreign_model_subfolder_is_refused(tmp_path, run, capsys):
    _root, model, data, _out = run
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / RUN_MARKER).write_text("{}")
    (out / "model" / "weights.bin").write_text("mine")
    _refused(capsys, _args(model, data, out), tmp_path, "not a prunetune export")


@pytest.mark.parametrize("kind", ["file", "under-file", "unwritable"])
def test_bad_output_dir_is_refused(tmp_path, run, capsys, kind):
    _root, model, data, _out = run
    (tmp_path / "f").write_text("mine")
    if kind == "file":
        out, needle = tmp_path / "f", "is a file"
    elif kind == "under-file":
        out, needle = tmp_path / "f" / "sub", "is a file"
    elif os.geteuid() == 0:  # root writes anywhere on a normal file system: use a kernel one
        out, needle = Path("/sys/prunetune-test-out"), "cannot write in /sys"
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        out, needle = tmp_path / "ro" / "out", "cannot write in"
    _refused(capsys, _args(tmp_path / "no-such-model", data, out), tmp_path, needle)
    assert not Path(out).exists() or kind == "file"


def test_second_run_into_a_locked_output_dir_is_refused(work, capsys):
    tmp, model, data, out = work
    with open(out / RUN_MARKER, "a+") as held:  # another run holds the lock
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _refused(capsys, _args(model, data, out), tmp, "in use by another prunetune run")
    assert main(_args(model, data, out, "--max-steps", "3", "--set", "estimate.steps=1")) == 0  # free again


def test_overwrite_writes_into_a_foreign_folder(tmp_path, run):
    _root, model, data, _out = run
    project = tmp_path / "project"
    (project / "model").mkdir(parents=True)
    (project / "model" / "old.bin").write_text("replaced on request")
    (project / "notes.txt").write_text("mine")
    assert main(_args(model, data, project, "--max-steps", "3", "--set", "estimate.steps=1", "--overwrite")) == 0
    assert (project / "notes.txt").read_text() == "mine"
    assert (project / "model" / MANIFEST).is_file() and not (project / "model" / "old.bin").exists()


# ------------------------------------------------------------------------------------------ export target
def test_export_refuses_targets_it_would_destroy(tmp_path, run, capsys):
    _root, _model, _data, out = run
    src = tmp_path / "exp"
    shutil.copytree(out / "model", src)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    (tmp_path / "file.txt").write_text("mine")
    run_copy = tmp_path / "runcopy"
    shutil.copytree(out, run_copy)
    for target, needle in ((mine, "not a prunetune export"), (run_copy, "not a prunetune export"),
                           (tmp_path / "file.txt", "is a file"), (tmp_path / "file.txt" / "x", "is a file"),
                           (src / "again", "inside the export")):
        _refused(capsys, ["export", str(src), "--out", str(target)], tmp_path, needle)
    # an earlier export, or an empty folder, is replaced; a foreign folder only with --overwrite
    shutil.copytree(out / "model", tmp_path / "earlier")
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "earlier", tmp_path / "empty", src):
        assert main(["export", str(src), "--out", str(target)]) == 0
        prunetune.load(target)
    assert main(["export", str(run_copy), "--out", str(mine), "--overwrite"]) == 0
    assert not (mine / "thesis.tex").exists() and prunetune.load(mine).plan is not None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp or old folders left


def test_export_cleans_orphaned_temp_folders(tmp_path, run):
    _root, _model, _data, out = run
    orphan = tmp_path / ".again.x1y2z3w4.tmp"
    orphan.mkdir()
    (orphan / "model.safetensors").write_text("half-written")
    assert main(["export", str(out), "--out", str(tmp_path / "again")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]


# ----------------------------------------------------------------------------------------- malformed exports
def _reseal(folder: Path, rel: str | None = None) -> None:
    """Recompute the manifest checksums, so what is tested is the content check and not the checksum."""
    info = json.loads((folder / MANIFEST).read_text())
    for name in list(info["files"]):
        if (folder / name).is_file():
            info["files"][name] = sha256(folder / name)
    (folder / MANIFEST).write_text(json.dumps(info))


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _plan_edit(fn):
    return lambda folder: _edit_json(folder / "prunetune_plan.json", fn)


def _manifest_edit(fn):
    return lambda folder: _edit_json(folder / MANIFEST, fn)


def _truncate(folder: Path) -> None:
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _unlisted_weights(folder: Path) -> None:
    shutil.copy(folder / "model.safetensors", folder / "model-extra.safetensors")


def _pickled_adapter(folder: Path) -> None:
    """A listed (checksummed) adapter_model.bin: peft would torch.load it."""
    torch.save({"x": torch.zeros(1)}, folder / "adapter" / "adapter_model.bin")
    _edit_json(folder / MANIFEST, lambda m: m["files"].update({"adapter/adapter_model.bin": "0" * 64}))


MALFORMED = {
    "heads-out-of-range": (_plan_edit(lambda p: p["kept_heads"][0].append(99)), "outside"),
    "neurons-negative": (_plan_edit(lambda p: p["kept_neurons"][1].insert(0, -1)), "outside"),
    "missing-layer": (_plan_edit(lambda p: p["kept_heads"].pop()), "layers"),
    "negative-size": (_plan_edit(lambda p: p.update(intermediate_size=-4)), "intermediate_size"),
    "unsorted": (_plan_edit(lambda p: p["kept_neurons"][0].reverse()), "sorted"),
    "ranks-beyond-rank": (_plan_edit(lambda p: [v.append(1000) for v in p["peft_ranks"].values()]), "outside"),
    "plan-not-object": (lambda f: (f / "prunetune_plan.json").write_text("[1, 2]"), "pruning plan"),
    "no-file-list": (_manifest_edit(lambda m: m.pop("files")), "no list of files"),
    "entry-outside": (_manifest_edit(lambda m: m["files"].update({"../run/results.json": "0" * 64})), "outside"),
    "entry-absolute": (_manifest_edit(lambda m: m["files"].update({"/etc/hostname": "0" * 64})), "outside"),
    "peft-missing": (_manifest_edit(lambda m: m.pop("peft")), "peft"),
    "plan-unlisted": (_manifest_edit(lambda m: m["files"].pop("prunetune_plan.json")), "prunetune_plan.json"),
    "truncated-weights": (_truncate, "cannot be loaded"),
    "unlisted-weights": (_unlisted_weights, "not listed"),
    "pickled-adapter": (_pickled_adapter, "pickle-based"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_export_gives_one_clear_error(tmp_path, run, capsys, case):
    _root, _model, _data, out = run
    src = tmp_path / "exp"
    shutil.copytree(out / "model", src)
    damage, needle = MALFORMED[case]
    damage(src)
    if case not in ("entry-outside", "entry-absolute", "no-file-list"):
        _reseal(src)
    with pytest.raises(PrunetuneError, match=needle.replace("(", r"\(")):
        prunetune.load(src)
    _refused(capsys, ["export", str(src), "--out", str(tmp_path / "re")], tmp_path, needle)


@pytest.mark.parametrize("damage,needle", [
    (lambda f: (f / "state.json").write_text("[1, 2]"), "not a format-2"),
    (lambda f: (f / "state.json").write_text("{broken"), "corrupt"),
    (lambda f: (f / "state.json").write_text("[" * 100000 + "]" * 100000), "corrupt"),
    (lambda f: (f / "state.json").write_text(json.dumps(dict(json.loads((f / "state.json").read_text()),
                                                               fingerprint="x"))), "different configuration"),
    (lambda f: (f / "state.json").write_text(json.dumps(dict(json.loads((f / "state.json").read_text()),
                                                               payload={"p": {"$t": "nope"}}))), "corrupt"),
    (lambda f: (f / "tensors.safetensors").write_bytes((f / "tensors.safetensors").read_bytes()[:40]), "corrupt"),
])
def test_damaged_checkpoint_with_matching_checksums_is_refused(tmp_path, damage, needle):
    folder = tmp_path / "ck"
    save_checkpoint(folder, {"phase": "x", "w": torch.ones(3)}, {"a": 1})
    damage(folder)
    write_manifest(folder, {"kind": "checkpoint", "phase": "x"})  # checksums recomputed by whoever damaged it
    with pytest.raises(PrunetuneError, match=needle):
        load_checkpoint(folder, {"a": 1})
