"""The command line: train.py single runs, --multirun, Optuna, DDP on CPU, W&B offline, export CLI.

Each test runs ``python train.py ...`` (or ``python -m qat.export``) in a subprocess, as a user
would, with the tiny digits settings from ``lit_helpers.FAST``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lit_helpers import FAST, REPO

HERE = Path(__file__).resolve().parent


def run(args: list[str], tmp_path: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(HERE.parent / "helpers"), str(REPO), os.environ.get("PYTHONPATH", "")]
        ),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "HYDRA_FULL_ERROR": "1",
        # One thread per process: the DDP test runs two on a 2-core machine.
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc


def _show(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"


TRAIN = str(REPO / "train.py")
SLOW = pytest.mark.slow
TINY = [*FAST, "model=lenet5", "trainer.max_epochs=2", "schedule.warmup_epochs=1"]


def test_bad_override_fails_before_training_with_one_clear_line(tmp_path: Path) -> None:
    proc = run([TRAIN, "quant.bits=1", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 2, _show(proc)
    out = proc.stdout + proc.stderr
    assert "invalid config: quant.bits=1 is invalid" in out
    assert "Traceback" not in out
    assert not (tmp_path / "run" / "checkpoints").exists()
    # data=digits: the model is checked after the data, which must be there.
    proc = run(
        [TRAIN, "data=digits", "model.name=vgg16", f"hydra.run.dir={tmp_path / 'run2'}"], tmp_path
    )
    assert proc.returncode == 2 and "unknown model 'vgg16'" in proc.stdout + proc.stderr


def _cut_checkpoint(tmp_path: Path) -> Path:
    """A checkpoint cut short, as by an interrupted copy."""
    path = tmp_path / "cut.ckpt"
    torch.save({"epoch": 0, "state_dict": {"model.w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:-10])
    return path


def _corrupt_imagefolder(tmp_path: Path) -> Path:
    """Two classes of tiny PNGs, one of them not an image at all."""
    from PIL import Image

    root = tmp_path / "images"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), 40 * i).save(root / name / f"{i}.png")
    (root / "b" / "1.png").write_bytes(b"not a png")
    return root


# Each: what the user typed, and the start of the one line that says what to fix. A process
# costs ~6 s here, so by default one runs (a file cut short: ckpt_path is checked before the
# config, so it shows both come out the same way; quant.bits=1 above is the config value). The
# others are also checked in-process (tests/lit/test_validation.py) and run here when slow
# tests do.
BAD_INPUTS = [
    pytest.param("ckpt", "is not a readable checkpoint (truncated", id="truncated-ckpt"),
    pytest.param("max_epochs", "trainer.max_epochs=-1 is invalid", id="max_epochs=-1", marks=SLOW),
    pytest.param("lr", "optimizer.lr=-1 is invalid", id="lr=-1", marks=SLOW),
    pytest.param("image", "1 of 6 image files cannot be read", id="corrupt-image", marks=SLOW),
]


@pytest.mark.parametrize(("bad", "message"), BAD_INPUTS)
def test_bad_input_is_exit_code_2_and_one_line_before_any_work(
    bad: str, message: str, tmp_path: Path
) -> None:
    args = {
        "max_epochs": [*TINY, "trainer.max_epochs=-1"],
        "ckpt": [*TINY, f"ckpt_path={_cut_checkpoint(tmp_path)}"],
        "lr": [*TINY, "optimizer.lr=-1"],
        "image": [
            "data=imagefolder",
            f"data.data_dir={_corrupt_imagefolder(tmp_path)}",
            "data.image_size=8",
            "data.in_channels=1",
            "model=lenet5",
            "logger=none",
        ],
    }[bad]
    run_dir = tmp_path / "run"
    proc = run([TRAIN, *args, f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 2, _show(proc)
    out = proc.stdout + proc.stderr
    lines = [line for line in out.splitlines() if "invalid config:" in line]
    assert len(lines) == 1 and message in lines[0], _show(proc)
    assert "Traceback" not in out, _show(proc)
    if bad == "image":
        assert str(tmp_path / "images" / "b" / "1.png") in lines[0]
    # Nothing written: no checkpoints, no results, no logs of a started run.
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "results.json").exists()
    assert not (run_dir / "csv").exists()


def test_multirun_sweeps_bits(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run(
        [TRAIN, "-m", *TINY, "quant=w4a4", "quant.bits=8,4", f"hydra.sweep.dir={sweep}"], tmp_path
    )
    assert proc.returncode == 0, _show(proc)
    results = [json.loads((sweep / str(i) / "results.json").read_text()) for i in range(2)]
    assert [r["recipe"]["weight"]["bits"] for r in results] == [8, 4]
    assert [r["bits"]["activation"] for r in results] == [8, 4]
    assert results[0]["run_dir"] != results[1]["run_dir"]
    for i in range(2):
        assert (sweep / str(i) / ".hydra" / "overrides.yaml").is_file()
        assert (sweep / str(i) / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow  # two trials, each a training run (~45 s)
def test_optuna_sweep_over_bits_and_lr(tmp_path: Path) -> None:
    sweep = tmp_path / "optuna"
    proc = run(
        [
            TRAIN,
            "hparams_search=bits_optuna",
            *TINY,
            "trainer.max_epochs=1",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.sampler.n_startup_trials=2",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, _show(proc)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["name"] == "optuna"
    assert set(best["best_params"]) == {"quant.bits", "optimizer.lr"}
    assert 0.0 <= best["best_value"] <= 1.0
    bits = {
        json.loads((sweep / str(i) / "results.json").read_text())["config"]["quant_bits"]
        for i in range(2)
    }
    assert bits <= {8, 6, 4, 3, 2}


@pytest.mark.slow  # two ranks, gloo, a run each (~50 s)
def test_ddp_cpu_keeps_quantizer_state_identical_across_ranks(tmp_path: Path) -> None:
    dump = tmp_path / "dump"
    proc = run(
        [
            TRAIN,
            "trainer=ddp_cpu",
            *TINY,
            "quant=lsq",
            "trainer.max_epochs=3",
            "schedule.act_start_epoch=2",
            "+callbacks.dump._target_=lit_helpers.QuantStateDump",
            "+allowed_targets=[lit_helpers]",
            f"+callbacks.dump.dir={dump}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, _show(proc)
    meta = [json.loads((dump / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [m["world_size"] for m in meta] == [2, 2] and meta[0]["pid"] != meta[1]["pid"]
    s0 = torch.load(dump / "rank0.pt", weights_only=True)
    s1 = torch.load(dump / "rank1.pt", weights_only=True)
    assert s0.keys() == s1.keys() and len(s0) > 0
    for key in s0:
        assert torch.equal(s0[key], s1[key]), key
    # The ranks saw different data (DistributedSampler), so equality is not trivial: the
    # observed ranges moved during training and were reduced across ranks.
    assert any(k.endswith("initialized") and bool(v) for k, v in s0.items())
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["config"]["devices"] == 2 and results["config"]["strategy"] == "DDPStrategy"


# 11-13 s each (two DDP processes); the NaN guards themselves: tests/lit/test_numerics_guards.py.
@pytest.mark.slow
@pytest.mark.parametrize(
    ("observers", "message"),
    [
        # Live observers meet the NaN first, in the forward pass.
        ("live", "NaN or inf in the activation observed by quantizer 'input_quant' on rank 1"),
        # Frozen observers let it through to the loss, checked before backward.
        ("frozen", "non-finite training loss on rank 1 at epoch 1, batch 1 (phase w+a,obs_"),
    ],
)
def test_ddp_cpu_nan_on_one_rank_stops_both_ranks(
    observers: str, message: str, tmp_path: Path
) -> None:
    # Rank 1 alone sees a NaN batch. Both ranks must stop at that step with an error naming
    # rank 1, instead of rank 0 failing later on a closed connection (gloo) or hanging (NCCL).
    freeze = ["schedule.freeze_observer_epoch=1"] if observers == "frozen" else []
    proc = run(
        [
            TRAIN,
            "trainer=ddp_cpu",
            *TINY,
            *freeze,
            "+callbacks.nan._target_=lit_helpers.NaNBatchOnRank",
            "+allowed_targets=[lit_helpers]",
            "+callbacks.nan.rank=1",
            "+callbacks.nan.step=5",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
        timeout=300,
    )
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    # The same one-line error on both ranks (train.py logs it instead of a traceback).
    assert out.count(f"training stopped: {message}") == 2, _show(proc)
    assert proc.returncode == 3 and "Traceback" not in out, _show(proc)
    assert "Connection closed by peer" not in out, _show(proc)
    if observers == "frozen":
        assert "the input batch holds NaN or inf" in out, _show(proc)  # rank 1 located it
    assert not (tmp_path / "run" / "results.json").exists()


def test_wandb_offline_run_writes_its_files(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run([TRAIN, *TINY, "logger=wandb", f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 0, _show(proc)
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((run_dir / "wandb").iterdir())
    assert list(runs[0].glob("run-*.wandb")), list(runs[0].iterdir())
    assert (run_dir / "csv" / "metrics.csv").is_file()  # the CSV log rides along


# 30 s (four processes); test_export_checkpoint_in_process below does the same work in one.
@pytest.mark.slow
def test_export_cli_reexports_a_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run([TRAIN, *TINY, "quant=w8a8", f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 0, _show(proc)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    out = tmp_path / "exported"
    proc = run(
        [
            "-m",
            "qat.export",
            f"ckpt_path={ckpt}",
            "export.targets=[torchscript,onnx]",
            "export.bench=false",
            f"export.out_dir={out}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, _show(proc)
    assert (out / "model.ts").is_file() and (out / "model.onnx").is_file()
    report = json.loads((out / "export_report.json").read_text())
    assert report["parity"]["runtimes"]["torchscript"]["agreement"] == 1.0
    assert report["parity_ok"] is True
    # Nothing written where the command ran (no Hydra run dir of its own).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "run"]

    # A parity failure (forced: no accuracy drop allowed, not even 0) fails the command, after
    # writing the report; with export.fail_on_parity=false it is recorded and the command
    # goes on, as in training.
    strict = ["-m", "qat.export", f"ckpt_path={ckpt}", "export.bench=false"]
    strict += [f"export.out_dir={out}", "export.parity.max_accuracy_drop_pt=-1"]
    strict += ["export.replace=true"]  # else each export goes to a new exported-N folder
    proc = run(strict, tmp_path)
    assert proc.returncode != 0, _show(proc)
    assert json.loads((out / "export_report.json").read_text())["parity_ok"] is False
    # ... and the models are still benchmarked (a results table shows their speed too).
    lenient = [*strict, "export.fail_on_parity=false", "export.bench=true"]
    proc = run([*lenient, "export.bench_batch_sizes=[1]"], tmp_path)
    assert proc.returncode == 0, _show(proc)
    assert "parity_failed" in proc.stdout + proc.stderr
    report = json.loads((out / "export_report.json").read_text())
    assert report["parity_ok"] is False
    assert report["bench"]["runtimes"]["onnx"]["latency_ms"]["1"] > 0


def test_export_checkpoint_in_process(tmp_path: Path) -> None:
    # What `python -m qat.export` does (qat.lit.reexport.export_checkpoint), after an in-process
    # run whose .hydra/config.yaml is written as @hydra.main writes it.
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from lit_helpers import CONFIG_DIR, compose_train
    from omegaconf import OmegaConf, open_dict

    from qat.export import ParityError
    from qat.lit.reexport import export_checkpoint
    from qat.lit.train import train

    run_dir = tmp_path / "run"
    cfg = compose_train([*TINY, "quant=w8a8", "logger=none"], run_dir)
    train(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # @hydra.main saves the config without it
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml", resolve=True)
    GlobalHydra.instance().clear()
    out = tmp_path / "exported"
    overrides = [f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"export.out_dir={out}"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        export_cfg = compose("export_ckpt", overrides=[*overrides, "export.bench=false"])
    report = export_checkpoint(export_cfg)
    assert (out / "model.ts").is_file() and (out / "model.onnx").is_file()
    assert report["parity"]["runtimes"]["torchscript"]["agreement"] == 1.0
    assert report["parity"]["runtimes"]["onnx"]["agreement"] == 1.0
    assert json.loads((out / "export_report.json").read_text())["parity_ok"] is True
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["export_report.json", "model.onnx", "model.ts"]
    assert manifest["checkpoint"]["path"] == str(run_dir / "checkpoints" / "last.ckpt")
    assert manifest["parity"]["ok"] is True
    # A forced parity failure raises after writing the report; fail_on_parity=false records it.
    # Each export replaces the folder's set whole (without replace it would go to exported-2).
    with open_dict(export_cfg):
        export_cfg.export.parity.max_accuracy_drop_pt = -1
        export_cfg.export.replace = True
    with pytest.raises(ParityError):
        export_checkpoint(export_cfg)
    assert json.loads((out / "export_report.json").read_text())["parity_ok"] is False
    with open_dict(export_cfg):
        export_cfg.export.fail_on_parity = False
    assert export_checkpoint(export_cfg)["parity_ok"] is False


@pytest.mark.parametrize("bad", ["ckpt_path=/nonexistent.ckpt"])
def test_export_cli_bad_checkpoint(bad: str, tmp_path: Path) -> None:
    proc = run(["-m", "qat.export", bad], tmp_path)
    assert proc.returncode == 2, _show(proc)
    assert "is not a file" in proc.stdout + proc.stderr


def test_a_model_of_your_own_trains_exports_and_verifies(tmp_path: Path) -> None:
    """``model=custom model._target_=...``: a torchvision-style ResNet (inline ``+=``, a shared
    ReLU, no qat markers), its num_classes / in_chans filled in from the data."""
    run_dir = tmp_path / "run"
    overrides = [o for o in FAST if not o.startswith(("export.", "data.image_size"))]
    proc = run(
        [
            TRAIN,
            *overrides,
            "data.image_size=16",
            "model=custom",
            "model._target_=zoo.resnet_basic",
            "+model.width=4",
            "schedule.warmup_epochs=0",
            "export.bench=false",
            "export.verify_batches=2",
            f"hydra.run.dir={run_dir}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, _show(proc)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "ok"
    assert results["config"]["model"] == "resnet_basic"
    export = results["export"]
    assert export["parity_ok"] is True
    for runtime in export["parity"]["runtimes"].values():
        assert runtime["agreement"] >= 0.999
    # The inline `out += identity`s are quantized adds, integer in both targets.
    adds = [r for r in export["placement"]["layers"] if r["kind"] == "add"]
    assert len(adds) == 4 and all(r["torchscript"] == "add" and r["onnx"] == "add" for r in adds)
    assert export["placement"]["integer_mac_share"]["onnx"] > 0.99
