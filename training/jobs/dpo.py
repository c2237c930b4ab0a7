"""Direct Preference Optimization (DPO) of a saved causal LM: the job behind `scripts/dpo.py`.

DPO (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290) tunes a policy π on pairs
(prompt x, chosen y_w, rejected y_l) against a frozen reference π_ref, usually the SFT model it
starts from. With the implicit reward r(y) = β · log π(y|x) / π_ref(y|x) the loss of a pair is

    -log σ(r(y_w) − r(y_l))

Choices, and where they come from:
- log π(y|x) is summed over the response tokens and the closing eos (`--logprob_reduction sum`:
  the paper and TRL's DPOTrainer) or averaged over them (`mean`: the book's dpo-from-scratch
  notebook, length-normalised). The eos is part of each response, so stopping is preferred or
  dispreferred with it; the book's responses have none.
- Rewards are reported as β · log-ratio, as TRL does (the book reports them without β).
- `--label_smoothing ε` is conservative DPO (cDPO, Mitchell 2023): each label is taken to be
  flipped with probability ε, loss = −(1−ε)·log σ(βh) − ε·log σ(−βh). `--loss_type ipo` is IPO
  (Azar et al. 2023, https://arxiv.org/abs/2310.12036): (h − 1/(2β))² on log-ratios averaged per
  response token whatever the reduction, as TRL computes it.
- `--sft_weight α` adds α times the chosen responses' language-modelling loss (nats per token,
  over the batch): RPO (Pang et al. 2024, https://arxiv.org/abs/2404.19733), TRL's
  `loss_type=["sigmoid", "sft"]`. DPO alone may lower the chosen response's likelihood too, as
  long as the rejected one falls faster; on a small model that unlearns the SFT answers (measured
  on the embedded tasks: exact match fell with reward accuracy rising). The SFT term holds them.
- The reference (`--reference model`): a frozen copy of the base for full fine-tuning, the same
  model with its LoRA adapter disabled for LoRA (no second copy in memory). `--reference
  precomputed`: its log-probabilities computed once before training and cached in a file (the
  run folder's reference_logps.safetensors, or `--reference_cache` to share one between runs,
  e.g. a β sweep); the cache records what it was computed from, and that identity is part of
  the run fingerprint.
- Dropout is off in the policy (TRL's default): with dropout the policy would differ from the
  reference at step 0, and every log-ratio would carry its noise. The saved config keeps the
  base's rate.
- Chosen and rejected go through the model in one batch (`training.data.preferences`).

Evaluation, before training, every `eval_every` steps and at the end, on the held-out pairs:
`val_loss` (the objective: the DPO loss, plus the SFT term with `--sft_weight`),
`val_rewards_chosen`, `val_rewards_rejected`, `val_reward_margin`, `val_reward_accuracy` (the
fraction of pairs whose chosen reward is the higher), the policy's
`val_logps_chosen` / `val_logps_rejected` (falling together is DPO's known failure),
`val_chosen_nll` (nats per token of the chosen responses, SFT's held-out loss), and from greedy
answers to the held-out prompts `val_exact_match` (the answer is the chosen one, per task kind
for the embedded tasks) and `val_match_rejected` (it is the rejected one).

Without a data file the job uses the embedded preference tasks (`training.data.tasks`): the correct
answer against a near miss, checkable by exact match.

Output folder: what every fine-tuning job writes (model/, adapter/ for LoRA, checkpoints,
metrics.jsonl, loss_curve.png, final_metrics.json), plus preference_curves.png (also in model/,
linked from the card), heldout_generations.json (one row per held-out pair: the greedy answer
before and after), heldout_generations_before.json, and reference_logps.safetensors with a
precomputed reference.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from modeling_minigpt.files import atomic_path, save_figure
from tokenization.alpaca import format_prompt
from tokenization.load import short_hash, tokenizer_fingerprint
from training.data.instructions import RecordSplits
from training.data.preferences import (
    REFERENCE_COLUMN,
    build_preference_dataset,
    collate_preference_batch,
    load_preference_records,
    pairs_digest,
)
from training.data.tasks import make_preference_splits
from training.evaluation.generate import eval_mode, generate_answers
from training.evaluation.metrics import exact_match, exact_match_summary, score_batch, score_generations
from training.run import lifecycle
from training.run import reference as reference_models
from training.run.accelerator import choose_attention
from training.run.arguments import LoopArguments
from training.run.loop import Batch, make_train_dataloader
from training.run.lora import LoraArguments, apply_lora, trainable_parameter_counts
from training.saved.plots import LOSS_CURVE_DPI, preference_curves_figure


@dataclass
class DPOArguments(lifecycle.InstructionDataArguments, lifecycle.HeldoutEvalArguments, lifecycle.BaseModelArguments):
    """The base model (usually an SFT model), the preference data, the DPO loss and how to evaluate."""

    # Its records are preference pairs: InstructionDataArguments' fields, with help that says so.
    train_file: str | None = field(
        default=None,
        metadata={
            "help": "Preference records (instruction, input, chosen, rejected): a .json array, .jsonl, .csv or "
            ".parquet file, a save_to_disk folder or a dataset name. Default: the embedded preference tasks."
        },
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Held-out preference records. Default: hold out part of train_file."}
    )
    num_train_pairs: int = field(default=3000, metadata={"help": "Embedded tasks: training pairs."})
    num_heldout_pairs: int = field(default=120, metadata={"help": "Embedded tasks: held-out pairs (disjoint prompts)."})
    max_length: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per sequence (prompt + response + eos); longer responses are cut, pairs whose prompt "
            "fills it are dropped. Default: the model's context length."
        },
    )
    finetune: Literal["full", "lora"] = field(
        default="full", metadata={"help": "Train every weight (full) or LoRA adapters only (see the --lora_* options)."}
    )
    beta: float = field(
        default=0.1,
        metadata={"help": "β: scale of the implicit reward; higher keeps the policy closer to the reference."},
    )
    loss_type: Literal["sigmoid", "ipo"] = field(
        default="sigmoid", metadata={"help": "sigmoid: DPO (the paper, TRL's default); ipo: IPO's squared loss."}
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "cDPO: assumed probability that a preference label is flipped, in [0, 0.5)."}
    )
    sft_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the chosen responses' LM loss added to the DPO loss (RPO); 0: DPO alone."},
    )
    logprob_reduction: Literal["sum", "mean"] = field(
        default="sum",
        metadata={"help": "A response's log-probability: sum over its tokens (paper, TRL) or mean (the book)."},
    )
    reference: Literal["model", "precomputed"] = field(
        default="model",
        metadata={
            "help": "model: a frozen copy of the base (full) or the adapter disabled (LoRA), run every step; "
            "precomputed: its log-probabilities computed once before training and cached."
        },
    )
    reference_cache: str | None = field(
        default=None,
        metadata={
            "help": "With --reference precomputed: the cache file (.safetensors), reused when it exists and was "
            "computed from the same base model and pairs. Default: reference_logps.safetensors in the run folder."
        },
    )
    generations_shown: int = field(default=5, metadata={"help": "Rows of the printed before/after table."})

    def __post_init__(self) -> None:
        self.check_data("num_train_pairs", "num_heldout_pairs")
        self.check_evaluation()
        if not self.beta > 0:
            raise ValueError(f"--beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.sft_weight < 0:
            raise ValueError(f"--sft_weight must be >= 0, got {self.sft_weight}")
        if self.label_smoothing and self.loss_type == "ipo":
            raise ValueError("--label_smoothing is cDPO's, for --loss_type sigmoid; IPO has no label smoothing")
        if self.reference_cache is not None and self.reference != "precomputed":
            raise ValueError("--reference_cache needs --reference precomputed")


# ----------------------------------------------------------------------------- the loss


def response_logps(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's response tokens and eos, their number), (2B,) each:
    the targets of the rows' unshifted labels (prompt and padding are -100), in float64."""
    nats, tokens, _ = score_batch(model, batch, batch["input_ids"].device)
    return -nats, tokens


