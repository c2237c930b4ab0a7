"""Weights between Hugging Face's `GPT2LMHeadModel` and `MiniGPTForCausalLM`, both ways.

The two models compute the same function; only names and layouts differ:

| GPT-2 (`transformer.` prefix)  | MiniGPT (`model.` prefix)                         | layout          |
|--------------------------------|---------------------------------------------------|-----------------|
| wte, wpe                       | tok_emb, pos_emb                                  | same            |
| h.i.ln_1, h.i.ln_2             | trf_blocks.i.norm1, trf_blocks.i.norm2            | same            |
| h.i.attn.c_attn  (C, 3C)       | trf_blocks.i.att.W_query / W_key / W_value        | split, transpose|
| h.i.attn.c_proj                | trf_blocks.i.att.out_proj                         | transpose       |
| h.i.mlp.c_fc, h.i.mlp.c_proj   | trf_blocks.i.ff.fc_in, trf_blocks.i.ff.fc_out     | transpose       |
| ln_f                           | final_norm                                        | same            |
| lm_head (tied to wte)          | lm_head (tied to tok_emb)                         | same            |

GPT-2's linear layers are `Conv1D`s, which store the weight as (in, out); `nn.Linear` stores
(out, in), hence the transposes. GPT-2's "gelu_new" is the tanh approximation of GELU, which
is what MiniGPT's feed-forward computes.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PretrainedConfig
from transformers.initialization import no_init_weights

from .configuration_minigpt import MiniGPTConfig
from .modeling_minigpt import MiniGPTForCausalLM

StateDict = Mapping[str, torch.Tensor]

# Per-block tensors that are only renamed; True marks Conv1D weights, which are transposed.
_BLOCK_RENAMES: list[tuple[str, str, bool]] = [
    ("ln_1.weight", "norm1.weight", False),
    ("ln_1.bias", "norm1.bias", False),
    ("attn.c_proj.weight", "att.out_proj.weight", True),
    ("attn.c_proj.bias", "att.out_proj.bias", False),
    ("ln_2.weight", "norm2.weight", False),
    ("ln_2.bias", "norm2.bias", False),
    ("mlp.c_fc.weight", "ff.fc_in.weight", True),
    ("mlp.c_fc.bias", "ff.fc_in.bias", False),
    ("mlp.c_proj.weight", "ff.fc_out.weight", True),
    ("mlp.c_proj.bias", "ff.fc_out.bias", False),
]
_TOP_RENAMES: list[tuple[str, str]] = [
    ("transformer.wte.weight", "model.tok_emb.weight"),
    ("transformer.wpe.weight", "model.pos_emb.weight"),
    ("transformer.ln_f.weight", "model.final_norm.weight"),
    ("transformer.ln_f.bias", "model.final_norm.bias"),
]
_QKV = ("W_query", "W_key", "W_value")  # the order of the three blocks inside c_attn
# Old GPT-2 checkpoints carry their causal mask as a buffer; today's GPT-2 ignores it too.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# Both names compute 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), MiniGPT's activation.
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


def gpt2_module_names_to_minigpt(names: list[str]) -> list[str] | None:
    """GPT-2 module names as PEFT writes them ("c_attn", "mlp.c_proj", "ln_f"; a bare "c_proj"
    names both projections) -> MiniGPT's names for the same layers ("att.W_query", "ff.fc_out",
    "final_norm"), from the renaming tables above. None if a name matches no module."""
    modules: dict[str, list[str]] = {"attn.c_attn": [f"att.{name}" for name in _QKV]}
    for theirs, ours, _ in _BLOCK_RENAMES:  # parameter names -> the names of their modules
        modules[theirs.rsplit(".", 1)[0]] = [ours.rsplit(".", 1)[0]]
    for theirs, ours in _TOP_RENAMES:
        modules[theirs.removeprefix("transformer.").rsplit(".", 1)[0]] = [ours.removeprefix("model.").rsplit(".", 1)[0]]
    out = []
    for name in names:
        # PEFT matches a name against the end of a module's dotted path.
        matches = [m for theirs, ours in modules.items() if f".{theirs}".endswith(f".{name}") for m in ours]
        if not matches:
            return None
        out += matches
    return out


# ----------------------------------------------------------------------------- configs


def gpt2_config_to_minigpt(gpt2_config: GPT2Config) -> MiniGPTConfig:
    """The MiniGPT config computing the same function; ValueError for GPT-2 options it lacks."""
    unsupported = {
        "activation_function": (gpt2_config.activation_function not in _TANH_GELUS, f"one of {_TANH_GELUS}"),
        "n_inner": (gpt2_config.n_inner not in (None, 4 * gpt2_config.n_embd), f"None or {4 * gpt2_config.n_embd}"),
        "scale_attn_weights": (not gpt2_config.scale_attn_weights, "True"),
        "scale_attn_by_inverse_layer_idx": (gpt2_config.scale_attn_by_inverse_layer_idx, "False"),
        "add_cross_attention": (gpt2_config.add_cross_attention, "False"),
    }
    for name, (bad, wanted) in unsupported.items():
        if bad:
            raise ValueError(
                f"GPT2Config.{name}={getattr(gpt2_config, name)!r} has no MiniGPT equivalent (needs {wanted})"
            )
    return MiniGPTConfig(
        vocab_size=gpt2_config.vocab_size,
        context_length=gpt2_config.n_positions,
        emb_dim=gpt2_config.n_embd,
        n_heads=gpt2_config.n_head,
        n_layers=gpt2_config.n_layer,
        drop_rate=_one_drop_rate(gpt2_config),
        qkv_bias=True,
        layer_norm_eps=gpt2_config.layer_norm_epsilon,
        initializer_range=gpt2_config.initializer_range,
        tie_word_embeddings=gpt2_config.tie_word_embeddings,
        use_cache=gpt2_config.use_cache,
        bos_token_id=gpt2_config.bos_token_id,
        eos_token_id=gpt2_config.eos_token_id,
        pad_token_id=gpt2_config.pad_token_id,
    )


def _one_drop_rate(gpt2_config: GPT2Config) -> float:
    """MiniGPT has one dropout rate where GPT-2 has three; take the residual one if they differ."""
    rates = {name: float(getattr(gpt2_config, name)) for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    if len(set(rates.values())) > 1:
        warnings.warn(
            f"GPT-2 dropout rates differ ({rates}); MiniGPT has one drop_rate and uses "
            f"resid_pdrop={rates['resid_pdrop']}. Inference is unaffected.",
            stacklevel=3,
        )
    return rates["resid_pdrop"]


def minigpt_config_to_gpt2(config: MiniGPTConfig) -> GPT2Config:
    """The stock GPT2Config computing the same function (qkv_bias=False exports zero biases)."""
    return GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.context_length,
        n_embd=config.emb_dim,
        n_layer=config.n_layers,
        n_head=config.n_heads,
        activation_function="gelu_new",  # what every released GPT-2 config says
        resid_pdrop=config.drop_rate,
        embd_pdrop=config.drop_rate,
        attn_pdrop=config.drop_rate,
        layer_norm_epsilon=config.layer_norm_eps,
        initializer_range=config.initializer_range,
        tie_word_embeddings=config.tie_word_embeddings,
        use_cache=config.use_cache,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )


# ----------------------------------------------------------------------------- state dicts


def expected_gpt2_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a `GPT2LMHeadModel` with this config loads."""
    C, L = config.n_embd, config.n_layer
    shapes = {
        "transformer.wte.weight": (config.vocab_size, C),
        "transformer.wpe.weight": (config.n_positions, C),
        "transformer.ln_f.weight": (C,),
        "transformer.ln_f.bias": (C,),
    }
    block = {
        "ln_1.weight": (C,),
        "ln_1.bias": (C,),
        "attn.c_attn.weight": (C, 3 * C),  # Conv1D: (in, out)
        "attn.c_attn.bias": (3 * C,),
        "attn.c_proj.weight": (C, C),
        "attn.c_proj.bias": (C,),
        "ln_2.weight": (C,),
        "ln_2.bias": (C,),
        "mlp.c_fc.weight": (C, 4 * C),
        "mlp.c_fc.bias": (4 * C,),
        "mlp.c_proj.weight": (4 * C, C),
        "mlp.c_proj.bias": (C,),
    }
    for i in range(L):
        shapes.update({f"transformer.h.{i}.{name}": shape for name, shape in block.items()})
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, C)
    return shapes


