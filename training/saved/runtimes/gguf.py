"""GGUF for llama.cpp, Ollama and LM Studio: a MiniGPT written as llama.cpp's GPT-2 architecture.

MiniGPT computes GPT-2's function (pre-LayerNorm blocks, learned positions, tanh GELU, a tied
head), so unmodified llama.cpp runs it as `general.architecture = "gpt2"`. The tensors take the
names of the `gguf` package's own tables (`gguf.MODEL_TENSORS[MODEL_ARCH.GPT2]`, `TENSOR_NAMES`):

| GGUF name (llama.cpp)          | MiniGPT                                     | note                        |
|--------------------------------|---------------------------------------------|-----------------------------|
| token_embd, position_embd      | model.tok_emb, model.pos_emb                |                             |
| blk.i.attn_norm, blk.i.ffn_norm | trf_blocks.i.norm1, norm2 (weight, bias)   |                             |
| blk.i.attn_qkv                 | W_query, W_key, W_value stacked: (3C, C)    | zero biases if qkv_bias off |
| blk.i.attn_output              | att.out_proj                                |                             |
| blk.i.ffn_up, blk.i.ffn_down   | ff.fc_in, ff.fc_out                         |                             |
| output_norm, output            | model.final_norm, lm_head                   | output written even if tied |

A torch (out, in) weight is a GGUF tensor of ggml shape [in, out], what llama.cpp's
`ggml_mul_mat` expects, so nothing is transposed. `output` is written although GPT-2 ties it to
the embedding: recent llama.cpp would fall back to `token_embd`, but writing it keeps older
builds (and Ollama's vendored copy) loading the file.

Types: f32, f16, or q8_0 (blocks of 32 weights sharing one fp16 scale; `gguf.quants.quantize`,
the package's reference implementation of ggml's format). As llama.cpp's converter does, only
matrices are converted; biases and LayerNorm parameters stay f32, and so does `position_embd`
(added to every token, and small). A matrix whose rows are not a multiple of the block size stays
f16 (q8_0 needs whole blocks).

The tokenizer travels in the metadata: `tokenizer.ggml.model = "gpt2"` (byte-level BPE), the
tokens in the byte-to-unicode form tokenizers stores, the merges, a type per token (special
added tokens are CONTROL), bos/eos/pad ids, and `tokenizer.ggml.pre = "gpt-2"`: our trained BPE
splits words with GPT-2's regex, and llama.cpp picks its pre-tokenizer from this name (its own
converter recognises only tokenizers whose hash it knows). The chat template goes in
`tokenizer.chat_template`, without the `{% generation %}` markers (a transformers extension for
assistant masks that other Jinja engines do not parse; they render nothing).

Ollama reads its prompt format from a `Modelfile`, written next to the GGUF: the Alpaca prompt of
`tokenization/alpaca.py` as Ollama's Go template, and the eos token as a stop sequence.
`ollama create NAME -f Modelfile` needs nothing else.

`read_gguf` reads a file back into a MiniGPT (dequantizing with `gguf.quants.dequantize`): the
round trip test, and how the effect of q8_0 on perplexity is measured in PyTorch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import gguf
import numpy as np
import torch
from gguf import MODEL_ARCH, MODEL_TENSOR, GGMLQuantizationType, LlamaFileType, TokenType
from transformers import PreTrainedTokenizerBase

from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM
from tokenization.alpaca import ALPACA_TEMPLATE

from . import building

GGUFType = Literal["f32", "f16", "q8_0"]
GGUF_FILE = "model.gguf"
MODELFILE = "Modelfile"
ARCH = gguf.MODEL_ARCH_NAMES[MODEL_ARCH.GPT2]  # "gpt2"
# The GGUF type of the matrices, and the file type llama.cpp reports for the whole file.
MATRIX_TYPES: dict[str, GGMLQuantizationType] = {
    "f32": GGMLQuantizationType.F32,
    "f16": GGMLQuantizationType.F16,
    "q8_0": GGMLQuantizationType.Q8_0,
}
FILE_TYPES: dict[str, LlamaFileType] = {
    "f32": LlamaFileType.ALL_F32,
    "f16": LlamaFileType.MOSTLY_F16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0,
}
# Kept f32 whatever the type: position embeddings, like llama.cpp's own converter.
KEEP_F32 = (MODEL_TENSOR.POS_EMBD,)
# `{% generation %}` / `{% endgeneration %}` as ALPACA_CHAT_TEMPLATE writes them.
GENERATION_MARKERS = ("{%- generation -%}", "{%- endgeneration -%}")


def _name(tensor: MODEL_TENSOR, suffix: str, block: int | None = None) -> str:
    """llama.cpp's name of `tensor` (from the gguf package's table), e.g. blk.3.attn_qkv.weight."""
    if tensor not in gguf.MODEL_TENSORS[MODEL_ARCH.GPT2]:
        raise AssertionError(f"{tensor} is not a tensor of llama.cpp's GPT-2")
    base = gguf.TENSOR_NAMES[tensor]
    return f"{base.format(bid=block) if block is not None else base}.{suffix}"


def gguf_tensors(model: MiniGPTForCausalLM) -> dict[str, tuple[MODEL_TENSOR, torch.Tensor]]:
    """GGUF name -> (its kind, the fp32 tensor), in llama.cpp's GPT-2 layout (see the module table)."""
    base, C = model.model, model.config.emb_dim
    tensors: dict[str, tuple[MODEL_TENSOR, torch.Tensor]] = {}

    def put(kind: MODEL_TENSOR, module: torch.nn.Module, block: int | None = None) -> None:
        tensors[_name(kind, "weight", block)] = (kind, module.weight)
        if getattr(module, "bias", None) is not None:
            tensors[_name(kind, "bias", block)] = (kind, module.bias)

    put(MODEL_TENSOR.TOKEN_EMBD, base.tok_emb)
    put(MODEL_TENSOR.POS_EMBD, base.pos_emb)
    for i, block in enumerate(base.trf_blocks):
        att = block.att
        put(MODEL_TENSOR.ATTN_NORM, block.norm1, i)
        qkv = torch.cat([att.W_query.weight, att.W_key.weight, att.W_value.weight])  # (3C, C), (out, in)
        tensors[_name(MODEL_TENSOR.ATTN_QKV, "weight", i)] = (MODEL_TENSOR.ATTN_QKV, qkv)
        # llama.cpp's GPT-2 always adds a q/k/v bias: zeros compute the same as none.
        biases = [m.bias if m.bias is not None else torch.zeros(C) for m in (att.W_query, att.W_key, att.W_value)]
        tensors[_name(MODEL_TENSOR.ATTN_QKV, "bias", i)] = (MODEL_TENSOR.ATTN_QKV, torch.cat(biases))
        put(MODEL_TENSOR.ATTN_OUT, att.out_proj, i)
        put(MODEL_TENSOR.FFN_NORM, block.norm2, i)
        put(MODEL_TENSOR.FFN_UP, block.ff.fc_in, i)
        put(MODEL_TENSOR.FFN_DOWN, block.ff.fc_out, i)
    put(MODEL_TENSOR.OUTPUT_NORM, base.final_norm)
    tensors[_name(MODEL_TENSOR.OUTPUT, "weight")] = (MODEL_TENSOR.OUTPUT, model.lm_head.weight)
    return {name: (kind, t.detach().float().contiguous()) for name, (kind, t) in tensors.items()}