@dataclass(frozen=True)
class PairTerms:
    """Per pair (B,): the loss and what the evaluation reports. Rewards are β · log-ratio."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor  # the policy's, with the objective's reduction
    rejected_logps: torch.Tensor
    chosen_nats: torch.Tensor  # the policy's summed cross-entropy of the chosen response
    chosen_tokens: torch.Tensor


@dataclass(frozen=True)
class DPOObjective:
    """The preference loss of a batch, given the policy's and the reference's summed log-probabilities."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    reduction: str = "sum"
    sft_weight: float = 0.0

    def batch_loss(self, terms: PairTerms) -> torch.Tensor:
        """The mean loss over the pairs, plus the SFT term: the chosen responses' nats per token."""
        loss = terms.losses.mean()
        if self.sft_weight:
            loss = loss + self.sft_weight * terms.chosen_nats.sum() / terms.chosen_tokens.sum()
        return loss

    def terms(self, policy_sums: torch.Tensor, reference_sums: torch.Tensor, tokens: torch.Tensor) -> PairTerms:
        """`policy_sums`, `reference_sums`, `tokens`: (2B,), the B chosen rows first."""
        per_token = self.reduction == "mean"
        policy = policy_sums / tokens if per_token else policy_sums
        reference = reference_sums / tokens if per_token else reference_sums
        chosen_logratio, rejected_logratio = (policy - reference).chunk(2)  # (B,) each
        if self.loss_type == "ipo":
            # IPO compares per-token log-ratios (TRL's normalisation, agreed with the IPO authors).
            mean_logratio = (policy_sums - reference_sums) / tokens
            chosen_mean, rejected_mean = mean_logratio.chunk(2)
            losses = (chosen_mean - rejected_mean - 1 / (2 * self.beta)) ** 2
        else:
            h = self.beta * (chosen_logratio - rejected_logratio)
            losses = -(1 - self.label_smoothing) * F.logsigmoid(h) - self.label_smoothing * F.logsigmoid(-h)
        chosen_logps, rejected_logps = policy.detach().chunk(2)
        chosen_tokens, _ = tokens.chunk(2)
        return PairTerms(
            losses=losses,
            chosen_rewards=self.beta * chosen_logratio.detach(),
            rejected_rewards=self.beta * rejected_logratio.detach(),
            chosen_logps=chosen_logps,
            rejected_logps=rejected_logps,
            chosen_nats=-policy_sums.chunk(2)[0],  # differentiable: the SFT term trains on it
            chosen_tokens=chosen_tokens,
        )


