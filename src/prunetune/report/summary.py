"""The vanilla-vs-Light-PEFT comparison table."""
from __future__ import annotations


def _metric(res: dict, metric: str, which: str) -> float | None:
    e = res.get(which)
    return None if not e else e.get(metric)


def summary_rows(results: dict) -> list[tuple[str, str, str, str]]:
    """(quantity, vanilla, light-peft, ratio) rows; vanilla columns empty when no baseline ran."""
    metric = results["task"]["metric"]
    light = results["light_peft"]
    van = results.get("vanilla") or {}

    def fmt(v, spec):
        return "" if v is None else format(v, spec)

    def ratio(a, b, spec=".2f"):
        return "" if not a or not b else format(a / b, spec) + "x"

    rows = [
        (f"dev {metric} (final epoch)", fmt(_metric(van, metric, "final"), ".4f"), fmt(_metric(light, metric, "final"), ".4f"), ""),
        (f"dev {metric} (best epoch)", fmt(_metric(van, metric, "best"), ".4f"), fmt(_metric(light, metric, "best"), ".4f"), ""),
        ("base params (body)", fmt(van.get("base_params", {}).get("body"), ","), fmt(light["base_params"]["body"], ","),
         f"{light['base_kept_pct']:.1f}% kept"),
        ("transformer-block params", fmt(van.get("base_params", {}).get("blocks"), ","),
         fmt(light["base_params"]["blocks"], ","), f"{light['block_kept_pct']:.1f}% kept"),
        ("trainable params (with head)", fmt(van.get("trainable_params"), ","), fmt(light["trainable_params"], ","), ""),
        ("trainable params (no head)", fmt(van.get("trainable_params_no_head"), ","),
         fmt(light["trainable_params_no_head"], ","), ""),
        ("train step (ms, fine-tune phase)", fmt(van.get("step_seconds", 0) * 1e3 or None, ".1f"),
         fmt(light["step_seconds"] * 1e3, ".1f"), ratio(van.get("step_seconds"), light["step_seconds"]) + " speedup" if van else ""),
        ("end-to-end train (s, incl. estimation)", fmt(van.get("train_seconds"), ".1f"), fmt(light["train_seconds"], ".1f"),
         ratio(van.get("train_seconds"), light["train_seconds"]) + " speedup" if van else ""),
        ("peak train memory (MB: weights+grads+optim+activations)", fmt(van.get("peak_mb"), ".0f"), fmt(light["peak_mb"], ".0f"),
         ratio(light["peak_mb"], van.get("peak_mb")) if van else ""),
        ("dev inference (s)", fmt(van.get("eval_seconds"), ".2f"), fmt(light["eval_seconds"], ".2f"),
         ratio(van.get("eval_seconds"), light["eval_seconds"]) + " speedup" if van else ""),
    ]
    pred, meas = light.get("predicted_step_speedup"), light.get("measured_step_speedup")
    if pred is not None:  # the cost model's prediction next to the measured step speedup
        rows.append(("train step speedup: predicted (cost model) / measured", "", f"{pred:.2f}x",
                     f"measured {meas:.2f}x" if meas is not None else "measured: run with --baseline"))
    for k, v in light["plan"].items():
        rows.append((k.replace("_", " "), "", v, ""))
    return rows


def summary_table(results: dict) -> str:
    rows = [("", "vanilla PEFT", "Light-PEFT", "ratio")] + summary_rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