def tensor_type(kind: MODEL_TENSOR, tensor: torch.Tensor, gguf_type: GGUFType) -> GGMLQuantizationType:
    """The GGUF type one tensor is stored in (see the module docstring)."""
    if tensor.dim() < 2 or kind in KEEP_F32:
        return GGMLQuantizationType.F32
    wanted = MATRIX_TYPES[gguf_type]
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    if tensor.shape[-1] % block != 0:
        return GGMLQuantizationType.F16
    return wanted


def tokenizer_metadata(tokenizer: PreTrainedTokenizerBase) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, their llama.cpp token types, merges as "left right") of a byte-level BPE."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if backend["model"]["type"] != "BPE" or backend.get("pre_tokenizer", {}).get("type") not in (
        "ByteLevel",
        "Sequence",
    ):
        raise ValueError(
            f"GGUF export writes byte-level BPE tokenizers (GPT-2's kind); this one is {backend['model']['type']}"
        )
    vocab = tokenizer.get_vocab()
    by_id = {i: token for token, i in vocab.items()}
    if sorted(by_id) != list(range(len(tokenizer))):
        raise ValueError(
            f"the tokenizer's ids are not 0..{len(tokenizer) - 1} without gaps; GGUF needs one token per id"
        )
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(len(tokenizer)):
        tokens.append(by_id[i])
        if i in added:
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    return tokens, [int(t) for t in types], merges


