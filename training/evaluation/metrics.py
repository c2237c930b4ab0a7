"""Evaluation metrics: token-weighted loss, perplexity, bits per byte/char, bootstrap intervals;
a classifier's accuracy and confusion matrix; exact match of generated answers.

Works with any Hugging Face causal LM (only `model(input_ids=..., attention_mask=...).logits` is
used); the cross-entropy is computed here, per token, in fp32, so every window keeps its own sum
of nats and token count. Definitions, in one place:

- loss            = total nats over all scored target tokens / number of scored tokens
                    (token-weighted: a mean of batch means would over-weight short batches)
- perplexity      = exp(loss);  bits per token = loss / ln 2
- bits per byte   = total nats / ln 2 / UTF-8 bytes of the scored targets
- bits per char   = total nats / ln 2 / Unicode characters of the scored targets
- confidence band = percentile bootstrap over windows of the ratio of sums (`bootstrap_ci`)

How bytes are counted: a byte-level BPE (GPT-2's, ours) maps every id to a fixed byte string, so
the bytes of any set of scored targets is a sum over a per-id table (`token_byte_table`). That
stays exact when a window boundary splits a multi-byte character; characters are counted as UTF-8
lead bytes for the same reason. Special tokens count zero bytes. Other tokenizers get a table from
decoding each id alone, which is approximate (`bytes_exact=False` in the report).

Long texts use strided sliding windows (Hugging Face's "perplexity of fixed-length models"):
each token is scored exactly once, by the first window that reaches it, with at least
`context_length - stride` tokens of left context once the text is longer than one window.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.data_loader import DataLoaderStateMixin
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from tokenization.load import check_tokenizer
from tokenization.pretokenize import token_bytes, unicode_to_bytes
from training.data.collate import IGNORE_INDEX
from training.evaluation.generate import eval_mode

LN2 = math.log(2.0)
# math.exp overflows above ~709.78 nats: a diverged model's perplexity is infinite, not an OverflowError.
_MAX_EXP = math.log(sys.float_info.max)


def perplexity(loss: float) -> float:
    """exp(loss), inf for a loss too large to exponentiate."""
    return math.exp(loss) if loss <= _MAX_EXP else math.inf


# ----------------------------------------------------------------------------- units


def bits_per_byte(total_nats: float, n_bytes: int) -> float:
    """Bits per UTF-8 byte: comparable across models with different tokenizers."""
    if n_bytes <= 0:
        raise ValueError(f"bits per byte needs a positive byte count, got {n_bytes}")
    return total_nats / LN2 / n_bytes


def bits_per_char(total_nats: float, n_chars: int) -> float:
    """Bits per Unicode character (code point)."""
    if n_chars <= 0:
        raise ValueError(f"bits per character needs a positive character count, got {n_chars}")
    return total_nats / LN2 / n_chars


# ----------------------------------------------------------------------------- bytes per token


@dataclass(frozen=True)
class TokenByteTable:
    """UTF-8 bytes and characters each token id stands for, indexed by id."""

    n_bytes: torch.Tensor  # [V] int64
    n_chars: torch.Tensor  # [V] int64
    exact: bool  # True for byte-level BPE tokenizers, where the table is exact by construction


def _utf8_lead_bytes(data: bytes) -> int:
    # Continuation bytes look like 0b10xxxxxx; every other byte starts a character.
    return sum(1 for b in data if b & 0xC0 != 0x80)


def _is_byte_level(tokenizer: PreTrainedTokenizerBase) -> bool:
    from tokenizers import decoders

    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and isinstance(backend.decoder, decoders.ByteLevel)


def token_byte_table(tokenizer: PreTrainedTokenizerBase) -> TokenByteTable:
    """Per-id byte and character counts for `tokenizer` (build once, reuse for every evaluation)."""
    exact = _is_byte_level(tokenizer)
    byte_of_char = unicode_to_bytes()
    special = set(tokenizer.all_special_ids)
    added = {i: tok.content for i, tok in tokenizer.added_tokens_decoder.items()}
    n = len(tokenizer)
    n_bytes = torch.zeros(n, dtype=torch.long)
    n_chars = torch.zeros(n, dtype=torch.long)
    for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(n)))):
        if i in special or piece is None:
            continue  # control tokens are not text
        if i in added:
            data = added[i].encode("utf-8")  # added tokens are stored as plain text, not byte-mapped
        elif exact and all(c in byte_of_char for c in piece):
            data = token_bytes(piece)
        else:
            exact = False
            data = tokenizer.decode([i]).encode("utf-8")
        n_bytes[i] = len(data)
        n_chars[i] = _utf8_lead_bytes(data)
    return TokenByteTable(n_bytes=n_bytes, n_chars=n_chars, exact=exact)


# ----------------------------------------------------------------------------- loss over a dataloader


@dataclass
class EvalResult:
    """Per-window sums from one evaluation; every metric is derived from these."""

    per_window_nats: torch.Tensor  # [W] float64, summed cross-entropy of the window's scored targets
    per_window_tokens: torch.Tensor  # [W] int64, scored targets per window
    per_window_bytes: torch.Tensor | None = None  # [W] int64, when a TokenByteTable was given
    per_window_chars: torch.Tensor | None = None  # [W] int64
    bytes_exact: bool | None = None

    @property
    def total_nats(self) -> float:
        return float(self.per_window_nats.sum())

    @property
    def n_tokens(self) -> int:
        return int(self.per_window_tokens.sum())

    @property
    def n_windows(self) -> int:
        return len(self.per_window_tokens)

    @property
    def loss(self) -> float:
        """Token-weighted mean cross-entropy in nats per token."""
        return self.total_nats / self.n_tokens

    @property
    def perplexity(self) -> float:
        return perplexity(self.loss)

    @property
    def n_bytes(self) -> int | None:
        return None if self.per_window_bytes is None else int(self.per_window_bytes.sum())

    @property
    def n_chars(self) -> int | None:
        return None if self.per_window_chars is None else int(self.per_window_chars.sum())


def _inputs_and_targets(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, targets aligned with the logits) for the three usual batch layouts."""
    input_ids = batch["input_ids"]
    if "shift_labels" in batch:  # already aligned: position t holds the target of position t
        return input_ids, batch["shift_labels"]
    labels = batch.get("labels")
    if labels is None:  # plain language modelling on the inputs; padding is not a target
        labels = input_ids
        if "attention_mask" in batch:
            labels = labels.masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    # HF convention: labels are unshifted, so the last position has no target.
    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return input_ids, torch.cat([labels[:, 1:], pad], dim=1)


