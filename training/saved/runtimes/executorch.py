"""ExecuTorch .pte for phones and embedded devices: `input_ids` (1, T) -> `logits` (1, T, vocab).

`torch.export` traces the forward without a cache (sequence length dynamic, 1 to the model's
context length; batch 1, what an on-device app runs), then ExecuTorch lowers it:

- portable: every op on ExecuTorch's portable kernels, which run anywhere (within 1e-5 of
  PyTorch here);
- xnnpack: the matrix products delegated to XNNPACK, the fast CPU backend on phones (within a
  few 1e-3: its kernels round differently).

The tokenizer and config are saved beside model.pte. `torch.export` gets plain `F.linear` from
every projection (`modeling_minigpt.linear` leaves oneDNN out while exporting), so the graph
holds only core ATen ops.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from modeling_minigpt import MiniGPTForCausalLM

from . import building

Backend = Literal["portable", "xnnpack"]
BACKENDS = ("portable", "xnnpack")
PTE_FILE = "model.pte"


# What each backend's lowering imports beyond executorch itself: XNNPACK's partitioner imports
# torchao (an executorch dependency, which transformers then imports at every start, ~1.4 s).
BACKEND_PACKAGES = {"portable": ("executorch",), "xnnpack": ("executorch", "torchao")}


def missing_packages(backend: Backend) -> list[str]:
    """The packages `backend`'s export needs that are not installed (empty when it can run)."""
    return [name for name in BACKEND_PACKAGES[backend] if importlib.util.find_spec(name) is None]


class IdsToLogits(nn.Module):
    """(1, T) ids -> (1, T, vocab) logits, no cache, no mask: the whole sequence every call."""

    def __init__(self, model: MiniGPTForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def write_pte(model: MiniGPTForCausalLM, path: str | os.PathLike[str], backend: Backend) -> Path:
    """Lower `model` for `backend` and write the program to `path`."""
    if backend not in BACKENDS:
        raise ValueError(f"--executorch_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    missing = missing_packages(backend)
    if missing:
        raise ValueError(f"the ExecuTorch {backend} export needs {', '.join(missing)}: pip install {' '.join(missing)}")
    from executorch.exir import to_edge, to_edge_transform_and_lower

    sequence = torch.export.Dim("sequence", min=1, max=model.config.context_length)
    example = torch.ones(1, 2, dtype=torch.long)
    with torch.no_grad():
        program = torch.export.export(
            IdsToLogits(model).eval(), (example,), dynamic_shapes={"input_ids": {1: sequence}}
        )
    if backend == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    else:
        edge = to_edge(program)
    Path(path).write_bytes(edge.to_executorch().buffer)
    return Path(path)


def export_executorch(
    model: MiniGPTForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | os.PathLike[str],
    backend: Backend = "xnnpack",
) -> Path:
    """`out_dir`/model.pte with the tokenizer and config beside it, written atomically; returns `out_dir`."""
    with building(out_dir) as staging:
        write_pte(model, staging / PTE_FILE, backend)
        tokenizer.save_pretrained(staging)
        model.config.to_json_file(staging / "config.json")  # the config alone: no model code in this folder
    return Path(out_dir)
