"""Saved model folders: what one is, and the one way to load it without running its code.

Every consumer of a folder (SFT, classification, evaluation, conversion, the web app) loads it
here. A folder's `config.json` names its `model_type`, and the class comes from the package
or from transformers, never from the folder:

    model_type "minigpt"  ->  MiniGPTForCausalLM / MiniGPTForSequenceClassification (this package)
    model_type "gpt2"     ->  GPT2LMHeadModel / GPT2ForSequenceClassification (transformers)
    any other type        ->  transformers' Auto class with trust_remote_code=False: a type
                              transformers knows loads with its own class; one that exists only
                              as code saved in the folder (`auto_map`) is refused unless the
                              caller passes `trust_remote_code=True` (the scripts' --trust_remote_code)

So a MiniGPT or GPT-2 folder whose `modeling_minigpt.py` was edited, or whose `auto_map` points
at another file, still loads with the package's own classes: nothing in it is executed. Weights
are read only from `*.safetensors` files (a folder holding only a pickled `pytorch_model.bin` is
refused), and a damaged safetensors file (empty, cut short) is named before transformers reads it.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Literal

from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    PreTrainedModel,
)

from modeling_minigpt import MiniGPTForCausalLM, MiniGPTForSequenceClassification
from tokenization.corpus import DataError, DataFileNotFoundError

Task = Literal["causal-lm", "sequence-classification"]

# (model_type, task) -> the class that loads it. Only these are used for these types, whatever
# the folder's `auto_map` says.
OWN_CLASSES: dict[tuple[str, Task], type[PreTrainedModel]] = {
    ("minigpt", "causal-lm"): MiniGPTForCausalLM,
    ("minigpt", "sequence-classification"): MiniGPTForSequenceClassification,
    ("gpt2", "causal-lm"): GPT2LMHeadModel,
    ("gpt2", "sequence-classification"): GPT2ForSequenceClassification,
}
AUTO_CLASSES: dict[Task, Any] = {
    "causal-lm": AutoModelForCausalLM,
    "sequence-classification": AutoModelForSequenceClassification,
}
# The task of a folder's own head, read from `architectures` (the app serves what the folder is).
ARCHITECTURE_TASKS: dict[str, Task] = {
    "MiniGPTForCausalLM": "causal-lm",
    "MiniGPTForSequenceClassification": "sequence-classification",
    "GPT2LMHeadModel": "causal-lm",
    "GPT2ForSequenceClassification": "sequence-classification",
}
TRUST_HELP = (
    "Run the code saved in a model or tokenizer folder when it needs its own code (transformers' "
    "trust_remote_code). Off by default: MiniGPT and GPT-2 folders never need it; only pass it for a folder you trust."
)


class ModelFolderError(DataError):
    """A folder that cannot be loaded; the message names the folder (or file) and what to do."""


class ModelFolderNotFoundError(ModelFolderError, DataFileNotFoundError):
    """A model folder, or its config.json, that does not exist."""


def check_model_folder(path: str | os.PathLike[str] | None, what: str = "model folder") -> Path:
    """`path` as a Path if it is a folder written by `save_pretrained` (it has a config.json)."""
    if not path:
        raise ValueError(f"{what} is required: a folder written by save_pretrained (e.g. a pretraining run's model/)")
    folder = Path(path)
    if not folder.is_dir():
        raise ModelFolderNotFoundError(f"{what} {folder} does not exist (or is not a folder)")
    if not (folder / "config.json").is_file():
        raise ModelFolderNotFoundError(
            f"{what} {folder} has no config.json: it is not a saved model folder (save_pretrained writes one)"
        )
    return folder


def read_model_config(folder: str | os.PathLike[str], what: str = "model folder") -> dict[str, Any]:
    """The folder's config.json as a dict, with a clear message when it is missing or not a JSON object."""
    config_file = check_model_folder(folder, what) / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFolderError(f"{config_file} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ModelFolderError(f"{config_file} must hold a JSON object, got a JSON {type(config).__name__}")
    return config


def folder_task(folder: str | os.PathLike[str], what: str = "model folder") -> Task:
    """The task of the head the folder was saved with (its `architectures`); a language model when it names none."""
    config = read_model_config(folder, what)
    architecture = (config.get("architectures") or [None])[0]
    if architecture is None:
        return "causal-lm"
    if architecture not in ARCHITECTURE_TASKS:
        known = ", ".join(ARCHITECTURE_TASKS)
        raise ModelFolderError(
            f"{folder} holds model_type={config.get('model_type')!r}, architecture {architecture!r}; "
            f"this loads only {known}"
        )
    return ARCHITECTURE_TASKS[architecture]


def model_class_for(folder: str | os.PathLike[str], task: Task, what: str = "model folder") -> type | None:
    """The package's or transformers' class for the folder's model type and `task`; None for a
    model type that only transformers' Auto classes can resolve."""
    model_type = read_model_config(folder, what).get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ModelFolderError(f"{Path(folder) / 'config.json'} names no model_type: it is not a saved model config")
    return OWN_CLASSES.get((model_type, task))


def check_safetensors_file(path: Path) -> None:
    """ModelFolderError unless `path` is a whole safetensors file: an 8-byte header length, a JSON
    header, and as many data bytes as the header's tensors need. Reads only the header."""
    size = path.stat().st_size
    damaged = f"{path} is damaged"
    fix = "save or download the folder again"
    if size < 8:
        raise ModelFolderError(f"{damaged}: {size} bytes, not even a safetensors header; {fix}")
    with path.open("rb") as handle:
        (header_length,) = struct.unpack("<Q", handle.read(8))
        if 8 + header_length > size:
            raise ModelFolderError(f"{damaged}: cut short inside its header ({size:,} bytes); {fix}")
        try:
            header = json.loads(handle.read(header_length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelFolderError(f"{damaged}: its header is not safetensors JSON; {fix}") from None
    if not isinstance(header, dict):
        raise ModelFolderError(f"{damaged}: its header is not safetensors JSON; {fix}")
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    expected = 8 + header_length + max(ends, default=0)
    if size < expected:
        raise ModelFolderError(f"{damaged}: cut short ({size:,} of {expected:,} bytes); {fix}")


def check_weights(folder: Path) -> None:
    """ModelFolderError naming the first damaged `*.safetensors` file of `folder` (see `check_safetensors_file`)."""
    for weights in sorted(folder.glob("*.safetensors")):
        check_safetensors_file(weights)


def load_model(
    folder: str | os.PathLike[str],
    task: Task,
    *,
    trust_remote_code: bool = False,
    what: str = "model folder",
    **kwargs: Any,
) -> PreTrainedModel:
    """The model saved in `folder` with a `task` head (a new head if the folder has another one),
    loaded by the rules of the module docstring; ModelFolderError for anything that does not load."""
    folder = check_model_folder(folder, what)
    model_class = model_class_for(folder, task, what)
    config = read_model_config(folder, what)
    if model_class is None and config.get("auto_map") and not trust_remote_code:
        raise ModelFolderError(
            f"{what} {folder} holds model_type={config.get('model_type')!r}, which only the code saved in the folder "
            f"can load (auto_map: {config['auto_map']}): pass --trust_remote_code to run that code, and only for a "
            "folder you trust"
        )
    check_weights(folder)
    if not any(folder.glob("*.safetensors")):
        pickled = ", ".join(sorted(p.name for p in folder.glob("*.bin")))
        raise ModelFolderError(
            f"{what} {folder} has no *.safetensors weights{f' (only {pickled})' if pickled else ''}: only "
            "safetensors are loaded, never pickled .bin files; save the model again with save_pretrained"
        )
    try:
        if model_class is not None:
            return model_class.from_pretrained(folder, **kwargs)
        return AUTO_CLASSES[task].from_pretrained(folder, trust_remote_code=trust_remote_code, **kwargs)
    except ValueError as error:
        if not trust_remote_code and "trust_remote_code" in str(error):
            model_type = read_model_config(folder, what).get("model_type")
            raise ModelFolderError(
                f"{what} {folder} holds model_type={model_type!r}, which only the code saved in the folder can load: "
                "pass --trust_remote_code to run that code, and only for a folder you trust"
            ) from None
        raise ModelFolderError(f"{what} {folder} does not load: {error}") from None
    except (OSError, RuntimeError, KeyError) as error:
        name = model_class.__name__ if model_class is not None else AUTO_CLASSES[task].__name__
        raise ModelFolderError(f"{what} {folder}: the weights do not load as {name}: {error}") from None
