"""training/jobs/grpo.py: the loss against TRL's GRPOTrainer on one fixed batch,
the rewards, the sampling, the whole job, bad inputs, resume after SIGKILL, two processes.
Tiny models (2 layers, 32 dims) and a tokenizer trained in-process."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from helpers.processes import SUBPROCESS_ENV, killed_before_logging, launch, two_cpu_processes
from helpers.runs import FINETUNE_LOOP, argument_groups, load_script, read_metrics, save_tiny_base
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from apps.inspect_model import load_for_app
from tokenization.alpaca import format_prompt
from training.data.collate import pad_sequences
from training.data.instructions import encode_prompt
from training.data.rewards import Rewards, exact_match_reward, partial_match_reward
from training.data.tasks import make_task_splits
from training.jobs.grpo import (
    GRPOArguments,
    GRPOLoss,
    GRPOObjective,
    Sampling,
    completion_logps,
    group_signal,
    load_prompt_splits,
    row_seeds,
    run_grpo,
    sample_completions,
)
from training.run.arguments import LoopArguments
from training.run.lora import LoraArguments
from training.run.reference import FrozenCopy

REPO_ROOT = Path(__file__).resolve().parents[3]
SCRIPT = REPO_ROOT / "scripts" / "grpo.py"

RECORDS = [
    {"instruction": "Reverse the order of the words.", "input": "cat dog sun", "output": "sun dog cat"},
    {"instruction": "Pick the longest word.", "input": "ox horse cat", "output": "horse"},
    {"instruction": "Repeat this phrase: red sun", "input": "", "output": "red sun"},
]
# Three groups of four completions each: right, near misses, wrong, one cut short (no eos).
COMPLETIONS = [
    ["sun dog cat", "sun cat dog", "dog", "sun dog cat and more words"],
    ["horse", "cat", "horse", "ox"],
    ["red sun"] * 4,  # all equal rewards: no signal, left out of our forward when β = 0
]
G = 4


# ----------------------------------------------------------------------------- the loss against TRL


@pytest.fixture(scope="module")
def base_dir(tiny_tokenizer, tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("grpo_base"), tiny_tokenizer, context_length=128)


def fixed_rollout(tokenizer):
    """The prompts and completions as TRL's `_generate` returns them (lists of ids, eos where the
    completion stopped) and as our loss reads them (padded tensors)."""
    eos = tokenizer.eos_token_id
    prompt_ids, completion_ids = [], []
    for record, group in zip(RECORDS, COMPLETIONS, strict=True):
        prompt = encode_prompt(tokenizer, record)
        for i, text in enumerate(group):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            prompt_ids.append(prompt)
            completion_ids.append(ids if i == 3 else [*ids, eos])  # the 4th of each group was cut short
    pad = tokenizer.pad_token_id
    rollout = {
        "prompt_ids": pad_sequences(prompt_ids, pad, side="left"),
        "prompt_mask": pad_sequences([[1] * len(p) for p in prompt_ids], 0, side="left"),
        "completion_ids": pad_sequences(completion_ids, pad, side="right"),
        "completion_mask": pad_sequences([[1] * len(c) for c in completion_ids], 0, side="right"),
    }
    return prompt_ids, completion_ids, rollout


def perturbed(model):
    """`model` moved away from the saved base by seeded noise: the policy after some training, so
    that the KL to the reference (the saved base) is not zero."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model


