"""Per-layer bit widths that minimize the measured loss under a budget.

:func:`allocate_bits` solves the multiple-choice knapsack exactly on a discretized budget: each
unit of a :class:`~qat.quant.sensitivity.Sensitivity` takes one candidate width, the summed
loss changes are minimized, and the summed cost stays within the budget. Costs are rounded
*up* onto the grid, so the answer never exceeds the budget (it may leave a sliver unused).

Costs (one per call):

- ``size``: bytes of the packed integer weights of the allocated layers and their float32
  scales, ``weights × bits / 8 + 4 × scales`` (one scale per channel, or per group of a grouped
  candidate such as ``"4g32"``: groups of 32 add an eighth of a byte per weight); biases, the
  input quantizer and float parts are the same whatever the widths, and not counted. The
  exported ONNX / TorchScript files store sub-8-bit values in int8 containers, so this is the
  size a packed format (or a GGUF-style block file) would take, not the file's.
- ``bops``: bit operations ``MACs × bits × bits`` per sample (HAWQ-V3's measure), the unit's
  weights and its input taken at the unit's width. The input's real width is its producer's
  (an approximation: the exact count needs the graph).

The result is ordinary ``quant.overrides`` (:meth:`Allocation.overrides`): one per layer,
exact name as the pattern, weight and (where quantized) output at the chosen width, and the
weight's ``group_size`` where the chosen candidate sets one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from qat.quant.sensitivity import Candidate, LayerSensitivity, Sensitivity, parse_candidate

__all__ = [
    "COSTS",
    "SCALE_BYTES",
    "Allocation",
    "allocate_bits",
    "layer_cost",
    "model_cost",
    "packed_bytes",
]

COSTS = ("size", "bops")
#: Bytes a weight scale takes in the size cost (float32, as the exported files store them).
SCALE_BYTES = 4


def packed_bytes(weights: int, bits: int, scales: int) -> float:
    """The ``size`` cost: ``weights`` packed at ``bits`` and ``scales`` float32 scales."""
    return weights * bits / 8.0 + SCALE_BYTES * scales


def layer_cost(layer: LayerSensitivity, cand: Candidate, cost: str) -> float:
    """``layer``'s cost at a candidate: bytes (``size``) or bit operations (``bops``)."""
    bits = parse_candidate(cand)[0]
    if cost == "size":
        return packed_bytes(layer.weights, bits, layer.scales.get(cand, 0))
    if cost == "bops":
        return float(layer.macs) * bits * bits
    raise ValueError(f"cost={cost!r} is invalid: allowed: {', '.join(COSTS)}")


def model_cost(sens: Sensitivity, bits: Mapping[str, Candidate], cost: str) -> float:
    """The summed cost of every unit at ``bits[name]``."""
    return sum(layer_cost(layer, bits[layer.name], cost) for layer in sens.layers)


def uniform_bits(sens: Sensitivity, bits: int, keep: Mapping[str, int] | None = None) -> dict:
    """Every unit at ``bits``, except ``keep``'s (e.g. the first and last layers at 8)."""
    return {layer.name: (keep or {}).get(layer.name, bits) for layer in sens.layers}


@dataclass
class Allocation:
    """The chosen width of each unit, what it costs, and the loss change it predicts."""

    bits: dict[str, Candidate]
    cost: str
    budget: float
    total: float
    predicted_loss_delta: float
    activation: dict[str, bool]

    def overrides(self) -> list[dict[str, Any]]:
        """``quant.overrides`` entries: one per layer, weight (and output) at its width, the
        weight's group size where the candidate sets one."""
        rows = []
        for name, cand in self.bits.items():
            b, group = parse_candidate(cand)
            weight: dict[str, Any] = {"bits": b}
            if group is not None:
                weight["group_size"] = group
            row: dict[str, Any] = {"pattern": name, "weight": weight}
            if self.activation.get(name):
                row["activation"] = {"bits": b}
            rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "cost": self.cost,
            "budget": self.budget,
            "total": self.total,
            "predicted_loss_delta": self.predicted_loss_delta,
            "bits": dict(self.bits),
        }


def allocate_bits(
    sens: Sensitivity, budget: float, cost: str = "size", steps: int = 100_000
) -> Allocation:
    """The widths minimizing the summed ``loss_delta`` with the summed ``cost`` ≤ ``budget``.

    Args:
        sens: per-unit loss changes and sizes (:func:`qat.quant.sensitivity.sensitivity`).
        budget: bytes for ``size``, bit operations per sample for ``bops``.
        cost: ``size`` or ``bops``.
        steps: grid points between the all-lowest-width cost and the budget. Each layer's
            cost is rounded up onto the grid, so up to one step per layer goes unused: at
            4,000 steps ResNet-20's W4A4-size budget (22 layers) lost 370 of its bytes that
            way, more than a small layer needs to go from 4 to 8 bits.

    Raises:
        ValueError: an unknown cost, or a budget below every unit at its lowest width.
    """
    if cost not in COSTS:
        raise ValueError(f"cost={cost!r} is invalid: allowed: {', '.join(COSTS)}")
    if not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"budget={budget!r} is invalid: expected a positive number")
    cands = sens.candidates
    layers = sens.layers
    costs = np.array([[layer_cost(u, b, cost) for b in cands] for u in layers], dtype=np.float64)
    loss = np.array([[u.loss_delta[b] for b in cands] for u in layers], dtype=np.float64)
    floor = float(costs.min(axis=1).sum())
    if budget < floor * (1 - 1e-9):
        raise ValueError(
            f"budget {budget:.6g} ({cost}) is below the model with every layer at its cheapest "
            f"candidate ({floor:.6g}): raise it to at least that"
        )
    spare = budget - floor
    extra = costs - costs.min(axis=1, keepdims=True)
    if spare <= 0:
        weight = np.where(extra > 0, steps + 1, 0)
    else:
        # Rounded up: the discretized answer never exceeds the budget.
        weight = np.ceil(extra / (spare / steps) - 1e-9).astype(np.int64)
    n = steps + 1
    dp = np.zeros(n)
    choice = np.zeros((len(layers), n), dtype=np.int16)  # candidate indices
    for i in range(len(layers)):
        new = np.full(n, np.inf)
        pick = np.zeros(n, dtype=np.int16)
        # Highest width first: on a tie (equal measured loss) the wider one is kept.
        for j in reversed(range(len(cands))):
            w = int(weight[i, j])
            if w >= n:
                continue
            cand = np.full(n, np.inf)
            cand[w:] = dp[: n - w] + loss[i, j]
            better = cand < new
            new[better], pick[better] = cand[better], j
        dp, choice[i] = new, pick
    c = n - 1
    chosen = [0] * len(layers)
    for i in reversed(range(len(layers))):
        chosen[i] = int(choice[i, c])
        c -= int(weight[i, chosen[i]])
    bits = {u.name: cands[j] for u, j in zip(layers, chosen, strict=True)}
    return Allocation(
        bits=bits,
        cost=cost,
        budget=float(budget),
        total=float(sum(costs[i, j] for i, j in enumerate(chosen))),
        predicted_loss_delta=float(sum(loss[i, j] for i, j in enumerate(chosen))),
        activation={u.name: u.activation for u in layers},
    )
