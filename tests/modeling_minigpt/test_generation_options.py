"""Every `generate()` option stock GPT-2 takes, MiniGPT takes: each option runs on a MiniGPT and on the
`GPT2LMHeadModel` converted from it (`minigpt_to_gpt2`), and both give the same ids (and, where the
option returns them, scores, logits and hidden states within 1e-4: the two models sum in different
orders, ~1e-6 apart in logits).

The prompts are a left-padded batch of two real sentences from the tiny tokenizer; options that
only take one row (streamer, prompt lookup, assisted decoding) get the first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    MaxLengthCriteria,
    StoppingCriteriaList,
    WatermarkingConfig,
)
from transformers.generation.streamers import BaseStreamer

from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM
from modeling_minigpt.convert import minigpt_to_gpt2

NEW_TOKENS = 12
PROMPTS = ["The value of the", "In a function call,"]
SCORE_TOLERANCE = 1e-4


class Collector(BaseStreamer):
    """A streamer that keeps every id it is sent (the prompt first, then one chunk per step)."""

    def __init__(self):
        self.chunks: list[list[int]] = []

    def put(self, value: torch.Tensor) -> None:
        self.chunks.append(value.flatten().tolist())

    def end(self) -> None:
        self.chunks.append([])


class PenaliseEvenIds(LogitsProcessor):
    """A user's own logits processor: every even token id loses 2 logits."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores - 2.0 * (torch.arange(scores.shape[-1], device=scores.device) % 2 == 0)


@dataclass
class Option:
    """generate() keyword arguments, built per model (some objects are per model: an assistant, a streamer)."""

    kwargs: object  # (side) -> dict
    single_row: bool = False
    compare: tuple[str, ...] = ()  # output fields besides `sequences` compared with a tolerance
    seeded: bool = False
    notes: dict = field(default_factory=dict)


def returned(*fields: str) -> dict:
    return dict(return_dict_in_generate=True, **{f"output_{name}": True for name in fields})


OPTIONS: dict[str, Option] = {
    "greedy": Option(lambda s: {}),
    "stop_strings with a tokenizer": Option(lambda s: dict(stop_strings=[s.stop_string], tokenizer=s.tokenizer)),
    "streamer": Option(lambda s: dict(streamer=s.streamer), single_row=True),
    "assistant_model": Option(lambda s: dict(assistant_model=s.assistant), single_row=True),
    "prompt_lookup_num_tokens": Option(lambda s: dict(prompt_lookup_num_tokens=3), single_row=True),
    "prefix_allowed_tokens_fn": Option(
        lambda s: dict(prefix_allowed_tokens_fn=lambda row, ids: list(range(1, 400, 3)))
    ),
    "logits_processor": Option(lambda s: dict(logits_processor=LogitsProcessorList([PenaliseEvenIds()]))),
    "stopping_criteria": Option(
        lambda s: dict(stopping_criteria=StoppingCriteriaList([MaxLengthCriteria(s.prompt_width + 5)]))
    ),
    "output_scores, output_logits, return_dict_in_generate": Option(
        lambda s: returned("scores", "logits"), compare=("scores", "logits")
    ),
    "output_hidden_states": Option(lambda s: returned("hidden_states"), compare=("hidden_states",)),
    "renormalize_logits": Option(lambda s: dict(renormalize_logits=True, **returned("scores")), compare=("scores",)),
    "num_beams": Option(
        lambda s: (
            dict(num_beams=3, num_return_sequences=2, length_penalty=0.7, early_stopping=True) | returned("scores")
        ),
        compare=("sequences_scores",),
    ),
    "do_sample with a seed": Option(lambda s: dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9), seeded=True),
    "do_sample, min_p, typical_p, num_return_sequences": Option(
        lambda s: dict(do_sample=True, min_p=0.02, typical_p=0.95, num_return_sequences=3), seeded=True
    ),
    "do_sample, epsilon and eta cutoffs": Option(
        lambda s: dict(do_sample=True, epsilon_cutoff=3e-4, eta_cutoff=3e-4), seeded=True
    ),
    "do_sample, top_h": Option(lambda s: dict(do_sample=True, top_h=0.9), seeded=True),
    "beam sampling": Option(lambda s: dict(do_sample=True, num_beams=2), seeded=True),
    "repetition_penalty": Option(lambda s: dict(repetition_penalty=1.3)),
    "no_repeat_ngram_size": Option(lambda s: dict(no_repeat_ngram_size=2)),
    "bad_words_ids": Option(lambda s: dict(bad_words_ids=[[t] for t in s.greedy_tokens[:3]])),
    "sequence_bias": Option(lambda s: dict(sequence_bias={(t,): -10.0 for t in s.greedy_tokens[:2]})),
    "suppress_tokens, begin_suppress_tokens": Option(
        lambda s: dict(suppress_tokens=s.greedy_tokens[:2], begin_suppress_tokens=s.greedy_tokens[2:4])
    ),
    "min_new_tokens": Option(lambda s: dict(min_new_tokens=8, eos_token_id=s.greedy_tokens[1])),
    "forced_eos_token_id": Option(lambda s: dict(forced_eos_token_id=s.tokenizer.eos_token_id)),
    "exponential_decay_length_penalty": Option(
        lambda s: dict(exponential_decay_length_penalty=(2, 1.5), eos_token_id=s.greedy_tokens[1])
    ),
    "guidance_scale": Option(lambda s: dict(guidance_scale=1.5), single_row=True),
    "watermarking_config": Option(lambda s: dict(watermarking_config=WatermarkingConfig(bias=2.5))),
    "cache_implementation static": Option(lambda s: dict(cache_implementation="static")),
    "use_cache False": Option(lambda s: dict(use_cache=False)),
    "prefill_chunk_size": Option(lambda s: dict(prefill_chunk_size=2), single_row=True),
}
# Decoding methods transformers 5 moved to the Hub (`custom_generate`, downloaded with
# trust_remote_code): constrained beam search (force_words_ids / constraints), DoLa, contrastive
# search, group beam search. Offline, both models refuse them with the same message.
HUB_ONLY = {
    "force_words_ids": dict(force_words_ids=[[5]], num_beams=2),
    "dola_layers": dict(dola_layers="low"),
    "penalty_alpha": dict(penalty_alpha=0.6, top_k=4),
    "num_beam_groups": dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0),
}


