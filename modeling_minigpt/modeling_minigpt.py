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
from transformers.generation.continuous_batching.input_outputs import PagedAttentionArgs
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import TransformersKwargs
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .attention import MultiHeadAttention, causal_mask
from .configuration_minigpt import MiniGPTConfig
from .linear import Linear

# Keyword arguments a forward takes besides its named ones, by who reads them. Any other name is
# refused with a TypeError: a typo (`attention_maks=`) would otherwise be ignored without a word.
# What the attention kernels and caches read (packed sequences' `cu_seq_lens_*`, paged attention's
# `block_table` / `read_index` / `write_index` ...), plus `output_attentions` /
# `output_hidden_states`: taken from transformers' own declarations, so a kernel's new argument
# passes without an edit here. What the causal LM hands to `loss_function` (Trainer passes
# num_items_in_batch) stays with the loss.
LOSS_KWARGS = frozenset({"num_items_in_batch", "ignore_index"})
ATTENTION_KWARGS = (
    frozenset(TransformersKwargs.__annotations__) | frozenset(PagedAttentionArgs.__annotations__)
) - LOSS_KWARGS
# generate() leaves some of its own arguments among the model kwargs it passes to every forward
# (`tokenizer` for stop_strings, `assistant_tokenizer` for assisted decoding); nothing reads them.
GENERATE_KWARGS = frozenset({"tokenizer", "assistant_tokenizer"})


def check_kwargs(owner: str, kwargs: dict, allowed: frozenset[str]) -> None:
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(
            f"{owner}.forward() got unexpected keyword arguments {unknown}; besides its named arguments it "
            f"takes only {', '.join(sorted(allowed))}"
        )


