"""training/jobs/dpo.py: the loss against TRL's DPOTrainer and the book's formula, the references
(frozen copy, adapter disabled, precomputed), the whole job, bad inputs, resume after SIGKILL.
Tiny models (2 layers, 32 dims) and a tokenizer trained in-process."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from helpers.models import tiny_model
from helpers.processes import killed_before_logging, launch
from helpers.runs import (
    FINETUNE_LOOP,
    REPO_ROOT,
    argument_groups,
    card_results,
    load_script,
    read_metrics,
    save_tiny_base,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from modeling_minigpt import MiniGPTForCausalLM
from tokenization.alpaca import format_prompt
from training.data.preferences import REFERENCE_COLUMN, build_preference_dataset, collate_preference_batch
from training.data.tasks import make_preference_splits
from training.evaluation.generate import generate_answers
from training.jobs.dpo import (
    DisabledAdapter,
    DPOArguments,
    DPOLoss,
    DPOObjective,
    FrozenCopy,
    compute_reference_logps,
    precomputed_reference,
    response_logps,
    run_dpo,
)
from training.run.arguments import LoopArguments
from training.run.lora import LoraArguments, apply_lora

SCRIPT = REPO_ROOT / "scripts" / "dpo.py"
LN2 = math.log(2.0)

PAIRS = [
    {"instruction": "Name a colour.", "input": "", "chosen": "Blue.", "rejected": "A colour is a thing."},
    {"instruction": "Sum the numbers.", "input": "2 and 3", "chosen": "5", "rejected": "The sum is 6, I think."},
    {"instruction": "Translate to French.", "input": "Good morning", "chosen": "Bonjour.", "rejected": "Bonsoir."},
    {"instruction": "What does the for statement do?", "input": "", "chosen": "It iterates.", "rejected": "No."},
]


def tiny_lm(tokenizer, seed: int) -> MiniGPTForCausalLM:
    return tiny_model(len(tokenizer), context_length=128, seed=seed)


@pytest.fixture(scope="module")
def batch(tiny_tokenizer):
    """All four pairs in one batch: (8, T), the chosen rows first."""
    dataset, _ = build_preference_dataset(PAIRS, tiny_tokenizer)
    return collate_preference_batch(list(dataset), tiny_tokenizer.pad_token_id)


# ----------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_policy_equal_to_reference_gives_ln2_and_zero_rewards(tiny_tokenizer, batch, reduction):
    policy = tiny_lm(tiny_tokenizer, seed=0)
    lora = apply_lora(tiny_lm(tiny_tokenizer, seed=0), LoraArguments(lora_r=4, lora_dropout=0.0))  # B = 0: no change
    sums, _ = response_logps(policy, batch)
    references = {
        "frozen copy": (policy, FrozenCopy(policy, torch.device("cpu"))),
        "adapter disabled": (lora, DisabledAdapter(Accelerator(cpu=True))),
        "precomputed": (policy, precomputed_reference),
    }
    for name, (model, reference) in references.items():
        loss = DPOLoss(DPOObjective(beta=0.1, reduction=reduction), reference)
        terms = loss.pair_terms(model, {**batch, REFERENCE_COLUMN: sums.detach()})
        assert terms.losses.tolist() == [LN2] * 4, name  # exactly ln 2, every pair
        assert terms.chosen_rewards.tolist() == terms.rejected_rewards.tolist() == [0.0] * 4, name
    ipo = DPOLoss(DPOObjective(beta=0.1, loss_type="ipo"), FrozenCopy(policy, torch.device("cpu")))
    assert ipo.pair_terms(policy, batch).losses.tolist() == pytest.approx([(1 / (2 * 0.1)) ** 2] * 4, abs=1e-12)


def trl_loss(policy, reference, tokenizer, tmp_path, **config) -> torch.Tensor:
    """TRL's DPOTrainer on PAIRS, as one batch: its own tokenization, collator and loss."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    rows = [
        {"prompt": format_prompt(p["instruction"], p["input"]), **{k: p[k] for k in ("chosen", "rejected")}}
        for p in PAIRS
    ]
    args = trl.DPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=len(rows),
        report_to=[],
        use_cpu=True,
        bf16=False,
        **config,
    )
    trainer = trl.DPOTrainer(
        model=copy.deepcopy(policy),  # TRL patches the forward of the models it is given
        ref_model=copy.deepcopy(reference),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    (trl_batch,) = list(trainer.get_train_dataloader())
    trainer.model.eval()
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, trl_batch)


