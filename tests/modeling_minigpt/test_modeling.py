"""The model as a Hugging Face model: config, attention paths, save/load, generate, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    DataCollatorWithFlattening,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    StaticCache,
    pipeline,
)
from transformers.integrations.executorch import (
    TorchExportableModuleForDecoderOnlyLM,
    TorchExportableModuleWithStaticCache,
)

import modeling_minigpt.modeling_minigpt as modeling
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


def left_padded(lengths: list[int], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) of random rows of these lengths, left-padded as generate() expects."""
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(1, VOCAB, (n,))
        mask[i, width - n :] = 1
    return ids, mask


def right_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


# --- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("emb_dim", 30),
        ("n_heads", 0),
        ("n_layers", -1),
        ("vocab_size", 0),
        ("context_length", 0),
        ("drop_rate", 1.0),
        ("drop_rate", -0.1),
    ],
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
            GPT2Config(
                n_embd=p["emb_dim"],
                n_head=p["n_heads"],
                n_layer=p["n_layers"],
                n_positions=p["context_length"],
                vocab_size=p["vocab_size"],
            )
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
    # Outputs at padding positions mean nothing (sdpa gives a fully masked row zeros, eager a
    # uniform average): compare real tokens only.
    real = mask.bool()
    torch.testing.assert_close(outs["sdpa"][0][real], outs["eager"][0][real], atol=1e-5, rtol=0)
    torch.testing.assert_close(outs["sdpa"][1][real[:, 8:]], outs["eager"][1][real[:, 8:]], atol=1e-5, rtol=0)
    # And the cached continuation equals the uncached forward on real tokens.
    torch.testing.assert_close(outs["sdpa"][1][real[:, 8:]], outs["sdpa"][0][:, 8:][real[:, 8:]], atol=1e-5, rtol=0)


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
    # Checked by an assert inside the computation (no host sync, no graph break), so the
    # message names the vocabulary, not the offending id.
    for bad in (VOCAB, -1):
        with pytest.raises(RuntimeError, match=rf"token id outside the vocabulary \[0, {VOCAB}\)"):
            tiny_model()(torch.tensor([[1, 2, bad]]))


def test_too_long_input_names_the_context_length():
    model = tiny_model()
    with pytest.raises(RuntimeError, match="longer than the model's context_length of 32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(RuntimeError, match="context_length of 32"):
        model.generate(torch.zeros(1, 30, dtype=torch.long), max_new_tokens=5, do_sample=False)
    with pytest.raises(RuntimeError, match="context_length of 32"):
        model.generate(
            torch.zeros(1, 30, dtype=torch.long), max_new_tokens=5, do_sample=False, cache_implementation="static"
        )


def test_input_ids_and_inputs_embeds_are_exclusive_and_shaped():
    model = tiny_model()
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        model(ids, inputs_embeds=model.get_input_embeddings()(ids))
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        model()
    with pytest.raises(
        ValueError, match=r"inputs_embeds must be a \(batch, sequence, 32\) tensor, got shape \(1, 4, 8\)"
    ):
        model(inputs_embeds=torch.zeros(1, 4, 8))
    with pytest.raises(ValueError, match=r"input_ids must be a \(batch, sequence\) tensor.*\(4,\)"):
        model(torch.zeros(4, dtype=torch.long))


# --- forward API: inputs_embeds, tuples, keyword arguments --------------------------------------


def test_inputs_embeds_give_the_logits_of_input_ids():
    model = tiny_model()
    ids, mask = left_padded([7, 4])
    embeds = model.get_input_embeddings()(ids)
    by_ids = model(ids, attention_mask=mask)
    by_embeds = model(inputs_embeds=embeds, attention_mask=mask)
    torch.testing.assert_close(by_embeds.logits, by_ids.logits, atol=0, rtol=0)


def test_return_dict_false_returns_the_output_fields_as_a_tuple():
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 6))
    lm = tiny_model()
    out = lm(ids, labels=ids, output_hidden_states=True)
    tup = lm(ids, labels=ids, output_hidden_states=True, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 4  # loss, logits, cache, hidden states
    torch.testing.assert_close(tup[0], out.loss)
    torch.testing.assert_close(tup[1], out.logits)
    assert tup[2].get_seq_length() == 6
    assert len(tup[3]) == lm.config.n_layers + 1
    base = lm.model(ids, use_cache=False, return_dict=False)
    assert isinstance(base, tuple) and len(base) == 1
    torch.testing.assert_close(base[0], out.hidden_states[-1])
    clf = MiniGPTForSequenceClassification(tiny_config(num_labels=3)).eval()
    labels = torch.tensor([0, 2])
    loss, logits = clf(ids, labels=labels, return_dict=False)
    torch.testing.assert_close(logits, clf(ids).logits)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))
    # The config's default applies too.
    lm.config.return_dict = False
    assert isinstance(lm(ids), tuple)


