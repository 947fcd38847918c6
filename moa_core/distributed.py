"""Data-parallel training across processes with torch DDP, launched by `torchrun` (torch.distributed.run).

Every rank builds the same model and draws the same global batch (batches are deterministic in
(seed, step)); it keeps the rows `rank::world_size` of it, and DistributedDataParallel averages the
gradients over ranks during backward. So N ranks train on the single-process batch of `batch_size` rows,
split N ways: same schedule, same number of optimizer steps. Each rank's LM loss is its label tokens' sum
over the global batch's token count / N, so DDP's gradient mean is the one-process gradient of the
token mean over the whole batch: the loss curve matches one process up to float summation order.
That equality holds without randomness in the step: with LoRA dropout or MoSLD's DropConnect each rank
draws its own masks (seeded per rank), as any data-parallel run does. The MoA routing loss is a mean over
rows, which equal row shards keep exact; MoSLD's balance loss is computed per rank, as in other MoE
data-parallel training.

Rank 0 alone writes checkpoints, saves the result and logs; the others only compute. One process (no
`torchrun`, or WORLD_SIZE=1) takes none of these paths.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from .ranks import is_main_process, launched_by_torchrun  # noqa: F401  (torch-free, for the CLI)


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel group (from torchrun's RANK / WORLD_SIZE / LOCAL_RANK)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """This rank's rows of a global batch: every tensor [B, ...] -> [B / world_size, ...]."""
        batch_size = len(batch["input_ids"])
        if batch_size % self.world_size:
            raise ValueError(f"train.batch_size={batch_size} does not split over {self.world_size} processes: "
                             f"set it to a multiple of {self.world_size} (or use fewer processes)")
        return {k: v[self.rank::self.world_size] if isinstance(v, Tensor) else v for k, v in batch.items()}

    def wrap(self, module: nn.Module) -> nn.Module:
        """DDP over the module's trainable parameters. The frozen base's buffers (rotary tables) are the
        same on every rank, so they are not re-broadcast each step."""
        ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                   else {"broadcast_buffers": False})  # the older name, deprecated from torch 2.13
        return ddp(module, device_ids=ids, **no_sync)

    def sum(self, value: float) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(t)
        return float(t.item())

    def mean(self, value: float) -> float:
        return self.sum(value) / self.world_size


def check_sums_loss(model: nn.Module) -> None:
    """The exact DDP loss scaling hands `num_items_in_batch` to the HF model's loss; a model whose forward
    does not take loss keywords would silently fall back to a per-rank mean."""
    accepts = getattr(model, "accepts_loss_kwargs", None)
    if accepts is None:
        accepts = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values())
    if not accepts:
        raise ValueError(f"{type(model).__name__}.forward takes no loss keywords (num_items_in_batch), so its loss "
                         "cannot be scaled for data-parallel training; train it in one process")


def init_from_env(backend: str | None = None) -> DataParallel | None:
    """Join the process group torchrun describes in the environment; None when running alone.

    backend: "nccl" on CUDA and "gloo" on CPU unless given (MOA_DIST_BACKEND overrides, e.g. gloo to try
    several ranks on one GPU, which NCCL refuses)."""
    if not launched_by_torchrun():
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    gpus = torch.cuda.device_count()
    device = torch.device("cuda", local % gpus) if gpus else torch.device("cpu")
    backend = backend or os.environ.get("MOA_DIST_BACKEND") or ("nccl" if gpus else "gloo")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if backend == "nccl" and local_world > gpus:
        raise RuntimeError(f"{local_world} processes on this node but {gpus} GPU(s): NCCL needs a GPU per process. "
                           f"Use --nproc-per-node {gpus}, or MOA_DIST_BACKEND=gloo to share GPUs (slow; for checks only)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DataParallel(rank=rank, world_size=world, local_rank=local, device=device)


def shutdown(dp: DataParallel | None) -> None:
    if dp is not None and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
