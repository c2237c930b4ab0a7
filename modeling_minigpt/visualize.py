"""Figures that show what the model does: attention weights and position embeddings.

The `*_figure` functions draw and return a matplotlib Figure; `files.save_figure` writes it.
`plot_attention` and `plot_position_similarity` do both in one call.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .files import pyplot, save_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@torch.no_grad()
def attention_weights(model, tokenizer, text: str) -> tuple[list[str], torch.Tensor]:
    """Token strings and attention weights (n_layers, n_heads, T, T) for one prompt.

    Runs the eager path for this call only (the fused sdpa kernel never materialises the weights).
    """
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, : model.config.context_length]
    was_training = model.training
    model.eval()  # no dropout on the weights we show
    try:
        out = model(ids.to(model.device), output_attentions=True)
    finally:
        model.train(was_training)
    tokens = [tokenizer.decode([i]) for i in ids[0].tolist()]
    return tokens, torch.stack([w[0] for w in out.attentions]).float().cpu()


def attention_figure(model, tokenizer, text: str, layer: int = 0, head: int = 0) -> Figure:
    """Heatmap of one head's attention for one prompt: row = query token, column = key token."""
    tokens, weights = attention_weights(model, tokenizer, text)
    n_layers, n_heads = weights.shape[:2]
    if not (0 <= layer < n_layers and 0 <= head < n_heads):
        raise ValueError(f"layer {layer} / head {head} out of range: the model has {n_layers} layers x {n_heads} heads")
    labels = [repr(t.replace(" ", "·"))[1:-1] for t in tokens]  # make spaces and newlines visible
    size = max(4.0, 0.35 * len(tokens) + 2)
    fig, ax = pyplot().subplots(figsize=(size, size))
    im = ax.imshow(weights[layer, head].numpy(), cmap="viridis", vmin=0.0)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    ax.set_title(f"attention weights, layer {layer}, head {head}")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return fig


def position_similarity_figure(model, max_positions: int | None = None) -> Figure:
    """Cosine similarity between the learned position embeddings (positions x positions)."""
    weight = _position_embeddings(model).detach().float().cpu()
    if max_positions is not None:
        weight = weight[:max_positions]
    unit = torch.nn.functional.normalize(weight, dim=-1)
    sim = unit @ unit.T  # (P, P)
    fig, ax = pyplot().subplots(figsize=(6, 5))
    im = ax.imshow(sim.numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xlabel("position")
    ax.set_ylabel("position")
    ax.set_title("cosine similarity of learned position embeddings")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return fig


def plot_attention(model, tokenizer, text: str, path: str | os.PathLike, layer: int = 0, head: int = 0) -> Path:
    """`attention_figure` saved as a PNG at `path`."""
    return save_figure(attention_figure(model, tokenizer, text, layer, head), path)


def plot_position_similarity(model, path: str | os.PathLike, max_positions: int | None = None) -> Path:
    """`position_similarity_figure` saved as a PNG at `path`."""
    return save_figure(position_similarity_figure(model, max_positions), path)


def _position_embeddings(model) -> torch.Tensor:
    base = getattr(model, "model", model)
    return base.pos_emb.weight
