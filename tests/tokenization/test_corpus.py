"""tokenization/corpus.py: one source opener for every consumer; files read strictly as UTF-8, in pieces."""

from __future__ import annotations

import json
import os

import pytest

from tokenization import (
    learned_merges,
    train_bpe,
)
from tokenization.corpus import (
    DataError,
    DataFileNotFoundError,
    open_source,
    read_records,
    read_utf8_chunks,
)
from tokenization.reference_bpe import count_words


def test_sources_files_strings_and_dataset_learn_the_same_merges(pydoc_text, tmp_path):
    import datasets

    docs = pydoc_text[:40_000].split("\n\n")
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(docs), encoding="utf-8")
    from_file = train_bpe(path, 400, show_progress=False)
    from_strings = train_bpe(["\n\n".join(docs)], 400, show_progress=False)
    from_dataset = train_bpe(
        datasets.Dataset.from_dict({"body": ["\n\n".join(docs)]}), 400, text_column="body", show_progress=False
    )
    from_generator = train_bpe((text for text in ["\n\n".join(docs)]), 400, show_progress=False)
    assert learned_merges(from_file) == learned_merges(from_strings) == learned_merges(from_dataset)
    assert learned_merges(from_generator) == learned_merges(from_file)
    assert len(learned_merges(from_file)) == 400 - 258


def test_file_chunks_do_not_change_pre_tokenization(pydoc_text, tmp_path):
    # Cutting a file into pieces for the trainer must count exactly the words of the whole.
    path = tmp_path / "corpus.txt"
    text = pydoc_text[:60_000] + "\n\nend\n  \n\n"
    path.write_text(text, encoding="utf-8")
    chunks = list(read_utf8_chunks(path, chunk_chars=500))
    assert len(chunks) > 20 and "".join(chunks) == text
    assert count_words(chunks) == count_words([text])


def test_sources_of_the_wrong_type_are_named():
    import datasets

    with pytest.raises(TypeError, match="item 1 of the source is a int"):
        train_bpe(["fine", 3], 300, show_progress=False)
    with pytest.raises(TypeError, match=r"DatasetDict with splits \['train'\]"):
        train_bpe(
            datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})}), 300, show_progress=False
        )
    with pytest.raises(ValueError, match=r"text_column='body' is not a column.*\['text'\]"):
        train_bpe(datasets.Dataset.from_dict({"text": ["a b"]}), 300, text_column="body", show_progress=False)


def test_missing_unreadable_and_directory_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt does not exist"):
        train_bpe(tmp_path / "nope.txt", 300, show_progress=False)
    with pytest.raises(ValueError, match="not a regular file"):
        train_bpe(tmp_path, 300, show_progress=False)
    locked = tmp_path / "locked.txt"
    locked.write_text("text")
    locked.chmod(0)
    if os.access(locked, os.R_OK):  # root ignores permissions
        pytest.skip("running as root: cannot make a file unreadable")
    with pytest.raises(PermissionError, match="locked.txt is not readable"):
        train_bpe([locked], 300, show_progress=False)


def test_non_utf8_file_names_file_offset_and_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("first line\nsecond café line\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: not valid UTF-8 at byte offset 21 \(line 2\)"):
        train_bpe([path], 300, show_progress=False)


def test_a_text_passed_as_a_single_str_is_not_taken_for_a_path():
    with pytest.raises(ValueError, match=r"looks like text.*train_bpe\(\[text\]"):
        train_bpe("many lines\nof text\n", 300, show_progress=False)


# ----------------------------------------------------------------------------- one opener for every consumer


def test_a_record_file_is_the_same_texts_for_tokenizer_training_pretraining_and_records(pydoc_text, tmp_path):
    from training.data.windows import load_corpus

    texts = [pydoc_text[i : i + 3000] for i in range(0, 30_000, 3000)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    assert learned_merges(train_bpe(path, 400, show_progress=False)) == learned_merges(
        train_bpe(texts, 400, show_progress=False)
    )
    assert load_corpus(path, cache_dir=tmp_path / "cache")["text"] == texts
    assert [record["text"] for _, record in read_records(str(path))] == texts


def test_a_folder_of_text_files_is_its_files_in_sorted_order(pydoc_text, tmp_path):
    folder = tmp_path / "texts"
    (folder / "b").mkdir(parents=True)
    for name, start in (("b/2.txt", 0), ("a.txt", 9000)):
        (folder / name).write_text(pydoc_text[start : start + 9000], encoding="utf-8")
    opened = open_source(folder)
    assert opened.files == (folder / "a.txt", folder / "b" / "2.txt")
    assert learned_merges(train_bpe(folder, 350, show_progress=False)) == learned_merges(
        train_bpe(list(opened.files), 350, show_progress=False)
    )


def test_a_saved_dataset_dict_opens_as_its_split_and_names_the_missing_one(tmp_path):
    import datasets

    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a b c"]})}).save_to_disk(folder)
    assert open_source(folder).dataset["text"] == ["a b c"]
    with pytest.raises(DataError, match=r"holds the splits \['train'\] but no 'test' split"):
        open_source(folder, split="test")


def test_a_missing_file_is_named_with_the_flag_that_gave_it(tmp_path):
    with pytest.raises(DataFileNotFoundError, match=r"^--train_file .*gone\.jsonl does not exist"):
        open_source(str(tmp_path / "gone.jsonl"), what="--train_file")
    with pytest.raises(DataError, match=r"^--files .*gone\.txt does not exist"):
        open_source([tmp_path / "gone.txt"], what="--files")
