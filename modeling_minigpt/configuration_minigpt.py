"""MiniGPT configuration: the book's GPT_CONFIG dict as a typed Hugging Face config.

The field names follow "Build a Large Language Model (From Scratch)" (`emb_dim`, `n_heads`,
...); `attribute_map` exposes them under the standard names too, because `generate()` sizes its
KV cache from `num_hidden_layers` and other HF tooling reads `hidden_size`.

Declared the transformers 5 way: each field is a typed class attribute with its default (the base
class turns the class into a dataclass, so `MiniGPTConfig(emb_dim=256)` and `from_pretrained`
fill them), and every invariant is checked in one hook, `validate_architecture`.
"""

from __future__ import annotations

import json

from transformers import PretrainedConfig

# Presets are plain data. GPT-2's four sizes use its real settings (50257-token vocabulary,
# 1024 positions, qkv bias, tied head); "tiny" is for tests and CPU runs.
PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=50257, context_length=128, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0),
    "gpt2-small": dict(vocab_size=50257, context_length=1024, emb_dim=768, n_heads=12, n_layers=12),  # 124M
    "gpt2-medium": dict(vocab_size=50257, context_length=1024, emb_dim=1024, n_heads=16, n_layers=24),  # 355M
    "gpt2-large": dict(vocab_size=50257, context_length=1024, emb_dim=1280, n_heads=20, n_layers=36),  # 774M
    "gpt2-xl": dict(vocab_size=50257, context_length=1024, emb_dim=1600, n_heads=25, n_layers=48),  # 1558M
}

AUTO_MAP = {
    "AutoConfig": "configuration_minigpt.MiniGPTConfig",
    "AutoModel": "modeling_minigpt.MiniGPTModel",
    "AutoModelForCausalLM": "modeling_minigpt.MiniGPTForCausalLM",
    "AutoModelForSequenceClassification": "modeling_minigpt.MiniGPTForSequenceClassification",
}


class MiniGPTConfig(PretrainedConfig):
    model_type = "minigpt"
    attribute_map = {
        "hidden_size": "emb_dim",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "max_position_embeddings": "context_length",
    }

    vocab_size: int = 50257
    context_length: int = 1024  # learned position embeddings: the longest sequence the model can read
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    # GPT-2 trained with 0.1; for short single-epoch runs 0.0 is usually better (nanoGPT).
    drop_rate: float = 0.1
    # GPT-2 has biases on the query/key/value projections; the book's own models drop them.
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02  # std of the normal init (see MiniGPTPreTrainedModel._init_weights)
    # v5 no longer keeps this on the base config, so it is an explicit field here.
    tie_word_embeddings: bool = True
    # Keep keys/values of past tokens during generation (the KV cache).
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # Not fields: `attn_implementation` ("sdpa", the default, runs torch's fused kernel; "eager"
    # the hand-written path that can return attention weights; read as `config._attn_implementation`)
    # and `problem_type` (sequence classification loss, a field of the base class).

    def __post_init__(self, **kwargs):
        # `register_for_auto_class` records only the class being saved; listing every head
        # here lets AutoModel / ...ForCausalLM / ...ForSequenceClassification all load one folder.
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        super().__post_init__(**kwargs)
        self.validate_architecture()

    def validate_architecture(self) -> None:
        """Reject impossible shapes here, with the field's name, instead of deep inside torch."""
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"MiniGPTConfig.{name} must be a positive integer, got {value!r}")
        if self.emb_dim % self.n_heads != 0:
            raise ValueError(f"MiniGPTConfig.emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})")
        if not (0.0 <= float(self.drop_rate) < 1.0):
            raise ValueError(f"MiniGPTConfig.drop_rate must be in [0, 1), got {self.drop_rate!r}")
        if not float(self.layer_norm_eps) > 0:
            raise ValueError(f"MiniGPTConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        if not float(self.initializer_range) > 0:
            raise ValueError(f"MiniGPTConfig.initializer_range must be > 0, got {self.initializer_range!r}")

    def to_dict(self) -> dict:
        """The fields, plus each standard name of `attribute_map` with its value. Tools that read
        `to_dict()` instead of the config object find the standard names there: PEFT's prompt,
        prefix and P-tuning take `hidden_size` and `num_attention_heads` from it (without them,
        `token_dim` and `num_attention_heads` must be passed by hand)."""
        out = super().to_dict()
        for standard, ours in self.attribute_map.items():
            out[standard] = getattr(self, ours)
        return out

    def to_json_string(self, use_diff: bool = True) -> str:
        """config.json holds each value once, under our names: with a standard name beside it, an
        edited file could say `n_layers: 3` and `num_hidden_layers: 2`, and loading would keep
        whichever it read last, silently."""
        config = json.loads(super().to_json_string(use_diff))
        for standard in self.attribute_map:
            config.pop(standard, None)
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_preset(cls, name: str, **overrides) -> MiniGPTConfig:
        """A preset by name (see `PRESETS`), with any field overridden: `from_preset("tiny", n_layers=4)`."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})
