"""The app's library (apps/inspect_model.py): loading without remote code, token pieces,
streamed generation against `model.generate`, probabilities, attention and classification."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers.models import LABELS
from transformers import GPT2LMHeadModel

from apps.inspect_model import (
    ContextFullError,
    ModelFolderError,
    SamplingSettings,
    attention_map,
    chat_prompt,
    classify,
    eos_id,
    load_for_app,
    stream_generate,
    token_pieces,
    token_probabilities,
)
from modeling_minigpt import MiniGPTForCausalLM, MiniGPTForSequenceClassification
from tokenization.alpaca import ALPACA_PREAMBLE

SETTINGS = {
    "greedy": SamplingSettings(max_new_tokens=24),
    "temperature": SamplingSettings(max_new_tokens=24, temperature=1.3, seed=7),
    "top-k + top-p": SamplingSettings(max_new_tokens=24, temperature=0.8, top_k=20, top_p=0.9, seed=3),
}


@pytest.fixture(scope="module")
def lm(lm_dir):  # noqa: F811
    return load_for_app(lm_dir)


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):  # noqa: F811
    return load_for_app(gpt2_dir)


def reference_generate(model, prompt_ids, settings, eos_token_id=None) -> list[int]:
    torch.manual_seed(settings.seed)
    out = model.generate(
        torch.tensor([prompt_ids]),
        **settings.generate_kwargs(),
        eos_token_id=eos_token_id,
        pad_token_id=0,
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
    )
    return out[0, len(prompt_ids) :].tolist()


# ----------------------------------------------------------------------------- loading


def test_loads_each_supported_folder_with_the_package_classes(lm_dir, classifier_dir, gpt2_dir):  # noqa: F811
    lm, classifier, gpt2 = (load_for_app(d) for d in (lm_dir, classifier_dir, gpt2_dir))
    assert type(lm.model) is MiniGPTForCausalLM and lm.kind == "causal-lm"
    assert type(classifier.model) is MiniGPTForSequenceClassification and classifier.kind == "classifier"
    assert classifier.labels == list(LABELS)
    assert type(gpt2.model) is GPT2LMHeadModel and gpt2.kind == "causal-lm"
    for loaded in (lm, classifier, gpt2):
        assert not loaded.model.training
        assert (loaded.n_layers, loaded.n_heads) == (2, 2)
    assert lm.context_length == gpt2.context_length == 192
    assert "2 layers x 2 heads, context 192 tokens" in lm.describe()


def test_never_runs_code_from_the_folder(lm_dir, tmp_path):  # noqa: F811
    """A folder's own modeling file is ignored, and a folder that only loads with its own code is refused."""
    marker = tmp_path / "code_ran"
    payload = f"open({str(marker)!r}, 'w').write('yes')\n"
    tampered = tmp_path / "tampered"
    shutil.copytree(lm_dir, tampered)
    (tampered / "modeling_minigpt.py").write_text(payload)
    assert type(load_for_app(tampered).model) is MiniGPTForCausalLM

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "modeling_evil.py").write_text(payload)
    (foreign / "config.json").write_text(
        json.dumps(
            {
                "model_type": "evil",
                "architectures": ["EvilForCausalLM"],
                "auto_map": {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"},
            }
        )
    )
    with pytest.raises(ModelFolderError, match="model_type='evil'.*loads only"):
        load_for_app(foreign)
    assert not marker.exists()


def test_bad_folders_get_one_clear_message(lm_dir, tmp_path):  # noqa: F811
    with pytest.raises(ModelFolderError, match="does not exist"):
        load_for_app(tmp_path / "missing")
    with pytest.raises(ModelFolderError, match="no config.json"):
        load_for_app(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match="not valid JSON"):
        load_for_app(tmp_path)
    bare = tmp_path / "bare"
    shutil.copytree(lm_dir, bare)
    config = json.loads((bare / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({**config, "architectures": ["MiniGPTModel"]}))
    with pytest.raises(ModelFolderError, match="'MiniGPTModel'"):
        load_for_app(bare)
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(lm_dir, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(ModelFolderError, match="no tokenizer.json"):
        load_for_app(no_tokenizer)


# ----------------------------------------------------------------------------- tokens and prompts


def test_token_pieces_cover_the_text_byte_for_byte(lm):
    text = "naïve café — 😀 costs 3€\n\tdone<|endoftext|>"
    ids = lm.tokenizer(text)["input_ids"]
    pieces = token_pieces(lm.tokenizer, ids)
    assert [p.id for p in pieces] == ids and [p.position for p in pieces] == list(range(len(ids)))
    assert b"".join(p.data for p in pieces) == text.encode("utf-8")
    assert pieces[-1].readable == "<|endoftext|>" and pieces[-1].data == b"<|endoftext|>"
    # The 4-byte emoji is split by a 512-token BPE: its pieces show as raw bytes.
    emoji = [p for p in pieces if p.data and p.data[0] >= 0xF0]
    assert emoji and emoji[0].readable.startswith("<F0>")
    assert any(p.readable == "↵" for p in pieces) and any(p.hex == "0a" for p in pieces)


def test_chat_prompt_uses_the_folder_template(lm):
    prompt = chat_prompt(lm.tokenizer, [], "Reverse the words: red green")
    expected = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Reverse the words: red green"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.text == expected and prompt.note is None
    assert prompt.ids == lm.tokenizer(expected, add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="empty"):
        chat_prompt(lm.tokenizer, [], "   ")


def test_chat_prompt_multi_turn_and_single_turn_templates(lm_dir):  # noqa: F811
    tokenizer = load_for_app(lm_dir).tokenizer
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    tokenizer.chat_template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}[assistant]"
    assert chat_prompt(tokenizer, history, "again").text == "[user]hi[assistant]hello[user]again[assistant]"
    tokenizer.chat_template = (
        "{% if messages | length > 1 %}{{ raise_exception('one turn only') }}{% endif %}Q: {{ messages[0].content }} A:"
    )
    shortened = chat_prompt(tokenizer, history, "again")
    assert shortened.text == "Q: again A:" and "one turn only" in shortened.note
    tokenizer.chat_template = None  # a pretrained-only folder: the message is continued as is
    assert chat_prompt(tokenizer, history, "The for statement").text == "The for statement"


def test_chat_prompt_leaves_out_the_oldest_turns_that_do_not_fit(lm):
    tokenizer = lm.tokenizer
    turns = [("What is 12 plus 30?", "42"), ("Sort: 5, 3, 9", "3, 5, 9"), ("Repeat: red sun", "red sun")]
    history = [{"role": role, "content": text} for q, a in turns for role, text in (("user", q), ("assistant", a))]
    message = "Reverse: moon star"

    def render(messages):  # what the template makes of a conversation, as ids
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    new = [{"role": "user", "content": message}]
    full, last_two, alone = render(history + new), render(history[2:] + new), render(new)
    assert len(alone) < len(last_two) < len(full)

    whole = chat_prompt(tokenizer, history, message, context_length=len(full) + 10, room=10)
    assert whole.ids == full and whole.note is None
    # One token short of fitting the whole chat: the first turn goes, and the rest is a chat of its own
    # (the Alpaca preamble before "Sort: 5, 3, 9").
    cut = chat_prompt(tokenizer, history, message, context_length=len(full) + 9, room=10)
    assert cut.ids == last_two and cut.text.startswith(ALPACA_PREAMBLE + "\n\n### Instruction:\nSort")
    assert "oldest turn was left out" in cut.note and f"{len(full) + 9} tokens with 10 left" in cut.note
    # However small the context, the new message is sent (generation then stops at the context's end).
    tiny = chat_prompt(tokenizer, history, message, context_length=len(alone), room=10)
    assert tiny.ids == alone and "3 turns were left out" in tiny.note


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("name", SETTINGS)
@pytest.mark.parametrize("which", ["minigpt", "gpt2"])
def test_stream_picks_the_same_tokens_as_generate(name, which, lm, gpt2):
    loaded = {"minigpt": lm, "gpt2": gpt2}[which]
    settings = SETTINGS[name]
    prompt = chat_prompt(loaded.tokenizer, [], "Repeat: sun moon")
    steps = list(stream_generate(loaded.model, loaded.tokenizer, prompt.ids, settings))
    ids = [s.choice.id for s in steps]
    assert ids == reference_generate(loaded.model, prompt.ids, settings)
    assert len(ids) == settings.max_new_tokens and steps[-1].stop == "length"
    assert all(s.stop is None for s in steps[:-1])
    final = loaded.tokenizer.decode(ids, skip_special_tokens=True)
    assert steps[-1].text == final
    assert all(final.startswith(s.text) for s in steps)  # streamed text only ever grows


def test_minigpt_and_its_gpt2_export_stream_the_same_reply(lm, gpt2):
    prompt = chat_prompt(lm.tokenizer, [], "Add: 2 + 3")
    settings = SETTINGS["top-k + top-p"]
    ours = [s.choice for s in stream_generate(lm.model, lm.tokenizer, prompt.ids, settings)]
    theirs = [s.choice for s in stream_generate(gpt2.model, gpt2.tokenizer, prompt.ids, settings)]
    assert [c.id for c in ours] == [c.id for c in theirs]
    torch.testing.assert_close([c.probability for c in ours], [c.probability for c in theirs], atol=1e-5, rtol=1e-4)


def test_stops_on_eos_like_generate(lm):
    prompt = chat_prompt(lm.tokenizer, [], "Repeat: sun moon")
    free = [s.choice.id for s in stream_generate(lm.model, lm.tokenizer, prompt.ids, SETTINGS["greedy"])]
    eos = free[5]  # pretend the sixth greedy token ends the reply
    first = free.index(eos)
    steps = list(stream_generate(lm.model, lm.tokenizer, prompt.ids, SETTINGS["greedy"], eos_token_id=eos))
    assert [s.choice.id for s in steps] == free[: first + 1]
    assert steps[-1].stop == "eos"
    assert [s.choice.id for s in steps] == reference_generate(
        lm.model, prompt.ids, SETTINGS["greedy"], eos_token_id=eos
    )
    assert eos_id(lm) == lm.tokenizer.eos_token_id == lm.tokenizer.convert_tokens_to_ids("<|endoftext|>")


def test_stops_when_the_context_is_full(lm):
    context = lm.context_length
    prompt_ids = lm.tokenizer("The for statement " * 80)["input_ids"][: context - 3]
    steps = list(stream_generate(lm.model, lm.tokenizer, prompt_ids, SamplingSettings(max_new_tokens=50)))
    assert len(steps) == 3 and steps[-1].stop == "context"
    assert [s.choice.id for s in steps] == reference_generate(lm.model, prompt_ids, SamplingSettings(max_new_tokens=3))
    full = lm.tokenizer("The for statement " * 80)["input_ids"][:context]
    with pytest.raises(ContextFullError, match=f"context is {context}"):
        next(stream_generate(lm.model, lm.tokenizer, full, SamplingSettings()))


def test_streamed_text_holds_back_only_an_unfinished_character():
    from apps.inspect_model import _ends_mid_character

    assert _ends_mid_character("é".encode()[:1]) and _ends_mid_character("a€".encode()[:-1])
    assert _ends_mid_character("😀".encode()[:3])
    # Whole characters, and bytes no continuation can repair, are shown as they are.
    assert not any(_ends_mid_character(b) for b in (b"", "é".encode(), "😀".encode(), b"\xff", b"\x80", b"\xc3A"))


def test_settings_refuse_nonsense():
    for bad in (dict(max_new_tokens=0), dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            SamplingSettings(**bad)


# ----------------------------------------------------------------------------- probabilities


def test_step_probabilities_match_an_uncached_forward(lm):
    prompt = chat_prompt(lm.tokenizer, [], "Sort: b a c")
    steps = list(stream_generate(lm.model, lm.tokenizer, prompt.ids, SETTINGS["temperature"]))
    ids = prompt.ids + [s.choice.id for s in steps]
    with torch.no_grad():
        probs = torch.softmax(lm.model(torch.tensor([ids])).logits[0], dim=-1)  # (T, V), no cache
    for i, step in enumerate(steps):
        row = probs[len(prompt.ids) - 1 + i]
        assert step.choice.probability == pytest.approx(float(row[step.choice.id]), abs=1e-5)
        top = torch.topk(row, 5)
        assert [a[0] for a in step.choice.alternatives] == top.indices.tolist()
        assert [a[2] for a in step.choice.alternatives] == pytest.approx(top.values.tolist(), abs=1e-5)
        assert sum(a[2] for a in step.choice.alternatives) <= 1 + 1e-6
        assert step.choice.probability <= step.choice.alternatives[0][2] + 1e-7
    # Teacher forcing the same ids reads the same numbers.
    forced = token_probabilities(lm.model, lm.tokenizer, ids)[len(prompt.ids) - 1 :]
    assert [c.id for c in forced] == [s.choice.id for s in steps]
    assert [c.probability for c in forced] == pytest.approx([s.choice.probability for s in steps], abs=1e-5)


def test_greedy_picks_the_top_alternative(lm):
    prompt = chat_prompt(lm.tokenizer, [], "Sort: b a c")
    for step in stream_generate(lm.model, lm.tokenizer, prompt.ids, SETTINGS["greedy"]):
        assert step.choice.id == step.choice.alternatives[0][0]
        assert step.choice.probability == step.choice.alternatives[0][2]


# ----------------------------------------------------------------------------- attention and classification


def test_attention_map_is_causal_and_matches_the_gpt2_export(lm, gpt2):
    text = "The for statement is used to iterate"
    n_tokens = len(lm.tokenizer(text)["input_ids"])
    for layer, head in [(0, 0), (1, 1)]:
        tokens, ours = attention_map(lm.model, lm.tokenizer, text, layer, head)
        _, theirs = attention_map(gpt2.model, gpt2.tokenizer, text, layer, head)
        assert len(tokens) == n_tokens and ours.shape == (n_tokens, n_tokens)
        torch.testing.assert_close(ours.sum(dim=-1), torch.ones(n_tokens))
        assert torch.triu(ours, diagonal=1).abs().max() == 0  # nobody looks at the future
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="layer 2 / head 0 out of range: the model has 2 layers x 2 heads"):
        attention_map(lm.model, lm.tokenizer, text, 2, 0)
    with pytest.raises(ContextFullError, match="at most 192 tokens"):
        attention_map(lm.model, lm.tokenizer, "word " * 400, 0, 0)
    with pytest.raises(ValueError, match="empty"):
        attention_map(lm.model, lm.tokenizer, "", 0, 0)


def test_classify_pools_the_last_token_as_a_padded_batch_does(classifier_dir):  # noqa: F811
    loaded = load_for_app(classifier_dir)
    texts = ["the cat sat on the mat", "rain again today"]
    results = [classify(loaded.model, loaded.tokenizer, t) for t in texts]
    batch = loaded.tokenizer(texts, padding=True, return_tensors="pt")  # right padding
    with torch.no_grad():
        reference = torch.softmax(loaded.model(**batch).logits, dim=-1)
    for result, row, text in zip(results, reference, texts, strict=False):
        assert list(result.probabilities) == list(LABELS)
        assert list(result.probabilities.values()) == pytest.approx(row.tolist(), abs=1e-6)
        ids = loaded.tokenizer(text)["input_ids"]
        assert result.pooled_position == len(ids) - 1
        assert result.pooled_piece == token_pieces(loaded.tokenizer, ids)[-1].readable
    # Only the pooled token's hidden state reaches the head: the score head on it gives the logits.
    ids = torch.tensor([loaded.tokenizer(texts[0])["input_ids"]])
    with torch.no_grad():
        hidden = loaded.model.model(ids).last_hidden_state[0, results[0].pooled_position]
        from_pooled = torch.softmax(loaded.model.score(hidden), dim=-1)
    assert list(results[0].probabilities.values()) == pytest.approx(from_pooled.tolist(), abs=1e-6)
