"""What a saved model sees and why it picks each token: the library behind `apps/web.py`.

Plain functions, no web framework, so every number the app shows can be tested on its own:

    load_for_app(folder)                         -> LoadedModel (MiniGPT LM / classifier, stock GPT-2)
    token_pieces(tokenizer, ids)                 -> each token's id, vocabulary entry and UTF-8 bytes
    chat_prompt(tokenizer, history, message)     -> the ids the model reads, via the folder's chat template
    stream_generate(model, prompt_ids, settings) -> GenerationStep per new token, as it is produced
    token_probabilities(model, ids)              -> p(token | text before it) and the top-5 alternatives
    attention_map(model, tokenizer, text, l, h)  -> (tokens, [T, T] weights of one layer and head)
    classify(model, tokenizer, text)             -> label probabilities and the pooled token

Generation is a short loop over the model's KV cache rather than `generate(streamer=...)`: the
loop sees every step's logits, so each token comes out together with its probability and the
alternatives, with no thread and no waiting for the end (`generate` only hands back scores once
it has finished). It applies transformers' own temperature / top-k / top-p warpers in the order
`generate` does and draws with `torch.multinomial`, so with the same seed it picks the same
tokens as `model.generate(**settings.generate_kwargs())` (tests/apps/test_inspect_model.py checks it).
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast
from transformers.cache_utils import DynamicCache
from transformers.generation import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from modeling_minigpt import MiniGPTForSequenceClassification
from modeling_minigpt.visualize import attention_weights
from tokenization.load import check_tokenizer, load_tokenizer
from tokenization.pretokenize import readable, token_bytes
from training.saved.load import ModelFolderError, folder_task, load_model, model_class_for, read_model_config

TOP_K_ALTERNATIVES = 5


class ContextFullError(ValueError):
    """A prompt that leaves no room in the model's context window."""


# ----------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerFast
    folder: Path
    kind: Literal["causal-lm", "classifier"]

    @property
    def context_length(self) -> int:
        # attribute_map gives MiniGPT and GPT-2 configs the same standard name.
        return self.model.config.max_position_embeddings

    @property
    def n_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def n_heads(self) -> int:
        return self.model.config.num_attention_heads

    @property
    def labels(self) -> list[str]:
        id2label = self.model.config.id2label
        return [str(id2label[i]) for i in range(len(id2label))]

    def describe(self) -> str:
        """One line for the page header."""
        parameters = sum(p.numel() for p in self.model.parameters())
        what = "sequence classifier" if self.kind == "classifier" else "causal LM"
        template = "chat template" if self.tokenizer.chat_template else "no chat template (plain continuation)"
        return (
            f"{self.folder}: {type(self.model).__name__} ({what}), {parameters / 1e6:.2f}M parameters, "
            f"{self.n_layers} layers x {self.n_heads} heads, context {self.context_length} tokens, "
            f"vocabulary {len(self.tokenizer)}, {template}"
        )


def load_for_app(folder: str | Path) -> LoadedModel:
    """The model and tokenizer of a saved folder, in eval mode, with the package's own classes
    (`training.saved.load`: the head the folder was saved with; MiniGPT and GPT-2 only, since
    the views read their attention), and the tokenizer by the one rule of `tokenization.load`."""
    folder = Path(folder)
    task = folder_task(folder)
    if model_class_for(folder, task) is None:
        model_type = read_model_config(folder).get("model_type")
        raise ModelFolderError(
            f"{folder} holds model_type={model_type!r}; the app loads only MiniGPT and GPT-2 folders"
        )
    if not (folder / "tokenizer.json").is_file():
        raise ModelFolderError(
            f"{folder} has no tokenizer.json: save the tokenizer next to the model (tokenizer.save_pretrained)"
        )
    tokenizer = load_tokenizer(folder)
    extra = {}
    if model_class_for(folder, task) is GPT2LMHeadModel:
        # Stock GPT-2 returns no attention weights from its sdpa path.
        extra["attn_implementation"] = "eager"
    model = load_model(folder, task, **extra).eval()
    if isinstance(model, GPT2LMHeadModel):
        # `attention_weights` crops to `config.context_length`, which only MiniGPT's config defines.
        model.config.context_length = model.config.n_positions
    try:
        check_tokenizer(tokenizer, model.config.vocab_size)
    except ValueError as error:
        raise ModelFolderError(f"{folder}: {error}") from None
    kind = "classifier" if task == "sequence-classification" else "causal-lm"
    return LoadedModel(model=model, tokenizer=tokenizer, folder=folder, kind=kind)


