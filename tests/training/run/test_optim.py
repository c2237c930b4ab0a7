"""training/run/optim.py: AdamW's weight-decay groups, and Muon + AdamW as one optimizer that steps like
torch's two and saves a plain state dict."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM
from training.data.collate import collate_windows
from training.run.optim import build_muon_optimizer, build_optimizer, hidden_matrices


def test_weight_decay_only_on_matrices():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert {tuple(p.shape) for p in decayed["params"]} == {(10, 4), (4, 4)}
    assert sorted(tuple(p.shape) for p in plain["params"]) == [(4,), (4,), (4,)]  # bias, LN weight, LN bias
    assert optimizer.defaults["betas"] == (0.9, 0.95)


def test_frozen_parameters_are_left_out():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)  # e.g. a frozen backbone under a classification head
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    assert [tuple(p.shape) for g in optimizer.param_groups for p in g["params"]] == [(2, 4), (2,)]


def test_tied_weights_are_optimized_once():
    embedding = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight
    model = torch.nn.ModuleDict({"wte": embedding, "head": head})
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 1


# ----------------------------------------------------------------------------- Muon + AdamW as one optimizer


def _tiny_lm(seed: int = 0, tied: bool = True) -> MiniGPTForCausalLM:
    torch.manual_seed(seed)
    config = MiniGPTConfig.from_preset(
        "tiny", vocab_size=97, context_length=16, emb_dim=32, n_heads=2, n_layers=2, tie_word_embeddings=tied
    )
    return MiniGPTForCausalLM(config)


def _train_steps(model, optimizers, steps: int, seed: int) -> None:
    batches = torch.randint(0, 97, (steps, 4, 17), generator=torch.Generator().manual_seed(seed))
    for window in batches:
        batch = collate_windows([{"input_ids": row} for row in window])
        model(**batch).loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("tied", [True, False])
def test_muon_takes_the_matrices_inside_the_blocks_and_adamw_the_rest(tied):
    model = _tiny_lm(tied=tied)
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = build_muon_optimizer(model, lr=3e-3, muon_lr=0.02, weight_decay=0.1)
    muon, decayed, plain = optimizer.param_groups
    projections = ("W_query", "W_key", "W_value", "out_proj", "fc_in", "fc_out")
    expected = {
        f"model.trf_blocks.{i}.{sub}.{w}.weight"
        for i in range(2)
        for sub, w in (*(("att", w) for w in projections[:4]), *(("ff", w) for w in projections[4:]))
    }
    assert {names[id(p)] for p in muon["params"]} == expected
    embeddings = {"model.tok_emb.weight", "model.pos_emb.weight"} | (set() if tied else {"lm_head.weight"})
    assert {names[id(p)] for p in decayed["params"]} == embeddings
    assert all(p.dim() == 1 for p in plain["params"]) and plain["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    assert [(g["lr"], g["initial_lr"], g["weight_decay"]) for g in optimizer.param_groups] == [
        (0.02, 0.02, 0.1),
        (3e-3, 3e-3, 0.1),
        (3e-3, 3e-3, 0.0),
    ]
    with pytest.raises(ValueError, match="_no_split_modules"):
        hidden_matrices(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_muon_with_adamw_steps_exactly_like_torchs_two_optimizers():
    model = _tiny_lm()
    reference = copy.deepcopy(model)
    combined = build_muon_optimizer(model, lr=3e-3, muon_lr=0.02, weight_decay=0.1)
    params = dict(reference.named_parameters())
    hidden = [p for n, p in params.items() if ".trf_blocks." in n and p.dim() == 2]
    ids = {id(p) for p in hidden}
    rest = [p for p in params.values() if id(p) not in ids]
    parts = [
        torch.optim.Muon(hidden, lr=0.02, weight_decay=0.1),
        torch.optim.AdamW(
            [
                {"params": [p for p in rest if p.dim() == 2], "weight_decay": 0.1},
                {"params": [p for p in rest if p.dim() == 1], "weight_decay": 0.0},
            ],
            lr=3e-3,
            betas=(0.9, 0.95),
        ),
    ]
    _train_steps(model, [combined], 3, seed=1)
    _train_steps(reference, parts, 3, seed=1)
    ours, theirs = model.state_dict(), reference.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not torch.equal(
        ours["model.trf_blocks.0.att.W_query.weight"], _tiny_lm().state_dict()["model.trf_blocks.0.att.W_query.weight"]
    )


def test_muon_state_dict_is_plain_and_resumes_exactly_after_a_weights_only_load():
    model = _tiny_lm()
    optimizer = build_muon_optimizer(model, lr=3e-3, muon_lr=0.02, weight_decay=0.1)
    _train_steps(model, [optimizer], 2, seed=1)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # no pickled objects: only tensors, numbers, tuples, dicts
    # the standard layout: parameters numbered 0..N-1 over all groups, Muon's group first
    assert sorted(saved["state"]) == list(range(len(list(model.parameters()))))
    assert [len(g["params"]) for g in saved["param_groups"]] == [len(g["params"]) for g in optimizer.param_groups]
    assert len(saved["param_groups"]) == 3 and saved["param_groups"][0]["ns_steps"] == 5  # Muon's group first
    assert set(saved["state"][0]) == {"momentum_buffer"}
    assert set(saved["state"][len(saved["state"]) - 1]) == {"exp_avg", "exp_avg_sq", "step"}

    restored_model = copy.deepcopy(model)
    restored = build_muon_optimizer(
        restored_model, lr=1.0, muon_lr=1.0, weight_decay=0.0
    )  # settings come from the state
    restored.load_state_dict(saved)
    assert [g["initial_lr"] for g in restored.param_groups] == [0.02, 3e-3, 3e-3]
    assert restored.muon.state is restored.state and restored.muon.param_groups[0] is restored.param_groups[0]
    _train_steps(model, [optimizer], 2, seed=2)
    _train_steps(restored_model, [restored], 2, seed=2)
    ours, theirs = model.state_dict(), restored_model.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
