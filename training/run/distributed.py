"""Sharded training with PyTorch FSDP2 (`fully_shard`) and per-rank data, for MiniGPT.

Two ways to shard the same model:

- on GPUs, through Accelerate: `accelerate launch --config_file scripts/configs/accelerate/fsdp2.yaml`
  makes `accelerator.prepare` call `fully_shard` itself, one group per `_no_split_modules` class;
- anywhere else (CPU with gloo, a plain `torchrun` script, tests): `shard_model` below. Accelerate
  1.15's FSDP plugin does not run on CPU (with `cpu=True` it silently falls back to DDP), so this
  is the path verified here, by `tests/training/run/test_distributed.py` on two gloo processes.

What sharding needs from the model, and what `shard_model` checks:

- one group per transformer block, plus the root: a block's parameters are all-gathered just
  before it runs and freed after, so a rank holds 1/N of the model plus, while computing, the
  root's parameters (embeddings, final norm, head) and a block or two;
- the tied token embedding / lm_head (one Parameter under two names) must belong to ONE group:
  both live outside the blocks, so the root group owns them and the tie survives; a block that
  shared a parameter with a module outside it would be refused here;
- the blocks to wrap are named by `model._no_split_modules` (the same list Accelerate's
  TRANSFORMER_BASED_WRAP and `device_map="auto"` read), so a model change that renames the block
  class changes both paths at once.

Saving: every rank holds a shard, so the state dict must be gathered first (`full_state_dict`,
a collective: all ranks call it) and the unsharded model rebuilt on rank 0 (`gather_full_model`),
which `save_pretrained` then writes like any other model. Resuming: `full_training_state` gathers
the model and the optimizer state (by parameter name) on rank 0, `load_full_training_state`
broadcasts them back into a freshly sharded model (tested 2 ranks -> 2 ranks; the states are keyed
by parameter name and hold whole tensors, so another number of ranks can load them too).

In a job (`scripts/pretrain.py --fsdp`): `shard_for_training` shards the model instead of
Accelerate wrapping it in DDP, `training.run.checkpoint` writes the gathered model and optimizer
state into the same checkpoint files a one-process run writes, and `unsharded` gives
`save_pretrained` the gathered model. Every forward of a sharded model is a collective: evaluations and samples run on
all ranks, never on rank 0 alone (it would wait forever for the others).

Data: `split_by_rank` gives each rank its share of a windows dataset (see its docstring for when
a rank reads only its own rows and when it reads the whole stream and keeps every N-th window);
`RankBatches` turns a stream into this rank's batches, the same number on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils import send_to_device
from datasets import Dataset, IterableDataset
from datasets.distributed import split_dataset_by_node
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.data import DataLoader
from transformers import PreTrainedModel

# ----------------------------------------------------------------------------- the model


def blocks_to_shard(model: PreTrainedModel) -> list[nn.Module]:
    """The submodules named by `model._no_split_modules`, in model order (MiniGPT: its TransformerBlocks)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no _no_split_modules: name its transformer block class there "
            "(e.g. _no_split_modules = ['TransformerBlock']) so each block becomes one FSDP group"
        )
    blocks = [module for module in model.modules() if type(module).__name__ in names]
    if not blocks:
        raise ValueError(
            f"{type(model).__name__}._no_split_modules = {sorted(names)} matches no submodule of the model"
        )
    return blocks


def shard_model(
    model: PreTrainedModel,
    *,
    mesh: DeviceMesh | None = None,
    mp_policy: MixedPrecisionPolicy | None = None,
) -> PreTrainedModel:
    """Apply FSDP2 in place: `fully_shard` on each block of `blocks_to_shard`, then on the root.

    Call it on every rank after `torch.distributed.init_process_group`, on identical weights
    (same seed, or the same checkpoint), and build the optimizer afterwards: sharding replaces
    each parameter by a DTensor holding this rank's rows. `mesh` defaults to all ranks (CUDA if
    available, else CPU); `mp_policy` to full fp32 (on GPUs: `MixedPrecisionPolicy(param_dtype=
    torch.bfloat16, reduce_dtype=torch.float32)` computes in bf16 and averages gradients in fp32).
    Returns the same object, whose class is now an FSDP subclass of the original.
    """
    if not dist.is_initialized():
        raise RuntimeError(
            "shard_model needs torch.distributed: call init_process_group first (gloo on CPU, nccl on GPUs)"
        )
    if isinstance(model, FSDPModule):
        raise ValueError(f"{type(model).__name__} is already sharded")
    blocks = blocks_to_shard(model)
    _check_no_parameter_crosses_a_block(model, blocks)
    tied = _tied_parameters(model)
    kwargs = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    for block in blocks:
        fully_shard(block, **kwargs)
    # The root keeps its parameters (embeddings, final norm, the tied head) unsharded after the
    # forward (PyTorch's default for the root): backward needs them first, at once.
    fully_shard(model, **kwargs)
    for names in tied:  # fully_shard swaps Parameters for DTensors; shared ones stay one object
        first = model.get_parameter(names[0])
        if any(model.get_parameter(name) is not first for name in names[1:]):
            raise RuntimeError(f"sharding untied {names}: the tied weights would train apart")
    return model