# ----------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class TokenPiece:
    position: int
    id: int
    token: str  # the vocabulary entry (byte-level characters: 'Ġ' is a space)
    data: bytes  # the UTF-8 bytes it stands for; may be part of one character
    readable: str  # as a person reads it: '␣' space, '↵' newline, <XX> a byte that is not a whole character

    @property
    def hex(self) -> str:
        return self.data.hex(" ")


def token_pieces(tokenizer: PreTrainedTokenizerFast, ids: Sequence[int]) -> list[TokenPiece]:
    """Each token of `ids` with its vocabulary entry and the bytes it decodes to."""
    added = {i: token.content for i, token in tokenizer.added_tokens_decoder.items()}
    pieces = []
    for position, (token_id, token) in enumerate(zip(ids, tokenizer.convert_ids_to_tokens(list(ids)), strict=False)):
        if token_id in added:  # <|endoftext|> and friends are stored as plain text, not byte-level
            data, shown = added[token_id].encode("utf-8"), added[token_id]
        else:
            data, shown = token_bytes(token), readable(token)
        pieces.append(TokenPiece(position=position, id=int(token_id), token=token, data=data, readable=shown))
    return pieces


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """The ids `attention_weights` and `classify` run on, so every view of a text lines up."""
    return tokenizer(text)["input_ids"]


def check_fits(n_tokens: int, context_length: int, room: int = 0) -> None:
    """ContextFullError unless `n_tokens` plus `room` new ones fit in the context window."""
    if n_tokens + room > context_length:
        need = f"{n_tokens} tokens" + (f" plus {room} to generate" if room else "")
        raise ContextFullError(f"the text is {need}, but the model reads at most {context_length} tokens: shorten it")


# ----------------------------------------------------------------------------- chat prompts


@dataclass(frozen=True)
class ChatPrompt:
    text: str  # exactly what the model reads
    ids: list[int]
    note: str | None = None  # set when the conversation had to be shortened


def chat_prompt(
    tokenizer: PreTrainedTokenizerFast,
    history: Sequence[Mapping[str, str]],
    message: str,
    context_length: int | None = None,
    room: int = 0,
) -> ChatPrompt:
    """The model's input for `message` after `history` (messages with role and content).

    Rendered by the folder's own chat template (`apply_chat_template`, generation prompt added).
    With `context_length`, the oldest turns (a user message and the reply to it) are left out
    until the prompt leaves `room` tokens for the reply, or only the new message is left: a small
    model's context (128 tokens for the quickstart's) holds a turn or two, and a chat should go on
    with what fits rather than stop. The template renders what is kept as a conversation of its
    own (the Alpaca preamble before its first turn), in the format fine-tuning trained on.
    A template that takes a single turn refuses a longer conversation; then only the new message
    is sent. `note` says what was left out. A folder without a template continues `message` as
    plain text.
    """
    if not message.strip():
        raise ValueError("the prompt is empty: type a message first")
    if not tokenizer.chat_template:
        return ChatPrompt(message, tokenizer(message, add_special_tokens=False)["input_ids"])
    from jinja2 import TemplateError

    conversation = [{"role": m["role"], "content": m["content"]} for m in history]
    conversation.append({"role": "user", "content": message})
    try:
        prompt = _rendered(tokenizer, conversation)
    except TemplateError as error:
        if len(conversation) == 1:
            raise ValueError(f"the chat template refused the message: {error}") from None
        prompt = _rendered(tokenizer, conversation[-1:])
        note = f"this model's chat template takes one turn ({error}); earlier turns were not sent"
        return ChatPrompt(prompt.text, prompt.ids, note)
    dropped = 0
    while context_length is not None and len(prompt.ids) + room > context_length:
        shorter = _without_oldest_turn(conversation)
        if shorter is None:
            break
        conversation, dropped = shorter, dropped + 1
        prompt = _rendered(tokenizer, conversation)
    if not dropped:
        return prompt
    turns = "turn was" if dropped == 1 else f"{dropped} turns were"
    note = (
        f"the oldest {turns} left out of the prompt: the whole chat does not fit in the model's "
        f"{context_length} tokens with {room} left for the reply"
    )
    return ChatPrompt(prompt.text, prompt.ids, note)


def _rendered(tokenizer: PreTrainedTokenizerFast, conversation: list[dict[str, str]]) -> ChatPrompt:
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    # The template writes special tokens as text; encoding maps them back to their ids.
    return ChatPrompt(text, tokenizer(text, add_special_tokens=False)["input_ids"])


