"""Causal multi-head self-attention, written out step by step.

This is the book's `MultiHeadAttention` (chapter 3) plus what a Hugging Face model needs: a KV
cache for generation, masks for padded or packed batches, and a second path through PyTorch's
fused `scaled_dot_product_attention` (sdpa) that computes the same thing faster.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear


class MultiHeadAttention(nn.Module):
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
        attention_mask: torch.Tensor | None = None,
        cache=None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, T, C). attention_mask: None for plain causal attention, else (B or 1, 1, T, S)
        over the S keys (cached + new): bool, True where a query may look, or float, added to the
        scores (0 or a large negative number). The model builds it once per forward
        (`transformers.masking_utils.create_causal_mask`). cache: a transformers `Cache` or None.
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
            # buffer (S = max_cache_len; the mask hides the slots not yet written).
            keys, values = cache.update(keys, values, self.layer_idx)  # (B, n_heads, S, head_dim)

        if output_attentions or self.config._attn_implementation == "eager":
            context, weights = self._eager(queries, keys, values, attention_mask)
        else:
            context, weights = self._sdpa(queries, keys, values, attention_mask), None

        # Merge the heads back: (B, n_heads, T, head_dim) -> (B, T, n_heads, head_dim) -> (B, T, C)
        context = context.transpose(1, 2).reshape(B, T, C)
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

    def _sdpa(self, queries, keys, values, attention_mask):
        dropout_p = self.config.drop_rate if self.training else 0.0
        # No mask means plain causal attention, which the fused kernel applies itself (cheapest);
        # a single new query needs no mask at all. The same rule as the eager path above. The
        # shape test comes first: with dynamic shapes under torch.compile it is symbolic, and
        # `and` turns it into the plain bool sdpa requires.
        is_causal = queries.shape[2] > 1 and attention_mask is None
        return F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=attention_mask, dropout_p=dropout_p, is_causal=is_causal
        )


def causal_mask(context_length: int) -> torch.Tensor:
    """(context_length, context_length) bool, True above the diagonal (the future)."""
    return torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), diagonal=1)
