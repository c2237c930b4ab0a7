"""Accelerate's DeepSpeed ZeRO-2 and ZeRO-3 (`--config_file scripts/configs/accelerate/deepspeed_zero{2,3}.yaml`)
on two CPU processes (DeepSpeed's CPU accelerator, gloo), against one process at the same global batch.

Each stage trains the tiny run of `test_ddp.py` through `scripts/pretrain.py` launched with the README's
config file (its 8 processes and bf16 overridden on the command line), then a copy cut back to its
step-10 checkpoint resumes. Needs `pip install deepspeed` (the `deepspeed` extra); skipped without it.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from helpers.processes import free_port, run_checked
from helpers.runs import PRETRAIN_SCRIPT, read_metrics, run_and_resume, script_flags
from safetensors.torch import load_file

from modeling_minigpt import MiniGPTForCausalLM

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed (pip install deepspeed)"
    ),
]

CONFIGS = Path(__file__).resolve().parents[3] / "scripts" / "configs" / "accelerate"
STEPS = 20
COMMON = dict(max_steps=STEPS, drop_rate=0.0, eval_every=10, save_every=10, keep_last=2, eval_batches=100)
# As tests/training/run/test_ddp.py: ~100x the measured differences, far below a real mistake.
LOSS_TOLERANCE = 1e-4
LOGIT_TOLERANCE = 1e-4
# At step 10 of the run, measured against the one process: AdamW moments within 5.6e-9, weights
# within 3.2e-6 (Adam's update divides by sqrt(exp_avg_sq), which magnifies the rounding above).
MOMENT_TOLERANCE = 1e-6
WEIGHT_TOLERANCE = 1e-4


def _deepspeed_launch(stage: int, *flags: str) -> list[str]:
    """Two CPU processes under the README's DeepSpeed config (its 8 GPUs and bf16 overridden)."""
    launch = [
        "--config_file", str(CONFIGS / f"deepspeed_zero{stage}.yaml"), "--num_processes", "2",
        "--mixed_precision", "no", "--main_process_port", str(free_port()),
    ]  # fmt: skip
    return [sys.executable, "-m", "accelerate.commands.launch", *launch, str(PRETRAIN_SCRIPT), *flags]


@pytest.fixture(scope="module")
def one_process(corpus_file, tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("one")
    flags = dict(corpus=corpus_file, tokenizer=tokenizer_dir, cache=root / "cache", **COMMON)
    run_checked(
        [sys.executable, str(PRETRAIN_SCRIPT), *script_flags(root / "run", per_device_batch_size=8, **flags)],
        root / "run.log",
    )
    return root / "run"


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def deepspeed_runs(request, corpus_file, tokenizer_dir, tmp_path_factory):
    stage = request.param
    root = tmp_path_factory.mktemp(f"zero{stage}")
    flags = dict(corpus=corpus_file, tokenizer=tokenizer_dir, cache=root / "cache", **COMMON)
    whole, resumed, output, resumed_output = run_and_resume(
        functools.partial(_deepspeed_launch, stage), root, STEPS, per_device_batch_size=4, **flags
    )
    return stage, whole, resumed, output, resumed_output


def _entries(output_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train_loss"]) for r in read_metrics(output_dir) if "train_loss" in r]


def test_deepspeed_follows_the_one_process_run_and_saves_a_plain_model(one_process, deepspeed_runs):
    _, whole, _, output, _ = deepspeed_runs
    assert "over 2 processes" in output
    # Same 8 windows per step as the one process. Measured: the losses differ by at most 9.5e-7 at
    # both stages (float32 rounding of two half-batch gradients reduced instead of one mean).
    assert [step for step, _ in _entries(whole)] == list(range(1, STEPS + 1))
    assert [loss for _, loss in _entries(whole)] == pytest.approx(
        [loss for _, loss in _entries(one_process)], abs=LOSS_TOLERANCE
    )
    # The final folder is a plain MiniGPT gathered on rank 0 (measured: logits within 1.8e-6).
    plain, gathered = (MiniGPTForCausalLM.from_pretrained(out / "model").eval() for out in (one_process, whole))
    assert gathered.lm_head.weight.data_ptr() == gathered.model.tok_emb.weight.data_ptr()
    ids = torch.randint(0, plain.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            gathered(input_ids=ids).logits, plain(input_ids=ids).logits, atol=LOGIT_TOLERANCE, rtol=0
        )


def test_a_deepspeed_checkpoint_holds_the_one_process_training_state(one_process, deepspeed_runs):
    """Gathered by name, DeepSpeed's flat per-rank slices become the files a one-process run writes,
    with the same weights and AdamW state (step, moments) to float32 rounding."""
    _, whole, _, _, _ = deepspeed_runs
    step_10 = [out / "checkpoints" / "step_10" for out in (one_process, whole)]
    reference, gathered = (torch.load(folder / "optimizer.pt", weights_only=True) for folder in step_10)
    assert [g["params"] for g in gathered["param_groups"]] == [g["params"] for g in reference["param_groups"]]
    assert gathered["state"].keys() == reference["state"].keys()
    for name, entry in reference["state"].items():
        assert gathered["state"][name].keys() == entry.keys()
        assert gathered["state"][name]["step"].item() == entry["step"].item() == 10
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(gathered["state"][name][key], entry[key], atol=MOMENT_TOLERANCE, rtol=0)
    weights = [load_file(folder / "model.safetensors") for folder in step_10]
    tied = {"lm_head.weight", "model.tok_emb.weight"}  # saved once by the one process, under each name here
    for name, tensor in weights[1].items():
        reference_name = name if name in weights[0] else next(iter(tied & weights[0].keys()))
        torch.testing.assert_close(tensor, weights[0][reference_name], atol=WEIGHT_TOLERANCE, rtol=0)


def test_deepspeed_resumes_from_its_checkpoint(deepspeed_runs):
    _, whole, resumed, _, resumed_output = deepspeed_runs
    assert "resuming from step 10" in resumed_output
    # The whole state scattered back into DeepSpeed's slices: the resumed run repeats the
    # uninterrupted one bit for bit (losses and final weights).
    assert _entries(resumed) == _entries(whole)
    weights = [load_file(out / "model" / "model.safetensors") for out in (whole, resumed)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
