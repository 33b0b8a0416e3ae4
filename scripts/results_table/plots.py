"""The page's PNG plots: accuracy per bit width, size and latency."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .cells import _bits
from .rows import MODELS


def plot(items: list[dict[str, Any]], out: Path) -> list[Path]:
    """Accuracy vs bits per method; size and latency bars. Returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [i for i in items if i["done"]]
    models = [m for m in MODELS if any(i["model"] == m for i in done)]
    if not models:
        return []
    paths = []
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models, strict=True):
        rows = [i for i in done if i["model"] == m]
        f = next((i["acc"] for i in rows if i["row"] == "float"), None)
        if f is not None:
            ax.axhline(100 * f, color="gray", ls="--", label="float")
        for method, marker in (("PTQ", "s"), ("QAT", "o"), ("QAT annealed", "^")):
            pts = sorted(
                (i["w_bits"], 100 * i["acc"])
                for i in rows
                if i["method"].startswith(method)
                and (method != "QAT" or not i["method"].startswith("QAT annealed"))
                and i["a_bits"] == i["w_bits"]
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=marker, label=f"{method} (WbAb)")
        w4a8 = [i for i in rows if i["row"] == "qat_w4a8"]
        if w4a8:
            ax.plot([4], [100 * w4a8[0]["acc"]], "D", color="black", label="QAT W4A8")
        ax.set(title=m, xlabel="bits (weights = activations)", ylabel="test accuracy %")
        ax.set_xticks([2, 3, 4, 8])
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "results_accuracy.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    labels, sizes, lat = [], [], []
    for m in models:
        for row in ("float", "qat_w8a8", "qat_w4a4"):
            i = next((x for x in done if x["model"] == m and x["row"] == row), None)
            if i is None or i.get("ort_size") is None:
                continue
            labels.append(f"{m}\n{_bits(i['w_bits'], i['a_bits'])}")
            sizes.append(i["ort_size"] / 1024)
            lat.append(i.get("ort_ms64") or 0.0)
    axes[0].bar(labels, sizes, color="tab:blue")
    axes[0].set(title="ONNX file size (KiB)")
    axes[1].bar(labels, lat, color="tab:orange")
    axes[1].set(title="ONNX Runtime CPU latency, batch 64 (ms)")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    paths.append(out / "results_size_latency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
