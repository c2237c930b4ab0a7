"""Group-relative policy optimisation (GRPO) from verifiable rewards: the job behind `scripts/grpo.py`.

GRPO (Shao et al. 2024, DeepSeekMath, https://arxiv.org/abs/2402.03300) tunes a policy π without
a value model: for each prompt it samples a group of G completions, scores each with a reward
function (here plain Python: `training.data.rewards`), and uses each completion's reward relative to
its group as the advantage of every one of its tokens:

    A_i = (r_i − mean(r_group)) / (std(r_group) + 1e-4)        (`--scale_rewards group`)

The policy is updated with PPO's clipped objective on the per-token probability ratio
ρ = π(y_t) / π_old(y_t), plus β times a per-token KL estimate to a reference π_ref
(k3: π_ref/π − log(π_ref/π) − 1):

    loss_t = −min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A) + β·KL_t

Choices, and where they come from (the names are TRL's `GRPOTrainer`'s, and the loss of one batch
equals TRL's, tests/test_grpo.py):
- Aggregation over tokens (`--loss_type`): `dapo` (the default, DAPO, Yu et al. 2025,
  https://arxiv.org/abs/2503.14476, and TRL's default): the mean over every completion token of
  the batch, so each token weighs the same whatever its completion's length; `grpo` (the paper):
  the mean over each completion's tokens, then over completions (a short wrong answer is pushed
  down harder per token than a long one); `dr_grpo` (Dr. GRPO, Liu et al. 2025,
  https://arxiv.org/abs/2503.20783): the sum divided by a constant (completions x
  --max_completion_length), no length bias at all. dapo is the default (TRL's too): no length
  bias per token, and its scale does not depend on --max_completion_length. On the embedded
  tasks' short answers (3-12 tokens) the three weigh tokens nearly alike; they were not compared
  for quality here.
- `--scale_rewards group` divides by the group's standard deviation (the paper); `batch` by the
  whole batch's (Dr. GRPO's point: per-group scaling over-weights nearly-solved groups; TRL's
  `batch`), `none` not at all (Dr. GRPO).
- One optimisation step per batch of samples (TRL's num_iterations = 1): π_old is π itself, the
  ratio is 1 in value and the clipping never bites, but it stays in the loss so that its gradient
  is the policy gradient of the clipped objective; several updates per sample (μ > 1) are not
  offered: they would need the samples kept across steps and in every checkpoint.
- β defaults to 0 (TRL's default since DAPO and Dr. GRPO dropped the KL term): no reference model
  is run. With β > 0 the reference is a frozen copy of the base (full fine-tuning) or the policy
  with its LoRA adapter disabled (`training.run.reference`), and the per-step `kl` is logged.
- Log-probabilities are those of the sampling distribution: the logits divided by
  --temperature (TRL does the same). Dropout is off in the policy.
- Sampling: a loop over the KV cache with transformers' --temperature / --top_k / --top_p warpers;
  each completion draws from its own seeded stream (run seed, step, prompt, place in the group),
  so a resumed run draws exactly what the uninterrupted one drew, two processes what one does,
  and the global RNG is left alone (`sample_completions`).

A training batch (--per_device_batch_size) is that many prompts; each is answered
--num_generations times, so a step scores per_device_batch_size x num_generations completions per
process. `tokens` in the log counts prompt tokens only.

Logged every step (metrics.jsonl, TensorBoard): `reward` (mean over the step's completions),
`reward_std`, `frac_reward_zero_std` (the share of groups whose rewards are all equal: no signal),
`completion_length` (tokens, eos included), `stopped` (share ending with the eos), `kl` (β > 0),
and `reward_<name>` per reward function when there are several. Evaluated before training, every
eval_every steps and at the end: greedy answers to the held-out prompts, `val_exact_match`
overall and per task kind (`exact_match_<kind>`), and `val_reward` (the reward of those answers).

Output folder: what every fine-tuning job writes (model/, adapter/ for LoRA, checkpoints,
metrics.jsonl, loss_curve.png, final_metrics.json), plus grpo_curves.png (also in model/),
heldout_generations.json (one row per held-out prompt: the greedy answer before and after) and
heldout_generations_before.json.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Literal

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase
from transformers.cache_utils import DynamicCache
from transformers.generation import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from modeling_minigpt.files import save_figure
from tokenization.alpaca import format_prompt
from training.data.collate import pad_sequences
from training.data.instructions import RecordSplits, encode_prompt, load_instruction_records
from training.data.rewards import BUILT_IN, Rewards
from training.data.tasks import generate_tasks, make_task_splits
from training.evaluation.generate import check_generation_room, eval_mode, greedy_generate
from training.evaluation.metrics import exact_match_summary, score_generations
from training.run import lifecycle
from training.run.accelerator import choose_attention
from training.run.arguments import LoopArguments
from training.run.loop import Batch, log_metrics, make_train_dataloader
from training.run.lora import LoraArguments, apply_lora, trainable_parameter_counts
from training.run.reference import DisabledAdapter, FrozenCopy, disable_dropout
from training.saved.plots import LOSS_CURVE_DPI, grpo_curves_figure


@dataclass
class GRPOArguments(lifecycle.InstructionDataArguments, lifecycle.HeldoutEvalArguments, lifecycle.BaseModelArguments):
    """The base model (usually an SFT model), the prompts, the rewards, the sampling and the GRPO loss."""

    # InstructionDataArguments' fields, with help that says what the rewards read and how the seed meets SFT's.
    train_file: str | None = field(
        default=None,
        metadata={
            "help": "Alpaca records (instruction, input, output: the expected answer the rewards may read): a .json "
            "array, .jsonl, .csv or .parquet file, a save_to_disk folder or a dataset name. Default: the embedded "
            "seeded tasks (no download)."
        },
    )
    data_seed: int = field(
        default=0,
        metadata={
            "help": "Seed of the embedded tasks (SFT's 0 gives SFT's held-out prompts) and of the held-out split "
            "of train_file."
        },
    )
    num_train_tasks: int = field(default=3000, metadata={"help": "Embedded tasks: training prompts."})
    num_heldout_tasks: int = field(
        default=120, metadata={"help": "Embedded tasks: held-out prompts (disjoint from the training ones)."}
    )
    prompt_seed: int | None = field(
        default=None,
        metadata={
            "help": "Embedded tasks: seed of the training prompts. Default: --data_seed (the SFT run's training "
            "prompts, which SFT may have memorised). Another seed draws prompts SFT never saw; held-out ones are "
            "left out."
        },
    )
    train_task_kinds: list[str] | None = field(
        default=None,
        metadata={
            "help": "Embedded tasks with --prompt_seed: the kinds the training prompts are drawn from (e.g. the ones "
            "SFT gets wrong most). Default: --task_kinds. The held-out prompts stay those of --task_kinds."
        },
    )
    finetune: Literal["full", "lora"] = field(
        default="full", metadata={"help": "Train every weight (full) or LoRA adapters only (see the --lora_* options)."}
    )
    reward_functions: list[str] = field(
        default_factory=lambda: ["exact_match"],
        metadata={
            "help": f"Rewards, summed with --reward_weights: built-in ({', '.join(BUILT_IN)}) or your own as "
            "module.path:function (TRL's signature: f(completions, **kwargs) -> list of floats; see "
            "training/data/rewards.py)."
        },
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per reward function. Default: 1 each."}
    )
    num_generations: int = field(
        default=8,
        metadata={
            "help": "G: completions sampled per prompt (the group), at least 2. A micro-batch is "
            "--per_device_batch_size prompts, so it scores per_device_batch_size x G completions."
        },
    )
    max_completion_length: int = field(
        default=32, metadata={"help": "Tokens sampled at most per completion (eos included)."}
    )
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature (> 0); the log-probabilities are taken at it too."}
    )
    top_k: int = field(default=0, metadata={"help": "Sample among the k most probable tokens; 0: off."})
    top_p: float = field(
        default=1.0, metadata={"help": "Nucleus sampling: smallest set of tokens with this mass; 1: off."}
    )
    loss_type: Literal["dapo", "grpo", "dr_grpo"] = field(
        default="dapo",
        metadata={
            "help": "dapo: mean over all completion tokens of the batch (DAPO, TRL's default); grpo: mean per "
            "completion, then over completions (the paper); dr_grpo: sum / (completions x max_completion_length)."
        },
    )
    scale_rewards: Literal["group", "batch", "none"] = field(
        default="group",
        metadata={
            "help": "Divide the advantages by the std of the group's rewards (group), the batch's, or not (none)."
        },
    )
    beta: float = field(
        default=0.0,
        metadata={"help": "β: weight of the per-token KL to the reference (k3 estimate); 0: no reference run."},
    )
    epsilon: float = field(default=0.2, metadata={"help": "ε_low: lower clipping bound of the ratio, 1 − ε."})
    epsilon_high: float | None = field(
        default=None, metadata={"help": "ε_high: upper clipping bound, 1 + ε_high (DAPO's clip-higher). Default: ε."}
    )
    generations_shown: int = field(default=5, metadata={"help": "Rows of the printed before/after table."})

    def __post_init__(self) -> None:
        self.check_data("num_train_tasks", "num_heldout_tasks")
        if self.max_completion_length < 1:
            raise ValueError(f"--max_completion_length must be >= 1, got {self.max_completion_length}")
        if self.num_generations < 2:
            raise ValueError(
                f"--num_generations must be >= 2, got {self.num_generations}: the advantages compare each "
                "completion with the others of its group, and a group of one has no others"
            )
        if not self.temperature > 0:
            raise ValueError(f"--temperature must be > 0 (GRPO samples), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"--top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.beta < 0:
            raise ValueError(f"--beta must be >= 0, got {self.beta}")
        if not 0 <= self.epsilon < 1:
            raise ValueError(f"--epsilon must be in [0, 1), got {self.epsilon}")
        if self.epsilon_high is not None and self.epsilon_high < 0:
            raise ValueError(f"--epsilon_high must be >= 0, got {self.epsilon_high}")
        if self.train_task_kinds is not None:
            if self.train_file is not None or self.prompt_seed in (None, self.data_seed):
                raise ValueError(
                    "--train_task_kinds needs the embedded tasks and a --prompt_seed other than --data_seed"
                )
            unknown = sorted(set(self.train_task_kinds) - set(self.task_kinds))
            if not self.train_task_kinds or unknown:
                got = unknown or "[]"
                raise ValueError(f"--train_task_kinds must be a non-empty subset of --task_kinds, got {got}")
        self.check_evaluation()


# ----------------------------------------------------------------------------- the objective


@dataclass(frozen=True)
class GRPOObjective:
    """Advantages from rewards, and the clipped per-token loss (TRL's `GRPOTrainer`, `num_iterations=1`)."""

    loss_type: str = "dapo"
    scale_rewards: str = "group"
    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    max_completion_length: int = 32

    def advantages(self, rewards: torch.Tensor, group_size: int, batch_std: torch.Tensor | None = None) -> torch.Tensor:
        """(N,) advantages of N = groups x `group_size` rewards, each group's rows adjacent.
        `batch_std`: the standard deviation over the whole batch (all processes), for `batch` scaling."""
        grouped = rewards.view(-1, group_size)
        centred = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
        if self.scale_rewards == "none":
            return centred
        if self.scale_rewards == "batch":
            std = batch_std if batch_std is not None else rewards.std()
        else:
            std = grouped.std(dim=1).repeat_interleave(group_size)  # unbiased, as TRL's nanstd
        return centred / (std + 1e-4)

    def per_token_loss(
        self,
        logps: torch.Tensor,
        old_logps: torch.Tensor,
        advantages: torch.Tensor,
        reference_logps: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, C) loss per completion token, and the per-token KL (None with β = 0)."""
        ratio = torch.exp(logps - old_logps)
        clipped = torch.clamp(ratio, 1 - self.epsilon_low, 1 + self.epsilon_high)
        a = advantages.unsqueeze(1)
        loss = -torch.min(ratio * a, clipped * a)
        kl = None
        if self.beta != 0.0:
            delta = reference_logps - logps
            kl = torch.exp(delta) - delta - 1
            loss = loss + self.beta * kl
        return loss, kl

    def aggregate(
        self, per_token: torch.Tensor, mask: torch.Tensor, tokens_per_process: torch.Tensor, rows: int | None = None
    ) -> torch.Tensor:
        """The batch loss from (N, C) per-token losses. `tokens_per_process`: the completion tokens
        of the batch over all processes, divided by their number (dapo's normaliser: with DDP's
        gradient averaging the result is the mean over every token of the global batch). `rows`:
        the batch's completions when `per_token` holds only some of them (the others add 0)."""
        masked = per_token * mask
        rows = per_token.size(0) if rows is None else rows
        if self.loss_type == "grpo":
            return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / rows
        if self.loss_type == "dr_grpo":
            return masked.sum() / (rows * self.max_completion_length)
        return masked.sum() / tokens_per_process.clamp(min=1.0)


def group_signal(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) bool: the completion's group has rewards that differ, so its advantages carry a signal
    (in a group of equal rewards they are 0, up to rounding, which this makes exact)."""
    grouped = rewards.view(-1, group_size)
    return (grouped.max(dim=1).values != grouped.min(dim=1).values).repeat_interleave(group_size)


def completion_logps(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor], temperature: float = 1.0
) -> torch.Tensor:
    """(N, C) float32 log-probabilities of the completion tokens under `model`, at `temperature`.
    `batch`: prompt_ids / prompt_mask (N, P, left-padded), completion_ids / completion_mask (N, C)."""
    completion_ids = batch["completion_ids"]
    input_ids = torch.cat([batch["prompt_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    n = completion_ids.size(1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=n + 1).logits
    logits = logits[:, :-1].float() / temperature  # row t predicts completion token t
    return torch.log_softmax(logits, dim=-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)


# ----------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class Sampling:
    num_generations: int
    max_completion_length: int
    temperature: float
    top_k: int
    top_p: float


def row_seeds(seed: int, step: int, indices: Sequence[int], group_size: int) -> list[int]:
    """The sampling seed of each completion: a function of the run's seed, the step, the prompt's
    index in the training data and the completion's place in its group, nothing else (not the
    batch it shares, not the process it runs on)."""
    return [
        ((((seed * 1_000_003 + step) * 1_000_033 + index) * 131 + j) % 2**63)
        for index in indices
        for j in range(group_size)
    ]


def sampling_warpers(sampling: Sampling) -> LogitsProcessorList:
    """transformers' temperature / top-k / top-p warpers, in `generate`'s order."""
    warpers = LogitsProcessorList()
    if sampling.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k:
        warpers.append(TopKLogitsWarper(top_k=sampling.top_k))
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=sampling.top_p))
    return warpers


@torch.no_grad()
def sample_completions(
    model: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    sampling: Sampling,
    seeds: Sequence[int],
    eos_token_id: int,
    pad_token_id: int,
) -> dict[str, torch.Tensor]:
    """G completions of each (left-padded) prompt, the rows of a group adjacent, with the KV cache.

    Each row draws from its own stream (`seeds`, one per row: `row_seeds`): its uniforms are drawn
    up front and each token is picked by inverse CDF of the warped distribution. A row's tokens
    therefore do not depend on which rows share its batch or process, so two processes sample
    what one does, a resumed run what the uninterrupted one did, and the global RNG is untouched.

    Returns prompt_ids / prompt_mask repeated (N = B x G rows), completion_ids (N, C) (pad after
    the first eos), completion_mask (1 up to and including the first eos) and `stopped` (the row
    has an eos)."""
    g, device = sampling.num_generations, prompt_ids.device
    input_ids = prompt_ids.repeat_interleave(g, dim=0)
    attention_mask = prompt_mask.repeat_interleave(g, dim=0)
    n, steps = input_ids.size(0), sampling.max_completion_length
    uniforms = torch.stack([torch.rand(steps, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)
    warpers = sampling_warpers(sampling)
    cache = DynamicCache(config=model.config)
    new_input, generated = input_ids, []
    done = torch.zeros(n, dtype=torch.bool, device=device)
    with eval_mode(model):
        for t in range(steps):
            out = model(
                input_ids=new_input, attention_mask=attention_mask, cache=cache, use_cache=True, logits_to_keep=1
            )
            cache = out.cache
            scores = warpers(input_ids, out.logits[:, -1].float())  # (N, V)
            cdf = torch.softmax(scores, dim=-1).cumsum(dim=-1)
            target = (uniforms[:, t : t + 1] * cdf[:, -1:]).contiguous()
            token = torch.searchsorted(cdf, target, right=True).clamp(max=cdf.size(1) - 1).squeeze(1)
            token = torch.where(done, torch.full_like(token, pad_token_id), token)
            generated.append(token)
            done = done | (token == eos_token_id)
            if bool(done.all()):
                break
            new_input = token[:, None]
            input_ids = torch.cat([input_ids, new_input], dim=1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(n, 1)], dim=1)
    completion_ids = torch.stack(generated, dim=1)  # (N, C)
    is_eos = completion_ids == eos_token_id
    stopped = is_eos.any(dim=1)
    first_eos = torch.where(stopped, is_eos.int().argmax(dim=1), completion_ids.size(1))
    positions = torch.arange(completion_ids.size(1), device=device)
    completion_mask = (positions[None, :] <= first_eos[:, None]).long()
    return {
        "prompt_ids": prompt_ids.repeat_interleave(g, dim=0),
        "prompt_mask": prompt_mask.repeat_interleave(g, dim=0),
        "completion_ids": completion_ids.masked_fill(completion_mask == 0, pad_token_id),
        "completion_mask": completion_mask,
        "stopped": stopped,
    }


# ----------------------------------------------------------------------------- the loss


# A reference's per-token log-probabilities of a rollout batch (N, C).
Reference = Callable[[torch.nn.Module, Batch], torch.Tensor]


@dataclass
class GRPOLoss:
    """The loop's `loss_fn`: sample a group per prompt, score, normalise, and the clipped loss.

    `state`, `accumulation` and `log` are set by the job once the run is prepared: the step and
    micro-batch seed the sampling, and each step's rollout statistics are logged with its number."""

    objective: GRPOObjective
    sampling: Sampling
    rewards: Rewards
    records: Sequence[Mapping[str, Any]]  # the training records, by the batch's `index`
    tokenizer: PreTrainedTokenizerBase
    accelerator: Accelerator
    seed: int
    reference: Reference | None = None
    state: Any = None
    accumulation: int = 1
    log: Callable[[int, dict[str, float]], None] | None = None
    _step: int = -1
    _micro: int = 0
    _window: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def rollout(self, model: torch.nn.Module, batch: Batch) -> dict[str, Any]:
        """Completions of the batch's prompts and their rewards, advantages and statistics."""
        step = self.state.step if self.state is not None else 0
        if step != self._step:
            self._step, self._micro, self._window = step, 0, []
        self._micro += 1
        g, indices = self.sampling.num_generations, batch["index"].tolist()
        rollout = sample_completions(
            self.accelerator.unwrap_model(model),
            batch["input_ids"],
            batch["attention_mask"],
            self.sampling,
            row_seeds(self.seed, step, indices, g),
            self.tokenizer.eos_token_id,
            self.tokenizer.pad_token_id,
        )
        records = [self.records[i] for i in indices for _ in range(g)]
        lengths = rollout["completion_mask"].sum(1).tolist()
        ids = [row[:n] for row, n in zip(rollout["completion_ids"].tolist(), lengths, strict=True)]
        texts = [self.tokenizer.decode(row, skip_special_tokens=True) for row in ids]
        prompts = [format_prompt(r["instruction"], r.get("input")) for r in records]
        stopped = rollout["stopped"].tolist()
        total, each = self.rewards.score(texts, records, prompts=prompts, completion_ids=ids, stopped=stopped)
        device = batch["input_ids"].device
        rewards = torch.tensor(total, dtype=torch.float32, device=device)
        batch_std = None
        if self.objective.scale_rewards == "batch":
            batch_std = self.accelerator.gather(rewards).std()
        rollout["signal"] = group_signal(rewards, g)
        rollout["advantages"] = self.objective.advantages(rewards, g, batch_std) * rollout["signal"]
        rollout["rewards"] = rewards
        rollout["each"] = {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in each.items()}
        return rollout

    def __call__(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        rollout = self.rollout(model, batch)
        loss, kl = self.loss(model, rollout)
        self._record(rollout, kl, batch["input_ids"].numel())
        return loss

    def loss(self, model: torch.nn.Module, rollout: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch loss of a rollout (and the per-token KL, β > 0).

        With β = 0 a completion whose group's rewards are all equal has advantage 0 and adds
        exactly 0 to the loss and its gradient: it is left out of the forward and backward (on the
        embedded tasks, a third to a half of the rows), the normalisers still count it."""
        mask = rollout["completion_mask"].float()
        tokens = self.accelerator.reduce(mask.sum(), reduction="sum") / self.accelerator.num_processes
        rows, n = rollout, mask.size(0)
        if self.objective.beta == 0.0:
            keep = rollout["signal"].clone()
            keep[0] = True  # at least one row: every process must run a backward through the model (DDP)
            if not bool(keep.all()):
                rows = {k: rollout[k][keep] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
                rows["advantages"] = rollout["advantages"][keep]
        logps = completion_logps(model, rows, self.sampling.temperature)
        reference = None
        if self.objective.beta != 0.0:
            reference = self.reference(model, rows).to(logps)
        per_token, kl = self.objective.per_token_loss(logps, logps.detach(), rows["advantages"], reference)
        loss = self.objective.aggregate(per_token, rows["completion_mask"].to(logps.dtype), tokens, n)
        return loss, None if kl is None else kl.detach() * mask

    def _record(self, rollout: Mapping[str, Any], kl: torch.Tensor | None, prompt_tokens: int) -> None:
        """Gather this micro-batch's statistics; after the step's last one, log the step."""
        g = self.sampling.num_generations
        mask = rollout["completion_mask"]
        stats = {
            "rewards": rollout["rewards"],
            "zero_std": (~rollout["signal"].view(-1, g)[:, 0]).float(),
            "length": mask.sum(1).float(),
            "stopped": rollout["stopped"].float(),
            **{f"reward_{k}": v for k, v in rollout["each"].items()},
        }
        if kl is not None:
            stats["kl"] = torch.stack([kl.sum().float(), mask.sum().float()])
        self._window.append(self.accelerator.gather(stats))
        if self._micro < self.accumulation or self.log is None:
            return
        merged = {k: torch.cat([w[k].reshape(-1) for w in self._window]) for k in self._window[0]}
        values = {
            "tokens": self.state.tokens_seen + prompt_tokens * self.accelerator.num_processes,
            "reward": merged["rewards"].mean().item(),
            "reward_std": merged["rewards"].std().item(),
            "frac_reward_zero_std": merged["zero_std"].mean().item(),
            "completion_length": merged["length"].mean().item(),
            "stopped": merged["stopped"].mean().item(),
        }
        if len(self.rewards.names) > 1:
            values.update({f"reward_{n}": merged[f"reward_{n}"].mean().item() for n in self.rewards.names})
        if "kl" in merged:
            pairs = merged["kl"].view(-1, 2)
            values["kl"] = (pairs[:, 0].sum() / pairs[:, 1].sum().clamp(min=1)).item()
        self.log(self.state.step + 1, values)


# ----------------------------------------------------------------------------- data


def load_prompt_splits(args: GRPOArguments) -> RecordSplits:
    """Training and held-out records: from files, or the embedded tasks (SFT's split for the same seed;
    with another --prompt_seed, training prompts drawn afresh, the held-out ones left out)."""
    splits = args.load_splits(
        load_instruction_records, make_task_splits, args.num_train_tasks, args.num_heldout_tasks, "embedded tasks"
    )
    if args.train_file is not None or args.prompt_seed is None or args.prompt_seed == args.data_seed:
        return splits
    held = {(r["instruction"], r["input"]) for r in splits.heldout}
    train_kinds = args.train_task_kinds or args.task_kinds
    fresh = generate_tasks(args.num_train_tasks + args.num_heldout_tasks, args.prompt_seed, train_kinds)
    train = [r for r in fresh if (r["instruction"], r["input"]) not in held][: args.num_train_tasks]
    kinds = ", ".join(args.task_kinds)
    description = f"embedded tasks ({kinds}), training prompts seed {args.prompt_seed}, held-out seed {args.data_seed}"
    if args.train_task_kinds is not None:
        description += f"; training prompts of {', '.join(train_kinds)} only"
    return RecordSplits(train, splits.heldout, description)


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[Mapping[str, str]], room: int, what: str
) -> list[dict[str, Any]]:
    """{input_ids, index} per record; ValueError when a prompt leaves fewer than
    --max_completion_length tokens of the context (`room`: the most a prompt may have)."""
    rows = [{"input_ids": encode_prompt(tokenizer, r), "index": i} for i, r in enumerate(records)]
    long = [len(r["input_ids"]) for r in rows if len(r["input_ids"]) > room]
    if long:
        raise ValueError(
            f"{len(long)} of the {len(rows)} {what} are longer than the {room} tokens the context leaves after "
            f"--max_completion_length (the longest: {max(long)} tokens): shorten them or lower --max_completion_length"
        )
    return rows


def collate_prompts(rows: Sequence[Mapping[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Prompts left-padded (generation continues from each row's last token), and their indices."""
    ids = [list(r["input_ids"]) for r in rows]
    return {
        "input_ids": pad_sequences(ids, pad_token_id, side="left"),
        "attention_mask": pad_sequences([[1] * len(x) for x in ids], 0, side="left"),
        "index": torch.tensor([r["index"] for r in rows]),
    }


def probe_rewards(rewards: Rewards, records: Sequence[Mapping[str, Any]]) -> None:
    """Call every reward function once before anything is written: on the expected answers
    (stopped) and on empty completions (cut), so a broken one fails now, in one line."""
    probe = list(records[:2])
    completions = [r.get("output", "") for r in probe] + ["" for _ in probe]
    rows = probe + probe
    rewards.score(
        completions,
        rows,
        prompts=[format_prompt(r["instruction"], r.get("input")) for r in rows],
        completion_ids=[[] for _ in rows],
        stopped=[True] * len(probe) + [False] * len(probe),
    )


# ----------------------------------------------------------------------------- evaluation


def heldout_scores(
    accelerator: Accelerator,
    tokenizer: PreTrainedTokenizerBase,
    args: GRPOArguments,
    rewards: Rewards,
    model: torch.nn.Module,
    records: Sequence[Mapping[str, str]],
) -> tuple[dict[str, float], list[str]]:
    """(numbers, answers): greedy answers to `records`, their exact match (per kind) and reward."""
    if not records:
        return {}, []
    policy = accelerator.unwrap_model(model)
    prompts = [encode_prompt(tokenizer, r) for r in records]
    new = greedy_generate(
        policy,
        prompts,
        args.max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        batch_size=args.eval_batch_size,
        accelerator=accelerator,
    )
    stopped = [tokenizer.eos_token_id in ids for ids in new]
    answers = [
        tokenizer.decode(ids[:-1] if s else ids, skip_special_tokens=True) for ids, s in zip(new, stopped, strict=True)
    ]
    total, _ = rewards.score(
        answers,
        records,
        prompts=[format_prompt(r["instruction"], r.get("input")) for r in records],
        completion_ids=new,
        stopped=stopped,
    )
    summary = exact_match_summary(score_generations(records, answers))
    return {**summary, "val_reward": sum(total) / len(total)}, answers


def generation_rows(
    records: Sequence[Mapping[str, str]], before: Sequence[str] | None, after: Sequence[str]
) -> list[dict[str, Any]]:
    """One row per held-out prompt: instruction, input, expected, kind, the greedy answer before and after."""
    rows = []
    after_rows = score_generations(records, after)
    before_rows = score_generations(records, before) if before is not None else None
    for i, row in enumerate(after_rows):
        out = {k: row[k] for k in ("instruction", "input", "expected") if k in row}
        if "kind" in row:
            out["kind"] = row["kind"]
        if before_rows is not None:
            out["before"], out["before_exact_match"] = before_rows[i]["generated"], before_rows[i]["exact_match"]
        out["after"], out["after_exact_match"] = row["generated"], row["exact_match"]
        rows.append(out)
    return rows


# ----------------------------------------------------------------------------- the job


def run_grpo(
    grpo_args: GRPOArguments, lora_args: LoraArguments, loop_args: LoopArguments
) -> lifecycle.FineTuningResult:
    """Tune from verifiable rewards, evaluate and save (see the module docstring); resumes with `loop_args.resume`."""
    rewards = Rewards.load(grpo_args.reward_functions, grpo_args.reward_weights)
    run, tokenizer, model, context_length = lifecycle.open_fine_tuning("grpo", "GRPO", grpo_args, loop_args, None)
    accelerator = run.accelerator
    check_generation_room(grpo_args.max_completion_length, context_length, "--max_completion_length")
    check_generation_room(grpo_args.max_new_tokens, context_length, "--max_new_tokens")
    splits = load_prompt_splits(grpo_args)
    room = context_length - grpo_args.max_completion_length
    train_rows = encode_prompts(tokenizer, splits.train, room, "training prompts")
    heldout_rows = encode_prompts(
        tokenizer, splits.heldout, context_length - grpo_args.max_new_tokens, "held-out prompts"
    )
    probe_rewards(rewards, splits.train)
    # Before the reference exists: a reference on another attention path than the policy would
    # differ from it in the last bits under bf16.
    choose_attention(model, loop_args, accelerator)
    model, loss, restore_dropout = _policy_and_loss(
        model, grpo_args, lora_args, loop_args, rewards, splits, tokenizer, accelerator
    )
    collate = partial(collate_prompts, pad_token_id=tokenizer.pad_token_id)
    prepared = lifecycle.prepare(
        run,
        model,
        make_train_dataloader(train_rows, loop_args.per_device_batch_size, collate, loop_args.seed),
        DataLoader(heldout_rows, batch_size=grpo_args.eval_batch_size, collate_fn=collate),
        fingerprint=_fingerprint(grpo_args, lora_args, loop_args, tokenizer, context_length),
        config={"grpo": asdict(grpo_args), "lora": asdict(lora_args), "loop": asdict(loop_args)},
        summary=_summary(splits, len(train_rows), len(heldout_rows), model, accelerator.num_processes, grpo_args),
    )
    loss.state, loss.accumulation = prepared.state, loop_args.gradient_accumulation_steps
    loss.log = partial(log_metrics, accelerator, prepared.metrics)

    scores = partial(heldout_scores, accelerator, tokenizer, grpo_args, rewards)
    before, before_answers = lifecycle.evaluate_before_on_heldout(
        prepared, scores, splits.heldout, grpo_args.eval_before_training
    )
    after, answers = lifecycle.train_on_heldout(prepared, grpo_args, scores, splits.heldout, loss_fn=loss)
    restore_dropout()
    rows = generation_rows(splits.heldout, before_answers, answers)
    if run.is_main:
        figure = grpo_curves_figure(prepared.metrics.records(), title=f"GRPO {run.layout.root.name}")
        save_figure(figure, run.layout.grpo_curves, dpi=LOSS_CURVE_DPI)
    return lifecycle.finish_fine_tuning(
        prepared,
        tokenizer,
        before=before,
        after=after,
        totals={"heldout_prompts": len(rows), "train_prompts": len(train_rows)},
        card=_model_card(prepared, grpo_args, splits, before, after, len(train_rows)),
        json_files={run.layout.generations: rows},
        report=_report(prepared, grpo_args, before, after, rows),
        extra_files=[run.layout.grpo_curves],
    )


def _policy_and_loss(
    model: torch.nn.Module,
    grpo_args: GRPOArguments,
    lora_args: LoraArguments,
    loop_args: LoopArguments,
    rewards: Rewards,
    splits: RecordSplits,
    tokenizer: PreTrainedTokenizerBase,
    accelerator: Accelerator,
) -> tuple[torch.nn.Module, GRPOLoss, Callable[[], None]]:
    """(the policy to train: the base, with a LoRA adapter for LoRA, dropout off; the loop's loss
    with its reference when β > 0; the function that restores the dropout rates before saving)."""
    if grpo_args.finetune == "lora":
        model = apply_lora(model, lora_args, task_type="CAUSAL_LM")
    restore_dropout = disable_dropout(model)
    score = partial(completion_logps, temperature=grpo_args.temperature)
    reference: Reference | None = None
    if grpo_args.beta != 0.0:
        if grpo_args.finetune == "lora":
            reference = DisabledAdapter(accelerator, score=score)
        else:
            reference = FrozenCopy(model, accelerator.device, accelerator.autocast, score=score)
    high = grpo_args.epsilon if grpo_args.epsilon_high is None else grpo_args.epsilon_high
    objective = GRPOObjective(
        grpo_args.loss_type,
        grpo_args.scale_rewards,
        grpo_args.beta,
        grpo_args.epsilon,
        high,
        grpo_args.max_completion_length,
    )
    sampling = Sampling(
        grpo_args.num_generations,
        grpo_args.max_completion_length,
        grpo_args.temperature,
        grpo_args.top_k,
        grpo_args.top_p,
    )
    loss = GRPOLoss(objective, sampling, rewards, splits.train, tokenizer, accelerator, loop_args.seed, reference)
    return model, loss, restore_dropout


def _fingerprint(
    grpo_args: GRPOArguments,
    lora_args: LoraArguments,
    loop_args: LoopArguments,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
) -> dict[str, Any]:
    objective = (
        "reward_functions",
        "reward_weights",
        "num_generations",
        "max_completion_length",
        "temperature",
        "top_k",
        "top_p",
        "loss_type",
        "scale_rewards",
        "beta",
        "epsilon",
        "epsilon_high",
    )
    data = grpo_args.data_fingerprint("num_train_tasks", "num_heldout_tasks", "prompt_seed", "train_task_kinds")
    return lifecycle.fine_tuning_fingerprint(
        grpo_args, tokenizer, loop_args, lora_args, max_length, data, **{k: getattr(grpo_args, k) for k in objective}
    )


def _summary(
    splits: RecordSplits, n_train: int, n_heldout: int, model: torch.nn.Module, num_processes: int, args: GRPOArguments
) -> str:
    trainable, total = trainable_parameter_counts(model)
    return (
        f"data: {splits.description}\n  train: {n_train} prompts x {args.num_generations} completions each\n"
        f"  held-out: {n_heldout} prompts (greedy answers)\nrewards: {_reward_words(args)}\n"
        f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.2%}); processes: {num_processes}"
    )


