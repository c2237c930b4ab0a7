"""Tiny models: causal LMs with known outputs, and a config for LoRA tests."""

from __future__ import annotations

import torch

from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM


def tiny_model(vocab_size: int, context_length: int = 16, seed: int = 0) -> MiniGPTForCausalLM:
    torch.manual_seed(seed)
    config = MiniGPTConfig.from_preset(
        "tiny", vocab_size=vocab_size, context_length=context_length, emb_dim=32, n_heads=2
    )
    return MiniGPTForCausalLM(config).eval()


def uniform_model(vocab_size: int, context_length: int = 16) -> MiniGPTForCausalLM:
    """Zero output head (tied to the embedding) -> all logits 0 -> uniform next-token distribution."""
    model = tiny_model(vocab_size, context_length)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


VOCAB = 96


def tiny_config(**overrides) -> MiniGPTConfig:
    return MiniGPTConfig.from_preset(
        "tiny", **{"vocab_size": VOCAB, "context_length": 32, "emb_dim": 32, "n_heads": 2, **overrides}
    )


# Label names of the tiny classifier folder (`classifier_dir` in conftest.py).
LABELS = ("animals", "food", "weather")


def scripted_model(prompt_length: int, reply_ids: list[int], eos_token_id: int, vocab_size: int) -> MiniGPTForCausalLM:
    """A MiniGPT whose greedy answer to any prompt of `prompt_length` tokens is `reply_ids`, then eos.

    Its blocks add nothing (all their weights are 0) and its token embeddings are 0, so the last
    hidden state at position p is LayerNorm(pos_emb[p]). The position embeddings are orthonormal
    and mean-free (LayerNorm only scales them), and the output head's row of a token is the sum of
    the hidden states of the positions that must predict it: there the token's logit is emb_dim
    and every other logit 0, an exact margin. Positions off the script predict token 0 (a tie).
    """
    context_length = prompt_length + len(reply_ids) + 1
    emb_dim = 2 * ((context_length + 2) // 2)  # > context_length: room for the rows and the mean direction
    config = MiniGPTConfig.from_preset(
        "tiny",
        vocab_size=vocab_size,
        context_length=context_length,
        emb_dim=emb_dim,
        n_heads=2,
        n_layers=1,
        tie_word_embeddings=False,
        eos_token_id=eos_token_id,
    )
    model = MiniGPTForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(emb_dim, emb_dim, generator=generator))[0]  # orthonormal columns
    ones = torch.ones(emb_dim) / emb_dim**0.5
    rows = basis[:, :context_length].T  # (T, C)
    rows = rows - (rows @ ones)[:, None] * ones  # mean-free...
    rows = torch.linalg.qr(rows.T)[0].T  # ...and orthonormal again
    with torch.no_grad():
        for parameter in model.model.trf_blocks.parameters():
            parameter.zero_()
        model.model.tok_emb.weight.zero_()
        model.model.pos_emb.weight.copy_(rows)
        model.lm_head.weight.zero_()
        hidden = model.model.final_norm(rows)  # (T, C)
        for offset, token in enumerate([*reply_ids, eos_token_id]):
            model.lm_head.weight[token] += hidden[prompt_length - 1 + offset]
    return model
