"""Data-parallel training under `torchrun` or `accelerate launch`: which process this is, and work done once.

    torchrun --nproc_per_node 8 -m retrieval_lora.train --task embedder --data corpus/ --batch-size 256
    accelerate launch --multi_gpu --num_processes 8 -m retrieval_lora.train --task embedder --data corpus/ --batch-size 256

A launcher starts N copies of the same command with RANK, WORLD_SIZE and LOCAL_RANK (and
MASTER_ADDR/PORT) in each one's environment. The engines do the distributed work: transformers'
Trainer (through accelerate) wraps the model in DistributedDataParallel, gives each process
every N-th batch, all-reduces the gradients, and writes checkpoints from rank 0 (each rank its
own RNG state); sentence-transformers' contrastive losses gather the other processes'
embeddings (`gather_across_devices`), so a process's queries are ranked against the in-batch
documents of all processes, exactly as one process with the whole batch would rank them. This
module adds only what the pipeline needs around that:

- `world()`: rank, world size and local rank from the launcher's environment (one process,
  rank 0, without a launcher);
- `start(device)`: the process group, before the first thing that talks to it (gloo on the CPU,
  NCCL on CUDA, each process on the GPU of its LOCAL_RANK), with a timeout long enough for rank 0
  to mine while the others wait (`RETRIEVAL_LORA_DIST_TIMEOUT_S`, default 7200 s);
- `once(compute, share)`: `compute()` on rank 0 only (mining, files), its small result sent to
  the other ranks, which wait and call `share(result)`; a failure on rank 0 is raised on every rank;
- `WholeGlobalBatches`: the no-duplicates batch sampler, keeping only the steps every process
  can take with a full batch (a process left without a batch at the end of an epoch would wait
  forever in the gradient all-reduce);
- `finish()`: all ranks meet, the group is torn down; rank 0 alone goes on (evaluation, gate,
  publishing run once).

There is no scheduler, launcher or parameter server here: restarts after a failed rank are the
launcher's (`torchrun --max-restarts`) or the operator's, and `--resume` continues every rank
from the last checkpoint all of them completed.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from sentence_transformers.base.sampler import NoDuplicatesBatchSampler

from retrieval_lora.errors import TrainingError

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 7200


@dataclass(frozen=True)
class World:
    """This process's place among the launcher's processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """Rank, world size and local rank as torchrun / accelerate launch set them (one process without them)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return World(rank=rank, size=size, local_rank=int(os.environ.get("LOCAL_RANK", str(rank))))


def uses_cuda(device: str | None) -> bool:
    """Whether training runs on CUDA: an explicit device wins, else CUDA when there is one."""
    return (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")


def process_device(device: str | None) -> str | None:
    """The device of this process: with several processes on CUDA, the GPU of its LOCAL_RANK."""
    here = world()
    if here.distributed and uses_cuda(device):
        return f"cuda:{here.local_rank}"
    return device


def start(device: str | None = None) -> World:
    """Join the launcher's process group (gloo on the CPU, NCCL on CUDA); a no-op for one process.

    Raises:
        TrainingError: WORLD_SIZE says several processes but MASTER_ADDR/MASTER_PORT are missing
            (the command was not started by torchrun or accelerate launch).
    """
    here = world()
    if not here.distributed or dist.is_initialized():
        return here
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise TrainingError(f"WORLD_SIZE={here.size} but {', '.join(missing)} is not set: start several processes "
                            "with `torchrun --nproc_per_node N -m retrieval_lora.train ...` or `accelerate launch`")
    cuda = uses_cuda(device)
    if cuda:
        torch.cuda.set_device(here.local_rank)
    timeout = datetime.timedelta(seconds=int(os.environ.get("RETRIEVAL_LORA_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S)))
    dist.init_process_group(backend="nccl" if cuda else "gloo", rank=here.rank, world_size=here.size, timeout=timeout)
    return here


def barrier() -> None:
    """Wait for every process (nothing to wait for without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def once(compute: Callable[[], T], share: Callable[[Any], T] | None = None,
         summary: Callable[[T], Any] | None = None) -> T:
    """`compute()` on rank 0 only; the other ranks wait for it and return `share(summary(result))`
    (defaults: the result itself, which must then be picklable and small: paths, fingerprints, counts).

    Raises:
        TrainingError: on the other ranks, when rank 0's `compute()` failed (rank 0 raises its own error).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return compute()
    if dist.get_rank() == 0:
        try:
            result = compute()
        except BaseException as exc:
            dist.broadcast_object_list([("failed", f"{type(exc).__name__}: {exc}")], src=0)
            raise
        dist.broadcast_object_list([("done", summary(result) if summary else result)], src=0)
        return result
    message: list[Any] = [None]
    dist.broadcast_object_list(message, src=0)
    status, value = message[0]
    if status == "failed":
        raise TrainingError(f"rank 0 failed, so this rank stops too: {value}")
    return share(value) if share is not None else value


def finish() -> None:
    """Every process reaches this point, then the process group is torn down (a no-op for one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def per_device_batch(global_batch: int, processes: int) -> int:
    """Rows per process per step for a step of `global_batch` rows over `processes` processes.

    Raises:
        TrainingError: the batch does not divide evenly (every process must take the same share).
    """
    if global_batch % processes:
        raise TrainingError(f"batch_size={global_batch} (rows per step, all processes together) does not divide "
                            f"among {processes} processes; use a multiple of {processes}")
    return global_batch // processes


class WholeGlobalBatches(NoDuplicatesBatchSampler):
    """sentence-transformers' no-duplicates batch sampler, cut to whole steps of all processes.

    accelerate hands batch i to process i mod N; we keep the first (full batches // N) x N
    full batches of each epoch, so every process takes the same number of steps with a full
    batch and the steps are the first ones a single process with N x the batch would take.
    The rows of the dropped tail batch(es) are in other batches of the next epochs (the order
    is reshuffled per epoch). Used only with several processes: one process keeps its last,
    partial batch, as before.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.processes = world().size

    def __iter__(self):
        batches = [batch for batch in super().__iter__() if len(batch) == self.batch_size]
        yield from batches[: len(batches) - len(batches) % self.processes]

    def __len__(self) -> int:
        full = len(self.dataset) // self.batch_size
        return full - full % self.processes