def _reward_words(args: GRPOArguments) -> str:
    weights = args.reward_weights or [1.0] * len(args.reward_functions)
    return " + ".join(f"{w:g} x {n}" for n, w in zip(args.reward_functions, weights, strict=True))


def _objective_words(args: GRPOArguments) -> str:
    high = args.epsilon if args.epsilon_high is None else args.epsilon_high
    reference = "the base, adapter disabled" if args.finetune == "lora" else "a frozen copy of the base"
    kl = f", β {args.beta:g} (KL to {reference})"
    return (
        f"GRPO, {args.loss_type} loss, rewards scaled by {args.scale_rewards} std, clip [1 − {args.epsilon:g}, "
        f"1 + {high:g}]{kl if args.beta else ', no KL term'}; G = {args.num_generations} completions per prompt at "
        f"temperature {args.temperature:g}"
    )


def _table(rows: Sequence[Mapping[str, Any]], shown: int) -> str:
    """The first `shown` held-out rows whose answer changed (else the first rows): prompt, expected, before, after."""
    cut = lambda text, n=40: repr(text if len(text) <= n else text[: n - 3] + "...")  # noqa: E731
    changed = [r for r in rows if r.get("before") != r["after"]] or list(rows)
    lines = []
    for row in changed[:shown]:
        prompt = row["instruction"] + (f" [{row['input']}]" if row["input"] else "")
        lines.append(
            f"  {cut(prompt, 60)}\n    expected {cut(row['expected'])}  "
            f"before {cut(row.get('before', '(not measured)'))}  after {cut(row['after'])}"
        )
    return "\n".join(lines)


