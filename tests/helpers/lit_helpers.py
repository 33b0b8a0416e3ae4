"""Helpers for the application tests: config composition and probe callbacks.

Also imported by subprocess runs (``PYTHONPATH=tests/helpers``), e.g. as a Hydra callback target
``+callbacks.dump._target_=lit_helpers.QuantStateDump``.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch import Callback, LightningModule, Trainer
from omegaconf import DictConfig, open_dict

from qat.quant.control import iter_quantizers
from qat.quant.layers import QConvBn2d

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "configs"

#: Shrinks any run to seconds: digits at 8x8, a few batches, no progress bar, no export.
FAST = [
    "data=digits",
    "data.image_size=8",
    "data.batch_size=32",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "~callbacks.rich_progress_bar",
    "export.enabled=false",
    "module.channels_last=false",
]


#: A few batches of a tiny ``model=hf`` run, exported and verified on 2 batches, no benchmark.
HF_TINY = [
    "data.seq_len=32",
    "data.batch_size=4",
    "data.val_bytes=8000",
    "data.test_bytes=8000",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "~callbacks.rich_progress_bar",
    "export.verify_batches=2",
    "export.bench=false",
]


def compose_train(overrides: Sequence[str], output_dir: Path | str) -> DictConfig:
    """Compose configs/train.yaml as ``python train.py <overrides>`` would, output in ``output_dir``."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    # ${hydra:...} interpolations need a HydraConfig, as inside @hydra.main.
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir)
    return cfg


def quiet_trainer(callbacks: list[Callback], **kwargs: Any) -> Trainer:
    """A CPU ``Trainer`` for in-process fits: no logger, checkpoints, bars, summary or sanity check."""
    options = {
        "limit_val_batches": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        **kwargs,
    }
    return Trainer(callbacks=callbacks, **options)


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX writer (the format ``qat.data.fashion_mnist.read_idx`` parses); gzipped for ``.gz``."""
    codes = {np.dtype("uint8"): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    header += np.asarray(array.shape, dtype=">u4").tobytes()
    raw = header + array.tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def write_fake_fashion(
    directory: Path, n_train: int = 40, n_test: int = 12, gz: bool = True
) -> Path:
    """Tiny Fashion-MNIST in ``directory``: image i is filled with value i, label i % 10.

    Point ``data.data_dir`` at it and the tests that compose the default data (Fashion-MNIST)
    need neither the Debian package nor a download: ``data_dir`` is searched first.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = np.repeat(np.arange(n, dtype=np.uint8), 28 * 28).reshape(n, 28, 28)
        labels = (np.arange(n) % 10).astype(np.uint8)
        ext = ".gz" if gz else ""
        write_idx(directory / f"{prefix}-images-idx3-ubyte{ext}", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{ext}", labels)
    return directory


def quant_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every quantizer's buffers and parameters, by qualified name."""
    state = {}
    for name, q in iter_quantizers(model):
        for key, value in q.state_dict().items():
            state[f"{name}.{key}"] = value.detach().clone()
    return state


class BitsRecorder(Callback):
    """Records quantizer bit widths / flags at every training epoch start (after QATCallback)."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, Any]] = []

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        model = pl_module.model
        row: dict[str, Any] = {"epoch": trainer.current_epoch, "bits": {}, "fq": {}, "obs": {}}
        for name, q in iter_quantizers(model):
            row["bits"][name] = q.bits
            row["fq"][name] = bool(q.fake_quant_enabled)
            row["obs"][name] = bool(q.observer_enabled)
        row["bn_frozen"] = [m.is_bn_frozen for m in model.modules() if isinstance(m, QConvBn2d)]
        self.epochs.append(row)


class ValidationProbe(Callback):
    """Asserts that validation (and the sanity check) never changes any quantizer state."""

    def __init__(self) -> None:
        self.checked = 0
        self._before: dict[str, torch.Tensor] | None = None

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._before = quant_state(pl_module.model)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert self._before is not None
        after = quant_state(pl_module.model)
        assert after.keys() == self._before.keys()
        for key, value in after.items():
            assert torch.equal(value, self._before[key]), f"{key} changed during validation"
        self.checked += 1


class QuantStateDump(Callback):
    """Each rank writes its quantizer state (and flags) to ``<dir>/rank<k>.pt`` at fit end."""

    def __init__(self, dir: str) -> None:
        self.dir = Path(dir)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        state = quant_state(pl_module.model)
        torch.save(state, self.dir / f"rank{trainer.global_rank}.pt")
        meta = {"world_size": trainer.world_size, "pid": os.getpid(), "n": len(state)}
        (self.dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(meta))


class StopAfterEpoch(Callback):
    """Stops training after ``epoch`` (0-based), as a preemption would, config unchanged."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch >= self.epoch:
            trainer.should_stop = True


class NaNBatchOnRank(Callback):
    """Fills the input batch of training step ``step`` with NaN, on rank ``rank`` only."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            batch[0].fill_(float("nan"))


def refused_in_one_line(overrides: Sequence[str], run_dir: Path | str) -> str:
    """``python train.py <overrides>`` in a fresh process, which must exit 2 with exactly one
    ``invalid config`` line and no traceback: that line."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, str(repo / "train.py"), *overrides, f"hydra.run.dir={run_dir}"],
        capture_output=True,
        text=True,
        cwd=repo,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "invalid config" in line]
    assert len(errors) == 1, errors
    return errors[0]
