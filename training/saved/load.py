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

A loaded model is the model its config describes, whole (`check_whole`): a tensor it has that the
folder lacks (a config saying 3 blocks over 2 blocks' weights, a `model_type` over another model's
weights) or one of the folder it does not use is refused, never left random. The one exception is
a language model's folder loaded for classification, which gets a new head. A classifier's folder
is never loaded as a language model.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    PreTrainedModel,
)
from transformers.utils import logging as transformers_logging

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


def _head_task(architecture: str | None) -> Task:
    """The task of a saved head by its class name (any transformers classifier counts); a causal LM otherwise."""
    if architecture in ARCHITECTURE_TASKS:
        return ARCHITECTURE_TASKS[architecture]
    return "sequence-classification" if str(architecture).endswith("ForSequenceClassification") else "causal-lm"


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


def check_weights(folder: Path, what: str = "model folder") -> None:
    """ModelFolderError unless `folder` holds safetensors weights, naming the first damaged
    `*.safetensors` file (see `check_safetensors_file`). A folder with only pickled `.bin` files is
    refused: unpickling can run code, so they are never read."""
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickled = ", ".join(sorted(p.name for p in folder.glob("*.bin")))
        raise ModelFolderError(
            f"{what} {folder} has no *.safetensors weights{f' (only {pickled})' if pickled else ''}: only "
            "safetensors are loaded, never pickled .bin files; save the model again with save_pretrained"
        )
    for path in weights:
        check_safetensors_file(path)


def load_model(
    folder: str | os.PathLike[str],
    task: Task,
    *,
    trust_remote_code: bool = False,
    what: str = "model folder",
    trained: bool = False,
    **kwargs: Any,
) -> PreTrainedModel:
    """The model saved in `folder` with a `task` head (a new head if the folder is a language model
    loaded for classification), loaded by the rules of the module docstring and checked whole
    (`check_whole`); ModelFolderError for anything that does not load. A classifier is never a
    causal LM; `trained` (a training job's base model) accepts only the types of `OWN_CLASSES`."""
    folder = check_model_folder(folder, what)
    model_class = model_class_for(folder, task, what)
    config = read_model_config(folder, what)
    if model_class is None and config.get("auto_map") and not trust_remote_code:
        raise ModelFolderError(
            f"{what} {folder} holds model_type={config.get('model_type')!r}, which only the code saved in the folder "
            f"can load (auto_map: {config['auto_map']}): pass --trust_remote_code to run that code, and only for a "
            "folder you trust"
        )
    if trained and model_class is None:
        raise ModelFolderError(
            f"{what} {folder} holds model_type={config.get('model_type')!r}: the training jobs train only "
            f"{' and '.join(sorted({t for t, _ in OWN_CLASSES}))} folders"
        )
    architecture = (config.get("architectures") or [None])[0]
    saved_task = _head_task(architecture)
    if task == "causal-lm" and saved_task != task:
        raise ModelFolderError(
            f"{what} {folder} is a sequence classifier ({architecture}), not a language model: this needs a "
            "causal LM folder (e.g. a pretraining or SFT run's model/)"
        )
    check_weights(folder, what)
    try:
        with _quiet_load_report():  # the report's news is checked below and said in one line
            if model_class is not None:
                model, info = model_class.from_pretrained(folder, output_loading_info=True, **kwargs)
            else:
                auto = AUTO_CLASSES[task]
                model, info = auto.from_pretrained(
                    folder, trust_remote_code=trust_remote_code, output_loading_info=True, **kwargs
                )
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
    new_head = saved_task != task
    check_whole(
        folder, info, HEAD_PREFIXES[task] if new_head else (), HEAD_PREFIXES[saved_task] if new_head else (), what
    )
    return model


# The tensors of each task's head, on top of the shared backbone: a language model's folder loaded
# for classification gets a new `score` and leaves its `lm_head` (when saved untied) unused.
HEAD_PREFIXES: dict[Task, tuple[str, ...]] = {"causal-lm": ("lm_head.",), "sequence-classification": ("score.",)}


def check_whole(
    folder: Path,
    info: Mapping[str, Any],
    added: tuple[str, ...] = (),
    dropped: tuple[str, ...] = (),
    what: str = "model folder",
) -> None:
    """ModelFolderError unless every tensor of the model came from the folder and every tensor of
    the folder was used (`info`: transformers' loading info), besides a head being `added` (its
    tensors are new) and one `dropped` (its saved tensors unused). Without this a config saying 3
    blocks over 2 blocks' weights, or a model_type over another model's weights, runs with random tensors."""
    missing = sorted(k for k in info["missing_keys"] if not (added and k.startswith(added)))
    unused = sorted(k for k in info["unexpected_keys"] if not (dropped and k.startswith(dropped)))
    if missing or unused:
        shown = lambda keys: f"{len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"  # noqa: E731
        parts = [f"missing {shown(missing)}"] * bool(missing) + [f"unused {shown(unused)}"] * bool(unused)
        raise ModelFolderError(
            f"{what} {folder}: its weights are not the model its config.json describes (tensors "
            f"{'; '.join(parts)}): the config or the weights were changed; save the folder again"
        )


@contextlib.contextmanager
def _quiet_load_report() -> Iterator[None]:
    """transformers' table of missing and unexpected tensors off for the block (check_whole says it in a line)."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