def check_gpt2_state_dict(state_dict: StateDict, config: GPT2Config) -> None:
    """ValueError naming every missing, unexpected or misshapen tensor (all of them at once)."""
    expected = expected_gpt2_shapes(config)
    problems = [f"{name}: missing" for name in expected if name not in state_dict]
    for name, tensor in state_dict.items():
        if name in expected:
            if tuple(tensor.shape) != expected[name]:
                problems.append(f"{name}: expected {expected[name]}, got {tuple(tensor.shape)}")
        elif name != "lm_head.weight" and not name.endswith(_IGNORED_SUFFIXES):
            problems.append(f"{name}: unexpected tensor (not part of GPT2LMHeadModel)")
    if problems:
        raise ValueError(
            f"GPT-2 weights do not fit a GPT-2 with n_embd={config.n_embd}, n_layer={config.n_layer}, "
            f"vocab_size={config.vocab_size}, n_positions={config.n_positions}:\n  " + "\n  ".join(problems)
        )


def gpt2_state_dict_to_minigpt(
    state_dict: StateDict, n_layers: int, tie_word_embeddings: bool
) -> dict[str, torch.Tensor]:
    """Rename, transpose and split a checked GPT-2 state dict into MiniGPT's names."""
    out = {ours: state_dict[theirs] for theirs, ours in _TOP_RENAMES}
    for i in range(n_layers):
        theirs, ours = f"transformer.h.{i}.", f"model.trf_blocks.{i}."
        for their_name, our_name, conv1d in _BLOCK_RENAMES:
            tensor = state_dict[theirs + their_name]
            out[ours + our_name] = tensor.t() if conv1d else tensor
        # c_attn computes [q | k | v] in one (C, 3C) matmul: split the output columns.
        weights = state_dict[theirs + "attn.c_attn.weight"].t().chunk(3, dim=0)  # 3 x (C, C), (out, in)
        biases = state_dict[theirs + "attn.c_attn.bias"].chunk(3, dim=0)  # 3 x (C,)
        for name, weight, bias in zip(_QKV, weights, biases, strict=True):
            out[f"{ours}att.{name}.weight"] = weight
            out[f"{ours}att.{name}.bias"] = bias
    tied = tie_word_embeddings or "lm_head.weight" not in state_dict
    out["lm_head.weight"] = state_dict["transformer.wte.weight" if tied else "lm_head.weight"]
    return out


