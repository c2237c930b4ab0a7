"""benchmarks/bench_tokenizer.py at its smallest: 100 KB of tinyshakespeare once, one round, a few
merges; the trainers agree on the merges and every encoding path gives the same ids."""

from __future__ import annotations

from helpers.runs import load_script


def test_smallest_run_agrees_with_the_references(shared_data, tmp_path, capsys):
    text = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")
    (tmp_path / "tinyshakespeare.txt").write_text(text[:100_000], encoding="utf-8")
    (tmp_path / "gpt2").symlink_to(shared_data / "gpt2")
    argv = ["--data_dir", str(tmp_path), "--repeat_mb", "0", "--rounds", "1", "--threads", "1"]
    argv += ["--train_vocab_size", "262", "--vocab_size", "300"]
    assert load_script("bench_tokenizer", "benchmarks").main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("same 4 merges: True") == 2  # the text and its one copy
    assert "GPT-2 twin built from our tokenizer == tiktoken's own loader on tinyshakespeare: True" in out
    identical = "ids identical (pipeline vs Rust, paragraphs): True; token counts identical across paths: True"
    assert out.count(identical) == 4  # a trained tokenizer and GPT-2's, on the text and its copy
    assert "what limits tokenizers" in out
