"""MiniGPT: a hand-written GPT-2-style model that loads, trains and ships like any Hub model.

Importing the package registers the classes with the Auto* factories, so an installed MiniGPT
loads saved folders without `trust_remote_code` (folders also carry the code for users who
only have transformers), and registers MiniGPT's default PEFT target modules (`peft_defaults`).
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .configuration_minigpt import PRESETS, MiniGPTConfig
from .modeling_minigpt import (
    MiniGPTForCausalLM,
    MiniGPTForSequenceClassification,
    MiniGPTModel,
    MiniGPTPreTrainedModel,
)
from .peft_defaults import register_peft_defaults

# Saved folders carry the code (configuration_minigpt.py, modeling_minigpt.py, attention.py, linear.py)
# and an `auto_map` (see MiniGPTConfig) so stock transformers loads them with trust_remote_code.
MiniGPTConfig.register_for_auto_class()
MiniGPTModel.register_for_auto_class("AutoModel")
MiniGPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")
MiniGPTForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

AutoConfig.register("minigpt", MiniGPTConfig, exist_ok=True)
AutoModel.register(MiniGPTConfig, MiniGPTModel, exist_ok=True)
AutoModelForCausalLM.register(MiniGPTConfig, MiniGPTForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(MiniGPTConfig, MiniGPTForSequenceClassification, exist_ok=True)
register_peft_defaults(MiniGPTConfig.model_type)

__all__ = [
    "PRESETS",
    "MiniGPTConfig",
    "MiniGPTModel",
    "MiniGPTForCausalLM",
    "MiniGPTForSequenceClassification",
    "MiniGPTPreTrainedModel",
]
