"""The table's cells: figures as the page prints them ("–" where missing)."""

from __future__ import annotations


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _kib(x: float | None) -> str:
    return "–" if x is None else f"{x / 1024:.0f}"


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _bits(w: int | str, a: int | str) -> str:
    if isinstance(w, str):  # a mixed-precision row: its budget, in words
        return w
    return "fp32" if w >= 16 else f"W{w}A{a}"


def _trained(epochs: int | None, steps: int | None) -> str:
    """``epochs × batches per epoch`` of a run ("–" for calibration-only rows)."""
    return f"{epochs} × {steps // epochs}" if epochs and steps else "–"
