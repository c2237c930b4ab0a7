"""Last step of scripts/quickstart.sh: reload the final folder as a user would, and summarise.

    python scripts/quickstart_report.py runs/quickstart

This process has not imported MiniGPT before: the fine-tuned folder is loaded with
`AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`, i.e. from the code files
saved inside it, and generates from held-out instructions through the tokenizer's chat template.
It also measures the untrained model (same config and seed as pretraining) on the same
validation text, for the "before pretraining" numbers, and draws the attention heatmap and the
SFT loss-mask figure.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from training.cli import USER_ERRORS, parse_config_args, report_error

FREE_TOKENS = 48  # the pretrained model's free-text sample
REPETITION_PENALTY = 1.3


@dataclass
class ReportArguments:
    out: str = field(
        metadata={
            "help": "The quickstart's output folder (default runs/quickstart); may also be given first, without --out."
        }
    )
    elapsed_seconds: float | None = field(default=None, metadata={"help": "Wall time so far, for the summary."})
    generations: int = field(default=3, metadata={"help": "Held-out instructions to generate for."})


def parse_args(argv: list[str] | None = None) -> ReportArguments:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and not argv[0].startswith("-"):  # quickstart.sh names the folder first, as a positional argument
        argv = ["--out", *argv]
    (args,) = parse_config_args((ReportArguments,), argv, __doc__.split("\n\n")[0])
    return args


def untrained_metrics(model_dir: Path, validation: str, seed: int) -> dict:
    """Validation metrics of the model as pretraining started: same config, same seed."""
    from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM
    from training.evaluation.metrics import evaluate_texts

    torch.manual_seed(seed)
    model = MiniGPTForCausalLM(MiniGPTConfig.from_pretrained(model_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    return evaluate_texts(model, tokenizer, [validation], n_bootstrap=1000).to_dict()


def main(argv: list[str] | None = None) -> int:
    try:
        return report(parse_args(argv))
    except USER_ERRORS as error:  # a missing or incomplete quickstart folder
        return report_error(error)


def report(args: ReportArguments) -> int:
    out = Path(args.out)
    final_dir = out / "sft" / "model"
    figures = out / "figures"

    # --- reload the Hub-ready folder from its own code, and generate ---------------------------
    model = AutoModelForCausalLM.from_pretrained(final_dir, trust_remote_code=True).eval()
    # The folder's config names remote code; without the flag AutoTokenizer would stop and ask.
    tokenizer = AutoTokenizer.from_pretrained(final_dir, trust_remote_code=True)
    pretrained = AutoModelForCausalLM.from_pretrained(out / "pretrain" / "model", trust_remote_code=True).eval()
    for loaded in (model, pretrained):
        loaded_from = type(loaded).__module__
        if not loaded_from.startswith("transformers_modules."):
            raise RuntimeError(f"expected the folder's own code, got {loaded_from}")
    # Imported only now: the package's generator imports the model package, which registers MiniGPT
    # with the Auto classes, and the two folders above had to load from their own code first.
    from training.evaluation.generate import greedy_generate

    heldout = json.loads((out / "sft" / "heldout_generations.json").read_text())[: args.generations]
    prompts = []
    for row in heldout:
        messages = [{"role": "user", "content": row["instruction"]}]
        if row.get("input"):
            messages.append({"role": "input", "content": row["input"]})
        prompts.append(
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        )
    special = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    answers = greedy_generate(model, prompts, 24, **special)
    generations = [
        (row, tokenizer.decode(new, skip_special_tokens=True)) for row, new in zip(heldout, answers, strict=True)
    ]
    # Greedy, so every run prints the same text, with a repetition penalty: plain greedy decoding
    # of a 1M-parameter model soon loops over one clause (distinct-2 ~0.5 after 300 steps).
    prompt = tokenizer("The for statement", return_tensors="pt")["input_ids"]
    free = pretrained.generate(
        prompt, max_new_tokens=FREE_TOKENS, do_sample=False, repetition_penalty=REPETITION_PENALTY, **special
    )[0, prompt.shape[1] :].tolist()
    free_text = tokenizer.decode(prompt[0].tolist() + free, skip_special_tokens=True)

    # --- figures this step draws ----------------------------------------------------------
    from modeling_minigpt.files import save_figure
    from modeling_minigpt.visualize import plot_attention
    from training.data.instructions import loss_mask_figure, render_example
    from training.evaluation.metrics import distinct_n

    plot_attention(
        pretrained, tokenizer, "The for statement is used to iterate", figures / "attention_layer0_head0.png"
    )
    record = {k: heldout[0][k] for k in ("instruction", "input")} | {"output": heldout[0]["expected"]}
    save_figure(loss_mask_figure(tokenizer, render_example(tokenizer, record)), figures / "sft_loss_mask.png")

    # --- numbers ----------------------------------------------------------------------------
    free_distinct = distinct_n(free, 2) if len(free) >= 2 else float("nan")  # nan: eos right away
    run_config = json.loads((out / "pretrain" / "run_config.json").read_text())
    seed = run_config.get("config", run_config).get("loop", {}).get("seed", 1337)
    validation = (out / "data" / "validation.txt").read_text(encoding="utf-8")
    before = untrained_metrics(out / "pretrain" / "model", validation, seed)
    after = json.loads((out / "eval_pretrained.json").read_text())
    sft = json.loads((out / "sft" / "final_metrics.json").read_text())

    def metrics_line(m: dict) -> str:
        ci = m.get("bits_per_byte_ci")
        band = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        return (
            f"loss {m['loss']:.3f} nats/token   perplexity {m['perplexity']:8.1f}   "
            f"bits/byte {m['bits_per_byte']:.3f}{band}"
        )

    em_before = (sft.get("before") or {}).get("val_exact_match")
    em_after = sft["after"]["val_exact_match"]
    lines = [
        "",
        "=" * 78,
        "MiniGPT quickstart: summary",
        "=" * 78,
        f"validation text: {len(validation):,} characters of CPython's documentation (held-out topics)",
        f"  before pretraining  {metrics_line(before)}",
        f"  after pretraining   {metrics_line(after)}",
        f"held-out exact match on {sft['heldout_records']} generated instructions (greedy):",
        f"  before fine-tuning  {em_before:.1%}" if em_before is not None else "  before fine-tuning  not measured",
        f"  after fine-tuning   {em_after:.1%}   ({sft['steps']} steps, loss on responses only: {sft['mask_prompt']})",
        f"reloaded {final_dir} with AutoModelForCausalLM(trust_remote_code=True) -> {loaded_from}",
        "generations of the reloaded model:",
    ]
    for row, text in generations:
        shown_input = f" | input: {row['input']!r}" if row.get("input") else ""
        mark = "ok " if text.strip() == row["expected"].strip() else "   "
        lines.append(f"  {mark}{row['instruction']!r}{shown_input}\n      -> {text!r}  (expected {row['expected']!r})")
    lines.append(f"  pretrained model, free text (greedy, repetition penalty {REPETITION_PENALTY}): {free_text!r}")
    lines.append(
        f"    distinct-2 of its {len(free)} generated tokens: {free_distinct:.2f} (1.00: no token pair repeats)"
    )
    lines.append("figures:")
    for path in [
        out / "tokenizer" / "merge_trace.png",
        out / "pretrain" / "loss_curve.png",
        out / "sft" / "loss_curve.png",
        figures / "attention_layer0_head0.png",
        figures / "sft_loss_mask.png",
    ]:
        lines.append(f"  {path}{'' if path.is_file() else '  (missing)'}")
    lines.append(f"Hub-ready folder (weights, code, tokenizer + chat template, model card): {final_dir}")
    if args.elapsed_seconds is not None:
        lines.append(f"wall time before this report: {args.elapsed_seconds:.0f} s")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
