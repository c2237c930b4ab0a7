"""Push a saved MiniGPT folder (weights, config, code, tokenizer, card, plots) to the Hugging Face Hub.

    python scripts/push_to_hub.py --folder runs/verdict/model --repo_id me/minigpt-verdict
    python scripts/push_to_hub.py --folder runs/verdict/model --repo_id me/minigpt-verdict \\
        --private --revision experiment-1 --commit_message "Longer run"

The token is read the usual way: the HF_TOKEN environment variable, else the login saved by
`hf auth login`. It is never printed or logged. Pushing a folder again uploads only the files
that changed, and makes no commit at all when nothing did. Set HF_ENDPOINT to push to another
Hub-compatible server. The training scripts write the folder to push as <output_dir>/model;
checkpoints and temporaries are never pushed, even from a whole run folder (see
training.saved.hub.RUN_ONLY_PATTERNS). A model already in memory can also go up with
`model.push_to_hub(repo_id)` and `tokenizer.push_to_hub(repo_id)`, without the card and plots.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, fields

from huggingface_hub import get_token
from huggingface_hub.utils import logging as hub_logging

from training.cli import USER_ERRORS, parse_config_args, report_error
from training.saved.hub import DEFAULT_BRANCH, push_folder


@dataclass
class PushArguments:
    folder: str = field(
        metadata={"help": "Saved model folder to push, as written by save_pretrained or a training script."}
    )
    repo_id: str = field(metadata={"help": "Target repository, 'namespace/name'."})
    private: bool = field(
        default=False,
        metadata={"help": "Create the repository private. An existing public repo is refused, not silently used."},
    )
    commit_message: str | None = field(
        default=None, metadata={"help": "Commit message; None means 'Upload <folder name> with MiniGPT'."}
    )
    revision: str = field(
        default=DEFAULT_BRANCH,
        metadata={"aliases": ["--branch"], "help": "Branch to commit to; created from main when missing (--create)."},
    )
    create: bool = field(
        default=True,
        metadata={"help": "Create the repository and branch when missing; with --no_create a missing one is an error."},
    )
    token: str | None = field(
        default=None,
        metadata={
            "help": "Hub token. Discouraged: it lands in shell history and the process list. "
            "None reads HF_TOKEN, else the login saved by `hf auth login`."
        },
    )
    verbose: bool = field(default=False, metadata={"help": "List the files and show the Hub client's debug log."})


def token_source(args: PushArguments) -> str:
    """Where the token will come from, for the log; never the token itself."""
    if args.token:
        return "--token"
    if os.environ.get("HF_TOKEN"):
        return "HF_TOKEN"
    return "saved login" if get_token() else "none (anonymous: only reads of public repos will work)"


def describe(args: PushArguments) -> str:
    shown = {f.name: getattr(args, f.name) for f in fields(args) if f.name != "token"}
    shown["token"] = token_source(args)
    return "\n".join(f"  {name}: {value}" for name, value in shown.items())


def main(argv: list[str] | None = None) -> int:
    try:
        (args,) = parse_config_args((PushArguments,), argv, __doc__.split("\n\n")[0])
        if args.verbose:
            hub_logging.set_verbosity_debug()
        print(f"Pushing with:\n{describe(args)}", flush=True)
        result = push_folder(
            args.folder,
            args.repo_id,
            private=args.private,
            commit_message=args.commit_message,
            revision=args.revision,
            create=args.create,
            token=args.token,
        )
    except USER_ERRORS as error:  # bad input, or the Hub's answer (its message names the URL and status)
        return report_error(error)
    if args.verbose:
        print("Files:\n" + "\n".join(f"  {path}" for path in result.files))
    where = f"{result.repo_id}@{result.revision}"
    if result.changed:
        # The client sends only the files whose content the Hub does not have yet.
        print(f"Pushed {where}, now matching the folder's {len(result.files)} files: {result.commit_url}")
    else:
        print(f"No changes: {where} already holds these {len(result.files)} files ({result.commit_oid})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
