"""report.md with plots of what was pruned (matplotlib, PNG)."""
from __future__ import annotations

from pathlib import Path

from ..io import atomic_write_text
from ..plan import PruningPlan
from .summary import summary_rows


def _plots(out: Path, results: dict, plan: PruningPlan) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figs = []
    kept = np.zeros((plan.num_layers, plan.num_units))
    for layer, units in enumerate(plan.kept_heads):
        kept[layer, units] = 1
    fig, ax = plt.subplots(figsize=(max(4, plan.num_units * 0.4), max(2.5, plan.num_layers * 0.35)))
    ax.imshow(kept, cmap="Greens", vmin=0, vmax=1, aspect="auto")
    ax.set_xlabel("head unit (KV group on GQA)" if plan.heads_per_unit > 1 else "head")
    ax.set_ylabel("layer")
    ax.set_title("kept attention heads (green)")
    figs.append(("Kept heads per layer", _save(fig, out / "heads.png")))

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(range(plan.num_layers), [len(k) for k in plan.kept_neurons], color="tab:green", label="kept")
    ax.axhline(plan.intermediate_size, color="grey", ls="--", label="original")
    ax.set_xlabel("layer")
    ax.set_ylabel("FFN neurons")
    ax.legend()
    figs.append(("Kept FFN neurons per layer", _save(fig, out / "ffn.png")))

    roles: dict[str, list[int]] = {}
    for name in plan.peft_orig_ranks:
        roles.setdefault(peft_role(plan, name)[1], [0] * plan.num_layers)
    for name, kept_ranks in plan.peft_ranks.items():
        layer, role = peft_role(plan, name)
        roles[role][layer] += len(kept_ranks)
    if roles:
        fig, ax = plt.subplots(figsize=(6, 3))
        width = 0.8 / len(roles)
        for i, (role, counts) in enumerate(sorted(roles.items(), key=lambda kv: _ROLE_ORDER.get(kv[0], 99))):
            ax.bar(np.arange(plan.num_layers) + i * width, counts, width, label=role)
        ax.set_xlabel("layer")
        ax.set_ylabel("kept ranks / adapter units")
        ax.legend(fontsize=7, ncol=2)
        figs.append(("PEFT ranks kept per layer and module", _save(fig, out / "peft.png")))

    light = results["light_peft"]
    if light.get("loss_curve") or light.get("mask_curve"):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3))
        lc = light.get("loss_curve", [])
        # the task loss: during estimation the optimised loss also holds the L1 mask term, which is not comparable
        a1.plot([p["step"] for p in lc], [p.get("task_loss", p["loss"]) for p in lc], label="Light-PEFT")
        vc = (results.get("vanilla") or {}).get("loss_curve", [])
        if vc:
            a1.plot([p["step"] for p in vc], [p.get("task_loss", p["loss"]) for p in vc], label="vanilla", alpha=0.7)
        a1.axvline(light["estimation_steps"], color="grey", ls="--")
        a1.set_title("task loss (dashed: pruning)")
        a1.legend()
        mc = light.get("mask_curve", [])
        a2.plot([p["step"] for p in mc], [p["heads_mean"] for p in mc], label="head masks (mean)")
        a2.plot([p["step"] for p in mc], [p["ffn_mean"] for p in mc], label="FFN masks (mean)")
        a2.set_title("masks during estimation")
        a2.legend()
        figs.append(("Loss and mask curves", _save(fig, out / "curves.png")))
    return figs


_ROLE_ORDER = {r: i for i, r in enumerate(("q", "k", "v", "qkv", "o", "gate", "up", "down"))}


def peft_role(plan: PruningPlan, name: str) -> tuple[int, str]:
    """(layer, canonical role) of a PEFT module: from the plan's meta (written from the arch descriptor);
    older plans fall back to the layer number and last component of the module name."""
    known = (plan.meta or {}).get("peft_roles", {}).get(name)
    if known:
        return int(known[0]), str(known[1])
    return next((int(p) for p in name.split(".") if p.isdigit()), 0), name.rsplit(".", 1)[-1]


_TYPE_LABELS = {"heads": "attention head units", "neurons": "FFN neurons", "modules": "PEFT modules (with ranks)",
                "ranks": "PEFT ranks (kept modules)", "backward cut": "backward below the cut (+ interactions)"}


def allocation_lines(results: dict, plan: PruningPlan) -> list[str]:
    """The allocation: per unit type the Taylor loss estimate spent against the predicted step time saved,
    what went in which layer, and predicted vs measured speed."""
    alloc = (plan.meta or {}).get("allocation")
    if not alloc:
        return []
    target = (plan.meta or {}).get("target")
    light = results["light_peft"]
    if target:
        goal = f"step speedup {target['speedup']}x" if target.get("speedup") else \
            f"base parameters kept {target['params']}"
        mode = f"target mode ({goal}; heads, neurons, modules and ranks chosen jointly)"
    else:
        mode = "fixed ratios (the paper's prune.heads / ffn / modules / ranks)"
    meas = light.get("measured_step_speedup")
    lines = ["", "## Allocation", "", f"Mode: {mode}.", "",
             f"Predicted step speedup {alloc['predicted_speedup']:.2f}x (cost model, rates: "
             f"{alloc['prediction']['rates']}); measured "
             + (f"{meas:.2f}x against the vanilla run." if meas is not None else "- (no --baseline run)."),
             f"Lowest block that keeps a trainable module: {alloc['cut_block']} of {2 * plan.num_layers} "
             "(block 2l = attention of layer l, 2l+1 = its FFN); no backward runs below it.", "",
             "| unit type | removed | predicted loss cost (sum of Taylor scores) | predicted step time saved | "
             "loss per 1% of step saved |", "|---|---|---|---|---|"]
    for key, r in alloc["types"].items():
        per = f"{r['loss'] / (100 * r['saved']):.3g}" if r["saved"] > 0 and key != "backward cut" else ""
        removed = f"{r['removed']} of {r['of']} blocks" if key == "backward cut" else f"{r['removed']} of {r['of']}"
        loss = "" if key == "backward cut" else f"{r['loss']:.4g}"
        lines.append(f"| {_TYPE_LABELS.get(key, key)} | {removed} | {loss} | {100 * r['saved']:.1f}% | {per} |")
    lines += ["", "| layer | heads removed | FFN neurons removed | PEFT modules removed | "
              "ranks removed (kept modules) |", "|---|---|---|---|---|"]
    for row in alloc["layers"]:
        mods = ", ".join(sorted(row["modules_removed"], key=lambda r: _ROLE_ORDER.get(r, 99))) or "-"
        lines.append(f"| {row['layer']} | {row['heads_removed'] * plan.heads_per_unit} | {row['neurons_removed']} | "
                     f"{mods} | {row['ranks_removed']} |")
    return lines


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


def write_report(out: str | Path, results: dict, plan: PruningPlan) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# prunetune run report", "", f"Task: **{results['task']['name']}**, model: "
             f"`{results['config']['model']['name_or_path']}`", "",
             "| quantity | vanilla PEFT | Light-PEFT | ratio |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in summary_rows(results)]
    lines += allocation_lines(results, plan)
    for title, png in _plots(out, results, plan):
        lines += ["", f"## {title}", "", f"![{title}]({png})"]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
