"""ONNX for ONNX Runtime: two graphs, any batch and sequence length.

- model.onnx: `input_ids` (B, T), `attention_mask` (B, T) -> `logits` (B, T, vocab). The whole
  forward without a cache: for scoring text, and the simplest way to generate.
- model_with_past.onnx: the same plus the KV cache, for decoding one token per step.
  `past_keys`, `past_values` (n_layers, B, n_heads, P, head_dim) with P >= 0 (0 for the prompt),
  `attention_mask` (B, P + T) -> `logits` and the new `keys`, `values` (n_layers, B, n_heads,
  P + T, head_dim), which are the next step's past.

Exported with PyTorch's TorchScript-based exporter (`dynamo=False`): on a left-padded batch it
gives ONNX Runtime's logits within 1e-5 of PyTorch at every position; the dynamo exporter
(torch 2.13) matched on real tokens but not on padded rows here.

The tokenizer (tokenizer.json, with the chat template) and config.json are saved next to
model.onnx, so the folder is all an ONNX Runtime app needs.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.cache_utils import DynamicCache

from modeling_minigpt import MiniGPTForCausalLM

from . import building

ONNX_FILE = "model.onnx"
ONNX_WITH_PAST_FILE = "model_with_past.onnx"
# 18: supported by every onnxruntime of the last years, and by the TorchScript exporter.
OPSET = 18
INPUTS = ("input_ids", "attention_mask")


class LogitsOnly(nn.Module):
    """The causal LM as a plain function of tensors, without a cache: (B, T) ids and mask -> (B, T, vocab) logits."""

    def __init__(self, model: MiniGPTForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


class LogitsWithPast(nn.Module):
    """The causal LM with its KV cache as plain tensors (see the module docstring for the shapes)."""

    def __init__(self, model: MiniGPTForCausalLM):
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past_keys: torch.Tensor, past_values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        layers = range(self.model.config.n_layers)
        cache = DynamicCache(config=self.model.config)
        for i in layers:
            cache.update(past_keys[i], past_values[i], i)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True).logits
        keys = torch.stack([cache.layers[i].keys for i in layers])  # (n_layers, B, n_heads, P + T, head_dim)
        values = torch.stack([cache.layers[i].values for i in layers])
        return logits, keys, values


def _export(module: nn.Module, example: tuple[torch.Tensor, ...], path: Path, names: dict[str, dict[int, str]]) -> None:
    """torch.onnx.export with the TorchScript exporter; `names`: every input then output name -> its dynamic axes."""
    inputs = list(names)[: len(example)]
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter warns that it is deprecated; see the module docstring for why it is used.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            example,
            str(path),
            input_names=inputs,
            output_names=list(names)[len(example) :],
            dynamic_axes=names,
            opset_version=OPSET,
            dynamo=False,
        )


def write_onnx(model: MiniGPTForCausalLM, folder: str | os.PathLike[str]) -> Path:
    """Export `model` as `folder`/model.onnx and `folder`/model_with_past.onnx (see the module docstring)."""
    folder = Path(folder)
    # Example shapes only: every axis named below is dynamic. The past is traced non-empty (4
    # positions) and runs empty too.
    ids = torch.ones(2, 3, dtype=torch.long)
    tokens = {0: "batch", 1: "sequence"}
    _export(
        LogitsOnly(model), (ids, torch.ones_like(ids)), folder / ONNX_FILE, dict.fromkeys((*INPUTS, "logits"), tokens)
    )
    config = model.config
    past = torch.zeros(config.n_layers, 2, config.n_heads, 4, config.emb_dim // config.n_heads)
    cached = {0: "layers", 1: "batch", 2: "heads", 4: "head_dim"}
    names = {
        "input_ids": tokens,
        "attention_mask": {0: "batch", 1: "total"},
        "past_keys": {**cached, 3: "past"},
        "past_values": {**cached, 3: "past"},
        "logits": tokens,
        "keys": {**cached, 3: "total"},
        "values": {**cached, 3: "total"},
    }
    _export(
        LogitsWithPast(model),
        (ids, torch.ones(2, 7, dtype=torch.long), past, past),
        folder / ONNX_WITH_PAST_FILE,
        names,
    )
    return folder


def export_onnx(model: MiniGPTForCausalLM, tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike[str]) -> Path:
    """`out_dir`/model.onnx and model_with_past.onnx, the tokenizer and config beside them, written
    atomically; returns `out_dir`."""
    with building(out_dir) as staging:
        write_onnx(model, staging)
        tokenizer.save_pretrained(staging)
        model.config.to_json_file(staging / "config.json")  # the config alone: no model code in this folder
    return Path(out_dir)
