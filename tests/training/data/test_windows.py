"""training/data/windows.py: the pretraining data pipeline (windows, tokenization, caching, splits, streaming, bad
input) and the seeded hold-out of records."""

from __future__ import annotations

import copy
import hashlib
import multiprocessing
import os
import pickle
import signal
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from helpers.texts import encode_reference

from tokenization.corpus import DataError
from training.data import windows as data
from training.data.collate import collate_windows
from training.data.windows import (
    build_lm_datasets,
    count_windows,
    is_validation_document,
    load_corpus,
    sliding_windows,
    split_indices,
    tokenize_documents,
)

datasets.disable_progress_bars()


@pytest.fixture()
def small_blocks(monkeypatch):
    """Blocks of ~1000 window tokens, so even a small corpus crosses many block boundaries."""
    monkeypatch.setattr(data, "BLOCK_WINDOW_TOKENS", 1000)


def book_windows(ids, context_length: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """The book's GPTDatasetV1 loop."""
    inputs, targets = [], []
    for i in range(0, len(ids) - context_length, stride):
        inputs.append(ids[i : i + context_length])
        targets.append(ids[i + 1 : i + context_length + 1])
    return np.array(inputs).reshape(-1, context_length), np.array(targets).reshape(-1, context_length)


def rows(windows) -> list[tuple]:
    return [(tuple(w["input_ids"]), w["doc_id"], w["offset"]) for w in windows]


# ----------------------------------------------------------------------------- pure windows


@pytest.mark.parametrize("context_length,stride", [(8, 8), (8, 3), (8, 1), (16, 5), (5, 5)])
def test_sliding_windows_equal_the_books_loop(context_length, stride):
    ids = np.random.default_rng(0).integers(0, 500, size=203)
    windows = sliding_windows(ids, context_length, stride)
    inputs, targets = book_windows(ids, context_length, stride)
    assert windows.shape == (count_windows(len(ids), context_length, stride), context_length + 1)
    np.testing.assert_array_equal(windows[:, :-1], inputs)
    np.testing.assert_array_equal(windows[:, 1:], targets)


def test_sliding_windows_of_a_short_stream_is_empty():
    assert sliding_windows(np.arange(8), 8, 4).shape == (0, 9)
    assert sliding_windows(np.arange(9), 8, 4).shape == (1, 9)
    assert count_windows(8, 8, 4) == 0


# ----------------------------------------------------------------------------- pipeline output


def test_windows_cover_the_eos_joined_stream_across_block_boundaries(documents, tiny_tokenizer, tmp_path, small_blocks):
    L, stride = 16, 5
    splits = build_lm_datasets(
        documents, tiny_tokenizer, context_length=L, stride=stride, validation_fraction=0, cache_dir=tmp_path
    )
    reference = encode_reference(tiny_tokenizer, documents)
    stream = np.concatenate(reference)
    expected = sliding_windows(stream, L, stride)
    windows = splits["train"].with_format("numpy")[:]
    np.testing.assert_array_equal(windows["input_ids"], expected)

    # doc_id / offset locate each window: blank documents 3 and 4 are skipped but keep their ids
    doc_ids = [i for i, d in enumerate(documents) if d.strip()]
    doc_start = dict(zip(doc_ids, np.concatenate([[0], np.cumsum([len(r) for r in reference])[:-1]]), strict=False))
    positions = [doc_start[d] + o for d, o in zip(windows["doc_id"], windows["offset"], strict=True)]
    assert positions == list(range(0, stride * len(expected), stride))
    assert 3 not in windows["doc_id"] and 4 not in windows["doc_id"]


def test_a_file_read_in_pieces_tokenizes_like_the_whole_file(pydoc_text, tiny_tokenizer, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(pydoc_text[:60_000], encoding="utf-8")
    docs = load_corpus([path], cache_dir=tmp_path / "cache", chunk_chars=2_000)
    assert len(docs) > 20 and docs["doc_end"] == [False] * (len(docs) - 1) + [True]
    assert "".join(docs["text"]) == path.read_text(encoding="utf-8")
    tokens = tokenize_documents(docs, tiny_tokenizer)
    stream = np.concatenate(tokens.with_format("numpy")["input_ids"])
    np.testing.assert_array_equal(stream, encode_reference(tiny_tokenizer, [path.read_text(encoding="utf-8")])[0])


def test_files_split_on_a_doc_separator_and_continue_doc_ids(tmp_path, tiny_tokenizer):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("alpha text<SEP>beta text<SEP>  \n<SEP>gamma", encoding="utf-8")
    second.write_text("delta<SEP>epsilon\n", encoding="utf-8")
    docs = load_corpus([first, second], doc_separator="<SEP>", cache_dir=tmp_path / "cache")
    assert docs["text"] == ["alpha text", "beta text", "gamma", "delta", "epsilon\n"]
    assert docs["doc_id"] == [0, 1, 3, 4, 5]  # the blank document 2 is skipped, its id kept


def test_dataset_sources_give_the_same_windows_as_texts(documents, tiny_tokenizer, tmp_path):
    kwargs = dict(context_length=16, stride=16, validation_fraction=0, cache_dir=tmp_path / "cache")
    expected = rows(build_lm_datasets(documents, tiny_tokenizer, **kwargs)["train"])
    table = datasets.Dataset.from_dict({"content": documents, "n": list(range(len(documents)))})
    table.save_to_disk(str(tmp_path / "saved"))
    table.to_json(str(tmp_path / "docs.jsonl"))
    tiny_tokenizer.save_pretrained(tmp_path / "tokenizer")
    for source in (table, tmp_path / "saved", str(tmp_path / "docs.jsonl")):
        got = build_lm_datasets(source, tmp_path / "tokenizer", text_column="content", **kwargs)["train"]
        assert rows(got) == expected, source


def test_gpt2_windows_of_the_verdict_equal_the_books(shared_data, tmp_path):
    from tokenization import gpt2_tiktoken_encoding, load_gpt2_tokenizer

    gpt2 = shared_data / "gpt2"
    tokenizer = load_gpt2_tokenizer(gpt2 / "encoder.json", gpt2 / "vocab.bpe")
    verdict = shared_data / "the-verdict.txt"
    ids = gpt2_tiktoken_encoding(gpt2 / "encoder.json", gpt2 / "vocab.bpe").encode(verdict.read_text(encoding="utf-8"))
    assert len(ids) == 5145
    splits = build_lm_datasets(
        verdict, tokenizer, context_length=256, stride=128, validation_fraction=0, cache_dir=tmp_path
    )
    batch = collate_windows(list(splits["train"]))
    inputs, targets = book_windows(ids + [tokenizer.eos_token_id], 256, 128)  # ours ends the document with eos
    np.testing.assert_array_equal(batch["input_ids"].numpy(), inputs)
    np.testing.assert_array_equal(batch["shift_labels"].numpy(), targets)


def test_tokenizing_in_several_processes_gives_the_same_windows(pydoc_text, tiny_tokenizer, tmp_path):
    """num_proc=2 forks workers; a thread pool the parent already started must not hang them."""
    documents = [pydoc_text[start : start + 40_000] for start in range(0, 320_000, 40_000)]  # batches big enough
    kwargs = dict(context_length=64, stride=64, validation_fraction=0)  # for the encoder to use its threads
    expected = rows(build_lm_datasets(documents, tiny_tokenizer, **kwargs, cache_dir=tmp_path / "one")["train"])
    result = tmp_path / "windows.pkl"

    def run() -> None:
        os.setpgrp()  # its own process group, so a hung run can be killed with its workers
        splits = build_lm_datasets(documents, tiny_tokenizer, **kwargs, num_proc=2, cache_dir=tmp_path / "two")
        result.write_bytes(pickle.dumps(rows(splits["train"])))

    child = multiprocessing.get_context("fork").Process(target=run)
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        os.killpg(child.pid, signal.SIGKILL)
        child.join()
        pytest.fail(
            "build_lm_datasets(num_proc=2) hung: a forked worker waited on a thread pool inherited from its parent"
        )
    assert child.exitcode == 0
    assert pickle.loads(result.read_bytes()) == expected
    assert list((tmp_path / "two").rglob("*_00001_of_00002.arrow"))  # two processes did tokenize


def test_auto_num_proc_starts_processes_only_for_megabytes(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 32)
    # Pieces of 64K characters: under 2 MB in-process, then one process per MB, at most 8.
    assert [data.auto_num_proc(n) for n in (1, 31, 32, 100, 10_000)] == [1, 1, 2, 6, 8]
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert data.auto_num_proc(10_000) == 2


# ----------------------------------------------------------------------------- caching


def test_a_second_run_reads_the_cache_instead_of_tokenizing(documents, tiny_tokenizer, tmp_path, monkeypatch):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(documents), encoding="utf-8")
    kwargs = dict(context_length=16, stride=8, cache_dir=tmp_path / "cache")
    first = build_lm_datasets([path], tiny_tokenizer, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("re-tokenized")

    monkeypatch.setattr(data, "encode_batch_fast", refuse)
    second = build_lm_datasets([path], tiny_tokenizer, **kwargs)
    for split in ("train", "validation"):
        assert second[split].cache_files == first[split].cache_files
        assert second[split]["input_ids"] == first[split]["input_ids"]
    # The cache is keyed on the file's content: an edited file is tokenized again.
    path.write_text("\n\n".join(documents) + "\nOne more line.", encoding="utf-8")
    with pytest.raises(AssertionError, match="re-tokenized"):
        build_lm_datasets([path], tiny_tokenizer, **kwargs)


def test_windows_saved_once_are_loaded_by_later_calls(documents, tiny_tokenizer, tmp_path):
    kwargs = dict(context_length=16, stride=8, cache_dir=tmp_path / "cache")
    fresh = build_lm_datasets(documents, tiny_tokenizer, **kwargs)
    folder = tmp_path / "windows" / "key"

    def fail():
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError, match="killed mid-build"):
        data.saved_windows(folder, fail)
    assert not folder.exists()  # nothing a later run could take for windows
    built, reused = data.saved_windows(folder, lambda: build_lm_datasets(documents, tiny_tokenizer, **kwargs))
    assert not reused

    def refuse():
        raise AssertionError("tokenized again")

    loaded, reused = data.saved_windows(folder, refuse)
    assert reused
    assert sorted(p.name for p in folder.parent.iterdir()) == ["key"]  # the staging folder is gone
    for split in ("train", "validation"):
        assert all(Path(f["filename"]).is_relative_to(folder) for f in loaded[split].cache_files)  # memory-mapped
        assert loaded[split].to_dict() == built[split].to_dict() == fresh[split].to_dict()
        assert loaded[split].features == fresh[split].features


def test_a_source_is_identified_once_by_its_bytes_for_caches_and_with_its_path_for_a_resume(documents, tmp_path):
    text = "\n\n".join(documents)
    one, two = tmp_path / "one.txt", tmp_path / "b" / "two.txt"
    one.write_text(text, encoding="utf-8")
    two.parent.mkdir()
    two.write_text(text, encoding="utf-8")
    os.utime(two, (0, 0))
    # The record a run fingerprint holds: path, size and the SHA-256 that hashlib gives the bytes.
    size, sha256 = len(one.read_bytes()), hashlib.sha256(one.read_bytes()).hexdigest()
    assert data.source_identity(one).record == {"path": str(one.resolve()), "size": size, "sha256": sha256}
    assert data.source_identity(tmp_path / "b").record == {
        "path": str((tmp_path / "b").resolve()),
        "files": {"two.txt": sha256},
    }
    assert data.source_identity("some/dataset-name") == data.SourceIdentity("some/dataset-name", None)
    # The content, which names the caches: the bytes, not the path or the date.
    assert data.source_identity(one).content == data.source_identity(two).content
    assert (
        data.source_identity(tmp_path / "b").content == data.source_identity(one).content
    )  # a folder of the same file
    two.write_text(text + ".", encoding="utf-8")
    assert data.source_identity(two).content != data.source_identity(one).content
    # In-memory texts are hashed with their boundaries.
    assert (
        load_corpus([text], cache_dir=tmp_path)._fingerprint
        != load_corpus([text[:10], text[10:]], cache_dir=tmp_path)._fingerprint
    )


# ----------------------------------------------------------------------------- validation split


def stream_identities(tokenizer, documents: list[str], doc_order: list[int]):
    """The token stream of documents `doc_order`: (ids, doc_id of each token, offset in its doc)."""
    reference = dict(
        zip([i for i, d in enumerate(documents) if d.strip()], encode_reference(tokenizer, documents), strict=True)
    )
    ids = np.concatenate([reference[d] for d in doc_order])
    doc = np.concatenate([np.full(len(reference[d]), d) for d in doc_order])
    offset = np.concatenate([np.arange(len(reference[d])) for d in doc_order])
    return ids, doc, offset


def covered_tokens(windows, tokenizer, documents, doc_order, L) -> set[tuple[int, int]]:
    """(doc_id, offset) of every token of every window, checking the windows' ids on the way."""
    ids, doc, offset = stream_identities(tokenizer, documents, doc_order)
    start_of = {int(d): int(np.flatnonzero(doc == d)[0]) for d in doc_order}
    w = windows.with_format("numpy")[:]
    span = np.array([start_of[d] for d in w["doc_id"]])[:, None] + w["offset"][:, None] + np.arange(L + 1)  # (W, L+1)
    np.testing.assert_array_equal(w["input_ids"], ids[span])
    positions = np.unique(span)
    return set(zip(doc[positions].tolist(), offset[positions].tolist(), strict=True))


@pytest.mark.parametrize("split_by", ["tokens", "documents"])
def test_no_validation_token_is_inside_a_training_window(split_by, documents, tiny_tokenizer, tmp_path, small_blocks):
    L = 16
    splits = build_lm_datasets(
        documents,
        tiny_tokenizer,
        context_length=L,
        stride=4,
        validation_fraction=0.2,
        split_by=split_by,
        cache_dir=tmp_path,
    )
    doc_ids = [i for i, d in enumerate(documents) if d.strip()]
    if split_by == "tokens":
        train_order = validation_order = doc_ids
    else:
        held_out = is_validation_document(np.array(doc_ids), 0.2)
        train_order = [d for d, v in zip(doc_ids, held_out, strict=True) if not v]
        validation_order = [d for d, v in zip(doc_ids, held_out, strict=True) if v]
        assert validation_order == [9, 14, 19, 24, 29]  # every 5th (4 is blank), spread out, not the tail
    train = covered_tokens(splits["train"], tiny_tokenizer, documents, train_order, L)
    validation = covered_tokens(splits["validation"], tiny_tokenizer, documents, validation_order, L)
    assert train and validation
    assert not train & validation
    if split_by == "tokens":  # exactly the last 20 % of the stream is held out
        _, doc, offset = stream_identities(tiny_tokenizer, documents, doc_ids)
        cut = len(doc) - round(0.2 * len(doc))
        assert train <= set(zip(doc[:cut].tolist(), offset[:cut].tolist(), strict=True))
        assert validation <= set(zip(doc[cut:].tolist(), offset[cut:].tolist(), strict=True))


# ----------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("source_kind", ["texts", "files"])
def test_streaming_gives_the_same_windows(source_kind, documents, tiny_tokenizer, tmp_path, small_blocks):
    if source_kind == "files":
        source = []
        for i, doc in enumerate(documents):
            source.append(tmp_path / f"doc{i:02d}.txt")
            source[-1].write_text(doc, encoding="utf-8")
    else:
        source = documents
    kwargs = dict(context_length=16, stride=6, validation_fraction=0.25, split_by="documents")
    in_memory = build_lm_datasets(source, tiny_tokenizer, **kwargs, cache_dir=tmp_path / "cache")
    streamed = build_lm_datasets(source, tiny_tokenizer, **kwargs, streaming=True)
    assert isinstance(streamed["train"], datasets.IterableDataset)
    for split in ("train", "validation"):
        assert rows(streamed[split]) == rows(in_memory[split])
    loader = torch.utils.data.DataLoader(streamed["train"], batch_size=4, collate_fn=collate_windows)
    assert next(iter(loader))["input_ids"].shape == (4, 16)


# ----------------------------------------------------------------------------- bad input


def assert_nothing_half_written(cache_dir: Path) -> None:
    """No partial dataset (datasets builds in `*.incomplete` folders, maps into `tmp*` files);
    empty `.lock` files are left by every run, finished or not."""
    leftovers = [
        p for p in cache_dir.rglob("*") if p.suffix != ".lock" and ("incomplete" in p.name or p.name.startswith("tmp"))
    ]
    assert not leftovers, leftovers


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "empty or whitespace-only"),
        (b"  \n\n\t \n", "empty or whitespace-only"),
        (
            b"Hello there.\nSome more text; a short file.\n",
            r"corpus .*bad\.txt has 29 tokens, fewer than one window of .* = 65",
        ),
        (b"caf\xc3\xa9 ok\nthen \xff\xfe bad\n", r"bad\.txt: not valid UTF-8 at byte offset 14 \(line 2\)"),
    ],
    ids=["empty", "whitespace", "shorter-than-a-window", "not-utf8"],
)
@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streaming"])
def test_bad_corpus_files_stop_with_a_clear_message(content, message, streaming, tiny_tokenizer, tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=message):
        build_lm_datasets(
            path, tiny_tokenizer, context_length=64, streaming=streaming, validation_fraction=0, cache_dir=cache
        )
    if cache.exists():
        assert_nothing_half_written(cache)
        if "29 tokens" not in message:  # reading failed: no dataset at all was written
            assert not list(cache.rglob("*.arrow"))


