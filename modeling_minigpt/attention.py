"""Causal multi-head self-attention, written out step by step.

This is the book's `MultiHeadAttention` (chapter 3) plus what a Hugging Face model needs: a KV
cache for generation and masks for padded or packed batches. The score computation below
(`_eager`) is the book's and is what `attn_implementation="eager"` runs; it is also the only path
that returns the attention weights. Every other implementation (sdpa, flex attention, the flash
kernels, and paged attention for continuous batching) computes the same thing with a kernel that
transformers provides, picked from its attention interface (`ALL_ATTENTION_FUNCTIONS`) by name, so
any kernel transformers supports works here without code of ours.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .linear import Linear


class MultiHeadAttention(nn.Module):
    # Read by the sdpa and flash kernels: a decoder's attention is causal unless a mask says otherwise.
    is_causal = True

    def __init__(self, config, layer_idx: int):
        super().__init__()
        # The config is kept (not copied into fields) so `set_attn_implementation` on the model
        # switches this module's path at run time.
        self.config = config
        self.layer_idx = layer_idx
        self.n_heads = config.n_heads
        self.head_dim = config.emb_dim // config.n_heads
        d = config.emb_dim
        self.W_query = Linear(d, d, bias=config.qkv_bias)
        self.W_key = Linear(d, d, bias=config.qkv_bias)
        self.W_value = Linear(d, d, bias=config.qkv_bias)
        self.out_proj = Linear(d, d)
        self.dropout = nn.Dropout(config.drop_rate)
        # mask[i, j] is True where query i must NOT see key j (j > i): plain causal attention,
        # used when the model passes no mask. Not persistent: it is derived data, so
        # `_init_weights` rebuilds it after loading from the meta device.
        self.register_buffer("mask", causal_mask(config.context_length), persistent=False)

    def forward(
        self,
        x: torch.Tensor,
        attention_mask=None,
        cache=None,
        output_attentions: bool = False,
        **kernel_kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, T, C). attention_mask: what `transformers.masking_utils.create_causal_mask` built
        for this implementation, once per forward: None for plain causal attention; for eager and
        sdpa a (B or 1, 1, T, S) tensor over the S keys (cached + new), bool (True where a query may
        look) or float (added to the scores); a BlockMask for flex attention. cache: a transformers
        `Cache` or None. kernel_kwargs: what kernels other than eager read (packed sequences'
        `cu_seq_lens_*`, paged attention's `block_table` / `read_index` / `write_index`); they also
        go to `cache.update`, where a paged cache finds its indices. output_attentions: run the
        eager path for this call, the only one that has the weights.
        Returns the output (B, T, C) and, on the eager path, the weights (B, n_heads, T, S)."""
        B, T, C = x.shape
        queries = self.W_query(x)  # (B, T, C)
        keys = self.W_key(x)
        values = self.W_value(x)

        # Split the channels into heads: (B, T, C) -> (B, T, n_heads, head_dim) -> (B, n_heads, T, head_dim)
        queries = queries.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        keys = keys.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        values = values.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

        if cache is not None:
            # A dynamic cache returns the S keys seen so far, a static one its whole preallocated
            # buffer (S = max_cache_len; the mask hides the slots not yet written), a paged one the
            # keys its read index selects (the kwargs name them).
            keys, values = cache.update(keys, values, self.layer_idx, kwargs=kernel_kwargs)  # (B, n_heads, S, head_dim)

        implementation = self.config._attn_implementation
        if output_attentions or implementation == "eager":
            context, weights = self._eager(queries, keys, values, attention_mask)
            context = context.transpose(1, 2)  # (B, n_heads, T, head_dim) -> (B, T, n_heads, head_dim)
        else:
            kernel = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, None)
            context, weights = kernel(
                self,
                queries,
                keys,
                values,
                attention_mask,
                dropout=self.dropout.p if self.training else 0.0,
                scaling=1 / math.sqrt(self.head_dim),
                **kernel_kwargs,
            )  # context: (B, T, n_heads, head_dim)

        # Merge the heads back: (B, T, n_heads, head_dim) -> (B, T, C)
        context = context.reshape(B, T, C)
        return self.out_proj(context), weights

    def _eager(self, queries, keys, values, attention_mask):
        T, S = queries.shape[2], keys.shape[2]
        scores = queries @ keys.transpose(2, 3) / math.sqrt(self.head_dim)  # (B, n_heads, T, S)
        # finfo.min instead of -inf: a fully masked row (a padding query) would otherwise softmax to NaN.
        blocked_score = torch.finfo(scores.dtype).min
        if attention_mask is None:
            # Plain causal: query i sees keys 0..i. A single new query (decoding) sees every key.
            if T > 1:
                scores = scores.masked_fill(self.mask[:T, :S], blocked_score)
        elif attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, blocked_score)
        else:
            scores = scores + attention_mask
        weights = torch.softmax(scores, dim=-1)
        weights = self.dropout(weights)
        return weights @ values, weights  # (B, n_heads, T, head_dim), (B, n_heads, T, S)


def causal_mask(context_length: int) -> torch.Tensor:
    """(context_length, context_length) bool, True above the diagonal (the future)."""
    return torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), diagonal=1)
