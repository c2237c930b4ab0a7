"""PEFT on MiniGPT with no module names or sizes passed by hand (modeling_minigpt.peft_defaults and
MiniGPTConfig.to_dict): LoRA and IA3 find their default targets, prompt, prefix and P-tuning their
sizes; each trains (forward + backward), and the prompt-learning methods give the logits of the same
method on the GPT-2 converted from the model."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import (
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)

from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM
from modeling_minigpt.convert import minigpt_to_gpt2

VOCAB = 97


def tiny_model(seed: int = 0) -> MiniGPTForCausalLM:
    torch.manual_seed(seed)
    config = MiniGPTConfig(vocab_size=VOCAB, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
    return MiniGPTForCausalLM(config).eval()


def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def train_step(model) -> dict[str, torch.Tensor]:
    """One forward + backward; the gradients of the trainable parameters, which must all be set."""
    model.train()
    loss = model(**batch()).loss
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert torch.isfinite(loss)
    return grads


@pytest.mark.parametrize(
    "config, targets",
    [
        # GPT-2's defaults (c_attn; IA3 also mlp.c_proj, its feed-forward) under MiniGPT's names.
        (LoraConfig(task_type="CAUSAL_LM"), {"att.W_query", "att.W_key", "att.W_value"}),
        (IA3Config(task_type="CAUSAL_LM"), {"att.W_query", "att.W_key", "att.W_value", "ff.fc_out"}),
    ],
    ids=["lora", "ia3"],
)
def test_lora_and_ia3_find_their_default_targets(config, targets):
    model = get_peft_model(tiny_model(), config)
    assert model.peft_config["default"].target_modules == targets
    adapted = {name.split("trf_blocks.")[1].split(".", 1)[1] for name in model.targeted_module_names}
    assert adapted == targets
    if isinstance(config, IA3Config):
        assert model.peft_config["default"].feedforward_modules == {"ff.fc_out"}
    grads = train_step(model)
    assert all(("lora_" in name) or ("ia3_" in name) for name in grads)
    assert len(grads) == 2 * len(targets) * (2 if isinstance(config, LoraConfig) else 1)


PROMPT_LEARNING = [
    PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16),
]


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")  # PEFT's prefix tuning uses the old name
@pytest.mark.parametrize("config", PROMPT_LEARNING, ids=["prompt", "prefix", "p-tuning"])
def test_prompt_learning_infers_its_sizes_and_matches_gpt2(config):
    ours = tiny_model()
    theirs = minigpt_to_gpt2(ours).eval()
    # The same method on stock GPT-2, whose config PEFT knows, with the same prompt weights.
    peft_theirs = get_peft_model(theirs, copy.deepcopy(config))
    peft_ours = get_peft_model(ours, copy.deepcopy(config))
    inferred = peft_ours.peft_config["default"]
    assert (inferred.token_dim, inferred.num_layers, inferred.num_attention_heads) == (32, 2, 4)
    peft_theirs.prompt_encoder.load_state_dict(peft_ours.prompt_encoder.state_dict())
    # No padding: GPT-2 numbers positions from column 0, MiniGPT after the padding (as generate does).
    ids = batch()["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(
            peft_ours(input_ids=ids).logits, peft_theirs(input_ids=ids).logits, atol=1e-5, rtol=0
        )
    train_step(peft_ours)


def test_config_dict_carries_the_standard_names_and_loads_back(tmp_path):
    config = tiny_model().config
    as_dict = config.to_dict()
    assert (as_dict["hidden_size"], as_dict["num_attention_heads"], as_dict["num_hidden_layers"]) == (32, 4, 2)
    assert as_dict["max_position_embeddings"] == 32
    config.save_pretrained(tmp_path)
    loaded = MiniGPTConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == as_dict
    assert (loaded.emb_dim, loaded.n_heads, loaded.n_layers, loaded.context_length) == (32, 4, 2, 32)