def _report(
    prepared: lifecycle.PreparedRun,
    args: GRPOArguments,
    before: Mapping[str, float] | None,
    after: Mapping[str, float],
    rows: Sequence[Mapping[str, Any]],
) -> str:
    lines = [f"\n{f'held-out ({len(rows)} prompts)':<26}{'before':>9}{'after':>9}"]
    for key in after:
        was = f"{before[key]:.4f}" if before and key in before else "-"
        lines.append(f"  {key:<24}{was:>9}{after[key]:9.4f}")
    changed = sum(r.get("before") != r["after"] for r in rows)
    lines.append(f"greedy answers that changed: {changed} of {len(rows)}; some of them (before → after):")
    lines.append(_table(rows, args.generations_shown))
    layout = prepared.run.layout
    lines.append(f"all of them: {layout.generations}; curves: {layout.grpo_curves}")
    return "\n".join(lines)


def _model_card(
    prepared: lifecycle.PreparedRun,
    args: GRPOArguments,
    splits: RecordSplits,
    before: Mapping[str, float] | None,
    after: Mapping[str, float],
    n_train: int,
) -> dict[str, Any]:
    method = "LoRA adapters, merged" if args.finetune == "lora" else "full fine-tuning"
    was = f"{before['val_exact_match']:.1%} → " if before and "val_exact_match" in before else ""
    data = (
        f"{splits.description}: {n_train:,} prompts, rewards {_reward_words(args)}; {_objective_words(args)}; "
        f"{method}. Held-out exact match (greedy, {len(splits.heldout)} prompts): {was}{after['val_exact_match']:.1%}"
    )
    record = splits.heldout[0]
    evaluation = {
        "dataset_name": f"held-out prompts of {splits.description} (greedy answers)",
        "dataset_split": "held-out",
        "exact_match": after["val_exact_match"],
    }
    return {
        "training_info": lifecycle.training_info(prepared, data),
        "eval_results": evaluation,
        "base_model": args.model_path,
        "example_prompt": format_prompt(record["instruction"], record.get("input")),
        "tags": ["grpo", "reinforcement-learning"],
    }
