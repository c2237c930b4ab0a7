"""Attention through transformers' attention interface: every implementation against the
hand-written eager path on padded, packed and cached batches; hidden states and attention weights
recorded by hooks against GPT-2's; continuous batching against `generate` run alone.

Tolerances: fp32 on the CPU. sdpa and flex attention sum in another order than eager: their
logits differ from eager's by ~1e-7 on these 2-layer models; 1e-5 leaves room for other CPUs'
kernels and still catches any masking mistake (a token that sees one it should not moves the
logits by ~1e-2).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, ContinuousBatchingConfig, DataCollatorWithFlattening, GenerationConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.utils import is_flash_attn_2_available

from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM, MiniGPTForSequenceClassification
from modeling_minigpt.convert import minigpt_to_gpt2

VOCAB = 97
ATOL = 1e-5

# Calls of the "counting_sdpa" implementation registered below: any function registered with
# `AttentionInterface` runs (the `_supports_attention_backend` promise), not only transformers' own.
# It registers the mask it reads too; without one, transformers builds no mask for it (as for
# vLLM's or TGI's kernels, which mask by themselves).
COUNTED_CALLS: list[int] = []


def counting_sdpa(module, query, key, value, attention_mask, **kwargs):
    COUNTED_CALLS.append(module.layer_idx)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("counting_sdpa", counting_sdpa)
AttentionMaskInterface.register("counting_sdpa", sdpa_mask)

IMPLEMENTATIONS = [
    "sdpa",
    "counting_sdpa",
    # Compiled on first use: ~100 s on a shared 2-core machine.
    pytest.param("flex_attention", marks=pytest.mark.slow),
    pytest.param(
        "flash_attention_2",
        marks=pytest.mark.skipif(
            not (is_flash_attn_2_available() and torch.cuda.is_available()), reason="flash-attn needs CUDA"
        ),
    ),
]


TINY = dict(vocab_size=VOCAB, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)


def tiny_model(implementation: str = "eager", seed: int = 0, **overrides) -> MiniGPTForCausalLM:
    torch.manual_seed(seed)
    model = MiniGPTForCausalLM(MiniGPTConfig(**{**TINY, **overrides})).eval()
    model.set_attn_implementation(implementation)
    if implementation.startswith("flash"):
        model.to("cuda", torch.bfloat16)
    return model


def random_rows(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float().cpu() - b.float().cpu()).abs().max().item()


def padded_logits(model, rows):
    """Logits of the real tokens of a left-padded batch, one (len, vocab) tensor per row."""
    ids, mask = left_padded(rows)
    logits = model(ids.to(model.device), attention_mask=mask.to(model.device)).logits
    return [logits[i, mask.shape[1] - len(row) :] for i, row in enumerate(rows)]


def packed_logits(model, rows):
    """The rows packed padding-free into one (1, total) row, as `DataCollatorWithFlattening` packs
    them for training: position ids restart at 0 per sequence, and the flash kernels' cumulative
    lengths (cu_seq_lens_q/k, max_length_q/k) come along. Either marks where a sequence ends."""
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": r} for r in rows])
    batch.pop("labels")
    logits = model(**{k: v.to(model.device) if torch.is_tensor(v) else v for k, v in batch.items()}).logits[0]
    ends = torch.tensor([len(r) for r in rows]).cumsum(0).tolist()
    return [logits[end - len(row) : end] for end, row in zip(ends, rows, strict=True)]


def cached_logits(model, rows, prefix: int = 6):
    """A left-padded batch run as generate runs it: the first `prefix` columns in one forward that
    fills the cache, then one column at a time from the cache."""
    ids, mask = left_padded(rows)
    ids, mask = ids.to(model.device), mask.to(model.device)
    out = model(ids[:, :prefix], attention_mask=mask[:, :prefix], use_cache=True)
    steps = [out.logits]
    for t in range(prefix, ids.shape[1]):
        out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=out.cache, use_cache=True)
        steps.append(out.logits)
    logits = torch.cat(steps, dim=1)
    return [logits[i, mask.shape[1] - len(row) :] for i, row in enumerate(rows)]


BATCHES = {"padded": padded_logits, "packed": packed_logits, "cached": cached_logits}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_every_implementation_gives_the_eager_logits_on_padded_packed_and_cached_batches(implementation):
    eager, other = tiny_model("eager"), tiny_model(implementation)
    atol = 2e-2 if implementation.startswith("flash") else ATOL  # flash runs in bf16 on the GPU
    with torch.no_grad():  # flex attention has no backward on the CPU
        for name, run in BATCHES.items():
            rows = random_rows([12, 7, 3, 9])
            if implementation == "flex_attention" and name == "cached" and other.device.type == "cpu":
                # torch 2.13's CPU flex kernel does not compile (C++ error) for a padded batch read
                # from a cache; Llama's flex path fails the same way. Rows of one length need no padding.
                rows = random_rows([9, 9, 9])
            # The eager reference: each row run alone, no padding, no cache.
            alone = [eager(torch.tensor([row])).logits[0] for row in rows]
            COUNTED_CALLS.clear()
            for row, expected, got in zip(rows, alone, run(other, rows), strict=True):
                assert max_difference(got, expected) <= atol, (name, len(row))
            if implementation == "counting_sdpa":
                assert COUNTED_CALLS and set(COUNTED_CALLS) == {0, 1}, name


def test_eager_itself_gives_the_same_logits_padded_packed_and_cached():
    rows = random_rows([12, 7, 3, 9])
    model = tiny_model("eager")
    with torch.no_grad():
        alone = [model(torch.tensor([row])).logits[0] for row in rows]
        for run in BATCHES.values():
            for expected, got in zip(alone, run(model, rows), strict=True):
                torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_set_attn_implementation_switches_the_path_at_run_time():
    model = tiny_model("sdpa")
    ids = torch.tensor(random_rows([10]))
    COUNTED_CALLS.clear()
    model.set_attn_implementation("counting_sdpa")
    model(ids)
    assert COUNTED_CALLS == [0, 1]
    model.set_attn_implementation("eager")
    model(ids)
    assert COUNTED_CALLS == [0, 1]  # eager is ours, not a registered function


# --- outputs recorded by hooks (`_can_record_outputs`) ------------------------------------------------


def gpt2_reference(model: MiniGPTForCausalLM):
    gpt2 = minigpt_to_gpt2(model).eval()
    gpt2.set_attn_implementation("eager")
    return gpt2


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_hidden_states_and_attentions_equal_gpt2s(implementation):
    model = tiny_model(implementation)
    gpt2 = gpt2_reference(model)
    ids, mask = left_padded(random_rows([10, 6]))
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
        # GPT-2 numbers positions from 0 at column 0; ours after the padding, as `generate` does.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        theirs = gpt2(
            ids, attention_mask=mask, position_ids=positions, output_hidden_states=True, output_attentions=True
        )
    assert len(ours.hidden_states) == len(theirs.hidden_states) == model.config.n_layers + 1
    assert len(ours.attentions) == len(theirs.attentions) == model.config.n_layers
    real = mask.bool()
    for a, b in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        torch.testing.assert_close(a[real], b[real], atol=ATOL, rtol=0)
    for a, b in zip(ours.attentions, theirs.attentions, strict=True):
        assert a.shape == (2, 4, 10, 10)
        # Rows of real queries (a padding query's row is meaningless): (B, T, H, S)[real] -> (n, H, S).
        torch.testing.assert_close(a.transpose(1, 2)[real], b.transpose(1, 2)[real], atol=ATOL, rtol=0)
    # The last hidden state is after the final LayerNorm, as GPT-2's is.
    base = model.model(ids, attention_mask=mask, output_hidden_states=True)
    assert torch.equal(base.hidden_states[-1], base.last_hidden_state)


def test_recorded_outputs_follow_the_config_and_stay_off_by_default():
    model = tiny_model("eager")  # the config refuses output_attentions with another implementation
    ids = torch.tensor(random_rows([5]))
    out = model(ids)
    assert out.hidden_states is None and out.attentions is None
    model.config.output_hidden_states = True
    model.config.output_attentions = True
    out = model(ids)
    assert len(out.hidden_states) == 3 and len(out.attentions) == 2
    # The classifier records through the same base model.
    torch.manual_seed(0)
    clf = MiniGPTForSequenceClassification(MiniGPTConfig(**TINY, num_labels=2)).eval()
    out = clf(ids, output_hidden_states=True)
    assert len(out.hidden_states) == 3 and out.attentions is None


def test_attention_weights_need_eager_or_sdpa():
    model = tiny_model("counting_sdpa")
    with pytest.raises(ValueError, match="output_attentions=True needs attn_implementation 'eager' or 'sdpa'"):
        model(torch.tensor(random_rows([5])), output_attentions=True)


# --- keyword arguments: kernels' and generate's pass, typos do not ---------------------------------


def test_generate_with_stop_strings_passes_its_tokenizer_through(tiny_tokenizer):
    """generate() leaves `tokenizer` among the model kwargs; the forward must not refuse it."""
    model = tiny_model("sdpa", vocab_size=len(tiny_tokenizer), context_length=64)
    prompt = torch.tensor([tiny_tokenizer.encode("The value of")])
    # A stop string the unconstrained greedy text contains, so stopping is visible.
    free = model.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
    text = tiny_tokenizer.decode(free[0, prompt.shape[1] :])
    stop = text[len(text) // 2 :][:2]
    stopped = model.generate(
        prompt, max_new_tokens=20, do_sample=False, pad_token_id=0, stop_strings=[stop], tokenizer=tiny_tokenizer
    )
    assert stop in tiny_tokenizer.decode(stopped[0, prompt.shape[1] :])
    assert stopped.shape[1] < free.shape[1]
    assert torch.equal(stopped[0], free[0, : stopped.shape[1]])


def test_a_misspelt_keyword_is_still_refused():
    model = tiny_model("sdpa")
    ids = torch.tensor(random_rows([5]))
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['cu_seq_len_q'\]"):
        model(ids, cu_seq_len_q=torch.tensor([0, 5]))
    with pytest.raises(TypeError, match=r"MiniGPTModel.forward\(\) got unexpected keyword arguments \['tokenizer'\]"):
        model.model(ids, tokenizer=None)  # generate's kwargs are dropped by the causal LM, not the base model


# --- continuous batching (paged attention) -----------------------------------------------------------


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_generate_batch_gives_each_request_the_ids_of_generate_alone(implementation):
    """`generate_batch` schedules requests of different lengths together in one flat row, with a
    paged KV cache; "eager" runs transformers' `paged|eager` kernel. Greedy ids must be those of
    `generate` on each prompt alone."""
    model = tiny_model(implementation, context_length=64)
    rows = random_rows([3, 17, 5, 30, 1, 12, 8, 25, 2, 9, 14, 4, 21, 6, 11, 19], seed=3)
    config = GenerationConfig(max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    # A small paged cache (left alone, it is sized from the machine's free memory: seconds to
    # allocate on the CPU), and batches of at most 64 tokens, so long prompts are prefilled in
    # chunks while other requests decode.
    paging = ContinuousBatchingConfig(page_size=16, num_blocks=64, max_batch_tokens=64)
    results = model.generate_batch(rows, generation_config=config, continuous_batching_config=paging)
    assert len(results) == len(rows)
    for row, result in zip(rows, results.values(), strict=True):
        assert result.error is None and result.prompt_ids == row
        alone = model.generate(torch.tensor([row]), generation_config=config)[0, len(row) :].tolist()
        assert result.generated_tokens == alone, len(row)
    assert model.config._attn_implementation == implementation  # switched back after the batch