class FeedForward(nn.Module):
    """Position-wise MLP: expand 4x, GELU, project back."""

    def __init__(self, config: MiniGPTConfig):
        super().__init__()
        self.fc_in = Linear(config.emb_dim, 4 * config.emb_dim)
        # GPT-2's "gelu_new" is the tanh approximation; torch's fused kernel computes it.
        self.gelu = nn.GELU(approximate="tanh")
        self.fc_out = Linear(4 * config.emb_dim, config.emb_dim)

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
        attention_mask=None,
        cache: Cache | None = None,
        output_attentions: bool = False,
        **kernel_kwargs,
    ) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C). The attention weights, when asked for, are recorded from the
        attention module by the model (`_can_record_outputs`), not returned through here."""
        shortcut = x
        x, _ = self.att(
            self.norm1(x),
            attention_mask=attention_mask,
            cache=cache,
            output_attentions=output_attentions,
            **kernel_kwargs,
        )
        x = self.drop_shortcut(x) + shortcut

        shortcut = x
        x = self.ff(self.norm2(x))
        x = self.drop_shortcut(x) + shortcut
        return x


class MiniGPTPreTrainedModel(PreTrainedModel):
    config_class = MiniGPTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TransformerBlock"]
    # Every implementation but eager runs a kernel from transformers' attention interface (see
    # attention.py): sdpa (the default), flex attention, flash attention where installed, paged
    # attention for continuous batching, and any function registered with `AttentionInterface`.
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    # No data-dependent Python branch in any forward: torch.compile(fullgraph=True) and
    # torch.export trace it whole, with a dynamic or a static cache.
    _can_compile_fullgraph = True
    # output_hidden_states / output_attentions are recorded by forward hooks (`capture_outputs`):
    # each block's output, and each attention module's weights (its output 1, eager path only).
    _can_record_outputs = {
        "hidden_states": OutputRecorder(TransformerBlock, index=0),
        "attentions": OutputRecorder(MultiHeadAttention, index=1),
    }

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

    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kernel_kwargs,
    ) -> BaseModelOutputWithPast:
        """input_ids: (B, T) token ids, or inputs_embeds: (B, T, C) vectors in their place.
        attention_mask: (B, past + T), 1 = token, 0 = padding; or a ready 4-D mask (see
        `MultiHeadAttention.forward`), used as given. position_ids: (B or 1, T); rows packed
        padding-free (`DataCollatorWithFlattening`) restart them at 0 for each sequence, which
        keeps the sequences from seeing each other. cache: a transformers `Cache` (dynamic,
        static or paged) with the past keys/values; `past_key_values` is its pre-5.24 name.
        output_hidden_states / output_attentions and `return_dict` are handled by
        `capture_outputs`, which records them with hooks (`_can_record_outputs`).
        kernel_kwargs: only ATTENTION_KWARGS, handed to every attention layer."""
        check_kwargs(type(self).__name__, kernel_kwargs, ATTENTION_KWARGS)
        # The cache only serves generation; in training it would copy every layer's keys/values.
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        if output_attentions and self.config._attn_implementation not in ("eager", "sdpa"):
            # Only the eager path has the weights; it reads the masks eager and sdpa share, not a
            # flex BlockMask or a flash or paged layout.
            raise ValueError(
                f"output_attentions=True needs attn_implementation 'eager' or 'sdpa' (which switches to eager for "
                f"the call); this model runs {self.config._attn_implementation!r}: "
                "call model.set_attn_implementation('eager') first"
            )
        self._check_inputs(input_ids, inputs_embeds)
        if inputs_embeds is None:
            inputs_embeds = self.tok_emb(input_ids)  # (B, T, C)
        self._check_mask_shape(attention_mask, inputs_embeds.shape[0], inputs_embeds.shape[1], cache is not None)

        # The mask is built once here for every layer, in the form the implementation's kernel
        # reads: causal, padding, packed sequences and the cache's length (a static cache is
        # longer than what it holds). None when plain causal attention is all it takes. Only
        # caller-given position ids can mark packed sequences.
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        if position_ids is None:
            position_ids = self._default_positions(inputs_embeds, attention_mask, cache)
        # An assert inside the computation: no host sync and no graph break under compile/export.
        torch._assert_async(
            (position_ids < self.config.context_length).all(),
            f"the sequence (cached + new tokens) is longer than the model's context_length of "
            f"{self.config.context_length} positions; shorten the prompt or max_new_tokens",
        )
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        x = inputs_embeds + self.pos_emb(position_ids)  # (B, T, C)
        x = self.drop_emb(x)
        for block in self.trf_blocks:
            # A paged cache rewrites the kwargs it is handed for its layer: each block gets its own dict.
            x = block(x, attention_mask=mask, cache=cache, output_attentions=output_attentions, **kernel_kwargs)
        x = self.final_norm(x)  # (B, T, C)
        return BaseModelOutputWithPast(last_hidden_state=x, cache=cache if use_cache else None)

    def _check_inputs(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> None:
        """Fail with the numbers a user needs, instead of an index error deep inside torch."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(
                "pass exactly one of input_ids (batch, sequence) or inputs_embeds (batch, sequence, emb_dim)"
            )
        if inputs_embeds is not None:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.emb_dim:
                raise ValueError(
                    f"inputs_embeds must be a (batch, sequence, {self.config.emb_dim}) tensor, "
                    f"got shape {tuple(inputs_embeds.shape)}"
                )
            return
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be a (batch, sequence) tensor of token ids, got shape {tuple(input_ids.shape)}"
            )
        torch._assert_async(
            ((input_ids >= 0) & (input_ids < self.config.vocab_size)).all(),
            f"input_ids hold a token id outside the vocabulary [0, {self.config.vocab_size}); "
            "was the text encoded with a different tokenizer than this model's?",
        )

    def _check_mask_shape(self, attention_mask: torch.Tensor | None, B: int, T: int, cached: bool) -> None:
        """Refuse a mask that would broadcast: a (1, T) mask on a batch of B rows would apply one
        row's padding to every row. Shapes only, so compile and export see no data-dependent branch."""
        if attention_mask is None:
            return
        shape = tuple(attention_mask.shape)
        # Keys: exactly T without a cache; with one, T new plus the cached ones (at least T).
        keys_ok = (lambda S: S >= T) if cached else (lambda S: S == T)
        if attention_mask.dim() == 2:
            ok = shape[0] == B and keys_ok(shape[1])
        elif attention_mask.dim() == 4:
            ok = shape[0] in (1, B) and shape[1] in (1, self.config.n_heads) and shape[2] == T and keys_ok(shape[3])
        else:
            ok = False
        if not ok:
            # Formatted only on failure: under torch.compile, turning B or T into text would fix
            # them to this call's values (a guard per batch size, and no dynamic-batch kernels).
            past = "past + " if cached else ""
            if attention_mask.dim() == 2:
                expected = f"(batch={B}, {past}sequence={T})"
            elif attention_mask.dim() == 4:
                expected = f"({B} or 1, 1 or {self.config.n_heads}, {T}, {past}{T})"
            else:
                expected = f"2-D (batch={B}, sequence={T}) or 4-D (batch, 1, {T}, keys)"
            raise ValueError(
                f"attention_mask has shape {shape} but the input is {B} rows of {T} tokens: expected {expected}. "
                "A mask that does not match would be broadcast across rows."
            )

    @staticmethod
    def _default_positions(
        inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, cache: Cache | None
    ) -> torch.Tensor:
        """(B or 1, T): positions after the cached tokens, or after the real tokens of each row."""
        T = inputs_embeds.shape[1]
        if attention_mask is not None and attention_mask.dim() == 2:
            # Left padding shifts where each row starts; count only real tokens so a padded
            # row gets the same positions as the row run alone.
            return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        # A static cache reports its length as a tensor: no host sync, no graph break.
        past = cache.get_seq_length() if cache is not None else 0
        return (torch.arange(T, device=inputs_embeds.device) + past)[None, :]


