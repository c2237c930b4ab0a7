"""Train a GPT-2-style byte-level BPE with `tokenizers` and hand it out as a HF fast tokenizer.

One function, `train_bpe`, with the checks around it: special tokens declared once and proven
atomic, a vocabulary big enough for the byte alphabet, a lossless round trip on a sample of the
training text right after training, and an atomic save that `AutoTokenizer` loads without
remote code.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from .alpaca import ALPACA_CHAT_TEMPLATE
from .corpus import CorpusMonitor, PathLike, Source, iter_texts
from .pretokenize import (
    EOS_TOKEN,
    MAX_WORD_CHARS,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    bytes_to_unicode,
    iter_training_pieces,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

BYTE_ALPHABET_SIZE = 256


def byte_level_tokenizer(model: models.BPE) -> Tokenizer:
    """A `tokenizers` pipeline around `model` that splits and maps bytes exactly like GPT-2.

    No normalizer (lossless), GPT-2's regex without a prefix space, byte-level decoder, and a
    post-processor that adds nothing (GPT-2 never adds bos/eos on its own).
    """
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def train_bpe(
    source: Source,
    vocab_size: int,
    *,
    min_frequency: int = 2,
    special_tokens: Sequence[str] | None = None,
    output_dir: PathLike | None = None,
    model_max_length: int | PretrainedConfig | None = None,
    show_progress: bool = True,
    text_column: str = "text",
) -> PreTrainedTokenizerFast:
    """Learn a byte-level BPE vocabulary of `vocab_size` tokens from `source`.

    Args:
        source: anything `tokenization.corpus.open_source` accepts: a text file, a file or
            folder of rows, a list of text files, a `datasets.Dataset` whose `text_column` holds
            the texts, an iterable of texts (str), ...
        vocab_size: total vocabulary, counting the 256 byte tokens and the special tokens.
        min_frequency: a pair seen fewer times than this is never merged (training may then
            stop below `vocab_size`; a warning says so).
        special_tokens: all special tokens, declared once; default `SPECIAL_TOKENS`
            (`<|endoftext|>` = eos = bos = document separator, `<|pad|>` = pad). Must contain
            both of those. Each is cut out of the training text (never learned from) and encodes
            to exactly one id.
        output_dir: if given, the tokenizer is saved there (atomically) for
            `AutoTokenizer.from_pretrained(output_dir)`.
        model_max_length: an int, or a model config whose `max_position_embeddings` (or
            `n_positions`) becomes the tokenizer's `model_max_length`.
        show_progress: the trainer's own progress bars.
        text_column: the column read when `source` is (or holds) rows.

    Returns:
        A `PreTrainedTokenizerFast` (`TokenizersBackend` in transformers 5) with eos, bos and
        pad set and the Alpaca chat template attached.
    """
    special_tokens = tuple(SPECIAL_TOKENS if special_tokens is None else special_tokens)
    validate_special_tokens(special_tokens)
    minimum = BYTE_ALPHABET_SIZE + len(special_tokens)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the byte alphabet needs {BYTE_ALPHABET_SIZE} tokens "
            f"and there are {len(special_tokens)} special tokens, so vocab_size must be at least {minimum}"
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency={min_frequency} must be at least 1")
    check_trainer_memory(vocab_size)
    max_length = _resolve_model_max_length(model_max_length)

    texts, n_texts = iter_texts(source, text_column)
    monitor = CorpusMonitor()
    tokenizer = byte_level_tokenizer(models.BPE())
    trainer = bpe_trainer(vocab_size, min_frequency, special_tokens, show_progress)
    # `length` only sizes the progress bar (texts cut at special tokens count as several).
    long_words: list[int] = []
    tokenizer.train_from_iterator(
        iter_training_pieces(monitor.watch(texts), special_tokens, long_words), trainer=trainer, length=n_texts
    )
    if long_words:
        logger.warning(
            "the corpus has %d runs of more than %d characters without whitespace (the longest %d): each was cut "
            "into words of %d characters for training. Is it text (not base64, minified code or a binary)?",
            len(long_words),
            MAX_WORD_CHARS,
            max(long_words),
            MAX_WORD_CHARS,
        )
    if not monitor.has_content:
        raise ValueError(
            f"the training corpus is empty or whitespace-only ({monitor.n_texts} texts, {monitor.n_chars} characters)"
        )
    if tokenizer.get_vocab_size() < vocab_size:
        logger.warning(
            "BPE stopped at %d tokens (asked for %d): no remaining pair occurs %d+ times in the corpus",
            tokenizer.get_vocab_size(),
            vocab_size,
            min_frequency,
        )

    hf_tokenizer = wrap_tokenizer(tokenizer, special_tokens, max_length)
    check_special_tokens_atomic(hf_tokenizer, special_tokens)
    check_round_trip(hf_tokenizer, monitor.sample)
    if output_dir is not None:
        save_atomically(hf_tokenizer, output_dir)
    return hf_tokenizer


# The Rust BPE trainer reserves its tables for `vocab_size` tokens before it reads a word: about 44
# bytes per token (measured: vocab_size 10**8 asks for 4,429,185,040 bytes at once). An allocation
# the machine cannot give aborts the process with a Rust backtrace, so it is refused first.
TRAINER_BYTES_PER_TOKEN = 45


def check_trainer_memory(vocab_size: int) -> None:
    """ValueError when the trainer's tables for `vocab_size` tokens exceed this machine's memory."""
    needed = vocab_size * TRAINER_BYTES_PER_TOKEN
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if needed > memory:
        raise ValueError(
            f"vocab_size={vocab_size:,} cannot be built here: the BPE trainer reserves about "
            f"{TRAINER_BYTES_PER_TOKEN} bytes per token up front, {needed / 1e9:,.1f} GB, and this machine has "
            f"{memory / 1e9:,.1f} GB of memory (at most {memory // TRAINER_BYTES_PER_TOKEN:,} tokens)"
        )


def bpe_trainer(
    vocab_size: int, min_frequency: int, special_tokens: Sequence[str], show_progress: bool
) -> trainers.BpeTrainer:
    """tokenizers' trainer set up for byte-level BPE (the reference trainer mirrors this)."""
    return trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        # All 256 bytes, even those absent from the corpus, so any input can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )


def wrap_tokenizer(
    tokenizer: Tokenizer,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    model_max_length: int | None = None,
    pad_token: str = PAD_TOKEN,
) -> PreTrainedTokenizerFast:
    """The `tokenizers` object as a transformers fast tokenizer with our special-token roles
    (eos = bos = `<|endoftext|>`) and the Alpaca chat template."""
    extra = [token for token in special_tokens if token not in (EOS_TOKEN, PAD_TOKEN)]
    kwargs = {"model_max_length": model_max_length} if model_max_length is not None else {}
    if extra:
        kwargs["extra_special_tokens"] = extra
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=pad_token,
        # Cleaning would turn " ," into "," on decode and break the lossless round trip.
        clean_up_tokenization_spaces=False,
        chat_template=ALPACA_CHAT_TEMPLATE,
        **kwargs,
    )


def validate_special_tokens(special_tokens: Sequence[str]) -> None:
    """Reject special tokens that could not stay one atomic, distinct token."""
    byte_symbols = set(bytes_to_unicode().values())
    for token in special_tokens:
        if not isinstance(token, str) or not token or token.isspace():
            raise ValueError(f"special token {token!r} must be a non-empty, non-whitespace string")
        if token in byte_symbols:
            raise ValueError(
                f"special token {token!r} is a byte-level alphabet symbol: every text containing that "
                "byte would encode it as the special token"
            )
    duplicates = sorted({token for token in special_tokens if special_tokens.count(token) > 1})
    if duplicates:
        raise ValueError(f"special tokens declared twice: {duplicates}")
    for required in (EOS_TOKEN, PAD_TOKEN):
        if required not in special_tokens:
            raise ValueError(f"special_tokens must include {required!r} (eos/bos and pad); got {list(special_tokens)}")


def check_special_tokens_atomic(tokenizer: PreTrainedTokenizerFast, special_tokens: Sequence[str]) -> None:
    """Each special token must encode to its one id, alone, doubled and inside text.

    A string that is not registered as an added token goes through GPT-2 pre-tokenization,
    which splits `<|endoftext|>` into '<|', 'endoftext', '|>'; this catches that.
    """
    for token in special_tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        for text, expected in ((token, [token_id]), (token + token, [token_id, token_id])):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if ids != expected:
                pieces = tokenizer.convert_ids_to_tokens(ids)
                raise ValueError(
                    f"special token {token!r} is not atomic: {text!r} encodes to {len(ids)} tokens {pieces} "
                    f"instead of {expected}; it must be registered as a special (added) token"
                )
        in_text = tokenizer.encode(f"a{token} b", add_special_tokens=False)
        if in_text.count(token_id) != 1:
            raise ValueError(f"special token {token!r} is split when it appears inside text: {in_text}")


def check_round_trip(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> None:
    """decode(encode(text)) == text for every text: byte-level BPE must be lossless."""
    for index, text in enumerate(texts):
        # The backend, because the wrapper warns about texts longer than model_max_length.
        ids = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
        back = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if back != text:
            at = next(
                (i for i, (a, b) in enumerate(zip(text, back, strict=False)) if a != b), min(len(text), len(back))
            )
            raise RuntimeError(
                f"round trip failed on sample {index} at character {at}: "
                f"{text[max(0, at - 20) : at + 20]!r} came back as {back[max(0, at - 20) : at + 20]!r}"
            )


def _resolve_model_max_length(value: int | PretrainedConfig | None) -> int | None:
    if value is None or isinstance(value, int):
        return value
    for name in ("max_position_embeddings", "n_positions", "context_length"):
        length = getattr(value, name, None)
        if isinstance(length, int):
            return length
    raise TypeError(f"model_max_length must be an int or a config with max_position_embeddings; got {value!r:.80}")


def save_atomically(tokenizer: PreTrainedTokenizerFast, output_dir: PathLike) -> Path:
    """save_pretrained into a temporary sibling folder, then move each file into place.

    Every file is replaced with os.replace, so a crash never leaves a half-written file, and
    other files already in `output_dir` (a model's weights, say) are left alone.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp.", dir=output_dir.parent))
    try:
        tokenizer.save_pretrained(staging)
        for path in staging.iterdir():
            os.replace(path, output_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir
