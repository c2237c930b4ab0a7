"""Generation for evaluation: eval mode for one block, and one batched greedy generator.

`greedy_generate` serves the pretraining samples, SFT's held-out answers and the quickstart
report. Greedy decoding draws no random numbers, so generating during training cannot change
what a resumed run computes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from transformers import PreTrainedTokenizerBase

from training.data.collate import pad_sequences
from training.data.instructions import encode_prompt


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`model` in eval mode (no dropout) for the block; its train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def check_generation_room(max_new_tokens: int, context_length: int, flag: str = "max_new_tokens") -> None:
    """ValueError unless `max_new_tokens` new tokens fit a `context_length`-token context after a
    prompt of at least one token. Jobs call it before their run folder is written, so a generation
    during training cannot fail after the run has started."""
    if not 0 < max_new_tokens < context_length:
        raise ValueError(
            f"{flag} must be in [1, {context_length - 1}] for the model's {context_length}-token context "
            f"(a prompt needs at least one token), got {max_new_tokens}"
        )


@torch.no_grad()
def greedy_generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    eos_token_id: int,
    pad_token_id: int,
    batch_size: int = 16,
    accelerator: Accelerator | None = None,
) -> list[list[int]]:
    """Greedy continuations of token-id prompts, in order: each row's new ids, up to and
    including its first eos.

    Prompts are batched with LEFT padding so every row's last prompt token sits at the end and
    generation continues from it (the model derives positions from the attention mask). A
    prompt longer than `context_length - max_new_tokens` keeps its last tokens. With an
    `accelerator`, each process generates a contiguous share and all get the full list.
    `model` may be a MiniGPT, any HF causal LM or a PEFT model (not a DDP wrapper).
    """
    context_length = model.config.max_position_embeddings
    check_generation_room(max_new_tokens, context_length)
    room = context_length - max_new_tokens
    device = next(model.parameters()).device
    indices = list(range(len(prompts)))
    outputs: list[list[int]] = []
    shard = accelerator.split_between_processes(indices) if accelerator is not None else contextlib.nullcontext(indices)
    with eval_mode(model), shard as mine:
        for start in range(0, len(mine), batch_size):
            rows = [list(prompts[i])[-room:] for i in mine[start : start + batch_size]]
            input_ids = pad_sequences(rows, pad_token_id, side="left").to(device)  # (B, T)
            attention_mask = pad_sequences([[1] * len(row) for row in rows], 0, side="left").to(device)
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
            )
            outputs += [_through_eos(row, eos_token_id) for row in output[:, input_ids.shape[1] :].tolist()]  # (B, new)
    return gather_object(outputs) if accelerator is not None and accelerator.num_processes > 1 else outputs


def _through_eos(ids: list[int], eos_token_id: int) -> list[int]:
    """`ids` up to and including the first eos: what follows is padding of rows that stopped early."""
    return ids[: ids.index(eos_token_id) + 1] if eos_token_id in ids else ids


def generate_answers(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Mapping[str, str]],
    max_new_tokens: int,
    batch_size: int = 16,
    accelerator: Accelerator | None = None,
) -> list[str]:
    """Greedy answers to the records' prompts, in order, each cut at the first eos
    (`training.evaluation.generate.greedy_generate`: batched, left-padded, sharded over processes)."""
    prompts = [encode_prompt(tokenizer, record) for record in records]
    new = greedy_generate(
        model,
        prompts,
        max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        batch_size=batch_size,
        accelerator=accelerator,
    )
    return [_decode_answer(tokenizer, ids) for ids in new]


def _decode_answer(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=True)
