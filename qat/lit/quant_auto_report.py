"""What a ``quant=auto`` run shows of its choice: the report (results.json, the summary, the
W&B table), the per-layer bits table as text, and the sensitivity plot."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from qat.quant.bit_allocation import Allocation, layer_cost
from qat.quant.sensitivity import Sensitivity

__all__ = [
    "UNITS",
    "auto_report",
    "bits_table_lines",
    "plain_override",
    "plot_sensitivity",
    "write_overrides",
]

#: Each cost's budget key and the factor from that key's unit to the cost's own.
UNITS = {"size": ("size_mb", 1e6), "bops": ("bops", 1.0), "latency": ("latency_ms", 1.0)}


def auto_report(sens: Sensitivity, alloc: Allocation, opts: Any) -> dict[str, Any]:
    """What results.json, the summary and W&B show: budget, use, and one row per layer."""
    low = sens.candidates[0]
    layers = []
    for u in sens.layers:
        b = alloc.bits[u.name]
        layers.append(
            {
                "layer": u.name,
                "bits": b,
                "weights": u.weights,
                "macs": u.macs,
                "cost": layer_cost(u, b, opts.cost),
                f"loss_delta_{low}": u.loss_delta[low],
                "loss_delta_chosen": u.loss_delta[b],
            }
        )
    return {
        "budget_key": opts.key,
        "budget": opts.budget,
        "cost": opts.cost,
        "used": alloc.total,
        "uniform": {
            str(b): sum(layer_cost(u, b, opts.cost) for u in sens.layers) for b in sens.candidates
        },
        "method": sens.method,
        "batches": sens.batches,
        "reference_loss": sens.reference_loss,
        "predicted_loss_delta": alloc.predicted_loss_delta,
        "layers": layers,
    }


def bits_table_lines(report: Mapping[str, Any]) -> list[str]:
    """The per-layer bits table as text lines (log and summary)."""
    key, unit = UNITS[report["cost"]]
    lines = [
        f"mixed precision: {key} {report['used'] / unit:.6g} of "
        f"{report['budget'] / unit:.6g} ({report['method']} on {report['batches']} batches)",
        f"  {'layer':<28} {'bits':>4} {'weights':>9} {'Δloss chosen':>13}",
    ]
    for row in report["layers"]:
        lines.append(
            f"  {row['layer']:<28} {row['bits']:>4} {row['weights']:>9} "
            f"{row['loss_delta_chosen']:>13.4g}"
        )
    return lines


def plot_sensitivity(sens: Sensitivity, alloc: Allocation, path: Path) -> None:
    """Loss change per layer at each lower candidate (log scale), chosen widths marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [u.name for u in sens.layers]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(names)), 4.0))
    for b in sens.candidates[:-1]:
        values = [max(u.loss_delta[b], 1e-6) for u in sens.layers]
        ax.plot(range(len(names)), values, marker="o", ms=3, label=f"{b} bits")
    ax.set_yscale("log")
    ax.set_ylabel("loss change (this layer alone)")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([f"{n} [{alloc.bits[n]}]" for n in names], rotation=90, fontsize=6)
    ax.set_title(f"sensitivity per layer ({sens.method}); chosen bits in brackets")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plain_override(ov: Mapping[str, Any]) -> dict[str, Any]:
    """A recipe override as a user writes it (no null fields)."""
    out: dict[str, Any] = {"pattern": ov["pattern"]}
    for key in ("weight", "activation"):
        if ov.get(key):
            out[key] = dict(ov[key])
    if ov.get("skip"):
        out["skip"] = True
    return out


def write_overrides(
    path: Path, overrides: list[dict[str, Any]], budget: str, used: str, how: str
) -> None:
    """The run's whole ``quant.overrides`` as a YAML file a user can paste into a preset;
    ``budget`` / ``used``: the budget and its use as the user's key spells them."""
    head = (
        f"# Chosen by quant=auto under quant.budget.{budget} (uses {used}; {how}).\n"
        "# The run's whole quant.overrides: the preset's, then one entry per layer. Paste it\n"
        "# under `overrides:` in a quant preset (or edit it) to train with these widths.\n"
    )
    path.write_text(head + yaml.safe_dump({"overrides": overrides}, sort_keys=False))
