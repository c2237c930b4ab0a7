"""A local web app to chat with a saved model and watch it work (Gradio, on 127.0.0.1 only).

    python scripts/app.py --model runs/quickstart/sft/model
    minigpt-app --model runs/quickstart/sft/model runs/quickstart/pretrain/model --port 7861

Chat: the folder's chat template, tokens streamed as the KV-cached loop produces them, with
temperature / top-k / top-p / max new tokens / seed, and each generated token's probability and
top-5 alternatives. Inspect: token boundaries (ids and bytes), each token's probability given
the text before it, one head's attention heatmap, and for a classifier the label probabilities
and the pooled token. The numbers come from `apps/inspect_model.py`; this file is the page.

What a page can load is what the command line allowed: the `--model` folders. Each page chooses
one of them for itself (a Load changes that page, not the others); each folder loads once, when a
page first asks for it. Text the model (or the person) wrote is shown as text: a reply holding
`<b>` or `<img>` shows those characters, it is not rendered as HTML or markdown.

Nothing leaves the machine: the server listens on 127.0.0.1, Gradio's analytics and version
check are off, and its fonts and scripts are served by the app itself.
"""

from __future__ import annotations

import html
import os
import socket
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Read when gradio is imported and when a Blocks is built: off before either.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

try:
    import gradio as gr
except ImportError:  # the optional extra: main() says how to install it
    gr = None

from training.cli import parse_config_args

HOST = "127.0.0.1"
PROG = "minigpt-app"
TOKEN_COLOURS = ("#fde2a7", "#b9e4c9", "#c6d8f5", "#f7c6d9", "#e0d0f5", "#d5ecf2")


@dataclass
class AppArguments:
    model: list[str] | None = field(
        default=None,
        metadata={
            "help": "Saved model folder(s): MiniGPT causal LMs or sequence classifiers, or GPT-2 folders exported "
            "by scripts/convert_gpt2.py. Required. A page opens on the first; these are the only folders a page can "
            "load."
        },
    )
    port: int | None = field(
        default=None, metadata={"help": "TCP port on 127.0.0.1. Default: the first free port from 7860."}
    )

    def __post_init__(self) -> None:
        if self.port is not None and not 1 <= self.port <= 65535:
            raise ValueError(f"--port must be in [1, 65535], got {self.port}")


def port_problem(port: int) -> str | None:
    """Why `port` on HOST cannot be listened on (e.g. "Address already in use"), None when it can.
    Checked before the page is built: Gradio's own refusal is a traceback about `launch()`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: a closing port is free
        try:
            probe.bind((HOST, port))
        except OSError as error:
            return error.strerror or str(error)
    return None


def parse_args(argv: Sequence[str] | None = None) -> AppArguments:
    (args,) = parse_config_args((AppArguments,), argv, __doc__.split("\n\n")[0])
    return args


# ----------------------------------------------------------------------------- page pieces


def message_text(content: Any) -> str:
    """The text of a chat message as the Chatbot hands it back (a string or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "")
    return "".join(message_text(part) for part in content or [])


def shown(text: str) -> str:
    """`text` as the Chatbot gets it, escaped: the Chatbot puts a message into the page as HTML
    (sanitized, even with render_markdown=False), so a reply's `<b>x</b>` would show bold and its
    `<img src=x>` a broken image. Escaped, the page shows the characters the model wrote."""
    return html.escape(text, quote=False)


def written(content: Any) -> str:
    """The text a Chatbot message holds, as written (the inverse of `shown`)."""
    return html.unescape(message_text(content))


def last_index(count: int) -> int:
    """The layer / head slider's maximum: Gradio refuses a slider whose maximum is its minimum, so a
    model with one layer (or head) gets 0-1, and index 1 is refused by the views with a message."""
    return max(count - 1, 1)


def warning(text: str) -> str:
    return f"⚠️ {text}"


