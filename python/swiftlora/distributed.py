"""Running under a launcher (``torchrun``, ``accelerate launch``): which process this is, which GPU it owns, and
saving from one process only.

swiftlora has no launcher or communicator of its own. Before the trainer creates the process group, the launcher's
environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, set by torchrun and accelerate) says where this process
stands; once ``torch.distributed`` is initialised, it is asked instead.
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import torch

from . import _compat

log = logging.getLogger("swiftlora")


@dataclass(frozen=True)
class Placement:
    rank: int        # global process index
    local_rank: int  # process index on this machine: the GPU it uses
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer (set by torchrun/accelerate), "
                         f"got {value!r}") from None


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def placement() -> Placement:
    """This process's rank, local rank and the world size (0, 0, 1 when not launched by a launcher)."""
    local = _env_int("LOCAL_RANK", 0)
    if _initialized():
        return Placement(torch.distributed.get_rank(), local, torch.distributed.get_world_size())
    return Placement(_env_int("RANK", 0), local, _env_int("WORLD_SIZE", 1))


def is_main_process() -> bool:
    return placement().is_main


def launched_cuda_device() -> torch.device | None:
    """``cuda:LOCAL_RANK`` when a launcher started several processes and CUDA is available (each rank owns one
    GPU, as torchrun/accelerate expect); None otherwise."""
    p = placement()
    if p.world_size <= 1 or not torch.cuda.is_available():
        return None
    if p.local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"LOCAL_RANK {p.local_rank} has no GPU: this machine has {torch.cuda.device_count()} "
                           f"(launch at most that many processes per node)")
    return torch.device("cuda", p.local_rank)


def on_main_process(fn):
    """Decorator for swiftlora's own saving functions (``save_pretrained_merged``, GGUF export, pushes): under
    several processes only rank 0 runs ``fn`` and the others return None at once, whether every rank makes the call
    (Unsloth scripts do) or only rank 0 does (``if trainer.is_world_process_zero():``) — so no collective here,
    which would hang in the second case. Several ranks writing one directory would race on the same temporary
    names. Call :func:`barrier` afterwards if other ranks must read the files."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        p = placement()
        if p.is_main:
            return fn(*args, **kwargs)
        log.info("swiftlora: %s runs on rank 0 only (this is rank %d of %d)", fn.__name__, p.rank, p.world_size)
        return None
    return wrapper


def check_not_sharded(model, what: str) -> None:
    """Saving from rank 0 reads whole tensors: an FSDP2-sharded model (DTensor parameters) must be gathered first."""
    if any(map(_compat.is_dtensor, model.parameters())):
        raise RuntimeError(f"{what}: the model's parameters are FSDP2 shards (DTensor); rank 0 alone cannot read "
                           "them. Save through the trainer (trainer.save_model(), which gathers the full state "
                           "dict on every rank), or train with DDP to use swiftlora's saving methods")


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if _initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def shutdown() -> None:
    """The end of a distributed job: every rank waits for the others, then the process group is destroyed. Left to
    interpreter exit, a gloo process group's threads sometimes abort a rank ("terminate called without an active
    exception", exit code -6) after its work is done, and torchrun / accelerate then report the job as failed.
    A no-op in a single process."""
    if _initialized():
        barrier()
        torch.distributed.destroy_process_group()