@pytest.mark.parametrize(
    ("loss_type", "sft_weight"), [("sigmoid", 0.0), ("ipo", 0.0), ("sigmoid", 0.5)], ids=["dpo", "ipo", "rpo"]
)
def test_loss_of_one_batch_equals_trl_dpo_trainer(tiny_tokenizer, batch, tmp_path, loss_type, sft_weight):
    """sigmoid (DPO), IPO, and DPO plus the SFT term (TRL's ["sigmoid", "sft"]); log-probabilities
    summed, fp32 models (TRL's config defaults to bf16 where the CPU has it): TRL's number to 1e-5."""
    policy, reference = tiny_lm(tiny_tokenizer, seed=0), tiny_lm(tiny_tokenizer, seed=1)
    objective = DPOObjective(beta=0.1, loss_type=loss_type, sft_weight=sft_weight)
    with torch.no_grad():
        ours = DPOLoss(objective, FrozenCopy(reference, torch.device("cpu")))(policy, batch).item()
    losses = {"loss_type": [loss_type]}
    if sft_weight:
        losses = {"loss_type": [loss_type, "sft"], "loss_weights": [1.0, sft_weight]}
    theirs = trl_loss(policy, reference, tiny_tokenizer, tmp_path, beta=0.1, **losses).item()
    print(f"{loss_type} + {sft_weight} x sft: ours {ours:.8f}, TRL {theirs:.8f}, |diff| {abs(ours - theirs):.2e}")
    assert abs(ours - LN2) > 1e-3  # the two models differ: not the trivial value
    assert ours == pytest.approx(theirs, abs=1e-5)


def book_logprobs(logits, labels, selection_mask):
    """The book's `compute_logprobs` (dpo-from-scratch notebook), written out: the mean over the
    selected tokens of the log-probability of each next token."""
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    log_probs = F.log_softmax(logits, dim=-1)
    selected = torch.gather(input=log_probs, dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)
    mask = selection_mask[:, 1:].clone()
    return (selected * mask).sum(-1) / mask.sum(-1)


def test_mean_reduction_is_the_books_formula(tiny_tokenizer, batch):
    policy, reference = tiny_lm(tiny_tokenizer, seed=0), tiny_lm(tiny_tokenizer, seed=1)
    beta = 0.1
    with torch.no_grad():
        ours = DPOLoss(DPOObjective(beta=beta, reduction="mean"), FrozenCopy(reference, torch.device("cpu")))
        terms = ours.pair_terms(policy, batch)
        # The book's compute_dpo_loss on its selection mask (the response tokens), by hand.
        mask = (batch["labels"] != -100).float()
        ids = batch["input_ids"]
        pc, pr = book_logprobs(policy(input_ids=ids, attention_mask=batch["attention_mask"]).logits, ids, mask).chunk(2)
        rc, rr = book_logprobs(
            reference(input_ids=ids, attention_mask=batch["attention_mask"]).logits, ids, mask
        ).chunk(2)
        book_losses = -F.logsigmoid(beta * ((pc - pr) - (rc - rr)))
    torch.testing.assert_close(terms.losses.float(), book_losses, atol=1e-6, rtol=0)
    # The book reports rewards without β; ours (and TRL's) are β · log-ratio.
    torch.testing.assert_close(terms.chosen_rewards.float(), beta * (pc - rc), atol=1e-6, rtol=0)
    torch.testing.assert_close(terms.rejected_rewards.float(), beta * (pr - rr), atol=1e-6, rtol=0)