def _without_oldest_turn(conversation: list[dict[str, str]]) -> list[dict[str, str]] | None:
    """`conversation` without its first user message and the reply to it (a system message stays
    first); None when the new message, the last one, is all that is left to drop."""
    start = 1 if conversation[0]["role"] == "system" else 0
    for end in range(start, len(conversation) - 1):
        if conversation[end]["role"] == "assistant":
            return conversation[:start] + conversation[end + 1 :]
    return None


# ----------------------------------------------------------------------------- probabilities


@dataclass(frozen=True)
class TokenChoice:
    """One token and what the model thought of it, under its own distribution (temperature 1)."""

    id: int
    piece: str  # readable form
    probability: float
    alternatives: tuple[tuple[int, str, float], ...]  # the top-5 (id, piece, probability), best first


def choice_from_logits(tokenizer: PreTrainedTokenizerFast, logits: torch.Tensor, token_id: int) -> TokenChoice:
    """`token_id`'s probability and the top-5 alternatives from one position's logits [V]."""
    probs = torch.softmax(logits.float(), dim=-1)  # (V,)
    top = torch.topk(probs, min(TOP_K_ALTERNATIVES, probs.numel()))
    top_ids = top.indices.tolist()
    pieces = {p.id: p.readable for p in token_pieces(tokenizer, [token_id, *top_ids])}
    return TokenChoice(
        id=int(token_id),
        piece=pieces[token_id],
        probability=float(probs[token_id]),
        alternatives=tuple((i, pieces[i], float(p)) for i, p in zip(top_ids, top.values.tolist(), strict=False)),
    )


@torch.no_grad()
def token_probabilities(model, tokenizer: PreTrainedTokenizerFast, ids: Sequence[int]) -> list[TokenChoice]:
    """For tokens 1..T-1 of `ids`: its probability given the tokens before it, and the top-5."""
    input_ids = torch.tensor([list(ids)], device=model.device)
    logits = model(input_ids).logits[0]  # (T, V); row t predicts token t + 1
    return [choice_from_logits(tokenizer, logits[t - 1], ids[t]) for t in range(1, len(ids))]


# ----------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy (always the most probable token)
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max new tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be 0 (greedy) or positive, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top-k must be 0 (off) or positive, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top-p must be in (0, 1], got {self.top_p}")

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    def generate_kwargs(self) -> dict:
        """The `model.generate` arguments that pick the same tokens (after torch.manual_seed(seed))."""
        if not self.do_sample:
            return dict(max_new_tokens=self.max_new_tokens, do_sample=False)
        # top_k=0 must be explicit: generate's default is 50.
        return dict(
            max_new_tokens=self.max_new_tokens,
            do_sample=True,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
        )

    def warpers(self) -> LogitsProcessorList:
        """generate's sampling warpers for these settings, in generate's order."""
        warpers = LogitsProcessorList()
        if self.do_sample:
            if self.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k:
                warpers.append(TopKLogitsWarper(top_k=self.top_k))
            if self.top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p=self.top_p))
        return warpers


StopReason = Literal["eos", "length", "context"]


@dataclass(frozen=True)
class GenerationStep:
    choice: TokenChoice  # the new token
    text: str  # the whole reply so far, decoded (an unfinished last character is held back)
    stop: StopReason | None = None  # set on the last step: why generation ended


