"""Checkpoints load with ``weights_only=True``; exported files are checked before they count.

A checkpoint whose pickle would run code (here: write a marker file) is refused, naming the
file, by the resume (``ckpt_path=...`` through Lightning's restore) and by
``python -m qat.export``; the marker never appears. A real resume through the same loader is
tests/lit/test_resume_sigkill.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import onnx
import pytest
import torch
from lit_helpers import FAST, REPO, compose_train

import qat
import qat.export
import qat.export.artifacts
from qat.export import FILENAMES, export_model
from qat.lit.checkpoint import AtomicCheckpointIO, CheckpointError, load_checkpoint
from qat.lit.train import train
from qat.models import create_model


class _RunsCode:
    """Unpickling this calls ``exec``: it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.fixture
def evil(tmp_path: Path) -> tuple[Path, Path]:
    """A Lightning-looking checkpoint that runs code when unpickled, and its marker file."""
    marker = tmp_path / "marker"
    path = tmp_path / "evil.ckpt"
    torch.save(
        {"epoch": 0, "state_dict": {"model.w": torch.zeros(1)}, "hook": _RunsCode(marker)}, path
    )
    # It really is dangerous: an unrestricted load runs the code.
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"
    marker.unlink()
    return path, marker


def test_loader_refuses_code_naming_the_file(evil: tuple[Path, Path]) -> None:
    path, marker = evil
    for load in (load_checkpoint, AtomicCheckpointIO().load_checkpoint):
        with pytest.raises(CheckpointError) as err:
            load(path)
        message = str(err.value)
        assert message.startswith(f"refusing to load {path}: it is not a plain-data checkpoint")
        assert "(it would call exec)" in message and "\n" not in message
        assert not marker.exists()


def test_resume_refuses_code(evil: tuple[Path, Path], tmp_path: Path) -> None:
    path, marker = evil
    cfg = compose_train([*FAST, "model=lenet5", f"ckpt_path={path}"], tmp_path / "run")
    with pytest.raises(CheckpointError, match=f"refusing to load {path}"):
        train(cfg)
    assert not marker.exists()
    assert not (tmp_path / "run" / "results.json").exists()


def test_export_cli_refuses_code(evil: tuple[Path, Path], tmp_path: Path) -> None:
    path, marker = evil
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("paths:\n  output_dir: .\n")
    proc = subprocess.run(
        [sys.executable, "-m", "qat.export", f"ckpt_path={path}", f"run_dir={run_dir}"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert f"invalid config: refusing to load {path}" in out and "Traceback" not in out
    assert not marker.exists()
    assert not (run_dir / "export").exists()


# ---------------------------------------------------------------------- exported files
@pytest.fixture(scope="module")
def qmodel() -> torch.nn.Module:
    torch.manual_seed(0)
    model = qat.prepare(create_model("lenet5", num_classes=10, in_channels=1, image_size=8))
    qat.calibrate(model, [torch.rand(8, 1, 8, 8) for _ in range(2)])
    return model.eval()


def _broken_build(real):
    """The real exporter's bytes, damaged the way a bug or a bad disk could damage them."""

    def build(target, *args, **kwargs) -> bytes:
        data = real(target, *args, **kwargs)
        if target == "torchscript":
            return data[: len(data) // 2]
        proto = onnx.load_from_string(data)
        del proto.graph.initializer[0]  # a node input that nothing defines
        return proto.SerializeToString()

    return build


@pytest.mark.parametrize("target", ["torchscript", "onnx"])
def test_a_broken_export_is_caught_by_the_real_checks_and_replaces_nothing(
    target: str, qmodel: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = torch.rand(2, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_model(qmodel, tmp_path, x, targets=(target,))
    final = tmp_path / FILENAMES[target]
    before = final.read_bytes()
    monkeypatch.setattr(qat.export.artifacts, "_build", _broken_build(qat.export.artifacts._build))
    with pytest.raises(Exception) as err, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_model(qmodel, tmp_path, x, targets=(target,))
    if target == "onnx":  # onnx.checker (full check) refused it
        assert isinstance(err.value, onnx.checker.ValidationError), repr(err.value)
    assert final.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [final.name]
