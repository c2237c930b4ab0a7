"""PEFT's defaults for MiniGPT: which modules each PEFT method adapts when no `target_modules` is given.

PEFT keeps one table per method, keyed by `model_type`, of the modules it adapts by default
(`peft.utils.constants.TRANSFORMERS_MODELS_TO_<METHOD>_TARGET_MODULES_MAPPING`); a model type
missing from a table makes `LoraConfig(task_type="CAUSAL_LM")` fail with "Please specify
`target_modules`". MiniGPT is GPT-2 under the book's names, so its defaults are GPT-2's renamed:
LoRA adapts the query, key and value projections (GPT-2's fused `c_attn`), IA3 those and the
feed-forward output, LN tuning the LayerNorms, and so on for every table that lists GPT-2.

The tables are plain dicts that every PEFT method reads when it prepares its config, so adding a
"minigpt" entry is all it takes; importing `modeling_minigpt` does it. (A folder loaded with
`trust_remote_code` alone does not import this package: pass `target_modules` there.)

Prompt, prefix and P-tuning need no table: they read the sizes from the config's `to_dict()`,
which carries the standard names (see `MiniGPTConfig.to_dict`).
"""

from __future__ import annotations

from .convert import gpt2_module_names_to_minigpt

TABLE_PREFIX = "TRANSFORMERS_MODELS_TO_"


def register_peft_defaults(model_type: str = "minigpt") -> list[str]:
    """Add `model_type` to every PEFT default table that has GPT-2, with GPT-2's modules renamed.
    Returns the names of the tables now holding it; [] when PEFT is not installed."""
    try:
        from peft.utils import constants
    except ImportError:  # PEFT is optional for the model itself
        return []
    registered = []
    for name, table in vars(constants).items():
        if not (name.startswith(TABLE_PREFIX) and isinstance(table, dict) and isinstance(table.get("gpt2"), list)):
            continue
        ours = gpt2_module_names_to_minigpt(table["gpt2"])
        if ours is not None:  # a GPT-2 module we have no counterpart for: no default rather than a wrong one
            table.setdefault(model_type, ours)
            registered.append(name)
    return registered
