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
TINY = [*FAST, "model=lenet5", "trainer.max_epochs=2", "schedule.warmup_epochs=1"]


def test_bad_override_fails_before_training_with_one_clear_line(tmp_path: Path) -> None:
    proc = run([TRAIN, "quant.bits=1", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 2, _show(proc)
    out = proc.stdout + proc.stderr
    assert "invalid config: quant.bits=1 is invalid" in out
    assert "Traceback" not in out
    assert not (tmp_path / "run" / "checkpoints").exists()
    proc = run([TRAIN, "model.name=vgg16", f"hydra.run.dir={tmp_path / 'run2'}"], tmp_path)
    assert proc.returncode == 2 and "unknown model 'vgg16'" in proc.stdout + proc.stderr


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
            "+callbacks.nan.rank=1",
            "+callbacks.nan.step=5",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
        timeout=300,
    )
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    for rank in (0, 1):  # the same error on both ranks
        assert f"[rank{rank}]: qat.quant.quantizer.NonFiniteError: {message}" in out, _show(proc)
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


@pytest.mark.parametrize("bad", ["ckpt_path=/nonexistent.ckpt"])
def test_export_cli_bad_checkpoint(bad: str, tmp_path: Path) -> None:
    proc = run(["-m", "qat.export", bad], tmp_path)
    assert proc.returncode == 2, _show(proc)
    assert "is not a file" in proc.stdout + proc.stderr
