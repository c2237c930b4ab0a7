"""A saved folder, and the way to the Hub: what a saved model folder is, writing one (plain, or a
LoRA adapter and the merged model), and pushing it.

A run folder holds what a user needs (weights, config, the modeling code for
`trust_remote_code`, tokenizer, generation config, model card, plots) next to what they do not
(resumable checkpoints with optimizer state, temporaries of atomic writes). `push_folder` uploads
the first kind in one commit, with the real `huggingface_hub` client; the client itself leaves
files whose content the Hub already has out of the commit, and makes no commit at all when
nothing changed.

The token is never an argument anyone has to see: by default it is resolved by
`huggingface_hub` (`HF_TOKEN`, then the login saved by `hf auth login`), and nothing here prints,
logs or stores it.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import HfApi
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS as HUB_IGNORE_PATTERNS
from huggingface_hub.utils import filter_repo_objects

from modeling_minigpt.files import TEMPORARY_PATTERNS, replace_dir, staging_dir
from training.layout import CHECKPOINTS, LOCK
from training.model_card import write_model_card
from training.model_folder import check_model_folder

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel


# ----------------------------------------------------------------------------- saved folders


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
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for extra in map(Path, extra_files):
        if extra.is_file():
            shutil.copy2(extra, tmp / extra.name)
    if card is not None:
        write_model_card(tmp, config=model.config, **card)
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
    that `training.model_folder.load_model` loads with the package's classes (and stock
    transformers with `trust_remote_code=True`, from the code files it carries).
    """
    if is_peft_model(model):
        save_model_folder(model, adapter_dir, tokenizer)
        model = merge_lora(model)
    save_model_folder(model, model_dir, tokenizer, card=card, extra_files=extra_files)
    return model


# ----------------------------------------------------------------------------- the Hub

DEFAULT_BRANCH = "main"

# Run-folder content that is not part of the published model. `*` matches across "/" here
# (fnmatch), so "checkpoints/*" covers every file below checkpoints/.
RUN_ONLY_PATTERNS: list[str] = [
    f"{CHECKPOINTS}/*",  # resumable checkpoints: optimizer state, RNG, several copies of the weights
    LOCK,  # which process is writing the run
    *TEMPORARY_PATTERNS,  # atomic writes in progress, folders being built or replaced (modeling_minigpt.files)
    "*events.out.tfevents.*",  # TensorBoard event logs (TensorBoard's own file names)
]

# "namespace/name", each part made of the characters the Hub accepts.
_REPO_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class PushResult:
    """What a push did. `changed` is False when the Hub already had every file (no commit was made)."""

    repo_id: str
    revision: str
    commit_oid: str
    commit_url: str
    changed: bool
    files: tuple[str, ...]  # paths of the folder that were considered (uploaded or already identical)


def files_to_push(folder: str | os.PathLike[str], ignore_patterns: list[str] | None = None) -> list[str]:
    """Relative POSIX paths of the files `push_folder` sends, filtered exactly as `upload_folder` filters them."""
    folder = Path(folder)
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    patterns = [*(RUN_ONLY_PATTERNS if ignore_patterns is None else ignore_patterns), *HUB_IGNORE_PATTERNS]
    return list(filter_repo_objects(paths, ignore_patterns=patterns))


def check_push_inputs(folder: str | os.PathLike[str], repo_id: str) -> Path:
    """Fail before any network call, with the offending value named, if the push cannot make sense."""
    folder = check_model_folder(folder, "folder to push")
    if not _REPO_ID_RE.fullmatch(repo_id):
        raise ValueError(f"repo id {repo_id!r} must look like 'namespace/name' (a user or organization, then a name)")
    return folder


def push_folder(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    commit_message: str | None = None,
    revision: str = DEFAULT_BRANCH,
    create: bool = True,
    token: str | None = None,
    ignore_patterns: list[str] | None = None,
    endpoint: str | None = None,
) -> PushResult:
    """Upload the model files of `folder` to `repo_id` on the Hub in one commit on branch `revision`.

    Args:
        folder: a folder written by `save_pretrained` (plus tokenizer, model card, plots, ...).
        repo_id: "namespace/name".
        private: create the repo private. If the repo already exists and is public, the push is
            refused rather than publishing what was meant to stay private.
        commit_message: defaults to "Upload <folder name> with MiniGPT".
        revision: branch to commit to; created from main if missing and `create` is set.
        create: create the repo (and branch) when missing. Without it a missing repo or branch
            raises the client's `RepositoryNotFoundError` / `RevisionNotFoundError`.
        token: None resolves it the usual way (`HF_TOKEN`, then the saved login). Passing it is
            supported but discouraged (it ends up in shell history and the process list).
        ignore_patterns: files not to push (fnmatch, relative to `folder`); default `RUN_ONLY_PATTERNS`.
        endpoint: Hub URL; None means `HF_ENDPOINT` or huggingface.co, as for every HF library.

    Errors from the Hub (`huggingface_hub.errors.HfHubHTTPError` and its subclasses) propagate
    unchanged; their messages never contain the token.
    """
    folder = check_push_inputs(folder, repo_id)
    patterns = RUN_ONLY_PATTERNS if ignore_patterns is None else ignore_patterns
    files = files_to_push(folder, patterns)
    api = HfApi(endpoint=endpoint, token=token)

    if create:
        api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.repo_info(repo_id)
    if private and not info.private:
        raise ValueError(
            f"{repo_id} already exists and is public, but a private push was asked for: "
            "make the repo private on the Hub first, or push without --private"
        )
    if create and revision != DEFAULT_BRANCH:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    head_before = api.repo_info(repo_id, revision=revision).sha

    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=commit_message or f"Upload {folder.resolve().name} with MiniGPT",
        revision=revision,
        ignore_patterns=patterns,
    )
    return PushResult(
        repo_id=repo_id,
        revision=revision,
        commit_oid=commit.oid,
        commit_url=commit.commit_url,
        changed=commit.oid != head_before,
        files=tuple(files),
    )
