"""``quant=auto``: per-layer bit widths chosen by measurement under a budget, before QAT.

The preset (configs/quant/auto.yaml) is an ordinary recipe plus two blocks the recipe does not
read: ``auto`` (candidate widths, batches, estimate, context) and ``budget`` (``size_mb``,
``bops`` or ``latency_ms`` with its ``target``, one of them). Before training, :func:`choose_bits` prepares a copy of the float model,
measures every layer's sensitivity (:func:`qat.sensitivity`, calibrated on training batches),
allocates the widths (:func:`qat.allocate_bits`) and writes into the run folder:

- ``quant_overrides.yaml``: the whole ``quant.overrides`` list the run trains with (the
  preset's, then one entry per layer): paste it into a preset to train the same model again;
- ``sensitivity.json`` and ``sensitivity.png``: the measurement, and a plot of it per layer.

A latency budget is timed on the export target instead (:mod:`qat.lit.quant_latency`: its int8
kernels run every width alike, so every layer takes the highest candidate when that meets the
budget, and the run refuses in one line when it does not); the run folder gets ``latency.json``.
The report, bits table and plot are :mod:`qat.lit.quant_auto_report`'s.

QAT then trains with those overrides. A resume or a re-export of the run reads its
``quant_overrides.yaml`` (:func:`saved_recipe`), so it rebuilds the model it trained.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
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
from qat.lit.quant_auto_report import (
    UNITS,
    auto_report,
    bits_table_lines,
    plain_override,
    plot_sensitivity,
    write_overrides,
)
from qat.lit.quant_latency import LATENCY_TARGETS, check_latency, latency_table
from qat.quant.bit_allocation import Allocation, allocate_bits, packed_bytes
from qat.quant.prepare import prepare
from qat.quant.sensitivity import (
    CONTEXTS,
    METHODS,
    Candidate,
    check_candidates,
    check_groups,
    layer_macs,
    parse_candidate,
    quant_units,
    scale_count,
    sensitivity,
)
from qat.quant.spec import Recipe

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
LATENCY_FILE = "latency.json"
AUTO_KEYS = ("candidates", "batches", "method", "seed", "context")
#: Budget keys → (cost of qat.allocate_bits, factor from the key's unit to that cost's).
BUDGET_KEYS = {key: (cost, factor) for cost, (key, factor) in UNITS.items()}
#: Budget keys that qualify a latency budget rather than set one.
LATENCY_KEYS = ("target", "threads")
#: ``quant.budget.match``: the size / BOPs of the preset's own uniform model (``quant.bits``
#: everywhere but where its overrides say otherwise), measured on the model itself.
MATCH = ("size", "bops")


@dataclass(frozen=True)
class AutoOptions:
    """The validated ``quant.auto`` / ``quant.budget`` blocks."""

    candidates: tuple[Candidate, ...]  # least precise first (4, "4g32", ...)
    batches: int
    method: str
    seed: int
    context: str  # what the unallocated quantizers sit at while measuring (top / preset)
    key: str  # the budget key given (size_mb / bops / latency_ms / match)
    cost: str  # size / bops
    budget: float  # in the cost's unit (bytes / bit operations / ms)
    target: str | None = None  # latency_ms: the export target it is measured on
    threads: int = 1  # latency_ms: threads it is measured with (one image)


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
    budget_keys = (*BUDGET_KEYS, "match", *LATENCY_KEYS)
    for name, block, keys in (("auto", auto, AUTO_KEYS), ("budget", budget, budget_keys)):
        if not isinstance(block, Mapping):
            raise ConfigError(f"quant.{name}={block!r} is invalid: expected a mapping")
        unknown = sorted(set(block) - set(keys))
        if unknown:
            raise ConfigError(
                f"quant.{name} has no key(s) {unknown}; allowed: {', '.join(keys)} "
                f"(e.g. quant.budget.size_mb=0.2)"
            )
    given = {k: v for k, v in budget.items() if v is not None and k not in LATENCY_KEYS}
    if len(given) > 1 and "match" in given:
        # The preset's default (match: size) gives way to a budget set on the command line.
        given.pop("match")
    if len(given) != 1:
        raise ConfigError(
            "quant=auto needs one budget, "
            + (f"got {len(given)} ({', '.join(given)})" if given else "got none")
            + ": set quant.budget.size_mb=<MB of packed weights and scales>, quant.budget.bops=<bit "
            "operations per sample>, quant.budget.latency_ms=<ms> with quant.budget.target=onnx "
            "or quant.budget.match=size (the preset's uniform model's)"
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
    try:
        if not isinstance(cands, list | tuple):
            raise ValueError
        candidates = check_candidates(cands)
    except ValueError:
        raise ConfigError(
            f"quant.auto.candidates={cands!r} is invalid: two or more bit widths from 2–8, "
            "e.g. [2,4,8], or widths with a weight group size (linear layers), e.g. "
            "[4g32,4g128,4g0,8g0] (g0: per channel)"
        ) from None
    if key == "latency_ms" and any(parse_candidate(c)[1] is not None for c in candidates):
        raise ConfigError(
            f"quant.auto.candidates={cands!r}: a latency budget takes plain bit widths (its "
            "int8 kernels run every width alike), e.g. [4,8]; group sizes go with size_mb / "
            "match"
        )
    method = auto.get("method", "measure")
    if method not in METHODS:
        raise ConfigError(f"quant.auto.method={method!r} is invalid: allowed: {', '.join(METHODS)}")
    context = auto.get("context", "top")
    if context not in CONTEXTS:
        raise ConfigError(
            f"quant.auto.context={context!r} is invalid: allowed: {', '.join(CONTEXTS)}"
        )
    target, threads = _latency_options(key, budget)
    cost, unit = (value, None) if key == "match" else BUDGET_KEYS[key]
    return AutoOptions(
        candidates=candidates,
        batches=_positive_int("quant.auto.batches", auto.get("batches", 2)),
        method=method,
        seed=int(auto.get("seed", 0)),
        context=context,
        target=target,
        threads=threads,
        key=key,
        cost=cost,
        budget=None if unit is None else float(value) * unit,
    )


def _latency_options(key: str, budget: Mapping[str, Any]) -> tuple[str | None, int]:
    """``quant.budget.target`` / ``threads``: required with (and only with) ``latency_ms``."""
    target, threads = budget.get("target"), budget.get("threads")
    if key != "latency_ms":
        if target is not None:
            raise ConfigError(
                f"quant.budget.target={target!r} applies to a latency budget only: set "
                "quant.budget.latency_ms=<ms>, or drop target"
            )
        return None, 1
    if target not in LATENCY_TARGETS:
        raise ConfigError(
            f"quant.budget.latency_ms needs the export target it is measured on: set "
            f"quant.budget.target to one of {', '.join(LATENCY_TARGETS)} (got {target!r})"
        )
    return target, _positive_int("quant.budget.threads", 1 if threads is None else threads)


def _unit_value(opts: AutoOptions, cost: float) -> str:
    key = UNITS[opts.cost][0]
    return f"{key}={cost / BUDGET_KEYS[key][1]:.6g}"


def preset_cost(qmodel: nn.Module, cost: str, example: Any) -> float:
    """The size / BOPs of ``qmodel`` at the weight widths it was prepared with (the preset's
    uniform model), by the rule :func:`qat.allocate_bits` counts with (size: packed weights
    and their float32 scales)."""
    units = quant_units(qmodel)
    if cost == "size":
        return sum(
            packed_bytes(qmodel.get_submodule(n).weight.numel(), q[0].bits, q[0].scale.numel())
            for n, q in units.items()
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
    if opts.cost == "latency":
        if example is None:
            raise ConfigError(
                "quant.budget.latency_ms needs the data's input shape to export and time the "
                "model; budget size_mb instead"
            )
        return  # measured on the target when the run starts (qat.lit.quant_latency)
    try:
        check_groups(qmodel, units, opts.candidates)
    except ValueError as err:
        raise ConfigError(f"quant.auto.candidates: {err}") from None
    if opts.cost == "size":
        floor = sum(
            min(_size(qmodel.get_submodule(n).weight, q[0], c) for c in opts.candidates)
            for n, q in units.items()
        )
    else:
        low = min(parse_candidate(c)[0] for c in opts.candidates)
        macs = _macs(qmodel, list(units), example)
        floor = float(sum(m * low * low for m in macs.values()))
    budget = opts.budget if opts.budget is not None else preset_cost(qmodel, opts.cost, example)
    if budget < floor * (1 - 1e-9):
        raise ConfigError(
            f"quant.budget.{_unit_value(opts, budget)} is below the model with every layer "
            f"at its cheapest candidate ({_unit_value(opts, floor)}): raise it to at least that"
        )


def _size(weight: torch.Tensor, wq: Any, cand: Candidate) -> float:
    """Bytes of a layer's packed weights and scales at ``cand`` (qat.allocate_bits' rule)."""
    bits, group = parse_candidate(cand)
    return packed_bytes(weight.numel(), bits, scale_count(wq, weight, group))


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
    if opts.cost == "latency":
        return _choose_for_latency(opts, probe, recipe, datamodule, example, run_dir)
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
            context=opts.context,
        )
    if opts.budget is None:
        budget = preset_cost(probe, opts.cost, example)
        opts = dataclasses.replace(opts, budget=budget)
        log.info("quant=auto: budget %s, the preset's uniform model's", _unit_value(opts, budget))
    assert opts.budget is not None
    alloc = allocate_bits(sens, opts.budget, opts.cost)
    overrides = [plain_override(o) for o in recipe.to_dict()["overrides"]]
    overrides += alloc.overrides()
    chosen = Recipe.from_dict({**recipe.to_dict(), "overrides": overrides})
    run_dir.mkdir(parents=True, exist_ok=True)
    how = f"{opts.method} on {opts.batches} batches"
    spelled = _unit_value(opts, opts.budget), _unit_value(opts, alloc.total)
    write_overrides(run_dir / OVERRIDES_FILE, overrides, *spelled, how)
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


def _choose_for_latency(
    opts: AutoOptions,
    probe: nn.Module,
    recipe: Recipe,
    datamodule: Any,
    example: torch.Tensor,
    run_dir: Path,
) -> tuple[Recipe, dict[str, Any]]:
    """``latency_ms``: time the model exported at each width; every layer at the highest
    candidate when it meets the budget, else a one-line refusal (qat.lit.quant_latency)."""
    assert opts.target is not None and opts.budget is not None
    units = quant_units(probe)
    log.info(
        "quant=auto: timing the model exported to %s with every layer at %s bits",
        opts.target,
        "/".join(map(str, opts.candidates)),
    )
    batches = list(itertools.islice(_batches(datamodule, opts.seed), opts.batches))
    with torch.random.fork_rng():
        table = latency_table(probe, opts.candidates, batches, opts.target, example, opts.threads)
    for b in sorted(table, reverse=True):
        log.info("quant=auto: %s, %d bits: %.4g ms", opts.target, b, table[b])
    bits = check_latency(table, opts.budget, opts.target)
    alloc = Allocation(
        bits={n: bits for n in units},
        cost="latency",
        budget=opts.budget,
        total=table[bits],
        predicted_loss_delta=0.0,
        activation={n: len(q) > 1 for n, q in units.items()},
    )
    overrides = [plain_override(o) for o in recipe.to_dict()["overrides"]] + alloc.overrides()
    chosen = Recipe.from_dict({**recipe.to_dict(), "overrides": overrides})
    run_dir.mkdir(parents=True, exist_ok=True)
    how = f"timed on {opts.target}, 1 image, {opts.threads} thread(s)"
    spelled = _unit_value(opts, opts.budget), _unit_value(opts, alloc.total)
    write_overrides(run_dir / OVERRIDES_FILE, overrides, *spelled, how)
    measured = {
        "target": opts.target,
        "threads": opts.threads,
        "batch": 1,
        "budget_ms": opts.budget,
        "ms_by_bits": {str(b): table[b] for b in sorted(table)},
        "bits": bits,
        "rule": "int8 kernels run every width 2-8 alike: every layer at the highest candidate "
        "when the model at it meets the budget",
    }
    (run_dir / LATENCY_FILE).write_text(json.dumps(measured, indent=1) + "\n")
    macs = _macs(probe, list(units), example)
    report = {
        "budget_key": opts.key,
        "budget": opts.budget,
        "cost": "latency",
        "used": table[bits],
        "target": opts.target,
        "threads": opts.threads,
        "latency_ms_by_bits": measured["ms_by_bits"],
        "method": f"timed on {opts.target}; calibrated",
        "batches": opts.batches,
        "layers": [
            {
                "layer": n,
                "bits": bits,
                "weights": int(probe.get_submodule(n).weight.numel()),
                "macs": macs.get(n, 0),
                "cost": None,
                "loss_delta_chosen": 0.0,
            }
            for n in units
        ],
        "overrides_file": str(run_dir / OVERRIDES_FILE),
        "latency_file": str(run_dir / LATENCY_FILE),
    }
    for line in bits_table_lines(report):
        log.info("%s", line)
    return chosen, report
