"""report.md of a PrunePEFT search: which unit survived at which layer, and in which round the others went."""
from __future__ import annotations

from pathlib import Path

from ..io import atomic_write_text
from ..scores.proxy import TURNED


def _type_layer(name: str) -> tuple[str, int]:
    """"lora_qv@3" or a rank-granular chunk "lora_qv@3#1" -> ("lora_qv", 3)."""
    t, _, rest = name.partition("@")
    return t, int(rest.partition("#")[0])


def unit_grid(results: dict) -> tuple[list[str], int, dict[tuple[str, int], str]]:
    """(unit types, layers, cell per (type, layer)): 'kept', 'kept, width W' (budget fill, or in a rank-granular
    search the ranks its kept chunks add up to) or 'round N' (the round its last unit / chunk went)."""
    cells: dict[tuple[str, int], str] = {}
    chunks: dict[tuple[str, int], set] = {}
    for rd in results["rounds"]:
        for name in rd["removed"]:
            cells[_type_layer(name)] = f"round {rd['round']}"
            chunks.setdefault(_type_layer(name), set()).add(name)
    fill = results.get("fill") or {}
    chunk = results["config"]["search"].get("chunk")
    kept: dict[tuple[str, int], list[int | None]] = {}
    for name in results["structure"]["units"]:
        kept.setdefault(_type_layer(name), []).append(fill.get(name))
        chunks.setdefault(_type_layer(name), set()).add(name)
    for key, widths in kept.items():
        if chunk is None:
            cells[key] = f"kept, width {widths[0]}" if widths[0] is not None else "kept"
        else:
            width = sum(chunk if w is None else w for w in widths)
            whole = all(w is None for w in widths) and len(widths) == len(chunks[key])
            cells[key] = "kept" if whole else f"kept, width {width}"
    space = results["config"]["search"]["space"]
    types = sorted({t for t, _ in cells}, key=space.index)
    return types, 1 + max(layer for _, layer in cells), cells


def _plot(out: Path, types: list[str], layers: int, cells: dict, rounds: int) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.full((len(types), layers), np.nan)
    for (t, layer), cell in cells.items():
        grid[types.index(t), layer] = 0 if cell.startswith("kept") else int(cell.split()[1])
    fig, ax = plt.subplots(figsize=(max(5, layers * 0.6), 1.2 + 0.5 * len(types)))
    ax.imshow(grid, cmap="RdYlGn_r", vmin=0, vmax=max(1, rounds), aspect="auto")
    for (t, layer), cell in cells.items():
        label = "kept" if cell == "kept" else cell.replace("kept, width ", "w").replace("round ", "r")
        ax.text(layer, types.index(t), label, ha="center", va="center", fontsize=7)
    ax.set_xticks(range(layers))
    ax.set_yticks(range(len(types)), types)
    ax.set_xlabel("layer")
    ax.set_title("PEFT units: kept (wN: at width N), or rN: removed in round N", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "units.png", dpi=90)
    plt.close(fig)
    return "units.png"


def write_search_report(out: str | Path, results: dict) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    types, layers, cells = unit_grid(results)
    rt, sc, metric = results["retrain"], results["search_cost"], results["task"]["metric"]
    lines = ["# prunetune search report", "",
             f"Task: **{results['task']['name']}**, model: `{results['config']['model']['name_or_path']}`", "",
             f"- supernet {results['supernet_params']:,} PEFT parameters -> budget {results['budget_params']:,} -> "
             f"found {rt['trainable_params_no_head']:,} (task head excluded)",
             f"- search {sc['steps']} steps / {sc['seconds']:.1f} s = {sc['ratio_steps']:.2f}x the retrain's steps, "
             f"{sc['ratio_seconds']:.2f}x its seconds (evaluation excluded on both sides)",
             f"- with the warm-up ({sc['warmup_steps']} steps, {'cached' if sc['warmup_cached'] else 'run here'}): "
             f"{sc['ratio_steps_with_warmup']:.2f}x the retrain's steps; its share amortised over the "
             f"{sc['warmup_tasks']} task(s) that used it: {sc['ratio_steps_amortised']:.2f}x",
             f"- retrained dev {metric}: final {rt['final'][metric]:.4f}, best {rt['best'][metric]:.4f}"]
    if results.get("fill"):
        lines.append("- budget fill: " + ", ".join(f"{u} back at width {w}" for u, w in results["fill"].items()) +
                     " (removed in the last round; the rest of the budget at a smaller rank / bottleneck)")
    drawn = [f"{u} (round {rd['round']})" for rd in results["rounds"] for u in rd.get("drawn", [])]
    if drawn:
        lines.append("- removed by a random draw (no criterion of its block could rank it): " + ", ".join(drawn))
    if results.get("plan"):
        lines.append("- foundation pruned in the same run: " +
                     ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in results["plan"].items()))
    lines += ["", "| unit | " + " | ".join(f"layer {i}" for i in range(layers)) + " |",
              "|---|" + "---|" * layers]
    lines += [f"| {t} | " + " | ".join(cells.get((t, i), "") for i in range(layers)) + " |" for t in types]
    mapping = (results.get("warmup") or {}).get("mapping")
    if mapping:
        lines += ["", "## Criteria per block (warm-up)", "", "| block | criteria |", "|---|---|"]
        lines += [f"| {b} | {', '.join(c)} |" for b, c in sorted(mapping.items())]
    lines += _prediction_lines(results.get("warmup") or {})
    png = _plot(out, types, layers, cells, len(results["rounds"]))
    lines += ["", "## Units", "", f"![units]({png})"]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _prediction_lines(wu: dict) -> list[str]:
    """search.warmup_by=prediction: how well each criterion predicted the held-out drop_loss proxy, over all
    alive units (Spearman) and per block (agreement of percentiles: 1 = same ranking, 2/3 = unrelated)."""
    rho, agree, negative = wu.get("spearman"), wu.get("agreement"), wu.get("drop_loss_negative")
    if not rho and not negative:
        return []
    lines = ["", "## How well each criterion predicts drop_loss (warm-up)"]
    if rho:
        crits = sorted(rho, key=lambda c: -rho[c])
        lines += ["", "Spearman correlation with the held-out loss increase when a unit is dropped, mean over the "
                  "warm-up's rounds where the proxy had not turned, and per block the percentile agreement the "
                  "mapping was chosen by (1 = same ranking, 0.67 = unrelated).", "",
                  "| | " + " | ".join(crits) + " |", "|---|" + "---|" * len(crits),
                  "| Spearman (all units) | " + " | ".join(f"{rho[c]:+.2f}" for c in crits) + " |"]
        for b in sorted(agree or {}):
            lines.append(f"| {b} | " + " | ".join(f"{agree[b][c]:.2f}" if c in agree[b] else "" for c in crits)
                         + " |")
    if negative:  # the proxy's health: removals that LOWER the held-out loss mean an over-fitted supernet
        lines += ["", "Units whose removal lowers the held-out loss, per warm-up round: "
                  + ", ".join(f"{v:.0%}" for v in negative)
                  + (f" (the warm-up trained on {wu['rows']} rows, {wu['epochs']:.2f} epochs)" if wu.get("rows") else "")
                  + (f". Rounds above {TURNED:.0%} rank units backwards and are left out of the mapping (rounds used: "
                     + (", ".join(map(str, wu.get("rounds_used") or [])) or "none: every block keeps search.criteria")
                     + ")." if any(v > TURNED for v in negative) else ".")]
    return lines
