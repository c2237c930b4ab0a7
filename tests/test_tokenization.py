"""Tests for the `tokenization` package: training, HF integration, GPT-2 parity, visible BPE.

Reference-trainer equality: `tokenization.reference_bpe` reproduces tokenizers' BpeTrainer
merge for merge. The library's tie-break (tokenizers/src/models/bpe/trainer.rs, `impl Ord for
Merge`): highest pair count first; among equal counts the pair with the smallest
(left id, right id), where ids are special tokens first, then the 256 byte symbols sorted by
code point, then new tokens in creation order. The tests below assert the full merge lists and
vocabularies are identical, including on a corpus built so that every choice is a tie.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import decoders
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import tokenization
from tokenization import (
    EOS_TOKEN,
    PAD_TOKEN,
    alpaca_messages,
    encode_batch_fast,
    format_example,
    format_merge_table,
    format_merge_trace,
    format_prompt,
    learned_merges,
    merge_table,
    merge_trace,
    merge_trace_figure,
    token_boundaries_figure,
    token_boundaries_html,
    train_bpe,
    train_reference_bpe,
)
from modeling_minigpt.files import save_figure
from tokenization.corpus import read_utf8_chunks
from tokenization.pretokenize import pretokenize, split_on_special_tokens
from tokenization.reference_bpe import count_words
from tokenization.train import check_round_trip, check_special_tokens_atomic
from tokenization.visualize import token_spans

REPO_ROOT = Path(__file__).resolve().parents[1]

# Everything byte-level BPE must survive: emoji (with ZWJ), CJK, combining marks, tabs, runs of
# spaces and newlines, CRLF, NBSP, zero-width space, unusual Unicode whitespace, specials.
STRESS_TEXT = (
    "Tabs\t\tand  double  spaces   \n\n\n  \r\n emoji 🌍🎉👩‍👩‍👧 café naïve e\u0301 日本語 Ελληνικά "
    "‘quotes’ — x\u00a0y\u200bz it's I'LL we'd 123456 3.14 \x1c\u2028\u3000 ½ ٣ "
    f"{EOS_TOKEN}after{PAD_TOKEN}  trailing   \n"
)


def png_ok(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000


# --- Training and the Hugging Face wrapper ---------------------------------------------------


def test_trained_tokenizer_is_fast_tokenizer_with_special_roles(tiny_tokenizer):
    assert isinstance(tiny_tokenizer, PreTrainedTokenizerFast)
    assert len(tiny_tokenizer) == 512
    assert (tiny_tokenizer.eos_token, tiny_tokenizer.bos_token, tiny_tokenizer.pad_token) == (EOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    # Declared order: eos is id 0, pad id 1; then the byte alphabet.
    assert (tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id) == (0, 1)
    # Special tokens are atomic and nothing is added implicitly.
    assert tiny_tokenizer.encode(f"a{EOS_TOKEN}{EOS_TOKEN}b{PAD_TOKEN}") == [
        tiny_tokenizer.convert_tokens_to_ids("a"), 0, 0, tiny_tokenizer.convert_tokens_to_ids("b"), 1
    ]


@pytest.mark.parametrize(
    "text",
    [STRESS_TEXT, "", " ", "\n", "  leading and trailing  ", "a" * 300, "\t\t\t", "🌍" * 7, "x , y . z ( w )"],
)
def test_round_trip_is_lossless(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.decode(ids) == text


def test_save_then_autotokenizer_loads_in_fresh_process_without_remote_code(pydoc_text, tmp_path):
    class Config:  # anything with max_position_embeddings, like MiniGPT's config
        max_position_embeddings = 256

    out = tmp_path / "tok"
    tokenizer = train_bpe([pydoc_text[:50_000]], 300, output_dir=out, model_max_length=Config(), show_progress=False)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert "auto_map" not in config and config["model_max_length"] == 256
    assert (out / "chat_template.jinja").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folder left behind"
    probe = STRESS_TEXT + format_prompt("Say hi")
    code = (
        "import json, sys\nfrom transformers import AutoTokenizer\n"
        f"t = AutoTokenizer.from_pretrained({str(out)!r})\n"
        f"text = {probe!r}\n"
        "m = [{'role': 'user', 'content': 'Say hi'}]\n"
        "print(json.dumps([t.encode(text), t.decode(t.encode(text)) == text, t.model_max_length, t.pad_token_id,"
        " t.apply_chat_template(m, tokenize=False, add_generation_prompt=True)]))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    ids, lossless, max_length, pad_id, rendered = json.loads(result.stdout.strip().splitlines()[-1])
    assert ids == tokenizer.encode(probe) and lossless and max_length == 256 and pad_id == 1
    assert rendered == format_prompt("Say hi")


def test_sources_files_strings_and_dataset_learn_the_same_merges(pydoc_text, tmp_path):
    import datasets

    docs = pydoc_text[:40_000].split("\n\n")
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(docs), encoding="utf-8")
    from_file = train_bpe(path, 400, show_progress=False)
    from_strings = train_bpe(["\n\n".join(docs)], 400, show_progress=False)
    from_dataset = train_bpe(datasets.Dataset.from_dict({"body": ["\n\n".join(docs)]}), 400,
                             text_column="body", show_progress=False)
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


def test_training_text_special_tokens_are_cut_out_not_learned(tiny_tokenizer, pydoc_text):
    docs = [pydoc_text[i : i + 2000] for i in range(0, 40_000, 2000)]
    tokenizer = train_bpe([EOS_TOKEN.join(docs)], 400, show_progress=False)
    vocab = tokenizer.get_vocab()
    assert not any(piece in vocab for piece in ("<|", "|>", "endoftext", "Ġ<|"))
    assert split_on_special_tokens(f"a{EOS_TOKEN}{PAD_TOKEN}b") == ["a", "b"]


# --- Bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("corpus", [[""], ["   \n\t  ", "\n\n"], []])
def test_empty_or_whitespace_corpus_is_refused(corpus):
    with pytest.raises(ValueError, match="empty or whitespace-only"):
        train_bpe(corpus, 300, show_progress=False)


def test_sources_of_the_wrong_type_are_named():
    import datasets

    with pytest.raises(TypeError, match="item 1 of the source is a int"):
        train_bpe(["fine", 3], 300, show_progress=False)
    with pytest.raises(TypeError, match=r"DatasetDict with splits \['train'\]"):
        train_bpe(datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})}), 300, show_progress=False)
    with pytest.raises(ValueError, match=r"text_column='body' is not a column.*\['text'\]"):
        train_bpe(datasets.Dataset.from_dict({"text": ["a b"]}), 300, text_column="body", show_progress=False)


def test_vocab_too_small_for_byte_alphabet_and_specials():
    with pytest.raises(ValueError, match=r"vocab_size=257 is too small.*at least 258"):
        train_bpe(["hello"], 257, show_progress=False)


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


@pytest.mark.parametrize(
    "special_tokens, message",
    [
        ([EOS_TOKEN, PAD_TOKEN, ""], "non-empty"),
        ([EOS_TOKEN, PAD_TOKEN, " \n"], "non-whitespace"),
        ([EOS_TOKEN, PAD_TOKEN, PAD_TOKEN], "declared twice"),
        ([PAD_TOKEN], "must include '<\\|endoftext\\|>'"),
        ([EOS_TOKEN, PAD_TOKEN, "Ġ"], "byte-level alphabet symbol"),
    ],
)
def test_bad_special_tokens(special_tokens, message):
    with pytest.raises(ValueError, match=message):
        train_bpe(["some text"], 300, special_tokens=special_tokens, show_progress=False)


def test_special_token_split_by_pre_tokenization_is_reported(tiny_tokenizer):
    # '<|im_start|>' is not registered, so GPT-2 pre-tokenization splits it.
    with pytest.raises(ValueError, match=r"special token '<\|im_start\|>' is not atomic: .* encodes to \d+ tokens"):
        check_special_tokens_atomic(tiny_tokenizer, [EOS_TOKEN, "<|im_start|>"])
    check_special_tokens_atomic(tiny_tokenizer, [EOS_TOKEN, PAD_TOKEN])


def test_extra_special_tokens_are_atomic(pydoc_text):
    tokenizer = train_bpe([pydoc_text[:20_000]], 300, special_tokens=[EOS_TOKEN, PAD_TOKEN, "<|im_start|>"],
                          show_progress=False)
    assert tokenizer.encode("a<|im_start|>b")[1] == tokenizer.convert_tokens_to_ids("<|im_start|>") == 2


def test_round_trip_check_catches_a_lossy_decoder(tiny_tokenizer):
    broken = copy.deepcopy(tiny_tokenizer)
    broken.backend_tokenizer.decoder = decoders.Fuse()  # leaves byte symbols such as 'Ġ' in place
    with pytest.raises(RuntimeError, match="round trip failed on sample 0"):
        check_round_trip(broken, ["hello world"])
    check_round_trip(tiny_tokenizer, ["hello world", STRESS_TEXT])


# --- The Alpaca prompt, one place --------------------------------------------------------------

RECORDS = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Translate to French.", "input": "Good morning\n  twice", "output": "Bonjour."},
    {"instruction": "Sum: {x} + {y}", "input": "{{ not jinja }} 'quotes' \"double\"", "output": "Émoji 🌍\n"},
]


def test_format_prompt_is_the_alpaca_template_exactly():
    assert format_prompt("Do it.", "") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nDo it.\n\n### Response:\n"
    )
    assert format_prompt("Do it.", "data").endswith("### Instruction:\nDo it.\n\n### Input:\ndata\n\n### Response:\n")


@pytest.mark.parametrize("record", RECORDS)
def test_chat_template_renders_the_fine_tuning_text_byte_for_byte(tiny_tokenizer, record):
    prompt, response = format_example(record)
    full = tiny_tokenizer.apply_chat_template(alpaca_messages(record), tokenize=False)
    assert full == prompt + response
    generation = tiny_tokenizer.apply_chat_template(
        alpaca_messages(record, with_response=False), tokenize=False, add_generation_prompt=True
    )
    assert generation == prompt
    ids = tiny_tokenizer.apply_chat_template(alpaca_messages(record), tokenize=True, return_dict=False)
    assert list(ids) == tiny_tokenizer.encode(prompt + response)


def test_chat_template_refuses_unknown_roles(tiny_tokenizer):
    with pytest.raises(Exception, match="got role system"):
        tiny_tokenizer.apply_chat_template([{"role": "system", "content": "x"}], tokenize=False)


# --- GPT-2's released tokenizer ------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_pair(shared_data):
    gpt2 = shared_data / "gpt2"
    encoder, merges = gpt2 / "encoder.json", gpt2 / "vocab.bpe"
    return tokenization.load_gpt2_tokenizer(encoder, merges), tokenization.gpt2_tiktoken_encoding(encoder, merges)


@pytest.mark.parametrize("name", ["tinyshakespeare.txt", "the-verdict.txt", "stress"])
def test_gpt2_tokenizer_matches_tiktoken(gpt2_pair, shared_data, name):
    tokenizer, tiktoken_gpt2 = gpt2_pair
    text = STRESS_TEXT if name == "stress" else (shared_data / name).read_text(encoding="utf-8")
    ids = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    assert ids == tiktoken_gpt2.encode(text, allowed_special="all")
    if name == "the-verdict.txt":
        assert len(ids) == 5145  # the book's number for this story


def test_gpt2_tokenizer_basics(gpt2_pair):
    tokenizer, _ = gpt2_pair
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert len(tokenizer) == 50257 and tokenizer.eos_token_id == tokenizer.pad_token_id == 50256
    assert tokenizer.encode("Hello, I am") == [15496, 11, 314, 716]
    assert tokenizer.decode(tokenizer.encode(STRESS_TEXT)) == STRESS_TEXT


def test_encode_batch_fast_gives_the_tokenizers_ids(gpt2_pair, shared_data, tiny_tokenizer):
    tokenizer, _ = gpt2_pair
    paragraphs = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")[:200_000].split("\n\n")
    expected = [e.ids for e in tokenizer.backend_tokenizer.encode_batch(paragraphs, add_special_tokens=False)]
    assert encode_batch_fast(tokenizer, paragraphs, num_threads=2) == expected
    assert encode_batch_fast(tokenizer, paragraphs, engine="tokenizers") == expected
    texts = [STRESS_TEXT, "", EOS_TOKEN, "plain words"]
    assert encode_batch_fast(tiny_tokenizer, texts, engine="tiktoken") == [tiny_tokenizer.encode(t) for t in texts]


def test_tiktoken_twin_of_a_trained_tokenizer_matches_on_whole_corpus(shared_data):
    text = (shared_data / "the-verdict.txt").read_text(encoding="utf-8")
    tokenizer = train_bpe([text], 1000, show_progress=False)
    twin = tokenization.tiktoken_encoding(tokenizer)
    for sample in (text, STRESS_TEXT):
        assert twin.encode(sample, allowed_special="all") == tokenizer.encode(sample)


# --- The reference trainer learns the same merges -------------------------------------------


def assert_same_training(texts, vocab_size, min_frequency=2):
    library = train_bpe(texts, vocab_size, min_frequency=min_frequency, show_progress=False)
    reference = train_reference_bpe(texts, vocab_size, min_frequency=min_frequency)
    assert reference.reused == []
    merges = learned_merges(library)
    first_difference = next((i for i, (a, b) in enumerate(zip(merges, reference.merges)) if a != b), None)
    assert first_difference is None, (
        f"merge {first_difference}: library {merges[first_difference]} vs reference {reference.merges[first_difference]}"
    )
    assert merges == reference.merges
    assert library.backend_tokenizer.get_vocab(with_added_tokens=False) == reference.vocab
    return reference


def test_reference_trainer_matches_library_on_python_docs(pydoc_text):
    reference = assert_same_training([pydoc_text[:60_000]], 512)
    assert len(reference.merges) == 512 - 258
    assert reference.counts == sorted(reference.counts, reverse=True)  # best count never rises


def test_reference_trainer_matches_library_on_the_verdict(shared_data):
    assert_same_training([(shared_data / "the-verdict.txt").read_text(encoding="utf-8")], 600)


def test_reference_trainer_matches_library_when_choices_are_ties():
    # 'zy' occurs 4 times, every other pair 3 times: after ('z','y') every choice is a tie.
    texts = ["ba dc zy"] * 3 + ["zy"]
    reference = assert_same_training(texts, 300)
    # Ties go to the smallest left id, then right id: 'b' < 'd' < 'Ġ' by code point, and 'zy'
    # (id 258, made first) < 'dc' (id 260), so ('Ġ','zy') beats ('Ġ','dc') although 'dc' < 'zy'
    # as strings: ids, not strings, break ties.
    assert reference.merges == [("z", "y"), ("b", "a"), ("d", "c"), ("Ġ", "zy"), ("Ġ", "dc")]
    assert reference.counts == [4, 3, 3, 3, 3]


def test_reference_trainer_matches_library_with_high_min_frequency(pydoc_text):
    reference = assert_same_training([pydoc_text[:30_000]], 2000, min_frequency=40)
    assert 0 < len(reference.merges) < 2000 - 258 and min(reference.counts) >= 40


def test_python_pre_tokenizer_matches_the_library(pydoc_text, tiny_tokenizer):
    pre_tokenizer = tiny_tokenizer.backend_tokenizer.pre_tokenizer
    for text in (pydoc_text[:100_000], STRESS_TEXT):
        assert pretokenize(text) == [word for word, _ in pre_tokenizer.pre_tokenize_str(text)]


# --- BPE made visible ------------------------------------------------------------------------


def test_merge_trace_reproduces_the_tokenizer(tiny_tokenizer, tmp_path):
    text = "The lowest tokenization 🌍 café" + EOS_TOKEN + "  tabs\there"
    traces = merge_trace(tiny_tokenizer, text)
    assert [token for trace in traces for token in trace.tokens] == tiny_tokenizer.tokenize(text)
    merges = learned_merges(tiny_tokenizer)
    for trace in traces:
        for step in trace.steps:
            assert merges[step.rank] == step.pair and step.result == "".join(step.pair)
    assert [t.special for t in traces].count(True) == 1
    printed = format_merge_trace(traces)
    assert "'␣lowest'  bytes: ␣ l o w e s t" in printed and "(special token, never merged)" in printed
    assert png_ok(save_figure(merge_trace_figure(traces), tmp_path / "trace.png"))


def test_merge_table_frequencies_are_the_trainers_counts(pydoc_text):
    corpus = [pydoc_text[:60_000]]
    tokenizer = train_bpe(corpus, 400, show_progress=False)
    rows = merge_table(tokenizer, corpus, n=25)
    reference = train_reference_bpe(corpus, 400)
    assert [row.frequency for row in rows] == reference.counts[:25]
    assert [(row.left, row.right) for row in rows] == reference.merges[:25]
    table = format_merge_table(rows)
    assert table.count("\n") == 26 and f"| 0 | `{rows[0].left.replace('Ġ', '␣')}`" in table


def test_token_boundaries_cover_the_text_once(tiny_tokenizer, tmp_path):
    spans = token_spans(tiny_tokenizer, STRESS_TEXT)
    assert "".join(STRESS_TEXT[s.start : s.end] for s in spans) == STRESS_TEXT
    assert len(spans) == len(tiny_tokenizer.encode(STRESS_TEXT))
    page = token_boundaries_html(tiny_tokenizer, STRESS_TEXT)
    assert page.count("<span ") == len(spans) and f"{len(spans):,} tokens" in page
    assert png_ok(save_figure(token_boundaries_figure(tiny_tokenizer, STRESS_TEXT), tmp_path / "tokens.png"))


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


def test_train_script_help_and_run(tmp_path, pydoc_text, capsys):
    script = load_script("train_tokenizer")
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    help_text = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--vocab_size" in help_text and "--output_dir" in help_text and "--files" in help_text
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(pydoc_text[:20_000], encoding="utf-8")
    out = tmp_path / "tok"
    assert script.main(["--files", str(corpus), "--vocab_size", "300", "--output_dir", str(out), "--no_progress",
                        "--merges_table", "5"]) == 0
    assert len(AutoTokenizer.from_pretrained(out)) == 300
    assert (out / "merges_table.md").read_text().count("\n| ") == 6 and (out / "token_boundaries.html").is_file()
    assert script.main(["--files", str(tmp_path / "missing.txt"), "--output_dir", str(out)]) == 1
    assert "missing.txt does not exist" in capsys.readouterr().err
