"""A step-by-step BPE trainer in plain Python, the way the book teaches it.

1. Pre-tokenize the corpus GPT-2 style and count each distinct word (`count_words`).
2. Start every word as a sequence of byte symbols; the vocabulary is the special tokens, then
   the 256 byte symbols.
3. Count every adjacent pair of symbols, weighted by word frequency (`count_pairs`).
4. Merge the most frequent pair into a new symbol everywhere (`merge_word`), update the counts,
   and repeat until the vocabulary is full or no pair is frequent enough.

It learns the same merges, in the same order, as `tokenizers`' BpeTrainer with the settings of
`tokenization.train.bpe_trainer`, because it follows the same rules (read from
huggingface/tokenizers `tokenizers/src/models/bpe/trainer.rs`):

- **Ids.** Special tokens get ids 0.. in declaration order; then the alphabet, *sorted by code
  point of the byte-level character* (so '!' is the first byte symbol and 'Ġ' = space comes
  after 'ÿ'); then each new token gets the next id in creation order.
- **Tie-break.** The trainer's max-heap orders merges by count, and among equal counts by the
  pair of ids *ascending* (`other.pair.cmp(&self.pair)`): the winner is the most frequent pair,
  then the one with the smallest left id, then the smallest right id. Here: `max` over
  `(count, -left_id, -right_id)`.
- **Counting.** Pair counts are plain adjacent-pair counts over distinct words times word
  frequency, overlaps included ('aaa' counts ('a', 'a') twice); a merge is applied left to
  right without overlap ('aaa' -> 'aa' 'a').
- **Stopping.** Stop when the vocabulary reaches `vocab_size` or the best count is below
  `min_frequency` (a pair seen exactly `min_frequency` times is merged).

One case where the two could differ, not a tie-break: if a merge ever produced a string that
is already a token (say 'a'+'bc' after 'ab'+'c' made 'abc'), the library would reuse the old id,
and its heap entries for pairs involving that id each know only part of the words containing
the pair, so a later merge of such a pair could be applied to only some words and recorded
twice; this trainer merges everywhere. It did not happen in any run here (tinyshakespeare and
the CPython docs up to 12.7k tokens; GPT-2's own 50,000 merges make 50,000 distinct tokens).
`BPETrainingResult.reused` lists such merges, and the tests assert it is empty alongside
merge-list equality.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from .pretokenize import SPECIAL_TOKENS, bytes_to_unicode, iter_training_pieces, pretokenize

Pair = tuple[str, str]


def count_words(texts: Iterable[str], special_tokens: Sequence[str] = SPECIAL_TOKENS) -> Counter[str]:
    """Distinct pre-tokenized words (in byte-level characters) and how often each occurs."""
    counts: Counter[str] = Counter()
    for piece in iter_training_pieces(texts, special_tokens):
        counts.update(pretokenize(piece))
    return counts


def initial_vocabulary(special_tokens: Sequence[str] = SPECIAL_TOKENS) -> list[str]:
    """Special tokens, then the 256 byte symbols sorted by code point (the trainer's order)."""
    return list(special_tokens) + sorted(bytes_to_unicode().values())


def count_pairs(symbols: Sequence[str], weight: int = 1) -> Counter[Pair]:
    """Adjacent pairs of one word, each counted `weight` times (overlaps count)."""
    counts: Counter[Pair] = Counter()
    for pair in zip(symbols, symbols[1:], strict=False):
        counts[pair] += weight
    return counts


def merge_word(symbols: tuple[str, ...], pair: Pair) -> tuple[str, ...]:
    """Replace each occurrence of `pair`, scanning left to right without overlap."""
    merged: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


class PairStatistics:
    """The corpus as distinct words (tuples of symbols) with frequencies, and the pair counts.

    `merge` rewrites only the words that contain the pair (an index from pair to words keeps
    that cheap) and updates the counts by subtracting each changed word's old pairs and adding
    its new ones: the same numbers as recounting the whole corpus, without the recount.
    """

    def __init__(self, word_counts: Counter[str]):
        self.words: list[tuple[str, ...]] = [tuple(word) for word in word_counts]
        self.frequencies: list[int] = list(word_counts.values())
        self.pair_counts: Counter[Pair] = Counter()
        self.words_with: defaultdict[Pair, set[int]] = defaultdict(set)
        for index, symbols in enumerate(self.words):
            self._add(index, symbols)

    def _add(self, index: int, symbols: tuple[str, ...], sign: int = 1) -> None:
        for pair, count in count_pairs(symbols, self.frequencies[index]).items():
            self.pair_counts[pair] += sign * count
            if sign > 0:
                self.words_with[pair].add(index)

    def merge(self, pair: Pair) -> None:
        for index in self.words_with.pop(pair, set()):
            symbols = self.words[index]
            merged = merge_word(symbols, pair)
            if merged != symbols:
                self._add(index, symbols, sign=-1)
                self._add(index, merged)
                self.words[index] = merged
        self.pair_counts = +self.pair_counts  # drop pairs whose count fell to zero


@dataclass
class BPETrainingResult:
    vocab: dict[str, int]
    merges: list[Pair]
    # Pair frequency in the corpus at the moment each merge was chosen.
    counts: list[int]
    # Indices into `merges` whose result string was already a token (see module docstring).
    reused: list[int] = field(default_factory=list)


def train_reference_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    show_progress: bool = False,
) -> BPETrainingResult:
    """Learn byte-level BPE merges the slow, visible way; see the module docstring for rules."""
    vocabulary = initial_vocabulary(special_tokens)
    ids = {token: index for index, token in enumerate(vocabulary)}
    stats = PairStatistics(count_words(texts, special_tokens))
    merges: list[Pair] = []
    counts: list[int] = []
    reused: list[int] = []
    progress = tqdm(total=max(vocab_size - len(ids), 0), desc="reference BPE merges", disable=not show_progress)
    while len(ids) < vocab_size and stats.pair_counts:
        # Most frequent pair; ties go to the smallest (left id, right id), as in tokenizers.
        pair, count = max(stats.pair_counts.items(), key=lambda item: (item[1], -ids[item[0][0]], -ids[item[0][1]]))
        if count < min_frequency:
            break
        new_token = pair[0] + pair[1]
        if new_token in ids:
            reused.append(len(merges))
        else:
            ids[new_token] = len(ids)
            progress.update(1)
        merges.append(pair)
        counts.append(count)
        stats.merge(pair)
    progress.close()
    return BPETrainingResult(vocab=ids, merges=merges, counts=counts, reused=reused)


def replay_merge_counts(
    merges: Sequence[Pair], texts: Iterable[str], special_tokens: Sequence[str] = SPECIAL_TOKENS
) -> list[int]:
    """The corpus frequency of each merge's pair at the moment it is applied, merges in order.

    For the merges a trainer learned on `texts` these are the counts it chose them by
    (tokenizers does not report them); for other text they show how useful each merge is there.
    """
    stats = PairStatistics(count_words(texts, special_tokens))
    counts = []
    for pair in merges:
        counts.append(stats.pair_counts.get(pair, 0))
        stats.merge(pair)
    return counts
