"""Model card written next to an export: Hub front matter (YAML metadata), what was pruned, how it was
trained, how to load it.

`library_name` is `prunetune`: an export's pruned shapes (per-layer head / neuron counts, LoRA in `adapter/`, or
bottleneck adapters) load through `prunetune.load`, not through plain peft (peft would need the adapter at the
top level and a base model that from_pretrained rebuilds). save_export switches it to `transformers` for the one
case that does load without prunetune: a merged export whose config expresses the pruned shape
(`plain_from_pretrained`).
"""
from __future__ import annotations

import re

import yaml

from ..plan import PruningPlan

GLUE_TASKS = {"sst2", "cola", "rte", "stsb", "mrpc", "qqp", "qnli", "mnli", "wnli"}
HUB_METRICS = {"matthews": "matthews_correlation", "pearson": "pearsonr", "spearman": "spearmanr"}
METHOD_TAGS = {"Light-PEFT": "light-peft", "PrunePEFT": "prune-peft", "PEFT": "peft"}


def _dataset(task_name: str) -> tuple[str | None, str | None]:
    """(hub dataset id, config) of a task: GLUE tasks and `datasets` names ("glue/sst2"); None for local files."""
    name = (task_name or "").strip()
    if name.lower() in GLUE_TASKS:
        return "nyu-mll/glue", name.lower()
    if "/" in name:
        repo, _, config = name.rpartition("/")
        return ("nyu-mll/glue" if repo == "glue" else repo), config or None
    return None, None


def front_matter(plan: PruningPlan, task: dict, result: dict | None = None, method: str = "Light-PEFT",
                 base_model: str | None = None) -> dict:
    """The Hub metadata of an export's card (base_model, library_name, tags, datasets, metrics, model-index)."""
    causal = task.get("name") == "causal_lm" or task.get("metric") in ("loss", "perplexity")
    pipeline = "text-generation" if causal else "text-classification"
    kinds = {"lora": ["lora"], "adapter": ["adapter"]}.get(plan.peft_kind, [])
    meta: dict = {}
    if base_model:
        meta["base_model"] = base_model
    meta["library_name"] = "prunetune"
    meta["pipeline_tag"] = pipeline
    meta["tags"] = ["prunetune", METHOD_TAGS.get(method, method.lower()), "pruning", "peft", *kinds]
    dataset, config = _dataset(task.get("name", ""))
    if dataset:
        meta["datasets"] = [dataset]
    metric = task.get("metric")
    if metric:
        meta["metrics"] = [HUB_METRICS.get(metric, metric)]
    final = ((result or {}).get("final") or {}).get(metric) if metric else None
    if final is not None:
        ds = {"name": task.get("name"), "type": dataset or task.get("name"), "split": "validation"}
        if config:
            ds["config"] = config
        meta["model-index"] = [{"name": f"{task.get('name')}-{METHOD_TAGS.get(method, 'prunetune')}", "results": [{
            "task": {"type": pipeline}, "dataset": ds,
            "metrics": [{"type": HUB_METRICS.get(metric, metric), "value": round(float(final), 6),
                         "name": f"dev {metric}"}]}]}]
    return meta


_FRONT = re.compile(r"\A---\n(.*?)\n---\n", re.S)


def read_front_matter(card: str) -> dict:
    """The YAML block at the top of a card ({} when there is none)."""
    m = _FRONT.match(card or "")
    return (yaml.safe_load(m.group(1)) or {}) if m else {}


def with_front_matter(card: str, **fields) -> str:
    """The card with these front-matter fields set (a front matter is added when there is none)."""
    m = _FRONT.match(card or "")
    meta = {**read_front_matter(card), **fields}
    body = card[m.end():] if m else (card or "")
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n" + body


def model_card(plan: PruningPlan, task: dict, result: dict | None = None, method: str = "Light-PEFT", *,
               base_model: str | None = None) -> str:
    """README.md of an export. base_model: the model name as configured (a hub id or alias goes into the
    front matter; a local path does not)."""
    from ..models import hub_id

    meta = front_matter(plan, task, result, method, hub_id(base_model) if base_model else None)
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
    return with_front_matter("\n".join(lines) + "\n", **meta)