def boundaries_html(pieces, pooled: int | None = None) -> str:
    """Each token on its own colour with its id beneath; hover for position and bytes."""
    spans = []
    for piece in pieces:
        colour = TOKEN_COLOURS[piece.position % len(TOKEN_COLOURS)]
        border = "outline:2px solid #d9480f;" if piece.position == pooled else ""
        tip = html.escape(f"#{piece.position}  id {piece.id}  bytes {piece.hex}", quote=True)
        spans.append(
            f'<span class="tok" title="{tip}" style="display:inline-block;margin:1px;padding:0 2px;'
            f'background:{colour};{border}border-radius:3px;text-align:center;font-family:monospace">'
            f'{html.escape(piece.readable)}<br><small style="color:#555">{piece.id}</small></span>'
        )
    note = " The outlined token is the one the classifier pools." if pooled is not None else ""
    return (
        f'<div id="token-boundaries"><p>{len(pieces)} tokens. Hover a token for its position and bytes.{note}</p>'
        f'<div style="line-height:2.4">{"".join(spans)}</div></div>'
    )


def alternatives_text(choice) -> str:
    return "  ".join(f"{piece} {p:.3f}" for _, piece, p in choice.alternatives)


def choice_record(choice) -> dict:
    return {
        "id": choice.id,
        "piece": choice.piece,
        "probability": choice.probability,
        "top": [list(alt) for alt in choice.alternatives],
    }


