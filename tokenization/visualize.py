"""BPE made visible: merge traces, the merge table, and token boundaries over a text.

- `merge_trace(tokenizer, text)`: for each word, the merges (rank, pair, result) that turn its
  bytes into its final tokens, in the order the tokenizer applies them;
  `format_merge_trace` prints it, `merge_trace_figure` draws it.
- `merge_table(tokenizer, texts, n)`: the first n learned merges with each pair's frequency in
  the corpus when it was merged; `format_merge_table` prints it as Markdown.
- `token_boundaries_html` / `token_boundaries_figure`: a text with alternating token colours.
- `write_views(tokenizer, source, output_dir)`: the views `scripts/train_tokenizer.py` saves
  beside a trained tokenizer.

The `*_figure` functions return a matplotlib Figure; `modeling_minigpt.files.save_figure` writes it.
"""

from __future__ import annotations

import functools
import html
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import PreTrainedTokenizerFast

from modeling_minigpt.files import atomic_write_text, pyplot, save_figure

from .corpus import PathLike, Source, iter_texts
from .pretokenize import readable, segment_special_tokens
from .reference_bpe import Pair, replay_merge_counts

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Pastel colours, alternated so neighbouring tokens always differ.
TOKEN_COLOURS = ("#fde2a7", "#b9e4c9", "#c6d8f5", "#f7c6d9", "#e0d0f5", "#d5ecf2")
HIGHLIGHT = "#f4a259"
FONT = "DejaVu Sans Mono"  # ships with matplotlib


def learned_merges(tokenizer: PreTrainedTokenizerFast) -> list[Pair]:
    """The BPE merges of `tokenizer`, rank 0 first (read from its tokenizer.json)."""
    return list(_parse_merges(tokenizer.backend_tokenizer.to_str()))


