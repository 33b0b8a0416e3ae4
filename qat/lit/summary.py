"""The end-of-run summary table (rich), built from the ``results.json`` dict."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

__all__ = ["print_summary", "summary_table"]


def _pct(value: Any) -> str:
    return f"{100 * float(value):.2f}%" if isinstance(value, int | float) else "–"


def _num(value: Any, fmt: str = "{:.3g}") -> str:
    return fmt.format(value) if isinstance(value, int | float) else "–"


def summary_table(results: Mapping[str, Any]) -> Table:
    """A two-column table: run, accuracy, bit widths, export / parity / speed, wall time."""
    cfg = results.get("config") or {}
    metrics = results.get("metrics") or {}
    bits = results.get("bits") or {}
    table = Table(
        title=f"qat run: {results.get('task_name')}", box=box.SIMPLE_HEAVY, show_header=False
    )
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("run dir", str(results.get("run_dir")))
    table.add_row(
        "model / data", f"{cfg.get('model')} / {cfg.get('data')} @ {cfg.get('image_size')}px"
    )
    table.add_row(
        "bits (w / a)",
        "float"
        if not cfg.get("quant_enabled")
        else f"{bits.get('weight')} / {bits.get('activation')}",
    )
    table.add_row("epochs", f"{cfg.get('epochs_run')} of {cfg.get('max_epochs')}")
    if metrics.get("float_val_acc") is not None:
        table.add_row("val acc, float warm-up", _pct(metrics["float_val_acc"]))
    table.add_row("val acc", _pct(metrics.get("val_acc")))
    table.add_row(
        "test acc (fake-quant)" if cfg.get("quant_enabled") else "test acc",
        _pct(metrics.get("test_acc")),
    )
    export = results.get("export") or {}
    if not isinstance(export, Mapping):
        export = {}
    parity = export.get("parity")
    if isinstance(parity, Mapping):
        fq = (parity.get("fake_quant") or {}).get("accuracy")
        table.add_row(f"verify ({parity.get('num_samples')} samples)", f"fake-quant {_pct(fq)}")
        for runtime, rep in (parity.get("runtimes") or {}).items():
            table.add_row(
                f"  {runtime}",
                f"acc {_pct(rep.get('accuracy'))}, agreement {_pct(rep.get('agreement'))}, "
                f"max |Δlogit| {_num(rep.get('max_abs_diff'))}",
            )
    placement = export.get("placement")
    if isinstance(placement, Mapping):
        share = placement.get("integer_mac_share") or {}
        table.add_row(
            "MACs on integer kernels",
            ", ".join(f"{target} {_pct(value)}" for target, value in share.items()),
        )
    if "parity_ok" in export:
        table.add_row("parity", "[green]ok[/]" if export["parity_ok"] else "[red]FAILED[/]")
    if "error" in export:
        table.add_row("export", f"[red]failed[/]: {export['error']}")
    for name, size in (export.get("sizes_bytes") or {}).items():
        table.add_row(f"size {name}", f"{size / 1024:.1f} KiB")
    bench = export.get("bench")
    if isinstance(bench, Mapping):
        for name, rep in (bench.get("runtimes") or {}).items():
            lat = rep.get("latency_ms") or {}
            cells = ", ".join(f"bs{bs} {_num(ms, '{:.2f}')} ms" for bs, ms in lat.items())
            table.add_row(f"latency {name}", cells)
        for name, value in (bench.get("ratios") or {}).items():
            if isinstance(value, Mapping):
                value = ", ".join(f"bs{bs} {_num(v, '{:.2f}')}x" for bs, v in value.items())
            else:
                value = f"{_num(value, '{:.2f}')}x"
            table.add_row(name.replace("_", " "), value)
    table.add_row("wall time", f"{results.get('wall_time_s', 0):.0f} s")
    memory = results.get("peak_memory") or {}
    names = {"cpu_rss_bytes": "CPU RSS", "cuda_max_allocated_bytes": "CUDA max allocated"}
    parts = [f"{label} {memory[k] / 2**30:.2f} GiB" for k, label in names.items() if k in memory]
    if parts:
        table.add_row("peak memory", ", ".join(parts))
    return table


def print_summary(results: Mapping[str, Any], console: Console | None = None) -> None:
    (console or Console()).print(summary_table(results))
