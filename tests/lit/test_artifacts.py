"""Nothing a run writes is ever torn, and a run never takes over another run's directory.

Covered elsewhere: an interrupted / failed export leaves the previous model files byte-identical
(tests/export/test_export_api.py: ``test_failed_write_leaves_previous_files_byte_identical``,
``test_failed_smoke_test_replaces_nothing``, ``test_atomic_write_bytes``); a finished run's
directory is refused (tests/lit/test_pipeline.py: ``test_tiny_run_writes_its_run_dir``);
run directories are unique per run (tests/lit/test_config.py).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch import Trainer
from lit_helpers import FAST, compose_train

import qat.io
from qat.lit.checkpoint import (
    AtomicCheckpointIO,
    CheckpointError,
    load_checkpoint,
    resolve_ckpt_path,
)
from qat.lit.config import ConfigError
from qat.lit.results import write_json_atomic
from qat.lit.train import train


@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt])
def test_results_json_crash_mid_write_keeps_the_old_file(
    error: type[BaseException], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "results.json"
    write_json_atomic(path, {"status": "ok", "metrics": {"val_acc": torch.tensor(0.5)}})
    before = path.read_bytes()
    assert json.loads(before) == {"status": "ok", "metrics": {"val_acc": 0.5}}

    def crash(f, data: bytes) -> None:
        f.write(data[:10])
        raise error("interrupted mid-write (simulated)")

    monkeypatch.setattr(qat.io, "_write_all", crash)
    with pytest.raises(error):
        write_json_atomic(path, {"status": "export_failed", "big": list(range(10_000))})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file left


def test_a_killed_writers_temp_file_is_removed_by_the_next_write(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"epoch": 1}, path)
    # A writer SIGKILLed mid-save leaves its staged file; its pid no longer exists.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    host = socket.gethostname()
    stale = path.parent / f".last.ckpt.{host}-{int(dead.stdout)}-abc123_x.tmp"
    stale.write_bytes(b"half a checkpoint")
    # Files a live writer (this process's parent) or another host is writing are not touched.
    live = path.parent / f".last.ckpt.{host}-{os.getppid()}-def456.tmp"
    other_host = path.parent / f".last.ckpt.not-{host}-{int(dead.stdout)}-ghi789.tmp"
    for f in (live, other_host):
        f.write_bytes(b"in progress")
    io.save_checkpoint({"epoch": 2}, path)
    assert not stale.exists() and live.exists() and other_host.exists()
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(
        ["last.ckpt", live.name, other_host.name]
    )
    assert io.load_checkpoint(path)["epoch"] == 2


def test_checkpoint_crash_mid_save_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"epoch": 1, "state_dict": {"w": torch.arange(4.0)}}, path)
    before = path.read_bytes()

    real_save = torch.save

    def torn_save(obj, f, *args, **kwargs) -> None:
        # AtomicCheckpointIO hands torch.save an open file (a failed write then surfaces as
        # its OSError).
        real_save(obj, f, *args, **kwargs)
        f.flush()
        f.truncate(f.tell() // 2)  # the bytes are half there when the "crash" comes
        raise OSError("killed mid-write (simulated)")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="simulated"):
        io.save_checkpoint({"epoch": 2, "state_dict": {"w": torch.zeros(4)}}, path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
    state = io.load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["state_dict"]["w"], torch.arange(4.0))


@pytest.mark.parametrize("trainer_cfg", ["cpu", "ddp_cpu"])
def test_the_trainer_configs_write_checkpoints_atomically(trainer_cfg: str, tmp_path: Path) -> None:
    # Lightning's own TorchCheckpointIO stages in /tmp and shutil.moves: a plain copy, torn when
    # interrupted, whenever the run dir is on another file system.
    cfg = compose_train([f"trainer={trainer_cfg}", "logger=none"], tmp_path)
    trainer: Trainer = instantiate(cfg.trainer, logger=False, _convert_="all")
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


@pytest.mark.parametrize("cut", [3000, -10])
def test_a_torn_checkpoint_is_a_clear_error(cut: int, tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.randn(1000)}}, path)
    # Cut in the tensors (torch: RuntimeError) or in the zip directory at the end (torch:
    # OSError: [Errno 22] Invalid argument).
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(CheckpointError, match=r"last\.ckpt is not a readable checkpoint") as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match=r"last\.ckpt is not a readable checkpoint") as err:
        resolve_ckpt_path(str(path), tmp_path)
    assert "truncated or corrupt" in str(err.value) and "\n" not in str(err.value)


def test_a_truncated_ckpt_path_fails_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_training(monkeypatch)
    path = tmp_path / "copied.ckpt"
    torch.save({"epoch": 0, "state_dict": {"model.w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:-10])  # an interrupted copy
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        train(compose_train([*FAST, "model=lenet5", f"ckpt_path={path}"], run_dir))
    message = str(err.value)
    assert message.startswith(f"ckpt_path={path} is not a readable checkpoint (truncated")
    assert "resume from an earlier checkpoint" in message and "\n" not in message
    assert not run_dir.exists()


# ---------------------------------------------------------------------- run directories
def _no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(Trainer, "fit", boom)


def test_a_fresh_run_never_overwrites_an_unfinished_runs_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_training(monkeypatch)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"the interrupted run's checkpoint")
    with pytest.raises(ConfigError, match=r"holds an unfinished run.*ckpt_path=last"):
        train(compose_train([*FAST, "model=lenet5"], tmp_path))
    # Resuming from another run's checkpoint into this directory is refused too.
    other = tmp_path.parent / "other.ckpt"
    torch.save({"epoch": 0}, other)
    with pytest.raises(ConfigError, match="holds an unfinished run"):
        train(compose_train([*FAST, "model=lenet5", f"ckpt_path={other}"], tmp_path))
    assert ckpt.read_bytes() == b"the interrupted run's checkpoint"


def test_ckpt_path_last_is_this_run_dirs_last_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        resolve_ckpt_path("last", tmp_path)
    message = str(err.value)
    assert f"no checkpoint at {tmp_path}/checkpoints/last.ckpt" in message
    assert "hydra.run.dir" in message and "\n" not in message
    (tmp_path / "checkpoints").mkdir()
    torch.save({"epoch": 0}, tmp_path / "checkpoints" / "last.ckpt")
    assert resolve_ckpt_path("last", tmp_path) == str(tmp_path / "checkpoints" / "last.ckpt")
    assert resolve_ckpt_path(None, tmp_path) is None
    with pytest.raises(CheckpointError, match=r"ckpt_path=/nonexistent/x\.ckpt is not a file"):
        resolve_ckpt_path("/nonexistent/x.ckpt", tmp_path)


def test_ckpt_path_last_without_a_checkpoint_fails_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_training(monkeypatch)
    with pytest.raises(ConfigError, match="ckpt_path=last: no checkpoint at"):
        train(compose_train([*FAST, "model=lenet5", "ckpt_path=last"], tmp_path))
    assert not (tmp_path / "checkpoints").exists()