def minigpt_state_dict_to_gpt2(state_dict: StateDict, config: MiniGPTConfig) -> dict[str, torch.Tensor]:
    """The inverse of `gpt2_state_dict_to_minigpt`; missing q/k/v biases become zeros."""
    out = {theirs: state_dict[ours] for theirs, ours in _TOP_RENAMES}
    for i in range(config.n_layers):
        theirs, ours = f"transformer.h.{i}.", f"model.trf_blocks.{i}."
        for their_name, our_name, conv1d in _BLOCK_RENAMES:
            tensor = state_dict[ours + our_name]
            out[theirs + their_name] = tensor.t() if conv1d else tensor
        weights = [state_dict[f"{ours}att.{name}.weight"] for name in _QKV]  # 3 x (C, C), (out, in)
        out[theirs + "attn.c_attn.weight"] = torch.cat(weights, dim=0).t()  # (C, 3C), (in, out)
        if config.qkv_bias:
            biases = [state_dict[f"{ours}att.{name}.bias"] for name in _QKV]
        else:
            biases = [torch.zeros_like(weights[0][:, 0])] * 3
        out[theirs + "attn.c_attn.bias"] = torch.cat(biases)
    out["lm_head.weight"] = state_dict["lm_head.weight"]
    return out


def _with_base_prefix(state_dict: StateDict) -> StateDict:
    """Accept `GPT2Model` state dicts too (no `transformer.` prefix) by adding the prefix."""
    if "transformer.wte.weight" in state_dict or "wte.weight" not in state_dict:
        return state_dict
    return {name if name == "lm_head.weight" else f"transformer.{name}": t for name, t in state_dict.items()}


