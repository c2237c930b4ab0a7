"""training/jobs/sft.py: generation for exact match, the whole job (full and LoRA), resume after SIGKILL.
Tiny models (2 layers, 32 dims) on the embedded tasks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers.processes import killed_before_logging, launch
from helpers.runs import FINETUNE_LOOP, REPO_ROOT, argument_groups, card_results, read_metrics, save_tiny_base
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tokenization.alpaca import ALPACA_CHAT_TEMPLATE
from training.data.instructions import encode_prompt
from training.data.tasks import make_task_splits
from training.evaluation.generate import _decode_answer, generate_answers
from training.jobs.sft import SFTArguments, run_sft
from training.run.arguments import LoopArguments
from training.run.lifecycle import RunFolderError
from training.run.lora import LoraArguments

SCRIPT = REPO_ROOT / "scripts" / "sft.py"


@pytest.fixture(scope="session")
def base_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    return save_tiny_base(tmp_path_factory.mktemp("sft_base"), tiny_tokenizer)


TINY_SFT = dict(num_train_tasks=48, num_heldout_tasks=8, max_new_tokens=6, eval_batch_size=8)
TINY_LOOP = FINETUNE_LOOP


def tiny_sft(base: Path, out: Path, lora: dict | None = None, **overrides):
    """(SFTArguments, LoraArguments, LoopArguments) for a tiny run."""
    defaults = {SFTArguments: dict(TINY_SFT, model_path=str(base)), LoraArguments: lora or {}}
    return argument_groups({**defaults, LoopArguments: dict(TINY_LOOP, output_dir=str(out))}, overrides)


# ----------------------------------------------------------------------------- pieces


def test_answer_stops_at_the_first_eos(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    ids = tiny_tokenizer.encode("4, 7", add_special_tokens=False)
    assert _decode_answer(tiny_tokenizer, [*ids, eos, *ids, eos]) == "4, 7"
    assert _decode_answer(tiny_tokenizer, ids) == "4, 7"  # ran out of tokens: keep all


def test_left_padded_batch_gives_the_answers_of_one_by_one_generation(base_dir, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    _, records = make_task_splits(0, 6, seed=1)
    lengths = {len(encode_prompt(tiny_tokenizer, r)) for r in records}
    assert len(lengths) > 1, "prompts of different lengths are needed to exercise the padding"
    batched = generate_answers(model, tiny_tokenizer, records, max_new_tokens=5, batch_size=6)
    alone = [generate_answers(model, tiny_tokenizer, [r], max_new_tokens=5)[0] for r in records]
    assert batched == alone and len(batched) == 6
    # The same as a plain greedy loop over the model's logits.
    ids = torch.tensor([encode_prompt(tiny_tokenizer, records[0])])
    for _ in range(5):
        next_id = model(input_ids=ids).logits[0, -1].argmax()
        if next_id == tiny_tokenizer.eos_token_id:
            break
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    prompt_len = len(encode_prompt(tiny_tokenizer, records[0]))
    assert batched[0] == tiny_tokenizer.decode(ids[0, prompt_len:])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_answers(model, tiny_tokenizer, records, max_new_tokens=192)


# ----------------------------------------------------------------------------- the job


@pytest.fixture(scope="module")
def full_run(base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "full"
    return run_sft(*tiny_sft(base_dir, out)), out


def test_full_fine_tuning_lowers_the_heldout_response_loss(full_run):
    result, out = full_run
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["before"]["val_loss"] > final["after"]["val_loss"] + 0.3
    assert final["after"] == result.after and final["steps"] == 6 and final["heldout_records"] == 8
    records = read_metrics(out)
    assert records[0]["step"] == 0 and records[0]["val_loss"] == final["before"]["val_loss"]  # the 'before' numbers
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3, 4, 5, 6]


def test_generations_file_has_one_row_per_heldout_record(full_run):
    _, out = full_run
    rows = json.loads((out / "heldout_generations.json").read_text())
    _, heldout = make_task_splits(48, 8, seed=0)
    assert [(r["instruction"], r["input"], r["expected"]) for r in rows] == [
        (h["instruction"], h["input"], h["output"]) for h in heldout
    ]
    assert all(set(r) == {"instruction", "input", "expected", "generated", "exact_match", "kind"} for r in rows)


def test_saved_folder_loads_with_auto_classes_and_has_the_chat_template(full_run):
    _, out = full_run
    model = AutoModelForCausalLM.from_pretrained(out / "model", trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(out / "model", trust_remote_code=True)
    assert tokenizer.chat_template == ALPACA_CHAT_TEMPLATE
    assert {"modeling_minigpt.py", "README.md", "loss_curve.png"} <= set(os.listdir(out / "model"))
    assert not (out / "adapter").exists()
    after = json.loads((out / "final_metrics.json").read_text())["after"]
    assert card_results(out / "model") == {"loss": after["val_loss"], "exact_match": after["val_exact_match"]}
    # The saved weights are the trained ones: they reproduce the run's held-out answers.
    rows = json.loads((out / "heldout_generations.json").read_text())
    records = [{"instruction": r["instruction"], "input": r["input"], "output": r["expected"]} for r in rows]
    assert generate_answers(model, tokenizer, records, max_new_tokens=6) == [r["generated"] for r in rows]


def test_muon_bf16_run_goes_through_the_same_lifecycle(full_run, base_dir, tmp_path):
    _, adamw_out = full_run
    out = tmp_path / "muon"
    result = run_sft(*tiny_sft(base_dir, out, optimizer="muon", mixed_precision="bf16"))
    adamw, muon = ([r["train_loss"] for r in read_metrics(o) if "train_loss" in r] for o in (adamw_out, out))
    # The first step sees the same weights and batch (bf16 autocast rounds the loss a little)...
    assert muon[0] == pytest.approx(adamw[0], rel=1e-2)
    # ...then Muon's update differs from AdamW's, and fine-tuning still works.
    assert muon[2:] != pytest.approx(adamw[2:], rel=1e-3)
    assert result.after["val_loss"] < result.before["val_loss"] - 0.3
    assert (
        "Muon (peak lr 0.02, weight decay 0.1) for the matrices inside the blocks"
        in (out / "model" / "README.md").read_text()
    )


def test_unmasked_run_trains_on_prompts_but_scores_responses_only(full_run, base_dir, tmp_path):
    _, masked_out = full_run
    run_sft(*tiny_sft(base_dir, tmp_path / "unmasked", mask_prompt=False, max_steps=1))
    masked, unmasked = read_metrics(masked_out), read_metrics(tmp_path / "unmasked")
    # Same base and held-out set: the untuned held-out loss is the same number in both runs...
    assert unmasked[0]["val_loss"] == masked[0]["val_loss"]
    # ...while the first training loss differs, because the prompt tokens count in the unmasked run.
    assert unmasked[1]["train_loss"] != pytest.approx(masked[1]["train_loss"], abs=1e-3)


def test_packed_run_follows_the_padded_run_and_must_resume_packed(full_run, base_dir, tmp_path):
    _, padded_out = full_run
    run_sft(*tiny_sft(base_dir, tmp_path / "packed", packing=True))
    losses = [
        [r["train_loss"] for r in read_metrics(out) if "train_loss" in r] for out in (padded_out, tmp_path / "packed")
    ]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)  # the same examples and targets each step
    with pytest.raises(RunFolderError, match="training.packing: saved run has True, this run has False"):
        run_sft(*tiny_sft(base_dir, tmp_path / "packed", resume=True))


def test_lora_run_saves_an_adapter_and_the_merged_model(base_dir, tiny_tokenizer, tmp_path):
    out = tmp_path / "lora"
    result = run_sft(
        *tiny_sft(
            base_dir,
            out,
            lora=dict(lora_r=4, lora_dropout=0.0),
            finetune="lora",
            learning_rate=1e-2,
            eval_before_training=False,
        )
    )
    assert result.adapter_dir == out / "adapter" and result.before is None
    base = load_file(base_dir / "model.safetensors")
    merged = load_file(out / "model" / "model.safetensors")
    changed = sorted({k.split(".")[-2] for k in base if not torch.equal(base[k], merged[k])})
    assert changed == ["W_key", "W_query", "W_value", "fc_in", "fc_out", "out_proj"]  # only adapted layers moved
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out / "adapter").eval()
    merged_model = AutoModelForCausalLM.from_pretrained(out / "model", trust_remote_code=True)
    ids = torch.randint(0, len(tiny_tokenizer), (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(
            merged_model(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-5, rtol=1e-5
        )


def test_converted_gpt2_folder_whose_pad_is_eos(shared_data, tmp_path):
    """GPT-2's tokenizer has no pad token (pad = eos): padding must still be masked, answers cut at eos."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from modeling_minigpt.convert import gpt2_to_minigpt
    from tokenization.gpt2 import load_gpt2_tokenizer

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128))
    base = tmp_path / "gpt2"
    gpt2_to_minigpt(gpt2).save_pretrained(base)
    tokenizer = load_gpt2_tokenizer(shared_data / "gpt2" / "encoder.json", shared_data / "gpt2" / "vocab.bpe")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 50256
    tokenizer.save_pretrained(base)
    result = run_sft(*tiny_sft(base, tmp_path / "out", max_steps=2, num_heldout_tasks=4))
    assert result.after["val_loss"] < result.before["val_loss"]
    saved = AutoTokenizer.from_pretrained(tmp_path / "out" / "model", trust_remote_code=True)
    assert saved.chat_template == ALPACA_CHAT_TEMPLATE and len(saved) == 50257
    assert len(json.loads((tmp_path / "out" / "heldout_generations.json").read_text())) == 4