@pytest.mark.parametrize(
    "source,kwargs,message",
    [
        ([], {}, "empty or whitespace-only"),
        (["", " \n"], {}, "empty or whitespace-only"),
        (["fine text", 42], {}, "document 1 of the texts is a int, not a str"),
        (
            ["some text " * 200],
            {"validation_fraction": 0.01},
            r"validation range \(last 12 tokens\) has 12 tokens, fewer than",
        ),
        (["some text " * 200], {"stride": 65}, r"stride must be in \[1, context_length=64\]"),
        (["some text " * 200], {"split_by": "tokens", "streaming": True}, "needs the corpus length"),
        (
            ["some text " * 200],
            {"vocab_size": 50257},
            "the tokenizer has 512 tokens but the model's vocab_size is 50257",
        ),
    ],
    ids=[
        "no-documents",
        "blank-documents",
        "not-a-string",
        "validation-too-short",
        "stride",
        "streaming-token-split",
        "vocab",
    ],
)
def test_bad_texts_and_settings_stop_with_a_clear_message(source, kwargs, message, tiny_tokenizer, tmp_path):
    with pytest.raises(DataError, match=message):
        build_lm_datasets(source, tiny_tokenizer, **{"context_length": 64, "cache_dir": tmp_path, **kwargs})
    assert_nothing_half_written(tmp_path)


