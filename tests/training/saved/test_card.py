"""training/saved/card.py: model cards rendered from the template, written atomically, reloaded by
`ModelCard.load` intact."""

from __future__ import annotations

import pytest
from huggingface_hub import EvalResult, ModelCard

from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM
from training.saved.card import (
    LOCAL_MODEL_ID,
    METRICS,
    card_for_repo,
    count_parameters,
    render_model_card,
    write_model_card,
)

TRAINING_INFO = dict(
    preset="tiny",
    data="pydoc topics, first 200,000 characters",
    tokens_seen=1_234_567,
    steps=300,
    schedule="AdamW, lr 6e-4, 30 warmup steps, cosine decay to 6e-5",
    wall_time_seconds=3725.4,
    hardware="CPU (2 cores, x86_64)",
)
EVAL_RESULTS = dict(
    dataset_name="pydoc topics (last 10%)",
    dataset_type="pydoc-topics",
    val_loss=2.5134,
    val_loss_ci=(2.4901, 2.5377),
    perplexity=12.3462,
    perplexity_ci=(12.0626, 12.6494),
    bits_per_byte=1.0871,
    num_tokens=55_000,
)


@pytest.fixture
def config() -> MiniGPTConfig:
    return MiniGPTConfig.from_preset("tiny", vocab_size=512, n_layers=2, emb_dim=32, n_heads=2)


def test_card_reloads_with_metadata_and_model_index_intact(tmp_path, config):
    path = write_model_card(
        tmp_path,
        config=config,
        training_info=TRAINING_INFO,
        eval_results=EVAL_RESULTS,
        datasets=["pydoc-topics"],
        model_name="minigpt-pydoc",
        repo_id="test-user/minigpt-pydoc",
    )
    assert path == tmp_path / "README.md"
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]  # no temporary left behind

    loaded = ModelCard.load(path)
    rendered = render_model_card(
        tmp_path,
        config=config,
        training_info=TRAINING_INFO,
        eval_results=EVAL_RESULTS,
        datasets=["pydoc-topics"],
        model_name="minigpt-pydoc",
        repo_id="test-user/minigpt-pydoc",
    )
    assert loaded.data.to_dict() == rendered.data.to_dict()
    data = loaded.data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation"
    assert data.license == "apache-2.0"
    assert data.datasets == ["pydoc-topics"]
    assert "custom_code" in data.tags
    assert data.model_name == "minigpt-pydoc"
    common = dict(
        task_type="text-generation",
        dataset_type="pydoc-topics",
        dataset_name="pydoc topics (last 10%)",
        dataset_split="validation",
    )
    assert data.eval_results == [
        EvalResult(**common, metric_type="loss", metric_name="Validation loss (nats/token)", metric_value=2.5134),
        EvalResult(**common, metric_type="perplexity", metric_name="Validation perplexity", metric_value=12.3462),
        EvalResult(**common, metric_type="bits_per_byte", metric_name="Bits per byte", metric_value=1.0871),
    ]


def test_card_body_reports_architecture_training_evaluation_and_usage(tmp_path, config):
    text = render_model_card(
        tmp_path, config=config, training_info=TRAINING_INFO, eval_results=EVAL_RESULTS, repo_id="test-user/m"
    ).text
    parameters = MiniGPTForCausalLM(config).num_parameters()
    assert f"| Parameters | {parameters:,} (46.0K) |" in text
    assert "| Context length | 128 tokens |" in text
    assert "| Vocabulary | 512 tokens (byte-level BPE) |" in text
    assert "| Tokens seen | 1,234,567 (1.2M) |" in text
    assert "| Wall time | 1 h 02 min 05 s |" in text
    assert "| Validation perplexity | 12.35 | 12.06 – 12.65 |" in text
    assert "| Bits per byte | 1.087 | not measured |" in text
    assert "(55,000 tokens)" in text and "95% confidence intervals" in text
    assert "AutoModelForCausalLM.from_pretrained(model_id, trust_remote_code=True)" in text
    assert 'pipeline("text-generation", model=model_id, trust_remote_code=True)' in text
    assert 'model_id = "test-user/m"' in text
    assert "loss_curve.png" not in text  # not in the folder, so not linked