def gguf_chat_template(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The tokenizer's chat template without transformers' generation markers (None if it has none)."""
    template = tokenizer.chat_template
    if not isinstance(template, str):
        return None
    for marker in GENERATION_MARKERS:
        template = template.replace(marker, "")
    return template


def write_gguf(
    model: MiniGPTForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    path: str | os.PathLike[str],
    gguf_type: GGUFType,
    name: str,
) -> Path:
    """Write `model` and `tokenizer` to the GGUF file `path` (see the module docstring)."""
    if gguf_type not in MATRIX_TYPES:
        raise ValueError(f"--gguf_type must be one of {', '.join(MATRIX_TYPES)}, got {gguf_type!r}")
    config = model.config
    tokens, types, merges = tokenizer_metadata(tokenizer)
    writer = gguf.GGUFWriter(path, ARCH)
    writer.add_name(name)
    writer.add_file_type(FILE_TYPES[gguf_type])
    if gguf_type == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.emb_dim)
    writer.add_feed_forward_length(4 * config.emb_dim)
    writer.add_block_count(config.n_layers)
    writer.add_head_count(config.n_heads)
    writer.add_layer_norm_eps(config.layer_norm_eps)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token_id, add in (
        (tokenizer.bos_token_id, writer.add_bos_token_id),
        (tokenizer.eos_token_id, writer.add_eos_token_id),
        (tokenizer.pad_token_id, writer.add_pad_token_id),
    ):
        if token_id is not None:
            add(token_id)
    # GPT-2 style: prompts are not prefixed with bos (our training and generate() add nothing).
    writer.add_add_bos_token(False)
    template = gguf_chat_template(tokenizer)
    if template is not None:
        writer.add_chat_template(template)

    for tensor_name, (kind, tensor) in gguf_tensors(model).items():
        qtype = tensor_type(kind, tensor, gguf_type)
        data = gguf.quants.quantize(tensor.numpy(), qtype)
        writer.add_tensor(tensor_name, data, raw_dtype=qtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def _go_string(text: str) -> str:
    """`text` as a Go template string literal (JSON escaping is Go's too)."""
    return json.dumps(text)


def modelfile_text(tokenizer: PreTrainedTokenizerBase, context_length: int) -> str:
    """An Ollama Modelfile: FROM the GGUF beside it, the Alpaca prompt as TEMPLATE, stop sequences.

    The template renders exactly `tokenization.alpaca.format_prompt(prompt)` (a system message
    replaces the preamble, as in the chat template); an Alpaca `input` goes inside the prompt.
    """
    instruction = ALPACA_TEMPLATE["instruction"].replace("{instruction}", "{{ .Prompt }}")
    template = (
        "{{ if .System }}{{ .System }}{{ else }}"
        + "{{ "
        + _go_string(ALPACA_TEMPLATE["preamble"])
        + " }}{{ end }}"
        + instruction
        + ALPACA_TEMPLATE["response"]
        + "{{ .Response }}"
    )
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    # A model that keeps going after its answer starts the next Alpaca section: stop there too.
    stops.append(ALPACA_TEMPLATE["instruction"].split("\n")[-2])
    lines = [
        f"FROM ./{GGUF_FILE}",
        f'TEMPLATE """{template}"""',
        *(f"PARAMETER stop {json.dumps(stop)}" for stop in stops),
        f"PARAMETER num_ctx {context_length}",
    ]
    return "\n".join(lines) + "\n"


def export_gguf(
    model: MiniGPTForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | os.PathLike[str],
    gguf_type: GGUFType = "f32",
    name: str = "minigpt",
) -> Path:
    """`out_dir`/model.gguf and `out_dir`/Modelfile, written atomically; returns `out_dir`."""
    if gguf_type not in MATRIX_TYPES:
        raise ValueError(f"--gguf_type must be one of {', '.join(MATRIX_TYPES)}, got {gguf_type!r}")
    with building(out_dir) as staging:
        write_gguf(model, tokenizer, staging / GGUF_FILE, gguf_type, name)
        (staging / MODELFILE).write_text(modelfile_text(tokenizer, model.config.context_length), encoding="utf-8")
        for path in staging.iterdir():
            path.chmod(0o644)
    return Path(out_dir)


# ----------------------------------------------------------------------------- reading back


def gguf_fields(reader: gguf.GGUFReader) -> dict[str, object]:
    """Every metadata field of a GGUF file, by key, as Python values."""
    return {key: field.contents() for key, field in reader.fields.items()}


def read_gguf(path: str | os.PathLike[str]) -> MiniGPTForCausalLM:
    """The MiniGPT a GGUF file written by `write_gguf` holds, with every tensor dequantized to fp32
    by the gguf package; the inverse of `gguf_tensors`."""
    reader = gguf.GGUFReader(path)
    fields = gguf_fields(reader)
    if fields.get("general.architecture") != ARCH:
        raise ValueError(f"{path} holds a {fields.get('general.architecture')!r} model, not {ARCH!r}")
    weights = {}
    for tensor in reader.tensors:
        # ggml lists dimensions innermost first: reverse them for torch's (out, in).
        shape = tuple(int(d) for d in reversed(tensor.shape))
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        weights[tensor.name] = torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape)
    C = int(fields[f"{ARCH}.embedding_length"])
    config = MiniGPTConfig(
        vocab_size=weights["token_embd.weight"].shape[0],
        context_length=int(fields[f"{ARCH}.context_length"]),
        emb_dim=C,
        n_heads=int(fields[f"{ARCH}.attention.head_count"]),
        n_layers=int(fields[f"{ARCH}.block_count"]),
        layer_norm_eps=float(fields[f"{ARCH}.attention.layer_norm_epsilon"]),
        drop_rate=0.0,
        qkv_bias=True,
        tie_word_embeddings=False,
        eos_token_id=fields.get("tokenizer.ggml.eos_token_id"),
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        pad_token_id=fields.get("tokenizer.ggml.padding_token_id"),
    )
    model = MiniGPTForCausalLM(config)
    state = {
        "model.tok_emb.weight": weights["token_embd.weight"],
        "model.pos_emb.weight": weights["position_embd.weight"],
        "model.final_norm.weight": weights["output_norm.weight"],
        "model.final_norm.bias": weights["output_norm.bias"],
        "lm_head.weight": weights["output.weight"],
    }
    renames = {
        "attn_norm": "norm1",
        "attn_output": "att.out_proj",
        "ffn_norm": "norm2",
        "ffn_up": "ff.fc_in",
        "ffn_down": "ff.fc_out",
    }
    for i in range(config.n_layers):
        for theirs, ours in renames.items():
            for suffix in ("weight", "bias"):
                state[f"model.trf_blocks.{i}.{ours}.{suffix}"] = weights[f"blk.{i}.{theirs}.{suffix}"]
        for suffix in ("weight", "bias"):
            parts = weights[f"blk.{i}.attn_qkv.{suffix}"].chunk(3, dim=0)
            for name, part in zip(("W_query", "W_key", "W_value"), parts, strict=True):
                state[f"model.trf_blocks.{i}.att.{name}.{suffix}"] = part
    model.load_state_dict(state, strict=True)
    return model.eval()
