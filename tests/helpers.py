"""Shared test utilities (no network): a tiny BERT-style tokenizer trained in-process."""
from __future__ import annotations

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4
DEFAULT_TEXTS = [
    "a charming and often affecting journey",
    "the movie was good and the actors were great",
    "the plot is bad , boring and too long",
    "it is not a film i would watch again",
    "one of the best films of the year .",
    "A man is playing a flute . A plane is taking off .",
]


def make_tokenizer(vocab_texts: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Lower-cased whitespace WordLevel tokenizer; adds [CLS]/[SEP] and token_type_ids (1 for the pair's 2nd part)."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(vocab_texts or DEFAULT_TEXTS, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_input_names=["input_ids", "token_type_ids", "attention_mask"])
