"""Writing a saved folder: a plain Hugging Face folder all or nothing, or a LoRA adapter and the merged model.

A folder holds what a user needs (weights, config, the modeling code for `trust_remote_code`, tokenizer,
generation config, model card, plots); `training.saved.load` is the one safe way back in, and
`training.saved.hub` publishes it."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modeling_minigpt.files import replace_dir, staging_dir, writing
from training.saved.card import write_model_card

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel


def save_model_folder(
    model: Any,
    folder: str | os.PathLike[str],
    tokenizer: Any | None = None,
    card: Mapping[str, Any] | None = None,
    extra_files: Sequence[str | os.PathLike[str]] = (),
) -> Path:
    """A Hugging Face folder, all or nothing: built in `.tmp-<name>` beside it, then renamed.

    `save_pretrained` of the unwrapped model (with its code for trust_remote_code) and of the
    tokenizer if given, any `extra_files` that exist, copied byte for byte (the loss curve the card
    links to; a converted checkpoint's tokenizer files), and, if `card` is given, a model card
    from `write_model_card(folder, config=model.config, **card)`. Main process only.
    """
    folder = Path(folder)
    tmp = staging_dir(folder)
    try:
        # A full disk inside safetensors' writer is a SafetensorError, not an OSError: `writing` names it.
        with writing(tmp):
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            for extra in map(Path, extra_files):
                if extra.is_file():
                    shutil.copy2(extra, tmp / extra.name)
            if card is not None:
                write_model_card(tmp, config=model.config, **card)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the half-built folder; `folder` is as it was
        raise
    return replace_dir(tmp, folder)


def is_peft_model(model: Any) -> bool:
    """True for a PEFT wrapper. Without importing peft: if it was never imported, nothing is one."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def merge_lora(model: PeftModel) -> PreTrainedModel:
    """The base model with every adapter update added into its weights (PEFT removed).

    This consumes `model`: save the adapter first if you want it. The result is an ordinary
    MiniGPT model, so `save_pretrained` writes the code files and `auto_map` as usual.
    """
    return model.merge_and_unload()


def save_finetuned(
    model: PreTrainedModel | PeftModel,
    tokenizer: Any,
    model_dir: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str],
    card: Mapping[str, Any] | None = None,
    extra_files: Sequence[str | os.PathLike[str]] = (),
) -> PreTrainedModel:
    """Save a fine-tuned model (main process only); return the plain model that was saved.

    A PEFT model is saved twice: the adapter alone in `adapter_dir` (with the tokenizer), then
    merged into its base in `model_dir`. A plain model goes to `model_dir` only. Either way
    `model_dir` is a complete folder (weights, code, config with `auto_map`, tokenizer, card)
    that `training.saved.load.load_model` loads with the package's classes (and stock
    transformers with `trust_remote_code=True`, from the code files it carries).
    """
    if is_peft_model(model):
        save_model_folder(model, adapter_dir, tokenizer)
        model = merge_lora(model)
    save_model_folder(model, model_dir, tokenizer, card=card, extra_files=extra_files)
    return model