def test_bad_inputs_stop_before_anything_is_written(base_dir, full_run, tmp_path):
    with pytest.raises(ValueError, match="--model_path is required"):
        run_sft(*tiny_sft(base_dir, tmp_path / "a", model_path=None))
    (tmp_path / "not_a_model").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        run_sft(*tiny_sft(tmp_path / "not_a_model", tmp_path / "b"))
    with pytest.raises(ValueError, match="unknown task kinds.*known kinds"):
        run_sft(*tiny_sft(base_dir, tmp_path / "c", task_kinds=["add", "divide"]))
    with pytest.raises(ValueError, match="--validation_file needs a --train_file"):
        run_sft(*tiny_sft(base_dir, tmp_path / "d", validation_file="x.json"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl record 1 \(line 2\): 'output' is missing"):
        run_sft(*tiny_sft(base_dir, tmp_path / "e", train_file=str(bad)))
    assert not any((tmp_path / name).exists() for name in "abcde")
    _, out = full_run
    with pytest.raises(RunFolderError, match="already holds a run"):
        run_sft(*tiny_sft(base_dir, out))


def test_alpaca_file_with_seeded_heldout_split(base_dir, tmp_path):
    _, records = make_task_splits(0, 30, seed=5)
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{k: r[k] for k in ("instruction", "input", "output")} for r in records]))
    result = run_sft(
        *tiny_sft(
            base_dir,
            tmp_path / "out",
            train_file=str(data),
            validation_fraction=0.2,
            max_steps=2,
            eval_before_training=False,
        )
    )
    rows = json.loads((tmp_path / "out" / "heldout_generations.json").read_text())
    assert len(rows) == 6 and "kind" not in rows[0] and set(result.after) == {"val_loss", "val_exact_match"}


