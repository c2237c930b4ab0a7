"""tokenization/train.py: training a byte-level BPE, the Hugging Face wrapper, special tokens, the round trip,
and scripts/train_tokenizer.py.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
from helpers.runs import load_script
from helpers.texts import STRESS_TEXT
from tokenizers import decoders
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tokenization import (
    EOS_TOKEN,
    PAD_TOKEN,
    format_prompt,
    train_bpe,
)
from tokenization.pretokenize import split_on_special_tokens
from tokenization.train import check_round_trip, check_special_tokens_atomic


def test_trained_tokenizer_is_fast_tokenizer_with_special_roles(tiny_tokenizer):
    assert isinstance(tiny_tokenizer, PreTrainedTokenizerFast)
    assert len(tiny_tokenizer) == 512
    assert (tiny_tokenizer.eos_token, tiny_tokenizer.bos_token, tiny_tokenizer.pad_token) == (
        EOS_TOKEN,
        EOS_TOKEN,
        PAD_TOKEN,
    )
    # Declared order: eos is id 0, pad id 1; then the byte alphabet.
    assert (tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id) == (0, 1)
    # Special tokens are atomic and nothing is added implicitly.
    assert tiny_tokenizer.encode(f"a{EOS_TOKEN}{EOS_TOKEN}b{PAD_TOKEN}") == [
        tiny_tokenizer.convert_tokens_to_ids("a"),
        0,
        0,
        tiny_tokenizer.convert_tokens_to_ids("b"),
        1,
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


def test_training_text_special_tokens_are_cut_out_not_learned(tiny_tokenizer, pydoc_text):
    docs = [pydoc_text[i : i + 2000] for i in range(0, 40_000, 2000)]
    tokenizer = train_bpe([EOS_TOKEN.join(docs)], 400, show_progress=False)
    vocab = tokenizer.get_vocab()
    assert not any(piece in vocab for piece in ("<|", "|>", "endoftext", "Ġ<|"))
    assert split_on_special_tokens(f"a{EOS_TOKEN}{PAD_TOKEN}b") == ["a", "b"]


@pytest.mark.parametrize("corpus", [[""], ["   \n\t  ", "\n\n"], []])
def test_empty_or_whitespace_corpus_is_refused(corpus):
    with pytest.raises(ValueError, match="empty or whitespace-only"):
        train_bpe(corpus, 300, show_progress=False)


def test_vocab_too_small_for_byte_alphabet_and_specials():
    with pytest.raises(ValueError, match=r"vocab_size=257 is too small.*at least 258"):
        train_bpe(["hello"], 257, show_progress=False)


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
    tokenizer = train_bpe(
        [pydoc_text[:20_000]], 300, special_tokens=[EOS_TOKEN, PAD_TOKEN, "<|im_start|>"], show_progress=False
    )
    assert tokenizer.encode("a<|im_start|>b")[1] == tokenizer.convert_tokens_to_ids("<|im_start|>") == 2


def test_round_trip_check_catches_a_lossy_decoder(tiny_tokenizer):
    broken = copy.deepcopy(tiny_tokenizer)
    broken.backend_tokenizer.decoder = decoders.Fuse()  # leaves byte symbols such as 'Ġ' in place
    with pytest.raises(RuntimeError, match="round trip failed on sample 0"):
        check_round_trip(broken, ["hello world"])
    check_round_trip(tiny_tokenizer, ["hello world", STRESS_TEXT])


def test_train_script_help_and_run(tmp_path, pydoc_text, capsys):
    script = load_script("train_tokenizer")
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    help_text = capsys.readouterr().out
    assert (
        exit_info.value.code == 0
        and "--vocab_size" in help_text
        and "--output_dir" in help_text
        and "--files" in help_text
    )
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(pydoc_text[:20_000], encoding="utf-8")
    out = tmp_path / "tok"
    assert (
        script.main(
            [
                "--files",
                str(corpus),
                "--vocab_size",
                "300",
                "--output_dir",
                str(out),
                "--no_progress",
                "--merges_table",
                "5",
            ]
        )
        == 0
    )
    assert len(AutoTokenizer.from_pretrained(out)) == 300
    assert (out / "merges_table.md").read_text().count("\n| ") == 6 and (out / "token_boundaries.html").is_file()
    assert script.main(["--files", str(tmp_path / "missing.txt"), "--output_dir", str(tmp_path / "tok2")]) == 1
    assert "missing.txt does not exist" in capsys.readouterr().err


def test_text_without_whitespace_is_cut_into_bounded_words_with_a_warning(pydoc_text, caplog):
    """A 200 KB run without whitespace is one pre-tokenizer word, which each merge rescans: it is
    cut into words of MAX_WORD_CHARS (with a warning), while ordinary text is left exactly as is."""
    from tokenization import train_bpe
    from tokenization.pretokenize import MAX_WORD_CHARS, iter_training_pieces

    blob = "".join(chr(ord("a") + (i * 7919) % 26) for i in range(200_000))
    cuts: list[int] = []
    pieces = list(iter_training_pieces([f"start {blob} end"], long_words=cuts))
    assert "".join(pieces) == f"start {blob} end" and cuts == [len(blob)]
    assert max(len(p) for p in pieces) == MAX_WORD_CHARS
    ordinary: list[int] = []
    assert list(iter_training_pieces([pydoc_text], long_words=ordinary)) == list(iter_training_pieces([pydoc_text]))
    assert ordinary == [] and len(list(iter_training_pieces([pydoc_text]))) == 1
    with caplog.at_level("WARNING", logger="tokenization.train"):
        tokenizer = train_bpe([blob], 300, show_progress=False)
    assert len(tokenizer) == 300
    assert "1 runs of more than 1000 characters without whitespace (the longest 200000)" in caplog.text
