"""Causal multi-head self-attention, written out step by step.

This is the book's `MultiHeadAttention` (chapter 3) plus what a Hugging Face model needs: a KV
cache for generation, padding masks for batches, and a second path through PyTorch's fused
`scaled_dot_product_attention` (sdpa) that computes the same thing faster.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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
        self.W_query = nn.Linear(d, d, bias=config.qkv_bias)
        self.W_key = nn.Linear(d, d, bias=config.qkv_bias)
        self.W_value = nn.Linear(d, d, bias=config.qkv_bias)
        self.out_proj = nn.Linear(d, d)
        self.dropout = nn.Dropout(config.drop_rate)
        # mask[i, j] is True where query i must NOT see key j (j > i). Not persistent: it is
        # derived data, so `_init_weights` rebuilds it after loading from the meta device.
        self.register_buffer("mask", causal_mask(config.context_length), persistent=False)

    def forward(
        self,
        x: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        cache=None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, T, C). padding_mask: (B, S) with 1 for real tokens, 0 for padding, covering the
        cached keys plus the T new ones, or None when nothing is padded. cache: a transformers
        `Cache` or None. Returns the output (B, T, C) and, on the eager path, the weights."""
        B, T, C = x.shape
        queries = self.W_query(x)  # (B, T, C)
        keys = self.W_key(x)
        values = self.W_value(x)

        # Split the channels into heads: (B, T, C) -> (B, T, n_heads, head_dim) -> (B, n_heads, T, head_dim)
        queries = queries.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        keys = keys.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        values = values.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

        past = 0
        if cache is not None:
            past = cache.get_seq_length(self.layer_idx)
            keys, values = cache.update(keys, values, self.layer_idx)  # (B, n_heads, S, head_dim)
        S = keys.shape[2]  # S = past + T

        use_eager = output_attentions or self.config._attn_implementation == "eager"
        if use_eager:
            context, weights = self._eager(queries, keys, values, padding_mask, past)
        else:
            context, weights = self._sdpa(queries, keys, values, padding_mask, past), None

        # Merge the heads back: (B, n_heads, T, head_dim) -> (B, T, n_heads, head_dim) -> (B, T, C)
        context = context.transpose(1, 2).reshape(B, T, C)
        return self.out_proj(context), weights

    def _blocked(self, padding_mask: torch.Tensor | None, past: int, T: int) -> torch.Tensor:
        """(B or 1, 1, T, S) bool, True where a query may not look: the future, and padding."""
        S = past + T
        blocked = self.mask[past:S, :S][None, None]  # (1, 1, T, S)
        if padding_mask is not None:
            blocked = blocked | (padding_mask[:, None, None, :S] == 0)  # (B, 1, T, S)
            # A query on a padding position may have nothing left to look at. Letting such a row
            # attend everywhere keeps it finite (its output is never used) and equals what
            # eager's softmax over identical minimum scores gives.
            blocked = blocked & ~blocked.all(dim=-1, keepdim=True)
        return blocked

    def _eager(self, queries, keys, values, padding_mask, past):
        T = queries.shape[2]
        scores = queries @ keys.transpose(2, 3) / math.sqrt(self.head_dim)  # (B, n_heads, T, S)
        # finfo.min instead of -inf: a fully masked row would otherwise softmax to NaN.
        scores = scores.masked_fill(self._blocked(padding_mask, past, T), torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1)
        weights = self.dropout(weights)
        return weights @ values, weights  # (B, n_heads, T, head_dim), (B, n_heads, T, S)

    def _sdpa(self, queries, keys, values, padding_mask, past):
        T = queries.shape[2]
        dropout_p = self.config.drop_rate if self.training else 0.0
        if padding_mask is None:
            # No padding: the fused kernel's own causal masking (cheapest), or no mask at all
            # when a single new query may see every cached key.
            if past == 0:
                return F.scaled_dot_product_attention(queries, keys, values, dropout_p=dropout_p, is_causal=True)
            if T == 1:
                return F.scaled_dot_product_attention(queries, keys, values, dropout_p=dropout_p)
        allowed = ~self._blocked(padding_mask, past, T)
        return F.scaled_dot_product_attention(queries, keys, values, attn_mask=allowed, dropout_p=dropout_p)


def causal_mask(context_length: int) -> torch.Tensor:
    """(context_length, context_length) bool, True above the diagonal (the future)."""
    return torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), diagonal=1)