def test_unknown_keyword_arguments_are_refused_not_ignored():
    model = tiny_model()
    ids, mask = left_padded([6, 3])
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['attention_maks'\]"):
        model(ids, attention_maks=mask)
    with pytest.raises(TypeError, match="attention_maks"):
        model.model(ids, attention_maks=mask)
    with pytest.raises(TypeError, match="attention_maks"):
        MiniGPTForSequenceClassification(tiny_config(num_labels=2))(ids, attention_maks=mask)
    # The loss keywords Trainer passes are accepted: num_items_in_batch turns the mean into a sum / count.
    labels = ids.masked_fill(mask == 0, -100)
    mean = model(ids, attention_mask=mask, labels=labels).loss
    summed = model(ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(100)).loss
    n_targets = int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(summed, mean * n_targets / 100)


def test_past_key_values_is_the_deprecated_name_of_cache():
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (1, 9))
    prefix = model(ids[:, :6], use_cache=True)
    with pytest.warns(FutureWarning, match="`past_key_values` is deprecated .* Use `cache` instead"):
        old = model(ids[:, 6:], past_key_values=prefix.cache).logits
    torch.testing.assert_close(old, model(ids).logits[:, 6:], atol=1e-5, rtol=0)


# --- masks: one per forward, packed rows, custom 4-D masks ----------------------------------------


def test_the_attention_mask_is_built_once_per_forward(monkeypatch):
    model = tiny_model(n_layers=3)
    calls = []
    real = modeling.create_causal_mask
    monkeypatch.setattr(modeling, "create_causal_mask", lambda **kw: calls.append(1) or real(**kw))
    ids, mask = left_padded([5, 3])
    model(ids, attention_mask=mask)
    model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert len(calls) == 1 + 3  # one forward, then a prefill and two decoding steps


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_rows_give_the_logits_of_the_padded_batch(impl):
    """DataCollatorWithFlattening packs rows padding-free, with position ids restarting per
    sequence; the model must keep the sequences apart exactly as padding would."""
    model = tiny_model(attn_implementation=impl)
    torch.manual_seed(1)
    rows = [torch.randint(1, VOCAB, (n,)).tolist() for n in (7, 3, 5)]
    packed = DataCollatorWithFlattening()([{"input_ids": r} for r in rows])
    assert packed["input_ids"].shape == (1, 15) and "attention_mask" not in packed
    ids, mask = right_padded(rows)
    padded = model(ids, attention_mask=mask)
    for train in (False, True):  # with and without the default generation cache
        model.train(train)
        out = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], labels=packed["labels"])
        starts = [0, 7, 10, 15]
        for i, row in enumerate(rows):
            torch.testing.assert_close(
                out.logits[0, starts[i] : starts[i + 1]], padded.logits[i, : len(row)], atol=1e-5, rtol=0
            )
        # The same loss too: the collator marks each sequence's first token -100.
        torch.testing.assert_close(
            out.loss, model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        )


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("form", ["bool", "float"])
def test_custom_4d_mask_with_a_shared_prefix_equals_separate_runs(impl, form):
    """One row holding a prefix and two continuations, each continuation seeing the prefix and
    itself only (the shape used for beam candidates or shared-prompt scoring)."""
    model = tiny_model(attn_implementation=impl)
    torch.manual_seed(2)
    prefix, a, b = (torch.randint(1, VOCAB, (n,)) for n in (4, 3, 2))
    row = torch.cat([prefix, a, b])[None]  # (1, 9)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 4, 5]])
    allowed = torch.zeros(9, 9, dtype=torch.bool)
    allowed[:7, :7] = torch.ones(7, 7, dtype=torch.bool).tril()  # prefix + a, causal
    allowed[7:, :4] = True  # b sees the prefix ...
    allowed[7:, 7:] = torch.ones(2, 2, dtype=torch.bool).tril()  # ... and itself, not a
    mask = allowed[None, None]
    if form == "float":
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    logits = model(row, attention_mask=mask, position_ids=position_ids).logits[0]
    alone_a = model(torch.cat([prefix, a])[None]).logits[0]
    alone_b = model(torch.cat([prefix, b])[None]).logits[0]
    torch.testing.assert_close(logits[:7], alone_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[7:], alone_b[4:], atol=1e-5, rtol=0)


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
    assert {
        "config.json",
        "model.safetensors",
        "configuration_minigpt.py",
        "modeling_minigpt.py",
        "attention.py",
        "linear.py",
    } <= names
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
        # output_attentions runs the hand-written path, which masks with the triangular buffer.
        "eager_logits": lm(ids, output_attentions=True).logits,
        "eager_changed_logits": lm(changed, output_attentions=True).logits,
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
        cwd=tmp_path,
        check=True,
        capture_output=True,
        env={**__import__("os").environ, "PYTHONPATH": ""},
    )
    out = torch.load(tmp_path / "out.pt")
    assert out["classes"] == ["MiniGPTConfig", "MiniGPTForCausalLM", "MiniGPTModel", "MiniGPTForSequenceClassification"]
    assert out["module"].startswith("transformers_modules.")
    with torch.no_grad():
        assert torch.equal(out["logits"], model(ids).logits)
        assert torch.equal(out["hidden"], model.model(ids).last_hidden_state)
    # The causal mask buffer came back as a mask, not as uninitialised memory.
    torch.testing.assert_close(out["eager_logits"], out["logits"], atol=1e-5, rtol=0)
    assert torch.equal(out["eager_changed_logits"][0, :6], out["eager_logits"][0, :6])
    assert not torch.equal(out["eager_changed_logits"][0, 6:], out["eager_logits"][0, 6:])


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
    [
        dict(do_sample=False),
        dict(do_sample=True, temperature=0.7),
        dict(do_sample=True, top_k=5),
        dict(do_sample=True, top_p=0.8, temperature=1.3),
    ],
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
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=pad)
    for i, r in enumerate(rows):
        alone = model.generate(r[None], max_new_tokens=10, do_sample=False, pad_token_id=pad)
        assert torch.equal(batch[i, width:], alone[0, len(r) :]), f"row {i}"


