"""Model card written next to an export: what was pruned, how it was trained, how to load it."""
from __future__ import annotations

from ..plan import PruningPlan


def model_card(plan: PruningPlan, task: dict, result: dict | None = None, method: str = "Light-PEFT") -> str:
    s = plan.summary()
    heads = [len(k) * plan.heads_per_unit for k in plan.kept_heads]
    neurons = [len(k) for k in plan.kept_neurons]
    unit = "KV groups of " + str(plan.heads_per_unit) + " query heads" if plan.heads_per_unit > 1 else "heads"
    lines = [
        f"# {plan.model_type or plan.family} pruned with prunetune ({method})", "",
        f"Task: **{task.get('name', '?')}** ({task.get('num_labels', '?')} labels, metric {task.get('metric', '?')}).", "",
        "## What was pruned", "",
        f"- Attention heads kept: {s['heads_kept']} (pruned as {unit}); per layer: {heads}",
        f"- FFN neurons kept: {s['neurons_kept']}; per layer: {neurons}",
        f"- PEFT modules kept: {s['peft_modules_kept']}, ranks kept: {s['peft_ranks_kept']}",
    ]
    if plan.peft_ranks:
        lines += ["", "| PEFT module | kept ranks / units |", "|---|---|"]
        lines += [f"| `{name}` | {len(kept)} of {plan.peft_orig_ranks.get(name, len(kept))} |"
                  for name, kept in sorted(plan.peft_ranks.items())]
    if result:
        metric = task.get("metric")
        final, best = (result.get("final") or {}).get(metric), (result.get("best") or {}).get(metric)
        lines += ["", "## Results", ""]
        if final is not None:
            lines.append(f"- dev {metric}: final epoch {final:.4f}, best epoch {best:.4f}")
        if "trainable_params_no_head" in result:
            lines.append(f"- trainable parameters: {result['trainable_params_no_head']:,} (without the task head)")
        if "base_kept_pct" in result:
            lines.append(f"- base parameters kept: {result['base_kept_pct']:.1f}% "
                         f"(transformer blocks: {result['block_kept_pct']:.1f}%)")
    lines += ["", "## Loading", "", "```python", "import prunetune", "loaded = prunetune.load(\"<this folder>\")",
              "model, tokenizer = loaded.model, loaded.tokenizer", "```", "",
              "`prunetune_plan.json` lists every kept head unit, neuron and rank; `prunetune.json` holds checksums."]
    return "\n".join(lines) + "\n"
