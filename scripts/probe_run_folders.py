"""Probe run folders and exports as a user would: every case of issue 43's items 1-5.

Each case runs the command line (``python train.py ...``, ``python -m qat.export ...``) in a
subprocess on tiny configs (digits at 8x8, LeNet-5, a few batches; a tiny text folder), and
asserts its outcome: the exit code, one clear line (no traceback), and that the files already
on disk are untouched (sha256 of every file before and after). Disk full is simulated by
running the same entry point with the writer patched to raise ``OSError(ENOSPC)``.

    python scripts/probe_run_folders.py            # every case, a table, exit 1 on a failure
    python scripts/probe_run_folders.py --cases refuse_finished,reexport_last

Prints one row per case: name, expected and actual exit code, seconds, pass/fail, and the line
the user saw. ``tests/scripts/test_probe_run_folders.py`` runs it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "train.py")

#: A run of a few seconds: digits at 8x8, LeNet-5, 4 training batches, one warm-up epoch.
TINY = [
    "data=digits",
    "data.image_size=8",
    "data.batch_size=32",
    "model=lenet5",
    "quant=w8a8",
    "trainer.max_epochs=2",
    "schedule.warmup_epochs=1",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "~callbacks.rich_progress_bar",
    "module.channels_last=false",
    "logger=none",
    "export.bench=false",
    "export.verify_batches=2",
]
#: Re-export options matching TINY's export.
EXPORT = ["export.bench=false", "export.verify_batches=2"]

# Runs the entry point with every write of a checkpoint after the first failing as a full disk
# does (torch.save's writes raise ENOSPC part-way), or with every staged file write failing so.
_DISK_FULL = r"""
import errno, runpy, sys
import torch
mode, script, *args = sys.argv[1:]
sys.argv = [script, *args]