@torch.no_grad()
def stream_generate(
    model,
    tokenizer: PreTrainedTokenizerFast,
    prompt_ids: Sequence[int],
    settings: SamplingSettings,
    eos_token_id: int | None = None,
) -> Iterator[GenerationStep]:
    """New tokens one at a time, each as soon as it exists, reusing the KV cache.

    Stops at `eos_token_id` (included as the last step, like `generate`), after
    `settings.max_new_tokens`, or when prompt plus reply fill the context window (`stop` says
    which). A prompt with no room for one new token raises ContextFullError before any work.
    """
    context_length = model.config.max_position_embeddings
    if not prompt_ids:
        raise ValueError("the prompt is empty: type a message first")
    if len(prompt_ids) >= context_length:
        raise ContextFullError(
            f"the prompt is {len(prompt_ids)} tokens and the model's context is {context_length}: "
            "no room to generate; shorten the prompt (or clear the chat)"
        )
    warpers = settings.warpers()
    # A private generator: concurrent requests cannot disturb each other's random stream, and a
    # fresh CPU generator seeded with s draws what torch.manual_seed(s) would.
    generator = torch.Generator(device=model.device).manual_seed(settings.seed)
    input_ids = torch.tensor([list(prompt_ids)], device=model.device)  # (1, P), grows by one per step
    cache = DynamicCache(config=model.config)
    new_input = input_ids
    generated: list[int] = []
    special = set(tokenizer.all_special_ids)
    reply_bytes = b""
    budget = min(settings.max_new_tokens, context_length - len(prompt_ids))
    for step in range(budget):
        out = model(new_input, cache=cache, use_cache=True, logits_to_keep=1)
        cache = out.cache
        logits = out.logits[:, -1].float()  # (1, V), as generate takes them
        scores = warpers(input_ids, logits)
        if settings.do_sample:
            next_id = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1, generator=generator)  # (1, 1)
        else:
            next_id = scores.argmax(dim=-1, keepdim=True)  # (1, 1)
        token_id = int(next_id)
        generated.append(token_id)
        input_ids = torch.cat([input_ids, next_id], dim=-1)
        new_input = next_id

        stop: StopReason | None = None
        if token_id == eos_token_id:
            stop = "eos"
        elif step == budget - 1:
            stop = "length" if budget == settings.max_new_tokens else "context"
        if token_id not in special:
            reply_bytes += token_pieces(tokenizer, [token_id])[0].data
        text = tokenizer.decode(generated, skip_special_tokens=True)
        if stop is None and text.endswith("\ufffd") and _ends_mid_character(reply_bytes):
            text = text[:-1]  # the '\ufffd' of a character whose next bytes are still to come
        yield GenerationStep(choice=choice_from_logits(tokenizer, logits[0], token_id), text=text, stop=stop)
        if stop is not None:
            return


def _ends_mid_character(data: bytes) -> bool:
    """True when `data` ends with the first bytes of a UTF-8 character (decoding shows them as one
    '\ufffd' now, but the next token may complete them); False for whole or invalid bytes."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    decoder.decode(data, final=False)
    return bool(decoder.getstate()[0])  # the bytes it holds back


def eos_id(loaded: LoadedModel) -> int | None:
    """The id that ends a reply: the generation config's, else the tokenizer's."""
    eos = loaded.model.generation_config.eos_token_id
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return eos if eos is not None else loaded.tokenizer.eos_token_id


# ----------------------------------------------------------------------------- attention


def attention_map(
    model, tokenizer: PreTrainedTokenizerFast, text: str, layer: int, head: int
) -> tuple[list[str], torch.Tensor]:
    """Readable tokens of `text` and one head's attention weights [T, T] (row = query, column = key)."""
    ids = encode(tokenizer, text)
    if not ids:
        raise ValueError("the text is empty: nothing to inspect")
    check_fits(len(ids), model.config.max_position_embeddings)
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    if not (0 <= layer < n_layers and 0 <= head < n_heads):
        raise ValueError(f"layer {layer} / head {head} out of range: the model has {n_layers} layers x {n_heads} heads")
    _, weights = attention_weights(model, tokenizer, text)  # (n_layers, n_heads, T, T)
    return [p.readable for p in token_pieces(tokenizer, ids)], weights[layer, head]


# ----------------------------------------------------------------------------- classification


@dataclass(frozen=True)
class Classification:
    probabilities: dict[str, float]  # label -> probability, in label order
    pooled_position: int  # the token whose hidden state the head reads
    pooled_piece: str


@torch.no_grad()
def classify(model: MiniGPTForSequenceClassification, tokenizer: PreTrainedTokenizerFast, text: str) -> Classification:
    """Label probabilities for `text`, and which token the classification head pooled."""
    ids = encode(tokenizer, text)
    if not ids:
        raise ValueError("the text is empty: nothing to classify")
    check_fits(len(ids), model.config.max_position_embeddings)
    input_ids = torch.tensor([ids], device=model.device)
    mask = torch.ones_like(input_ids)
    # With an all-ones mask the model pools the last real token: position T - 1.
    probs = torch.softmax(model(input_ids, attention_mask=mask).logits[0].float(), dim=-1)
    id2label = model.config.id2label
    pooled = len(ids) - 1
    return Classification(
        probabilities={str(id2label[i]): float(p) for i, p in enumerate(probs.tolist())},
        pooled_position=pooled,
        pooled_piece=token_pieces(tokenizer, ids)[pooled].readable,
    )
