"""Observer statistics under DDP: every rank observes the same range, and all stop together.

Observers all-reduce their per-batch min / max (:func:`reduce_across_ranks`), so every replica
holds the same scales; a non-finite value on any rank is reported on every rank in the same
collective (:func:`first_bad_rank`), so none is left waiting for a rank that has raised.
"""

from __future__ import annotations

import torch


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def reduce_across_ranks(min_val: torch.Tensor, max_val: torch.Tensor, bad: bool) -> int | None:
    """Under DDP, make every rank observe the same range (elementwise min / max over ranks).

    ``bad`` says this rank's range is not finite (pass zeros then). Returns the highest rank
    whose range was not finite, or None: every rank learns of it in the same collective, so
    all of them stop together instead of one waiting for a rank that has left.
    """
    if not is_distributed():
        return 0 if bad else None
    # One MAX all-reduce carries -min, max and the flag (rank + 1 where bad).
    flag = torch.tensor([_rank() + 1.0 if bad else 0.0], device=min_val.device)
    packed = torch.cat([-min_val.flatten(), max_val.flatten(), flag])
    torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.MAX)
    n = min_val.numel()
    min_val.copy_(-packed[:n].view_as(min_val))
    max_val.copy_(packed[n : 2 * n].view_as(max_val))
    return int(packed[-1]) - 1 if packed[-1] > 0 else None


def first_bad_rank(bad: bool, device: torch.device | str = "cpu") -> int | None:
    """Collective under DDP: the highest rank where ``bad`` holds (this one included), or None.

    ``device``: where the process group's backend reduces (CUDA for NCCL).
    """
    if not is_distributed():
        return 0 if bad else None
    flag = torch.tensor([_rank() + 1 if bad else 0], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag) - 1 if flag > 0 else None


def rank_phrase(rank: int) -> str:
    """``" on rank 1"`` under DDP, ``""`` in a single process (for error messages)."""
    return f" on rank {rank}" if is_distributed() else ""