# What the reference contributes for a batch: its summed response log-probabilities (2B,).
Reference = Callable[[torch.nn.Module, Batch], torch.Tensor]


def summed_logps(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """What the reference contributes: the summed log-probabilities of the responses (2B,)."""
    return response_logps(model, batch)[0]


# DPO's references (`training.run.reference`): the base model's summed response log-probabilities.
FrozenCopy = partial(reference_models.FrozenCopy, score=summed_logps)
DisabledAdapter = partial(reference_models.DisabledAdapter, score=summed_logps)


def precomputed_reference(policy: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The reference of `--reference precomputed`: its log-probabilities travel with the batch."""
    return batch[REFERENCE_COLUMN]


@dataclass
class DPOLoss:
    """The loop's `loss_fn`: one forward of the policy over chosen and rejected, the reference's
    log-probabilities, and the mean DPO loss over the batch's pairs."""

    objective: DPOObjective
    reference: Reference

    def pair_terms(self, model: torch.nn.Module, batch: Batch) -> PairTerms:
        sums, tokens = response_logps(model, batch)
        return self.objective.terms(sums, self.reference(model, batch).to(sums), tokens)

    def __call__(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return self.objective.batch_loss(self.pair_terms(model, batch))


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def preference_metrics(
    loss: DPOLoss, model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator
) -> dict[str, float]:
    """The held-out numbers of `model` on `loader` (prepared by `accelerator`: each process scores its
    share and all get every pair)."""
    columns: dict[str, list[torch.Tensor]] = defaultdict(list)
    with eval_mode(model):
        for batch in loader:
            terms = {key: value.detach() for key, value in asdict(loss.pair_terms(model, batch)).items()}
            for key, value in accelerator.gather_for_metrics(terms).items():
                columns[key].append(value.cpu())
    if not columns:
        raise ValueError("the held-out loader yields no pair")
    c = {key: torch.cat(values) for key, values in columns.items()}
    margins = c["chosen_rewards"] - c["rejected_rewards"]
    chosen_nll = (c["chosen_nats"].sum() / c["chosen_tokens"].sum()).item()
    return {
        "val_loss": c["losses"].mean().item() + loss.objective.sft_weight * chosen_nll,
        "val_rewards_chosen": c["chosen_rewards"].mean().item(),
        "val_rewards_rejected": c["rejected_rewards"].mean().item(),
        "val_reward_margin": margins.mean().item(),
        "val_reward_accuracy": (margins > 0).double().mean().item(),
        "val_logps_chosen": c["chosen_logps"].mean().item(),
        "val_logps_rejected": c["rejected_logps"].mean().item(),
        "val_chosen_nll": chosen_nll,
    }


def answer_scores(records: Sequence[Mapping[str, str]], answers: Sequence[str]) -> dict[str, float]:
    """Exact match of the answers with the chosen response (per kind for task records), and how
    often they are the rejected one instead."""
    as_expected = [{**record, "output": record["chosen"]} for record in records]
    rejected = sum(exact_match(a, r["rejected"]) for a, r in zip(answers, records, strict=True))
    return {
        **exact_match_summary(score_generations(as_expected, answers)),
        "val_match_rejected": rejected / len(answers),
    }


def heldout_scores(
    prepared: lifecycle.PreparedRun,
    tokenizer: PreTrainedTokenizerBase,
    args: DPOArguments,
    loss: DPOLoss,
    model: torch.nn.Module,
    records: Sequence[Mapping[str, str]],
) -> tuple[dict[str, float], list[str]]:
    """(numbers, answers): the held-out preference metrics, and greedy answers to `records`."""
    accelerator = prepared.run.accelerator
    values = preference_metrics(loss, model, prepared.eval_loader, accelerator)
    if not records:
        return values, []
    answers = generate_answers(
        accelerator.unwrap_model(model), tokenizer, records, args.max_new_tokens, args.eval_batch_size, accelerator
    )
    return {**values, **answer_scores(records, answers)}, answers


def generation_rows(
    records: Sequence[Mapping[str, str]], before: Sequence[str] | None, after: Sequence[str]
) -> list[dict[str, Any]]:
    """One row per held-out pair: prompt, chosen, rejected, and the greedy answer before and after."""
    rows = []
    for i, record in enumerate(records):
        row = {key: record.get(key, "") for key in ("instruction", "input", "chosen", "rejected")}
        if "kind" in record:
            row["kind"] = record["kind"]
        for name, answers in (("before", before), ("after", after)):
            if answers is not None:
                row[name] = answers[i]
                row[f"{name}_exact_match"] = exact_match(answers[i], record["chosen"])
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- the precomputed reference


def reference_identity(args: DPOArguments, tokenizer: PreTrainedTokenizerBase, *datasets_: Any) -> dict[str, Any]:
    """What a precomputed reference was computed from: the base model's files, the tokenizer and every pair."""
    return {
        "base_model": lifecycle.model_identity(Path(args.model_path)),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "pairs_sha256": pairs_digest(*datasets_),
    }


def read_reference_cache(path: Path, identity: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The cached reference log-probabilities at `path`, refused unless computed from `identity`."""
    try:
        with safe_open(path, framework="pt") as f:
            saved = json.loads((f.metadata() or {}).get("identity", "null"))
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as error:  # a truncated or foreign file: one clear line
        raise ValueError(f"reference cache {path} cannot be read ({error}): delete it to recompute it") from None
    if saved != identity:
        differing = sorted(k for k in identity if saved is None or saved.get(k) != identity[k])
        raise ValueError(
            f"reference cache {path} was computed from another {', '.join(differing)} than this run's: "
            "delete it, or pass another --reference_cache"
        )
    return tensors


@torch.no_grad()
def compute_reference_logps(
    model: torch.nn.Module, dataset: Any, collate: Callable, batch_size: int, accelerator: Accelerator
) -> torch.Tensor:
    """(N, 2) float64: the summed log-probabilities of each pair's chosen and rejected response
    under `model`. Each process scores a contiguous share; all get the whole table."""
    indices = list(range(len(dataset)))
    rows: list[list[float]] = []
    with eval_mode(model), accelerator.autocast(), accelerator.split_between_processes(indices) as mine:
        for start in range(0, len(mine), batch_size):
            batch = collate([dataset[i] for i in mine[start : start + batch_size]])
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            chosen, rejected = response_logps(model, batch)[0].chunk(2)
            rows += [list(pair) for pair in zip(chosen.tolist(), rejected.tolist(), strict=True)]
    if accelerator.num_processes > 1:
        rows = gather_object(rows)
    return torch.tensor(rows, dtype=torch.float64).reshape(len(dataset), 2)


def write_reference_cache(path: Path, tensors: dict[str, torch.Tensor], identity: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"identity": json.dumps(identity, sort_keys=True)})


# ----------------------------------------------------------------------------- the job


def run_dpo(dpo_args: DPOArguments, lora_args: LoraArguments, loop_args: LoopArguments) -> lifecycle.FineTuningResult:
    """Preference-tune, evaluate and save (see the module docstring); resumes with `loop_args.resume`."""
    run, tokenizer, model, max_length = lifecycle.open_fine_tuning(
        "dpo", "DPO", dpo_args, loop_args, dpo_args.max_length
    )
    splits = dpo_args.load_splits(
        load_preference_records,
        make_preference_splits,
        dpo_args.num_train_pairs,
        dpo_args.num_heldout_pairs,
        "embedded preference tasks",
    )
    with run.accelerator.main_process_first():
        train_set, train_stats = build_preference_dataset(splits.train, tokenizer, max_length, "training records")
        heldout_set, heldout_stats = build_preference_dataset(splits.heldout, tokenizer, max_length, "held-out records")
    collate = partial(collate_preference_batch, pad_token_id=tokenizer.pad_token_id)
    # Before the reference exists: a reference on another attention path than the policy would
    # differ from it in the last bits under bf16, and the log-ratios would start off zero.
    choose_attention(model, loop_args, run.accelerator)
    cache = None
    if dpo_args.reference == "precomputed":
        cache = _reference_cache(dpo_args, loop_args, run, tokenizer, model, train_set, heldout_set, collate)
        train_set = train_set.add_column(REFERENCE_COLUMN, cache.tensors["train"].tolist())
        heldout_set = heldout_set.add_column(REFERENCE_COLUMN, cache.tensors["heldout"].tolist())
    model, loss, restore_dropout = _policy_and_loss(model, dpo_args, lora_args, run.accelerator, cache)
    prepared = lifecycle.prepare(
        run,
        model,
        make_train_dataloader(train_set, loop_args.per_device_batch_size, collate, loop_args.seed),
        DataLoader(heldout_set, batch_size=dpo_args.eval_batch_size, collate_fn=collate),
        fingerprint=_fingerprint(dpo_args, lora_args, loop_args, tokenizer, max_length, cache),
        config={"dpo": asdict(dpo_args), "lora": asdict(lora_args), "loop": asdict(loop_args)},
        summary=_summary(splits, train_stats, heldout_stats, model, run.accelerator.num_processes, cache),
    )
    if cache is not None and not cache.loaded and run.is_main:
        write_reference_cache(cache.path, cache.tensors, cache.identity)
    scores = partial(heldout_scores, prepared, tokenizer, dpo_args, loss)
    before, before_answers = lifecycle.evaluate_before_on_heldout(
        prepared, scores, splits.heldout, dpo_args.eval_before_training
    )
    after, answers = lifecycle.train_on_heldout(prepared, dpo_args, scores, splits.heldout, loss_fn=loss)
    restore_dropout()
    rows = generation_rows(splits.heldout, before_answers, answers)
    if run.is_main:
        figure = preference_curves_figure(prepared.metrics.records(), title=f"DPO {run.layout.root.name}")
        save_figure(figure, run.layout.preference_curves, dpi=LOSS_CURVE_DPI)
    return lifecycle.finish_fine_tuning(
        prepared,
        tokenizer,
        before=before,
        after=after,
        totals={"heldout_pairs": heldout_stats.pairs, "train_pairs": train_stats.pairs},
        card=_model_card(prepared, dpo_args, splits, before, after, train_stats.pairs),
        json_files={run.layout.generations: rows},
        report=_report(prepared, dpo_args, heldout_stats.pairs, before, after, rows),
        extra_files=[run.layout.preference_curves],
    )


def _policy_and_loss(
    model: torch.nn.Module,
    dpo_args: DPOArguments,
    lora_args: LoraArguments,
    accelerator: Accelerator,
    cache: ReferenceCache | None,
) -> tuple[torch.nn.Module, DPOLoss, Callable[[], None]]:
    """(the policy to train: the base, with a LoRA adapter for LoRA, dropout off; the loop's loss
    against its reference; the function that restores the dropout rates before saving)."""
    if dpo_args.finetune == "lora":
        model = apply_lora(model, lora_args, task_type="CAUSAL_LM")
    restore_dropout = reference_models.disable_dropout(model)
    if cache is not None:
        reference: Reference = precomputed_reference
    elif dpo_args.finetune == "lora":
        reference = DisabledAdapter(accelerator)
    else:
        reference = FrozenCopy(model, accelerator.device, accelerator.autocast)
    objective = DPOObjective(
        dpo_args.beta, dpo_args.loss_type, dpo_args.label_smoothing, dpo_args.logprob_reduction, dpo_args.sft_weight
    )
    return model, DPOLoss(objective, reference), restore_dropout


@dataclass
class ReferenceCache:
    path: Path
    identity: dict[str, Any]
    tensors: dict[str, torch.Tensor]  # "train" (N, 2), "heldout" (M, 2): chosen, rejected sums
    loaded: bool  # read from `path` (else computed by this run, written after `prepare`)


def _reference_cache(
    dpo_args: DPOArguments,
    loop_args: LoopArguments,
    run: lifecycle.Run,
    tokenizer: PreTrainedTokenizerBase,
    model: torch.nn.Module,
    train_set: Any,
    heldout_set: Any,
    collate: Callable,
) -> ReferenceCache:
    """The precomputed reference: read from its cache (one given with --reference_cache, or the run
    folder's when resuming), or computed now from the base model, before any adapter or training."""
    identity = reference_identity(dpo_args, tokenizer, train_set, heldout_set)
    path = Path(dpo_args.reference_cache) if dpo_args.reference_cache else run.layout.reference_logps
    if path.is_file() and (dpo_args.reference_cache or loop_args.resume):
        return ReferenceCache(path, identity, read_reference_cache(path, identity), loaded=True)
    model.to(run.accelerator.device)
    tensors = {
        name: compute_reference_logps(model, data, collate, dpo_args.eval_batch_size, run.accelerator)
        for name, data in (("train", train_set), ("heldout", heldout_set))
    }
    return ReferenceCache(path, identity, tensors, loaded=False)


def _fingerprint(
    dpo_args: DPOArguments,
    lora_args: LoraArguments,
    loop_args: LoopArguments,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    cache: ReferenceCache | None,
) -> dict[str, Any]:
    objective = ("beta", "loss_type", "label_smoothing", "sft_weight", "logprob_reduction", "reference")
    reference_cache = (
        {"path": str(cache.path.resolve()), "identity": short_hash(json.dumps(cache.identity, sort_keys=True))}
        if cache is not None
        else None
    )
    return lifecycle.fine_tuning_fingerprint(
        dpo_args,
        tokenizer,
        loop_args,
        lora_args,
        max_length,
        dpo_args.data_fingerprint("num_train_pairs", "num_heldout_pairs"),
        **{k: getattr(dpo_args, k) for k in objective},
        reference_cache=reference_cache,
    )


def _reference_words(dpo_args: DPOArguments) -> str:
    if dpo_args.reference == "precomputed":
        return "the base model, its log-probabilities computed once before training"
    return (
        "the base model with the LoRA adapter disabled" if dpo_args.finetune == "lora" else "a frozen copy of the base"
    )


def _summary(
    splits: RecordSplits,
    train_stats: Any,
    heldout_stats: Any,
    model: torch.nn.Module,
    num_processes: int,
    cache: ReferenceCache | None,
) -> str:
    trainable, total = trainable_parameter_counts(model)
    return (
        f"data: {splits.description}\n  train: {train_stats}\n  held-out: {heldout_stats}\n"
        f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.2%}); processes: {num_processes}"
        + (
            f"\nreference log-probabilities: {'read from' if cache.loaded else 'computed, cached in'} {cache.path}"
            if cache
            else ""
        )
    )


def _objective_words(dpo_args: DPOArguments) -> str:
    name = "IPO" if dpo_args.loss_type == "ipo" else ("cDPO" if dpo_args.label_smoothing else "DPO (sigmoid loss)")
    smoothing = f", label smoothing {dpo_args.label_smoothing:g}" if dpo_args.label_smoothing else ""
    sft = f", plus {dpo_args.sft_weight:g} x the chosen responses' LM loss (RPO)" if dpo_args.sft_weight else ""
    reduction = "summed over" if dpo_args.logprob_reduction == "sum" else "averaged over"
    return f"{name}, β {dpo_args.beta:g}{smoothing}{sft}; log-probabilities {reduction} the response tokens and eos"


def _table(rows: Sequence[Mapping[str, Any]], shown: int) -> str:
    """The first `shown` held-out rows as prompt | chosen | rejected | before | after lines."""
    cut = lambda text, n=40: repr(text if len(text) <= n else text[: n - 3] + "...")  # noqa: E731
    lines = []
    for row in rows[:shown]:
        prompt = row["instruction"] + (f" [{row['input']}]" if row["input"] else "")
        lines.append(
            f"  {cut(prompt, 60)}\n    chosen {cut(row['chosen'])}  rejected {cut(row['rejected'])}\n"
            f"    before {cut(row.get('before', '(not measured)'))}  after {cut(row['after'])}"
        )
    return "\n".join(lines)


PREFERENCE_REPORTED = (
    "val_loss",
    "val_reward_accuracy",
    "val_reward_margin",
    "val_rewards_chosen",
    "val_rewards_rejected",
    "val_logps_chosen",
    "val_logps_rejected",
    "val_chosen_nll",
    "val_exact_match",
    "val_match_rejected",
)


def _report(
    prepared: lifecycle.PreparedRun,
    dpo_args: DPOArguments,
    n_heldout: int,
    before: Mapping[str, float] | None,
    after: Mapping[str, float],
    rows: Sequence[Mapping[str, Any]],
) -> str:
    keys = [k for k in after if k in PREFERENCE_REPORTED or k.startswith("exact_match_")]
    lines = [f"\n{f'held-out ({n_heldout} pairs)':<26}{'before':>11}{'after':>11}"]
    for key in keys:
        was = f"{before[key]:.4f}" if before and key in before else "-"
        lines.append(f"  {key:<24}{was:>11}{after[key]:11.4f}")  # log-probs of long responses take 9+ chars
    lines.append(f"greedy answers before → after ({min(dpo_args.generations_shown, len(rows))} of {len(rows)}):")
    lines.append(_table(rows, dpo_args.generations_shown))
    lines.append(f"all of them: {prepared.run.layout.generations}; curves: {prepared.run.layout.preference_curves}")
    return "\n".join(lines)


def _model_card(
    prepared: lifecycle.PreparedRun,
    dpo_args: DPOArguments,
    splits: RecordSplits,
    before: Mapping[str, float] | None,
    after: Mapping[str, float],
    n_train: int,
) -> dict[str, Any]:
    method = "LoRA adapters, merged" if dpo_args.finetune == "lora" else "full fine-tuning"
    data = f"{splits.description}: {n_train:,} preference pairs (Alpaca format), {method}"
    evaluation = {
        "dataset_name": f"chosen responses of the held-out pairs of {splits.description} (response-token loss)",
        "dataset_split": "held-out",
        "val_loss": after["val_chosen_nll"],
        "reward_accuracy": after["val_reward_accuracy"],
        "reward_margin": after["val_reward_margin"],
    }
    record = splits.heldout[0]
    return {
        "training_info": lifecycle.training_info(prepared, data),
        "eval_results": evaluation,
        "base_model": dpo_args.model_path,
        "example_prompt": format_prompt(record["instruction"], record.get("input")),
        "tags": ["dpo"],
        "preference": {
            "method": _objective_words(dpo_args),
            "reference": _reference_words(dpo_args),
            "pairs": f"{n_train:,} training pairs, {len(splits.heldout):,} held-out",
            "before": dict(before) if before else {},
            "after": dict(after),
        },
    }
