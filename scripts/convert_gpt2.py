"""Convert a Hugging Face GPT-2 folder to MiniGPT, or export MiniGPT as a stock GPT-2.

    python scripts/convert_gpt2.py --from_gpt2 path/to/gpt2 --out minigpt-124m
    python scripts/convert_gpt2.py --to_gpt2 minigpt-124m --out gpt2-export

The MiniGPT folder loads with `AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`
(it carries its code); the exported GPT-2 folder loads with stock
`GPT2LMHeadModel.from_pretrained(out)`, no remote code. Tokenizer files in the source folder
are copied unchanged. The output is written to a temporary folder and renamed into place, so
an interrupted run leaves no half-written model behind.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from modeling_minigpt.convert import gpt2_to_minigpt, minigpt_to_gpt2
from training.cli import USER_ERRORS, parse_config_args, report_error
from training.saved.load import check_model_folder, check_weights
from training.saved.outputs import check_outputs, named_inputs
from training.saved.save import save_model_folder

# Copied byte for byte: rebuilding a tokenizer from GPT-2's vocab.json/merges.txt through
# transformers can silently produce an empty one (see HF_V5_NOTES.md).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


@dataclass
class ConvertArguments:
    out: str = field(metadata={"help": "Output folder. Must not exist (or be empty) unless --overwrite."})
    from_gpt2: str | None = field(
        default=None, metadata={"help": "A GPT2LMHeadModel folder (config.json + weights) to convert to MiniGPT."}
    )
    to_gpt2: str | None = field(
        default=None, metadata={"help": "A MiniGPT folder to export as a stock GPT2LMHeadModel folder."}
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Replace an existing output folder (never the source folder itself)."}
    )

    def __post_init__(self) -> None:
        if (self.from_gpt2 is None) == (self.to_gpt2 is None):
            raise ValueError("give exactly one of --from_gpt2 FOLDER or --to_gpt2 FOLDER")
        check_weights(
            check_model_folder(self.from_gpt2 or self.to_gpt2, "--from_gpt2" if self.from_gpt2 else "--to_gpt2")
        )
        check_outputs({"--out": self.out}, named_inputs(self), self.overwrite)


def convert(args: ConvertArguments) -> Path:
    """Convert `args.from_gpt2` or `args.to_gpt2` into `args.out`; return the output folder."""
    source = Path(args.from_gpt2 or args.to_gpt2)
    model = gpt2_to_minigpt(source) if args.from_gpt2 is not None else minigpt_to_gpt2(source)
    return save_model_folder(model, args.out, extra_files=[source / name for name in TOKENIZER_FILES])


def main(argv: list[str] | None = None) -> int:
    try:
        (args,) = parse_config_args((ConvertArguments,), argv, __doc__.split("\n\n")[0])
        print(f"converting with {args}")
        print(f"wrote {convert(args)}")
    except USER_ERRORS as error:
        return report_error(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
