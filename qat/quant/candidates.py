"""Candidate widths of mixed precision, validated, ordered by precision, and what a layer's
weight quantizer becomes at one (:mod:`qat.quant.sensitivity` measures them,
:mod:`qat.quant.bit_allocation` chooses among them).

A candidate is a bit width (``4``: the layer keeps its preset's granularity) or a bit width with
a weight group size, ``"4g32"`` (one scale per 32 inputs of a row; ``"4g0"``: one per row, per
channel), for 2-D (linear) weights: a language model's layers can then choose between 4 bits in
groups of 32, of 128, per channel, and 8 bits.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from qat.quant.layers.base import weight_quantizer
from qat.quant.quantizer import FakeQuantizer
from qat.quant.spec import GROUP_SIZES, QUANT_BITS

__all__ = [
    "Candidate",
    "candidate_key",
    "check_candidates",
    "check_groups",
    "grouped_quantizer",
    "parse_candidate",
    "precision_rank",
    "scale_count",
]

#: A width a unit may take: bits (``4``), or bits and a weight group size (``"4g32"``).
Candidate = int | str
_GROUPED = re.compile(r"^([2-8])g(\d+)$")


def candidate_key(c: Any) -> Candidate:
    """A candidate as JSON keys spell it (``"4"``, ``"4g32"``) → its own form (4, "4g32")."""
    return int(c) if isinstance(c, str) and c.isdigit() else c


def parse_candidate(c: Candidate) -> tuple[int, int | None]:
    """``(bits, group size)`` of a candidate; the group is None for plain bits (the layer's
    preset granularity), 0 for per channel."""
    if isinstance(c, int) and not isinstance(c, bool):
        return c, None
    m = _GROUPED.match(str(c))
    if not m:
        raise ValueError(f"candidate {c!r} is invalid: write bits (4) or bits g group ('4g32')")
    return int(m.group(1)), int(m.group(2))


def precision_rank(c: Candidate) -> tuple[int, float]:
    """Order of precision: bits first, then finer groups (a plain width is the coarsest)."""
    bits, group = parse_candidate(c)
    return bits, (-1.0 if group is None else (0.0 if group == 0 else 1.0 / group))


def check_candidates(candidates: Sequence[Any]) -> tuple[Candidate, ...]:
    """The candidates, validated, deduplicated and sorted from the least precise to the most.

    Raises:
        ValueError: fewer than two, a width outside 2–8, a group size not in GROUP_SIZES.
    """
    fail = ValueError(
        f"candidates={list(candidates)} is invalid: give two or more widths from "
        f"{', '.join(map(str, QUANT_BITS))}, each optionally with a weight group size from "
        f"{', '.join(map(str, GROUP_SIZES))} ('4g32'; 'g0': per channel), e.g. [2, 4, 8] or "
        "['4g32', '4g128', '4g0', '8g0']"
    )
    cands: list[Candidate] = []
    for c in candidates:
        c = candidate_key(c.strip().lower()) if isinstance(c, str) else c
        try:
            bits, group = parse_candidate(c)
        except ValueError:
            raise fail from None
        if bits not in QUANT_BITS or (group is not None and group not in GROUP_SIZES):
            raise fail
        cands.append(c)
    unique = sorted(set(cands), key=precision_rank)
    if len(unique) < 2:
        raise fail
    return tuple(unique)


def _weight_axis(q: FakeQuantizer) -> int:
    """The channel (output) axis of the weight ``q`` quantizes."""
    return 1 - q.group_axis if q.spec.group_size else q.axis


def scale_count(q: FakeQuantizer, weight: torch.Tensor, group: int | None) -> int:
    """Weight scales of a layer at a candidate's ``group`` (None: as ``q`` is prepared)."""
    if group is None:
        return int(q.scale.numel())
    if group == 0:
        return int(weight.shape[_weight_axis(q)])
    return int(weight.numel() // group)


def check_groups(
    model: nn.Module, units: Mapping[str, list[FakeQuantizer]], candidates: Sequence[Candidate]
) -> None:
    """Refuse a grouped candidate a unit cannot take (before any measurement).

    Raises:
        ValueError: a unit whose weight is not 2-D or not per channel, or whose input size the
            candidate's group size does not divide; the message names both.
    """
    for c in candidates:
        group = parse_candidate(c)[1]
        if group is None:
            continue
        for name, quants in units.items():
            weight = model.get_submodule(name).weight
            q = quants[0]
            if weight.dim() != 2 or not q.spec.per_channel:
                raise ValueError(
                    f"candidate '{c}': layer '{name}' (weight {tuple(weight.shape)}"
                    f"{'' if q.spec.per_channel else ', per tensor'}) takes no weight groups: "
                    "groups apply to per-channel linear weights; use plain widths for this model"
                )
            inputs = int(weight.shape[1 - _weight_axis(q)])
            if group and inputs % group:
                raise ValueError(
                    f"candidate '{c}': group size {group} does not divide the input size "
                    f"{inputs} of layer '{name}': use a group size that divides every layer's "
                    "input size"
                )


def grouped_quantizer(
    q: FakeQuantizer, weight: torch.Tensor, bits: int, group: int
) -> FakeQuantizer:
    """A weight quantizer like ``q`` at ``bits`` with one scale per ``group`` inputs."""
    axis = _weight_axis(q)
    spec = q.spec.replace(bits=bits, group_size=group)
    new = weight_quantizer(spec, int(weight.shape[axis]), axis=axis, shape=tuple(weight.shape))
    new.name = q.name
    new.enable_observer(q.observer_enabled).enable_fake_quant(q.fake_quant_enabled)
    return new.to(weight.device).train(q.training)
