"""Run folders and exports you can trust (issue 43, items 1-5): the fast, in-process checks.

The same cases as a user meets them on the command line are in scripts/probe_run_folders.py
(tests/scripts/test_probe_run_folders.py, slow).
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from lit_helpers import CONFIG_DIR
from omegaconf import OmegaConf, open_dict
from torch import nn

import qat.io
from qat.export.bundle import MANIFEST, export_folder, read_manifest
from qat.lit.checkpoint import (
    AtomicCheckpointIO,
    CheckpointError,
    check_checkpoint_fits,
    load_checkpoint,
)
from qat.lit.errors import ConfigError, disk_full
from qat.lit.rundir import RunDirGuard, guard_run_dir
from qat.lit.targets import check_targets

EXPERIMENTS = sorted(
    str(p.relative_to(CONFIG_DIR / "experiment").with_suffix(""))
    for p in (CONFIG_DIR / "experiment").rglob("*.yaml")
    if not p.name.startswith("_")
)
#: Every option of the groups that name classes (``group=option``).
OPTIONS = sorted(
    f"{group}={p.stem}"
    for group in ("data", "model", "optimizer", "scheduler", "trainer", "logger", "callbacks")
    for p in (CONFIG_DIR / group).glob("*.yaml")
)


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _finished_run(root: Path) -> Path:
    run_dir = root / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "checkpoints").mkdir()
    OmegaConf.save(_compose(["data=digits", "model=lenet5"]), run_dir / ".hydra" / "config.yaml")
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 stand-in")
    (run_dir / "results.json").write_text("{}")
    return run_dir


# ---------------------------------------------------------------------- item 1: run dirs
def test_guard_refuses_a_finished_run_before_hydra_writes(tmp_path: Path, capsys) -> None:
    run_dir = _finished_run(tmp_path)
    before = _hashes(run_dir)
    cfg = _compose(["model=resnet32", f"hydra.run.dir={run_dir}"])
    with pytest.raises(SystemExit) as stop:
        RunDirGuard().on_run_start(config=cfg)  # what Hydra calls before run_job
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("invalid config: ") and "already holds a finished run" in err
    assert len(err.splitlines()) == 1
    assert _hashes(run_dir) == before


def test_guard_refuses_resuming_with_another_model_or_recipe(tmp_path: Path) -> None:
    run_dir = _finished_run(tmp_path)
    (run_dir / "results.json").unlink()  # interrupted
    ckpt = str(run_dir / "checkpoints" / "last.ckpt")
    same = _compose(["data=digits", "model=lenet5"])
    guard_run_dir(run_dir, ckpt, same)  # its own run, same settings: fine
    with pytest.raises(ConfigError, match=r"trained with model\.name=lenet5.*model\.name=resnet20"):
        guard_run_dir(run_dir, ckpt, _compose(["data=digits", "model=resnet20"]))
    with pytest.raises(ConfigError, match=r"quant\.bits=8, but this config has quant\.bits=4"):
        guard_run_dir(run_dir, ckpt, _compose(["data=digits", "model=lenet5", "quant.bits=4"]))
    with pytest.raises(ConfigError, match="holds an unfinished run"):
        guard_run_dir(run_dir, None, same)


def test_guard_refuses_a_sweep_into_a_folder_with_runs(tmp_path: Path, capsys) -> None:
    sweep = tmp_path / "sweep"
    cfg = _compose([f"hydra.sweep.dir={sweep}"])
    RunDirGuard().on_multirun_start(config=cfg)  # new folder: fine
    _finished_run(sweep)  # sweep/run holds a finished run
    with pytest.raises(SystemExit) as stop:
        RunDirGuard().on_multirun_start(config=cfg)
    assert stop.value.code == 2 and "already holds runs (run)" in capsys.readouterr().err


def test_hydra_config_wires_the_guard() -> None:
    cfg = _compose([])
    assert cfg.hydra.callbacks.run_dir_guard._target_ == "qat.lit.rundir.RunDirGuard"


# ---------------------------------------------------------------------- item 4: targets
def test_every_stock_experiment_passes_the_allowlist() -> None:
    for experiment in EXPERIMENTS:
        check_targets(_compose([f"+experiment={experiment}"]))


@pytest.mark.slow  # ~45 compositions: 20-60 s on 2 cores
def test_every_stock_option_passes_the_allowlist() -> None:
    for option in OPTIONS:
        check_targets(_compose([option]))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model._target_=os.makedirs", "model._target_=os.makedirs"),
        ("+callbacks.x._target_=builtins.print", "callbacks.x._target_=builtins.print"),
        ("optimizer._target_=subprocess.run", "optimizer._target_=subprocess.run"),
        ("model=custom model._target_=os.makedirs", "model._target_=os.makedirs"),
    ],
)
def test_targets_outside_the_allowlist_are_refused(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"{key} in the config is refused")):
        check_targets(_compose(override.split()))


def test_user_packages_are_allowed_when_named() -> None:
    # model=custom with the class on the command line (README): its package is named.
    check_targets(_compose(["model=custom", "model._target_=zoo.resnet_basic"]))
    # Any other of the user's packages: allowed_targets.
    cfg = _compose(["+callbacks.x._target_=my_pkg.Callback"])
    with pytest.raises(ConfigError, match=r"add \+allowed_targets=\[my_pkg\]"):
        check_targets(cfg)
    check_targets(_compose(["+callbacks.x._target_=my_pkg.Callback", "+allowed_targets=[my_pkg]"]))
    # The standard library stays refused even when named.
    with pytest.raises(ConfigError, match="standard library is never instantiated"):
        check_targets(_compose(["+callbacks.x._target_=os.system", "+allowed_targets=[os]"]))


def test_a_run_folders_own_allowlist_is_not_trusted() -> None:
    saved = _compose(["model=custom", "model._target_=evil.Net", "+allowed_targets=[evil]"])
    with open_dict(saved):
        del saved["hydra"]  # as @hydra.main saves it
    with pytest.raises(ConfigError, match=r"allowed_targets=\[evil\] to this command"):
        check_targets(saved, source="run/.hydra/config.yaml", trust_config=False)
    check_targets(saved, extra_packages=["evil"], trust_config=False)


# ---------------------------------------------------------------------- item 2: export sets
def _build(files: dict[str, bytes]):
    def build(folder: Path) -> dict:
        for name, data in files.items():
            (folder / name).write_bytes(data)
        return {"artifacts": {n: str(folder / n) for n in files}, "parity_ok": True}

    return build


def test_export_folder_lands_whole_with_a_manifest(tmp_path: Path) -> None:
    out = tmp_path / "export"
    source = {"path": "/runs/a/last.ckpt"}
    report = export_folder(out, _build({"model.onnx": b"one"}), source, report_name="r.json")
    assert report["out_dir"] == str(out)
    assert report["artifacts"]["model.onnx"] == str(out / "model.onnx")  # retargeted
    manifest = read_manifest(out)
    assert sorted(manifest["files"]) == ["model.onnx", "r.json"]
    assert manifest["files"]["model.onnx"]["sha256"] == hashlib.sha256(b"one").hexdigest()
    assert manifest["checkpoint"] == source and manifest["parity"]["ok"] is True
    assert json.loads((out / "r.json").read_text())["out_dir"] == str(out)
    # Again: a new folder, the first untouched.
    before = _hashes(out)
    again = export_folder(out, _build({"model.ts": b"two"}))
    assert again["out_dir"] == str(tmp_path / "export-2") and _hashes(out) == before
    # replace: the whole set swapped, nothing of the old one left beside the new.
    export_folder(out, _build({"model.ts": b"three"}), replace=True)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "model.ts"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "export-2"]


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), KeyError])
def test_a_failed_export_changes_nothing(tmp_path: Path, error) -> None:
    out = tmp_path / "export"
    export_folder(out, _build({"model.onnx": b"old"}))
    before = _hashes(out)

    def failing(folder: Path) -> dict:
        (folder / "model.onnx").write_bytes(b"half")
        raise error

    for replace in (False, True):
        with pytest.raises(type(error) if isinstance(error, OSError) else error):
            export_folder(out, failing, replace=replace)
        assert _hashes(out) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging left


def test_a_full_disk_during_an_export_names_the_destination(tmp_path: Path) -> None:
    def full(folder: Path) -> dict:
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "model.onnx"))

    with pytest.raises(OSError) as err:
        export_folder(tmp_path / "export", full)
    assert err.value.filename == str(tmp_path / "export" / "model.onnx")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- item 5: disk full
def test_disk_full_while_saving_a_checkpoint_names_the_file(tmp_path: Path, monkeypatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"epoch": 0, "state_dict": {"w": torch.arange(4.0)}}, path)
    before = path.read_bytes()
    real_save = torch.save

    class Full:  # a disk that fills up part-way through the write
        def __init__(self, f) -> None:
            self.f, self.left = f, 300

        def write(self, data) -> int:
            if len(data) > self.left:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.left -= len(data)
            return self.f.write(data)

        def flush(self) -> None:
            self.f.flush()

    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: real_save(obj, Full(f), *a, **k))
    with pytest.raises(OSError) as err:
        io.save_checkpoint({"epoch": 1, "state_dict": {"w": torch.zeros(10_000)}}, path)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
    assert disk_full(RuntimeError("wrapped")) is None
    wrapped = RuntimeError("lightning")
    wrapped.__cause__ = err.value
    assert (
        disk_full(wrapped)
        == f"no space left on the device writing {path} (No space left on device)"
    )
    assert path.read_bytes() == before  # the previous checkpoint is whole
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_disk_full_in_a_staged_write_names_the_destination(tmp_path: Path, monkeypatch) -> None:
    def full(f, data) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(qat.io, "_write_all", full)
    with pytest.raises(OSError) as err:
        qat.io.write_staged(tmp_path / "model.onnx", b"x")
    assert err.value.filename == str(tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- item 3/5: checkpoints
def test_not_a_checkpoint_is_one_line(tmp_path: Path) -> None:
    for name, data in (("notes.txt", b"hello"), ("empty.ckpt", b""), ("a.npy", b"\x93NUMPY")):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint") as err:
            load_checkpoint(path)
        assert "\n" not in str(err.value)


def test_a_checkpoint_of_another_model_or_recipe_is_one_line() -> None:
    from qat.quant.prepare import prepare
    from qat.quant.spec import Recipe

    recipe = Recipe.from_dict({"weight": {"bits": 8}, "activation": {"bits": 8}})
    example = torch.randn(2, 4)
    model = prepare(nn.Sequential(nn.Linear(4, 3)), recipe, example_inputs=example)
    state = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "callbacks": {"QATCallback": {"recipe": recipe.to_dict()}},
    }
    check_checkpoint_fits(state, model, recipe.to_dict(), "ckpt_path=x")  # fits
    other = prepare(nn.Sequential(nn.Linear(4, 5)), recipe, example_inputs=example)
    with pytest.raises(
        CheckpointError, match=r"of another shape \(e\.g\. 0\.weight: \[3, 4\] vs \[5, 4\]"
    ):
        check_checkpoint_fits(state, other, recipe.to_dict(), "ckpt_path=x")
    four = Recipe.from_dict({"weight": {"bits": 4}, "activation": {"bits": 8}}).to_dict()
    with pytest.raises(
        CheckpointError, match=r"another quantization recipe \(quant\.weight\.bits: 8"
    ):
        check_checkpoint_fits(state, model, four, "ckpt_path=x")
