"""Every timm classification family through qat: prepare → calibrate → QAT → export → verify.

For each timm model module (``timm.list_modules()``: one family each), the smallest model of at
most ``--max-params`` parameters (counted on the meta device, nothing allocated), randomly
initialized, goes through the flow a user follows, on scikit-learn's digits upscaled to 32×32
RGB: a short float training (so the logits have margins), ``qat.prepare`` (W8A8, float logits)
with example inputs, calibration, a few QAT steps, bias snapping, TorchScript and ONNX export,
verification of both against the fake-quant model on 256 held-out images, the share of MACs on
integer kernels, and ONNX Runtime INT8 vs FP32 latency at batch 16. Each model runs in its own
process with a time limit, so one that hangs or crashes costs only its own row.

Writes ``docs/model_zoo.json`` (one record per family, kept between runs: ``--resume`` skips
families already there) and renders ``docs/model_zoo.md`` from it.

Usage:
    python scripts/timm_sweep.py                        # every family (hours on 2 cores)
    python scripts/timm_sweep.py --resume --jobs 2      # only families not yet in the JSON
    python scripts/timm_sweep.py --models coat_tiny     # re-run models: rows of their families
    python scripts/timm_sweep.py --models resnet18,convnext_atto --no-write
    python scripts/timm_sweep.py --render               # re-render the page from the JSON
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
JSON_PATH = ROOT / "docs" / "model_zoo.json"
PAGE_PATH = ROOT / "docs" / "model_zoo.md"
FAMILIES_PATH = ROOT / "docs" / "model_zoo_families.json"
if str(ROOT) not in sys.path:  # run as a file from anywhere: the checkout's qat
    sys.path.insert(0, str(ROOT))
IMAGE_SIZE = 32
AGREEMENT = 0.999
RECIPE = {"overrides": [{"pattern": "@last", "activation": {"bits": 32}}]}  # float logits


# ------------------------------------------------------------------------------- one model
def _batches(image_size: int, batch_size: int) -> tuple[list, list]:
    from qat.data import DigitsDataModule

    dm = DigitsDataModule(batch_size=batch_size, image_size=image_size)
    dm.setup("fit")
    dm.setup("test")
    rgb = lambda loader: [(x.repeat(1, 3, 1, 1), y) for x, y in loader]  # noqa: E731
    return rgb(dm.train_dataloader()), rgb(dm.test_dataloader())


#: A float training step of a model slower than this at batch 64 marks it heavy: it trains,
#: calibrates and verifies on batches of 16 (ConvMixer-768/32 or DaViT at 32×32 ran past the
#: time limit in their 30 float steps of 64 on a shared 2-core machine).
HEAVY_STEP_S = 2.0
#: Float training stops after this many seconds (at least MIN_FLOAT_STEPS steps): it only
#: gives the logits margins, so the slowest models take fewer steps rather than more time.
FLOAT_BUDGET_S = 40.0
MIN_FLOAT_STEPS = 5


def _train(
    model, batches: list, steps: int, lr: float, adam: bool, budget_s: float | None = None
) -> int:
    """``steps`` optimizer steps, fewer where ``budget_s`` seconds run out first (never fewer
    than :data:`MIN_FLOAT_STEPS`); the steps taken."""
    import torch
    import torch.nn.functional as F

    opt = (torch.optim.AdamW if adam else torch.optim.SGD)(model.parameters(), lr)
    model.train()
    start = time.perf_counter()
    for i in range(steps):
        if budget_s is not None and i >= MIN_FLOAT_STEPS and time.perf_counter() - start > budget_s:
            return i
        x, y = batches[i % len(batches)]
        loss = F.cross_entropy(model(x), y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {i}")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps


def run_one(arch: str, out_dir: Path, bench: bool = True) -> dict:
    """The whole flow for one timm model: a record for the table, whose ``status`` is
    ``pass``, ``parity`` (an exported model disagrees) or ``error`` (``reason`` says where).

    Models that cannot run at 32×32 (window attention, fixed patch grids) run at the smallest
    side of :func:`sizes` they build and run a batch at (:func:`fits`), on batches of 16 with
    fewer steps: the float work grows with the square of the side (SAM2's Hiera at its own
    1024 ran past the time limit).
    """
    rec = _flow(arch, out_dir, bench, IMAGE_SIZE, batch_size=64, steps=30)
    if rec["status"] == "error" and rec["reason"].startswith(("build", "float training")):
        small = _enter("choosing a side", IMAGE_SIZE) and rec["reason"]
        size = next((s for s in sizes(arch)[1:] if fits(arch, s)), None)
        if size is not None:
            rec = _flow(arch, out_dir, bench, size, batch_size=16, steps=20)
        rec["note"] = "; ".join(
            x for x in (rec.get("note"), f"at {IMAGE_SIZE}×{IMAGE_SIZE}: {small}") if x
        )
    return rec


def sizes(arch: str) -> list[int]:
    """Input sides to try, smallest first: 32, multiples of 32 up to the model's own size, and
    its own size."""
    from qat.models.timm_models import import_timm

    native = import_timm().get_pretrained_cfg(arch).input_size[-1]
    return sorted({IMAGE_SIZE, native, *range(IMAGE_SIZE, native, IMAGE_SIZE)})


def fits(arch: str, image_size: int) -> bool:
    """True when the model builds for ``image_size`` and trains on a batch of that side."""
    import torch

    from qat.models import create_model

    try:
        model = create_model(
            "timm", arch=arch, num_classes=10, in_channels=3, image_size=image_size
        )
        model.train()(torch.randn(2, 3, image_size, image_size)).sum().backward()
    except Exception:
        return False
    return True


PREPARE_TARGET_S = 5.0  # issue 41's targets for every swept model
EXPORT_TARGET_S = 60.0
_START = time.perf_counter()
_CHILD = False  # running one model for the sweep's parent process (--one)


def _enter(stage: str, image_size: int) -> str:
    """Print the stage the child process enters (the parent names it if time runs out)."""
    print(f"STAGE {time.perf_counter() - _START:.0f} {image_size} {stage}", flush=True)
    return stage


def _last_stage(stdout: str | bytes | None) -> str:
    """``"in verify at 64×64, 250 s in"`` from a child's progress lines ('' if none)."""
    if isinstance(stdout, bytes):
        stdout = stdout.decode(errors="replace")
    lines = [s.split(" ", 3) for s in (stdout or "").splitlines() if s.startswith("STAGE ")]
    if not lines:
        return ""
    _, t, side, stage = lines[-1]
    return f" (in {stage} at {side}×{side}, {t} s in)"