class MiniGPTForCausalLM(MiniGPTPreTrainedModel, GenerationMixin):
    # v5 form {target: source}; only tied when config.tie_word_embeddings is True.
    _tied_weights_keys = {"lm_head.weight": "model.tok_emb.weight"}

    def __init__(self, config: MiniGPTConfig):
        super().__init__(config)
        self.model = MiniGPTModel(config)
        self.lm_head = Linear(config.emb_dim, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """labels: (B, T) unshifted, -100 = ignored; the shift happens in the loss.
        shift_labels: (B, T) already aligned (position t holds the target of token t), for
        windows of context_length + 1 tokens where no target should be wasted.
        logits_to_keep: compute logits only for the last N positions (generation needs 1).
        kwargs: LOSS_KWARGS for the loss; ATTENTION_KWARGS (output_attentions,
        output_hidden_states, the attention kernels' arguments) for the base model, which resolves
        unset output flags against the config; GENERATE_KWARGS, dropped. Nothing else."""
        check_kwargs(type(self).__name__, kwargs, ATTENTION_KWARGS | LOSS_KWARGS | GENERATE_KWARGS)
        loss_kwargs = {k: v for k, v in kwargs.items() if k in LOSS_KWARGS}
        model_kwargs = {k: v for k, v in kwargs.items() if k in ATTENTION_KWARGS}
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        out = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **model_kwargs,
        )
        hidden = slice_logits_to_keep(out.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden)  # (B, T, vocab_size)

        loss = None
        if labels is not None or shift_labels is not None:
            loss = self.loss_function(
                logits, labels, vocab_size=self.config.vocab_size, shift_labels=shift_labels, **loss_kwargs
            )
        result = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=out.cache,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )
        return result if return_dict else result.to_tuple()


class MiniGPTForSequenceClassification(MiniGPTPreTrainedModel):
    """The decoder plus a linear head on the hidden state of each row's last real token.

    The loss follows `config.problem_type`, chosen as transformers' own classifiers choose it
    when unset: "regression" (MSE) for num_labels == 1, "single_label_classification"
    (cross-entropy) for integer labels, "multi_label_classification" (BCE with logits, float
    labels of shape (B, num_labels)) otherwise. Regression with num_labels > 1 must be asked for.
    """

    def __init__(self, config: MiniGPTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = MiniGPTModel(config)
        self.score = nn.Linear(config.emb_dim, config.num_labels, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast | tuple:
        """kwargs: ATTENTION_KWARGS (output_attentions, output_hidden_states, the attention kernels'
        arguments), for the base model. Nothing else."""
        check_kwargs(type(self).__name__, kwargs, ATTENTION_KWARGS)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        out = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            return_dict=True,
            **kwargs,
        )
        logits = self.score(out.last_hidden_state)  # (B, T, num_labels)
        # The book pools position -1, which is a pad token in a right-padded batch. Pool the
        # last real token instead: from a 2-D attention mask, else from pad_token_id.
        B, T = logits.shape[:2]
        if attention_mask is not None and attention_mask.dim() == 2:
            real = attention_mask.bool()
        elif input_ids is not None and self.config.pad_token_id is not None:
            real = input_ids != self.config.pad_token_id
        else:
            real = torch.ones(B, T, dtype=torch.bool, device=logits.device)
        positions = torch.arange(T, device=logits.device)
        last = torch.where(real, positions, -1).amax(dim=-1).clamp(min=0)  # (B,)
        pooled = logits[torch.arange(B, device=logits.device), last]  # (B, num_labels)

        loss = None if labels is None else self._loss(pooled, labels)
        result = SequenceClassifierOutputWithPast(
            loss=loss, logits=pooled, hidden_states=out.hidden_states, attentions=out.attentions
        )
        return result if return_dict else result.to_tuple()

    def _loss(self, pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """pooled: (B, num_labels) logits. The problem type as documented on the class."""
        problem_type = self.config.problem_type
        if problem_type is None:
            if self.num_labels == 1:
                problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem_type = "single_label_classification"
            else:
                problem_type = "multi_label_classification"
        pooled = pooled.float()  # the loss in fp32 even when the model runs in bf16
        if problem_type == "regression":
            return F.mse_loss(pooled, labels.to(pooled.dtype).view(pooled.shape))
        if problem_type == "single_label_classification":
            return F.cross_entropy(pooled, labels.view(-1))
        if problem_type == "multi_label_classification":
            if labels.shape != pooled.shape:
                raise ValueError(
                    f"multi-label classification needs labels of shape (batch, num_labels) = {tuple(pooled.shape)}, "
                    f"one 0/1 target per label, got shape {tuple(labels.shape)}"
                )
            return F.binary_cross_entropy_with_logits(pooled, labels.to(pooled.dtype))
        raise ValueError(
            f"config.problem_type={problem_type!r} is not one of regression, "
            "single_label_classification, multi_label_classification"
        )
