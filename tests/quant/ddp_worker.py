"""One rank of the 2-process gloo test (tests/quant/test_ddp_scales.py).

Run as ``python ddp_worker.py <out dir>`` with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` set. Each rank calibrates and then trains a prepared LeNet-5 on its *own* data
(another seed and value range per rank) and saves its quantizer state after each stage, plus
the state a calibration on its data alone gives (observer reduction switched off).
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import qat
import qat.quant.quantizer
from qat.models import create_model

RECIPE = {"activation": {"range_method": "minmax"}}  # reduced range = exact min / max over ranks


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value.detach().clone()
        for name, q in qat.iter_quantizers(model)
        for key, value in q.state_dict().items()
    }


def _batches(rank: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1000 + rank)
    # Rank 1's inputs are wider and shifted: its ranges alone differ clearly from rank 0's.
    return [
        (
            torch.randn(8, 1, 8, 8, generator=g) * (1 + 2 * rank) + rank,
            torch.randint(0, 10, (8,), generator=g),
        )
        for _ in range(n)
    ]


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # same initial weights on every rank, as DDP requires
    model = qat.prepare(create_model("lenet5", num_classes=10, in_channels=1, image_size=8), RECIPE)
    calib = _batches(rank, 3)

    local = copy.deepcopy(model)
    reduce = qat.quant.quantizer.reduce_across_ranks
    qat.quant.quantizer.reduce_across_ranks = lambda lo, hi, bad: 0 if bad else None
    try:
        qat.calibrate(local, calib)
    finally:
        qat.quant.quantizer.reduce_across_ranks = reduce
    qat.calibrate(model, calib)
    torch.save({"local": _state(local), "calibrated": _state(model)}, out / f"calib{rank}.pt")

    # QAT with live ranges: observers on, fake quantization on, training mode, DDP gradients.
    qat.set_observers(model, True)
    model.train()
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    for x, y in _batches(rank + 10, 4):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    torch.save({"trained": _state(model)}, out / f"train{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]))