def test_a_missing_corpus_file_is_named(tiny_tokenizer, tmp_path):
    (tmp_path / "there.txt").write_text("Some text. " * 100, encoding="utf-8")
    for source in (
        tmp_path / "missing.txt",
        str(tmp_path / "missing.txt"),
        [tmp_path / "there.txt", tmp_path / "missing.txt"],
    ):
        with pytest.raises(DataError, match=r"corpus file .*missing\.txt does not exist"):
            build_lm_datasets(source, tiny_tokenizer, context_length=8, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_a_missing_text_column_lists_the_columns(tiny_tokenizer, tmp_path):
    table = datasets.Dataset.from_dict({"body": ["text"], "id": [1]})
    with pytest.raises(
        DataError, match=r"text_column='text' is not a column of the dataset; its columns are \['body', 'id'\]"
    ):
        build_lm_datasets(table, tiny_tokenizer, context_length=8, cache_dir=tmp_path)


def test_missing_or_unsuitable_tokenizers_are_refused_before_reading(tiny_tokenizer, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("Some text. " * 100, encoding="utf-8")
    cache = tmp_path / "cache"
    other_eos = copy.deepcopy(tiny_tokenizer)
    other_eos.eos_token = "<|pad|>"
    for tokenizer, message in [
        (None, "no tokenizer given"),
        (tmp_path / "no_such_tokenizer", r"no tokenizer at .*no_such_tokenizer"),
        (other_eos, r"eos token is '<\|pad\|>', but documents are joined with '<\|endoftext\|>'"),
    ]:
        with pytest.raises(DataError, match=message):
            build_lm_datasets(path, tokenizer, context_length=8, cache_dir=cache)
    assert not cache.exists()  # refused before anything was read or written


# ----------------------------------------------------------------------------- the embedded corpus, held-out records


def test_embedded_corpus_is_cpython_documentation(tiny_tokenizer, tmp_path):
    from tokenization import EMBEDDED_CORPUS, embedded_documents
    from training.data.windows import load_corpus

    docs = embedded_documents()
    assert len(docs) > 50 and sum(map(len, docs)) > 400_000
    corpus = load_corpus(EMBEDDED_CORPUS, cache_dir=tmp_path)
    assert corpus[0]["text"] == docs[0]
    assert len(set(corpus["doc_id"])) == len(docs)


def test_split_indices_is_seeded_disjoint_and_complete():
    kept, held = split_indices(50, 0.2, seed=3)
    assert len(held) == 10 and len(kept) == 40 and sorted(kept + held) == list(range(50))
    assert split_indices(50, 0.2, seed=3) == (kept, held) and split_indices(50, 0.2, seed=4) != (kept, held)
    assert len(split_indices(5, 0.01, seed=0)[1]) == 1  # at least one held out
    with pytest.raises(ValueError, match="at least 2"):
        split_indices(1, 0.5, seed=0)
