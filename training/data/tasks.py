"""Instruction tasks that the project writes itself, with answers that can be checked exactly.

Each task kind is a small function of a seeded `random.Random` that returns an Alpaca record
(`instruction`, `input`, `output`). Everything is drawn from the fixed word list below, so the
same seed gives the same records in every Python process (no `hash()` of strings, no set
iteration order). Answers are a few tokens to a few dozen, short enough that a ~1M-parameter
model can learn some kinds in a few CPU minutes.

The metric is exact match of the model's greedy answer against `output`
(`training.evaluation.metrics.exact_match`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import TypeVar

# Short, common English words: cheap for a small BPE vocabulary and easy to read in a demo.
WORDS: tuple[str, ...] = (
    "apple",
    "bird",
    "blue",
    "boat",
    "book",
    "bread",
    "cake",
    "car",
    "cat",
    "chair",
    "cloud",
    "cold",
    "corn",
    "cow",
    "cup",
    "desk",
    "dog",
    "door",
    "duck",
    "egg",
    "farm",
    "fish",
    "flag",
    "frog",
    "gate",
    "gold",
    "grass",
    "green",
    "hat",
    "hill",
    "horse",
    "house",
    "ice",
    "jam",
    "key",
    "kite",
    "lake",
    "lamp",
    "leaf",
    "lion",
    "milk",
    "moon",
    "mouse",
    "nest",
    "night",
    "oak",
    "orange",
    "owl",
    "pen",
    "pig",
    "plum",
    "rain",
    "red",
    "ring",
    "river",
    "road",
    "rock",
    "rose",
    "salt",
    "sand",
    "sea",
    "seed",
    "sheep",
    "ship",
    "shoe",
    "snow",
    "sock",
    "star",
    "stone",
    "sun",
    "table",
    "tea",
    "tiger",
    "train",
    "tree",
    "wall",
    "water",
    "whale",
    "wind",
    "wolf",
)

# Keys for the "extract a field" task; values come from WORDS.
FIELD_KEYS: tuple[str, ...] = ("name", "color", "city", "animal", "food", "owner", "size", "tool")

Record = dict[str, str]
TaskFn = Callable[[random.Random], Record]


def _record(instruction: str, input: str, output: str) -> Record:
    return {"instruction": instruction, "input": input, "output": output}


def _words(rng: random.Random, low: int, high: int) -> list[str]:
    """Between `low` and `high` distinct words (inclusive), in random order."""
    return rng.sample(WORDS, rng.randint(low, high))


def repeat_phrase(rng: random.Random) -> Record:
    """The phrase sits in the instruction and the input is empty (the template's no-input form)."""
    phrase = " ".join(_words(rng, 2, 4))
    template = rng.choice(("Repeat this phrase: {}", "Say the following words again: {}"))
    return _record(template.format(phrase), "", phrase)


def reverse_words(rng: random.Random) -> Record:
    words = _words(rng, 3, 5)
    instruction = rng.choice(("Reverse the order of the words.", "Write the words in reverse order."))
    return _record(instruction, " ".join(words), " ".join(reversed(words)))


def sort_numbers(rng: random.Random) -> Record:
    numbers = rng.sample(range(100), rng.randint(3, 5))
    instruction = rng.choice(("Sort the numbers from smallest to largest.", "Put the numbers in increasing order."))
    return _record(instruction, ", ".join(map(str, numbers)), ", ".join(map(str, sorted(numbers))))


def add_numbers(rng: random.Random) -> Record:
    """The numbers sit in the instruction and the input is empty."""
    a, b = rng.randrange(50), rng.randrange(50)
    template = rng.choice(("What is {} plus {}?", "Add {} and {}."))
    return _record(template.format(a, b), "", str(a + b))


def longest_word(rng: random.Random) -> Record:
    """Words are drawn so that exactly one is the longest: the answer is never ambiguous."""
    while True:
        words = _words(rng, 3, 5)
        lengths = sorted((len(w) for w in words), reverse=True)
        if lengths[0] > lengths[1]:
            break
    instruction = rng.choice(("Pick the longest word.", "Which word is the longest?"))
    return _record(instruction, " ".join(words), max(words, key=len))


def extract_field(rng: random.Random) -> Record:
    keys = rng.sample(FIELD_KEYS, rng.randint(2, 4))
    values = rng.sample(WORDS, len(keys))
    asked = rng.randrange(len(keys))
    text = "\n".join(f"{k}: {v}" for k, v in zip(keys, values, strict=True))
    template = rng.choice(("What is the {} in the text?", "Give the value of the field {}."))
    return _record(template.format(keys[asked]), text, values[asked])


# Ordered: round-robin over this order keeps the kinds balanced in any prefix of the stream.
TASK_KINDS: dict[str, TaskFn] = {
    "repeat": repeat_phrase,
    "reverse": reverse_words,
    "sort": sort_numbers,
    "add": add_numbers,
    "longest": longest_word,
    "extract": extract_field,
}


def _resolve_kinds(kinds: Iterable[str] | None) -> list[str]:
    if kinds is None:
        return list(TASK_KINDS)
    kinds = list(kinds)
    unknown = [k for k in kinds if k not in TASK_KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown task kinds {unknown or kinds!r}; known kinds: {', '.join(TASK_KINDS)}")
    return kinds


T = TypeVar("T")


def draw_distinct(n: int, draw: Callable[[int], T], key: Callable[[T], Hashable]) -> list[T]:
    """`n` draws with pairwise distinct keys; `draw(i)` makes a candidate for slot i.

    Rejecting duplicates could loop forever once the space of candidates is exhausted, so
    after 50 draws per requested item (never reached when the space is much larger than n)
    this raises instead of hanging.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    seen: set[Hashable] = set()
    items: list[T] = []
    attempts_left = 50 * n + 100
    while len(items) < n:
        if attempts_left == 0:
            raise ValueError(f"could only draw {len(items)} distinct items of the {n} asked for: ask for fewer")
        attempts_left -= 1
        item = draw(len(items))
        if key(item) not in seen:
            seen.add(key(item))
            items.append(item)
    return items


def _prompt_key(record: Record) -> tuple[str, str]:
    return record["instruction"], record["input"]


def generate_tasks(n: int, seed: int, kinds: Iterable[str] | None = None) -> list[Record]:
    """`n` distinct Alpaca records (no two share an (instruction, input) pair).

    Kinds are taken round-robin in the order given (default: all of `TASK_KINDS`), so each
    kind gets n / len(kinds) records, give or take one. Each record also carries its `kind`.
    """
    names = _resolve_kinds(kinds)
    rng = random.Random(seed)

    def draw(i: int) -> Record:
        kind = names[i % len(names)]
        return {**TASK_KINDS[kind](rng), "kind": kind}

    return draw_distinct(n, draw, _prompt_key)


def split_tasks(records: Sequence[Record], n_heldout: int) -> tuple[list[Record], list[Record]]:
    """(train, held-out): the first `n_heldout` records are held out, the rest train.

    Taking a prefix of `generate_tasks`' round-robin stream keeps every kind equally
    represented in the held-out set, which a random split of a few hundred records does not.
    Raises if the two splits share an (instruction, input) pair.
    """
    if not 0 <= n_heldout <= len(records):
        raise ValueError(f"n_heldout must be between 0 and {len(records)}, got {n_heldout}")
    heldout, train = list(records[:n_heldout]), list(records[n_heldout:])
    shared = set(map(_prompt_key, train)) & set(map(_prompt_key, heldout))
    if shared:
        example = min(shared)
        raise ValueError(f"{len(shared)} (instruction, input) pairs are in both splits, e.g. {example!r}")
    return train, heldout


def make_task_splits(
    n_train: int, n_heldout: int, seed: int, kinds: Iterable[str] | None = None
) -> tuple[list[Record], list[Record]]:
    """Disjoint (train, held-out) task records drawn from one seeded stream."""
    return split_tasks(generate_tasks(n_heldout + n_train, seed, kinds), n_heldout)


# ----------------------------------------------------------------------------- preference pairs (DPO)
#
# The same tasks as preference pairs: `chosen` is the task's correct answer and `rejected` a
# near miss of the same form, the kind of mistake a small model makes (one swapped pair, off
# by one, the wrong field). Only the preference separates them, so a reward accuracy above
# 0.5 means the model learned which one is right, not which one looks like an answer.


def _swap_adjacent(items: list[str], rng: random.Random) -> list[str]:
    """`items` with one random pair of neighbours swapped (items are distinct, so it differs)."""
    i = rng.randrange(len(items) - 1)
    return [*items[:i], items[i + 1], items[i], *items[i + 2 :]]


def _swapped_words(record: Record, rng: random.Random) -> str:
    return " ".join(_swap_adjacent(record["output"].split(" "), rng))


def _swapped_numbers(record: Record, rng: random.Random) -> str:
    return ", ".join(_swap_adjacent(record["output"].split(", "), rng))


def _off_by_one(record: Record, rng: random.Random) -> str:
    total = int(record["output"])
    return str(total + 1 if total == 0 else total + rng.choice((-1, 1)))


def _second_longest(record: Record, rng: random.Random) -> str:
    return max((w for w in record["input"].split(" ") if w != record["output"]), key=len)


def _other_field(record: Record, rng: random.Random) -> str:
    values = [line.split(": ", 1)[1] for line in record["input"].split("\n")]
    return rng.choice([v for v in values if v != record["output"]])


# kind -> the near miss of a record of that kind (`rng` drives which one).
NEAR_MISSES: dict[str, Callable[[Record, random.Random], str]] = {
    "repeat": _swapped_words,
    "reverse": _swapped_words,
    "sort": _swapped_numbers,
    "add": _off_by_one,
    "longest": _second_longest,
    "extract": _other_field,
}


def preference_pair(record: Record, rng: random.Random) -> Record:
    """A task record as a preference record: chosen = its answer, rejected = a near miss."""
    kind = record["kind"]
    rejected = NEAR_MISSES[kind](record, rng)
    assert rejected != record["output"], f"the near miss of a {kind} record equals its answer"
    return {
        "instruction": record["instruction"],
        "input": record["input"],
        "chosen": record["output"],
        "rejected": rejected,
        "kind": kind,
    }


def make_preference_splits(
    n_train: int, n_heldout: int, seed: int, kinds: Iterable[str] | None = None
) -> tuple[list[Record], list[Record]]:
    """Disjoint (train, held-out) preference records: `make_task_splits` records, each with a
    seeded near miss as the rejected answer (held-out first, so they do not depend on n_train)."""
    train, heldout = make_task_splits(n_train, n_heldout, seed, kinds)
    rng = random.Random(seed)
    heldout = [preference_pair(r, rng) for r in heldout]
    return [preference_pair(r, rng) for r in train], heldout
