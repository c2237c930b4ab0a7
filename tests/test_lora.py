"""LoRA helpers: which parameters train, merge parity, and the saved adapter / merged folders."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from peft import PeftModel

from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM, MiniGPTForSequenceClassification
from training.export import save_finetuned
from training.lora import DEFAULT_TARGET_MODULES, LoraArguments, apply_lora, linear_module_names, trainable_parameter_counts

VOCAB = 96


def tiny_config(**overrides) -> MiniGPTConfig:
    return MiniGPTConfig.from_preset("tiny", **{"vocab_size": VOCAB, "context_length": 32, "emb_dim": 32, "n_heads": 2, **overrides})


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
    model = apply_lora(MiniGPTForSequenceClassification(tiny_config(num_labels=3)), LoraArguments(lora_target_modules=["W_query"]), task_type="SEQ_CLS")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert [n for n in trainable if "lora_" not in n] == ["base_model.model.score.modules_to_save.default.weight"]
    assert len([n for n in trainable if "lora_" in n]) == 2 * 2


def test_unknown_target_module_lists_the_linear_layers():
    with pytest.raises(ValueError, match=r"\['c_attn'\].*W_key.*fc_in"):
        apply_lora(MiniGPTForCausalLM(tiny_config()), LoraArguments(lora_target_modules=["W_query", "c_attn"]))


@pytest.mark.parametrize("kwargs", [{"lora_r": 0}, {"lora_alpha": 0}, {"lora_dropout": 1.0}, {"lora_target_modules": []}])
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


FRESH_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
ids = torch.load(sys.argv[2])
torch.save({"logits": model(input_ids=ids).logits.detach(), "module": type(model).__module__,
            "has_template": tok.chat_template is not None}, sys.argv[3])
"""


def test_save_finetuned_writes_adapter_and_a_merged_folder_that_loads_fresh(tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    config = tiny_config(vocab_size=len(tiny_tokenizer))
    base_dir = tmp_path / "base"
    MiniGPTForCausalLM(config).save_pretrained(base_dir)
    base = MiniGPTForCausalLM.from_pretrained(base_dir).eval()
    model = apply_lora(base, LoraArguments(lora_r=4, lora_dropout=0.0)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    ids = torch.randint(0, len(tiny_tokenizer), (2, 10))
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    merged = save_finetuned(model, tiny_tokenizer, tmp_path / "model", tmp_path / "adapter")
    assert type(merged) is MiniGPTForCausalLM
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(os.listdir(tmp_path / "adapter"))
    assert {"config.json", "modeling_minigpt.py", "attention.py", "configuration_minigpt.py", "chat_template.jinja"} <= set(os.listdir(tmp_path / "model"))

    # The adapter alone, on a freshly loaded base.
    reloaded = PeftModel.from_pretrained(MiniGPTForCausalLM.from_pretrained(base_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)

    # The merged folder in a fresh process, from its own code (the repo is not importable there).
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run(
        [sys.executable, "-c", FRESH_LOAD, str(tmp_path / "model"), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": ""},
    )
    out = torch.load(tmp_path / "out.pt")
    assert out["module"].startswith("transformers_modules.") and out["has_template"]
    torch.testing.assert_close(out["logits"], expected, atol=1e-5, rtol=1e-5)
