"""Tokenizers of saved folders: load one, check it against a model's vocabulary, fingerprint it.

One rule relates a tokenizer to a model: it has exactly the model's `vocab_size` ids. More would
index past the embedding; fewer means another tokenizer than the model was trained with. A
folder of a MiniGPT model loads without remote code: importing the model package (which this
package does for its file writers) registers MiniGPT with the Auto classes, and the tokenizer
class itself is one of transformers' (named in tokenizer_config.json): no code saved in a folder
runs unless the caller asks for it with `trust_remote_code=True` (the scripts' --trust_remote_code).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .corpus import DataError, PathLike


def load_tokenizer(
    tokenizer: PreTrainedTokenizerBase | PathLike | None, *, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """The tokenizer itself, or the one saved in folder `tokenizer`; a DataError naming what is missing.

    A folder whose tokenizer exists only as code saved in it is refused unless `trust_remote_code`.
    """
    if tokenizer is None:
        raise DataError(
            "no tokenizer given: pass the tokenizer the model uses (a saved tokenizer folder, or one from "
            "tokenization.train_bpe / tokenization.load_gpt2_tokenizer)"
        )
    if not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    path = Path(tokenizer)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise DataError(f"no tokenizer at {path}: expected a folder with tokenizer.json (from save_pretrained)")
    try:
        # Passed explicitly either way: without it, a folder whose config names remote code stops and asks.
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as error:  # any loading failure becomes one clear message
        if not trust_remote_code and "trust_remote_code" in str(error):
            raise DataError(
                f"the tokenizer saved in {path} needs code saved in that folder: pass --trust_remote_code to run "
                "it, and only for a folder you trust"
            ) from None
        raise DataError(f"could not load the tokenizer saved in {path}: {error}") from None


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    """Refuse a tokenizer that does not have exactly `vocab_size` ids, the model's vocabulary."""
    if len(tokenizer) > vocab_size:
        raise DataError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has only {vocab_size}: "
            "ids above the model's range would crash the embedding; use the tokenizer the model was trained with"
        )
    if len(tokenizer) < vocab_size:
        raise DataError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}: "
            "train or load the model with this tokenizer's size, or use the tokenizer it was trained with"
        )


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of everything that decides the ids: the backend's full JSON (vocab, merges, ...)."""
    return short_hash(tokenizer.backend_tokenizer.to_str(), tokenizer.eos_token_id)


def short_hash(*parts: Any) -> str:
    """A stable 16-hex-digit fingerprint (datasets' length) of the reprs of `parts`."""
    return hashlib.sha256(repr(parts).encode("utf-8")).hexdigest()[:16]