# ----------------------------------------------------------------------------- resume after SIGKILL


@pytest.mark.slow
def test_sigkill_then_resume_gives_bit_identical_weights(tiny_tokenizer, tmp_path):
    steps = 30
    base = save_tiny_base(tmp_path / "base", tiny_tokenizer, drop_rate=0.1)  # dropout: the RNG state must resume too
    flags = [
        "--model_path",
        str(base),
        "--num_train_tasks",
        "64",
        "--num_heldout_tasks",
        "4",
        "--max_new_tokens",
        "4",
        "--max_steps",
        str(steps),
        "--per_device_batch_size",
        "4",
        "--gradient_accumulation_steps",
        "2",
        "--learning_rate",
        "3e-3",
        "--warmup_steps",
        "5",
        "--log_every",
        "1",
        "--save_every",
        "5",
        "--eval_every",
        "15",
        "--report_to",
        "none",
    ]
    reference_out, killed_out = tmp_path / "reference", tmp_path / "killed"
    reference = launch(SCRIPT, [*flags, "--output_dir", str(reference_out)], tmp_path / "reference.log")
    # Killed from inside as step 13 is about to be logged: the last checkpoint is step 10's.
    killed_before_logging(SCRIPT, [*flags, "--output_dir", str(killed_out)], 13, tmp_path)
    assert max(r["step"] for r in read_metrics(killed_out)) == 12 and not (killed_out / "model").exists()

    resumed = launch(SCRIPT, [*flags, "--output_dir", str(killed_out), "--resume", "true"], tmp_path / "resumed.log")
    assert resumed.wait(timeout=600) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert reference.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    assert int((tmp_path / "resumed.log").read_text().split("resuming from step ")[1].split()[0]) == 10

    expected, actual = (
        load_file(reference_out / "model" / "model.safetensors"),
        load_file(killed_out / "model" / "model.safetensors"),
    )
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected), (
        "resumed weights differ from the uninterrupted run"
    )
    keep = ("step", "train_loss", "grad_norm", "val_loss", "val_exact_match")
    log = lambda out: [{k: r[k] for k in keep if k in r} for r in read_metrics(out)]  # noqa: E731
    assert log(killed_out) == log(reference_out)
    assert json.loads((killed_out / "heldout_generations.json").read_text()) == json.loads(
        (reference_out / "heldout_generations.json").read_text()
    )