def _tied_parameters(model: nn.Module) -> list[list[str]]:
    """Names of each parameter reachable under more than one name (MiniGPT: lm_head ↔ tok_emb)."""
    names: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False, remove_duplicate=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if full not in names.setdefault(id(param), []):
                names[id(param)].append(full)
    return [group for group in names.values() if len(group) > 1]


def _check_no_parameter_crosses_a_block(model: nn.Module, blocks: Iterable[nn.Module]) -> None:
    """A parameter shared between a block and a module outside it would be seen by two FSDP
    groups. torch 2.13 refuses that too, but only at the root's `fully_shard`, when the blocks are
    already sharded; checking first leaves the model as it was."""
    block_paths = [name for name, module in model.named_modules() if any(module is block for block in blocks)]

    def owner(name: str) -> str | None:
        return next((path for path in block_paths if name.startswith(path + ".")), None)

    for names in _tied_parameters(model):
        if len({owner(name) for name in names}) > 1:
            raise ValueError(
                f"parameters {names} are one tensor shared between a block and another module: FSDP shards each "
                "block as its own group and cannot split a tied weight across groups; "
                "keep tied weights outside the blocks"
            )


# Gathered state: the whole tensors, on rank 0's CPU only (other ranks get {}), so nothing extra
# lands on a GPU and only one process holds a full copy.
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model state dict, gathered to rank 0 (others get {}). A collective: call it on every rank.

    Tied weights come back under each of their names (lm_head.weight and model.tok_emb.weight),
    as in an unsharded model's state_dict().
    """
    return get_model_state_dict(model, options=_GATHER)


def full_training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state), gathered whole to rank 0 (others get ({}, {})). A collective.

    The optimizer state is keyed by parameter names, not positions, and holds whole tensors
    (not this world size's shards), for `load_full_training_state`.
    """
    return get_state_dict(model, optimizer, options=_GATHER)


def load_full_training_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optimizer_state: dict
) -> None:
    """Put the states of `full_training_state` back into a sharded model and its optimizer. A collective:
    rank 0 passes the states, the other ranks may pass {}; rank 0 broadcasts each tensor and every
    rank keeps its own rows. The model must be sharded (`shard_model`) and the optimizer built on it."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    # Two calls, not one `set_state_dict`: that one decides from the (rank-dependent) emptiness of
    # model_state whether to load the model, so rank 0 and the others ran different collectives
    # and hung (torch 2.13).
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def unsharded_class(model: nn.Module) -> type[nn.Module]:
    """The model's own class: `fully_shard` makes an `FSDP<Name>` subclass, and a folder saved
    from that would name it in `architectures`."""
    return next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` is sharded with FSDP2: then every forward is a collective, which all ranks must run."""
    return isinstance(model, FSDPModule)


def unsharded(model: PreTrainedModel) -> PreTrainedModel | None:
    """`model` itself, or for a sharded one `gather_full_model` (a collective: None on ranks other than 0)."""
    return gather_full_model(model) if is_sharded(model) else model


def gather_full_model(model: PreTrainedModel) -> PreTrainedModel | None:
    """Rank 0: a plain, unsharded copy of `model` on CPU, ready for `save_pretrained`; other ranks: None.

    A collective (every rank must call it). Rank 0 builds the model from `model.config` and
    copies the gathered weights in, so it needs CPU memory for the full model (4 bytes/param in
    fp32) on top of the gathered state dict. `load_state_dict` copies into the existing
    parameters, so the tied head stays tied; `strict=True` fails on any missing or extra name.
    """
    state = full_state_dict(model)
    if dist.get_rank() != 0:
        return None
    plain = unsharded_class(model)(model.config)
    plain.load_state_dict(state, strict=True)
    return plain.eval()


def shard_for_training(accelerator: Any, model: PreTrainedModel) -> PreTrainedModel:
    """`shard_model` on the accelerator's device, for a run launched like DDP (`accelerate launch
    --multi_gpu --num_processes N`; on CPU with ACCELERATE_USE_CPU=1, gloo), after `check_can_shard`."""
    check_can_shard(accelerator)
    return shard_model(model.to(accelerator.device))


def check_can_shard(accelerator: Any) -> None:
    """Refuse (ValueError) what would silently go wrong with --fsdp: one process (nothing to shard
    over) and autocast mixed precision, which Accelerate applies only to models it prepared (FSDP2
    would need an `mp_policy` instead). Writes nothing: call it before the run folder is claimed."""
    if accelerator.num_processes < 2 or not dist.is_initialized():
        raise ValueError(
            "--fsdp shards the model over several processes: launch with accelerate launch --multi_gpu "
            "--num_processes N (on CPU with ACCELERATE_USE_CPU=1 in the environment), or drop --fsdp"
        )
    if accelerator.mixed_precision != "no":
        raise ValueError(
            f"--fsdp runs in full precision here, but mixed precision is {accelerator.mixed_precision}: pass "
            "--mixed_precision no (or shard through Accelerate with scripts/configs/accelerate/fsdp2.yaml on GPUs)"
        )