def test_eos_stops_each_row_of_a_batch():
    model = tiny_model()
    prompt = torch.randint(1, VOCAB, (4, 4))
    free = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)[:, 4:]
    # Declare the token that row 0 produces third as eos: row 0 must stop there, padded after.
    eos = int(free[0, 2])
    out = model.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=0)[:, 4:]
    for row_free, row in zip(free, out, strict=True):
        hits = (row_free == eos).nonzero()
        if len(hits):
            stop = int(hits[0])
            assert torch.equal(row[: stop + 1], row_free[: stop + 1])
            assert torch.all(row[stop + 1 :] == 0)
        else:
            assert torch.equal(row[: len(row_free)], row_free)
    assert out.shape[1] <= 10


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_static_cache_greedy_ids_equal_dynamic_cache_ids(impl):
    model = tiny_model(attn_implementation=impl)
    ids, mask = left_padded([6, 2, 4])
    greedy = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    dynamic = model.generate(ids, attention_mask=mask, **greedy)
    static = model.generate(ids, attention_mask=mask, cache_implementation="static", **greedy)
    assert torch.equal(static, dynamic)
    # A StaticCache passed in by hand, larger than needed, gives the same ids.
    cache = StaticCache(config=model.config, max_cache_len=30)
    assert torch.equal(model.generate(ids, attention_mask=mask, cache=cache, **greedy), dynamic)


@pytest.mark.parametrize("decoding", [dict(do_sample=False), dict(do_sample=False, num_beams=3)])
def test_inputs_embeds_generation_equals_input_ids_generation(decoding):
    model = tiny_model()
    ids, mask = left_padded([5, 3])
    embeds = model.get_input_embeddings()(ids)
    settings = dict(max_new_tokens=8, pad_token_id=0, **decoding)
    by_ids = model.generate(ids, attention_mask=mask, **settings)
    by_embeds = model.generate(inputs_embeds=embeds, attention_mask=mask, **settings)
    assert torch.equal(by_embeds, by_ids[:, ids.shape[1] :])  # embeds give back the new tokens only


