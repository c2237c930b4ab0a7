"""Tiny saved folders for the app tests: a MiniGPT LM with a chat template, a MiniGPT classifier and
the LM exported as a stock GPT-2 folder. Import the fixtures into a test module to use them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modeling_minigpt import MiniGPTConfig, MiniGPTForSequenceClassification
from modeling_minigpt.convert import minigpt_to_gpt2
from test_sft import save_tiny_base

LABELS = ("animals", "food", "weather")


@pytest.fixture(scope="session")
def lm_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    """A random 2-layer, 32-dim MiniGPT LM (context 192) with the Alpaca chat template."""
    return save_tiny_base(tmp_path_factory.mktemp("app_lm"), tiny_tokenizer, seed=1)


@pytest.fixture(scope="session")
def classifier_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("app_classifier")
    torch.manual_seed(2)
    config = MiniGPTConfig.from_preset(
        "tiny", vocab_size=len(tiny_tokenizer), context_length=64, emb_dim=32, n_heads=2, n_layers=2,
        num_labels=len(LABELS), id2label=dict(enumerate(LABELS)), label2id={label: i for i, label in enumerate(LABELS)},
        eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id,
    )
    MiniGPTForSequenceClassification(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def gpt2_dir(lm_dir, tiny_tokenizer, tmp_path_factory) -> Path:
    """`lm_dir` as a stock GPT2LMHeadModel folder (what scripts/convert_gpt2.py --to-gpt2 writes)."""
    folder = tmp_path_factory.mktemp("app_gpt2")
    minigpt_to_gpt2(lm_dir).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder
