"""training/run/lora.py: which parameters train, and the merged model's parity with the adapted one."""

from __future__ import annotations

import pytest
import torch
from helpers.models import VOCAB, tiny_config

from modeling_minigpt import MiniGPTForCausalLM, MiniGPTForSequenceClassification
from training.run.lora import (
    DEFAULT_TARGET_MODULES,
    LoraArguments,
    apply_lora,
    linear_module_names,
    trainable_parameter_counts,
)


def lora_model(seed: int = 0, **lora_overrides):
    """A LoRA-wrapped tiny causal LM whose B matrices are non-zero, so the adapter changes the output
    (freshly initialised LoRA has B = 0 and would make every parity check trivially true)."""
    torch.manual_seed(seed)
    base = MiniGPTForCausalLM(tiny_config()).eval()
    model = apply_lora(base, LoraArguments(lora_r=4, lora_dropout=0.0, **lora_overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    return model


def test_defaults_cover_every_linear_layer_but_the_tied_head():
    model = MiniGPTForCausalLM(tiny_config())
    assert linear_module_names(model) == sorted([*DEFAULT_TARGET_MODULES, "lm_head"])


def test_only_adapter_parameters_train():
    model = lora_model()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    # 2 layers x 6 target modules x (A, B)
    assert len(trainable) == 2 * len(DEFAULT_TARGET_MODULES) * 2
    assert all(".lora_A." in name or ".lora_B." in name for name in trainable)
    n_trainable, n_total = trainable_parameter_counts(model)
    emb, r = 32, 4
    # per layer: q, k, v, out_proj are emb->emb; fc_in emb->4emb; fc_out 4emb->emb; LoRA adds r*(in+out)
    per_layer = 4 * r * (emb + emb) + r * (emb + 4 * emb) + r * (4 * emb + emb)
    assert n_trainable == 2 * per_layer
    assert n_total == n_trainable + MiniGPTForCausalLM(tiny_config()).num_parameters()


def test_classification_lora_also_trains_the_head():
    torch.manual_seed(0)
    model = apply_lora(
        MiniGPTForSequenceClassification(tiny_config(num_labels=3)),
        LoraArguments(lora_target_modules=["W_query"]),
        task_type="SEQ_CLS",
    )
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert [n for n in trainable if "lora_" not in n] == ["base_model.model.score.modules_to_save.default.weight"]
    assert len([n for n in trainable if "lora_" in n]) == 2 * 2


def test_unknown_target_module_lists_the_linear_layers():
    with pytest.raises(ValueError, match=r"\['c_attn'\].*W_key.*fc_in"):
        apply_lora(MiniGPTForCausalLM(tiny_config()), LoraArguments(lora_target_modules=["W_query", "c_attn"]))


@pytest.mark.parametrize(
    "kwargs", [{"lora_r": 0}, {"lora_alpha": 0}, {"lora_dropout": 1.0}, {"lora_target_modules": []}]
)
def test_invalid_lora_arguments_name_the_flag(kwargs):
    with pytest.raises(ValueError, match="--" + next(iter(kwargs))):
        LoraArguments(**kwargs)


def test_merged_logits_equal_the_adapted_model():
    model = lora_model()
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        merged = model.merge_and_unload()(input_ids=ids).logits
    assert type(merged) is torch.Tensor and not torch.allclose(adapted, base, atol=1e-3)  # the adapter matters
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
