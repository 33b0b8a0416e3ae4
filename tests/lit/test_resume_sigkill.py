"""A run killed with SIGKILL mid-QAT and restarted with ``ckpt_path=last`` ends as if never killed.

``python train.py +experiment=quick`` (shortened) runs three times as a user would run it: an
uninterrupted reference run, a run killed right after its mid-QAT epoch-2 checkpoint appears,
and the restart of the killed run in its own directory with ``ckpt_path=last``. The reference
and the killed run go side by side (one thread each) to keep the wall time down.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lit_helpers import REPO

from qat.lit.checkpoint import load_checkpoint

TRAIN = str(REPO / "train.py")

# The quick experiment, shortened: 5 epochs of 6 batches; the schedule still goes through every
# phase (float → weights → activations → annealed to 4 bits → BN frozen → observers frozen).
QUICK = [
    "+experiment=quick",
    "trainer.max_epochs=5",
    "schedule.warmup_epochs=1",
    "schedule.act_start_epoch=2",
    "schedule.weight_anneal.epochs=2",
    "schedule.act_anneal.epochs=1",
    "schedule.freeze_bn_epoch=3",
    "schedule.freeze_observer_epoch=4",
    "trainer.limit_train_batches=6",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "export.enabled=false",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "~callbacks.rich_progress_bar",
    "trainer.enable_model_summary=false",
    # One checkpoint per epoch beside last.ckpt, so the test knows when epoch 2 is done. A
    # distinct `mode` gives it its own state key (Lightning refuses two identical ones).
    "+callbacks.every_epoch._target_=lightning.pytorch.callbacks.ModelCheckpoint",
    "+callbacks.every_epoch.dirpath=${paths.output_dir}/checkpoints",
    '+callbacks.every_epoch.filename="epoch_{epoch:03d}"',
    "+callbacks.every_epoch.save_top_k=-1",
    "+callbacks.every_epoch.mode=max",
    "+callbacks.every_epoch.auto_insert_metric_name=false",
]

ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    "WANDB_MODE": "offline",
    "HYDRA_FULL_ERROR": "1",
    # Two processes at once on a 2-core machine; same thread count in every run, so the float
    # reductions (and the results) are the same in all three.
    "OMP_NUM_THREADS": "1",
    # Eager fake-quant kernels: torch.compile would cost each of the three processes ~10 s.
    "QAT_COMPILE": "0",
}


def _start(run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, TRAIN, *QUICK, *extra, f"hydra.run.dir={run_dir}"],
        cwd=run_dir.parent,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-6000:]}"
    return out


def _qat_state(ckpt: dict) -> dict:
    return next(v for k, v in ckpt["callbacks"].items() if "QATCallback" in k)


# 20 s (three processes); the in-process resume from a mid-QAT checkpoint is
# tests/lit/test_pipeline.py::test_resume_from_mid_qat_checkpoint_matches_uninterrupted_run.
@pytest.mark.slow
def test_sigkill_mid_qat_then_ckpt_path_last_matches_uninterrupted_run(tmp_path: Path) -> None:
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
    reference = _start(ref_dir)
    victim = _start(run_dir)
    marker = run_dir / "checkpoints" / "epoch_002.ckpt"
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert victim.poll() is None, f"the run ended before epoch 2:\n{victim.stdout.read()}"
        assert time.monotonic() < deadline, "no epoch-2 checkpoint after 300 s"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    _finish(reference)

    # Killed mid-QAT: no results, and every checkpoint on disk is whole (atomic writes).
    assert not (run_dir / "results.json").exists()
    for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):
        load_checkpoint(ckpt)
    killed = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert killed["epoch"] in (2, 3)  # epoch 3 only if the kill came a whole epoch late
    assert not _qat_state(killed)["phase"].endswith("obs_frozen")

    # The restart, as a user types it: same directory, ckpt_path=last.
    out = _finish(_start(run_dir, "ckpt_path=last"))
    assert f"Restoring states from the checkpoint path at {run_dir}/checkpoints/last.ckpt" in out

    a = torch.load(ref_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["epoch"] == b["epoch"] == 4 and a["global_step"] == b["global_step"]
    # Every weight and every quantizer buffer / parameter (bits, scales, zero points, observed
    # ranges, mode flags), bit for bit.
    assert a["state_dict"].keys() == b["state_dict"].keys()
    quant_keys = [k for k in a["state_dict"] if "_quant." in k]
    assert any(k.endswith(".scale") for k in quant_keys)
    assert any(k.endswith(".bit_width") for k in quant_keys)
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    # Schedule position and BN-freeze state.
    qa, qb = _qat_state(a), _qat_state(b)
    for key in ("epoch", "phase", "weight_bits", "act_bits", "bn_frozen", "calibrated", "history"):
        assert qa[key] == qb[key], key
    assert qb["phase"] == "w+a,bn_frozen,obs_frozen" and qb["bn_frozen"] is True
    assert (qb["weight_bits"], qb["act_bits"]) == (4, 4)
    # Final metrics.
    ra = json.loads((ref_dir / "results.json").read_text())
    rb = json.loads((run_dir / "results.json").read_text())
    for key in ("val_acc", "val_loss", "test_acc", "test_loss", "float_val_acc"):
        assert ra["metrics"][key] == rb["metrics"][key], key
    assert ra["bits"] == rb["bits"] and ra["history"] == rb["history"]
    assert rb["status"] == "ok" and rb["run_dir"] == str(run_dir)
