"""An OpenAI-compatible server for a saved folder: transformers' own `transformers serve`, with MiniGPT.

    minigpt-serve runs/quickstart/sft/model --port 8000
    minigpt-serve --help          # every option of `transformers serve`

`transformers serve FOLDER` looks a folder's architecture up inside transformers
(`getattr(transformers, "MiniGPTForCausalLM")`), where MiniGPT is not. This entry point runs the
same server (its endpoints, handlers, options and generation loop) and changes only how a model
loads: the folder loads by the package's rules (training/saved/load.py), so a MiniGPT or GPT-2
folder loads with the package's own classes and no code saved in it runs. The model's process is
started with `spawn`; it imports this module to unpickle the loader, which imports
`modeling_minigpt` and so registers MiniGPT with the Auto classes there too.

Requests name the model as it was given on the command line (`model="runs/quickstart/sft/model"`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from functools import wraps
from typing import Any

# transformers' command and loader import without the serving extra (FastAPI, uvicorn, openai):
# `main` checks for it and says how to install it.
from transformers.cli.serve import Serve
from transformers.cli.serving.model_manager import ModelLoader
from transformers.utils.import_utils import is_serve_available

from training.cli import report_error
from training.saved.load import check_model_folder, folder_task, load_model

PROG = "minigpt-serve"


def generate_within_context(model: Any) -> Any:
    """`model`, its `generate` cutting `max_new_tokens` to the room its context leaves after the prompt.

    The server asks for at least 1024 new tokens when a request sets no `max_tokens`, which runs
    past a small model's learned positions (128 for the quickstart's) and fails the request; an
    answer that fills the context ends there instead, as text that reached `max_tokens` would.
    """
    unbounded: Callable[..., Any] = model.generate
    context_length = model.config.max_position_embeddings

    @wraps(unbounded)
    def generate(*args: Any, **kwargs: Any) -> Any:
        prompt = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        room = context_length - prompt.shape[-1]
        requested = kwargs.get("max_new_tokens")
        kwargs["max_new_tokens"] = room if requested is None else min(requested, room)
        return unbounded(*args, **kwargs)

    model.generate = generate
    return model


def template_errors_as_bad_requests(tokenizer: Any) -> Any:
    """`tokenizer`, its chat template's refusals raised as ValueError, which the server answers with a 400.

    The Alpaca template refuses chats it cannot render (two user messages in a row, a system
    message after the first) with a sentence saying why; as jinja's TemplateError it would reach
    the client as a bare "500 Internal Server Error".
    """
    from jinja2 import TemplateError

    render: Callable[..., Any] = tokenizer.apply_chat_template

    @wraps(render)
    def apply_chat_template(*args: Any, **kwargs: Any) -> Any:
        try:
            return render(*args, **kwargs)
        except TemplateError as error:
            raise ValueError(str(error)) from None

    tokenizer.apply_chat_template = apply_chat_template
    return tokenizer


class MiniGPTModelLoader(ModelLoader):
    """transformers' loader, loading folders by training/saved/load.py's rules instead of by class name."""

    def load_config(self, model_id: str):
        from transformers import AutoConfig, GenerationConfig

        folder = check_model_folder(model_id)
        # trust_remote_code=False: a minigpt or gpt2 config resolves to the registered class, never the folder's code.
        config = AutoConfig.from_pretrained(folder, trust_remote_code=self.trust_remote_code)
        try:
            generation_config = GenerationConfig.from_pretrained(folder)
        except OSError:  # no generation_config.json: the model config's, as from_pretrained does
            generation_config = GenerationConfig.from_model_config(config)
        return config, generation_config

    def load_processor(self, model_id: str):
        from tokenization.load import load_tokenizer

        tokenizer = load_tokenizer(check_model_folder(model_id), trust_remote_code=self.trust_remote_code)
        return template_errors_as_bad_requests(tokenizer)

    def _load_model(self, model_id: str, tqdm_class: type | None = None, progress_callback: Callable | None = None):
        kwargs: dict[str, Any] = {"dtype": self.dtype, "device_map": self.device, "tqdm_class": tqdm_class}
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        if (quantization_config := self.get_quantization_config()) is not None:
            kwargs["quantization_config"] = quantization_config
        model = load_model(model_id, "causal-lm", trust_remote_code=self.trust_remote_code, **kwargs)
        return generate_within_context(model.eval())


class MiniGPTServe(Serve):
    """`transformers serve` with `MiniGPTModelLoader`: its options, endpoints and handlers unchanged.

    `Serve.__init__` builds a `ModelLoader` and then serves (`run`, or `run_api_servers` with
    several API servers); both start by making it this package's loader, which has the same
    settings and no state of its own.
    """

    def _use_own_loader(self) -> None:
        if self.force_model is None:
            raise ValueError(f"{PROG} needs a saved model folder: {PROG} FOLDER [options]")
        check_model_folder(self.force_model)
        if folder_task(self.force_model) != "causal-lm":
            raise ValueError(f"{self.force_model} holds a classifier; the server generates text with a causal LM")
        self.loader.__class__ = MiniGPTModelLoader

    def run(self, socket: Any = None, engine_connection: tuple | None = None) -> None:
        self._use_own_loader()
        super().run(socket, engine_connection)

    def run_api_servers(self, count: int) -> None:
        self._use_own_loader()
        super().run_api_servers(count)


def main(argv: Sequence[str] | None = None) -> int:
    import typer

    if not is_serve_available():
        return report_error(ImportError('the server needs transformers\' serving extra: pip install -e ".[serve]"'))

    command = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    command.command(name=PROG, help=__doc__.split("\n\n")[0])(MiniGPTServe)
    try:
        command(args=list(sys.argv[1:] if argv is None else argv), prog_name=PROG, standalone_mode=False)
    except (typer.Exit, SystemExit) as stop:
        return int(getattr(stop, "exit_code", getattr(stop, "code", 0)) or 0)
    except KeyboardInterrupt:
        return 0
    except Exception as error:
        return report_error(error)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
