"""Causal-LM fine-tuning data: instruction rows (prompt/response) or plain text, tokenized for training on the
response only, padded with -100 labels, and evaluated as token-level dev loss / perplexity.

Row formats (jsonl/json/csv/tsv): `{"prompt": ..., "response": ...}` (trained on the response tokens only;
formatted with the tokenizer's chat template when it has one) or `{"text": ...}` (trained on every token).
`data.text_fields` may name other columns: two names = (prompt, response), one name = text.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from ..errors import PrunetuneError
from .base import EncodedDataset, Task
from .files import _read_file, _split_file

if TYPE_CHECKING:
    from ..config import DataConfig

IGNORE = -100  # label of tokens that do not count in the loss (prompt and padding)
CAUSAL_TASK = "causal_lm"


def is_causal_rows(rows: list[dict]) -> bool:
    return bool(rows) and "response" in rows[0] and "label" not in rows[0]


# ---------------------------------------------------------------- loading

def _fields(cfg: DataConfig) -> tuple[str, str, str]:
    names = list(cfg.text_fields or [])
    if len(names) > 2:
        raise PrunetuneError(f"task 'causal_lm' takes data.text_fields [prompt, response] or [text], got {names}")
    if len(names) == 2:
        return names[0], names[1], "text"
    if len(names) == 1:
        return "prompt", "response", names[0]
    return "prompt", "response", "text"


def _rows(path: Path, records, prompt_f: str, response_f: str, text_f: str) -> list[dict]:
    rows = []
    for where, rec in records:
        if response_f in rec:
            if prompt_f not in rec:
                raise PrunetuneError(f"malformed row in {where}: has '{response_f}' but no '{prompt_f}'")
            prompt, response = rec[prompt_f], rec[response_f]
            if not isinstance(prompt, str) or not isinstance(response, str) or not response.strip():
                raise PrunetuneError(f"malformed row in {where}: '{prompt_f}' and '{response_f}' must be strings "
                                     f"and the response must not be empty")
            rows.append({"prompt": prompt, "response": response})
        elif text_f in rec:
            text = rec[text_f]
            if not isinstance(text, str) or not text.strip():
                raise PrunetuneError(f"malformed row in {where}: '{text_f}' must be a non-empty string")
            rows.append({"prompt": None, "response": text})
        else:
            raise PrunetuneError(f"malformed row in {where}: needs '{prompt_f}' and '{response_f}', or '{text_f}' "
                                 f"(has {', '.join(map(str, rec)) or 'no fields'})")
    return rows


def load_causal(cfg: DataConfig):
    """(Task, train_rows, dev_rows) for `data.task: causal_lm`; rows are {"prompt": str | None, "response": str}."""
    prompt_f, response_f, text_f = _fields(cfg)
    splits = []
    for split in ("train", "dev"):
        path = _split_file(cfg, split, allow_any_ext=True)
        _columns, records = _read_file(path)
        splits.append(_rows(path, records, prompt_f, response_f, text_f))
    fields = [text_f] if len(cfg.text_fields or []) == 1 else [prompt_f, response_f]
    task = Task(CAUSAL_TASK, fields, 0, "perplexity", None, causal_lm=True)
    return task, splits[0], splits[1]


# ---------------------------------------------------------------- tokenization

def _chat_texts(tokenizer, prompt: str, response: str) -> tuple[str, str] | None:
    """(prompt text incl. the generation prompt, response text incl. end-of-turn) from the chat template,
    or None when the tokenizer has no template (or it does not render the prompt as a prefix)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    user = [{"role": "user", "content": prompt}]
    try:
        head = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
    except Exception as exc:  # noqa: BLE001 - a template that cannot render this row
        raise PrunetuneError(f"the tokenizer's chat template failed on a row: {exc}") from None
    if not isinstance(head, str) or not full.startswith(head):
        return None
    return head, full[len(head):]


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode_row(row: dict, tokenizer, max_length: int) -> dict:
    """input_ids, attention_mask and labels (= input ids, prompt tokens set to -100) for one row.

    Too-long rows keep the end of the prompt (next to the response) and at least half the budget for the
    response, which is cut at its end."""
    eos = tokenizer.eos_token_id
    if row.get("prompt") is None:  # plain text: train on everything
        ids = _ids(tokenizer, row["response"], True)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        ids = ids[:max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}
    chat = _chat_texts(tokenizer, row["prompt"], row["response"])
    if chat is not None:  # the template carries its own special tokens
        prompt_ids, response_ids = _ids(tokenizer, chat[0], False), _ids(tokenizer, chat[1], False)
    else:
        prompt_ids, response_ids = _ids(tokenizer, row["prompt"], True), _ids(tokenizer, row["response"], False)
        if eos is not None:
            response_ids.append(eos)
    if len(prompt_ids) + len(response_ids) > max_length:
        keep_r = min(len(response_ids), max(max_length - len(prompt_ids), max(1, max_length // 2)))
        keep_p = max_length - keep_r
        prompt_ids = prompt_ids[len(prompt_ids) - keep_p:] if keep_p else []
        response_ids = response_ids[:keep_r]
    ids = prompt_ids + response_ids
    return {"input_ids": ids, "attention_mask": [1] * len(ids),
            "labels": [IGNORE] * len(prompt_ids) + list(response_ids)}


def encode_causal(rows: list[dict], tokenizer, max_length: int):
    return EncodedDataset([encode_row(r, tokenizer, max_length) for r in rows])


def collate_causal(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input ids with pad_id, attention 0, labels -100."""
    width = max(len(f["input_ids"]) for f in features)
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for f in features:
        n = width - len(f["input_ids"])
        out["input_ids"].append(list(f["input_ids"]) + [pad_id] * n)
        out["attention_mask"].append(list(f.get("attention_mask") or [1] * len(f["input_ids"])) + [0] * n)
        out["labels"].append(list(f["labels"]) + [IGNORE] * n)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def make_causal_collate(tokenizer) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise PrunetuneError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first")
    return lambda features: collate_causal(features, pad)


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate_causal(model: torch.nn.Module, loader, device: torch.device, chunk: int = 8) -> dict[str, float]:
    """Token-level dev loss (mean NLL of the label tokens, next-token shifted) and perplexity = exp(loss).
    Batches are run `chunk` rows at a time so that the (rows x length x vocab) logits stay small."""
    model.eval()
    nll, tokens = 0.0, 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        for i in range(0, labels.shape[0], chunk):
            part = {k: v[i:i + chunk] for k, v in batch.items()}
            logits = model(**part).logits[:, :-1].float()
            target = labels[i:i + chunk, 1:]
            nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                           ignore_index=IGNORE, reduction="sum"))
            tokens += int((target != IGNORE).sum())
    loss = nll / max(1, tokens)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
