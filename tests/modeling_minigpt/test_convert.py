"""GPT-2 <-> MiniGPT conversion: parity with `GPT2LMHeadModel`, round trips, errors, folders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.runs import load_script
from transformers import GPT2Config, GPT2LMHeadModel

from modeling_minigpt import PRESETS, MiniGPTConfig, MiniGPTForCausalLM
from modeling_minigpt.convert import gpt2_to_minigpt, minigpt_to_gpt2

VOCAB, CONTEXT = 1000, 64
GPT2_PRESETS = [name for name in PRESETS if name.startswith("gpt2-")]


def random_gpt2(emb_dim: int, n_heads: int, n_layers: int = 2, seed: int = 0, **overrides) -> GPT2LMHeadModel:
    """A small-vocabulary GPT-2 at a preset's width, every tensor randomised.

    GPT-2's own init leaves LayerNorms at 1/0 and biases at 0, under which swapping e.g. ln
    weight and bias or the q/k biases would go unnoticed; noise on everything makes each tensor
    matter, and sharpens the attention so a q/k mix-up changes the logits."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=CONTEXT,
        n_embd=emb_dim,
        n_head=n_heads,
        n_layer=n_layers,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
        **overrides,
    )
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def left_padded_batch(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ids left-padded to the longest row, its attention mask and mask-aware positions
    (computed the way `generate` computes them for a model that takes `position_ids`)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, T - n :] = torch.randint(0, VOCAB - 1, (n,), generator=g)
        mask[row, T - n :] = 1
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return ids, mask, positions


def assert_logits_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    # Our inference projections run on oneDNN and GPT-2's on MKL (`modeling_minigpt.linear`), which
    # sum in different orders: up to 2.5e-5 apart at gpt2-xl's width, 1.3e-5 at gpt2-small's.
    torch.testing.assert_close(ours, theirs, rtol=0.0, atol=5e-5)


@pytest.mark.parametrize("preset", GPT2_PRESETS)
def test_logits_and_greedy_ids_match_gpt2_at_each_preset_width(preset: str) -> None:
    width, heads = PRESETS[preset]["emb_dim"], PRESETS[preset]["n_heads"]
    gpt2 = random_gpt2(width, heads, n_layers=1 if width > 1024 else 2)
    ours = gpt2_to_minigpt(gpt2)
    assert ours.config.emb_dim == width and ours.config.n_heads == heads
    assert ours.lm_head.weight is ours.model.tok_emb.weight  # still tied after conversion

    ids = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = gpt2(ids).logits
        for attn in ("sdpa", "eager"):
            ours.set_attn_implementation(attn)
            assert_logits_close(ours(ids).logits, expected)

    ours.set_attn_implementation("sdpa")
    prompt = ids[:1, :8]
    greedy = dict(max_new_tokens=12, do_sample=False, pad_token_id=VOCAB - 1, eos_token_id=None)
    theirs_ids = gpt2.generate(prompt, **greedy)
    assert theirs_ids.shape == (1, 20)
    assert torch.equal(ours.generate(prompt, **greedy), theirs_ids)


def test_left_padded_batch_logits_and_generation_match_gpt2() -> None:
    gpt2 = random_gpt2(768, 12)
    ours = gpt2_to_minigpt(gpt2)
    ids, mask, positions = left_padded_batch([11, 5, 8])
    real = mask.bool()
    with torch.no_grad():
        expected = gpt2(ids, attention_mask=mask, position_ids=positions).logits
        for attn in ("sdpa", "eager"):
            ours.set_attn_implementation(attn)
            # Ours derives the positions from the mask itself; padded positions are never used.
            assert_logits_close(ours(ids, attention_mask=mask).logits[real], expected[real])
            assert_logits_close(ours(ids, attention_mask=mask, position_ids=positions).logits[real], expected[real])

    ours.set_attn_implementation("sdpa")
    greedy = dict(max_new_tokens=10, do_sample=False, pad_token_id=VOCAB - 1, eos_token_id=None)
    theirs_ids = gpt2.generate(ids, attention_mask=mask, **greedy)
    assert torch.equal(ours.generate(ids, attention_mask=mask, **greedy), theirs_ids)


def test_minigpt_to_gpt2_round_trip_is_exact() -> None:
    torch.manual_seed(3)
    ours = MiniGPTForCausalLM(MiniGPTConfig.from_preset("tiny", vocab_size=VOCAB, drop_rate=0.0)).eval()
    gpt2 = minigpt_to_gpt2(ours)
    assert type(gpt2) is GPT2LMHeadModel
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    ids = torch.randint(0, VOCAB, (2, 30))
    with torch.no_grad():
        assert_logits_close(gpt2(ids).logits, ours(ids).logits)

    back = gpt2_to_minigpt(gpt2)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    assert back.config.to_diff_dict() == ours.config.to_diff_dict()


def test_minigpt_without_qkv_bias_exports_zero_biases() -> None:
    torch.manual_seed(4)
    ours = MiniGPTForCausalLM(MiniGPTConfig.from_preset("tiny", vocab_size=VOCAB, qkv_bias=False)).eval()
    gpt2 = minigpt_to_gpt2(ours)
    assert torch.count_nonzero(gpt2.transformer.h[0].attn.c_attn.bias) == 0
    ids = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        assert_logits_close(gpt2(ids).logits, ours(ids).logits)


def test_untied_head_is_converted_both_ways() -> None:
    gpt2 = random_gpt2(64, 4, tie_word_embeddings=False)
    assert not torch.equal(gpt2.lm_head.weight, gpt2.transformer.wte.weight)
    ours = gpt2_to_minigpt(gpt2)
    assert ours.config.tie_word_embeddings is False
    assert torch.equal(ours.lm_head.weight, gpt2.lm_head.weight)
    ids = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        assert_logits_close(ours(ids).logits, gpt2(ids).logits)
        assert_logits_close(minigpt_to_gpt2(ours)(ids).logits, gpt2(ids).logits)