@pytest.mark.parametrize(
    "metrics",
    [
        {"val_loss": 0.61, "exact_match": 0.575},  # SFT: held-out response loss and exact match
        {"val_loss": 1.2, "reward_accuracy": 0.75, "reward_margin": 0.31},  # DPO
        {"val_loss": 0.2, "accuracy": 0.9667},  # classification
    ],
)
def test_every_result_goes_into_model_index_and_the_table(tmp_path, config, metrics):
    evaluation = {"dataset_name": "held-out records", "dataset_split": "held-out", **metrics}
    card = render_model_card(tmp_path, config=config, training_info=TRAINING_INFO, eval_results=evaluation)
    results = ModelCard(str(card)).data.eval_results  # as the Hub reads it back
    assert {r.metric_type: r.metric_value for r in results} == {
        "loss" if key == "val_loss" else key: value for key, value in metrics.items()
    }
    assert {(r.dataset_name, r.dataset_split) for r in results} == {("held-out records", "held-out")}
    for key, value in metrics.items():
        assert f"| {METRICS[key][0]} | {value:.4g} | not measured |" in card.text


def test_the_card_pushed_to_a_repo_names_it_in_its_usage_example(tmp_path, config):
    local = render_model_card(tmp_path, config=config, training_info=TRAINING_INFO).text
    pushed = card_for_repo(local, "test-user/minigpt-pydoc")
    assert f'model_id = "{LOCAL_MODEL_ID}"' in local and LOCAL_MODEL_ID not in pushed
    changed = [(a, b) for a, b in zip(local.splitlines(), pushed.splitlines(), strict=True) if a != b]
    assert changed == [(f'model_id = "{LOCAL_MODEL_ID}"', 'model_id = "test-user/minigpt-pydoc"')]


def test_loss_curve_is_embedded_when_present(tmp_path, config):
    (tmp_path / "loss_curve.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    text = render_model_card(tmp_path, config=config, training_info=TRAINING_INFO).text
    assert "![Training and validation loss](loss_curve.png)" in text
    assert "No evaluation was recorded" in text


def test_without_eval_there_is_no_model_index(tmp_path, config):
    card = render_model_card(tmp_path, config=config, training_info=TRAINING_INFO, base_model="test-user/base")
    assert "model-index" not in card.data.to_dict()
    assert card.data.base_model == "test-user/base"
    assert "| Base model | `test-user/base` |" in card.text


def test_parameter_count_of_gpt2_small_preset_matches_gpt2():
    # GPT-2 small has 124,439,808 parameters with tied embeddings; counted on the meta device.
    assert count_parameters(MiniGPTConfig.from_preset("gpt2-small")) == 124_439_808


@pytest.mark.parametrize(
    "training_changes, eval_changes, message",
    [
        ({"step": 3}, {}, r"unknown keys \['step'\]"),
        ({"steps": None}, {}, r"steps.*non-negative integer"),
        ({}, {"perplexity_ci": (13.0, 12.0)}, r"perplexity_ci.*low <= high"),
        ({}, {"dataset_name": None}, r"missing keys \['dataset_name'\]"),
        ({}, {"bits_per_byte": float("nan")}, r"bits_per_byte.*finite"),
    ],
)
def test_bad_inputs_are_refused_with_the_key_named(tmp_path, config, training_changes, eval_changes, message):
    training = {**TRAINING_INFO, **training_changes}
    evaluation = {k: v for k, v in {**EVAL_RESULTS, **eval_changes}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        render_model_card(tmp_path, config=config, training_info=training, eval_results=evaluation)
