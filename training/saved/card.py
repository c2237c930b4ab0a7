"""Model cards: the README.md every training run writes beside its weights.

The card is rendered with `huggingface_hub`'s `ModelCard.from_template` from
`model_cards/minigpt_card_template.md`. Its YAML metadata is what the Hub indexes (library,
pipeline, license, datasets, and `model-index` results); the body describes the architecture,
the training run, the evaluation with confidence intervals, the loss curve, how to load the
model, and its intended use and limitations.

Training scripts call `write_model_card(output_dir, config=..., training_info=..., eval_results=...)`
after saving the model, with `training_info` and `eval_results` keyed as `TrainingInfo` and
`EvalInfo` below.
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import Any, TypedDict

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import AutoModelForCausalLM, PretrainedConfig

from model_cards import TEMPLATE_PATH  # package data: found in installed copies too
from modeling_minigpt.files import atomic_write_text
from training.saved.layout import LOSS_CURVE, PREFERENCE_CURVES

CARD_NAME = "README.md"
# The usage example's model id when the Hub repo is not known yet. Not the folder's own name:
# cards are written into a temporary folder that is renamed afterwards.
LOCAL_MODEL_ID = "path/to/this/folder"
DEFAULT_TAGS = ["minigpt", "gpt2", "causal-lm", "custom_code"]


class TrainingInfo(TypedDict, total=False):
    """What the card says about the training run. All keys are required except `preset`.

    preset: name of the `MiniGPTConfig` preset the run started from ("tiny", "gpt2-small", ...).
    data: the training data in words, e.g. "Tiny Shakespeare, first 90% (1.0M characters)".
    tokens_seen: training tokens processed, summed over processes and steps.
    steps: optimizer steps taken.
    schedule: optimizer and learning-rate schedule in words,
        e.g. "AdamW, lr 6e-4, 100 warmup steps, cosine decay to 6e-5, weight decay 0.1".
    wall_time_seconds: training time from first to last step.
    hardware: what it ran on; `describe_hardware()` gives a default.
    """

    preset: str
    data: str
    tokens_seen: int
    steps: int
    schedule: str
    wall_time_seconds: float
    hardware: str


class EvalInfo(TypedDict, total=False):
    """Evaluation numbers for the card and its `model-index` metadata.

    dataset_name: (required) the evaluation data as shown, e.g. "Tiny Shakespeare (last 10%)".
    dataset_type: the dataset's Hub id if it has one, e.g. "karpathy/tiny_shakespeare";
        defaults to `dataset_name`.
    dataset_split: defaults to "validation".
    val_loss: mean cross-entropy per token, in nats.
    perplexity: exp(val_loss).
    bits_per_byte: total cross-entropy in bits / UTF-8 bytes of the evaluated text.
    exact_match: share of held-out prompts whose greedy answer is the expected one (0-1).
    accuracy: share of held-out texts classified right (0-1).
    reward_accuracy, reward_margin: preference tuning's held-out pairs (see PREFERENCE_METRICS).
    val_loss_ci, perplexity_ci, bits_per_byte_ci: (low, high) confidence interval of each metric.
    confidence_level: of the intervals; defaults to 0.95.
    num_tokens: tokens evaluated.

    At least one metric is required. Every metric given goes into `model-index` (what the Hub
    shows as the model's results) and into the card's table.
    """

    dataset_name: str
    dataset_type: str
    dataset_split: str
    val_loss: float
    val_loss_ci: tuple[float, float]
    perplexity: float
    perplexity_ci: tuple[float, float]
    bits_per_byte: float
    bits_per_byte_ci: tuple[float, float]
    exact_match: float
    accuracy: float
    reward_accuracy: float
    reward_margin: float
    confidence_level: float
    num_tokens: int


class PreferenceInfo(TypedDict, total=False):
    """What the card says about preference tuning (DPO, `training.jobs.dpo`). All keys are required.

    method: the loss in words, e.g. "DPO (sigmoid loss), β 0.1; log-probabilities summed over ...".
    reference: the reference model in words, e.g. "a frozen copy of the base".
    pairs: the preference data's size in words, e.g. "990 training pairs, 110 held-out".
    before, after: held-out numbers of the untuned and the tuned model (`training.jobs.dpo`'s val_*
        keys); `before` may be empty when it was not measured.
    """

    method: str
    reference: str
    pairs: str
    before: dict[str, float]
    after: dict[str, float]


# metric key -> label in the card's before/after table of preference tuning
PREFERENCE_METRICS: dict[str, str] = {
    "val_reward_accuracy": "Reward accuracy (chosen reward > rejected)",
    "val_reward_margin": "Reward margin (β · log-ratio, chosen − rejected)",
    "val_loss": "DPO loss",
    "val_logps_chosen": "Policy log-probability of the chosen response",
    "val_logps_rejected": "Policy log-probability of the rejected response",
    "val_chosen_nll": "Chosen responses, loss (nats/token)",
    "val_exact_match": "Greedy answer = chosen (exact match)",
    "val_match_rejected": "Greedy answer = rejected",
}

# metric key -> (label in the card, `model-index` metric type)
METRICS: dict[str, tuple[str, str]] = {
    "val_loss": ("Validation loss (nats/token)", "loss"),
    "perplexity": ("Validation perplexity", "perplexity"),
    "bits_per_byte": ("Bits per byte", "bits_per_byte"),
    "exact_match": ("Exact match (greedy answer = expected answer)", "exact_match"),
    "accuracy": ("Accuracy", "accuracy"),
    "reward_accuracy": (PREFERENCE_METRICS["val_reward_accuracy"], "reward_accuracy"),
    "reward_margin": (PREFERENCE_METRICS["val_reward_margin"], "reward_margin"),
}
_TRAINING_REQUIRED = {"data", "tokens_seen", "steps", "schedule", "wall_time_seconds", "hardware"}


def describe_hardware(num_processes: int = 1) -> str:
    """A one-line description of the machine for `TrainingInfo.hardware`, e.g. "2 x CPU (8 cores, x86_64)"."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    return f"{num_processes} x {device}" if num_processes > 1 else device


def render_model_card(
    output_dir: str | os.PathLike[str],
    *,
    config: PretrainedConfig,
    training_info: TrainingInfo,
    eval_results: EvalInfo | None = None,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    license: str = "apache-2.0",
    pipeline_tag: str = "text-generation",
    model_name: str | None = None,
    repo_id: str | None = None,
    tags: list[str] | None = None,
    language: str | list[str] | None = "en",
    example_prompt: str = "Once upon a time",
    preference: PreferenceInfo | None = None,
    template_path: str | os.PathLike[str] = TEMPLATE_PATH,
) -> ModelCard:
    """The model card of the model saved in `output_dir` (which is read, not written).

    Args:
        config: the model's config; the architecture table and parameter count come from it.
        training_info: see `TrainingInfo`.
        eval_results: see `EvalInfo`; None when the run was not evaluated.
        base_model: Hub id (or path) of the model this one was fine-tuned from.
        datasets: Hub ids of the training datasets, for the metadata.
        model_name: title of the card and name in `model-index`; defaults to the folder name.
        repo_id: Hub id shown in the usage example; defaults to `LOCAL_MODEL_ID`, a placeholder.
        tags: added to the default tags (minigpt, gpt2, causal-lm, custom_code).
        example_prompt: the prompt in the usage example.
        preference: see `PreferenceInfo`; a preference-tuned model's card gets a section on it.
    """
    output_dir = Path(output_dir)
    training = _checked_training_info(training_info)
    evaluation = _checked_eval_info(eval_results) if eval_results is not None else None
    model_name = model_name or output_dir.resolve().name
    num_parameters = count_parameters(config)

    card_data = ModelCardData(
        model_name=model_name,
        language=language,
        license=license,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=[*DEFAULT_TAGS, *(tags or [])],
        datasets=datasets,
        base_model=base_model,
        eval_results=_model_index_results(evaluation, pipeline_tag) if evaluation else None,
    )
    template_path = Path(template_path)
    if not template_path.is_file():
        raise ValueError(f"model card template {template_path} not found (it ships in the model_cards package)")
    context_length = config.max_position_embeddings
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        title=model_name,
        num_parameters_short=_short_count(num_parameters),
        architecture_rows=_architecture_rows(config, training.get("preset"), num_parameters),
        training_rows=_training_rows(training, base_model),
        loss_curve=LOSS_CURVE if (output_dir / LOSS_CURVE).is_file() else None,
        eval_dataset=_eval_dataset_label(evaluation) if evaluation else None,
        eval_tokens=f"{evaluation['num_tokens']:,}" if evaluation and "num_tokens" in evaluation else None,
        eval_rows=_eval_rows(evaluation) if evaluation else [],
        confidence_percent=f"{evaluation.get('confidence_level', 0.95):.0%}" if evaluation else None,
        model_id=repo_id or LOCAL_MODEL_ID,
        example_prompt=example_prompt,
        training_data=training["data"],
        context_length=f"{context_length:,}",
        preference_rows=_preference_rows(preference) if preference else [],
        preference_results=_preference_results(preference) if preference else [],
        preference_curves=PREFERENCE_CURVES if preference and (output_dir / PREFERENCE_CURVES).is_file() else None,
    )


