"""Saved folders in the formats other runtimes read: GGUF (llama.cpp, Ollama, LM Studio), ONNX
(ONNX Runtime) and ExecuTorch (.pte, phones and embedded).

Every export starts the same way, here: the folder is checked and loaded with the package's one
safe loader (`training.saved.load.load_model`: MiniGPT or GPT-2, never the folder's own code), a
GPT-2 folder is converted to MiniGPT (one set of tensor names to map), the tokenizer must have
exactly the model's vocabulary, and the output folder is built beside its final name and renamed
into place (`building`), so an interrupted export leaves no half-written folder behind.

| format      | module        | what the folder holds                                             |
|-------------|---------------|-------------------------------------------------------------------|
| gguf        | `gguf.py`     | model.gguf (weights, tokenizer, chat template), Modelfile         |
| onnx        | `onnx.py`     | model.onnx (input_ids -> logits, dynamic batch and sequence), tokenizer |
| executorch  | `executorch.py` | model.pte (portable or XNNPACK), tokenizer                      |
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from transformers import GPT2LMHeadModel, PreTrainedTokenizerBase

from modeling_minigpt import MiniGPTForCausalLM
from modeling_minigpt.convert import gpt2_to_minigpt
from modeling_minigpt.files import replace_dir, staging_dir
from tokenization.load import check_tokenizer, load_tokenizer
from training.saved.load import ModelFolderError, check_model_folder, folder_task, load_model
from training.saved.outputs import check_outputs


def load_for_export(
    folder: str | os.PathLike[str], what: str = "--model"
) -> tuple[MiniGPTForCausalLM, PreTrainedTokenizerBase]:
    """(fp32 MiniGPT language model in eval mode, its tokenizer) from a saved MiniGPT or GPT-2 folder.

    ModelFolderError / DataError for anything else: a classifier, another model type, a folder
    without a tokenizer or with one of another vocabulary size.
    """
    folder = check_model_folder(folder, what)
    if folder_task(folder, what) != "causal-lm":
        raise ModelFolderError(f"{what} {folder} holds a classifier; these formats carry language models only")
    model = load_model(folder, "causal-lm", what=what)
    if isinstance(model, GPT2LMHeadModel):
        model = gpt2_to_minigpt(model)
    if not isinstance(model, MiniGPTForCausalLM):
        raise ModelFolderError(
            f"{what} {folder} holds a {type(model).__name__}; export reads MiniGPT and GPT-2 folders only"
        )
    tokenizer = load_tokenizer(folder)
    check_tokenizer(tokenizer, model.config.vocab_size)
    return model.float().eval(), tokenizer


def check_output_dir(
    out_dir: str | os.PathLike[str], overwrite: bool, inputs: Mapping[str, str | os.PathLike[str] | None]
) -> Path:
    """`out_dir` as a Path; ValueError if it is a file, or breaks the output rule of
    `training.saved.outputs` (a non-empty folder without `overwrite`; the model folder itself, or
    a folder in or around it, even with `overwrite`)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output_dir {out} is a file; give a folder")
    check_outputs({"--output_dir": out}, inputs, overwrite)
    return out


@contextmanager
def building(out_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty staging folder beside `out_dir`; on success it replaces `out_dir` whole, on
    failure it is removed and `out_dir` is left as it was."""
    staging = staging_dir(out_dir)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_dir(staging, out_dir)
