"""A local web app to chat with a saved model and watch it work (Gradio, on 127.0.0.1 only).

    python scripts/app.py --model runs/quickstart/sft/model
    minigpt-app --model runs/quickstart/sft/model --port 7861

Chat: the folder's chat template, tokens streamed as the KV-cached loop produces them, with
temperature / top-k / top-p / max new tokens / seed, and each generated token's probability and
top-5 alternatives. Inspect: token boundaries (ids and bytes), each token's probability given
the text before it, one head's attention heatmap, and for a classifier the label probabilities
and the pooled token. The numbers come from `apps/inspect_model.py`; this file is the page.

Nothing leaves the machine: the server listens on 127.0.0.1, Gradio's analytics and version
check are off, and its fonts and scripts are served by the app itself.
"""

from __future__ import annotations

import html
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
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
    model: str | None = field(
        default=None,
        metadata={
            "help": "Saved model folder: a MiniGPT causal LM or sequence classifier, or a GPT-2 folder "
            "exported by scripts/convert_gpt2.py. Required."
        },
    )
    port: int | None = field(
        default=None, metadata={"help": "TCP port on 127.0.0.1. Default: the first free port from 7860."}
    )


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
    """The one model the app serves. A local single-user tool: loading a folder switches every tab."""

    def __init__(self, loaded):
        self.loaded = loaded

    # --- load

    def load(self, folder: str):
        from apps.inspect_model import load_for_app
        from tokenization.corpus import DataError

        try:
            self.loaded = load_for_app(folder.strip())
            status = f"Loaded {self.loaded.folder}."
        except DataError as error:  # a ModelFolderError, or a tokenizer that does not load
            status = warning(f"{error}. Still serving {self.loaded.folder}.")
        return (self.header(), status, *self.control_updates())

    def header(self) -> str:
        return f"**Model:** {html.escape(self.loaded.describe())}"

    def control_updates(self):
        loaded = self.loaded
        is_lm = loaded.kind == "causal-lm"
        return (
            gr.Slider(maximum=max(loaded.n_layers - 1, 0), value=0),
            gr.Slider(maximum=max(loaded.n_heads - 1, 0), value=0),
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
    ) -> Iterator[tuple]:
        """Streams (conversation, prompt box, status, token table, details, text for Inspect)."""
        from apps.inspect_model import SamplingSettings, chat_prompt, eos_id, stream_generate

        loaded = self.loaded  # a Load during this reply does not change the model mid-way
        history = [{"role": m["role"], "content": message_text(m["content"])} for m in history or []]
        if loaded.kind != "causal-lm":
            yield history, message, warning("This is a classifier: use the Inspect tab."), [], {}, ""
            return
        try:
            settings = SamplingSettings(
                max_new_tokens=int(max_new_tokens),
                temperature=float(temperature),
                top_k=int(top_k),
                top_p=float(top_p),
                seed=int(seed),
            )
            prompt = chat_prompt(loaded.tokenizer, history, message or "")
            steps = stream_generate(loaded.model, loaded.tokenizer, prompt.ids, settings, eos_id(loaded))
            first = next(steps)  # raises ContextFullError / ValueError before the page changes
        except ValueError as error:
            yield history, message, warning(str(error)), [], {}, ""
            return

        conversation = [*history, {"role": "user", "content": message}]
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
                else self.stop_message(step.stop, len(prompt.ids), len(rows)) + note
            )
            reply = [*conversation, {"role": "assistant", "content": step.text}]
            yield reply, "", status, rows, details, prompt.text + step.text

    def stop_message(self, stop: str, n_prompt: int, n_reply: int) -> str:
        context = self.loaded.context_length
        if stop == "eos":
            return f"Stopped at end-of-text after {n_reply} tokens (prompt {n_prompt} tokens)."
        if stop == "length":
            return f"Stopped at the max new tokens limit: {n_reply} tokens (prompt {n_prompt} tokens)."
        return warning(
            f"The context is full: {n_prompt} prompt + {n_reply} reply tokens = {context}, the most this model "
            "reads. Clear the chat (or shorten the prompt) to go on."
        )

    # --- inspect

    def inspect(self, text: str, layer: float, head: float):
        """(token boundaries, status, heatmap, token table, classifier labels, details)."""
        from apps.inspect_model import attention_map, classify, encode, token_pieces, token_probabilities

        loaded = self.loaded
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


def build_app(loaded) -> gr.Blocks:
    """The page for `loaded` (a apps.inspect_model.LoadedModel); other folders load from the page."""
    app = ModelApp(loaded)
    is_lm = loaded.kind == "causal-lm"
    with gr.Blocks(title="MiniGPT", analytics_enabled=False) as demo:
        gr.Markdown("# MiniGPT: chat with a saved model and watch it work")
        with gr.Row():
            folder = gr.Textbox(value=str(loaded.folder), label="Model folder", scale=5, elem_id="model-folder")
            load_button = gr.Button("Load", scale=1, elem_id="load")
        header = gr.Markdown(app.header(), elem_id="model-header")
        load_status = gr.Markdown(elem_id="load-status")
        last_text = gr.State("")

        with gr.Tab("Chat", visible=is_lm, elem_id="chat-tab") as chat_tab:
            chatbot = gr.Chatbot(
                label="Conversation", height=320, render_markdown=False, elem_id="chatbot", buttons=["copy"]
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
                layer = gr.Slider(0, max(loaded.n_layers - 1, 0), value=0, step=1, label="Layer")
                head = gr.Slider(0, max(loaded.n_heads - 1, 0), value=0, step=1, label="Head")
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
            app.load, folder, [header, load_status, layer, head, max_new, chat_tab, labels], api_name="load"
        )
        # A page opened after a Load shows the model now served, not the one the app started with.
        demo.load(
            lambda: (str(app.loaded.folder), app.header(), *app.control_updates()),
            None,
            [folder, header, layer, head, max_new, chat_tab, labels],
            api_visibility="private",
        )
        chat_inputs = [prompt, chatbot, temperature, top_k, top_p, max_new, seed]
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
            [text, layer, head],
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
    if args.model is None:
        print(f"{PROG}: error: --model is required (a folder written by save_pretrained)", file=sys.stderr)
        return 1
    from apps.inspect_model import load_for_app
    from tokenization.corpus import DataError

    try:
        loaded = load_for_app(args.model)
    except DataError as error:  # a ModelFolderError, or a tokenizer that does not load
        print(f"{PROG}: error: --model: {error}", file=sys.stderr)
        return 1
    print(f"{PROG} config: {asdict(args)}\n{loaded.describe()}")
    demo = build_app(loaded)
    demo.queue(default_concurrency_limit=1).launch(server_name=HOST, server_port=args.port, share=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