def test_label_smoothing_is_conservative_dpo():
    """cDPO: -(1-ε) log σ(βh) - ε log σ(-βh), h the difference of log-ratios; checked on numbers."""
    policy = torch.tensor([-3.0, -9.0, -4.0, -2.0], dtype=torch.float64)  # chosen 0, 1; rejected 0, 1
    reference = torch.tensor([-4.0, -8.0, -4.5, -1.0], dtype=torch.float64)
    tokens = torch.tensor([2, 3, 4, 5])
    terms = DPOObjective(beta=0.5, label_smoothing=0.2).terms(policy, reference, tokens)
    h = torch.tensor([(-3.0 + 4.0) - (-4.0 + 4.5), (-9.0 + 8.0) - (-2.0 + 1.0)], dtype=torch.float64)
    expected = -0.8 * torch.log(torch.sigmoid(0.5 * h)) - 0.2 * torch.log(torch.sigmoid(-0.5 * h))
    torch.testing.assert_close(terms.losses, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(terms.chosen_rewards, 0.5 * torch.tensor([1.0, -1.0], dtype=torch.float64))


# ----------------------------------------------------------------------------- the references


def test_lora_reference_with_the_adapter_disabled_equals_a_frozen_copy(tiny_tokenizer, batch):
    base = tiny_lm(tiny_tokenizer, seed=0)
    frozen = FrozenCopy(base, torch.device("cpu"))
    policy = apply_lora(base, LoraArguments(lora_r=4, lora_dropout=0.0))
    torch.manual_seed(5)
    with torch.no_grad():  # a trained adapter: B no longer 0, so the policy moved away from the base
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
        disabled = DisabledAdapter(Accelerator(cpu=True))(policy, batch)
        copied = frozen(policy, batch)
        moved = response_logps(policy, batch)[0]
    torch.testing.assert_close(disabled, copied, atol=1e-6, rtol=0)
    assert (moved - copied).abs().max() > 1e-2


def test_precomputed_reference_equals_the_frozen_copy(tiny_tokenizer):
    records, _ = make_preference_splits(20, 0, seed=2)
    base = tiny_lm(tiny_tokenizer, seed=0)
    dataset, _ = build_preference_dataset(records, tiny_tokenizer, max_length=base.config.max_position_embeddings)
    collate = lambda rows: collate_preference_batch(rows, tiny_tokenizer.pad_token_id)  # noqa: E731
    table = compute_reference_logps(base, dataset, collate, batch_size=3, accelerator=Accelerator(cpu=True))
    assert table.shape == (len(dataset), 2) and table.dtype == torch.float64
    batch = collate(list(dataset))  # other batches, other padding: the same numbers
    chosen, rejected = FrozenCopy(base, torch.device("cpu"))(base, batch).chunk(2)
    torch.testing.assert_close(table, torch.stack([chosen, rejected], dim=1), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- the job


@pytest.fixture(scope="module")
def base_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    """A random tiny base with dropout 0.1: DPO switches it off while training, the saved config keeps it."""
    return save_tiny_base(tmp_path_factory.mktemp("dpo_base"), tiny_tokenizer, drop_rate=0.1)


TINY_DPO = dict(num_train_pairs=32, num_heldout_pairs=8, max_new_tokens=6, eval_batch_size=8, generations_shown=2)
TINY_LOOP = dict(FINETUNE_LOOP, weight_decay=0.0, eval_every=3)


def tiny_dpo(base: Path, out: Path, lora: dict | None = None, **overrides):
    """(DPOArguments, LoraArguments, LoopArguments) for a tiny run."""
    defaults = {DPOArguments: dict(TINY_DPO, model_path=str(base)), LoraArguments: lora or {}}
    return argument_groups({**defaults, LoopArguments: dict(TINY_LOOP, output_dir=str(out))}, overrides)


def write_pairs(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps([{k: r[k] for k in ("instruction", "input", "chosen", "rejected")} for r in records]))
    return path


@pytest.fixture(scope="module")
def full_run(base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo") / "full"
    return run_dpo(*tiny_dpo(base_dir, out)), out


VALUES = {
    "val_loss",
    "val_rewards_chosen",
    "val_rewards_rejected",
    "val_reward_margin",
    "val_reward_accuracy",
    "val_logps_chosen",
    "val_logps_rejected",
    "val_chosen_nll",
    "val_exact_match",
    "val_match_rejected",
}


def test_full_run_measures_before_and_after_on_the_heldout_pairs(full_run):
    result, out = full_run
    final = json.loads((out / "final_metrics.json").read_text())
    before, after = final["before"], final["after"]
    assert before["val_loss"] == LN2 and before["val_reward_margin"] == before["val_reward_accuracy"] == 0.0
    assert VALUES <= set(after) and after == result.after and final["steps"] == 6 and final["heldout_pairs"] == 8
    assert after["val_loss"] != before["val_loss"] and after["val_chosen_nll"] != before["val_chosen_nll"]
    records = read_metrics(out)
    assert [r["step"] for r in records if "val_reward_accuracy" in r] == [0, 3, 6]
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3, 4, 5, 6]
    assert records[1]["train_loss"] == pytest.approx(LN2, abs=1e-6)  # the first step starts at the reference


def test_saved_folder_is_the_tuned_model_with_its_card_curves_and_the_bases_dropout(full_run, base_dir, tiny_tokenizer):
    _, out = full_run
    assert {"README.md", "loss_curve.png", "preference_curves.png", "modeling_minigpt.py"} <= {
        p.name for p in (out / "model").iterdir()
    }
    card = (out / "model" / "README.md").read_text()
    assert "## Preference tuning (DPO)" in card and "DPO (sigmoid loss), β 0.1" in card
    assert "| Reward accuracy (chosen reward > rejected) | 0 |" in card and "frozen copy of the base" in card
    assert "![DPO loss, rewards, reward accuracy and log-probabilities](preference_curves.png)" in card
    after = json.loads((out / "final_metrics.json").read_text())["after"]
    assert card_results(out / "model") == {
        "loss": after["val_chosen_nll"],
        "reward_accuracy": after["val_reward_accuracy"],
        "reward_margin": after["val_reward_margin"],
    }
    model = AutoModelForCausalLM.from_pretrained(out / "model", trust_remote_code=True)
    assert model.config.drop_rate == 0.1  # switched off while training only
    base = load_file(base_dir / "model.safetensors")
    tuned = load_file(out / "model" / "model.safetensors")
    assert any(not torch.equal(base[k], tuned[k]) for k in base)
    # The generations table: the base's greedy answers before, the saved model's after.
    rows = json.loads((out / "heldout_generations.json").read_text())
    _, heldout = make_preference_splits(32, 8, seed=0)
    assert [(r["instruction"], r["chosen"], r["rejected"], r["kind"]) for r in rows] == [
        (h["instruction"], h["chosen"], h["rejected"], h["kind"]) for h in heldout
    ]
    untuned = AutoModelForCausalLM.from_pretrained(base_dir)
    assert [r["before"] for r in rows] == generate_answers(untuned, tiny_tokenizer, heldout, 6, 8)
    assert [r["after"] for r in rows] == generate_answers(model, tiny_tokenizer, heldout, 6, 8)
    assert json.loads((out / "heldout_generations_before.json").read_text()) == [r["before"] for r in rows]


def test_training_on_the_scored_pairs_raises_reward_accuracy_and_margin(base_dir, tmp_path):
    """On pairs it trains on, DPO must separate chosen from rejected: a real effect, not noise."""
    train, _ = make_preference_splits(16, 0, seed=4)
    data = write_pairs(tmp_path / "pairs.json", train)
    result = run_dpo(
        *tiny_dpo(
            base_dir, tmp_path / "out", train_file=str(data), validation_file=str(data), max_steps=12, eval_every=12
        )
    )
    before, after = result.before, result.after
    assert after["val_reward_accuracy"] >= 0.75 and after["val_reward_margin"] > 0.1
    assert after["val_loss"] < before["val_loss"] - 0.05


def test_lora_run_uses_the_base_with_the_adapter_disabled(base_dir, tmp_path):
    out = tmp_path / "lora"
    result = run_dpo(
        *tiny_dpo(base_dir, out, lora=dict(lora_r=4), finetune="lora", learning_rate=1e-2, max_steps=3, eval_every=3)
    )
    assert result.adapter_dir == out / "adapter" and (out / "adapter" / "adapter_config.json").is_file()
    assert result.before["val_loss"] == LN2  # a fresh adapter: the policy is its reference
    assert result.after["val_loss"] != LN2
    assert "the base model with the LoRA adapter disabled" in (out / "model" / "README.md").read_text()


def test_precomputed_reference_gives_the_frozen_copy_run_and_is_reused(full_run, base_dir, tmp_path):
    _, reference_out = full_run
    out = tmp_path / "pre"
    result = run_dpo(*tiny_dpo(base_dir, out, reference="precomputed"))
    cache = out / "reference_logps.safetensors"
    assert set(load_file(cache)) == {"train", "heldout"}
    reference = {k: v for k, v in json.loads((reference_out / "final_metrics.json").read_text())["after"].items()}
    assert result.after == pytest.approx(reference, abs=1e-6)
    # Another run reads the same cache instead of computing it...
    again = run_dpo(*tiny_dpo(base_dir, tmp_path / "again", reference="precomputed", reference_cache=str(cache)))
    assert again.after == pytest.approx(result.after, abs=1e-12)
    # ...and refuses it for other pairs, before writing anything.
    with pytest.raises(ValueError, match=r"reference cache .* was computed from another pairs_sha256 than this run's"):
        run_dpo(
            *tiny_dpo(base_dir, tmp_path / "other", reference="precomputed", reference_cache=str(cache), data_seed=9)
        )
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("reference", ["precomputed", "frozen"])
def test_under_bf16_on_a_cpu_the_reference_runs_on_the_policys_attention_path(base_dir, tmp_path, reference):
    """bf16 autocast on a CPU trains on the eager attention path (`attention: auto`); the reference
    is built after that choice, so before any step policy and reference agree: zero rewards."""
    run = run_dpo(*tiny_dpo(base_dir, tmp_path / reference, reference=reference, mixed_precision="bf16", max_steps=1))
    assert run.before["val_rewards_chosen"] == pytest.approx(0.0, abs=1e-7)
    assert run.before["val_reward_margin"] == pytest.approx(0.0, abs=1e-7)


# ----------------------------------------------------------------------------- the script: bad input, configs


@pytest.fixture(scope="module")
def dpo_script():
    return load_script("dpo")


def error_line(stderr: str) -> str:
    """The one `error: ...` line a script ends with (progress bars of model loading may come before it)."""
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and [line for line in lines if line.startswith("error: ")] == lines[-1:], stderr
    return lines[-1]


def test_bad_inputs_give_one_clear_line_and_write_nothing(dpo_script, base_dir, full_run, tmp_path, capsys):
    sft_file = tmp_path / "sft.json"
    sft_file.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}] * 4))
    common = ["--model_path", str(base_dir), "--report_to", "none", "--max_steps", "1", "--num_train_pairs", "32"]
    cases = {
        "a": (["--train_file", str(sft_file)], r"sft.json record 0: no 'chosen' and 'rejected'.*scripts/sft.py"),
        "b": (["--beta", "0"], r"--beta must be > 0"),
        "c": (["--loss_type", "ipo", "--label_smoothing", "0.1"], r"IPO has no label smoothing"),
        "d": (["--reference_cache", "x.safetensors"], r"--reference_cache needs --reference precomputed"),
        "e": (["--max_length", "8"], r"no preference pair of the 32 training records is left.*--max_length"),
        "f": (["--learning_rate", "1e-3", "--output_dir", str(full_run[1])], r"already holds a run"),
    }
    for name, (flags, message) in cases.items():
        argv = [*common, "--output_dir", str(tmp_path / name), *flags]
        assert dpo_script.main(argv) == 1, name
        err = error_line(capsys.readouterr().err)
        assert re.search(message, err), (name, err)
        assert not (tmp_path / name).exists(), name


