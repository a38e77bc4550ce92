"""prunetune: cheaper parameter-efficient fine-tuning by pruning (Light-PEFT, PrunePEFT)."""
from .config import LightPeftConfig, PrunePeftConfig, RunConfig, load_config
from .errors import PrunetuneError
from .export import load, save_export
from .plan import PruningPlan

__version__ = "0.1.0"
__all__ = ["RunConfig", "LightPeftConfig", "PrunePeftConfig", "load_config", "PrunetuneError", "load", "save_export", "PruningPlan", "light_peft"]


def light_peft(config: RunConfig | dict | None = None, **overrides) -> dict:
    """Run Light-PEFT. `config`: RunConfig or nested dict; overrides: dotted keys, e.g. prune__heads=0.5."""
    from .config import from_dict, set_dotted
    from .methods.light_peft import run

    if isinstance(config, RunConfig):
        config = config.to_dict()
    data = dict(config or {})
    for key, value in overrides.items():
        set_dotted(data, key.replace("__", "."), value)
    return run(from_dict(data))
