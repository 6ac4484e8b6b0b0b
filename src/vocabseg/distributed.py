"""torch.distributed for jobs started with ``torchrun`` (evaluation shards, data-parallel training), written once.

``torchrun`` sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and the rendezvous address; a plain ``python`` run is
rank 0 of 1 and never touches torch.distributed, so every function here is a no-op there. A job::

    device = distributed_device(args.device)   # cuda:LOCAL_RANK under torchrun on GPUs
    info = init_distributed(device)            # join the process group (gloo on the CPU, nccl on CUDA)
    try:
        ...                                    # info.rank, info.world_size, info.is_main
        total = all_reduce(tensor, info)       # sum (or max) over the ranks
        barrier(info)                          # wait for every rank (e.g. until rank 0 wrote a file)
    finally:
        teardown(info)
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Literal

#: How long a collective waits for the other ranks (long: rank 0 may be writing results meanwhile).
TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a torchrun job (rank 0 of 1 when not distributed); ``backend`` is None then."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes results, checkpoints and logs."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def distributed_device(device: str | None) -> str | None:
    """Under torchrun on GPUs each rank takes its own ``cuda:LOCAL_RANK``; other devices are kept (and ``None``
    stays ``None`` outside torchrun, for the caller's default)."""
    if env_world_size() <= 1:
        return device
    import torch

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local}"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    return device


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the torchrun process group (env:// rendezvous) when ``WORLD_SIZE`` > 1, once per process: nccl when
    ``device`` is a CUDA device, gloo otherwise. Returns this process's :class:`DistInfo`."""
    if env_world_size() <= 1:
        return DistInfo()
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device and str(device).startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                    dist.get_backend())


def all_reduce(tensor, info: DistInfo, op: Literal["sum", "max"] = "sum"):
    """``tensor`` summed (or maxed) over the ranks, in place, and returned; nccl reduces on this rank's GPU, so a
    CPU tensor makes the trip there and back. Unchanged when not distributed."""
    if not info.is_distributed:
        return tensor
    import torch
    import torch.distributed as dist

    reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
    if info.backend == "nccl" and tensor.device.type != "cuda":
        on_gpu = tensor.to(torch.device("cuda", info.local_rank))
        dist.all_reduce(on_gpu, op=reduce_op)
        return tensor.copy_(on_gpu.cpu())
    dist.all_reduce(tensor, op=reduce_op)
    return tensor


def barrier(info: DistInfo) -> None:
    """Wait until every rank reaches this point (nothing when not distributed)."""
    if info.is_distributed:
        import torch.distributed as dist

        dist.barrier()


def teardown(info: DistInfo) -> None:
    """Leave the process group (nothing when not distributed or already left)."""
    if info.is_distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
