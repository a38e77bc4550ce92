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
