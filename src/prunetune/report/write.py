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
    for name, orig in plan.peft_orig_ranks.items():
        role = name.rsplit(".", 1)[-1]
        roles.setdefault(role, [0] * plan.num_layers)
    for name, kept_ranks in plan.peft_ranks.items():
        layer = next((int(p) for p in name.split(".") if p.isdigit()), 0)
        roles[name.rsplit(".", 1)[-1]][layer] += len(kept_ranks)
    if roles:
        fig, ax = plt.subplots(figsize=(6, 3))
        width = 0.8 / len(roles)
        for i, (role, counts) in enumerate(sorted(roles.items())):
            ax.bar(np.arange(plan.num_layers) + i * width, counts, width, label=role)
        ax.set_xlabel("layer")
        ax.set_ylabel("kept ranks / adapter units")
        ax.legend(fontsize=7, ncol=2)
        figs.append(("PEFT ranks kept per layer and module", _save(fig, out / "peft.png")))

    light = results["light_peft"]
    if light.get("loss_curve") or light.get("mask_curve"):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3))
        lc = light.get("loss_curve", [])
        a1.plot([p["step"] for p in lc], [p["loss"] for p in lc], label="Light-PEFT")
        vc = (results.get("vanilla") or {}).get("loss_curve", [])
        if vc:
            a1.plot([p["step"] for p in vc], [p["loss"] for p in vc], label="vanilla", alpha=0.7)
        a1.axvline(light["estimation_steps"], color="grey", ls="--")
        a1.set_title("training loss (dashed: pruning)")
        a1.legend()
        mc = light.get("mask_curve", [])
        a2.plot([p["step"] for p in mc], [p["heads_mean"] for p in mc], label="head masks (mean)")
        a2.plot([p["step"] for p in mc], [p["ffn_mean"] for p in mc], label="FFN masks (mean)")
        a2.set_title("masks during estimation")
        a2.legend()
        figs.append(("Loss and mask curves", _save(fig, out / "curves.png")))
    return figs


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
    for title, png in _plots(out, results, plan):
        lines += ["", f"## {title}", "", f"![{title}]({png})"]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
