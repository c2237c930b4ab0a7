"""training/run/accelerator.py: mixed precision and the attention path chosen at run time (and printed),
and --compile training the same model as eager and resuming exactly."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers.runs import logged_losses, reset_accelerate_state, tiny_args
from safetensors.torch import load_file

from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM
from training.jobs.pretrain import run_pretraining
from training.run.accelerator import choose_attention, make_accelerator, resolve_attention, resolve_mixed_precision
from training.run.arguments import LoopArguments
from training.run.checkpoint import list_checkpoints

# ----------------------------------------------------------------------------- mixed precision


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"avx512_bf16": True, "avx512_f": True}, "bf16"),
        ({"amx_bf16": True}, "bf16"),
        ({"avx512_f": True, "avx2": True}, "no"),
    ],
)
def test_auto_precision_follows_the_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: flags)
    mode, why = resolve_mixed_precision("auto", torch.device("cpu"))
    assert mode == expected and why.startswith("auto: ")
    assert "avx512_bf16" in why or "amx_bf16" in why
    assert resolve_mixed_precision("no", torch.device("cpu")) == ("no", "as requested")
    assert resolve_mixed_precision("bf16", torch.device("cpu")) == ("bf16", "as requested")


def test_the_accelerator_uses_and_prints_the_choice(tmp_path, capsys):
    expected, why = resolve_mixed_precision("auto", torch.device("cpu"))
    accelerator = make_accelerator(LoopArguments(output_dir=str(tmp_path), report_to="none"))  # auto is the default
    assert accelerator.mixed_precision == expected
    assert f"({why})" in capsys.readouterr().out


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize(
    "device, precision, context, expected",
    [
        ("cpu", "bf16", 128, "eager"),
        ("cpu", "bf16", 512, "eager"),
        ("cpu", "bf16", 1024, "sdpa"),  # past the measured crossover the fused kernel wins
        ("cpu", "no", 128, "sdpa"),  # in fp32 it always wins
        ("cuda", "bf16", 128, "sdpa"),
    ],
)
def test_auto_attention_is_eager_only_for_short_bf16_contexts_on_a_cpu(device, precision, context, expected):
    implementation, why = resolve_attention("auto", precision, torch.device(device), context)
    assert implementation == expected and why.startswith("auto: ")
    assert resolve_attention("sdpa", precision, torch.device(device), context) == ("sdpa", "as requested")


def test_the_attention_choice_switches_the_run_copy_only_and_the_paths_agree(tmp_path, capsys):
    config = MiniGPTConfig.from_preset("tiny", vocab_size=97, context_length=16, emb_dim=32, n_heads=2, n_layers=2)
    model = MiniGPTForCausalLM(config).eval()
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # a padded row: the 4-D mask each path builds for itself
    with torch.no_grad():
        sdpa = model(input_ids=ids, attention_mask=mask).logits
    reset_accelerate_state()  # this test's accelerator autocasts to bf16, whatever ran before it
    accelerator = make_accelerator(LoopArguments(output_dir=str(tmp_path), report_to="none", mixed_precision="bf16"))
    choose_attention(model, LoopArguments(output_dir=str(tmp_path), attention="auto"), accelerator)
    assert model.config._attn_implementation == "eager"
    assert "attention: eager (auto: bf16 on a CPU with a context of 16 <= 512 tokens" in capsys.readouterr().out
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(eager[mask.bool()], sdpa[mask.bool()], atol=1e-5)  # the same function
    model.save_pretrained(tmp_path / "saved")
    assert MiniGPTForCausalLM.from_pretrained(tmp_path / "saved").config._attn_implementation == "sdpa"
    choose_attention(model, LoopArguments(output_dir=str(tmp_path), attention="auto"), accelerator)
    assert "attention:" not in capsys.readouterr().out  # chosen once per model (DPO chooses before prepare)
    forced = MiniGPTForCausalLM(config)
    forced.set_attn_implementation("eager")
    choose_attention(forced, LoopArguments(output_dir=str(tmp_path), attention="sdpa"), accelerator)
    assert forced.config._attn_implementation == "sdpa"


# ----------------------------------------------------------------------------- --compile

# Inductor fuses and reorders fp32 arithmetic (fused softmax, layer norm, AdamW-free forward and
# backward kernels): measured 6 steps of the tiny run differ from eager by at most ~1e-6 in loss.
COMPILED_LOSS_TOLERANCE = 1e-4

STEPS = dict(max_steps=6, save_every=3, eval_every=100, warmup_steps=2, drop_rate=0.0, report_to="none")


@pytest.fixture(scope="module")
def compiled_and_eager(corpus_file, tokenizer_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    runs = {}
    for compiled in (False, True):
        out = tmp_path_factory.mktemp("run") / ("compiled" if compiled else "eager")
        run_pretraining(*tiny_args(out, corpus_file, tokenizer_dir, cache, compile=compiled, **STEPS))
        runs[compiled] = out
    return runs


@pytest.mark.slow
def test_compiled_training_follows_eager_losses(compiled_and_eager, capsys):
    eager, compiled = (logged_losses(compiled_and_eager[c]) for c in (False, True))
    assert [step for step, _, _ in compiled] == [step for step, _, _ in eager] == list(range(1, 7))
    assert [lr for _, _, lr in compiled] == [lr for _, _, lr in eager]
    difference = max(abs(a - b) for (_, a, _), (_, b, _) in zip(compiled, eager, strict=True))
    assert difference < COMPILED_LOSS_TOLERANCE, difference
    # the saved folder is the plain model: same tensor names as eager's, no compile wrapper prefix
    names = set(load_file(compiled_and_eager[True] / "model" / "model.safetensors"))
    assert names == set(load_file(compiled_and_eager[False] / "model" / "model.safetensors"))
    assert not any("_orig_mod" in name for name in names)


@pytest.mark.slow
def test_compiled_run_resumes_to_the_same_losses(compiled_and_eager, corpus_file, tokenizer_dir, tmp_path, capsys):
    """Cut the compiled run back to its step-3 checkpoint and resume it compiled: the same losses
    to float32 rounding, and the same final weights to the last few float32 ulps. Not bit-identical weights
    (as eager resume is): after the merge of the attention interface the resumed run's weights
    differ from the uninterrupted run's by 4e-9 in two fresh-clone runs and 1.5e-7 in a third (a
    resume in the same process reuses the compiled graphs of the first run); found, not yet
    explained. 1e-6 is ~8 ulps at weight 1, while a resume that got the state wrong moves weights by
    about a step (learning rate 3e-3)."""
    full = compiled_and_eager[True]
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for step, folder in list_checkpoints(cut / "checkpoints"):
        if step > 3:
            shutil.rmtree(folder)
    shutil.rmtree(cut / "model")
    run_pretraining(*tiny_args(cut, corpus_file, tokenizer_dir, tmp_path / "cache", compile=True, resume=True, **STEPS))
    assert "compile: torch.compile" in capsys.readouterr().out
    # Not bit for bit either: one clean-clone run differed at step 6 by one float32 ulp (4.8e-7 at 6.01).
    resumed_log, full_log = logged_losses(cut), logged_losses(full)
    assert [(step, lr) for step, _, lr in resumed_log] == [(step, lr) for step, _, lr in full_log]
    assert [loss for _, loss, _ in resumed_log] == pytest.approx([loss for _, loss, _ in full_log], rel=1e-6, abs=0)
    resumed, uninterrupted = (load_file(f / "model" / "model.safetensors") for f in (cut, full))
    worst = max((resumed[n] - uninterrupted[n]).abs().max().item() for n in uninterrupted)
    assert worst < 1e-6, worst
