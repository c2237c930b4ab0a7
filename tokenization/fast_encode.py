"""Batched encoding for the data pipeline: texts in, lists of ids out, as fast as we can.

What limits `tokenizers` here (GPT-2's merges on tinyshakespeare, one call per paragraph, CPU
seconds, benchmarks/bench_tokenizer.py): the same pipeline with the BPE model swapped for a
one-entry WordLevel, i.e. only the ByteLevel pre-tokenizer (Oniguruma regex), the per-byte
alignment bookkeeping of `NormalizedString` and building the Encoding, takes ~75 % of a full
encode. The merges are the other ~25 %; a 100x larger BPE word cache does not help; skipping
offsets (`encode_batch_fast`) saves at most ~20 %. tiktoken's *whole* encode of the same texts
takes ~25 % of tokenizers' time, less than tokenizers spends before BPE even starts, so no
setting of `tokenizers` 0.23 reaches tiktoken's speed, even on two cores.

So the fast path *is* tiktoken, built from the tokenizer's own vocabulary and merges
(`gpt2.tiktoken_encoding`), with the texts split into one contiguous slice per thread
(tiktoken releases the GIL while encoding). It gives the same ids as the tokenizer: the twin is
checked against `tokenizers` on a probe text when it is built, and the tests compare full
corpora. Without tiktoken, or if the probe ever disagreed, `tokenizers`' own
`encode_batch_fast` is used (same ids, slower).
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

Engine = Literal["auto", "tiktoken", "tokenizers"]

# Covers letters, digits, punctuation, contractions, whitespace runs, multi-byte characters
# split across tokens, and the special tokens.
PROBE_TEXT = (
    "Hello, world! It's 2024; we'd re-encode naïve café text: 日本語, Ελληνικά, 🌍🎉👩‍👩‍👧.\n\n"
    "\tTabs\t\tand   spaces  \r\n<|endoftext|>def f(x):\n    return x ** 2  # comment\n\n\n"
    "ALL CAPS, MiXeD, 3.14159, 1,000,000 — “quotes” ‘too’...<|pad|>   "
)

_twins: weakref.WeakKeyDictionary[PreTrainedTokenizerFast, tuple[int, object]] = weakref.WeakKeyDictionary()


def tiktoken_twin(tokenizer: PreTrainedTokenizerFast):
    """A tiktoken Encoding that gives `tokenizer`'s ids, or None (tiktoken missing, or the probe
    disagreed). Built once per tokenizer and rebuilt if tokens are added to it."""
    fingerprint = len(tokenizer)
    cached = _twins.get(tokenizer)
    if cached is not None and cached[0] == fingerprint:
        return cached[1]
    twin = _build_twin(tokenizer)
    _twins[tokenizer] = (fingerprint, twin)
    return twin


def _build_twin(tokenizer: PreTrainedTokenizerFast):
    try:
        from .gpt2 import tiktoken_encoding

        twin = tiktoken_encoding(tokenizer)
    except ImportError:
        return None
    except (ValueError, KeyError) as error:  # a vocabulary that is not byte-level BPE
        logger.warning("no tiktoken twin for this tokenizer (%s); using tokenizers", error)
        return None
    expected = tokenizer.backend_tokenizer.encode(PROBE_TEXT, add_special_tokens=False).ids
    if twin.encode(PROBE_TEXT, allowed_special="all") != expected:
        logger.warning("tiktoken twin disagrees with the tokenizer on the probe text; using tokenizers")
        return None
    return twin


def encode_batch_fast(
    tokenizer: PreTrainedTokenizerFast,
    texts: Sequence[str],
    *,
    num_threads: int | None = None,
    engine: Engine = "auto",
) -> list[list[int]]:
    """Token ids of each text, no special tokens added (special-token strings in the text do
    become their ids), no truncation, no padding: what pretraining windows are cut from.

    Args:
        num_threads: worker threads; default: the number of CPUs. Small batches (under
            `MIN_CHARS_PER_THREAD` characters a thread) run on the calling thread.
        engine: "auto" (tiktoken twin if available, else tokenizers), or force one.
    """
    texts = list(texts)
    twin = tiktoken_twin(tokenizer) if engine in ("auto", "tiktoken") else None
    if engine == "tiktoken" and twin is None:
        raise RuntimeError("engine='tiktoken' but no tiktoken twin could be built (is tiktoken installed?)")
    if twin is None:
        encodings = tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return [encoding.ids for encoding in encodings]
    total = sum(map(len, texts))
    threads = max(1, min(num_threads or os.cpu_count() or 1, len(texts), total // MIN_CHARS_PER_THREAD))
    if threads == 1:
        return _encode_slice(twin, texts)
    slices = _balanced_slices(texts, threads, total)
    parts = _pool(threads).map(lambda part: _encode_slice(twin, part), slices)
    return [ids for part in parts for ids in part]


# Below this much text per thread, handing work to threads costs more than it saves.
MIN_CHARS_PER_THREAD = 1 << 15
_pools: dict[int, ThreadPoolExecutor] = {}
# A forked child (datasets' num_proc workers, DataLoader workers) inherits the pool object but
# not its threads: waiting on it would deadlock, so the child starts with no pools.
os.register_at_fork(after_in_child=_pools.clear)


def _pool(threads: int) -> ThreadPoolExecutor:
    # Kept for the life of the process: a new pool per batch costs milliseconds, which adds up
    # over thousands of `datasets.map` batches.
    if threads not in _pools:
        _pools[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="encode")
    return _pools[threads]


def _balanced_slices(texts: list[str], parts: int, total: int) -> list[list[str]]:
    """`texts` cut into `parts` contiguous runs of about equal length in characters."""
    slices: list[list[str]] = [[]]
    filled = 0
    for text in texts:
        # Start the next run when this text's middle lies past the current run's share.
        if slices[-1] and len(slices) < parts and filled + len(text) / 2 > total * len(slices) / parts:
            slices.append([])
        slices[-1].append(text)
        filled += len(text)
    return slices


def _encode_slice(twin, texts: Sequence[str]) -> list[list[int]]:
    # tiktoken releases the GIL while it encodes, so slices run in parallel.
    allowed = twin.special_tokens_set
    return [twin.encode(text, allowed_special=allowed, disallowed_special=()) for text in texts]
