"""TRL's SFTTrainer on our records computes exactly our fine-tuning loss.

Our SFT renders each Alpaca record once (`training.data.instructions.render_example`: prompt
masked, response and eos as targets). TRL renders the same records itself, from the
prompt/completion form (it appends the eos) or from the messages form through the tokenizer's
chat template (`assistant_only_loss` reads its `{% generation %}` marks). On one batch holding
every record, the three losses must be the same number: any difference in the ids, the targets
or the eos shows up in it.
"""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402

from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM  # noqa: E402
from tokenization.alpaca import alpaca_messages, format_example  # noqa: E402
from training.data.collate import collate_instruction_batch  # noqa: E402
from training.data.instructions import render_example  # noqa: E402

RECORDS = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour."},
    {"instruction": "Sum the numbers.", "input": "2 and 3", "output": "The sum is 5."},
    {"instruction": "What does the for statement do?", "input": "", "output": "It iterates over a sequence."},
]


@pytest.fixture(scope="module")
def model_and_ours(tiny_tokenizer):
    torch.manual_seed(0)
    config = MiniGPTConfig.from_preset(
        "tiny",
        vocab_size=len(tiny_tokenizer),
        emb_dim=32,
        n_heads=2,
        eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    model = MiniGPTForCausalLM(config).eval()
    examples = [render_example(tiny_tokenizer, record) for record in RECORDS]
    batch = collate_instruction_batch(
        [{"input_ids": e.input_ids, "labels": e.labels} for e in examples], tiny_tokenizer.pad_token_id
    )
    with torch.no_grad():
        ours = model(**batch).loss
    return model, ours


def trl_loss(model, tokenizer, rows: list[dict], tmp_path, **config) -> torch.Tensor:
    args = trl.SFTConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=len(rows), report_to=[], use_cpu=True, **config
    )
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    (batch,) = list(trainer.get_train_dataloader())  # every record in one (shuffled) batch
    model.eval()  # the Trainer switches to train mode; dropout is 0 either way
    with torch.no_grad():
        return trainer.compute_loss(model, batch)


def test_prompt_completion_form_gives_our_sft_loss(model_and_ours, tiny_tokenizer, tmp_path):
    model, ours = model_and_ours
    rows = [{"prompt": format_example(r)[0], "completion": r["output"]} for r in RECORDS]
    torch.testing.assert_close(trl_loss(model, tiny_tokenizer, rows, tmp_path), ours, atol=1e-6, rtol=0)


def test_messages_form_gives_our_sft_loss(model_and_ours, tiny_tokenizer, tmp_path):
    """Through the chat template: the eos after each answer and the `{% generation %}` marks."""
    model, ours = model_and_ours
    rows = [{"messages": alpaca_messages(r)} for r in RECORDS]
    loss = trl_loss(model, tiny_tokenizer, rows, tmp_path, assistant_only_loss=True)
    torch.testing.assert_close(loss, ours, atol=1e-6, rtol=0)
