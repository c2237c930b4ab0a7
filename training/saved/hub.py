"""Pushing a saved folder to the Hub.

A run folder holds what a user needs next to what they do not (resumable checkpoints with optimizer
state, temporaries of atomic writes). `push_folder` uploads the first kind in one commit, with the real
`huggingface_hub` client; the client itself leaves files whose content the Hub already has out of the
commit, and makes no commit at all when nothing changed.

The token is never an argument anyone has to see: by default it is resolved by `huggingface_hub`
(`HF_TOKEN`, then the login saved by `hf auth login`), and nothing here prints, logs or stores it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS as HUB_IGNORE_PATTERNS
from huggingface_hub.utils import filter_repo_objects

from modeling_minigpt.files import TEMPORARY_PATTERNS
from training.saved.card import CARD_NAME, card_for_repo
from training.saved.layout import CHECKPOINTS, LOCK
from training.saved.load import check_model_folder

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
    """Relative POSIX paths of the files `push_folder` sends, filtered as `upload_folder` would filter them."""
    folder = Path(folder)
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    patterns = [*(RUN_ONLY_PATTERNS if ignore_patterns is None else ignore_patterns), *HUB_IGNORE_PATTERNS]
    return list(filter_repo_objects(paths, ignore_patterns=patterns))


def check_push_inputs(folder: str | os.PathLike[str], repo_id: str) -> Path:
    """Fail before any network call, with the offending value named, if the push cannot make sense."""
    folder = check_model_folder(folder, "folder to push")
    if not _REPO_ID_RE.fullmatch(repo_id):
        raise ValueError(f"repo id {repo_id!r} must look like 'namespace/name' (a user or organization, then a name)")
    check_contained(folder)
    return folder


def check_contained(folder: Path) -> None:
    """ValueError naming the first entry of `folder` that would publish something outside it: a
    symbolic link whose target lies outside the folder (the client uploads a link's target, so
    `notes.txt -> ~/.cache/huggingface/token` would publish the token), or a special file (a
    FIFO, socket or device, whose reading could block or leak). Links inside the folder are fine."""
    root = folder.resolve()
    for directory, folders, files in os.walk(folder):  # never descends into a linked folder
        for name in sorted([*folders, *files]):
            path = Path(directory) / name
            if path.is_symlink():
                if not path.resolve().is_relative_to(root):
                    raise ValueError(
                        f"{path} is a link to {os.readlink(path)}, outside the folder to push: nothing was sent. "
                        "Copy the file into the folder if it is meant to be published, or remove the link"
                    )
            elif not (path.is_file() or path.is_dir()):
                raise ValueError(
                    f"{path} is not a regular file or folder (a FIFO, socket or device): nothing was sent. Remove it"
                )


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

    # The files as they are, but the card, whose usage example names the repo instead of a folder
    # (the local card keeps its placeholder: the same folder may be pushed elsewhere).
    operations = [
        CommitOperationAdd(
            path_in_repo=path,
            path_or_fileobj=(
                card_for_repo((folder / path).read_text(encoding="utf-8"), repo_id).encode("utf-8")
                if path == CARD_NAME
                else folder / path
            ),
        )
        for path in files
    ]
    commit = api.create_commit(
        repo_id=repo_id,
        operations=operations,
        commit_message=commit_message or f"Upload {folder.resolve().name} with MiniGPT",
        revision=revision,
    )
    return PushResult(
        repo_id=repo_id,
        revision=revision,
        commit_oid=commit.oid,
        commit_url=commit.commit_url,
        changed=commit.oid != head_before,
        files=tuple(files),
    )