def test_inputs_embeds_generation_continues_from_a_returned_cache():
    model = tiny_model()
    embed = model.get_input_embeddings()
    ids = torch.randint(1, VOCAB, (2, 5))
    greedy = dict(do_sample=False, pad_token_id=0)
    at_once = model.generate(inputs_embeds=embed(ids), max_new_tokens=8, **greedy)
    first = model.generate(inputs_embeds=embed(ids), max_new_tokens=4, return_dict_in_generate=True, **greedy)
    continued = torch.cat([embed(ids), embed(first.sequences)], dim=1)
    second = model.generate(
        inputs_embeds=continued, cache=first.cache, max_new_tokens=4, return_dict_in_generate=True, **greedy
    )
    assert torch.equal(torch.cat([first.sequences, second.sequences], dim=1), at_once)


def test_text_generation_pipeline(tiny_tokenizer):
    model = MiniGPTForCausalLM(
        MiniGPTConfig.from_preset(
            "tiny",
            vocab_size=len(tiny_tokenizer),
            eos_token_id=tiny_tokenizer.eos_token_id,
            pad_token_id=tiny_tokenizer.pad_token_id,
        )
    ).eval()
    generator = pipeline("text-generation", model=model, tokenizer=tiny_tokenizer)
    out = generator("The function", max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"].startswith("The function")
    direct = model.generate(**tiny_tokenizer("The function", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"] == tiny_tokenizer.decode(direct[0], skip_special_tokens=True)


# --- torch.compile and torch.export ---------------------------------------------------------------


def test_compile_fullgraph_forward_and_static_cache_decoding():
    """fullgraph=True fails on any graph break: the forward has no data-dependent Python branch."""
    assert MiniGPTForCausalLM._can_compile_fullgraph
    model = tiny_model()
    compiled = torch.compile(model, fullgraph=True)
    ids, mask = left_padded([6, 4])
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits, atol=1e-5, rtol=0
        )

        def decode(step, steps: int = 4) -> torch.Tensor:
            # What generate() does with a static cache: a prefill, then one token at a time, each
            # step seeing the 4-D mask over the whole cache and positions counted from it.
            cache = StaticCache(config=model.config, max_cache_len=16)
            out = step(ids, attention_mask=mask, cache=cache)
            tokens = [out.logits[:, -1:].argmax(-1)]
            for i in range(steps):
                step_mask = torch.cat([mask, torch.ones(2, i + 1, dtype=mask.dtype)], dim=1)
                out = step(tokens[-1], attention_mask=step_mask, cache=cache)
                tokens.append(out.logits[:, -1:].argmax(-1))
            return torch.cat(tokens, dim=1)

        assert torch.equal(decode(compiled), decode(model))


def test_compile_with_dynamic_shapes_keeps_the_batch_symbolic_through_the_mask_check():
    """One graph serves every batch size: the mask-shape check must not fix B or T (formatting them
    into its message did, which also kept inductor off the dynamic-batch oneDNN matmuls)."""
    model = tiny_model()
    compiled = torch.compile(model.forward, fullgraph=True, dynamic=True)
    with torch.no_grad():
        ids, mask = left_padded([6, 4])
        compiled(input_ids=ids, attention_mask=mask, use_cache=False)
        ids, mask = left_padded([7, 5, 3])
        with torch.compiler.set_stance("fail_on_recompile"):
            out = compiled(input_ids=ids, attention_mask=mask, use_cache=False)
        torch.testing.assert_close(out.logits, model(ids, attention_mask=mask).logits, atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 7\) but the input is 3 rows"):
            model(ids, attention_mask=mask[:2])


def test_torch_export_with_static_and_dynamic_shapes():
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (2, 8))
    static = torch.export.export(model, (), {"input_ids": ids, "use_cache": False})
    torch.testing.assert_close(static.module()(input_ids=ids, use_cache=False).logits, model(ids).logits)
    batch, seq = torch.export.Dim("batch", max=16), torch.export.Dim("seq", max=32)
    dynamic = torch.export.export(
        model,
        (),
        {"input_ids": ids, "use_cache": False},
        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "use_cache": None},
    )
    other = torch.randint(0, VOCAB, (3, 13))
    torch.testing.assert_close(dynamic.module()(input_ids=other, use_cache=False).logits, model(other).logits)


