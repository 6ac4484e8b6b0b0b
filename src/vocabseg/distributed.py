"""torch.distributed set-up for jobs started with ``torchrun`` (evaluation shards, training data parallelism).

``torchrun`` sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and the rendezvous address; a plain ``python`` run is
rank 0 of 1 and never touches torch.distributed.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a torchrun job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


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
    """Join the torchrun process group (env:// rendezvous) when ``WORLD_SIZE`` > 1; gloo on CPU, nccl on CUDA."""
    if env_world_size() <= 1:
        return DistInfo()
    import torch.distributed as dist

    backend = "nccl" if device and str(device).startswith("cuda") else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=2))
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                    dist.get_backend())