def attention_figure(tokens: Sequence[str], weights, layer: int, head: int):
    """Heatmap of one head: row = query token, column = key token (a Figure, not pyplot's state)."""
    from matplotlib.figure import Figure

    n = len(tokens)
    size = min(6.5, max(4.0, 0.2 * n + 2))
    fig = Figure(figsize=(size, size), layout="constrained")
    ax = fig.subplots()
    # No fixed vmax: one key (often the first token) can take most of the weight and wash out the rest.
    im = ax.imshow(weights.numpy(), cmap="viridis", vmin=0.0)
    # Beyond ~40 labels they overlap; label every k-th token instead.
    every = -(-n // 40)
    ticks = list(range(0, n, every))
    fontsize = 8 if n <= 30 else 6
    ax.set_xticks(ticks, [tokens[i] for i in ticks], rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, [tokens[i] for i in ticks], fontsize=fontsize)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    ax.set_title(f"attention weights, layer {layer}, head {head}")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return fig


# ----------------------------------------------------------------------------- the app


class ModelApp:
    """The folders the command line allowed, each loaded once, on first use. Each page holds the
    folder it shows (a gr.State, `folder` below): a Load on one page changes that page only."""

    def __init__(self, first, allowed: Sequence[str]):
        self.first = str(first.folder)
        self.models = {self.first: first}
        # Resolved, so that another spelling of an allowed folder is the same folder.
        self.allowed = {os.path.realpath(folder): folder for folder in allowed}

    def model(self, folder: str):
        """The loaded model of an allowed `folder` (see `load`)."""
        from apps.inspect_model import load_for_app

        if folder not in self.models:
            self.models[folder] = load_for_app(folder)
        return self.models[folder]

    # --- load

    def load(self, requested: str | None, folder: str):
        """(page's folder, header, status, *control updates) after the page asked for `requested`."""
        from tokenization.corpus import DataError

        requested = (requested or "").strip()
        allowed = self.allowed.get(os.path.realpath(requested)) if requested else None
        if allowed is None:
            choices = ", ".join(self.allowed.values())
            status = warning(
                f"{requested or 'no folder'} is not one of the folders this app was started with ({choices}): "
                f"to load another, restart the app with it among the --model folders. Still showing {folder}."
            )
            return (folder, self.header(folder), status, *self.control_updates(folder))
        try:
            self.model(allowed)
            folder, status = allowed, f"Loaded {allowed}."
        except DataError as error:  # a ModelFolderError, or a tokenizer that does not load
            status = warning(f"{error}. Still showing {folder}.")
        return (folder, self.header(folder), status, *self.control_updates(folder))

    def header(self, folder: str) -> str:
        return f"**Model:** {html.escape(self.model(folder).describe())}"

    def control_updates(self, folder: str):
        loaded = self.model(folder)
        is_lm = loaded.kind == "causal-lm"
        return (
            gr.Slider(maximum=last_index(loaded.n_layers), value=0, interactive=loaded.n_layers > 1),
            gr.Slider(maximum=last_index(loaded.n_heads), value=0, interactive=loaded.n_heads > 1),
            gr.Slider(maximum=loaded.context_length, value=min(64, loaded.context_length)),
            gr.Tab(visible=is_lm),
            gr.Label(visible=not is_lm, value=None),
        )

    # --- chat

    def chat(
        self,
        message: str,
        history: list,
        temperature: float,
        top_k: float,
        top_p: float,
        max_new_tokens: float,
        seed: float,
        folder: str,
    ) -> Iterator[tuple]:
        """Streams (conversation, prompt box, status, token table, details, text for Inspect)."""
        from apps.inspect_model import SamplingSettings, chat_prompt, eos_id, stream_generate

        loaded = self.model(folder)
        history = [{"role": m["role"], "content": written(m["content"])} for m in history or []]
        displayed = [{"role": m["role"], "content": shown(m["content"])} for m in history]
        if loaded.kind != "causal-lm":
            yield displayed, message, warning("This is a classifier: use the Inspect tab."), [], {}, ""
            return
        try:
            settings = SamplingSettings(
                max_new_tokens=int(max_new_tokens),
                temperature=float(temperature),
                top_k=int(top_k),
                top_p=float(top_p),
                seed=int(seed),
            )
            # Turns that do not fit are left out of the prompt, keeping room for the reply: max new
            # tokens, or a quarter of the context when that is less (the quickstart's 128 tokens hold
            # a turn or two beside a 32-token reply).
            room = min(settings.max_new_tokens, loaded.context_length // 4)
            prompt = chat_prompt(loaded.tokenizer, history, message or "", loaded.context_length, room)
            steps = stream_generate(loaded.model, loaded.tokenizer, prompt.ids, settings, eos_id(loaded))
            first = next(steps)  # raises ContextFullError / ValueError before the page changes
        except ValueError as error:
            yield displayed, message, warning(str(error)), [], {}, ""
            return

        conversation = [*displayed, {"role": "user", "content": shown(message)}]
        rows, records = [], []
        note = f" {warning(prompt.note)}" if prompt.note else ""
        for step in _chain(first, steps):
            rows.append(
                [len(rows) + 1, step.choice.piece, round(step.choice.probability, 4), alternatives_text(step.choice)]
            )
            records.append(choice_record(step.choice))
            details = {
                "prompt_ids": prompt.ids,
                "ids": [r["id"] for r in records],
                "stop": step.stop,
                "tokens": records,
            }
            status = (
                f"Generating… {len(rows)} tokens.{note}"
                if step.stop is None
                else self.stop_message(step.stop, len(prompt.ids), len(rows), loaded.context_length) + note
            )
            reply = [*conversation, {"role": "assistant", "content": shown(step.text)}]
            yield reply, "", status, rows, details, prompt.text + step.text

    @staticmethod
    def stop_message(stop: str, n_prompt: int, n_reply: int, context: int) -> str:
        if stop == "eos":
            return f"Stopped at end-of-text after {n_reply} tokens (prompt {n_prompt} tokens)."
        if stop == "length":
            return f"Stopped at the max new tokens limit: {n_reply} tokens (prompt {n_prompt} tokens)."
        return warning(
            f"The context is full: {n_prompt} prompt + {n_reply} reply tokens = {context}, the most this model "
            "reads. Clear the chat (or shorten the prompt) to go on."
        )

    # --- inspect

    def inspect(self, text: str, layer: float, head: float, folder: str):
        """(token boundaries, status, heatmap, token table, classifier labels, details)."""
        from apps.inspect_model import attention_map, classify, encode, token_pieces, token_probabilities

        loaded = self.model(folder)
        layer, head = int(layer), int(head)
        try:
            tokens, weights = attention_map(loaded.model, loaded.tokenizer, text or "", layer, head)
        except ValueError as error:
            return "", warning(str(error)), None, [], None, {}
        ids = encode(loaded.tokenizer, text)
        pieces = token_pieces(loaded.tokenizer, ids)
        details: dict[str, Any] = {
            "ids": ids,
            "tokens": [p.readable for p in pieces],
            "bytes": [p.hex for p in pieces],
            "layer": layer,
            "head": head,
            "attention": weights.tolist(),
        }
        labels, pooled = None, None
        if loaded.kind == "classifier":
            result = classify(loaded.model, loaded.tokenizer, text)
            labels, pooled = result.probabilities, result.pooled_position
            details["classification"] = asdict(result)
            choices = [None] * len(pieces)
        else:
            # Position 0 has no text before it, so no probability.
            choices = [None, *token_probabilities(loaded.model, loaded.tokenizer, ids)]
            details["probabilities"] = [None if c is None else choice_record(c) for c in choices]
        rows = [
            [
                p.position,
                p.id,
                p.readable,
                p.hex,
                "" if c is None else round(c.probability, 4),
                "" if c is None else alternatives_text(c),
            ]
            for p, c in zip(pieces, choices, strict=False)
        ]
        status = f"{len(pieces)} tokens; attention of layer {layer}, head {head}."
        figure = attention_figure(tokens, weights, layer, head)
        return boundaries_html(pieces, pooled), status, figure, rows, labels, details


def _chain(first, rest):
    yield first
    yield from rest


def build_app(loaded, allowed: Sequence[str] = ()) -> gr.Blocks:
    """The page for `loaded` (a apps.inspect_model.LoadedModel), which can switch to the
    `allowed` folders (the command line's --model; `loaded`'s own is always allowed)."""
    allowed = list(dict.fromkeys(str(Path(folder)) for folder in (loaded.folder, *allowed)))
    app = ModelApp(loaded, allowed)
    is_lm = loaded.kind == "causal-lm"
    with gr.Blocks(title="MiniGPT", analytics_enabled=False) as demo:
        gr.Markdown("# MiniGPT: chat with a saved model and watch it work")
        with gr.Row():
            requested = gr.Dropdown(
                choices=allowed,
                value=app.first,
                allow_custom_value=True,  # a typed path gets the app's own answer, not a bare validation error
                label="Model folder (those given with --model when the app started)",
                scale=5,
                elem_id="model-folder",
            )
            load_button = gr.Button("Load", scale=1, elem_id="load")
        header = gr.Markdown(app.header(app.first), elem_id="model-header")
        load_status = gr.Markdown(elem_id="load-status")
        folder = gr.State(app.first)  # this page's model
        last_text = gr.State("")

        with gr.Tab("Chat", visible=is_lm, elem_id="chat-tab") as chat_tab:
            # Messages arrive escaped (`shown`): with markdown and LaTeX off too, the bubble shows
            # the text as written. No copy button: it would copy the escaped text.
            chatbot = gr.Chatbot(
                label="Conversation",
                height=320,
                render_markdown=False,
                latex_delimiters=[],
                elem_id="chatbot",
                buttons=[],
            )
            with gr.Row():
                prompt = gr.Textbox(
                    show_label=False, placeholder="Type an instruction and press Enter", scale=5, elem_id="prompt"
                )
                send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                clear = gr.Button("Clear", scale=1, elem_id="clear")
            with gr.Row():
                temperature = gr.Slider(0, 2, value=0.0, step=0.05, label="Temperature", info="0 = greedy")
                top_k = gr.Slider(0, 200, value=0, step=1, label="Top-k", info="0 = off")
                top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="Top-p", info="1 = off")
                max_new = gr.Slider(
                    1, loaded.context_length, value=min(64, loaded.context_length), step=1, label="Max new tokens"
                )
                seed = gr.Number(value=0, precision=0, label="Seed")
            chat_status = gr.Markdown(elem_id="chat-status")
            generated = gr.Dataframe(
                headers=["#", "token", "p", "top-5 alternatives"],
                value=[],
                interactive=False,
                elem_id="generated",
                column_widths=["6%", "16%", "9%", "69%"],
                label="Generated tokens: probability under the model (temperature 1, before top-k / top-p)",
            )
            with gr.Accordion("Raw numbers (JSON)", open=False):
                chat_details = gr.JSON(label="Generation")

        with gr.Tab("Inspect", elem_id="inspect-tab"):
            text = gr.Textbox(
                lines=4,
                label="Text",
                elem_id="inspect-text",
                placeholder="Any text, or the last chat turn (button below)",
            )
            with gr.Row():
                use_chat = gr.Button("Use the last chat turn", elem_id="use-chat")
                layer = gr.Slider(0, last_index(loaded.n_layers), value=0, step=1, label="Layer")
                head = gr.Slider(0, last_index(loaded.n_heads), value=0, step=1, label="Head")
                inspect_button = gr.Button("Inspect", variant="primary", elem_id="inspect")
            inspect_status = gr.Markdown(elem_id="inspect-status")
            labels = gr.Label(label="Label probabilities", visible=not is_lm, elem_id="labels")
            boundaries = gr.HTML(elem_id="boundaries")
            heatmap = gr.Plot(label="Attention", format="png", elem_id="heatmap")
            tokens = gr.Dataframe(
                headers=["#", "id", "token", "bytes", "p", "top-5 here"],
                value=[],
                interactive=False,
                label="Tokens: p = probability given the text before; top-5 = the model's first choices here",
                column_widths=["6%", "8%", "14%", "16%", "9%", "47%"],
                elem_id="tokens",
            )
            with gr.Accordion("Raw numbers (JSON)", open=False):
                inspect_details = gr.JSON(label="Inspect")

        load_button.click(
            app.load,
            [requested, folder],
            [folder, header, load_status, layer, head, max_new, chat_tab, labels],
            api_name="load",
        )
        chat_inputs = [prompt, chatbot, temperature, top_k, top_p, max_new, seed, folder]
        chat_outputs = [chatbot, prompt, chat_status, generated, chat_details, last_text]
        send.click(app.chat, chat_inputs, chat_outputs, api_name="chat")
        prompt.submit(app.chat, chat_inputs, chat_outputs, api_visibility="private")
        clear.click(
            lambda: ([], "", [], {}, ""),
            None,
            [chatbot, chat_status, generated, chat_details, last_text],
            api_visibility="private",
        )
        use_chat.click(lambda t: t, last_text, text, api_visibility="private")
        inspect_button.click(
            app.inspect,
            [text, layer, head, folder],
            [boundaries, inspect_status, heatmap, tokens, labels, inspect_details],
            api_name="inspect",
        )
    return demo


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except ValueError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    if gr is None:
        print(f'{PROG}: error: the app needs Gradio: pip install -e ".[app]"', file=sys.stderr)
        return 1
    if not args.model:
        print(f"{PROG}: error: --model is required (a folder written by save_pretrained)", file=sys.stderr)
        return 1
    problem = port_problem(args.port) if args.port is not None else None
    if problem:
        print(
            f"{PROG}: error: --port {args.port} on {HOST}: {problem}; choose another, or leave it out", file=sys.stderr
        )
        return 1
    from apps.inspect_model import load_for_app
    from tokenization.corpus import DataError
    from training.saved.load import check_model_folder

    try:
        for other in args.model[1:]:  # loaded when a page first asks for them; there, at least
            check_model_folder(other)
        loaded = load_for_app(args.model[0])
    except DataError as error:  # a ModelFolderError, or a tokenizer that does not load
        print(f"{PROG}: error: --model: {error}", file=sys.stderr)
        return 1
    print(f"{PROG} config: {asdict(args)}\n{loaded.describe()}")
    demo = build_app(loaded, args.model)
    demo.queue(default_concurrency_limit=1).launch(server_name=HOST, server_port=args.port, share=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
