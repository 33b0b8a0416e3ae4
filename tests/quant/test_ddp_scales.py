"""Under DDP (2 CPU processes, gloo) observer statistics are reduced across ranks.

The ranks calibrate and train on different data, so identical quantizer state on both is not
trivial: without the reduction each rank's ranges would be its own (checked too). The
Lightning path (``trainer=ddp_cpu``, state after training) is tests/lit/test_cli.py's
``test_ddp_cpu_keeps_quantizer_state_identical_across_ranks``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_with_different_data_hold_identical_scales(tmp_path: Path) -> None:
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
            "QAT_COMPILE": "0",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(HERE / "ddp_worker.py"), str(tmp_path)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    for proc in procs:
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out[-4000:]

    c0, c1 = (torch.load(tmp_path / f"calib{r}.pt", weights_only=True) for r in (0, 1))
    names = [k[: -len(".scale")] for k in c0["calibrated"] if k.endswith("output_quant.scale")]
    assert names, sorted(c0["calibrated"])
    # Alone, the ranks' ranges differ: they saw different data.
    differ = [
        n for n in names if not torch.equal(c0["local"][f"{n}.scale"], c1["local"][f"{n}.scale"])
    ]
    assert len(differ) == len(names)
    # Calibrated under DDP: the same state on both ranks, bit for bit ...
    assert c0["calibrated"].keys() == c1["calibrated"].keys()
    for key, value in c0["calibrated"].items():
        assert torch.equal(value, c1["calibrated"][key]), key
    # ... and it is the range of both ranks' data together (elementwise min / max).
    for prefix in ["input_quant", *names]:
        lo = torch.minimum(c0["local"][f"{prefix}.min_val"], c1["local"][f"{prefix}.min_val"])
        hi = torch.maximum(c0["local"][f"{prefix}.max_val"], c1["local"][f"{prefix}.max_val"])
        assert torch.equal(c0["calibrated"][f"{prefix}.min_val"], lo), prefix
        assert torch.equal(c0["calibrated"][f"{prefix}.max_val"], hi), prefix

    t0, t1 = (torch.load(tmp_path / f"train{r}.pt", weights_only=True)["trained"] for r in (0, 1))
    assert t0.keys() == t1.keys()
    for key, value in t0.items():
        assert torch.equal(value, t1[key]), key
    # Training moved the ranges (observers were live on different batches per rank).
    moved = [k for k in t0 if k.endswith(".scale") and not torch.equal(t0[k], c0["calibrated"][k])]
    assert moved
