"""The model as a Hugging Face model: config, attention paths, save/load, generate, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, pipeline

from modeling_minigpt import (
    PRESETS,
    MiniGPTConfig,
    MiniGPTForCausalLM,
    MiniGPTForSequenceClassification,
    MiniGPTModel,
)

VOCAB = 97


def tiny_config(**overrides) -> MiniGPTConfig:
    base = dict(vocab_size=VOCAB, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
    return MiniGPTConfig(**{**base, **overrides})


def tiny_model(seed: int = 0, **overrides) -> MiniGPTForCausalLM:
    torch.manual_seed(seed)
    return MiniGPTForCausalLM(tiny_config(**overrides)).eval()


# --- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [("emb_dim", 30), ("n_heads", 0), ("n_layers", -1), ("vocab_size", 0), ("context_length", 0),
     ("drop_rate", 1.0), ("drop_rate", -0.1)],
)
def test_invalid_config_values_name_the_field(field, value):
    with pytest.raises(ValueError) as err:
        tiny_config(**{field: value})
    assert field in str(err.value) and str(value) in str(err.value)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="gpt2-small"):
        MiniGPTConfig.from_preset("gpt2-tiny")


def test_standard_names_map_onto_book_names():
    config = MiniGPTConfig.from_preset("gpt2-medium", n_layers=3)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (1024, 3, 16)
    assert config.max_position_embeddings == config.context_length == 1024


# --- parameter counts (meta device: no memory) ----------------------------------------------


def count_params(model: torch.nn.Module) -> int:
    # Tied tensors appear once in .parameters(), as in GPT-2's published counts.
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset", ["gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"])
def test_parameter_counts_equal_gpt2(preset):
    p = PRESETS[preset]
    with torch.device("meta"):
        ours = MiniGPTForCausalLM(MiniGPTConfig.from_preset(preset))
        ref = GPT2LMHeadModel(
            GPT2Config(n_embd=p["emb_dim"], n_head=p["n_heads"], n_layer=p["n_layers"],
                       n_positions=p["context_length"], vocab_size=p["vocab_size"])
        )
    assert count_params(ours) == count_params(ref)


def test_gpt2_small_counts_tied_and_untied():
    with torch.device("meta"):
        tied = MiniGPTForCausalLM(MiniGPTConfig.from_preset("gpt2-small"))
        untied = MiniGPTForCausalLM(MiniGPTConfig.from_preset("gpt2-small", tie_word_embeddings=False))
    assert count_params(tied) == 124_439_808
    assert count_params(untied) == 163_037_184  # the book's number


# --- attention -------------------------------------------------------------------------------


def test_eager_and_sdpa_agree_with_padding_and_cache():
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, :7] = 0
    outs = {}
    for impl in ("sdpa", "eager"):
        model.set_attn_implementation(impl)
        full = model(ids, attention_mask=mask).logits
        prefix = model(ids[:, :8], attention_mask=mask[:, :8], use_cache=True)
        step = model(ids[:, 8:], attention_mask=mask, cache=prefix.cache).logits
        outs[impl] = (full, step)
    torch.testing.assert_close(outs["sdpa"][0], outs["eager"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(outs["sdpa"][1], outs["eager"][1], atol=1e-5, rtol=0)
    # And the cached continuation equals the uncached forward on real tokens.
    real = mask[:, 8:].bool()
    torch.testing.assert_close(outs["sdpa"][1][real], outs["sdpa"][0][:, 8:][real], atol=1e-5, rtol=0)


def test_attention_weights_are_causal_distributions():
    model = tiny_model()
    model.set_attn_implementation("eager")
    out = model(torch.randint(0, VOCAB, (2, 10)), output_attentions=True)
    assert len(out.attentions) == model.config.n_layers
    w = out.attentions[0]
    assert w.shape == (2, 4, 10, 10)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 10))
    assert torch.all(torch.triu(w, diagonal=1) == 0)


def test_future_tokens_do_not_change_past_logits():
    model = tiny_model()
    a = torch.randint(0, VOCAB, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % VOCAB
    torch.testing.assert_close(model(a).logits[:, :10], model(b).logits[:, :10])


# --- errors ----------------------------------------------------------------------------------


def test_token_id_outside_vocab_is_a_clear_error():
    with pytest.raises(ValueError, match=f"token id {VOCAB} is outside the vocabulary"):
        tiny_model()(torch.tensor([[1, 2, VOCAB]]))


def test_too_long_input_names_both_lengths():
    model = tiny_model()
    with pytest.raises(ValueError, match="33 positions.*context_length of 32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="context_length of 32"):
        model.generate(torch.zeros(1, 30, dtype=torch.long), max_new_tokens=5, do_sample=False)


# --- loss and training helpers ----------------------------------------------------------------


def test_loss_ignores_minus_100_and_matches_manual_cross_entropy():
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (2, 9))
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, VOCAB)
    expected = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    # shift_labels (pre-aligned targets) gives the same number for the same targets.
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    torch.testing.assert_close(model(ids, shift_labels=shifted).loss, expected)


def test_gradient_checkpointing_same_loss_and_gradients():
    ids = torch.randint(0, VOCAB, (2, 16))
    results = []
    for checkpointing in (False, True):
        model = tiny_model(seed=1).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert all(block.gradient_checkpointing for block in model.model.trf_blocks)
        loss = model(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], msg=name)


# --- save / load ----------------------------------------------------------------------------


def test_save_pretrained_writes_code_and_one_copy_of_tied_weights(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "configuration_minigpt.py", "modeling_minigpt.py", "attention.py"} <= names
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.tok_emb.weight" in keys and "lm_head.weight" not in keys
    assert not any(k.endswith(".mask") for k in keys)  # derived buffer, rebuilt on load
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification"}


FRESH_PROCESS_LOAD = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
    folder, ids_path, out_path = sys.argv[1:]
    assert "modeling_minigpt" not in sys.modules
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    lm = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    clf = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True, num_labels=3)
    ids = torch.load(ids_path)
    changed = ids.clone(); changed[0, 6:] = (changed[0, 6:] + 1) % config.vocab_size
    torch.save({
        "classes": [type(config).__name__, type(lm).__name__, type(base).__name__, type(clf).__name__],
        "module": type(lm).__module__,
        "logits": lm(ids).logits,
        "changed_logits": lm(changed).logits,
        "hidden": base(ids).last_hidden_state,
    }, out_path)
    """
)


