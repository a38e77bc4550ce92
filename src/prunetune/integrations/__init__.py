"""Integrations with other training loops: transformers.Trainer (LightPeftCallback)."""