@pytest.fixture(scope="module")
def models(tiny_tokenizer):
    """A tiny MiniGPT and its GPT-2 conversion, and a smaller draft model for assisted decoding, both ways."""
    torch.manual_seed(0)
    base = dict(vocab_size=len(tiny_tokenizer), context_length=64, emb_dim=32, n_heads=4, drop_rate=0.0)
    ours = MiniGPTForCausalLM(MiniGPTConfig(**base, n_layers=2)).eval()
    draft = MiniGPTForCausalLM(MiniGPTConfig(**base, n_layers=1)).eval()
    return {"minigpt": (ours, draft), "gpt2": (minigpt_to_gpt2(ours).eval(), minigpt_to_gpt2(draft).eval())}


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    rows = [tiny_tokenizer.encode(text) for text in PROMPTS]
    width = max(len(r) for r in rows)
    pad = tiny_tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def generate(model, assistant, option: Option, tokenizer, prompts, context: dict):
    ids, mask = prompts
    if option.single_row:
        ids, mask = ids[:1, mask[0].argmax() :], mask[:1, mask[0].argmax() :]
    side = SimpleNamespace(
        tokenizer=tokenizer, assistant=assistant, streamer=Collector(), prompt_width=ids.shape[1], **context
    )
    kwargs = option.kwargs(side)
    kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    if option.seeded:
        torch.manual_seed(1234)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, pad_token_id=tokenizer.pad_token_id, **kwargs
        )
    return out, side.streamer.chunks


@pytest.fixture(scope="module")
def context(models, tiny_tokenizer, prompts):
    """What some options are built from: the greedy continuation's tokens (so bans and biases bite)
    and a stop string inside its text."""
    ours, draft = models["minigpt"]
    out, _ = generate(ours, draft, OPTIONS["greedy"], tiny_tokenizer, prompts, {})
    tokens = out[0, prompts[0].shape[1] :].tolist()
    text = tiny_tokenizer.decode(tokens)
    return {"greedy_tokens": tokens, "stop_string": text[len(text) // 2 :][:2]}


def close(a, b) -> None:
    """Tensors, or nested tuples of them (per-step scores, per-step per-layer hidden states)."""
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, atol=SCORE_TOLERANCE, rtol=0)
        return
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        close(x, y)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_minigpt_and_its_gpt2_generate_the_same(name, models, tiny_tokenizer, prompts, context):
    option = OPTIONS[name]
    (ours, ours_draft), (theirs, theirs_draft) = models["minigpt"], models["gpt2"]
    mine, my_stream = generate(ours, ours_draft, option, tiny_tokenizer, prompts, context)
    stock, stock_stream = generate(theirs, theirs_draft, option, tiny_tokenizer, prompts, context)
    my_ids = mine if isinstance(mine, torch.Tensor) else mine.sequences
    stock_ids = stock if isinstance(stock, torch.Tensor) else stock.sequences
    assert torch.equal(my_ids, stock_ids)
    assert my_stream == stock_stream
    for field_name in option.compare:
        assert getattr(mine, field_name) is not None
        close(getattr(mine, field_name), getattr(stock, field_name))


def test_the_options_change_what_is_generated(models, tiny_tokenizer, prompts, context):
    """The matrix is not vacuous: the options meant to change the text do change it."""
    ours, draft = models["minigpt"]
    greedy, _ = generate(ours, draft, OPTIONS["greedy"], tiny_tokenizer, prompts, context)
    for name in ("logits_processor", "bad_words_ids", "repetition_penalty", "do_sample with a seed"):
        out, _ = generate(ours, draft, OPTIONS[name], tiny_tokenizer, prompts, context)
        assert not torch.equal(out, greedy), name
    stopped, _ = generate(ours, draft, OPTIONS["stop_strings with a tokenizer"], tiny_tokenizer, prompts, context)
    # The first row stopped inside the text (the rest of it is padding); the batch ran on for the second.
    assert stopped[0, -1] == tiny_tokenizer.pad_token_id != greedy[0, -1]


@pytest.mark.parametrize("name", list(HUB_ONLY))
def test_options_that_need_the_hub_are_refused_alike(name, models, prompts):
    messages = []
    for model, _ in models.values():
        with pytest.raises(ValueError, match="requires `trust_remote_code=True`") as error:
            model.generate(prompts[0][:1], max_new_tokens=2, pad_token_id=0, **HUB_ONLY[name])
        messages.append(str(error.value))
    assert messages[0] == messages[1]
