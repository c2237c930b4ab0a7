"""MiniGPT: a GPT-2-style decoder, top to bottom.

FeedForward -> TransformerBlock -> MiniGPTPreTrainedModel -> MiniGPTModel -> MiniGPTForCausalLM
-> MiniGPTForSequenceClassification. The attention lives in `attention.py`. Hugging Face
appears only at the boundary (config, `PreTrainedModel`, output classes, `GenerationMixin`);
inside, these are ordinary PyTorch modules with explicit arguments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)

from .attention import MultiHeadAttention, causal_mask
from .configuration_minigpt import MiniGPTConfig


class FeedForward(nn.Module):
    """Position-wise MLP: expand 4x, GELU, project back."""

    def __init__(self, config: MiniGPTConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.emb_dim, 4 * config.emb_dim)
        # GPT-2's "gelu_new" is the tanh approximation; torch's fused kernel computes it.
        self.gelu = nn.GELU(approximate="tanh")
        self.fc_out = nn.Linear(4 * config.emb_dim, config.emb_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.gelu(self.fc_in(x)))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class TransformerBlock(GradientCheckpointingLayer):
    """Pre-LayerNorm block: x + Attention(LN(x)), then x + FeedForward(LN(x))."""

    def __init__(self, config: MiniGPTConfig, layer_idx: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.emb_dim, eps=config.layer_norm_eps)
        self.att = MultiHeadAttention(config, layer_idx)
        self.norm2 = nn.LayerNorm(config.emb_dim, eps=config.layer_norm_eps)
        self.ff = FeedForward(config)
        self.drop_shortcut = nn.Dropout(config.drop_rate)

    def forward(
        self,
        x: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        shortcut = x
        x, weights = self.att(self.norm1(x), padding_mask=padding_mask, cache=cache, output_attentions=output_attentions)
        x = self.drop_shortcut(x) + shortcut

        shortcut = x
        x = self.ff(self.norm2(x))
        x = self.drop_shortcut(x) + shortcut
        return x, weights


class MiniGPTPreTrainedModel(PreTrainedModel):
    config_class = MiniGPTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TransformerBlock"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        """Every parameter and buffer is initialised here, GPT-2's scheme:

        | module                        | init                                         |
        |-------------------------------|----------------------------------------------|
        | Linear, Embedding weights     | N(0, initializer_range)                      |
        | out_proj, fc_out weights      | N(0, initializer_range / sqrt(2 * n_layers)) |
        | Linear biases                 | 0                                            |
        | LayerNorm                     | weight 1, bias 0                             |
        | attention `mask` buffer       | triangular causal mask                       |

        The residual projections are scaled down because each block adds two of them to the
        residual stream; without it the stream's variance grows with depth (GPT-2 paper, 2.3).
        The `init` helpers skip tensors already loaded from a checkpoint. The mask is not
        persistent, so after `from_pretrained` (which builds on the meta device) it must be
        rebuilt here or it would hold garbage and let tokens see the future.
        """
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        if isinstance(module, MultiHeadAttention):
            init.copy_(module.mask, causal_mask(self.config.context_length))
            init.normal_(module.out_proj.weight, mean=0.0, std=std / (2 * self.config.n_layers) ** 0.5)
        elif isinstance(module, FeedForward):
            init.normal_(module.fc_out.weight, mean=0.0, std=std / (2 * self.config.n_layers) ** 0.5)


class MiniGPTModel(MiniGPTPreTrainedModel):
    """Token + learned position embeddings -> dropout -> blocks -> final LayerNorm."""

    def __init__(self, config: MiniGPTConfig):
        super().__init__(config)
        self.tok_emb = nn.Embedding(config.vocab_size, config.emb_dim)
        self.pos_emb = nn.Embedding(config.context_length, config.emb_dim)
        self.drop_emb = nn.Dropout(config.drop_rate)
        self.trf_blocks = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
        self.final_norm = nn.LayerNorm(config.emb_dim, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.tok_emb

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.tok_emb = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """input_ids: (B, T). attention_mask: (B, past + T), 1 = token, 0 = padding.
        `past_key_values` is the pre-5.24 name of `cache`; both are accepted."""
        cache = cache if cache is not None else past_key_values
        # The cache only serves generation; in training it would copy every layer's keys/values.
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        self._check_inputs(input_ids, cache)
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0

        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # nothing padded: lets sdpa use its fused causal kernel
        if position_ids is None:
            if attention_mask is not None:
                # Left padding shifts where each row starts; count only real tokens so a padded
                # row gets the same positions as the row run alone.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device)[None, :]

        x = self.tok_emb(input_ids) + self.pos_emb(position_ids)  # (B, T, C)
        x = self.drop_emb(x)

        all_hidden = (x,) if output_hidden_states else None
        all_weights = () if output_attentions else None
        for block in self.trf_blocks:
            x, weights = block(x, padding_mask=attention_mask, cache=cache, output_attentions=output_attentions)
            if output_hidden_states:
                all_hidden += (x,)
            if output_attentions:
                all_weights += (weights,)
        x = self.final_norm(x)
        if output_hidden_states:
            all_hidden = all_hidden[:-1] + (x,)

        return BaseModelOutputWithPast(
            last_hidden_state=x,
            cache=cache if use_cache else None,
            hidden_states=all_hidden,
            attentions=all_weights,
        )

    def _check_inputs(self, input_ids: torch.Tensor, cache: Cache | None) -> None:
        """Fail with the numbers a user needs, instead of an index error deep inside torch."""
        if input_ids is None or input_ids.dim() != 2:
            shape = None if input_ids is None else tuple(input_ids.shape)
            raise ValueError(f"input_ids must be a (batch, sequence) tensor of token ids, got shape {shape}")
        lo, hi = torch.aminmax(input_ids)
        if lo < 0 or hi >= self.config.vocab_size:
            bad = int(hi) if hi >= self.config.vocab_size else int(lo)
            raise ValueError(
                f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size}); "
                "was the text encoded with a different tokenizer than this model's?"
            )
        past = cache.get_seq_length() if cache is not None else 0
        if past + input_ids.shape[1] > self.config.context_length:
            raise ValueError(
                f"sequence of {past + input_ids.shape[1]} positions ({past} cached + {input_ids.shape[1]} new) "
                f"exceeds the model's context_length of {self.config.context_length}; "
                "shorten the prompt or max_new_tokens"
            )


class MiniGPTForCausalLM(MiniGPTPreTrainedModel, GenerationMixin):
    # v5 form {target: source}; only tied when config.tie_word_embeddings is True.
    _tied_weights_keys = {"lm_head.weight": "model.tok_emb.weight"}

    def __init__(self, config: MiniGPTConfig):
        super().__init__(config)
        self.model = MiniGPTModel(config)
        self.lm_head = nn.Linear(config.emb_dim, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """labels: (B, T) unshifted, -100 = ignored; the shift happens in the loss.
        shift_labels: (B, T) already aligned (position t holds the target of token t), for
        windows of context_length + 1 tokens where no target should be wasted.
        logits_to_keep: compute logits only for the last N positions (generation needs 1)."""
        out = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:, :]
        logits = self.lm_head(hidden)  # (B, T, vocab_size)

        loss = None
        if labels is not None or shift_labels is not None:
            loss = self.loss_function(
                logits, labels, vocab_size=self.config.vocab_size, shift_labels=shift_labels, **kwargs
            )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=out.cache,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )


class MiniGPTForSequenceClassification(MiniGPTPreTrainedModel):
    """The decoder plus a linear head on the hidden state of each row's last real token."""

    def __init__(self, config: MiniGPTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = MiniGPTModel(config)
        self.score = nn.Linear(config.emb_dim, config.num_labels, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast:
        out = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        logits = self.score(out.last_hidden_state)  # (B, T, num_labels)
        # The book pools position -1, which is a pad token in a right-padded batch. Pool the
        # last real token instead: from the attention mask, else from pad_token_id.
        B, T = input_ids.shape
        if attention_mask is not None:
            real = attention_mask.bool()
        elif self.config.pad_token_id is not None:
            real = input_ids != self.config.pad_token_id
        else:
            real = torch.ones_like(input_ids, dtype=torch.bool)
        positions = torch.arange(T, device=input_ids.device)
        last = torch.where(real, positions, -1).amax(dim=-1).clamp(min=0)  # (B,)
        pooled = logits[torch.arange(B, device=logits.device), last]  # (B, num_labels)

        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(pooled.squeeze(-1), labels.to(pooled.dtype))
            else:
                loss = F.cross_entropy(pooled.float(), labels.view(-1))
        return SequenceClassifierOutputWithPast(
            loss=loss, logits=pooled, hidden_states=out.hidden_states, attentions=out.attentions
        )