def trl_loss_and_advantages(base_dir, tokenizer, tmp_path, prompt_ids, completion_ids, **config):
    """TRL's GRPOTrainer on the fixed rollout: its own reward weighting, group normalisation,
    reference model (built by TRL from the folder) and loss; only the sampling is replaced."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    rows = [{"prompt": format_prompt(r["instruction"], r["input"]), "output": r["output"]} for r in RECORDS]
    args = trl.GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=len(completion_ids),
        num_generations=G,
        max_completion_length=max(map(len, completion_ids)),
        report_to=[],
        use_cpu=True,
        disable_dropout=True,
        reward_weights=[1.0, 0.5],
        **config,
    )
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=[partial_match_reward, exact_match_reward],  # ours, in TRL's convention
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    perturbed(model)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    trainer._generate = lambda prompts: (prompt_ids, completion_ids, None, texts, None, {}, None, [])
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    inputs = trainer._generate_and_score_completions([row for row in rows for _ in range(G)])
    return trainer.compute_loss(trainer.model, inputs), inputs["advantages"]


def our_loss_and_advantages(base_dir, tokenizer, rollout, **config):
    objective = GRPOObjective(
        loss_type=config.get("loss_type", "dapo"),
        scale_rewards=config.get("scale_rewards", "group"),
        beta=config.get("beta", 0.0),
        max_completion_length=rollout["completion_ids"].size(1),
    )
    temperature = config.get("temperature", 1.0)
    sampling = Sampling(G, rollout["completion_ids"].size(1), temperature, 0, 1.0)
    policy = AutoModelForCausalLM.from_pretrained(base_dir)
    score = lambda m, b: completion_logps(m, b, temperature)  # noqa: E731
    reference = FrozenCopy(policy, torch.device("cpu"), score=score)
    perturbed(policy)
    rewards = Rewards.load(["partial_match", "exact_match"], [1.0, 0.5])
    loss = GRPOLoss(objective, sampling, rewards, RECORDS, tokenizer, Accelerator(cpu=True), 0, reference)
    records = [r for r in RECORDS for _ in range(G)]
    lengths = rollout["completion_mask"].sum(1).tolist()
    ids = [row[:n] for row, n in zip(rollout["completion_ids"].tolist(), lengths, strict=True)]
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    total, _ = rewards.score(texts, records)
    rewards = torch.tensor(total)
    batch_std = rewards.std() if objective.scale_rewards == "batch" else None
    signal = group_signal(rewards, G)
    rollout = {**rollout, "advantages": objective.advantages(rewards, G, batch_std) * signal, "signal": signal}
    policy.train()
    return loss.loss(policy, rollout)[0], rollout["advantages"]


@pytest.mark.parametrize(
    "config",
    [
        {"loss_type": "dapo"},
        {"loss_type": "grpo", "beta": 0.04},
        {"loss_type": "dr_grpo", "scale_rewards": "none", "beta": 0.1},
        {"loss_type": "dapo", "scale_rewards": "batch", "beta": 0.04, "temperature": 0.7},
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_loss_of_one_fixed_batch_equals_trl_grpo_trainer(base_dir, tiny_tokenizer, tmp_path, config):
    prompt_ids, completion_ids, rollout = fixed_rollout(tiny_tokenizer)
    theirs, trl_advantages = trl_loss_and_advantages(
        base_dir, tiny_tokenizer, tmp_path, prompt_ids, completion_ids, **config
    )
    ours, advantages = our_loss_and_advantages(base_dir, tiny_tokenizer, rollout, **config)
    torch.testing.assert_close(advantages, trl_advantages, atol=1e-6, rtol=0)
    assert advantages.abs().sum() > 1  # the rewards differ within each group
    torch.testing.assert_close(ours, theirs.detach(), atol=1e-5, rtol=0)


def test_the_gradient_raises_the_better_completions(base_dir, tiny_tokenizer):
    """One plain SGD step on the loss: the log-probability of each group's best completion rises."""
    _, _, rollout = fixed_rollout(tiny_tokenizer)
    policy = AutoModelForCausalLM.from_pretrained(base_dir)
    objective = GRPOObjective()
    rewards = torch.tensor([1.0, 0.4, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    rollout = {**rollout, "advantages": objective.advantages(rewards, G)}
    mask = rollout["completion_mask"].float()
    before = (completion_logps(policy, rollout) * mask).sum(1)
    logps = completion_logps(policy, rollout)
    loss = objective.aggregate(
        objective.per_token_loss(logps, logps.detach(), rollout["advantages"], None)[0], mask, mask.sum()
    )
    loss.backward()
    with torch.no_grad():
        for p in policy.parameters():
            p -= 0.05 * p.grad
    after = (completion_logps(policy, rollout) * mask).sum(1)
    assert (after - before)[[0, 4, 6]].min() > 0 and (after - before)[[2, 3, 5, 7]].max() < 0


# ----------------------------------------------------------------------------- sampling


def test_each_completion_is_a_function_of_its_own_seed_whatever_shares_its_batch(base_dir, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    _, _, rollout = fixed_rollout(tiny_tokenizer)
    prompts, mask = rollout["prompt_ids"][: 2 * G : G], rollout["prompt_mask"][: 2 * G : G]  # two, left-padded
    sampling = Sampling(3, 6, 1.0, 0, 1.0)
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    seeds = row_seeds(7, 0, [0, 1], 3)
    state = torch.get_rng_state()
    both = sample_completions(model, prompts, mask, sampling, seeds, eos, pad)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    # The second prompt alone (no padding, another batch) samples the same completions.
    n = int(mask[1].sum())
    alone = sample_completions(model, prompts[1:, -n:], mask[1:, -n:], sampling, seeds[3:], eos, pad)
    width = alone["completion_ids"].size(1)
    assert torch.equal(both["completion_ids"][3:, :width], alone["completion_ids"])
    other = sample_completions(model, prompts, mask, sampling, row_seeds(8, 0, [0, 1], 3), eos, pad)
    assert not torch.equal(both["completion_ids"], other["completion_ids"])
    # The mask covers each row up to and including its first eos; stopped rows have one.
    rows = zip(both["completion_ids"].tolist(), both["completion_mask"].tolist(), both["stopped"].tolist(), strict=True)
    for ids, m, stopped in rows:
        k = sum(m)
        assert m == [1] * k + [0] * (len(m) - k) and (eos in ids[:k]) == stopped
        assert not stopped or ids.index(eos) == k - 1


def test_sampling_follows_the_warped_distribution(base_dir, tiny_tokenizer):
    """Top-k 1 is greedy: the same first token as argmax; temperature spreads the draws."""
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    _, _, rollout = fixed_rollout(tiny_tokenizer)
    prompts, mask = rollout["prompt_ids"][:1], rollout["prompt_mask"][:1]
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    greedy = sample_completions(model, prompts, mask, Sampling(8, 1, 1.0, 1, 1.0), row_seeds(0, 0, [0], 8), eos, pad)
    with torch.no_grad():
        argmax = model(input_ids=prompts, attention_mask=mask).logits[0, -1].argmax()
    assert (greedy["completion_ids"][:, 0] == argmax).all()
    hot = sample_completions(model, prompts, mask, Sampling(64, 1, 2.0, 0, 1.0), row_seeds(0, 0, [0], 64), eos, pad)
    assert len(set(hot["completion_ids"][:, 0].tolist())) > 10


# ----------------------------------------------------------------------------- the job


TINY_GRPO = dict(
    num_train_tasks=32,
    num_heldout_tasks=8,
    task_kinds=["repeat", "longest"],
    num_generations=4,
    max_completion_length=6,
    max_new_tokens=6,
    eval_batch_size=8,
    reward_functions=["partial_match", "format"],
    reward_weights=[1.0, 0.1],
)
TINY_LOOP = dict(FINETUNE_LOOP, per_device_batch_size=2, weight_decay=0.0, eval_every=3)


def tiny_grpo(base: Path, out: Path, lora: dict | None = None, **overrides):
    defaults = {GRPOArguments: dict(TINY_GRPO, model_path=str(base)), LoraArguments: lora or {}}
    return argument_groups({**defaults, LoopArguments: dict(TINY_LOOP, output_dir=str(out))}, overrides)


@pytest.fixture(scope="module")
def full_run(base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo") / "full"
    return run_grpo(*tiny_grpo(base_dir, out, beta=0.04)), out


def test_full_run_logs_rollouts_every_step_and_evaluates_before_and_after(full_run):
    result, out = full_run
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["steps"] == 6 and final["after"] == result.after and final["heldout_prompts"] == 8
    assert {"val_exact_match", "exact_match_repeat", "exact_match_longest", "val_reward"} <= set(final["before"])
    records = read_metrics(out)
    rollouts = [r for r in records if "reward" in r]
    assert [r["step"] for r in rollouts] == [1, 2, 3, 4, 5, 6]
    for r in rollouts:
        assert 0 <= r["frac_reward_zero_std"] <= 1 and 1 <= r["completion_length"] <= 6 and r["kl"] >= 0
    assert rollouts[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first step starts at the reference
    assert rollouts[-1]["kl"] > 0
    assert [r["step"] for r in records if "val_exact_match" in r] == [0, 3, 6]


def test_saved_folder_has_the_card_curves_and_the_before_after_table(full_run, base_dir, tiny_tokenizer):
    _, out = full_run
    assert {"README.md", "loss_curve.png", "grpo_curves.png"} <= {p.name for p in (out / "model").iterdir()}
    card = (out / "model" / "README.md").read_text()
    assert "GRPO, dapo loss" in card and "Held-out exact match" in card and "grpo" in card
    assert "| Exact match (greedy answer = expected answer) |" in card
    rows = json.loads((out / "heldout_generations.json").read_text())
    _, heldout = make_task_splits(32, 8, 0, ["repeat", "longest"])
    assert [(r["instruction"], r["expected"], r["kind"]) for r in rows] == [
        (h["instruction"], h["output"], h["kind"]) for h in heldout
    ]
    base = load_file(base_dir / "model.safetensors")
    tuned = load_file(out / "model" / "model.safetensors")
    assert any(not torch.equal(base[k], tuned[k]) for k in base)
    assert json.loads((out / "heldout_generations_before.json").read_text()) == [r["before"] for r in rows]


def test_the_web_app_loads_the_grpo_model_like_any_other(full_run):
    _, out = full_run
    loaded = load_for_app(out / "model")
    assert loaded.kind == "causal-lm" and loaded.tokenizer.chat_template  # the SFT folder's template travels
    saved = load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(tensor, loaded.model.state_dict()[name]) for name, tensor in saved.items())


def test_lora_run_uses_the_base_with_the_adapter_disabled(base_dir, tmp_path):
    out = tmp_path / "lora"
    result = run_grpo(
        *tiny_grpo(base_dir, out, lora=dict(lora_r=4), finetune="lora", beta=0.04, learning_rate=1e-2, max_steps=2)
    )
    assert result.adapter_dir == out / "adapter" and (out / "adapter" / "adapter_config.json").is_file()
    kl = [r["kl"] for r in read_metrics(out) if "kl" in r]
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[1] > 0
    assert "adapter disabled" in (out / "model" / "README.md").read_text()


# ----------------------------------------------------------------------------- the script: bad input, help


@pytest.fixture(scope="module")
def grpo_script():
    return load_script("grpo")


def error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and [line for line in lines if line.startswith("error: ")] == lines[-1:], stderr
    return lines[-1]


def test_bad_inputs_give_one_clear_line_and_write_nothing(grpo_script, base_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def boom(completions, **kw):\n    raise KeyError('answer')\n")
    monkeypatch.chdir(tmp_path)
    long = tmp_path / "long.json"
    long.write_text(json.dumps([{"instruction": "word " * 200, "input": "", "output": "x"}] * 4))
    common = ["--model_path", str(base_dir), "--report_to", "none", "--max_steps", "1", "--num_train_tasks", "16",
              "--max_completion_length", "6", "--max_new_tokens", "6", "--task_kinds", "repeat", "longest"]  # fmt: skip
    cases = {
        "a": (["--reward_functions", "no_such_module:f"], r"no module named 'no_such_module'"),
        "b": (["--reward_functions", "my_rewards:boom"], r"'my_rewards:boom' raised KeyError\('answer'\)"),
        "c": (["--num_generations", "1"], r"--num_generations must be >= 2"),
        "d": (
            ["--train_file", str(long)],
            r"longer than the \d+ tokens the context leaves after --max_completion_length",
        ),
        "e": (
            ["--max_completion_length", "128"],
            r"--max_completion_length must be in \[1, 127\] for the model's 128-token context",
        ),
        "f": (["--reward_weights", "1", "2"], r"2 --reward_weights for 1 --reward_functions"),
        "g": (["--temperature", "0"], r"--temperature must be > 0"),
        "h": (["--train_task_kinds", "repeat"], r"--train_task_kinds needs the embedded tasks and a --prompt_seed"),
        "i": (
            ["--prompt_seed", "1", "--train_task_kinds", "reverse"],
            r"--train_task_kinds must be a non-empty subset of --task_kinds, got \['reverse'\]",
        ),
    }
    for name, (flags, message) in cases.items():
        argv = [*common, "--output_dir", str(tmp_path / name), *flags]
        assert grpo_script.main(argv) == 1, name
        err = error_line(capsys.readouterr().err)
        assert re.search(message, err), (name, err)
        assert not (tmp_path / name).exists(), name


def test_train_task_kinds_narrow_the_training_prompts_not_the_heldout_ones(grpo_script):
    common = ["--model_path", "m", "--output_dir", "o", "--task_kinds", "repeat", "longest", "--prompt_seed", "1",
              "--num_train_tasks", "40", "--num_heldout_tasks", "8"]  # fmt: skip
    everything = load_prompt_splits(grpo_script.parse_args(common)[0])
    narrowed = load_prompt_splits(grpo_script.parse_args([*common, "--train_task_kinds", "longest"])[0])
    assert narrowed.heldout == everything.heldout
    assert len(narrowed.train) == 40 and {r["kind"] for r in narrowed.train} == {"longest"}
    held = {(r["instruction"], r["input"]) for r in narrowed.heldout}
    assert not held & {(r["instruction"], r["input"]) for r in narrowed.train}


def test_help_shows_every_option_with_its_default(grpo_script, capsys):
    with pytest.raises(SystemExit):
        grpo_script.parse_args(["--help"])
    shown = capsys.readouterr().out
    options = ("num_generations", "max_completion_length", "temperature", "top_k", "top_p", "loss_type",
               "scale_rewards", "beta", "epsilon", "epsilon_high", "reward_functions", "reward_weights")  # fmt: skip
    for option in options:
        assert f"--{option}" in shown, option
    assert "(default: 8)" in shown and "{dapo,grpo,dr_grpo}" in shown


def test_grpo_configs_parse(grpo_script):
    for config in sorted((REPO_ROOT / "scripts" / "configs").glob("grpo_*.yaml")):
        grpo_args, _, loop_args = grpo_script.parse_args([str(config), "--model_path", "m"])
        assert grpo_args.num_generations >= 2 and loop_args.output_dir, config


# ----------------------------------------------------------------------------- resume after SIGKILL


@pytest.mark.slow
def test_sigkill_then_resume_gives_bit_identical_weights(tiny_tokenizer, tmp_path):
    steps = 16
    base = save_tiny_base(tmp_path / "base", tiny_tokenizer, context_length=128, drop_rate=0.1)
    flags = [
        "--model_path", str(base), "--num_train_tasks", "64", "--num_heldout_tasks", "4", "--max_new_tokens", "4",
        "--max_completion_length", "6", "--num_generations", "4", "--beta", "0.04",
        "--reward_functions", "partial_match", "--task_kinds", "repeat", "longest", "--max_steps", str(steps),
        "--per_device_batch_size", "2", "--gradient_accumulation_steps", "2", "--learning_rate", "3e-3",
        "--warmup_steps", "3", "--log_every", "1", "--save_every", "4", "--eval_every", "8", "--report_to", "none",
    ]  # fmt: skip
    reference_out, killed_out = tmp_path / "reference", tmp_path / "killed"
    uninterrupted = launch(SCRIPT, [*flags, "--output_dir", str(reference_out)], tmp_path / "reference.log")
    # Killed from inside as step 9 is about to be logged (its rollout statistics, logged while the
    # step is computed, come first): the last checkpoint is step 8's.
    killed_before_logging(SCRIPT, [*flags, "--output_dir", str(killed_out)], 9, tmp_path)
    assert max(r["step"] for r in read_metrics(killed_out)) == 8 and not (killed_out / "model").exists()

    resumed = launch(SCRIPT, [*flags, "--output_dir", str(killed_out), "--resume", "true"], tmp_path / "resumed.log")
    assert resumed.wait(timeout=600) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert uninterrupted.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    log = (tmp_path / "resumed.log").read_text()
    assert int(log.split("resuming from step ")[1].split()[0]) == 8

    expected = load_file(reference_out / "model" / "model.safetensors")
    actual = load_file(killed_out / "model" / "model.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected), "resumed weights differ"
    assert read_metrics(killed_out) == read_metrics(reference_out) or _same_but_time(killed_out, reference_out)
    generations = lambda out: json.loads((out / "heldout_generations.json").read_text())  # noqa: E731
    assert generations(killed_out) == generations(reference_out)


def _same_but_time(a: Path, b: Path) -> bool:
    timing = {"tokens_per_second", "elapsed_seconds"}
    strip = lambda out: [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(out)]  # noqa: E731
    return strip(a) == strip(b)


# ----------------------------------------------------------------------------- two processes


@pytest.mark.slow
def test_two_processes_follow_the_one_process_run(tiny_tokenizer, tmp_path):
    """1 process x 4 prompts = 2 processes x 2 prompts per step: each completion draws from its own
    seed, so both runs sample the same completions, and the dapo normaliser counts the tokens of
    both processes: the same rewards, the same loss, the same held-out answers; rank 0 alone writes."""
    base = save_tiny_base(tmp_path / "base", tiny_tokenizer, context_length=128)
    flags = [
        "--model_path", str(base), "--num_train_tasks", "48", "--num_heldout_tasks", "6", "--max_new_tokens", "4",
        "--eval_batch_size", "4", "--max_completion_length", "6", "--num_generations", "4",
        "--reward_functions", "partial_match", "--task_kinds", "repeat", "longest", "--max_steps", "4",
        "--learning_rate", "3e-3", "--warmup_steps", "2", "--log_every", "1", "--eval_every", "4",
        "--save_every", "4", "--report_to", "none", "--mixed_precision", "no",
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
    compared = ("train_loss", "reward", "reward_std", "frac_reward_zero_std", "completion_length", "val_exact_match")
    for a, b in zip(single, double, strict=True):  # fp32 summation order differs
        for key in compared:
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-4), (a["step"], key)
    files = lambda out: sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())  # noqa: E731
    extra = set(files(two)) - set(files(one))
    assert extra == {"checkpoints/step_4/rng_rank1.safetensors"}, extra
    generations = lambda out: json.loads((out / "heldout_generations.json").read_text())  # noqa: E731
    assert generations(two) == generations(one)