def card_for_repo(card_text: str, repo_id: str) -> str:
    """The card as pushed to `repo_id`: its usage example loads the repo, not `LOCAL_MODEL_ID`."""
    return card_text.replace(f'model_id = "{LOCAL_MODEL_ID}"', f"model_id = {json.dumps(repo_id)}")


def write_model_card(output_dir: str | os.PathLike[str], **kwargs: Any) -> Path:
    """Render the card (same arguments as `render_model_card`) and write `output_dir/README.md` atomically."""
    card = render_model_card(output_dir, **kwargs)
    return atomic_write_text(Path(output_dir) / CARD_NAME, str(card))


def count_parameters(config: PretrainedConfig) -> int:
    """Parameters of the causal LM `config` describes, tied weights counted once.

    Built on the meta device: no memory is allocated, so this is instant even for the 1.5B preset.
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model.num_parameters()


# ----------------------------------------------------------------------------- validation


def _check_keys(given: dict, allowed: set[str], required: set[str], what: str) -> None:
    unknown = sorted(set(given) - allowed)
    missing = sorted(required - set(given))
    if unknown:
        raise ValueError(f"{what}: unknown keys {unknown}; known keys are {sorted(allowed)}")
    if missing:
        raise ValueError(f"{what}: missing keys {missing}")


def _checked_training_info(info: TrainingInfo) -> TrainingInfo:
    _check_keys(dict(info), set(TrainingInfo.__annotations__), _TRAINING_REQUIRED, "training_info")
    for key in ("tokens_seen", "steps"):
        if isinstance(info[key], bool) or not isinstance(info[key], int) or info[key] < 0:
            raise ValueError(f"training_info[{key!r}] must be a non-negative integer, got {info[key]!r}")
    if not info["wall_time_seconds"] >= 0:
        raise ValueError(f"training_info['wall_time_seconds'] must be >= 0, got {info['wall_time_seconds']!r}")
    return info


def _checked_eval_info(info: EvalInfo) -> EvalInfo:
    _check_keys(dict(info), set(EvalInfo.__annotations__), {"dataset_name"}, "eval_results")
    if not any(metric in info for metric in METRICS):
        raise ValueError(f"eval_results: give at least one of {list(METRICS)}")
    for metric in METRICS:
        if metric in info and not math.isfinite(info[metric]):
            raise ValueError(f"eval_results[{metric!r}] must be a finite number, got {info[metric]!r}")
        interval = info.get(f"{metric}_ci")
        if interval is not None and (len(interval) != 2 or not interval[0] <= interval[1]):
            raise ValueError(f"eval_results['{metric}_ci'] must be (low, high) with low <= high, got {interval!r}")
        if interval is not None and metric not in info:
            raise ValueError(f"eval_results has '{metric}_ci' but no {metric!r}")
    return info


# ----------------------------------------------------------------------------- card content


def _model_index_results(info: EvalInfo, task_type: str) -> list[EvalResult]:
    return [
        EvalResult(
            task_type=task_type,
            dataset_type=info.get("dataset_type", info["dataset_name"]),
            dataset_name=info["dataset_name"],
            dataset_split=info.get("dataset_split", "validation"),
            metric_type=metric_type,
            metric_name=label,
            metric_value=float(info[metric]),
        )
        for metric, (label, metric_type) in METRICS.items()
        if metric in info
    ]


def _architecture_rows(config: PretrainedConfig, preset: str | None, num_parameters: int) -> list[tuple[str, str]]:
    rows = [("Preset", f"`{preset}`")] if preset else []
    rows += [
        ("Parameters", f"{num_parameters:,} ({_short_count(num_parameters)})"),
        ("Layers", str(config.num_hidden_layers)),
        ("Attention heads", str(config.num_attention_heads)),
        ("Embedding size", str(config.hidden_size)),
        ("Context length", f"{config.max_position_embeddings:,} tokens"),
        ("Vocabulary", f"{config.vocab_size:,} tokens (byte-level BPE)"),
        ("Tied input/output embeddings", "yes" if getattr(config, "tie_word_embeddings", False) else "no"),
    ]
    return rows


def _training_rows(info: TrainingInfo, base_model: str | None) -> list[tuple[str, str]]:
    rows = [("Base model", f"`{base_model}`")] if base_model else []
    rows += [
        ("Data", info["data"]),
        ("Tokens seen", f"{info['tokens_seen']:,} ({_short_count(info['tokens_seen'])})"),
        ("Optimizer steps", f"{info['steps']:,}"),
        ("Schedule", info["schedule"]),
        ("Wall time", _duration(info["wall_time_seconds"])),
        ("Hardware", info["hardware"]),
    ]
    return rows


def _eval_rows(info: EvalInfo) -> list[tuple[str, str, str]]:
    rows = []
    for metric, (label, _) in METRICS.items():
        if metric in info:
            interval = info.get(f"{metric}_ci")
            shown = f"{interval[0]:.4g} – {interval[1]:.4g}" if interval is not None else "not measured"
            rows.append((label, f"{info[metric]:.4g}", shown))
    return rows


def _preference_rows(info: PreferenceInfo) -> list[tuple[str, str]]:
    _check_keys(dict(info), set(PreferenceInfo.__annotations__), set(PreferenceInfo.__annotations__), "preference")
    return [("Method", info["method"]), ("Reference model", info["reference"]), ("Data", info["pairs"])]


def _preference_results(info: PreferenceInfo) -> list[tuple[str, str, str]]:
    """(label, before, after) for each reported metric the run measured."""
    before, after = info["before"], info["after"]
    return [
        (label, f"{before[key]:.4g}" if key in before else "not measured", f"{after[key]:.4g}")
        for key, label in PREFERENCE_METRICS.items()
        if key in after
    ]


def _eval_dataset_label(info: EvalInfo) -> str:
    return f"{info['dataset_name']}, {info.get('dataset_split', 'validation')} split"


def _short_count(n: int) -> str:
    """45952 -> "46.0K", 124439808 -> "124.4M"."""
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.1f}{suffix}"
    return str(n)


def _duration(seconds: float) -> str:
    """3725.4 -> "1 h 02 min 05 s"; 42.3 -> "42.3 s"."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min {secs:02d} s" if hours else f"{minutes} min {secs:02d} s"
