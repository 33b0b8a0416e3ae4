"""``quant=auto``: per-layer bit widths chosen by measurement under a budget, before QAT.

The preset (configs/quant/auto.yaml) is an ordinary recipe plus two blocks the recipe does not
read: ``auto`` (candidate widths, batches, estimate) and ``budget`` (``size_mb`` or ``bops``,
one of them). Before training, :func:`choose_bits` prepares a copy of the float model,
measures every layer's sensitivity (:func:`qat.sensitivity`, calibrated on training batches),
allocates the widths (:func:`qat.allocate_bits`) and writes into the run folder:

- ``quant_overrides.yaml``: the whole ``quant.overrides`` list the run trains with (the
  preset's, then one entry per layer): paste it into a preset to train the same model again;
- ``sensitivity.json`` and ``sensitivity.png``: the measurement, and a plot of it per layer.

QAT then trains with those overrides. A resume or a re-export of the run reads its
``quant_overrides.yaml`` (:func:`saved_recipe`), so it rebuilds the model it trained.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from qat.lit.calibration import seeded_shuffle
from qat.lit.config_recipe import container
from qat.lit.errors import ConfigError
from qat.quant.bit_allocation import Allocation, allocate_bits, layer_cost
from qat.quant.prepare import prepare
from qat.quant.sensitivity import METHODS, Sensitivity, layer_macs, quant_units, sensitivity
from qat.quant.spec import QUANT_BITS, Recipe

__all__ = [
    "OVERRIDES_FILE",
    "AutoOptions",
    "auto_options",
    "check_budget",
    "choose_bits",
    "saved_recipe",
]

log = logging.getLogger(__name__)

OVERRIDES_FILE = "quant_overrides.yaml"
SENSITIVITY_FILE = "sensitivity.json"
PLOT_FILE = "sensitivity.png"
AUTO_KEYS = ("candidates", "batches", "method", "seed")
#: Budget keys → (cost of qat.allocate_bits, factor from the key's unit to that cost's).
BUDGET_KEYS = {"size_mb": ("size", 1e6), "bops": ("bops", 1.0)}
#: ``quant.budget.match``: the size / BOPs of the preset's own uniform model (``quant.bits``
#: everywhere but where its overrides say otherwise), measured on the model itself.
MATCH = ("size", "bops")


@dataclass(frozen=True)
class AutoOptions:
    """The validated ``quant.auto`` / ``quant.budget`` blocks."""

    candidates: tuple[int, ...]
    batches: int
    method: str
    seed: int
    key: str  # the budget key given (size_mb / bops)
    cost: str  # size / bops
    budget: float  # in the cost's unit (bytes / bit operations)


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}={value!r} is invalid: expected a positive integer")
    return value


def auto_options(quant: Any) -> AutoOptions | None:
    """The options of a ``quant=auto`` config, None for another preset.

    Raises:
        ConfigError: an unknown key, no budget or two, a value of the wrong kind.
    """
    data = container(quant)
    if not isinstance(data, Mapping) or "auto" not in data or not data.get("enabled", True):
        return None
    auto = data.get("auto") or {}
    budget = data.get("budget") or {}
    budget_keys = (*BUDGET_KEYS, "match")
    for name, block, keys in (("auto", auto, AUTO_KEYS), ("budget", budget, budget_keys)):
        if not isinstance(block, Mapping):
            raise ConfigError(f"quant.{name}={block!r} is invalid: expected a mapping")
        unknown = sorted(set(block) - set(keys))
        if unknown:
            raise ConfigError(
                f"quant.{name} has no key(s) {unknown}; allowed: {', '.join(keys)} "
                f"(e.g. quant.budget.size_mb=0.2)"
            )
    given = {k: v for k, v in budget.items() if v is not None}
    if len(given) > 1 and "match" in given:
        # The preset's default (match: size) gives way to a budget set on the command line.
        given.pop("match")
    if len(given) != 1:
        raise ConfigError(
            "quant=auto needs one budget, "
            + (f"got {len(given)} ({', '.join(given)})" if given else "got none")
            + ": set quant.budget.size_mb=<MB of packed weights>, quant.budget.bops=<bit "
            "operations per sample> or quant.budget.match=size (the preset's uniform model's)"
        )
    ((key, value),) = given.items()
    if key == "match":
        if value not in MATCH:
            raise ConfigError(
                f"quant.budget.match={value!r} is invalid: allowed: {', '.join(MATCH)} (the "
                "size or BOPs of the preset's uniform model at quant.bits)"
            )
    elif isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"quant.budget.{key}={value!r} is invalid: expected a positive number")
    cands = auto.get("candidates", [2, 4, 8])
    if (
        not isinstance(cands, list)
        or len(set(cands)) < 2
        or any(isinstance(b, bool) or b not in QUANT_BITS for b in cands)
    ):
        raise ConfigError(
            f"quant.auto.candidates={cands!r} is invalid: two or more bit widths from 2–8, "
            "e.g. [2,4,8]"
        )
    method = auto.get("method", "measure")
    if method not in METHODS:
        raise ConfigError(f"quant.auto.method={method!r} is invalid: allowed: {', '.join(METHODS)}")
    cost, unit = (value, None) if key == "match" else BUDGET_KEYS[key]
    return AutoOptions(
        candidates=tuple(sorted(set(cands))),
        batches=_positive_int("quant.auto.batches", auto.get("batches", 2)),
        method=method,
        seed=int(auto.get("seed", 0)),
        key=key,
        cost=cost,
        budget=None if unit is None else float(value) * unit,
    )


def _unit_value(opts: AutoOptions, cost: float) -> str:
    key = {"size": "size_mb", "bops": "bops"}[opts.cost]
    return f"{key}={cost / BUDGET_KEYS[key][1]:.6g}"


def preset_cost(qmodel: nn.Module, cost: str, example: Any) -> float:
    """The size / BOPs of ``qmodel`` at the weight widths it was prepared with (the preset's
    uniform model), by the rule :func:`qat.allocate_bits` counts with."""
    units = quant_units(qmodel)
    if cost == "size":
        return sum(
            qmodel.get_submodule(n).weight.numel() * q[0].bits / 8.0 for n, q in units.items()
        )
    macs = _macs(qmodel, list(units), example)
    return float(sum(macs[n] * q[0].bits ** 2 for n, q in units.items()))


def _macs(qmodel: nn.Module, names: list[str], example: Any) -> dict[str, int]:
    if example is None:
        raise ConfigError("quant.budget.bops needs the data's input shape to count MACs; use size")
    was = qmodel.training
    qmodel.eval()
    try:
        return layer_macs(qmodel, names, (example,), None)
    finally:
        qmodel.train(was)


def check_budget(opts: AutoOptions, qmodel: nn.Module, example: torch.Tensor | None) -> None:
    """Refuse a budget below every layer at the lowest candidate (before any work).

    ``qmodel``: the config's model prepared with the preset (validation's dry run).
    """
    units = quant_units(qmodel)
    if not units:
        raise ConfigError(
            "quant=auto: the model has no conv / linear layer with quantized weights to allocate"
        )
    low = opts.candidates[0]
    if opts.cost == "size":
        floor = sum(qmodel.get_submodule(n).weight.numel() * low / 8.0 for n in units)
    else:
        macs = _macs(qmodel, list(units), example)
        floor = float(sum(m * low * low for m in macs.values()))
    budget = opts.budget if opts.budget is not None else preset_cost(qmodel, opts.cost, example)
    if budget < floor * (1 - 1e-9):
        raise ConfigError(
            f"quant.budget.{_unit_value(opts, budget)} is below the model with every layer "
            f"at {low} bits ({_unit_value(opts, floor)}): raise it to at least that"
        )


def saved_recipe(run_dir: Path, recipe: Recipe) -> Recipe | None:
    """``recipe`` with the overrides a run chose (its ``quant_overrides.yaml``), or None."""
    path = Path(run_dir) / OVERRIDES_FILE
    if not path.is_file():
        return None
    data = yaml.safe_load(path.read_text()) or {}
    overrides = data.get("overrides") if isinstance(data, Mapping) else None
    if not isinstance(overrides, list):
        raise ConfigError(f"{path} holds no 'overrides' list: restore it or delete the run dir")
    return Recipe.from_dict({**recipe.to_dict(), "overrides": overrides})


def _batches(datamodule: Any, seed: int) -> DataLoader:
    """Shuffled training batches, their order fixed by ``seed`` (the global RNG untouched)."""
    if hasattr(datamodule, "setup"):
        datamodule.setup("fit")
    return seeded_shuffle(datamodule.train_dataloader(), seed)


def choose_bits(
    opts: AutoOptions,
    model: nn.Module,
    recipe: Recipe,
    datamodule: Any,
    example: torch.Tensor | None,
    run_dir: Path,
) -> tuple[Recipe, dict[str, Any]]:
    """Measure, allocate, write the run folder's files; the recipe to train and a report.

    ``model``: the float model (its trained weights loaded); it is not changed.
    """
    probe = prepare(copy.deepcopy(model), recipe, example_inputs=example)
    log.info(
        "quant=auto: measuring %d layers at %s bits on %d batches (%s)",
        len(quant_units(probe)),
        "/".join(map(str, opts.candidates)),
        opts.batches,
        opts.method,
    )
    with torch.random.fork_rng():
        sens = sensitivity(
            probe,
            _batches(datamodule, opts.seed),
            opts.candidates,
            num_batches=opts.batches,
            method=opts.method,
        )
    if opts.budget is None:
        budget = preset_cost(probe, opts.cost, example)
        opts = dataclasses.replace(opts, budget=budget)
        log.info("quant=auto: budget %s, the preset's uniform model's", _unit_value(opts, budget))
    assert opts.budget is not None
    alloc = allocate_bits(sens, opts.budget, opts.cost)
    overrides = [_plain_override(o) for o in recipe.to_dict()["overrides"]]
    overrides += alloc.overrides()
    chosen = Recipe.from_dict({**recipe.to_dict(), "overrides": overrides})
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_overrides(run_dir / OVERRIDES_FILE, overrides, opts, alloc)
    (run_dir / SENSITIVITY_FILE).write_text(json.dumps(sens.to_dict(), indent=1) + "\n")
    report = auto_report(sens, alloc, opts)
    try:
        plot_sensitivity(sens, alloc, run_dir / PLOT_FILE)
        report["plot"] = str(run_dir / PLOT_FILE)
    except ImportError as err:  # matplotlib is an optional extra
        log.warning("quant=auto: no sensitivity plot (%s)", err)
    report["overrides_file"] = str(run_dir / OVERRIDES_FILE)
    for line in bits_table_lines(report):
        log.info("%s", line)
    return chosen, report


def _plain_override(ov: Mapping[str, Any]) -> dict[str, Any]:
    """A recipe override as a user writes it (no null fields)."""
    out: dict[str, Any] = {"pattern": ov["pattern"]}
    for key in ("weight", "activation"):
        if ov.get(key):
            out[key] = dict(ov[key])
    if ov.get("skip"):
        out["skip"] = True
    return out


def _write_overrides(
    path: Path, overrides: list[dict[str, Any]], opts: AutoOptions, alloc: Allocation
) -> None:
    head = (
        f"# Chosen by quant=auto under quant.budget.{_unit_value(opts, opts.budget)} "
        f"(uses {_unit_value(opts, alloc.total)}; {opts.method} on {opts.batches} batches).\n"
        "# The run's whole quant.overrides: the preset's, then one entry per layer. Paste it\n"
        "# under `overrides:` in a quant preset (or edit it) to train with these widths.\n"
    )
    path.write_text(head + yaml.safe_dump({"overrides": overrides}, sort_keys=False))


def auto_report(sens: Sensitivity, alloc: Allocation, opts: AutoOptions) -> dict[str, Any]:
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
    key = {"size": "size_mb", "bops": "bops"}[report["cost"]]
    unit = BUDGET_KEYS[key][1]
    lines = [
        f"mixed precision: {key} {report['used'] / unit:.6g} of "
        f"{report['budget'] / unit:.6g} ({report['method']}, {report['batches']} batches)",
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