def test_export_with_a_static_cache_generates_the_same_ids():
    """transformers' ExecuTorch recipe: one token per call into a StaticCache held by the program."""
    model = tiny_model()
    model.generation_config = GenerationConfig(
        use_cache=True, cache_implementation="static", cache_config={"batch_size": 1, "max_cache_len": 24}
    )
    program = TorchExportableModuleForDecoderOnlyLM(model).export(
        input_ids=torch.tensor([[1]]), cache_position=torch.tensor([0])
    )
    prompt = torch.randint(1, VOCAB, (1, 5))
    exported = TorchExportableModuleWithStaticCache.generate(program, prompt, max_new_tokens=10)
    assert torch.equal(exported, model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0))


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


def test_classification_problem_types_compute_the_transformers_losses():
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (4, 6))

    def model(num_labels: int, problem_type: str | None = None) -> MiniGPTForSequenceClassification:
        torch.manual_seed(0)
        return MiniGPTForSequenceClassification(tiny_config(num_labels=num_labels, problem_type=problem_type)).eval()

    # Multi-label: float 0/1 targets, one per label, chosen automatically for float labels.
    clf = model(3)
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    out = clf(ids, labels=targets)
    p = torch.sigmoid(out.logits)
    by_hand = -(targets * torch.log(p) + (1 - targets) * torch.log(1 - p)).mean()
    torch.testing.assert_close(out.loss, by_hand)
    with pytest.raises(ValueError, match=r"labels of shape \(batch, num_labels\) = \(4, 3\).*got shape \(4,\)"):
        clf(ids, labels=torch.ones(4))
    # Single-label: integer classes.
    classes = torch.tensor([0, 2, 1, 2])
    torch.testing.assert_close(clf(ids, labels=classes).loss, F.cross_entropy(out.logits, classes))
    assert clf.config.problem_type is None  # chosen per call, the config is not rewritten
    # Regression: MSE, automatic for one label, asked for with several.
    values = torch.tensor([0.5, -1.0, 2.0, 0.0])
    reg = model(1)
    r = reg(ids, labels=values)
    torch.testing.assert_close(r.loss, ((r.logits[:, 0] - values) ** 2).mean())
    multi = model(3, "regression")
    m = multi(ids, labels=targets * 2 - 0.5)
    torch.testing.assert_close(m.loss, ((m.logits - (targets * 2 - 0.5)) ** 2).mean())
    # An explicit problem type wins over the dtype.
    forced = model(3, "multi_label_classification")
    with pytest.raises(ValueError, match="labels of shape"):
        forced(ids, labels=classes)


def test_classification_pools_the_last_real_token_of_inputs_embeds_from_the_mask():
    torch.manual_seed(0)
    clf = MiniGPTForSequenceClassification(tiny_config(num_labels=2, pad_token_id=0)).eval()
    ids, mask = right_padded([[5, 6, 7], [8, 9, 10, 11, 12]])
    embeds = clf.model.get_input_embeddings()(ids)
    torch.testing.assert_close(
        clf(inputs_embeds=embeds, attention_mask=mask).logits, clf(ids, attention_mask=mask).logits, atol=0, rtol=0
    )


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
    for path in (
        plot_attention(model, tiny_tokenizer, "def f(x): return x", tmp_path / "att.png", layer=1, head=3),
        plot_position_similarity(model, tmp_path / "pos.png"),
    ):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(
    "shape", [(1, 6), (2, 5), (2, 7), (3, 6), (6,), (2, 1, 6, 5), (3, 1, 6, 6), (2, 3, 6, 6)], ids=str
)
def test_an_attention_mask_of_the_wrong_shape_is_refused_not_broadcast(shape):
    """A (1, T) mask on a batch of 2 would apply row 0's padding to row 1: refused, as every other
    shape that does not match the input (2 rows of 6 tokens, 2 heads)."""
    model = tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    with pytest.raises(ValueError, match=r"attention_mask has shape .* but the input is 2 rows of 6 tokens"):
        model(ids, attention_mask=torch.ones(shape, dtype=torch.long))
    model(ids, attention_mask=torch.ones(2, 6, dtype=torch.long))  # the right shapes still work
    model(ids, attention_mask=torch.ones(1, 1, 6, 6, dtype=torch.bool))