@functools.lru_cache(maxsize=8)
def _parse_merges(tokenizer_json: str) -> tuple[Pair, ...]:
    model = json.loads(tokenizer_json)["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"not a BPE tokenizer (model type {model.get('type')!r})")
    # tokenizers >= 0.20 writes [left, right]; older files have "left right".
    return tuple(tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"])


@functools.lru_cache(maxsize=8)
def _rank_table(tokenizer_json: str) -> dict[Pair, int]:
    return {pair: rank for rank, pair in enumerate(_parse_merges(tokenizer_json))}


def special_tokens_of(tokenizer: PreTrainedTokenizerFast) -> list[str]:
    return [token.content for token in tokenizer.added_tokens_decoder.values() if token.special]


@dataclass(frozen=True)
class MergeStep:
    rank: int
    pair: Pair
    result: str
    position: int  # index of the pair's left part before the merge
    parts: tuple[str, ...]  # the word's parts after the merge


@dataclass(frozen=True)
class WordTrace:
    word: str  # a pre-token in byte-level characters, or a special token
    steps: tuple[MergeStep, ...]
    special: bool = False

    @property
    def start(self) -> tuple[str, ...]:
        return (self.word,) if self.special else tuple(self.word)

    @property
    def tokens(self) -> tuple[str, ...]:
        return self.steps[-1].parts if self.steps else self.start


def merge_trace(tokenizer: PreTrainedTokenizerFast, text: str) -> list[WordTrace]:
    """How `tokenizer` turns `text` into tokens, merge by merge, one trace per pre-token.

    BPE encoding of a word repeatedly merges the adjacent pair with the lowest merge rank
    (leftmost first on a tie), which is exactly what tokenizers' `Word::merge_all` does; the
    joined `tokens` of the traces equal `tokenizer.tokenize(text)`.
    """
    ranks = _rank_table(tokenizer.backend_tokenizer.to_str())
    pre_tokenizer = tokenizer.backend_tokenizer.pre_tokenizer
    traces = []
    for piece, special in segment_special_tokens(text, special_tokens_of(tokenizer)):
        if special:
            traces.append(WordTrace(piece, (), special=True))
            continue
        for word, _ in pre_tokenizer.pre_tokenize_str(piece):
            traces.append(WordTrace(word, tuple(_trace_word(word, ranks))))
    return traces


def _trace_word(word: str, ranks: dict[Pair, int]) -> Iterable[MergeStep]:
    parts = list(word)
    while len(parts) > 1:
        candidates = [(ranks[pair], i) for i, pair in enumerate(zip(parts, parts[1:], strict=False)) if pair in ranks]
        if not candidates:
            return
        rank, i = min(candidates)
        pair = (parts[i], parts[i + 1])
        parts[i : i + 2] = [pair[0] + pair[1]]
        yield MergeStep(rank=rank, pair=pair, result=parts[i], position=i, parts=tuple(parts))


def format_merge_trace(traces: Sequence[WordTrace]) -> str:
    """A printable trace: each word's bytes, each merge (rank, pair, result, parts), its tokens.

    Shown with '␣' for space, '↵' for newline and <XX> for a partial UTF-8 character.
    """
    lines = []
    for trace in traces:
        if trace.special:
            lines.append(f"{trace.word}  (special token, never merged)")
            continue
        lines.append(f"{readable(trace.word)!r}  bytes: {' '.join(readable(c) for c in trace.start)}")
        for step in trace.steps:
            pair = f"{readable(step.pair[0])} + {readable(step.pair[1])}"
            lines.append(
                f"  rank {step.rank:>6}  {pair:<22} -> {readable(step.result):<12} "
                f"[{' | '.join(readable(p) for p in step.parts)}]"
            )
        lines.append(f"  tokens: {' | '.join(readable(p) for p in trace.tokens)}")
    return "\n".join(lines)


def merge_trace_figure(traces: Sequence[WordTrace], max_words: int = 6) -> Figure:
    """The merge trace drawn: per word, one row per state, one box per part (width = bytes),
    the part just merged in orange with its rank and pair on the right."""
    plt = pyplot()
    from matplotlib.patches import Rectangle

    words = [t for t in traces if not t.special][:max_words]
    if not words:
        raise ValueError("nothing to draw: the trace has no (non-special) words")
    rows = sum(len(t.steps) + 2 for t in words)
    width = max(len(t.word) for t in words)
    figure, axes = plt.subplots(figsize=(1.2 + 0.55 * width + 3.2, 0.32 * rows + 0.4))
    y = 0.0
    for trace in words:
        axes.text(
            0, y, drawable(f"word {readable(trace.word)!r}"), fontsize=10, fontweight="bold", va="center", family=FONT
        )
        y += 1
        states = [(trace.start, None)] + [(s.parts, s) for s in trace.steps]
        for parts, step in states:
            x = 0
            for index, part in enumerate(parts):
                merged = step is not None and index == step.position
                axes.add_patch(
                    Rectangle(
                        (x, y - 0.4),
                        len(part) - 0.08,
                        0.8,
                        facecolor=HIGHLIGHT if merged else "#dbe7f7",
                        edgecolor="#4a5a70",
                        linewidth=0.6,
                    )
                )
                axes.text(
                    x + (len(part) - 0.08) / 2,
                    y,
                    drawable(readable(part)),
                    ha="center",
                    va="center",
                    fontsize=8,
                    family=FONT,
                )
                x += len(part)
            label = (
                "bytes" if step is None else f"rank {step.rank}: {readable(step.pair[0])} + {readable(step.pair[1])}"
            )
            label = drawable(label)
            axes.text(width + 0.4, y, label, va="center", fontsize=8, family=FONT, color="#333333")
            y += 1
    axes.set_xlim(-0.2, width + 6.5)
    axes.set_ylim(y - 0.4, -0.8)
    axes.axis("off")
    axes.set_title("BPE merge trace (lowest rank first)", fontsize=10)
    return figure


@dataclass(frozen=True)
class MergeRow:
    rank: int
    left: str
    right: str
    result: str
    frequency: int


def merge_table(tokenizer: PreTrainedTokenizerFast, texts: Iterable[str], n: int = 20) -> list[MergeRow]:
    """The first `n` merges of `tokenizer` with each pair's frequency in `texts` at the moment
    it is merged (replaying the merges in order). On the training corpus these are the counts
    the trainer chose them by; `tokenizers` does not report them."""
    merges = learned_merges(tokenizer)[:n]
    counts = replay_merge_counts(merges, texts, special_tokens_of(tokenizer))
    return [
        MergeRow(rank, left, right, left + right, count)
        for rank, ((left, right), count) in enumerate(zip(merges, counts, strict=True))
    ]


def format_merge_table(rows: Sequence[MergeRow]) -> str:
    lines = ["| rank | pair | result | frequency |", "|---:|---|---|---:|"]
    for row in rows:
        pair = f"`{readable(row.left)}` + `{readable(row.right)}`"
        lines.append(f"| {row.rank} | {pair} | `{readable(row.result)}` | {row.frequency:,} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class TokenSpan:
    id: int
    token: str
    start: int  # character offsets into the text; empty when a multi-byte character
    end: int  # is split and an earlier token already shows it


def token_spans(tokenizer: PreTrainedTokenizerFast, text: str) -> list[TokenSpan]:
    """Each token of `text` with the characters it covers (no overlaps, in order)."""
    encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    spans = []
    shown = 0
    for token_id, token, (start, end) in zip(encoding.ids, encoding.tokens, encoding.offsets, strict=True):
        start = max(start, shown)
        end = max(end, start)
        spans.append(TokenSpan(token_id, token, start, end))
        shown = end
    return spans


def token_boundaries_html(tokenizer: PreTrainedTokenizerFast, text: str, title: str = "Token boundaries") -> str:
    """A standalone HTML page: the text with each token on its own colour (hover: id, token)."""
    spans = token_spans(tokenizer, text)
    body = []
    for index, span in enumerate(spans):
        shown = html.escape(text[span.start : span.end]) or "&#9647;"  # ▯ marks a byte-only token
        tip = html.escape(f"#{index} id {span.id}: {readable(span.token)}", quote=True)
        colour = TOKEN_COLOURS[index % len(TOKEN_COLOURS)]
        body.append(f'<span style="background:{colour}" title="{tip}">{shown}</span>')
    ratio = len(text) / max(len(spans), 1)
    return (
        '<!doctype html>\n<html><head><meta charset="utf-8">'
        f'<title>{html.escape(title)}</title></head>\n<body style="font-family:sans-serif">\n'
        f"<h3>{html.escape(title)}</h3><p>{len(spans):,} tokens for {len(text):,} characters "
        f"({ratio:.2f} characters per token). Hover a token for its id.</p>\n"
        '<pre style="white-space:pre-wrap;font-size:14px;line-height:1.7">' + "".join(body) + "</pre>\n</body></html>\n"
    )


def token_boundaries_figure(
    tokenizer: PreTrainedTokenizerFast, text: str, columns: int = 80, max_lines: int = 40
) -> Figure:
    """The text on a character grid, each token's cells on its own colour, a bar at each token
    start. Newlines show as '↵', tabs as '⇥'; characters the font lacks as '□'."""
    plt = pyplot()
    from matplotlib.patches import Rectangle

    spans = token_spans(tokenizer, text)
    cells = _layout(text, spans, columns, max_lines)
    lines = max((row for row, _, _, _, _ in cells), default=0) + 1
    figure, axes = plt.subplots(figsize=(0.13 * columns + 0.4, 0.28 * lines + 0.6))
    for row, column, char, token_index, first in cells:
        colour = TOKEN_COLOURS[token_index % len(TOKEN_COLOURS)]
        axes.add_patch(Rectangle((column, row), 1, 1, facecolor=colour, edgecolor="none"))
        if first:
            axes.plot([column, column], [row + 0.05, row + 0.95], color="#333333", linewidth=0.8)
        axes.text(column + 0.5, row + 0.55, drawable(char), ha="center", va="center", fontsize=8, family=FONT)
    axes.set_xlim(0, columns)
    axes.set_ylim(lines, 0)
    axes.axis("off")
    shown = f"first {lines} lines of " if len(cells) < len(text) else ""
    axes.set_title(f"{shown}{len(spans):,} tokens, {len(text):,} characters (bar = token start)", fontsize=9)
    return figure


def _layout(
    text: str, spans: Sequence[TokenSpan], columns: int, max_lines: int
) -> list[tuple[int, int, str, int, bool]]:
    """(row, column, shown char, token index, starts token) for each character cell."""
    cells = []
    row = column = 0
    for index, span in enumerate(spans):
        for offset, char in enumerate(text[span.start : span.end]):
            shown = {"\n": "↵", "\t": "⇥", "\r": "␍"}.get(char, char)
            if column >= columns:
                row, column = row + 1, 0
            if row >= max_lines:
                return cells
            cells.append((row, column, shown, index, offset == 0))
            column += 1
            if char == "\n":
                row, column = row + 1, 0
    return cells


@functools.cache
def _font():
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    return FT2Font(font_manager.findfont(FONT))


def drawable(text: str) -> str:
    """`text` with characters the plotting font lacks (emoji, CJK) shown as '□'."""
    font = _font()
    return "".join(c if c == " " or font.get_char_index(ord(c)) else "□" for c in text)


# ----------------------------------------------------------------------------- views of a trained tokenizer


def write_views(
    tokenizer: PreTrainedTokenizerFast,
    source: Source,
    output_dir: PathLike,
    *,
    trace_word: str = " tokenization",
    merges_table_rows: int = 50,
    text_column: str = "text",
) -> str | None:
    """merge_trace.png (of `trace_word`; none if empty), token_boundaries.html (the start of the
    corpus) and merges_table.md (the first `merges_table_rows` merges with their frequency in the
    corpus, which is read again in plain Python; none if 0) in `output_dir`. Returns the table."""
    output_dir = Path(output_dir)
    if trace_word:
        save_figure(merge_trace_figure(merge_trace(tokenizer, trace_word)), output_dir / "merge_trace.png")
    texts, _ = iter_texts(source, text_column)
    atomic_write_text(output_dir / "token_boundaries.html", token_boundaries_html(tokenizer, next(texts, "")[:3000]))
    if merges_table_rows <= 0:
        return None
    texts, _ = iter_texts(source, text_column)
    table = format_merge_table(merge_table(tokenizer, texts, merges_table_rows))
    atomic_write_text(output_dir / "merges_table.md", f"# First {merges_table_rows} merges\n\n{table}\n")
    return table