def test_auto_classes_load_in_a_fresh_process_with_remote_code(tmp_path):
    model = tiny_model()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    ids = torch.randint(0, VOCAB, (2, 12))
    torch.save(ids, tmp_path / "ids.pt")
    # Run from tmp_path so the repository's own package is not importable: remote code only.
    subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_LOAD, str(folder), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path, check=True, capture_output=True, env={**__import__("os").environ, "PYTHONPATH": ""},
    )
    out = torch.load(tmp_path / "out.pt")
    assert out["classes"] == ["MiniGPTConfig", "MiniGPTForCausalLM", "MiniGPTModel", "MiniGPTForSequenceClassification"]
    assert out["module"].startswith("transformers_modules.")
    with torch.no_grad():
        assert torch.equal(out["logits"], model(ids).logits)
        assert torch.equal(out["hidden"], model.model(ids).last_hidden_state)
    # The causal mask came back as a mask, not as uninitialised memory.
    assert torch.equal(out["changed_logits"][0, :6], out["logits"][0, :6])
    assert not torch.equal(out["changed_logits"][0, 6:], out["logits"][0, 6:])


def test_installed_package_loads_without_remote_code(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # no trust_remote_code needed
    assert type(loaded) is MiniGPTForCausalLM
    ids = torch.randint(0, VOCAB, (1, 8))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


# --- generation -----------------------------------------------------------------------------


def test_greedy_generate_equals_manual_argmax_loop():
    model = tiny_model()
    prompt = torch.randint(0, VOCAB, (1, 5))
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    ids = prompt
    for _ in range(8):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


@pytest.mark.parametrize(
    "sampling",
    [dict(do_sample=False), dict(do_sample=True, temperature=0.7), dict(do_sample=True, top_k=5),
     dict(do_sample=True, top_p=0.8, temperature=1.3)],
)
def test_cached_and_uncached_generation_identical(sampling):
    model = tiny_model()
    prompt = torch.randint(0, VOCAB, (2, 6))
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(123)
        runs.append(model.generate(prompt, max_new_tokens=12, use_cache=use_cache, pad_token_id=0, **sampling))
    assert torch.equal(runs[0], runs[1])


def test_left_padded_batch_equals_rows_run_alone():
    model = tiny_model()
    rows = [torch.randint(1, VOCAB, (n,)) for n in (7, 3, 5)]
    width = max(len(r) for r in rows)
    pad = 0
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=pad)
    for i, r in enumerate(rows):
        alone = model.generate(r[None], max_new_tokens=10, do_sample=False, pad_token_id=pad)
        assert torch.equal(batch[i, width:], alone[0, len(r):]), f"row {i}"