# ----------------------------------------------------------------------------- the data


def split_strategy(dataset: IterableDataset, world_size: int) -> str:
    """How `split_dataset_by_node` splits this stream: "shards" (each rank reads only its shards)
    when the number of shards is a multiple of world_size, else "examples" (each rank reads it all)."""
    return "shards" if dataset.num_shards % world_size == 0 else "examples"


def split_by_rank(
    dataset: Dataset | IterableDataset, rank: int, world_size: int, *, num_shards: int | None = None
) -> IterableDataset:
    """This rank's share of `dataset`, as a stream: the ranks' shares are disjoint and together are
    the whole epoch (every window exactly once), by `datasets.distributed.split_dataset_by_node`.

    - An Arrow `Dataset` (windows saved once with `save_to_disk`, or a non-streaming build) is
      cut into `num_shards` contiguous shards (default: `world_size`; any multiple works) and
      each rank reads only the rows of its own shards: no rank reads the whole corpus.
    - An `IterableDataset` is split by shard the same way when its `num_shards` is a multiple
      of `world_size`. Otherwise (`build_lm_datasets(..., streaming=True)` gives ONE shard: its
      windows come from a single token stream) it is split by example: every rank reads and
      tokenizes the whole stream and keeps windows rank, rank + N, rank + 2N, ... That is
      correct but costs N times the tokenization: for a large corpus save the windows once
      (`save_to_disk`) and pass the loaded `Dataset`.

    Shares can differ by a few windows (one per shard, or one when split by example): a loop
    over an epoch must give every rank the same number of steps (cap them by the smallest share,
    or cycle the stream under a fixed max_steps), or one rank waits forever in a collective
    while the others have finished.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    if isinstance(dataset, Dataset):
        num_shards = world_size if num_shards is None else num_shards
        if num_shards % world_size:
            raise ValueError(
                f"num_shards={num_shards} must be a multiple of world_size={world_size}, "
                "so every rank gets whole shards"
            )
        if num_shards > len(dataset):
            raise ValueError(f"num_shards={num_shards} is more than the dataset's {len(dataset)} rows")
        dataset = dataset.to_iterable_dataset(num_shards=num_shards)
    elif num_shards is not None:
        raise ValueError("num_shards applies to an Arrow Dataset only; an IterableDataset keeps its own shards")
    return split_dataset_by_node(
        dataset, rank=rank, world_size=world_size, strategy=split_strategy(dataset, world_size)
    )


class RankBatches:
    """This rank's batches of a stream of windows, epoch after epoch, the same number on every rank.

    Each epoch shuffles the stream (a buffer of `shuffle_buffer` windows, seeded by seed + epoch,
    the same on every rank), splits it with `split_by_rank` and batches this rank's share with
    `drop_last`. Shares differ by up to one window per shard, so before each batch the ranks
    agree (a MIN all-reduce of "I have one") and the epoch ends for all of them at the batch the
    shortest share runs out: the remainder is dropped on every rank alike. Without that, the
    rank with the longer share would start its next epoch later than the others, and the data
    position saved in a checkpoint (rank 0's) would be wrong for it. With one rank, and with
    shares a multiple of the batch, nothing is dropped beyond the one-process `drop_last`.

    Hand it to the training loop as it is, not through `accelerator.prepare`: that would shard
    the already-split stream a second time. Batches are moved to `device`. No `__len__`: the
    epoch's length is only known at its end.
    """

    def __init__(
        self,
        windows: IterableDataset,
        batch_size: int,
        collate_fn: Callable[[list[Any]], Any],
        *,
        rank: int,
        world_size: int,
        seed: int,
        shuffle_buffer: int,
        device: torch.device | str = "cpu",
    ):
        if not isinstance(windows, IterableDataset):
            raise TypeError(f"RankBatches streams an IterableDataset, got {type(windows).__name__}")
        self.windows = windows.shuffle(seed=seed, buffer_size=shuffle_buffer) if shuffle_buffer > 1 else windows
        self.batch_size, self.collate_fn, self.device = batch_size, collate_fn, torch.device(device)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Any]:
        share = split_by_rank(self.windows, self.rank, self.world_size)
        share.set_epoch(self.epoch)  # the shuffle's seed becomes seed + epoch
        # Its own generator: a DataLoader without one draws a seed from the global torch RNG,
        # which also drives dropout, so a resumed run would get other dropout masks.
        loader = DataLoader(
            share,
            batch_size=self.batch_size,
            collate_fn=self.collate_fn,
            drop_last=True,
            generator=torch.Generator().manual_seed(self.seed),
        )
        batches = iter(loader)
        while True:
            batch = next(batches, None)
            if not self._every_rank_has_one(batch is not None):
                return
            yield send_to_device(batch, self.device)

    def _every_rank_has_one(self, has_one: bool) -> bool:
        if self.world_size == 1:
            return has_one
        flag = torch.tensor(int(has_one), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())
