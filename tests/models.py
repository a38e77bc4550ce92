"""Tiny random models of every supported family, built from configs (no downloads)."""
from __future__ import annotations

import torch
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification,
                          LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, OPTConfig,
                          OPTForSequenceClassification)

VOCAB = 64


def tiny(family: str, num_labels: int = 2, causal_lm: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    if family == "bert":
        cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, max_position_embeddings=64, num_labels=num_labels)
        model = BertForSequenceClassification(cfg)
    elif family == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=64,
                         num_labels=num_labels, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = GPT2ForSequenceClassification(cfg)
    elif family == "opt":
        cfg = OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48,
                        word_embed_proj_dim=32, max_position_embeddings=64, num_labels=num_labels, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2)
        model = OPTForSequenceClassification(cfg)
    elif family == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                          num_key_value_heads=3, intermediate_size=40, max_position_embeddings=64,
                          num_labels=num_labels, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = (LlamaForCausalLM if causal_lm else LlamaForSequenceClassification)(cfg)
    else:
        raise ValueError(family)
    return model.eval()


def batch(seed: int = 1, bsz: int = 3, seq: int = 9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (bsz, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # some right padding
    return {"input_ids": ids, "attention_mask": mask}