def test_eos_stops_each_row_of_a_batch():
    model = tiny_model()
    prompt = torch.randint(1, VOCAB, (4, 4))
    free = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)[:, 4:]
    # Declare the token that row 0 produces third as eos: row 0 must stop there, padded after.
    eos = int(free[0, 2])
    out = model.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=0)[:, 4:]
    for row_free, row in zip(free, out):
        hits = (row_free == eos).nonzero()
        if len(hits):
            stop = int(hits[0])
            assert torch.equal(row[: stop + 1], row_free[: stop + 1])
            assert torch.all(row[stop + 1 :] == 0)
        else:
            assert torch.equal(row[: len(row_free)], row_free)
    assert out.shape[1] <= 10


def test_text_generation_pipeline(tiny_tokenizer):
    model = MiniGPTForCausalLM(
        MiniGPTConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer), eos_token_id=tiny_tokenizer.eos_token_id,
                                  pad_token_id=tiny_tokenizer.pad_token_id)
    ).eval()
    generator = pipeline("text-generation", model=model, tokenizer=tiny_tokenizer)
    out = generator("The function", max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"].startswith("The function")
    direct = model.generate(**tiny_tokenizer("The function", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"] == tiny_tokenizer.decode(direct[0], skip_special_tokens=True)


# --- sequence classification ----------------------------------------------------------------


def test_classification_pools_last_real_token_not_padding():
    torch.manual_seed(0)
    model = MiniGPTForSequenceClassification(tiny_config(num_labels=3, pad_token_id=0)).eval()
    short = torch.randint(1, VOCAB, (1, 5))
    padded = torch.cat([short, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = (padded != 0).long()
    alone = model(short).logits
    torch.testing.assert_close(model(padded, attention_mask=mask).logits, alone)
    torch.testing.assert_close(model(padded).logits, alone)  # from pad_token_id
    # The book's pooling (position -1) would read a pad token and give something else.
    book = model.score(model.model(padded, attention_mask=mask).last_hidden_state[:, -1])
    assert not torch.allclose(book, alone)
    loss = model(padded, attention_mask=mask, labels=torch.tensor([2])).loss
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(alone, torch.tensor([2])))


def test_base_model_outputs_hidden_states():
    model = MiniGPTModel(tiny_config()).eval()
    out = model(torch.randint(0, VOCAB, (1, 4)), output_hidden_states=True)
    assert len(out.hidden_states) == model.config.n_layers + 1
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)


# --- figures --------------------------------------------------------------------------------


def test_attention_and_position_figures(tmp_path, tiny_tokenizer):
    from modeling_minigpt.visualize import attention_weights, plot_attention, plot_position_similarity

    model = MiniGPTForCausalLM(MiniGPTConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer))).train()
    tokens, weights = attention_weights(model, tiny_tokenizer, "def f(x): return x")
    assert model.training  # restored after the eval-mode pass
    assert weights.shape == (2, 4, len(tokens), len(tokens))
    assert "".join(tokens) == "def f(x): return x"
    with pytest.raises(ValueError, match="2 layers x 4 heads"):
        plot_attention(model, tiny_tokenizer, "x", tmp_path / "bad.png", layer=2)
    for path in (plot_attention(model, tiny_tokenizer, "def f(x): return x", tmp_path / "att.png", layer=1, head=3),
                 plot_position_similarity(model, tmp_path / "pos.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))
