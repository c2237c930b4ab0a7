"""training/evaluation/generate.py: eval mode for one block, and batched greedy generation equal to an
argmax loop."""

from __future__ import annotations

import pytest
import torch
from helpers.models import tiny_model

from training.evaluation.generate import eval_mode, greedy_generate


def argmax_continuation(model, prompt: list[int], max_new_tokens: int, eos: int) -> list[int]:
    """The reference: one token at a time, the most likely next one, up to and including eos."""
    ids, new = torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            next_id = int(model(input_ids=ids).logits[0, -1].argmax())
            new.append(next_id)
            if next_id == eos:
                break
            ids = torch.cat([ids, torch.tensor([[next_id]])], dim=1)
    return new


def test_a_left_padded_batch_continues_each_prompt_like_an_argmax_loop():
    model = tiny_model(97, context_length=32)
    prompts = [[5, 6, 7], [9], [1, 2, 3, 4, 5, 6], [40, 41]]
    eos = int(model(input_ids=torch.tensor([prompts[0]])).logits[0, -1].argmax())  # row 0 stops at once
    batched = greedy_generate(model, prompts, 8, eos_token_id=eos, pad_token_id=0, batch_size=3)
    assert batched == [argmax_continuation(model, p, 8, eos) for p in prompts]
    assert batched[0] == [eos]


def test_a_prompt_longer_than_the_room_keeps_its_last_tokens():
    model = tiny_model(97, context_length=16)
    prompt = list(range(1, 30))
    [kept] = greedy_generate(model, [prompt], 4, eos_token_id=96, pad_token_id=0)
    assert kept == argmax_continuation(model, prompt[-12:], 4, 96)
    with pytest.raises(ValueError, match=r"max_new_tokens must be in \[1, 15\]"):
        greedy_generate(model, [prompt], 16, eos_token_id=96, pad_token_id=0)


def test_eval_mode_restores_the_mode_even_when_the_block_fails():
    model = tiny_model(97).train()
    with pytest.raises(RuntimeError), eval_mode(model):
        assert not model.training
        raise RuntimeError("inside")
    assert model.training
    with eval_mode(model.eval()):
        pass
    assert not model.training
