"""modeling_minigpt.quantize: int8 linear layers (fbgemm's dynamic int8 kernel) against fp32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.runs import load_script
from torch import nn

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


def test_evaluate_int8_changes_the_loss_by_little(lm_dir, corpus_file, capsys):
    evaluate = load_script("evaluate")
    losses = {}
    for flags in ([], ["--int8"]):
        argv = ["--model", str(lm_dir), "--text-file", str(corpus_file), "--bootstrap", "0", "--max_windows", "8"]
        assert evaluate.main(argv + flags) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("loss"))
        losses[bool(flags)] = float(line.split()[-1])
    assert abs(losses[True] - losses[False]) < 0.01 * losses[False]
