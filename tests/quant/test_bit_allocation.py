"""qat.allocate_bits: the exact multiple-choice knapsack over measured loss changes."""

from __future__ import annotations

import itertools
import random

import pytest

from qat import allocate_bits
from qat.quant.bit_allocation import layer_cost, model_cost
from qat.quant.sensitivity import LayerSensitivity, Sensitivity


def _sens(seed: int, n: int = 6, cands: tuple[int, ...] = (2, 4, 8)) -> Sensitivity:
    rng = random.Random(seed)
    layers = []
    for i in range(n):
        deltas = {cands[-1]: 0.0}
        for b in reversed(cands[:-1]):  # lower width, larger loss (plus noise: not monotone)
            deltas[b] = deltas[min(c for c in cands if c > b)] + rng.uniform(-0.01, 0.5)
        layers.append(
            LayerSensitivity(
                f"l{i}", rng.randint(10, 500), rng.randint(100, 9000), i < n - 1, deltas
            )
        )
    return Sensitivity(cands, "measure", 1, 1.0, None, layers)


def _brute(sens: Sensitivity, budget: float, cost: str) -> float:
    best = float("inf")
    for combo in itertools.product(sens.candidates, repeat=len(sens.layers)):
        bits = {u.name: b for u, b in zip(sens.layers, combo, strict=True)}
        if model_cost(sens, bits, cost) <= budget:
            best = min(best, sum(u.loss_delta[bits[u.name]] for u in sens.layers))
    return best


@pytest.mark.parametrize("cost", ["size", "bops"])
@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force_and_keeps_the_budget(seed: int, cost: str) -> None:
    sens = _sens(seed)
    low = model_cost(sens, {u.name: 2 for u in sens.layers}, cost)
    high = model_cost(sens, {u.name: 8 for u in sens.layers}, cost)
    for frac in (0.0, 0.2, 0.5, 0.9):
        budget = low + frac * (high - low)
        alloc = allocate_bits(sens, budget, cost, steps=20000)
        assert alloc.total <= budget * (1 + 1e-12)
        assert alloc.total == pytest.approx(model_cost(sens, alloc.bits, cost))
        # Rounding costs up onto the grid may leave a sliver: at 20000 steps it is optimal here.
        assert alloc.predicted_loss_delta == pytest.approx(_brute(sens, budget, cost), abs=1e-9)


def test_generous_budget_keeps_every_layer_at_its_best_width() -> None:
    sens = _sens(7)
    alloc = allocate_bits(sens, 1e12, "size")
    for u in sens.layers:
        assert u.loss_delta[alloc.bits[u.name]] == min(u.loss_delta.values())


def test_budget_below_the_lowest_width_is_refused() -> None:
    sens = _sens(1)
    floor = model_cost(sens, {u.name: 2 for u in sens.layers}, "size")
    with pytest.raises(
        ValueError, match="below the model with every layer at its cheapest candidate"
    ):
        allocate_bits(sens, floor * 0.99, "size")
    alloc = allocate_bits(sens, floor, "size")  # exactly the floor: everything at 2
    assert set(alloc.bits.values()) == {2}
    with pytest.raises(ValueError, match="cost='latency' is invalid"):
        allocate_bits(sens, floor, "latency")


def test_overrides_are_plain_quant_overrides() -> None:
    sens = _sens(2, n=3)
    alloc = allocate_bits(sens, 1e9, "size")
    rows = alloc.overrides()
    assert [r["pattern"] for r in rows] == ["l0", "l1", "l2"]
    assert rows[0]["weight"] == {"bits": alloc.bits["l0"]}
    assert rows[0]["activation"] == {"bits": alloc.bits["l0"]}
    assert "activation" not in rows[2]  # its output is not quantized (float logits)
    assert layer_cost(sens.layers[0], 4, "size") == sens.layers[0].weights / 2
