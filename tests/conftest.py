"""Shared fixtures: paths to ../shared/data and a tiny tokenizer trained in-process."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


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