def score_batch(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(nats per row [B] float64, scored tokens per row [B], targets [B, T]) for one batch.

    Differentiable (no `no_grad` here): DPO's loss is built on these per-row sums."""
    input_ids, targets = _inputs_and_targets(batch)
    input_ids, targets = input_ids.to(device), targets.to(device)
    attention_mask = batch.get("attention_mask")
    attention_mask = None if attention_mask is None else attention_mask.to(device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
    scored = targets != IGNORE_INDEX  # (B, T)
    if scored.any() and int(targets[scored].max()) >= logits.shape[-1]:
        raise ValueError(
            f"target id {int(targets[scored].max())} is out of range for the model's "
            f"{logits.shape[-1]}-way output: was the data tokenized for another model?"
        )
    # fp32 so half-precision logits do not lose the log-sum-exp; ignored positions come back as 0.
    nats = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(targets)  # (B, T)
    return nats.sum(dim=1, dtype=torch.float64), scored.sum(dim=1), targets


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    accelerator=None,
    max_batches: int | None = None,
    byte_table: TokenByteTable | None = None,
    show_progress: bool = False,
) -> EvalResult:
    """Token-weighted loss of `model` over `dataloader`; each row of a batch is one window.

    Batches hold `input_ids` and either `shift_labels` (aligned targets, as `training/data/windows.py`
    yields), unshifted HF `labels`, or neither (the inputs are the labels; `attention_mask == 0`
    is padding). -100 marks targets that are not scored. With an `accelerator`, pass a dataloader
    it prepared: each process scores its shard and the per-window sums are gathered (duplicates
    from uneven sharding dropped), so every process returns the same full result. `max_batches`
    counts batches per process. The model's train/eval mode is restored afterwards.
    """
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    table = None if byte_table is None else (byte_table.n_bytes.to(device), byte_table.n_chars.to(device))
    autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    is_main = accelerator is None or accelerator.is_local_main_process
    columns: dict[str, list[torch.Tensor]] = {"nats": [], "tokens": [], "bytes": [], "chars": []}
    total = len(dataloader) if hasattr(dataloader, "__len__") else max_batches
    total = min(total, max_batches) if total is not None and max_batches is not None else total
    try:
        batches = itertools.islice(dataloader, max_batches)
        with eval_mode(model), autocast:
            for batch in tqdm(batches, total=total, desc="eval", disable=not (show_progress and is_main)):
                nats, tokens, targets = score_batch(model, batch, device)
                row = {"nats": nats, "tokens": tokens}
                if table is not None:
                    row["bytes"], row["chars"] = _count_target_text(targets, *table)
                if accelerator is not None:
                    row = accelerator.gather_for_metrics(row)
                for key, value in row.items():
                    columns[key].append(value.cpu())
    finally:
        if isinstance(dataloader, DataLoaderStateMixin):
            # Leaving an accelerate dataloader early (max_batches) skips its own clean-up, and the
            # training loop's gradient sync would then keep reading this loader's end-of-data flag.
            dataloader.end()
    if not columns["nats"] or int(torch.cat(columns["tokens"]).sum()) == 0:
        raise ValueError("evaluation scored no tokens: the dataloader is empty or every target is -100")
    return EvalResult(
        per_window_nats=torch.cat(columns["nats"]),
        per_window_tokens=torch.cat(columns["tokens"]),
        per_window_bytes=torch.cat(columns["bytes"]) if table is not None else None,
        per_window_chars=torch.cat(columns["chars"]) if table is not None else None,
        bytes_exact=None if byte_table is None else byte_table.exact,
    )


def _count_target_text(
    targets: torch.Tensor, bytes_per_id: torch.Tensor, chars_per_id: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """UTF-8 bytes and characters of the scored targets, per row ([B], [B])."""
    scored = targets != IGNORE_INDEX
    if scored.any() and int(targets[scored].max()) >= len(bytes_per_id):
        raise ValueError(
            f"target id {int(targets[scored].max())} is not in the tokenizer ({len(bytes_per_id)} ids): "
            "the byte table was built from a different tokenizer than the data"
        )
    ids = targets.clamp(min=0)  # -100 would index backwards; those positions are zeroed below
    return (bytes_per_id[ids] * scored).sum(dim=1), (chars_per_id[ids] * scored).sum(dim=1)


# ----------------------------------------------------------------------------- strided windows


def strided_windows(
    input_ids: torch.Tensor, context_length: int, stride: int, labels: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Sliding windows over one long sequence, with `shift_labels` scoring each target once.

    `input_ids` is [N]; `labels` (default: `input_ids`) is [N] with -100 for tokens that must not
    be scored. The N - 1 next-token targets are covered by windows of T = min(context_length,
    N - 1) inputs starting every `stride` tokens; the last window is moved left so that it ends
    exactly at the text's end (all windows full, no padding). A target is scored only by the
    first window that reaches it, so once the text is longer than one window every scored target
    sees at least `context_length - stride` tokens before it. Returns `input_ids` and
    `shift_labels`, both [W, T].
    """
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be one sequence of shape [N], got shape {tuple(input_ids.shape)}")
    if not 1 <= stride <= context_length:
        raise ValueError(f"stride must be in [1, context_length={context_length}], got {stride}")
    labels = input_ids if labels is None else labels
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} differs from input_ids shape {tuple(input_ids.shape)}")
    n_targets = len(input_ids) - 1
    if n_targets < 1:
        raise ValueError(f"need at least 2 tokens to score a next-token prediction, got {len(input_ids)}")
    width = min(context_length, n_targets)
    begins = list(range(0, n_targets - width + 1, stride))
    if begins[-1] + width < n_targets:
        begins.append(n_targets - width)
    begins_t = torch.tensor(begins)
    positions = begins_t[:, None] + torch.arange(width)  # (W, T) index of each input token
    targets = labels[1:][positions]  # (W, T) target of input t is token t + 1
    # Targets before the previous window's end were already scored there.
    first_new = torch.cat([torch.zeros(1, dtype=torch.long), begins_t[:-1] + width])  # (W,)
    targets = targets.masked_fill(positions < first_new[:, None], IGNORE_INDEX)
    return {"input_ids": input_ids[positions], "shift_labels": targets}


def _config(model: torch.nn.Module):
    # An accelerate/DDP wrapper keeps the real model in `.module`.
    return getattr(model, "module", model).config


def _model_vocab_size(model: torch.nn.Module) -> int:
    return _config(model).vocab_size


def resolve_window(model: torch.nn.Module, context_length: int | None, stride: int | None) -> tuple[int, int]:
    """(context_length, stride): the model's maximum and half of it unless given; checked."""
    config = _config(model)
    # attribute_map makes max_position_embeddings work for MiniGPT and GPT-2; n_positions is a fallback.
    model_max = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    context_length = model_max if context_length is None else context_length
    if context_length is None:
        raise ValueError("cannot read the model's context length from its config: pass context_length")
    if context_length < 1:
        raise ValueError(f"context_length must be >= 1, got {context_length}")
    if model_max is not None and context_length > model_max:
        raise ValueError(f"context_length {context_length} exceeds the model's maximum of {model_max} positions")
    # Half a window of guaranteed context costs 2x the compute of non-overlapping windows.
    stride = max(1, context_length // 2) if stride is None else stride
    if not 1 <= stride <= context_length:
        raise ValueError(f"stride must be in [1, context_length={context_length}], got {stride}")
    return context_length, stride


def strided_perplexity(
    model: torch.nn.Module,
    input_ids: Sequence[int] | torch.Tensor,
    context_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    labels: Sequence[int] | torch.Tensor | None = None,
    max_windows: int | None = None,
    byte_table: TokenByteTable | None = None,
    accelerator=None,
    show_progress: bool = False,
) -> EvalResult:
    """Sliding-window evaluation of one long token sequence (see `strided_windows`).

    `context_length` defaults to the model's maximum and `stride` to half of it (every target
    then sees at least half a window of context). `max_windows` keeps the first windows only.
    """
    context_length, stride = resolve_window(model, context_length, stride)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    input_ids = torch.as_tensor(input_ids, dtype=torch.long)
    labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
    vocab_size = _model_vocab_size(model)
    if len(input_ids) and int(input_ids.max()) >= vocab_size:
        raise ValueError(f"token id {int(input_ids.max())} is out of range for the model's vocabulary of {vocab_size}")
    windows = strided_windows(input_ids, context_length, stride, labels)
    rows = [{key: value[i] for key, value in windows.items()} for i in range(len(windows["input_ids"]))]
    loader = DataLoader(rows[:max_windows], batch_size=batch_size)
    if accelerator is not None:
        loader = accelerator.prepare(loader)
    return evaluate_loss(model, loader, accelerator, byte_table=byte_table, show_progress=show_progress)


# ----------------------------------------------------------------------------- texts → report


def encode_documents(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """One token stream for a list of documents: (input_ids [N], labels [N]).

    Each document is preceded by the tokenizer's BOS (or else EOS) token, so its first token is
    predicted (and scored) too; the boundary tokens themselves are never scored (label -100), so
    the scored targets are exactly the documents' text. Without a BOS/EOS token the documents are
    simply concatenated and the very first token goes unscored.
    """
    boundary = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    docs = [t for t in texts if t]
    if not docs:
        raise ValueError("no text to evaluate: the input is empty")
    encoded = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
    ids: list[int] = []
    labels: list[int] = []
    for doc in encoded:
        if boundary is not None:
            ids.append(boundary)
            labels.append(IGNORE_INDEX)
        ids.extend(doc)
        labels.extend(doc)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def bootstrap_ci(
    per_window_nats: torch.Tensor | Sequence[float],
    per_window_denominator: torch.Tensor | Sequence[int],
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap interval of sum(nats) / sum(denominator), resampling windows.

    The statistic is a ratio of sums (windows hold different numbers of tokens), recomputed on
    each resample of W windows drawn with replacement. Denominator = tokens gives the loss in nats
    per token; = bytes gives nats per byte. Neighbouring windows share text, so the interval is
    somewhat optimistic for strongly autocorrelated corpora.
    """
    nats = np.asarray(per_window_nats, dtype=np.float64)
    denominator = np.asarray(per_window_denominator, dtype=np.float64)
    if nats.shape != denominator.shape or nats.ndim != 1:
        raise ValueError(f"need two 1-D arrays of equal length, got shapes {nats.shape} and {denominator.shape}")
    if len(nats) < 2:
        raise ValueError(f"a bootstrap over windows needs at least 2 windows, got {len(nats)}")
    if not 0 < alpha < 1 or n_resamples < 1:
        raise ValueError(f"need 0 < alpha < 1 and n_resamples >= 1, got alpha={alpha}, n_resamples={n_resamples}")
    rng = np.random.default_rng(seed)
    stats = np.empty(n_resamples)
    # Resample in chunks of ~4M indices so a 100k-window corpus does not need gigabytes.
    chunk = max(1, 4_000_000 // len(nats))
    for start in range(0, n_resamples, chunk):
        idx = rng.integers(0, len(nats), size=(min(chunk, n_resamples - start), len(nats)))
        stats[start : start + len(idx)] = nats[idx].sum(axis=1) / np.maximum(denominator[idx].sum(axis=1), 1e-12)
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


@dataclass
class MetricsReport:
    """Everything one evaluation reports; `to_dict()` is what goes into the JSON file."""

    loss: float  # nats per token
    perplexity: float
    bits_per_token: float
    n_tokens: int
    n_windows: int
    bits_per_byte: float | None = None
    bits_per_char: float | None = None
    n_bytes: int | None = None
    n_chars: int | None = None
    bytes_exact: bool | None = None
    confidence: float | None = None  # e.g. 0.95; None when no bootstrap was run
    loss_ci: tuple[float, float] | None = None
    perplexity_ci: tuple[float, float] | None = None
    bits_per_byte_ci: tuple[float, float] | None = None
    context_length: int | None = None
    stride: int | None = None

    @classmethod
    def from_result(
        cls,
        result: EvalResult,
        n_resamples: int = 1000,
        seed: int = 0,
        alpha: float = 0.05,
        context_length: int | None = None,
        stride: int | None = None,
    ) -> MetricsReport:
        """Derive every metric from the per-window sums; bootstrap when asked and W >= 2."""
        report = cls(
            loss=result.loss,
            perplexity=result.perplexity,
            bits_per_token=result.loss / LN2,
            n_tokens=result.n_tokens,
            n_windows=result.n_windows,
            n_bytes=result.n_bytes,
            n_chars=result.n_chars,
            bytes_exact=result.bytes_exact,
            context_length=context_length,
            stride=stride,
        )
        if result.n_bytes:
            report.bits_per_byte = bits_per_byte(result.total_nats, result.n_bytes)
        if result.n_chars:
            report.bits_per_char = bits_per_char(result.total_nats, result.n_chars)
        if n_resamples > 0 and result.n_windows >= 2:
            report.confidence = 1 - alpha
            report.loss_ci = bootstrap_ci(result.per_window_nats, result.per_window_tokens, n_resamples, seed, alpha)
            report.perplexity_ci = (perplexity(report.loss_ci[0]), perplexity(report.loss_ci[1]))
            if result.n_bytes:
                # Same seed, same resampled windows: the two intervals describe the same draws.
                low, high = bootstrap_ci(result.per_window_nats, result.per_window_bytes, n_resamples, seed, alpha)
                report.bits_per_byte_ci = (low / LN2, high / LN2)
        return report

    def to_dict(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    def to_text(self) -> str:
        """A short human-readable summary."""

        def with_ci(value: float, ci: tuple[float, float] | None, fmt: str) -> str:
            band = f"  [{ci[0]:{fmt}}, {ci[1]:{fmt}}]" if ci else ""
            return f"{value:{fmt}}{band}"

        level = f" ({self.confidence:.0%} bootstrap CI over {self.n_windows} windows)" if self.confidence else ""
        lines = [
            f"loss (nats/token)   {with_ci(self.loss, self.loss_ci, '.4f')}{level}",
            f"perplexity          {with_ci(self.perplexity, self.perplexity_ci, '.3f')}",
            f"bits per token      {self.bits_per_token:.4f}",
        ]
        if self.bits_per_byte is not None:
            note = "" if self.bytes_exact else "  (approximate: tokenizer is not byte-level)"
            lines.append(f"bits per byte       {with_ci(self.bits_per_byte, self.bits_per_byte_ci, '.4f')}{note}")
        if self.bits_per_char is not None:
            lines.append(f"bits per character  {self.bits_per_char:.4f}")
        counts = f"{self.n_tokens:,} tokens"
        if self.n_bytes is not None:
            counts += f", {self.n_bytes:,} bytes, {self.n_chars:,} characters"
        lines.append(f"scored              {counts} in {self.n_windows:,} windows")
        if self.context_length is not None:
            lines.append(f"windows             context {self.context_length}, stride {self.stride}")
        return "\n".join(lines)


def evaluate_texts(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    context_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    max_windows: int | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    accelerator=None,
    show_progress: bool = False,
) -> MetricsReport:
    """Full report for raw documents: tokenize, strided windows, loss, bits/byte, bootstrap CI."""
    check_tokenizer(tokenizer, _model_vocab_size(model))
    input_ids, labels = encode_documents(tokenizer, texts)
    context_length, stride = resolve_window(model, context_length, stride)
    result = strided_perplexity(
        model,
        input_ids,
        context_length=context_length,
        stride=stride,
        batch_size=batch_size,
        labels=labels,
        max_windows=max_windows,
        byte_table=token_byte_table(tokenizer),
        accelerator=accelerator,
        show_progress=show_progress,
    )
    return MetricsReport.from_result(result, n_bootstrap, seed, alpha, context_length, stride)


# ----------------------------------------------------------------------------- classification


@dataclass
class ClassificationReport:
    loss: float  # mean cross-entropy per example, nats
    accuracy: float
    confusion: list[list[int]]  # [true label][predicted label] counts
    labels: list[str]  # names, in id order

    @property
    def n_examples(self) -> int:
        return sum(map(sum, self.confusion))

    def to_dict(self) -> dict[str, Any]:
        return {
            "loss": self.loss,
            "accuracy": self.accuracy,
            "n_examples": self.n_examples,
            "labels": self.labels,
            "confusion_matrix": self.confusion,
        }

    def format_confusion(self) -> str:
        """The confusion matrix as a text table: rows are true labels, columns predictions."""
        corner = "true \\ predicted"
        first = max(len(corner), *(len(name) for name in self.labels)) + 2
        width = max(6, *(len(name) for name in self.labels)) + 2
        head = corner.ljust(first) + "".join(name.rjust(width) for name in self.labels)
        rows = [
            name.ljust(first) + "".join(str(count).rjust(width) for count in row)
            for name, row in zip(self.labels, self.confusion, strict=True)
        ]
        return "\n".join([head, *rows])


@torch.no_grad()
def evaluate_classifier(
    model: torch.nn.Module, dataloader: Iterable[Mapping[str, torch.Tensor]], labels: Sequence[str], accelerator=None
) -> ClassificationReport:
    """Loss, accuracy and confusion matrix over `dataloader` (gathered over processes)."""
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    losses, predicted, true = [], [], []
    with eval_mode(model):
        for batch in dataloader:
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits  # (B, num_labels)
            row = {
                "loss": F.cross_entropy(logits.float(), batch["labels"], reduction="none"),
                "predicted": logits.argmax(dim=-1),
                "true": batch["labels"],
            }
            if accelerator is not None:
                row = accelerator.gather_for_metrics(row)
            losses.append(row["loss"].cpu())
            predicted.append(row["predicted"].cpu())
            true.append(row["true"].cpu())
    if not losses:
        raise ValueError("evaluation saw no examples: the dataloader is empty")
    predicted, true = torch.cat(predicted), torch.cat(true)
    n = len(labels)
    confusion = torch.bincount(true * n + predicted, minlength=n * n).view(n, n)
    return ClassificationReport(
        loss=torch.cat(losses).mean().item(),
        accuracy=(predicted == true).float().mean().item(),
        confusion=confusion.tolist(),
        labels=list(labels),
    )


# ----------------------------------------------------------------------------- exact match


def exact_match(prediction: str, expected: str) -> bool:
    """True when the two are equal after stripping surrounding whitespace only.

    Case, punctuation and inner spacing all count: "3, 7" does not match "3,7". Stripping
    the ends forgives the newline or space a model may emit before stopping, nothing more.
    """
    return prediction.strip() == expected.strip()


def exact_match_accuracy(predictions: Sequence[str], expected: Sequence[str]) -> float:
    """Fraction of predictions that `exact_match` their expected answer."""
    if len(predictions) != len(expected):
        raise ValueError(f"{len(predictions)} predictions for {len(expected)} expected answers")
    if not predictions:
        raise ValueError("exact_match_accuracy needs at least one prediction")
    return sum(exact_match(p, e) for p, e in zip(predictions, expected, strict=True)) / len(predictions)


def score_generations(records: Sequence[Mapping[str, str]], answers: Sequence[str]) -> list[dict[str, Any]]:
    """One {instruction, input, expected, generated, exact_match[, kind]} row per record."""
    rows = []
    for record, answer in zip(records, answers, strict=True):
        row = {
            "instruction": record["instruction"],
            "input": record.get("input") or "",
            "expected": record["output"],
            "generated": answer,
            "exact_match": exact_match(answer, record["output"]),
        }
        if "kind" in record:
            row["kind"] = record["kind"]
        rows.append(row)
    return rows


def exact_match_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Overall exact match and, for task records, per kind (`exact_match_<kind>`)."""
    summary = {"val_exact_match": sum(r["exact_match"] for r in rows) / len(rows)}
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        if "kind" in row:
            by_kind[row["kind"]].append(row["exact_match"])
    summary.update({f"exact_match_{kind}": sum(hits) / len(hits) for kind, hits in sorted(by_kind.items())})
    return summary


# ----------------------------------------------------------------------------- repetition of free text


def distinct_n(ids: Sequence[int], n: int = 2) -> float:
    """Distinct-n (Li et al., 2016): unique n-grams / n-grams in a generated sequence of token ids.

    1.0 means no n-gram repeats; a model stuck in a loop (one line again and again, runs of
    newlines) scores near 1 / the loop's length. Token ids rather than words, so a run of
    newline tokens counts as repetition too.
    """
    if n < 1:
        raise ValueError(f"distinct-n needs n >= 1, got {n}")
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    if not grams:
        raise ValueError(f"distinct-{n} needs at least {n} tokens, got {len(ids)}")
    return len(set(grams)) / len(grams)