def _partial(stdout: str | bytes | None) -> dict | None:
    """The verified record a child printed before its bench (None if it printed none)."""
    if isinstance(stdout, bytes):
        stdout = stdout.decode(errors="replace")
    lines = [s for s in (stdout or "").splitlines() if s.startswith("PARTIAL ")]
    return json.loads(lines[-1][len("PARTIAL ") :]) if lines else None


def _flow(arch: str, out_dir: Path, bench: bool, image_size: int, batch_size: int, steps: int):
    import warnings

    import torch

    import qat
    from qat.export import export_model, verify_artifacts
    from qat.export.bench import benchmark_artifacts
    from qat.export.lowering import placement_report
    from qat.models import create_model

    torch.manual_seed(0)
    torch.set_num_threads(1)
    rec: dict = {"model": arch, "image_size": image_size}
    stage = _enter("build", image_size)
    try:
        train, test = _batches(image_size, batch_size)
        model = create_model(
            "timm", arch=arch, num_classes=10, in_channels=3, image_size=image_size
        )
        rec["params"] = sum(p.numel() for p in model.parameters())
        stage = _enter("float training", image_size)
        t = time.perf_counter()
        _train(model, train, steps=1, lr=1e-3, adam=True)
        if batch_size > 16 and time.perf_counter() - t > HEAVY_STEP_S:
            batch_size = 16  # a heavy model: the rest of its flow on batches of 16
            train, test = _batches(image_size, batch_size)
        budget = FLOAT_BUDGET_S - (time.perf_counter() - t)
        rec["batch_size"] = batch_size
        rec["float_steps"] = 1 + _train(model, train, steps - 1, 1e-3, True, budget_s=budget)
        float_model = model.eval()
        stage = _enter("prepare", image_size)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t = time.perf_counter()
            q = qat.prepare(float_model, RECIPE, example_inputs=train[0][0][:2])
            rec["prepare_s"] = time.perf_counter() - t
        rec["capture"] = q.qat_capture["mode"]
        if q.qat_capture["mode"] != "graph":
            rec["capture_error"] = q.qat_capture.get("capture_error")
            rec["where"] = q.qat_capture.get("where")
        rec["warnings"] = sorted({str(w.message).splitlines()[0][:160] for w in caught})[:5]
        stage = _enter("calibrate / QAT", image_size)
        qat.calibrate(q, [x for x, _ in train[:4]])
        qat.set_observers(q, True)
        _train(q, train, steps=4, lr=1e-4, adam=True)
        qat.set_observers(q, False)
        q.eval()
        qat.snap_bias(q, test[0][0][:8])
        stage = _enter("export", image_size)
        rec["load"] = round(os.getloadavg()[0], 1)  # the machine's, as the times were taken
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = time.perf_counter()
            paths = export_model(q, out_dir, test[0][0][:1])
            rec["export_s"] = time.perf_counter() - t
        stage = _enter("verify", image_size)
        report = verify_artifacts(q, paths, test[: 256 // batch_size])
        rec["fake_quant_accuracy"] = report["fake_quant"]["accuracy"]
        rec["runtimes"] = {
            name: {"agreement": r["agreement"], "max_abs_diff": r["max_abs_diff"]}
            for name, r in report["runtimes"].items()
        }
        stage = _enter("placement", image_size)
        rec["integer_mac_share"] = placement_report(q, test[0][0][:1])["integer_mac_share"]
        agree = [r["agreement"] for r in rec["runtimes"].values()]
        rec["status"] = "pass" if min(agree) >= AGREEMENT else "parity"
        if rec["status"] != "pass":
            worst = min(rec["runtimes"], key=lambda k: rec["runtimes"][k]["agreement"])
            rec["reason"] = (
                f"{worst} agrees on {100 * rec['runtimes'][worst]['agreement']:.2f}% "
                f"(max |Δlogit| {rec['runtimes'][worst]['max_abs_diff']:.3g})"
            )
        if _CHILD:  # verified: a row even if the time limit strikes in the bench
            print("PARTIAL " + json.dumps(rec), flush=True)
        stage = _enter("bench", image_size)
        try:
            timing = bench and benchmark_artifacts(
                {"onnx": paths["onnx"]},
                float_model,
                test[0][0][:16],
                batch_sizes=(16,),
                rounds=3,
                threads=1,
                min_time=0.1,
            )
        except Exception as err:  # verified: the row stands, without the speed
            timing = None
            first = (str(err).strip().splitlines() or [""])[0][:160]
            rec["note"] = f"INT8 vs FP32 not timed: {type(err).__name__}: {first}"
        if timing:
            rec["speedup_onnx_int8_vs_fp32"] = timing["ratios"]["speedup_ort_int8_vs_fp32"]["16"]
    except Exception as err:  # one row per model: the table says what stopped it
        rec["status"] = "error"
        first = (str(err).strip().splitlines() or [""])[0][:200]
        rec["reason"] = f"{stage}: {type(err).__name__}: {first}"
    return rec


# ------------------------------------------------------------------------------ families
def families(max_params: float) -> dict[str, tuple[str, int]]:
    """Per timm model module, its smallest model (not timm's ``test_*`` fixtures) with at most
    ``max_params`` parameters.

    The scan builds every timm model on the meta device (minutes on 2 cores); it is kept in
    ``docs/model_zoo_families.json`` per timm version and limit, and resumes where it stopped.
    """
    import warnings

    import torch

    from qat.models.timm_models import import_timm

    timm = import_timm()
    key = {"timm": timm.__version__, "max_params": max_params}
    cache = json.loads(FAMILIES_PATH.read_text()) if FAMILIES_PATH.exists() else {}
    if {k: cache.get(k) for k in key} != key:
        cache = {**key, "scanned": [], "families": {}}
    found: dict[str, list] = cache["families"]
    for module in timm.list_modules():
        if module in cache["scanned"]:
            continue
        for name in timm.list_models(module=module, exclude_filters=["test_*"]):
            # timm's test_* fixtures are the fast subset in tests/, not a family's variant.
            try:
                with warnings.catch_warnings(), torch.device("meta"):
                    warnings.simplefilter("ignore")
                    m = timm.create_model(name, num_classes=10)
            except Exception:
                continue  # needs arguments or files a bare create_model lacks
            n = sum(p.numel() for p in m.parameters())
            if n <= max_params and (module not in found or n < found[module][1]):
                found[module] = [name, n]
        cache["scanned"].append(module)
        FAMILIES_PATH.write_text(json.dumps(cache, indent=1) + "\n")
    return {k: (v[0], v[1]) for k, v in found.items()}


def family_of(arch: str) -> str:
    """The family (timm model module) of a timm model name."""
    from qat.models.timm_models import import_timm

    timm = import_timm()
    if not timm.is_model(arch):
        raise SystemExit(f"--models: {arch!r} is not a timm model (see timm.list_models())")
    from timm.models import _registry

    return _registry._model_to_module[_registry.get_arch_name(arch)]


def _write_record(family: str, rec: dict) -> dict[str, dict]:
    """Store one family's record in the JSON and re-render the page; the records now there.

    Read, updated and written under a file lock, so sweeps running at once (a ``--resume``
    in the background, ``--models`` re-runs) keep each other's rows.
    """
    with open(JSON_PATH, "a+") as lock:  # write_text keeps the inode: the lock holds
        fcntl.flock(lock, fcntl.LOCK_EX)
        records = json.loads(JSON_PATH.read_text() or "{}")
        records[family] = rec
        JSON_PATH.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
        PAGE_PATH.write_text(render(records))
    return records


# -------------------------------------------------------------------------------- render
def render(records: dict[str, dict]) -> str:
    rows = sorted(records.values(), key=lambda r: r["family"])
    scan = json.loads(FAMILIES_PATH.read_text()) if FAMILIES_PATH.exists() else {}
    total = len(scan.get("families", {})) or len(rows)
    passed = [r for r in rows if r.get("status") == "pass"]
    lines = [
        "# timm model zoo",
        "",
        "Generated by `python scripts/timm_sweep.py` (do not edit by hand). Each family of timm",
        f"{rows[0].get('timm', '') if rows else ''} (one per `timm.list_modules()` entry) is",
        "represented by its smallest model of at most 30M parameters, randomly initialized, on",
        f"scikit-learn's digits at {IMAGE_SIZE}×{IMAGE_SIZE} RGB: 30 float steps (batches of 64;"
        f" the float training stops after {FLOAT_BUDGET_S:.0f} s, and a model whose first step",
        f"takes over {HEAVY_STEP_S:.0f} s runs on batches of 16 from there), `qat.prepare` (W8A8,",
        "float logits) with example inputs, calibration, 4 QAT steps (AdamW, lr 1e-4), bias",
        "snapping, export, then",
        "top-1 agreement of each exported model with the fake-quant model on 256 test images.",
        "",
        f"**{len(passed)} of {len(rows)} families** export with ≥ {100 * AGREEMENT:.1f}% top-1"
        " agreement under both ONNX Runtime and TorchScript"
        + (
            f" ({len(rows)} of the {total} families swept so far: `--resume` continues)."
            if total > len(rows)
            else "."
        ),
        "",
        "Columns: input side in pixels (32, or where a model cannot run at 32 the smallest"
        " multiple of 32 it runs at, else its own size: then batches of 16,",
        "20 float steps); agreement and max |Δlogit| per runtime; integer MAC share (ONNX / TorchScript);"
        " prepare and",
        "export seconds; ONNX Runtime INT8 latency speedup over FP32 at batch 16, one thread.",
        "",
        "| family | model | params | input | status | ORT agree % | ORT max Δ | TS agree % | TS max Δ "
        "| int MACs ORT / TS | prepare s | export s | INT8 vs FP32 | note |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]

    def pct(r: dict, k: str) -> str:
        v = r.get("runtimes", {}).get(k, {}).get("agreement")
        return f"{100 * v:.2f}" if v is not None else "–"

    def diff(r: dict, k: str) -> str:
        v = r.get("runtimes", {}).get(k, {}).get("max_abs_diff")
        return f"{v:.3g}" if v is not None else "–"

    def num(r: dict, k: str, fmt: str) -> str:
        return format(r[k], fmt) if k in r else "–"

    for r in rows:
        share = r.get("integer_mac_share") or {}
        macs = " / ".join(
            f"{100 * share[k]:.0f}%" if share.get(k) is not None else "–"
            for k in ("onnx", "torchscript")
        )
        note = "; ".join(x for x in (r.get("reason"), r.get("note")) if x)
        if r.get("capture") == "modules":
            note = f"module swap: {r.get('capture_error', '')} {note}".strip()
        cells = [
            r["family"],
            r["model"],
            f"{r['params'] / 1e6:.1f}M" if "params" in r else "–",
            str(r.get("image_size", "–")),
            r["status"],
            pct(r, "onnx"),
            diff(r, "onnx"),
            pct(r, "torchscript"),
            diff(r, "torchscript"),
            macs,
            num(r, "prepare_s", ".1f"),
            num(r, "export_s", ".1f"),
            num(r, "speedup_onnx_int8_vs_fp32", ".2f")
            + ("x" if "speedup_onnx_int8_vs_fp32" in r else ""),
            note.replace("|", "\\|"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    slow = [
        r
        for r in rows
        if r.get("prepare_s", 0) >= PREPARE_TARGET_S or r.get("export_s", 0) >= EXPORT_TARGET_S
    ]
    timed = [r for r in rows if "export_s" in r]
    lines += [
        "",
        f"Time targets, prepare < {PREPARE_TARGET_S:.0f} s and export < {EXPORT_TARGET_S:.0f} s:"
        f" {len(timed) - len(slow)} of the {len(timed)} models timed meet both"
        + (
            "; over: "
            + ", ".join(
                f"{r['family']} (prepare {r['prepare_s']:.1f} s, export {r['export_s']:.0f} s"
                + (f", 1-min load {r['load']} on {os.cpu_count()} cores" if "load" in r else "")
                + ")"
                for r in slow
            )
            if slow
            else ""
        )
        + ".",
    ]
    machine = rows[0].get("machine", "") if rows else ""
    jobs = max((r.get("jobs", 1) for r in rows), default=1)
    side = f"; up to {jobs} models ran side by side, one thread each" if jobs > 1 else ""
    lines += ["", f"Machine: {machine}{side}.", ""]
    return "\n".join(lines)


def _machine() -> str:
    cpu = "unknown CPU"
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown CPU":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    isa = "AVX-512 VNNI" if "avx512_vnni" in flags else ("AVX2" if "avx2" in flags else "x86")
    return f"{cpu}, {os.cpu_count()} cores, {isa}"


# ---------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", help="comma-separated timm names (default: one per family)")
    ap.add_argument("--max-params", type=float, default=30e6)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per model")
    ap.add_argument("--jobs", type=int, default=1, help="models run side by side (1 thread each)")
    ap.add_argument("--resume", action="store_true", help="skip families already in the JSON")
    ap.add_argument("--no-write", action="store_true", help="print records, write nothing")
    ap.add_argument("--render", action="store_true", help="only re-render the page")
    ap.add_argument("--families", action="store_true", help="only scan the families")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child process: one model, JSON on stdout
    args = ap.parse_args()

    if args.one:
        import tempfile

        global _CHILD
        _CHILD = True

        with tempfile.TemporaryDirectory() as tmp:
            print("RECORD " + json.dumps(run_one(args.one, Path(tmp))), flush=True)
        return

    records = json.loads(JSON_PATH.read_text()) if JSON_PATH.exists() else {}
    if args.render:
        PAGE_PATH.write_text(render(records))
        return
    if args.families:
        print(f"{len(families(args.max_params))} families")
        return
    if args.models:
        todo = {family_of(m): (m, 0) for m in args.models.split(",")}
    else:
        todo = families(args.max_params)
        print(f"{len(todo)} families of at most {args.max_params / 1e6:.0f}M parameters")
    from qat.models.timm_models import import_timm

    timm_version = import_timm().__version__
    lock = threading.Lock()

    def sweep_one(family: str, arch: str) -> None:
        t = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, __file__, "--one", arch],
                capture_output=True,
                text=True,
                timeout=args.timeout,
                cwd=ROOT,
            )
            line = next((s for s in proc.stdout.splitlines() if s.startswith("RECORD ")), None)
            if line is not None:
                rec = json.loads(line[len("RECORD ") :])
            else:
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
                rec = {"model": arch, "status": "error", "reason": f"crashed: {tail}"}
        except subprocess.TimeoutExpired as err:
            where = _last_stage(err.stdout)
            rec = _partial(err.stdout)
            if rec is not None:  # verified; the speed measurement ran out of time
                rec["note"] = f"INT8 vs FP32 not timed: over {args.timeout} s{where}"
            else:
                rec = {"model": arch, "status": "error", "reason": f"over {args.timeout} s{where}"}
        rec.update(family=family, timm=timm_version, machine=_machine(), jobs=args.jobs)
        with lock:
            print(
                f"{family:24s} {arch:36s} {rec['status']:7s} {time.perf_counter() - t:6.0f}s "
                f"{rec.get('reason', '')}",
                flush=True,
            )
            if args.no_write:
                print(json.dumps(rec))
                return
            records.update(_write_record(family, rec))

    # Each model runs on one thread, so --jobs 2 uses both cores of a 2-core machine.
    todo_now = [(f, a) for f, (a, _) in sorted(todo.items()) if not (args.resume and f in records)]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(lambda fa: sweep_one(*fa), todo_now))


if __name__ == "__main__":
    main()
