"""Tiny models: causal LMs with known outputs, and a config for LoRA tests."""

from __future__ import annotations

import torch

from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM


def tiny_model(vocab_size: int, context_length: int = 16, seed: int = 0) -> MiniGPTForCausalLM:
    torch.manual_seed(seed)
    config = MiniGPTConfig.from_preset(
        "tiny", vocab_size=vocab_size, context_length=context_length, emb_dim=32, n_heads=2
    )
    return MiniGPTForCausalLM(config).eval()


def uniform_model(vocab_size: int, context_length: int = 16) -> MiniGPTForCausalLM:
    """Zero output head (tied to the embedding) -> all logits 0 -> uniform next-token distribution."""
    model = tiny_model(vocab_size, context_length)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


VOCAB = 96


def tiny_config(**overrides) -> MiniGPTConfig:
    return MiniGPTConfig.from_preset(
        "tiny", **{"vocab_size": VOCAB, "context_length": 32, "emb_dim": 32, "n_heads": 2, **overrides}
    )


# Label names of the tiny classifier folder (`classifier_dir` in conftest.py).
LABELS = ("animals", "food", "weather")