def full(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")

if mode == "checkpoint":
    real, saves = torch.save, [0]

    class FillingFile:
        def __init__(self, f):
            self.f, self.left = f, 4096
        def write(self, data):
            if len(data) > self.left:
                full()
            self.left -= len(data)
            return self.f.write(data)
        def flush(self):
            self.f.flush()

    def save(obj, f, *a, **k):
        saves[0] += 1
        return real(obj, FillingFile(f) if saves[0] > 1 else f, *a, **k)

    torch.save = save
else:
    import qat.io
    qat.io._write_all = full
if script.endswith(".py"):
    runpy.run_path(script, run_name="__main__")
else:
    runpy.run_module(script, run_name="__main__", alter_sys=True)
"""


@dataclass
class Outcome:
    name: str
    want: int
    got: int
    seconds: float
    ok: bool
    line: str
    detail: str = ""


def run(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "WANDB_MODE": "offline",
        "HYDRA_FULL_ERROR": "1",
    }
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path → hex)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            out[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The line the user is told (the last ERROR / invalid config / stopped line)."""
    text = proc.stdout + proc.stderr
    keys = ("invalid config:", "training stopped:", "export stopped:", "Error", "error")
    lines = [line for line in text.splitlines() if any(k in line for k in keys)]
    return lines[-1].strip() if lines else (text.strip().splitlines() or [""])[-1]


class Probe:
    """The cases, sharing two trained runs built once."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self._runs: dict[str, Path] = {}

    # ------------------------------------------------------------------ fixtures
    def trained(self, name: str, extra: tuple[str, ...] = ()) -> Path:
        """A finished tiny run (trained once, then copied for each case that may change it)."""
        if name not in self._runs:
            run_dir = self.work / "base" / name
            proc = run([TRAIN, *TINY, *extra, f"hydra.run.dir={run_dir}"], self.work)
            if proc.returncode != 0:
                raise RuntimeError(f"base run {name} failed:\n{proc.stderr[-3000:]}")
            self._runs[name] = run_dir
        return self._runs[name]

    def copy(self, name: str, case: str, extra: tuple[str, ...] = ()) -> Path:
        dst = self.work / "cases" / case
        shutil.copytree(self.trained(name, extra), dst)
        return dst

    def check(
        self,
        name: str,
        proc: subprocess.CompletedProcess,
        want: int,
        started: float,
        must_say: str,
        extra_ok: Callable[[], str | None] = lambda: None,
    ) -> Outcome:
        text = proc.stdout + proc.stderr
        problems = []
        if proc.returncode != want:
            problems.append(f"exit {proc.returncode}, want {want}")
        if want != 0 and "Traceback" in text:
            problems.append("a traceback was printed")
        if must_say and must_say not in text:
            problems.append(f"the output does not say {must_say!r}")
        more = extra_ok()
        if more:
            problems.append(more)
        line = error_line(proc) if want != 0 else f"exit 0 ({must_say})"
        return Outcome(
            name,
            want,
            proc.returncode,
            round(time.perf_counter() - started, 1),
            not problems,
            line,
            "; ".join(problems) + ("\n" + text[-2500:] if problems else ""),
        )

    # ------------------------------------------------------------------ cases
    def refuse_finished(self) -> Outcome:
        """Item 1: a finished run's folder is refused before Hydra rewrites .hydra/."""
        t = time.perf_counter()
        run_dir = self.copy("w8a8", "refuse_finished")
        before = digest(run_dir)
        proc = run([TRAIN, *TINY, "model=resnet20", f"hydra.run.dir={run_dir}"], self.work)
        return self.check(
            "refuse_finished",
            proc,
            2,
            t,
            "already holds a finished run",
            lambda: None if digest(run_dir) == before else "the run folder changed",
        )

    def refuse_resume_other_model(self) -> Outcome:
        """Item 5: resuming an unfinished run with another model: one line, folder untouched."""
        t = time.perf_counter()
        run_dir = self.copy("w8a8", "resume_other_model")
        (run_dir / "results.json").unlink()  # as if it was interrupted
        before = digest(run_dir)
        args = [TRAIN, *TINY, "model=resnet20", f"hydra.run.dir={run_dir}", "ckpt_path=last"]
        proc = run(args, self.work)
        return self.check(
            "resume_other_model",
            proc,
            2,
            t,
            "trained with model.name=lenet5",
            lambda: None if digest(run_dir) == before else "the run folder changed",
        )

    def refuse_resume_other_recipe(self) -> Outcome:
        """Item 5: resuming a checkpoint in a new folder with another recipe: one line."""
        t = time.perf_counter()
        src = self.trained("w8a8")
        before = digest(src)
        ckpt = src / "checkpoints" / "last.ckpt"
        new = self.work / "cases" / "resume_other_recipe"
        proc = run(
            [TRAIN, *TINY, "quant=w4a4", f"ckpt_path={ckpt}", f"hydra.run.dir={new}"], self.work
        )
        return self.check(
            "resume_other_recipe",
            proc,
            2,
            t,
            "another quantization recipe",
            lambda: None if digest(src) == before else "the checkpoint's run folder changed",
        )

    def reexport_last(self) -> Outcome:
        """Items 2-3: re-export of a run that ended in warm-up; a new folder, the old intact."""
        t = time.perf_counter()
        run_dir = self.copy("warmup", "reexport_warmup", ("trainer.max_epochs=1",))
        before = digest(run_dir)
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        proc = run(["-m", "qat.export", f"ckpt_path={ckpt}", *EXPORT], self.work)

        def folders() -> str | None:
            after = digest(run_dir)
            changed = [k for k, v in before.items() if after.get(k) != v]
            if changed:
                return f"files changed: {changed[:3]}"
            return _manifest_problem(run_dir / "export-2", ckpt)

        return self.check("reexport_warmup_last", proc, 0, t, "export-2", folders)

    def reexport_best(self) -> Outcome:
        """Item 3: every checkpoint a run wrote re-exports (the best-val one too)."""
        t = time.perf_counter()
        run_dir = self.copy("w8a8", "reexport_best")
        best = sorted((run_dir / "checkpoints").glob("best_*.ckpt"))
        if not best:
            return Outcome("reexport_best", 0, -1, 0.0, False, "no best_*.ckpt written")
        proc = run(["-m", "qat.export", f"ckpt_path={best[0]}", *EXPORT], self.work)
        return self.check(
            "reexport_best",
            proc,
            0,
            t,
            "export-2",
            lambda: _manifest_problem(run_dir / "export-2", best[0]),
        )

    def reexport_replace(self) -> Outcome:
        """Item 2: export.replace=true swaps the folder whole and results.json follows it."""
        t = time.perf_counter()
        run_dir = self.copy("w8a8", "reexport_replace")
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        args = ["-m", "qat.export", f"ckpt_path={ckpt}", *EXPORT, "export.targets=[onnx]"]
        proc = run([*args, "export.replace=true"], self.work)

        def replaced() -> str | None:
            names = sorted(p.name for p in (run_dir / "export").iterdir())
            if names != ["export_report.json", "manifest.json", "model.onnx"]:
                return f"export/ holds {names} (a model.ts from the earlier export left beside?)"
            results = json.loads((run_dir / "results.json").read_text())
            sizes = results["export"].get("sizes_bytes", {})
            real = (run_dir / "export" / "model.onnx").stat().st_size
            if sizes != {"onnx": real}:
                return f"results.json describes {sizes}, the folder holds onnx={real}"
            return _manifest_problem(run_dir / "export", ckpt)

        return self.check("reexport_replace", proc, 0, t, "exported", replaced)

    def refuse_target_in_run_folder(self) -> Outcome:
        """Item 4: a copied run folder whose config names os.makedirs is refused unbuilt."""
        t = time.perf_counter()
        run_dir = self.copy("w8a8", "target_run_folder")
        evil = self.work / "cases" / "made_by_config"
        cfg_path = run_dir / ".hydra" / "config.yaml"
        text = cfg_path.read_text()
        text = text.replace("_target_: qat.models.create_model", "_target_: os.makedirs", 1)
        text = text.replace("name: lenet5", f"name: {evil}", 1)
        cfg_path.write_text(text)
        before = digest(run_dir)
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        proc = run(["-m", "qat.export", f"ckpt_path={ckpt}", *EXPORT], self.work)

        def untouched() -> str | None:
            if evil.exists():
                return f"{evil} was created: the config's target ran"
            return None if digest(run_dir) == before else "the run folder changed"

        return self.check("target_run_folder", proc, 2, t, "model._target_=os.makedirs", untouched)

    def refuse_target_cli(self) -> Outcome:
        """Item 4: builtins.print named on the command line is refused before any call."""
        t = time.perf_counter()
        run_dir = self.work / "cases" / "target_cli"
        args = [TRAIN, *TINY, "+callbacks.x._target_=builtins.print", f"hydra.run.dir={run_dir}"]
        proc = run(args, self.work)
        return self.check(
            "target_cli",
            proc,
            2,
            t,
            "callbacks.x._target_=builtins.print",
            lambda: f"{run_dir} was created" if run_dir.exists() else None,
        )

    def disk_full_training(self) -> Outcome:
        """Item 5: disk full at the second checkpoint: exit 3, the first one intact."""
        t = time.perf_counter()
        run_dir = self.work / "cases" / "disk_full_training"
        args = ["-c", _DISK_FULL, "checkpoint", TRAIN, *TINY, f"hydra.run.dir={run_dir}"]
        proc = run(args, self.work)

        def intact() -> str | None:
            import torch

            ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
            if ckpts != ["last.ckpt"]:
                return f"checkpoints/ holds {ckpts} (a torn temporary file left?)"
            state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
            return None if state["epoch"] == 0 else f"last.ckpt is from epoch {state['epoch']}"

        return self.check(
            "disk_full_training", proc, 3, t, "no space left on the device writing", intact
        )

    def disk_full_export(self) -> Outcome:
        """Item 5: disk full during a re-export: exit 2, no folder made or changed."""
        t = time.perf_counter()
        run_dir = self.copy("w8a8", "disk_full_export")
        before = digest(run_dir)
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        args = ["-c", _DISK_FULL, "write", "qat.export", f"ckpt_path={ckpt}", *EXPORT]
        proc = run(args, self.work)

        def untouched() -> str | None:
            extra = sorted(
                p.name for p in run_dir.iterdir() if p.name.startswith((".export", "export-"))
            )
            if extra:
                return f"left behind: {extra}"
            return None if digest(run_dir) == before else "the run folder changed"

        return self.check(
            "disk_full_export", proc, 2, t, "no space left on the device writing", untouched
        )

    def _text(self, case: str, files: dict[str, bytes], must_say: str) -> Outcome:
        t = time.perf_counter()
        folder = self.work / "cases" / case / "text"
        folder.mkdir(parents=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)
        run_dir = self.work / "cases" / case / "run"
        args = [TRAIN, "+experiment=gpt_w8a8", f"data.data_dir={folder}", "data.seq_len=32"]
        args += ["data.val_bytes=4096", "data.test_bytes=4096", f"hydra.run.dir={run_dir}"]
        proc = run(args, self.work)
        return self.check(
            case,
            proc,
            2,
            t,
            must_say,
            lambda: None if not (run_dir / "checkpoints").exists() else "training started",
        )

    def text_too_small(self) -> Outcome:
        """Item 5: a text folder too small for the three splits."""
        return self._text("text_too_small", {"a.txt": b"tiny text\n" * 50}, "too little text")

    def text_binary(self) -> Outcome:
        """Item 5: binary files given as text."""
        blob = bytes(range(256)) * 64
        return self._text("text_binary", {"a.txt": b"x\n" * 9000, "b.bin": blob}, "not a text file")

    def init_from_not_a_checkpoint(self) -> Outcome:
        """Item 5: init_from pointing at a file that is no checkpoint."""
        t = time.perf_counter()
        bogus = self.work / "cases" / "notes.txt"
        bogus.parent.mkdir(parents=True, exist_ok=True)
        bogus.write_text("not a checkpoint\n")
        run_dir = self.work / "cases" / "init_from_bogus"
        proc = run([TRAIN, *TINY, f"init_from={bogus}", f"hydra.run.dir={run_dir}"], self.work)
        return self.check("init_from_not_ckpt", proc, 2, t, "is not a PyTorch checkpoint")

    def init_from_quantized(self) -> Outcome:
        """Item 5: init_from a quantized checkpoint: the message's suggestion works."""
        t = time.perf_counter()
        src = self.trained("w8a8")
        ckpt = src / "checkpoints" / "last.ckpt"
        run_dir = self.work / "cases" / "init_from_quantized"
        proc = run([TRAIN, *TINY, f"init_from={ckpt}", f"hydra.run.dir={run_dir}"], self.work)
        first = self.check("init_from_quantized", proc, 2, t, "to train it further")
        if not first.ok:
            return first
        # The suggestion: resume with the run's own settings and more epochs, in a new folder.
        again = self.work / "cases" / "init_from_quantized_resumed"
        args = [TRAIN, *TINY, f"ckpt_path={ckpt}", "trainer.max_epochs=3", f"hydra.run.dir={again}"]
        proc = run(args, self.work)
        second = self.check("init_from_quantized", proc, 0, t, "QAT resumed at epoch 2")
        second.line = f"{first.line[:150]}... then the suggested resume: exit {proc.returncode}"
        return second

    def cases(self) -> dict[str, Callable[[], Outcome]]:
        return {
            "refuse_finished": self.refuse_finished,
            "resume_other_model": self.refuse_resume_other_model,
            "resume_other_recipe": self.refuse_resume_other_recipe,
            "reexport_warmup_last": self.reexport_last,
            "reexport_best": self.reexport_best,
            "reexport_replace": self.reexport_replace,
            "target_run_folder": self.refuse_target_in_run_folder,
            "target_cli": self.refuse_target_cli,
            "disk_full_training": self.disk_full_training,
            "disk_full_export": self.disk_full_export,
            "text_too_small": self.text_too_small,
            "text_binary": self.text_binary,
            "init_from_not_ckpt": self.init_from_not_a_checkpoint,
            "init_from_quantized": self.init_from_quantized,
        }


def _manifest_problem(folder: Path, ckpt: Path) -> str | None:
    """None when ``folder`` is a complete export of ``ckpt`` that its manifest describes."""
    from qat.export.bundle import read_manifest

    if not folder.is_dir():
        return f"{folder} is missing"
    try:
        manifest = read_manifest(folder)
    except (OSError, ValueError) as err:
        return str(err)
    named = set(manifest["files"]) | {"manifest.json"}
    there = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    if named != there:
        return f"manifest names {sorted(named)}, the folder holds {sorted(there)}"
    if manifest["checkpoint"].get("path") != str(ckpt):
        return f"manifest's checkpoint is {manifest['checkpoint'].get('path')}, not {ckpt}"
    if manifest["parity"].get("ok") is not True:
        return f"parity: {manifest['parity']}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="", help="comma-separated case names (default all)")
    parser.add_argument("--workdir", default=None, help="keep the folders here (default: temp)")
    parser.add_argument("--json", default=None, help="also write the outcomes to this file")
    args = parser.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="probe_run_folders_"))
    work.mkdir(parents=True, exist_ok=True)
    probe = Probe(work)
    cases = probe.cases()
    names = [c for c in args.cases.split(",") if c] or list(cases)
    unknown = [n for n in names if n not in cases]
    if unknown:
        print(f"unknown case(s) {unknown}: choose from {', '.join(cases)}", file=sys.stderr)
        return 2
    outcomes = []
    for name in names:
        try:
            outcome = cases[name]()
        except Exception as err:  # a probe that could not run is a failed case, not a crash
            outcome = Outcome(name, 0, -1, 0.0, False, f"{type(err).__name__}: {err}")
        outcomes.append(outcome)
        print(f"{'PASS' if outcome.ok else 'FAIL'} {name}", file=sys.stderr, flush=True)
    width = max(len(o.name) for o in outcomes)
    print(f"\n{'case':<{width}}  want  got   secs  ok    what the user saw")
    for o in outcomes:
        print(
            f"{o.name:<{width}}  {o.want:>4}  {o.got:>3}  {o.seconds:>5}  {'pass' if o.ok else 'FAIL'}  {o.line[:160]}"
        )
    for o in outcomes:
        if not o.ok:
            print(f"\n--- {o.name}: {o.detail}")
    if args.json:
        Path(args.json).write_text(json.dumps([o.__dict__ for o in outcomes], indent=2))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
