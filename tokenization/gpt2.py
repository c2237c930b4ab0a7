"""GPT-2's released tokenizer files as our tokenizer type, and tiktoken twins for checking.

`load_gpt2_tokenizer` builds the tokenizer with the `tokenizers` library directly: in
transformers 5.24 `GPT2TokenizerFast(vocab_file=..., merges_file=...)` silently builds an empty
tokenizer from these files (see shared/HF_V5_NOTES.md).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import AddedToken, models
from transformers import PreTrainedTokenizerFast

from .corpus import PathLike
from .pretokenize import EOS_TOKEN, token_bytes
from .train import byte_level_tokenizer, check_special_tokens_atomic, wrap_tokenizer

if TYPE_CHECKING:
    import tiktoken

GPT2_CONTEXT_LENGTH = 1024


def read_merges(vocab_bpe: PathLike) -> list[tuple[str, str]]:
    """The merge list of a `vocab.bpe` file ('#version' header, then one 'left right' per line)."""
    path = Path(vocab_bpe)
    merges = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            line = line.rstrip("\n")
            if not line or (line_number == 1 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise ValueError(f"{path}:{line_number}: expected 'left right', got {line!r}")
            merges.append((parts[0], parts[1]))
    return merges


def read_vocab(encoder_json: PathLike) -> dict[str, int]:
    path = Path(encoder_json)
    with path.open(encoding="utf-8") as handle:
        vocab = json.load(handle)
    if not isinstance(vocab, dict):
        raise ValueError(f"{path}: expected a JSON object mapping token -> id")
    return vocab


def load_gpt2_tokenizer(encoder_json: PathLike, vocab_bpe: PathLike) -> PreTrainedTokenizerFast:
    """GPT-2's tokenizer (50,257 tokens) from its released `encoder.json` and `vocab.bpe`.

    Same pipeline as our trained tokenizers (`byte_level_tokenizer`), same wrapper type. GPT-2
    has no pad token, so pad is eos (`<|endoftext|>`, id 50256); the vocabulary is unchanged so
    the released weights still fit.
    """
    vocab = read_vocab(encoder_json)
    merges = read_merges(vocab_bpe)
    if EOS_TOKEN not in vocab:
        raise ValueError(f"{encoder_json}: {EOS_TOKEN!r} is missing; is this GPT-2's encoder.json?")
    missing = [left + right for left, right in merges if left + right not in vocab]
    if missing:
        raise ValueError(f"{vocab_bpe} merges into tokens absent from {encoder_json}, e.g. {missing[:3]}")
    tokenizer = byte_level_tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
    hf_tokenizer = wrap_tokenizer(
        tokenizer, special_tokens=(EOS_TOKEN,), model_max_length=GPT2_CONTEXT_LENGTH, pad_token=EOS_TOKEN
    )
    check_special_tokens_atomic(hf_tokenizer, (EOS_TOKEN,))
    return hf_tokenizer


def _sha256(path: PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def gpt2_tiktoken_encoding(encoder_json: PathLike, vocab_bpe: PathLike) -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding, built by tiktoken's own loader from the same two local files.

    An independent reference for `load_gpt2_tokenizer` (tiktoken cannot download here). The file
    hashes are passed so tiktoken's read cache can never serve a stale copy.
    """
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe),
        encoder_json_file=str(encoder_json),
        vocab_bpe_hash=_sha256(vocab_bpe),
        encoder_json_hash=_sha256(encoder_json),
    )
    return tiktoken.Encoding(
        name="gpt2-local", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={EOS_TOKEN: 50256}
    )


def tiktoken_encoding(tokenizer: PreTrainedTokenizerFast, name: str = "minigpt-bpe") -> tiktoken.Encoding:
    """A tiktoken Encoding with the same vocabulary and merges as our byte-level `tokenizer`.

    tiktoken merges the adjacent pair whose *result* has the lowest rank; tokenizers merges the
    pair with the lowest *merge* rank. Using our token ids as ranks makes the two the same,
    because a trainer gives each new token the next id in merge order.
    """
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str

    specials = {token.content: index for index, token in tokenizer.added_tokens_decoder.items()}
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False)
    ranks = {token_bytes(token): index for token, index in vocab.items() if token not in specials}
    return tiktoken.Encoding(name=name, pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens=specials)
