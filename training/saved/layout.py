"""Every file and folder a run writes into its output folder, each named once.

The loop (checkpoints, metrics, logs), the run lifecycle (`training.run.lifecycle`), the model card (the
loss curve it links to) and the push to the Hub (`training.saved.hub.RUN_ONLY_PATTERNS`: what is
not part of the published model) all take their names from here.
"""

from __future__ import annotations

from pathlib import Path

MODEL = "model"
ADAPTER = "adapter"
TOKENIZER = "tokenizer"
CHECKPOINTS = "checkpoints"
LOGS = "logs"
METRICS = "metrics.jsonl"
LOSS_CURVE = "loss_curve.png"
FINAL_METRICS = "final_metrics.json"
RUN_CONFIG = "run_config.json"
LOCK = "run.lock"  # the process writing the folder (training.run.folder.RunLock)
GENERATIONS = "heldout_generations.json"
# DPO: the untuned model's held-out answers (the "before" of the table), the precomputed
# reference log-probabilities, and the preference curves.
GENERATIONS_BEFORE = "heldout_generations_before.json"
REFERENCE_LOGPS = "reference_logps.safetensors"
PREFERENCE_CURVES = "preference_curves.png"
# GRPO: reward, KL, completion length and held-out exact match per step.
GRPO_CURVES = "grpo_curves.png"

# What the run prints when it starts, in this order: the files every job writes.
DESCRIPTIONS = {
    RUN_CONFIG: "configuration and resume fingerprint",
    f"{CHECKPOINTS}/step_N": "checkpoints: safetensors, JSON and a manifest (resume with --resume)",
    METRICS: "training/validation loss log",
    LOSS_CURVE: "loss curve",
    f"{LOGS}/": "TensorBoard logs",
    f"{MODEL}/": "final model, tokenizer and model card",
}


class RunLayout:
    """The paths of one run folder."""

    def __init__(self, root: Path):
        self.root = root
        self.model = root / MODEL
        self.adapter = root / ADAPTER  # LoRA runs: the adapter alone, beside the merged model
        self.tokenizer = root / TOKENIZER  # pretraining without --tokenizer_path: the tokenizer trained for the run
        self.checkpoints = root / CHECKPOINTS
        self.logs = root / LOGS
        self.metrics = root / METRICS
        self.loss_curve = root / LOSS_CURVE
        self.final_metrics = root / FINAL_METRICS
        self.run_config = root / RUN_CONFIG
        self.lock = root / LOCK
        self.generations = root / GENERATIONS  # SFT: {instruction, input, expected, generated, exact_match} per record
        self.generations_before = root / GENERATIONS_BEFORE
        self.reference_logps = root / REFERENCE_LOGPS
        self.preference_curves = root / PREFERENCE_CURVES
        self.grpo_curves = root / GRPO_CURVES


def describe_run_files() -> str:
    """The files every run writes, one line each, for the printout at the start."""
    return "\n".join(f"  {name:<22} {what}" for name, what in DESCRIPTIONS.items())