def test_sft_refuses_a_preference_file_with_one_line_pointing_to_dpo(base_dir, tmp_path, capsys):
    data = write_pairs(tmp_path / "prefs.json", make_preference_splits(8, 0, seed=0)[0])
    argv = ["--model_path", str(base_dir), "--train_file", str(data), "--output_dir", str(tmp_path / "out")]
    assert load_script("sft").main([*argv, "--report_to", "none"]) == 1
    err = error_line(capsys.readouterr().err)
    assert err.startswith("error: prefs.json record 0: has 'chosen'/'rejected'") and "scripts/dpo.py" in err
    assert not (tmp_path / "out").exists()


def test_dpo_configs_parse(dpo_script):
    for config in sorted((REPO_ROOT / "scripts" / "configs").glob("dpo_*.yaml")):
        dpo_args, _, loop_args = dpo_script.parse_args([str(config), "--model_path", "m"])
        assert dpo_args.beta > 0 and loop_args.output_dir, config


# ----------------------------------------------------------------------------- resume after SIGKILL


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["model", "precomputed"])
def test_sigkill_then_resume_gives_bit_identical_weights(tiny_tokenizer, tmp_path, reference):
    steps = 24
    base = save_tiny_base(tmp_path / "base", tiny_tokenizer, drop_rate=0.1)
    flags = [
        "--model_path", str(base), "--num_train_pairs", "64", "--num_heldout_pairs", "4",
        "--max_new_tokens", "4", "--reference", reference, "--max_steps", str(steps),
        "--per_device_batch_size", "4", "--gradient_accumulation_steps", "2", "--learning_rate", "3e-3",
        "--warmup_steps", "5", "--log_every", "1", "--save_every", "5", "--eval_every", "12", "--report_to", "none",
    ]  # fmt: skip
    reference_out, killed_out = tmp_path / "reference", tmp_path / "killed"
    uninterrupted = launch(SCRIPT, [*flags, "--output_dir", str(reference_out)], tmp_path / "reference.log")
    # Killed from inside as step 13 is about to be logged: the last checkpoint is step 10's.
    killed_before_logging(SCRIPT, [*flags, "--output_dir", str(killed_out)], 13, tmp_path)
    assert max(r["step"] for r in read_metrics(killed_out)) == 12 and not (killed_out / "model").exists()

    resumed = launch(SCRIPT, [*flags, "--output_dir", str(killed_out), "--resume", "true"], tmp_path / "resumed.log")
    assert resumed.wait(timeout=600) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert uninterrupted.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    log = (tmp_path / "resumed.log").read_text()
    assert int(log.split("resuming from step ")[1].split()[0]) == 10
    if reference == "precomputed":
        assert "reference log-probabilities: read from" in log  # the cache of the killed run, not recomputed

    expected = load_file(reference_out / "model" / "model.safetensors")
    actual = load_file(killed_out / "model" / "model.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected), "resumed weights differ"
    keep = ("step", "train_loss", "grad_norm", *sorted(VALUES))
    metrics = lambda out: [{k: r[k] for k in keep if k in r} for r in read_metrics(out)]  # noqa: E731
    assert metrics(killed_out) == metrics(reference_out)
    generations = lambda out: json.loads((out / "heldout_generations.json").read_text())  # noqa: E731
    assert generations(killed_out) == generations(reference_out)


# ----------------------------------------------------------------------------- two processes


@pytest.mark.slow
def test_two_processes_follow_the_one_process_run_and_only_rank_zero_writes(tiny_tokenizer, tmp_path):
    """1 process x 4 pairs = 2 processes x 2 pairs per step: the same pairs, the same mean loss."""
    import subprocess
    import sys

    from helpers.processes import SUBPROCESS_ENV, two_cpu_processes

    base = save_tiny_base(tmp_path / "base", tiny_tokenizer)
    flags = [
        "--model_path", str(base), "--num_train_pairs", "48", "--num_heldout_pairs", "6", "--max_new_tokens", "4",
        "--eval_batch_size", "4", "--max_steps", "8", "--learning_rate", "3e-3", "--warmup_steps", "2",
        "--log_every", "1", "--eval_every", "4", "--save_every", "4", "--report_to", "none",
        "--mixed_precision", "no",
    ]  # fmt: skip
    env = {**SUBPROCESS_ENV, "ACCELERATE_USE_CPU": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    commands = {
        one: [sys.executable, str(SCRIPT), *flags, "--per_device_batch_size", "4", "--output_dir", str(one)],
        two: two_cpu_processes(SCRIPT, *flags, "--per_device_batch_size", "2", "--output_dir", str(two)),
    }
    outputs = {}
    for out, command in commands.items():
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
        outputs[out] = result.stdout + result.stderr
    assert "processes: 2" in outputs[two] and outputs[two].count("resolved configuration:") == 1
    single, double = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in double] == [r["step"] for r in single]
    for a, b in zip(single, double, strict=True):  # fp32 summation order differs; a wrong pair moves ~1e-2
        for key in ("train_loss", *VALUES):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-4), (a["step"], key)
    files = lambda out: sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())  # noqa: E731
    extra = set(files(two)) - set(files(one))
    # Rank 1 adds only its own RNG state to each checkpoint: a second writer would add logs or a model.
    assert extra == {f"checkpoints/step_{s}/rng_rank1.safetensors" for s in (4, 8)}, extra
    generations = lambda out: json.loads((out / "heldout_generations.json").read_text())  # noqa: E731
    assert generations(two) == generations(one)
