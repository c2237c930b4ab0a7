"""Shared fixtures: ../shared/data, real text, a tiny tokenizer trained in-process, and what several
test modules build from them (a corpus file, a saved tokenizer, documents, GPT-2's tokenizer)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.models import LABELS
from helpers.runs import reset_accelerate_state, save_tiny_base
from helpers.texts import UNICODE_TEXT

import tokenization
from modeling_minigpt import MiniGPTConfig, MiniGPTForSequenceClassification
from modeling_minigpt.convert import minigpt_to_gpt2

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Every test starts and ends with a clean Accelerate state (see `reset_accelerate_state`)."""
    reset_accelerate_state()
    yield
    reset_accelerate_state()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not found: these tests need the workplace's shared/ folder beside the repo")
    return SHARED_DATA


@pytest.fixture(scope="session")
def pydoc_text() -> str:
    """Real English text that ships with CPython itself (no download, no shared/ needed)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@pytest.fixture(scope="session")
def tiny_tokenizer(pydoc_text: str, tmp_path_factory):
    """A 512-token byte-level BPE trained in-process on a slice of the pydoc corpus."""
    from tokenization import train_bpe

    out = tmp_path_factory.mktemp("tiny_tokenizer")
    return train_bpe([pydoc_text[:200_000]], vocab_size=512, output_dir=out, show_progress=False)


@pytest.fixture(scope="session")
def corpus_file(pydoc_text: str, tmp_path_factory) -> Path:
    """12k characters of English: 150 training windows of 33 tokens with the tiny tokenizer (18 batches of 8)."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(pydoc_text[:12_000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def documents(pydoc_text: str) -> list[str]:
    """30 real documents of very different lengths (pydoc topics), plus two blank ones."""
    docs = pydoc_text.split("\n\n\n")
    docs = [d for d in docs if d.strip()][:30]
    return docs[:3] + ["", "  \n\t "] + docs[3:]


@pytest.fixture(scope="session")
def text(pydoc_text: str) -> str:
    """1.5k characters of English, then multi-byte characters of every UTF-8 length."""
    return pydoc_text[5000:6500] + UNICODE_TEXT


@pytest.fixture(scope="session")
def gpt2_pair(shared_data):
    """GPT-2's released tokenizer, and tiktoken's encoding built from the same two files."""
    gpt2 = shared_data / "gpt2"
    encoder, merges = gpt2 / "encoder.json", gpt2 / "vocab.bpe"
    return tokenization.load_gpt2_tokenizer(encoder, merges), tokenization.gpt2_tiktoken_encoding(encoder, merges)


# Saved folders for the app and inspection tests: a MiniGPT LM with a chat template, a MiniGPT classifier
# and the LM exported as a stock GPT-2 folder.


@pytest.fixture(scope="session")
def lm_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    """A random 2-layer, 32-dim MiniGPT LM (context 192) with the Alpaca chat template."""
    return save_tiny_base(tmp_path_factory.mktemp("app_lm"), tiny_tokenizer, seed=1)


@pytest.fixture(scope="session")
def classifier_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("app_classifier")
    torch.manual_seed(2)
    config = MiniGPTConfig.from_preset(
        "tiny",
        vocab_size=len(tiny_tokenizer),
        context_length=64,
        emb_dim=32,
        n_heads=2,
        n_layers=2,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
        eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
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