def test_state_dict_input_with_and_without_config() -> None:
    gpt2 = random_gpt2(128, 2)
    ids = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        expected = gpt2(ids).logits
        with_config = gpt2_to_minigpt(gpt2.state_dict(), gpt2.config)
        assert_logits_close(with_config(ids).logits, expected)
        # Shapes are read off the tensors; heads cannot be, so they are given (default: 64 per head).
        inferred = gpt2_to_minigpt(gpt2.state_dict(), n_heads=2)
        shape = (inferred.config.n_layers, inferred.config.context_length, inferred.config.vocab_size)
        assert shape == (2, CONTEXT, VOCAB)
        assert_logits_close(inferred(ids).logits, expected)
        # A GPT2Model state dict (no "transformer." prefix, no head) works too.
        base = {k.removeprefix("transformer."): v for k, v in gpt2.state_dict().items() if k != "lm_head.weight"}
        assert_logits_close(gpt2_to_minigpt(base, n_heads=2)(ids).logits, expected)
    assert gpt2_to_minigpt(gpt2.state_dict()).config.n_heads == 2  # 128 // 64


def test_shape_mismatch_names_the_tensor() -> None:
    gpt2 = random_gpt2(128, 2)
    state_dict = dict(gpt2.state_dict())
    state_dict["transformer.h.1.attn.c_attn.weight"] = torch.zeros(128, 256)
    del state_dict["transformer.h.0.mlp.c_fc.bias"]
    with pytest.raises(ValueError) as error:
        gpt2_to_minigpt(state_dict, gpt2.config)
    message = str(error.value)
    assert "transformer.h.1.attn.c_attn.weight: expected (128, 384), got (128, 256)" in message
    assert "transformer.h.0.mlp.c_fc.bias: missing" in message


@pytest.mark.parametrize(
    ("override", "field"),
    [
        (dict(activation_function="relu"), "activation_function"),
        (dict(n_inner=100), "n_inner"),
        (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    ],
)
def test_gpt2_options_without_equivalent_are_refused(override: dict, field: str) -> None:
    gpt2 = random_gpt2(64, 4, n_layers=1, **override)
    with pytest.raises(ValueError, match=f"GPT2Config.{field}="):
        gpt2_to_minigpt(gpt2)


def test_differing_dropout_rates_warn_and_use_resid_pdrop() -> None:
    gpt2 = random_gpt2(64, 4, n_layers=1)
    gpt2.config.attn_pdrop = 0.2
    with pytest.warns(UserWarning, match="dropout rates differ"):
        ours = gpt2_to_minigpt(gpt2)
    assert ours.config.drop_rate == 0.0


def test_script_folders_load_in_fresh_processes(tmp_path: Path, capsys) -> None:
    """GPT-2 folder -> script -> MiniGPT folder -> script -> GPT-2 folder; the MiniGPT folder loads
    with trust_remote_code, the exported GPT-2 with stock transformers, in processes that never
    imported this repository."""
    convert_main = load_script("convert_gpt2").main

    gpt2 = random_gpt2(64, 4)
    gpt2.save_pretrained(tmp_path / "gpt2")
    (tmp_path / "gpt2" / "vocab.json").write_text('{"a": 0}')
    assert convert_main(["--from_gpt2", str(tmp_path / "gpt2"), "--out", str(tmp_path / "minigpt")]) == 0
    assert convert_main(["--to_gpt2", str(tmp_path / "minigpt"), "--out", str(tmp_path / "export")]) == 0
    assert (tmp_path / "minigpt" / "vocab.json").read_text() == '{"a": 0}'
    assert not list(tmp_path.glob(".tmp-*"))
    capsys.readouterr()

    def refused(*argv: str) -> str:
        assert convert_main(list(argv)) == 1
        return capsys.readouterr().err

    assert "not empty" in refused("--to_gpt2", str(tmp_path / "minigpt"), "--out", str(tmp_path / "export"))
    # from_pretrained would only warn and fill the mismatched tensors with random values.
    error = refused("--to_gpt2", str(tmp_path / "gpt2"), "--out", str(tmp_path / "wrong"))
    assert "model_type='gpt2' model, expected 'minigpt'" in error
    error = refused("--from_gpt2", str(tmp_path / "minigpt"), "--out", str(tmp_path / "wrong"))
    assert "model_type='minigpt' model, expected 'gpt2'" in error
    assert not (tmp_path / "wrong").exists()

    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        expected = gpt2(ids).logits
    torch.save({"ids": ids, "expected": expected}, tmp_path / "reference.pt")
    child = f"""
import sys, torch
from transformers import AutoModelForCausalLM, GPT2LMHeadModel
assert "modeling_minigpt" not in sys.modules
ref = torch.load({str(tmp_path / "reference.pt")!r})
gpt2 = GPT2LMHeadModel.from_pretrained({str(tmp_path / "export")!r})
ours = AutoModelForCausalLM.from_pretrained({str(tmp_path / "minigpt")!r}, trust_remote_code=True)
assert type(ours).__name__ == "MiniGPTForCausalLM", type(ours)
for model in (gpt2, ours):
    with torch.no_grad():
        torch.testing.assert_close(model(ref["ids"]).logits, ref["expected"], rtol=0.0, atol=1e-5)
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", child],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
    config_text = (tmp_path / "export" / "config.json").read_text()
    assert '"model_type": "gpt2"' in config_text and "auto_map" not in config_text