def infer_gpt2_config(state_dict: StateDict, n_heads: int | None = None) -> GPT2Config:
    """A GPT2Config read off the tensor shapes; heads cannot be seen, so default to 64 per head."""
    if "transformer.wte.weight" not in state_dict or "transformer.wpe.weight" not in state_dict:
        raise ValueError("not a GPT-2 state dict: transformer.wte.weight / transformer.wpe.weight missing")
    vocab_size, emb_dim = state_dict["transformer.wte.weight"].shape
    n_layers = sum(name.startswith("transformer.h.") and name.endswith(".ln_1.weight") for name in state_dict)
    # An lm_head equal to wte (or absent) is the tied head every released GPT-2 has.
    head = state_dict.get("lm_head.weight")
    tied = head is None or torch.equal(head, state_dict["transformer.wte.weight"])
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=state_dict["transformer.wpe.weight"].shape[0],
        n_embd=emb_dim,
        n_layer=n_layers,
        n_head=n_heads if n_heads is not None else max(emb_dim // 64, 1),
        tie_word_embeddings=tied,
    )


# ----------------------------------------------------------------------------- models


def _require_model_type(folder: str | os.PathLike, expected: str) -> None:
    """`from_pretrained` only warns when a folder holds another architecture, then fills every
    tensor whose name does not match with random values: refuse such a folder up front."""
    found = PretrainedConfig.get_config_dict(folder)[0].get("model_type")
    if found != expected:
        raise ValueError(f"{folder} holds a model_type={found!r} model, expected {expected!r}")


def _build_uninitialised(model_class: type, config):
    """`model_class(config)` without the random initialisation (slow at 1.5B parameters); the
    caller overwrites every parameter. `no_init_weights` also skips the tying, so tie here."""
    with no_init_weights():
        model = model_class(config)
    model.tie_weights()
    return model


def gpt2_to_minigpt(
    gpt2_model_or_state_dict: GPT2LMHeadModel | StateDict | str | os.PathLike,
    config: GPT2Config | None = None,
    *,
    n_heads: int | None = None,
) -> MiniGPTForCausalLM:
    """A MiniGPTForCausalLM computing the same logits as the given GPT-2, in its dtype.

    Accepts a `GPT2LMHeadModel`, a folder `GPT2LMHeadModel.from_pretrained` can read, or a state
    dict (of `GPT2LMHeadModel` or `GPT2Model`). A state dict without `config` has its shapes read
    off the tensors; the head count is then `n_heads`, or emb_dim // 64 (true of every GPT-2).
    """
    source = gpt2_model_or_state_dict
    if isinstance(source, (str, os.PathLike)):
        _require_model_type(source, GPT2Config.model_type)
        source = GPT2LMHeadModel.from_pretrained(source)
    if isinstance(source, GPT2LMHeadModel):
        config, state_dict = source.config, source.state_dict()
    elif isinstance(source, Mapping):
        state_dict = _with_base_prefix(source)
        config = config if config is not None else infer_gpt2_config(state_dict, n_heads)
    else:
        raise ValueError(f"expected a GPT2LMHeadModel, a state dict or a folder path, got {type(source).__name__}")
    if n_heads is not None and n_heads != config.n_head:
        raise ValueError(f"n_heads={n_heads} contradicts the GPT-2 config's n_head={config.n_head}")

    minigpt_config = gpt2_config_to_minigpt(config)
    check_gpt2_state_dict(state_dict, config)
    dtype = state_dict["transformer.wte.weight"].dtype
    model = _build_uninitialised(MiniGPTForCausalLM, minigpt_config)
    converted = gpt2_state_dict_to_minigpt(state_dict, minigpt_config.n_layers, minigpt_config.tie_word_embeddings)
    model.to(dtype).load_state_dict(converted, strict=True)
    return model.eval()


def minigpt_to_gpt2(model: MiniGPTForCausalLM | str | os.PathLike) -> GPT2LMHeadModel:
    """A stock `GPT2LMHeadModel` computing the same logits as `model` (or a saved MiniGPT folder), in its dtype."""
    if isinstance(model, (str, os.PathLike)):
        _require_model_type(model, MiniGPTConfig.model_type)
        model = MiniGPTForCausalLM.from_pretrained(model)
    if not isinstance(model, MiniGPTForCausalLM):
        raise ValueError(f"expected a MiniGPTForCausalLM, got {type(model).__name__}")
    gpt2_config = minigpt_config_to_gpt2(model.config)
    state_dict = model.state_dict()
    gpt2 = _build_uninitialised(GPT2LMHeadModel, gpt2_config)
    converted = minigpt_state_dict_to_gpt2(state_dict, model.config)
    gpt2.to(state_dict["model.tok_emb.weight"].dtype).load_state_dict(converted, strict=True)
    return gpt2.eval()
