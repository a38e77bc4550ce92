"""Regenerate the bundled SST-2 sample: 4000 train rows (random.Random(0).sample) + all 872 dev rows verbatim.

Usage: python scripts/make_sst2_sample.py [GLUE_SST2_DIR]   (default: ../shared/data/SST-2 next to the repo)
"""
import random
import sys
from pathlib import Path

root = Path(__file__).resolve().parents[1]
src = Path(sys.argv[1]) if len(sys.argv) > 1 else root.parent / "shared" / "data" / "SST-2"
dst = root / "src" / "prunetune" / "data" / "sst2_sample"
dst.mkdir(parents=True, exist_ok=True)

header, *rows = (src / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
assert header.strip() == "sentence\tlabel", f"unexpected header {header!r}"
rows = [r if r.endswith("\n") else r + "\n" for r in rows if r.strip()]
(dst / "train.tsv").write_text(header + "".join(random.Random(0).sample(rows, 4000)), encoding="utf-8")
(dst / "dev.tsv").write_bytes((src / "dev.tsv").read_bytes())
print(f"wrote {dst}/train.tsv (4000 rows) and dev.tsv")
