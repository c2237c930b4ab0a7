"""modeling_minigpt.quantize: int8 linear layers (fbgemm's dynamic int8 kernel) against fp32."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
import torch.nn.functional as F
from helpers.runs import load_script
from torch import nn
from transformers import DynamicCache, StaticCache

from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM
from modeling_minigpt.quantize import Int8Linear, int8_available, quantize_int8, quantized_weight_bytes

pytestmark = pytest.mark.skipif(not int8_available(), reason="this PyTorch has no x86 int8 kernels (fbgemm)")


def test_int8_linear_is_close_to_fp32():
    torch.manual_seed(0)
    linear = nn.Linear(256, 384)
    x = torch.randn(3, 5, 256)
    expected = F.linear(x, linear.weight, linear.bias)
    got = Int8Linear(linear)(x)
    assert got.shape == expected.shape
    # 8-bit weights and activations: errors of a few 1e-3 of the output's scale.
    assert (got - expected).abs().max() < 1e-2 * expected.abs().max()


def test_quantize_int8_replaces_every_linear_and_keeps_the_logits():
    torch.manual_seed(0)
    config = MiniGPTConfig.from_preset("tiny", vocab_size=300, context_length=64, emb_dim=64, n_layers=2, drop_rate=0.0)
    model = MiniGPTForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # sharper logits than the init's, so closeness means something
            if p.dim() == 2:
                p.mul_(2)
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        expected = model(ids).logits
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    quantized = quantize_int8(model)
    assert not any(isinstance(m, nn.Linear) for m in quantized.modules())
    assert sum(isinstance(m, Int8Linear) for m in quantized.modules()) == 2 * 6 + 1  # q k v out fc_in fc_out, head
    assert quantized_weight_bytes(quantized) < 0.6 * fp32_bytes
    with torch.no_grad():
        got = quantized(ids).logits
        out = quantized.generate(ids[:1, :5], max_new_tokens=8, do_sample=False, pad_token_id=0)
    # Measured: mean error 1.6 %, largest 8 % of the logits' spread; the top token kept at every position.
    assert (got - expected).abs().mean() < 0.03 * expected.std()
    assert (got - expected).abs().max() < 0.15 * expected.std()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9
    assert out.shape == (1, 13)


def test_compiled_decoding_gives_the_eager_int8_scores():
    """compile_decoding: generate() runs its one-token steps compiled on a static cache, and the
    scores are the eager int8 model's (the same kernels; inductor only fuses the small ops)."""
    torch.manual_seed(0)
    config = MiniGPTConfig.from_preset("tiny", vocab_size=300, context_length=64, emb_dim=64, n_layers=2, drop_rate=0.0)
    model = MiniGPTForCausalLM(config).eval()
    eager = quantize_int8(copy.deepcopy(model))
    compiled = quantize_int8(copy.deepcopy(model), compile_decoding=True)
    ids = torch.randint(0, 300, (2, 12))
    greedy = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        expected = eager.generate(ids, **greedy)
        got = compiled.generate(ids, **greedy)
    assert isinstance(got.cache, StaticCache) and isinstance(expected.cache, DynamicCache)
    assert hasattr(compiled, "_compiled_call")  # generate() compiled the one-token step
    # Measured: 3.6e-7 (float32 rounding of the fused LayerNorm/GELU); a wrong cache slot or mask
    # moves the scores by their own scale (~0.3).
    for step_expected, step_got in zip(expected.scores, got.scores, strict=True):
        torch.testing.assert_close(step_got, step_expected, rtol=0, atol=1e-5)
    assert torch.equal(got.sequences, expected.sequences)


def test_compiled_decoding_needs_a_model_that_compiles_whole():
    linear_stack = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="compile_decoding needs a model that compiles whole; Sequential"):
        quantize_int8(linear_stack, compile_decoding=True)
    assert isinstance(linear_stack[0], nn.Linear)  # refused before anything was replaced


def test_int8_layers_of_a_copy_are_their_own():
    """A deep copy owns its packed weights (compiled code finds each layer's through a table)."""
    from modeling_minigpt import quantize

    layer = Int8Linear(nn.Linear(8, 4))
    twin = copy.deepcopy(layer)
    assert twin._number != layer._number and quantize._PACKED[twin._number][1] == 4
    number = layer._number
    del layer
    gc.collect()
    assert number not in quantize._PACKED and twin._number in quantize._PACKED


def test_evaluate_int8_changes_the_loss_by_little(lm_dir, corpus_file, capsys):
    evaluate = load_script("evaluate")
    losses = {}
    for flags in ([], ["--int8"]):
        argv = ["--model", str(lm_dir), "--text-file", str(corpus_file), "--bootstrap", "0", "--max_windows", "8"]
        assert evaluate.main(argv + flags) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("loss"))
        losses[bool(flags)] = float(line.split()[-1])
    assert abs(losses[True] - losses[False]) < 0.01 * losses[False]
