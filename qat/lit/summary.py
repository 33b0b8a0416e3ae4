"""The end-of-run summary, built from the ``results.json`` dict: on the console and in the log.

Each figure says what it is once: which model (float warm-up, final fake-quant, exported file),
which split, how many samples. Classification runs report accuracy; language models
(``task: language_model``) perplexity, next-token accuracy and agreement, tokens. The summary is
printed (a rich table; the run directory on its own line, never cut) and written, as plain text,
to the run's log file (Hydra's ``<task_name>.log``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = ["print_summary", "summary_lines", "summary_rows", "summary_table"]

log = logging.getLogger(__name__)


def _pct(value: Any) -> str:
    value = _scalar(value)
    return f"{100 * value:.2f}%" if _is_num(value) else "–"


def _num(value: Any, fmt: str = "{:.3g}") -> str:
    value = _scalar(value)
    return fmt.format(value) if _is_num(value) else "–"


def _is_num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _scalar(value: Any) -> Any:
    """A one-element tensor (Lightning's ``best_model_score`` before ``results.json``) as a
    float; anything else as it is."""
    if hasattr(value, "item") and getattr(value, "numel", lambda: 0)() == 1:
        return float(value.item())
    return value


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _float_warmup(results: Mapping[str, Any]) -> tuple[float, int] | None:
    """(val/acc, epochs) of the last float warm-up epoch, from the schedule history."""
    rows = [
        r
        for r in results.get("history") or []
        if isinstance(r, Mapping) and r.get("phase") == "float" and _is_num(r.get("val/acc"))
    ]
    if not rows:
        return None
    return float(rows[-1]["val/acc"]), int(rows[-1].get("epoch", 0)) + 1


def _relative(path: Any, run_dir: Any) -> str:
    """``path`` inside the run directory (printed in full at the end) without its prefix."""
    text, prefix = str(path), f"{run_dir}/" if run_dir else None
    return text[len(prefix) :] if prefix and text.startswith(prefix) else text


def _checkpoint_rows(results: Mapping[str, Any], lm: bool) -> list[tuple[str, str]]:
    """Which checkpoint the test and the export used, and where the best one is, and why."""
    ckpts = _mapping(results.get("checkpoints"))
    last, best = ckpts.get("last"), ckpts.get("best")
    run_dir = results.get("run_dir")
    rows = []
    if last:
        exported = bool(_mapping(results.get("export")).get("artifacts"))
        used = "tested and exported" if exported else "tested"
        rows.append(("final model", f"{_relative(last, run_dir)} ({used})"))
    epoch = re.search(r"epoch_?(\d+)", str(best))
    final_epoch = _mapping(results.get("config")).get("epochs_run")
    if epoch and _is_num(final_epoch) and int(epoch.group(1)) == final_epoch - 1:
        best = None  # the best epoch is the last one: the final model
    if best and best != last:
        score = ckpts.get("best_score")
        monitor = ckpts.get("best_monitor") or "val"
        shown = _num(score, "{:.4g}") if lm or "acc" not in str(monitor) else _pct(score)
        rows.append(
            (
                f"best {monitor}",
                f"{shown} in {_relative(best, run_dir)}, not exported: it may predate the "
                "target bit width (`python -m qat.export ckpt_path=...` exports it)",
            )
        )
    return rows


def _classification_rows(results: Mapping[str, Any]) -> list[tuple[str, str]]:
    cfg = _mapping(results.get("config"))
    metrics = _mapping(results.get("metrics"))
    quantized = bool(cfg.get("quant_enabled"))
    rows = []
    warmup = _float_warmup(results)
    if warmup is not None and quantized:
        acc, epochs = warmup
        rows.append(
            (
                "val acc, float model",
                f"{_pct(acc)} after {epochs} float epoch{'s' if epochs > 1 else ''} (running BN "
                "averages; quantized epochs validate with re-estimated ones)",
            )
        )
    final = "fake-quant model" if quantized else "model"
    rows.append((f"val acc, final {final}", _pct(metrics.get("val_acc"))))
    rows.append((f"test acc, final {final}", _pct(metrics.get("test_acc"))))
    return rows


def _lm_rows(results: Mapping[str, Any]) -> list[tuple[str, str]]:
    cfg = _mapping(results.get("config"))
    metrics = _mapping(results.get("metrics"))
    model = "fake-quant model" if cfg.get("quant_enabled") else "model"
    rows = []
    for split in ("val", "test"):
        ppl, acc = metrics.get(f"{split}_ppl"), metrics.get(f"{split}_acc")
        if ppl is None and acc is None:
            continue
        rows.append(
            (
                f"{split} perplexity, final {model}",
                f"{_num(ppl, '{:.2f}')} ({split} split, next-token acc {_pct(acc)})",
            )
        )
    return rows


def _parity_rows(export: Mapping[str, Any], lm: bool) -> list[tuple[str, str]]:
    parity = _mapping(export.get("parity"))
    if not parity:
        return []
    fq = _mapping(parity.get("fake_quant"))
    rows = []
    if lm:
        rows.append(
            (
                "verify",
                f"{parity.get('num_tokens')} test tokens (the first export.verify_batches "
                f"test batches): fake-quant perplexity {_num(fq.get('perplexity'), '{:.2f}')}",
            )
        )
        for runtime, rep in _mapping(parity.get("runtimes")).items():
            rep = _mapping(rep)
            rows.append(
                (
                    f"  {runtime}",
                    f"perplexity {_num(rep.get('perplexity'), '{:.2f}')} (Δ "
                    f"{_pct(rep.get('ppl_rel_diff'))}), next-token agreement "
                    f"{_pct(rep.get('agreement'))}, "
                    + (f"KL {_num(rep['mean_kl'])} nats, " if "mean_kl" in rep else "")
                    + f"max |Δlogit| {_num(rep.get('max_abs_diff'))}",
                )
            )
    else:
        rows.append(
            (
                "verify",
                f"{parity.get('num_samples')} test images: fake-quant acc {_pct(fq.get('accuracy'))}",
            )
        )
        for runtime, rep in _mapping(parity.get("runtimes")).items():
            rep = _mapping(rep)
            rows.append(
                (
                    f"  {runtime}",
                    f"acc {_pct(rep.get('accuracy'))}, top-1 agreement "
                    f"{_pct(rep.get('agreement'))}, max |Δlogit| {_num(rep.get('max_abs_diff'))}",
                )
            )
    return rows


def _speed_note(machine: Mapping[str, Any], threads: Any) -> str:
    """On what the timings ran, and the int8 speed-up that CPU allows, as far as it says."""
    cpu = f"{machine.get('cpu') or 'this CPU'} ({machine.get('isa')})" if machine else ""
    on = f"{threads} threads" + (f" of {cpu}" if cpu else "") if threads else cpu
    if machine.get("vnni") is False:
        # scripts/bench_inference.py's GEMM ceiling on a 2-core AVX2 EPYC: 1.74x, 1.87x.
        return f"{on}; no VNNI: int8 GEMMs run at most ~1.9x FP32 on such CPUs"
    if machine.get("vnni"):
        return f"{on}; VNNI int8 dot products"
    return on


def _bench_rows(export: Mapping[str, Any], machine: Mapping[str, Any]) -> list[tuple[str, str]]:
    bench = _mapping(export.get("bench"))
    if not bench:
        return []
    rows = []
    if "runtimes" in bench:  # classification: per runtime and batch size
        for name, rep in _mapping(bench.get("runtimes")).items():
            lat = _mapping(_mapping(rep).get("latency_ms"))
            cells = ", ".join(f"batch {bs} {_num(ms, '{:.2f}')} ms" for bs, ms in lat.items())
            rows.append((f"latency {name}", cells))
        for name, value in _mapping(bench.get("ratios")).items():
            if isinstance(value, Mapping):
                value = ", ".join(f"batch {bs} {_num(v, '{:.2f}')}x" for bs, v in value.items())
            else:
                value = f"{_num(value, '{:.2f}')}x"
            rows.append((name.replace("_", " "), value))
    else:  # language model: ONNX Runtime, one window at batch 1
        shape = bench.get("shape") or []
        what = f"batch {shape[0]}, {shape[1]} tokens" if len(shape) == 2 else "one window"
        speedup = _mapping(bench.get("speedup_vs_fp32"))
        for name, ms in _mapping(bench.get("latency_ms")).items():
            ratio = speedup.get(name)
            extra = f", {_num(ratio, '{:.2f}')}x FP32" if name != "ort_fp32" and ratio else ""
            rows.append((f"latency {name}", f"{_num(ms, '{:.2f}')} ms ({what}{extra})"))
    note = _speed_note(machine, bench.get("threads"))
    if note:
        rows.append(("timed on", note))
    return rows


def _mixed_rows(mixed: Mapping[str, Any], run_dir: Any) -> list[tuple[str, str]]:
    """quant=auto's choice: the budget and what it used, then the per-layer bits table."""
    if not mixed:
        return []
    units = {
        "size": (1e6, "MB packed weights and scales"),
        "latency": (1.0, f"ms per sample on {mixed.get('target')}"),
    }
    scale, unit = units.get(mixed.get("cost"), (1.0, "BOPs per sample"))
    rows = [
        (
            "mixed precision",
            f"{_num(mixed.get('used', 0) / scale, '{:.4g}')} of "
            f"{_num(mixed.get('budget', 0) / scale, '{:.4g}')} {unit} "
            f"({mixed.get('method')} on {mixed.get('batches')} batches; "
            f"{_relative(mixed.get('overrides_file'), run_dir)})",
        )
    ]
    for row in mixed.get("layers") or []:
        rows.append(
            (
                f"  {row['layer']}",
                f"{row['bits']} bits ({row['weights']} weights, Δloss "
                f"{_num(row['loss_delta_chosen'])})",
            )
        )
    return rows


def summary_rows(results: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The summary as ``(what, value)`` rows (the run directory is printed on its own)."""
    cfg = _mapping(results.get("config"))
    bits = _mapping(results.get("bits"))
    lm = cfg.get("task") == "language_model"
    data = str(cfg.get("data"))
    if not lm and cfg.get("image_size"):
        data += f", {cfg['image_size']}×{cfg['image_size']} images"
    rows = [
        ("model / data", f"{cfg.get('model')} / {data}"),
        (
            "bits (w / a)",
            f"{bits.get('weight')} / {bits.get('activation')}"
            if cfg.get("quant_enabled")
            else "float (no quantization)",
        ),
        ("epochs", f"{cfg.get('epochs_run')} of {cfg.get('max_epochs')}"),
    ]
    rows += _mixed_rows(_mapping(results.get("mixed_precision")), results.get("run_dir"))
    rows += _lm_rows(results) if lm else _classification_rows(results)
    rows += _checkpoint_rows(results, lm)
    export = _mapping(results.get("export"))
    if export.get("skipped"):
        rows.append(("export", f"skipped ({export['skipped']})"))
    if "error" in export:
        rows.append(("export", f"[red]failed[/]: {export['error']}"))
    rows += _parity_rows(export, lm)
    placement = _mapping(export.get("placement"))
    share = _mapping(placement.get("integer_mac_share"))
    if share:
        rows.append(
            (
                "MACs on integer kernels",
                ", ".join(f"{target} {_pct(value)}" for target, value in share.items()),
            )
        )
    if "parity_ok" in export:
        rows.append(("parity", "[green]ok[/]" if export["parity_ok"] else "[red]FAILED[/]"))
    for name, size in _mapping(export.get("sizes_bytes")).items():
        if _is_num(size):
            rows.append((f"size {name}", f"{size / 1024:.1f} KiB"))
    rows += _bench_rows(export, _mapping(results.get("machine")))
    wall = results.get("wall_time_s")
    rows.append(("wall time", f"{wall:.0f} s" if _is_num(wall) else "–"))
    memory = _mapping(results.get("peak_memory"))
    if memory:
        rows.append(("peak memory", _memory(memory)))
    return rows


def _memory(memory: Mapping[str, Any]) -> str:
    """``CPU RSS 1.2 GiB, CUDA 3.4 GiB`` (the parts present)."""
    names = {"cpu_rss_bytes": "CPU RSS", "cuda_max_allocated_bytes": "CUDA max allocated"}
    return ", ".join(
        f"{label} {memory[key] / 2**30:.2f} GiB"
        for key, label in names.items()
        if _is_num(memory.get(key))
    )


def summary_table(results: Mapping[str, Any]) -> Table:
    """A two-column rich table of :func:`summary_rows`; values wrap, never cut."""
    table = Table(
        title=f"qat run: {results.get('task_name')}", box=box.SIMPLE_HEAVY, show_header=False
    )
    table.add_column("what", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    for what, value in summary_rows(results):
        table.add_row(what, value)
    return table


def summary_lines(results: Mapping[str, Any]) -> list[str]:
    """The summary as plain text for the log: one ``what: value`` line per figure, no markup,
    nothing wrapped or cut."""
    lines = [f"qat run: {results.get('task_name')}"]
    lines += [
        f"  {what.strip()}: {Text.from_markup(value).plain}"
        for what, value in summary_rows(results)
    ]
    lines.append(f"run dir: {results.get('run_dir')}")
    return lines


def print_summary(results: Mapping[str, Any], console: Console | None = None) -> None:
    """Print the summary and write it to the run's log file (Hydra's ``<task_name>.log``)."""
    console = console or Console()
    console.print(summary_table(results))
    # On its own line and never wrapped: a path cut or folded cannot be copied.
    console.print(f"run dir: {results.get('run_dir')}", soft_wrap=True, markup=False)
    _to_log_files("\n".join(["run summary", *summary_lines(results)]))


def _to_log_files(text: str) -> None:
    """``text`` to the file handlers of the root logger (Hydra's run log), not the console,
    which has the rich table already."""
    record = log.makeRecord(log.name, logging.INFO, __file__, 0, text, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)
