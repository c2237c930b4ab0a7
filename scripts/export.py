"""Export a saved MiniGPT or GPT-2 folder for another runtime: GGUF, ONNX or ExecuTorch.

    python scripts/export.py --model runs/mine/model --format gguf --output_dir out/gguf              # f32
    python scripts/export.py --model runs/mine/model --format gguf --gguf_type q8_0 --output_dir out/q8
    python scripts/export.py --model runs/mine/model --format onnx --output_dir out/onnx
    python scripts/export.py --model runs/mine/model --format executorch --output_dir out/pte

GGUF runs in llama.cpp (`llama-cli -m out/gguf/model.gguf`) and Ollama (`cd out/gguf && ollama
create mine -f Modelfile`); ONNX in ONNX Runtime; the .pte in ExecuTorch's runtime. The folder is
loaded with the package's own classes (no code saved in it runs) and the output folder is written
atomically. The library code is `training/saved/runtimes/`.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from training.cli import USER_ERRORS, parse_config_args, report_error
from training.saved.load import check_model_folder
from training.saved.outputs import named_inputs
from training.saved.runtimes import check_output_dir, load_for_export
from training.saved.runtimes.executorch import missing_packages

Format = Literal["gguf", "onnx", "executorch"]
# The package each format is written with (pip install -e ".[export]"; ExecuTorch: ".[executorch]").
WRITERS = {"gguf": "gguf", "onnx": "onnx"}


@dataclass
class ExportArguments:
    model: str | None = field(
        default=None, metadata={"help": "A saved MiniGPT or GPT-2 language model folder (save_pretrained). Required."}
    )
    format: Format = field(default="gguf", metadata={"help": "gguf (llama.cpp, Ollama), onnx or executorch."})
    output_dir: str | None = field(
        default=None, metadata={"help": "Folder to write. Must not exist (or be empty) unless --overwrite. Required."}
    )
    gguf_type: Literal["f32", "f16", "q8_0"] = field(
        default="f32",
        metadata={"help": "GGUF: type of the weight matrices (q8_0: 8 bits + a scale per 32 weights, ~1/4 of f32)."},
    )
    executorch_backend: Literal["portable", "xnnpack"] = field(
        default="xnnpack", metadata={"help": "ExecuTorch: xnnpack (fast CPU kernels) or portable (runs anywhere)."}
    )
    name: str = field(default="minigpt", metadata={"help": "GGUF: the model name in the file's metadata."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty --output_dir."})

    def __post_init__(self) -> None:
        if self.model is None or self.output_dir is None:
            raise ValueError("--model and --output_dir are required")
        check_model_folder(self.model, "--model")
        check_output_dir(self.output_dir, self.overwrite, named_inputs(self))
        if self.format == "executorch":
            missing = missing_packages(self.executorch_backend)
            if missing:
                raise ValueError(
                    f"--format executorch --executorch_backend {self.executorch_backend} needs {', '.join(missing)}: "
                    f'pip install {" ".join(missing)} (or pip install -e ".[executorch]")'
                )
        elif importlib.util.find_spec(WRITERS[self.format]) is None:
            raise ValueError(
                f"--format {self.format} needs the {WRITERS[self.format]} package: pip install {WRITERS[self.format]} "
                '(or pip install -e ".[export]")'
            )


def export(args: ExportArguments) -> Path:
    """Write args.model in args.format to args.output_dir; returns the folder."""
    model, tokenizer = load_for_export(args.model)
    # Each format's module is imported only when used: they import their runtime's exporter.
    if args.format == "gguf":
        from training.saved.runtimes.gguf import export_gguf

        return export_gguf(model, tokenizer, args.output_dir, args.gguf_type, args.name)
    if args.format == "onnx":
        from training.saved.runtimes.onnx import export_onnx

        return export_onnx(model, tokenizer, args.output_dir)
    from training.saved.runtimes.executorch import export_executorch

    return export_executorch(model, tokenizer, args.output_dir, args.executorch_backend)


def main(argv: list[str] | None = None) -> int:
    try:
        (args,) = parse_config_args((ExportArguments,), argv, __doc__.split("\n\n")[0])
        print(f"exporting with {args}")
        folder = export(args)
    except USER_ERRORS as error:
        return report_error(error)
    for path in sorted(folder.iterdir()):
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
