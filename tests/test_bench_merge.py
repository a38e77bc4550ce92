"""benchmarks/light_peft.py --merge: runs of other seeds joined into one evidence file (committed rows as input)."""
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import light_peft  # noqa: E402  (benchmarks/light_peft.py)

FILES = [str(BENCH / "results" / f"light_smollm_causal_lrx2_seed{s}.json") for s in (42, 43)]


def test_merge_recomputes_the_paired_summary_over_all_seeds(tmp_path):
    out = tmp_path / "merged.json"
    assert light_peft.merge_json(FILES, str(out), ["--merge", ",".join(FILES)]) == 0
    merged = json.loads(out.read_text())
    rows = [json.loads(Path(f).read_text())["rows"][0] for f in FILES]
    diffs = [r["light_final"] - r["vanilla_final"] for r in rows]
    s = merged["summary"]
    assert s["seeds"] == [42, 43] and len(merged["rows"]) == 2
    assert s["paired_diff_mean"] == pytest.approx(sum(diffs) / 2)
    lo, hi = s["paired_diff_ci95"]
    assert lo < s["paired_diff_mean"] < hi  # two seeds: an interval exists (one seed has none)
    assert merged["sources"] == [json.loads(Path(f).read_text())["command"] for f in FILES]


def test_merge_refuses_a_seed_twice_and_needs_an_output(tmp_path):
    with pytest.raises(SystemExit, match="more than one file"):
        light_peft.merge_json([FILES[0], FILES[0]], str(tmp_path / "m.json"), [])
    with pytest.raises(SystemExit, match="needs --json"):
        light_peft.merge_json(FILES, None, [])


def test_prune_peft_progress_continues_a_seed_and_refuses_other_settings(tmp_path):
    """benchmarks/prune_peft.py keeps a seed's finished trainings in progress.json, so a seed cut short goes on
    where it stopped; a file from other settings is refused instead of mixed into the evidence."""
    import argparse

    import prune_peft  # noqa: E402  (benchmarks/prune_peft.py)

    args = argparse.Namespace(out=str(tmp_path), model="minilm", data_root="d", train_samples=2000, eval_samples=None,
                              max_length=64, epochs=3.0, batch_size=32, lr=1e-3, space=["lora_qv", "lora_ko"], k=0.5,
                              chunk=4, data_fraction=0.1, budget="fixed", fixed="each", common={"search.k": 0.5})
    first = prune_peft.Progress(args, "stsb", 42)
    assert first.data["select"] == {} and first.data["rows"] == {} and not first.path.exists()
    first.data["select"]["lora_qv-everywhere"] = 0.41
    first.data["rows"]["lora_ko-everywhere"] = {"config": "lora_ko-everywhere", "final": 0.83, "units": None}
    first.save()
    again = prune_peft.Progress(args, "stsb", 42)
    assert again.data == first.data  # the next run starts from what the first finished
    assert prune_peft.Progress(args, "stsb", 43).data["rows"] == {}  # another seed: its own file
    args.lr = 2e-3
    with pytest.raises(SystemExit, match="other settings"):
        prune_peft.Progress(args, "stsb", 42)


def test_levers_paired_takes_its_speedups_from_a_quiet_timed_run(tmp_path):
    """levers_paired.py --timed: the screens are not timed, so the summary's step / end-to-end speedups come
    from the named quiet run of the same plan (and stay null without it)."""
    import levers_paired  # noqa: E402  (benchmarks/levers_paired.py)

    timed = BENCH / "results" / "light_sst2_8k_t175_e2e42.json"
    args = ["vanilla", "t175-f50m30-lrx2-8k", "42,43,44"]
    for extra in ([], ["--timed", str(timed)]):
        out = tmp_path / f"paired{len(extra)}.json"
        assert levers_paired.main([*args, *extra, "--json", str(out)]) == 0
        s = json.loads(out.read_text())["summary"]
        assert s["seeds"] == [42, 43, 44] and s["paired_diff_ci95"][0] < s["paired_diff_mean"]
        if extra:
            t = json.loads(timed.read_text())["summary"]
            assert (s["step_speedup_mean"], s["e2e_speedup_mean"]) == (t["step_speedup_mean"], t["e2e_speedup_mean"])
            assert s["timed_seeds"] == [42] and "timed quietly" in s["note"]
        else:
            assert s["step_speedup_mean"] is None and s["e2e_speedup_mean"] is None


def test_smollm_pairs_with_a_committed_vanilla_side_only_under_the_same_schedule():
    """benchmarks/smollm.py --vanilla-from: the Light-PEFT side alone, paired with a seed's vanilla side from an
    earlier run whose vanilla-changing options match (checked on its recorded command); speed ratios stay None
    and the summaries and tables say n/a instead of mixing two processes' timings."""
    import smollm  # noqa: E402  (benchmarks/smollm.py)

    src = json.loads(Path(FILES[0]).read_text())
    args = smollm.parse_args(smollm.parser(), src["command"].split()[2:])
    args.common["prune.reconstruct"] = True  # a Light-PEFT option: vanilla is still the pair
    van = smollm.reused_vanilla([FILES[0]], "causal", 42, 128, args, "cpu")
    assert van["vanilla_final"] == src["rows"][0]["vanilla_final"] and van["vanilla_from"] == FILES[0]
    with pytest.raises(SystemExit, match="no causal row of seed 43"):
        smollm.reused_vanilla([FILES[0]], "causal", 43, 128, args, "cpu")
    with pytest.raises(SystemExit, match=r"differs on \['device'\]"):  # another device: another vanilla run
        smollm.reused_vanilla([FILES[0]], "causal", 42, 128, args, "cuda:0")
    merged = str(BENCH / "results" / "light_smollm_causal_lrx2.json")
    with pytest.raises(SystemExit, match="is a merged file"):
        smollm.reused_vanilla([merged], "causal", 42, 128, args, "cpu")
    args.common["train.warmup_ratio"] = 0.3  # reaches the vanilla side too
    with pytest.raises(SystemExit, match=r"differs on \['--set"):
        smollm.reused_vanilla([FILES[0]], "causal", 42, 128, args, "cpu")
    del args.common["train.warmup_ratio"]
    args.lr = 1e-3  # another schedule: that vanilla run is no longer the pair
    with pytest.raises(SystemExit, match=r"differs on \['lr'\]"):
        smollm.reused_vanilla([FILES[0]], "causal", 42, 128, args, "cpu")
    row = {**src["rows"][0], **van, "step_speedup": None, "e2e_speedup": None, "memory_ratio": None,
           "inference_speedup": None}
    s = light_peft.summarize([row], "smollm2")
    assert s["step_speedup_mean"] is None and s["memory_ratio_mean"] is None
    assert s["paired_diff_mean"] == pytest.approx(row["light_final"] - row["vanilla_final"])
    assert "n/a" in light_peft.table([row]) and "n/a / n/a" in light_peft.seed_table([s])
