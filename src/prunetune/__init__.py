"""prunetune: cheaper parameter-efficient fine-tuning by pruning (Light-PEFT, PrunePEFT)."""
from .config import LightPeftConfig, PrunePeftConfig, RunConfig, load_config
from .errors import PrunetuneError
from .export import load, save_export
from .export.load import AutoPrunedModel
from .plan import PruningPlan, Scores

__version__ = "0.1.0"
__all__ = ["RunConfig", "LightPeftConfig", "PrunePeftConfig", "load_config", "PrunetuneError", "load", "save_export", "PruningPlan", "Scores", "light_peft",
           "light_peft_model", "with_peft", "LightPeftCallback", "LightResult", "AutoPrunedModel", "prune_peft",
           "prune_peft_model", "PruneResult"]


def __getattr__(name: str):
    """The training entry points import torch-heavy modules: loaded on first use."""
    if name in ("light_peft_model", "with_peft", "LightResult"):
        from .methods import light_peft as _lp

        return getattr(_lp, name)
    if name in ("prune_peft_model", "PruneResult"):
        from .methods import prune_peft as _pp

        return getattr(_pp, name)
    if name == "LightPeftCallback":
        from .integrations.trainer import LightPeftCallback

        return LightPeftCallback
    raise AttributeError(f"module 'prunetune' has no attribute {name!r}")


def light_peft(config: RunConfig | dict | None = None, **overrides) -> dict:
    """Run Light-PEFT from paths (model and data as the config names them; writes cfg.output_dir) and return
    its results dict. `config`: RunConfig or nested dict; overrides: dotted keys, e.g. prune__heads=0.5.
    On model objects: `light_peft_model`; in a transformers Trainer: `LightPeftCallback`."""
    from .config import run_config
    from .methods.light_peft import run

    return run(run_config(config, overrides))


def prune_peft(config: RunConfig | dict | None = None, **overrides) -> dict:
    """Run PrunePEFT from paths (model and data as the config names them; writes cfg.output_dir: the found
    structure, lora_config.json for LoRA-only structures, the retrained export, results and report) and return
    its results dict. On model objects: `prune_peft_model`."""
    from .config import run_config
    from .methods.prune_peft import run

    return run(run_config(config, overrides))
