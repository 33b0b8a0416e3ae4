"""How much each layer suffers at each bit width: the measurement mixed precision is chosen by.

:func:`sensitivity` takes a prepared, calibrated model and a few batches. A *unit* is one
conv / linear layer: its weight quantizer and its output quantizer, which take one bit width
together (a layer at 4 bits is W4A4 there). Units need no grouping in this project: a residual
add or a concat requantizes its inputs onto its own output grid (``QAdd`` / ``QCat``, the
runtimes' ``QLinearAdd`` / ``QLinearConcat``), so the layers that feed one may differ in width.

Two estimates:

- ``measure`` (the default): everything at the highest candidate, then each unit alone dropped
  to each lower candidate, with its ranges calibrated at that width; the change of the loss
  (and of top-1 accuracy, for classifiers) on the batches is the unit's cost.
- ``fisher``: the empirical Fisher estimate ``½ Σ E[g²] · (w − Q_b(w))²`` over each unit's
  quantized weight, from one backward pass per batch: one pass instead of one per unit and
  width, but it sees the weights' rounding only (not the activations').

The context (``context=``): by default every quantizer outside the units (a residual add's or
a pool's output, which carry no weights and are not allocated) is also raised to the highest
candidate, so each unit is measured alone against the model at full width. With
``context="preset"`` they keep the widths the model was prepared with: on MobileNetV2 at W2A2
its ten 2-bit residual adds alone took the "everything at 8 bits" reference from 91% to 63%
top-1, and every unit's cost was then measured on a model already 28 points down.

Candidates are bit widths (``4``: the layer keeps its preset's granularity) or bit widths with
a weight group size, ``"4g32"`` (one scale per 32 inputs of a row; ``"4g0"``: one per row,
per channel), for 2-D (linear) weights: a language model's layers can then also choose
between 4 bits in groups of 32, of 128, per channel, and 8 bits. A grouped candidate replaces
the unit's weight quantizer by one on that grid while it is measured.

Each unit also records its weight count, its number of weight scales at each candidate, and its
multiply-accumulates per sample (from one forward), which :mod:`qat.quant.bit_allocation`
turns into size and BOPs costs.
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qat.quant.calibrate import _default_forward, _model_device, _to_device, calibrate
from qat.quant.control import is_prepared
from qat.quant.layers.base import weight_quantizer
from qat.quant.quantizer import FakeQuantizer
from qat.quant.spec import GROUP_SIZES, QUANT_BITS

__all__ = [
    "CONTEXTS",
    "METHODS",
    "Candidate",
    "LayerSensitivity",
    "Sensitivity",
    "check_candidates",
    "check_groups",
    "layer_macs",
    "parse_candidate",
    "quant_units",
    "scale_count",
    "sensitivity",
]

METHODS = ("measure", "fisher")
#: What the quantizers outside the units (residual adds, pools) sit at while units are measured.
CONTEXTS = ("top", "preset")

LossFn = Callable[[nn.Module, Any], torch.Tensor]
#: A width a unit may take: bits (``4``), or bits and a weight group size (``"4g32"``).
Candidate = int | str
_GROUPED = re.compile(r"^([2-8])g(\d+)$")


@dataclass
class LayerSensitivity:
    """One unit: its name, size, work and the loss change at each candidate width.

    ``loss_delta[b]``: loss with this unit alone at candidate ``b`` minus the loss with every
    unit at the highest candidate (0 at the highest). ``acc_delta[b]``: the same for top-1
    accuracy in points (``measure`` on classifier batches only). ``scales[b]``: the number of
    weight scales at ``b`` (one per channel, or per group of a grouped candidate).
    """

    name: str
    weights: int
    macs: int
    activation: bool  # its output is quantized (and takes the unit's width)
    loss_delta: dict[Candidate, float]
    acc_delta: dict[Candidate, float] = field(default_factory=dict)
    scales: dict[Candidate, int] = field(default_factory=dict)


@dataclass
class Sensitivity:
    """The result of :func:`sensitivity`: one :class:`LayerSensitivity` per unit."""

    candidates: tuple[Candidate, ...]
    method: str
    batches: int
    reference_loss: float
    reference_acc: float | None
    layers: list[LayerSensitivity]
    context: str = "top"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Sensitivity:
        layers = [
            LayerSensitivity(
                name=row["name"],
                weights=int(row["weights"]),
                macs=int(row["macs"]),
                activation=bool(row["activation"]),
                loss_delta={_key(k): float(v) for k, v in row["loss_delta"].items()},
                acc_delta={_key(k): float(v) for k, v in (row.get("acc_delta") or {}).items()},
                scales={_key(k): int(v) for k, v in (row.get("scales") or {}).items()},
            )
            for row in data["layers"]
        ]
        return cls(
            candidates=tuple(_key(b) for b in data["candidates"]),
            method=str(data["method"]),
            batches=int(data["batches"]),
            reference_loss=float(data["reference_loss"]),
            reference_acc=None if data.get("reference_acc") is None else data["reference_acc"],
            layers=layers,
            context=str(data.get("context", "preset")),
        )


def quant_units(model: nn.Module) -> dict[str, list[FakeQuantizer]]:
    """``{layer name: [weight quantizer, output quantizer?]}`` of every conv / linear layer
    whose weight is quantized on the affine grid, in definition order. The output quantizer is
    listed where it quantizes (not for float logits or dynamic activations)."""
    units: dict[str, list[FakeQuantizer]] = {}
    for name, module in model.named_modules():
        wq = getattr(module, "weight_quant", None)
        if not isinstance(wq, FakeQuantizer) or not wq.spec.enabled or wq.spec.grid != "affine":
            continue
        if isinstance(module, nn.Embedding) or type(module).__name__.endswith("Embedding"):
            continue  # a lookup table: no multiply-accumulates, weight-only
        quants = [wq]
        oq = getattr(module, "output_quant", None)
        if isinstance(oq, FakeQuantizer) and oq.spec.enabled and oq.spec.dynamic == "none":
            quants.append(oq)
        units[name] = quants
    return units


def _key(c: Any) -> Candidate:
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


def _rank(c: Candidate) -> tuple[int, float]:
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
        c = _key(c.strip().lower()) if isinstance(c, str) else c
        try:
            bits, group = parse_candidate(c)
        except ValueError:
            raise fail from None
        if bits not in QUANT_BITS or (group is not None and group not in GROUP_SIZES):
            raise fail
        cands.append(c)
    unique = sorted(set(cands), key=_rank)
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


def _grouped(q: FakeQuantizer, weight: torch.Tensor, bits: int, group: int) -> FakeQuantizer:
    """A weight quantizer like ``q`` at ``bits`` with one scale per ``group`` inputs."""
    axis = _weight_axis(q)
    spec = q.spec.replace(bits=bits, group_size=group)
    new = weight_quantizer(spec, int(weight.shape[axis]), axis=axis, shape=tuple(weight.shape))
    new.name = q.name
    new.enable_observer(q.observer_enabled).enable_fake_quant(q.fake_quant_enabled)
    return new.to(weight.device).train(q.training)


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Cross-entropy of ``model(x)`` against ``y`` for ``(x, y)`` batches (logits ``[..., C]``
    against integer targets of the leading shape: classifiers and language models alike)."""
    if not isinstance(batch, list | tuple) or len(batch) < 2:
        raise ValueError(
            "sensitivity(): the default loss needs (input, target) batches; pass loss_fn= for "
            "other batches"
        )
    logits = _logits_of(_default_forward(model, batch))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[1].reshape(-1))


def _logits_of(out: Any) -> Any:
    return out.logits if hasattr(out, "logits") else out


class _Recorder:
    """Wraps a loss function to keep the top-1 count of the classifier batches it sees, from
    the forward the loss ran (one forward per batch for both)."""

    def __init__(self, loss_fn: LossFn) -> None:
        self.loss_fn = loss_fn
        self.correct, self.count = 0.0, 0

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        seen: list[Any] = []
        hook = model.register_forward_hook(lambda _m, _i, out: seen.append(out))
        try:
            loss = self.loss_fn(model, batch)
        finally:
            hook.remove()
        target = batch[1] if isinstance(batch, list | tuple) and len(batch) > 1 else None
        logits = _logits_of(seen[-1]) if seen else None
        if (
            isinstance(target, torch.Tensor)
            and target.dim() == 1
            and isinstance(logits, torch.Tensor)
            and logits.dim() == 2
            and logits.shape[0] == target.shape[0]
        ):
            self.correct += float((logits.argmax(1) == target).sum())
            self.count += int(target.numel())
        return loss


def layer_macs(
    model: nn.Module, names: Sequence[str], batch: Any, forward_fn: Any
) -> dict[str, int]:
    """Multiply-accumulates per sample of each named layer, from one forward of ``batch``:
    weight elements × output positions (conv: output pixels; linear: tokens)."""
    macs: dict[str, int] = {}
    hooks = []
    for name in names:
        module = model.get_submodule(name)

        def hook(mod: nn.Module, _inp: Any, out: Any, name: str = name) -> None:
            if isinstance(out, torch.Tensor) and out.dim() >= 1:
                per_sample = out[0].numel() if out.dim() > 1 else out.numel()
                channels = max(int(mod.weight.shape[0]), 1)
                macs[name] = int(mod.weight.numel() * max(per_sample // channels, 1))

        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            (forward_fn or _default_forward)(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return macs


def _raise_others(
    model: nn.Module, units: Mapping[str, list[FakeQuantizer]], top: int
) -> list[FakeQuantizer]:
    """Raise the static affine quantizers outside ``units`` (residual adds, pools, ...) that
    sit below ``top`` bits to ``top``, their ranges to be observed anew; the raised ones."""
    inside = {id(q) for quants in units.values() for q in quants}
    raised = []
    for module in model.modules():
        if not isinstance(module, FakeQuantizer) or id(module) in inside:
            continue
        spec = module.spec
        if not spec.enabled or spec.grid != "affine" or spec.dynamic != "none":
            continue
        if module.bits < top:
            module.set_bits(top)
            module.reset_observer()
            raised.append(module)
    return raised


#: One unit at one candidate: its weight quantizer (a module of its own, calibrated at the
#: candidate) and the state of its output quantizer (the same module at every width).
_UnitState = tuple[FakeQuantizer, list[dict[str, torch.Tensor]]]


def _swap_weight_quant(model: nn.Module, old: FakeQuantizer, new: FakeQuantizer) -> None:
    """Every layer quantizing its weight with ``old`` (twins share one) takes ``new``."""
    if new is old:
        return
    for module in model.modules():
        if getattr(module, "weight_quant", None) is old:
            module.weight_quant = new


def _restore(
    model: nn.Module, units: dict[str, list[FakeQuantizer]], name: str, state: _UnitState
) -> None:
    """Put unit ``name`` at a candidate's calibrated state."""
    wq, out_states = state
    _swap_weight_quant(model, units[name][0], wq)
    units[name][0] = wq
    for q, st in zip(units[name][1:], out_states, strict=True):
        q.load_state_dict(st)


def _states_at(
    model: nn.Module,
    units: dict[str, list[FakeQuantizer]],
    preset: Mapping[str, FakeQuantizer],
    cand: Candidate,
    batches: list[Any],
    forward_fn: Any,
) -> dict[str, _UnitState]:
    """Every unit calibrated at ``cand``: its weight quantizer a copy of the preset's (or one
    on the candidate's groups). Calibration observes with fake quantization off, so each range
    depends on the float activations only, and every unit can be calibrated at once."""
    bits, group = parse_candidate(cand)
    for name, quants in units.items():
        weight = model.get_submodule(name).weight
        base = preset[name]
        wq = copy.deepcopy(base) if group is None else _grouped(base, weight, bits, group)
        _swap_weight_quant(model, quants[0], wq)
        quants[0] = wq
        for q in quants:
            q.set_bits(bits)
            q.reset_observer()
    calibrate(model, batches, forward_fn=forward_fn)
    return {
        name: (
            quants[0],
            [{k: v.detach().clone() for k, v in q.state_dict().items()} for q in quants[1:]],
        )
        for name, quants in units.items()
    }


def _evaluate(
    model: nn.Module, batches: list[Any], loss_fn: LossFn, classify: bool
) -> tuple[float, float | None]:
    """Mean loss over ``batches``, and top-1 accuracy in % for classifier batches."""
    rec = _Recorder(loss_fn)
    with torch.no_grad():
        total = sum(float(rec(model, batch)) for batch in batches)
    acc = 100.0 * rec.correct / rec.count if classify and rec.count else None
    return total / len(batches), acc


def sensitivity(
    model: nn.Module,
    data: Iterable[Any],
    candidates: Sequence[int] = (2, 4, 8),
    num_batches: int = 4,
    method: str = "measure",
    loss_fn: LossFn | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    context: str = "top",
) -> Sensitivity:
    """Per-unit loss change at each candidate width (see the module docstring).

    Args:
        model: a prepared model (calibrated or not: it is calibrated anew on ``data``); it is
            not changed (the measurement runs on a copy).
        data: batches: ``(x, y)`` tuples for the default loss, else what ``loss_fn`` reads.
        candidates: bit widths a unit may take (two or more of 2–8).
        num_batches: batches of ``data`` used (the same ones for every measurement).
        method: ``measure`` or ``fisher``.
        loss_fn: ``loss_fn(model, batch) -> scalar``; default cross-entropy of ``(x, y)``.
        forward_fn: ``forward_fn(model, batch)`` for calibration and the MAC count.
        context: ``top``: the quantizers outside the units (residual adds, pools) at the
            highest candidate too while measuring; ``preset``: at the model's own widths.

    Returns:
        A :class:`Sensitivity`, one row per unit in definition order.
    """
    if not is_prepared(model):
        raise ValueError("sensitivity() needs a prepared model: call qat.prepare(model, recipe)")
    if method not in METHODS:
        raise ValueError(f"method={method!r} is invalid: allowed: {', '.join(METHODS)}")
    cands = check_candidates(candidates)
    if context not in CONTEXTS:
        raise ValueError(f"context={context!r} is invalid: allowed: {', '.join(CONTEXTS)}")
    if num_batches < 1:
        raise ValueError(f"num_batches={num_batches} is invalid: expected ≥ 1")
    device = _model_device(model)
    batches = [_to_device(b, device) for b in itertools.islice(data, num_batches)]
    if not batches:
        raise ValueError("sensitivity() got no batches: pass an iterable with at least one")
    loss_fn = loss_fn or default_loss
    work = copy.deepcopy(model)
    work.eval()
    units = quant_units(work)
    if not units:
        raise ValueError(
            "sensitivity(): the model has no conv / linear layer with quantized weights"
        )
    check_groups(work, units, cands)
    macs = layer_macs(work, list(units), batches[0], forward_fn)
    if context == "top":
        _raise_others(work, units, _rank(cands[-1])[0])
    preset = {name: quants[0] for name, quants in units.items()}
    states = {c: _states_at(work, units, preset, c, batches, forward_fn) for c in cands}
    top = cands[-1]
    for name in units:
        _restore(work, units, name, states[top][name])
    classify = method == "measure"
    ref_loss, ref_acc = _evaluate(work, batches, loss_fn, classify)
    if method == "fisher":
        deltas = _fisher(work, units, states, batches, loss_fn)
        accs: dict[str, dict[Candidate, float]] = {n: {} for n in units}
    else:
        deltas, accs = {}, {}
        for name in units:
            deltas[name], accs[name] = {top: 0.0}, ({top: 0.0} if ref_acc is not None else {})
            for c in cands[:-1]:
                _restore(work, units, name, states[c][name])
                loss, acc = _evaluate(work, batches, loss_fn, classify)
                deltas[name][c] = loss - ref_loss
                if acc is not None and ref_acc is not None:
                    accs[name][c] = acc - ref_acc
            _restore(work, units, name, states[top][name])
    layers = [
        LayerSensitivity(
            name=name,
            weights=int(work.get_submodule(name).weight.numel()),
            macs=macs.get(name, 0),
            activation=len(quants) > 1,
            loss_delta=deltas[name],
            acc_delta=accs[name],
            scales={c: int(states[c][name][0].scale.numel()) for c in cands},
        )
        for name, quants in units.items()
    ]
    return Sensitivity(cands, method, len(batches), ref_loss, ref_acc, layers, context)


def _fisher(
    model: nn.Module,
    units: dict[str, list[FakeQuantizer]],
    states: Mapping[Candidate, Mapping[str, _UnitState]],
    batches: list[Any],
    loss_fn: LossFn,
) -> dict[str, dict[Candidate, float]]:
    """``½ Σ E[g²] (w − Q_b(w))²`` per unit: ``g`` the loss gradient at the quantized weight
    (everything at the highest width), ``w`` the weight the quantizer sees (the BN-folded one
    for a conv+BN)."""
    seen: dict[str, torch.Tensor] = {}
    sq: dict[str, torch.Tensor] = {}
    hooks = []
    for name, quants in units.items():

        def hook(_mod: nn.Module, inp: Any, out: torch.Tensor, name: str = name) -> None:
            seen[name] = inp[0].detach()
            if out.requires_grad:

                def acc(g: torch.Tensor, name: str = name) -> None:
                    sq[name] = sq.get(name, 0) + g.detach().float() ** 2

                out.register_hook(acc)

        hooks.append(quants[0].register_forward_hook(hook))
    grads = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(True)
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
    finally:
        for h in hooks:
            h.remove()
        for p, r in grads.items():
            p.requires_grad_(r)
        model.zero_grad(set_to_none=True)
    top = max(states, key=_rank)
    out: dict[str, dict[Candidate, float]] = {}
    for name in units:
        w, fisher = seen[name], sq.get(name)
        out[name] = {}
        for c in states:
            if fisher is None or c == top:
                out[name][c] = 0.0
                continue
            wq = states[c][name][0]
            with torch.no_grad():
                err = (w - wq(w)).float() ** 2
            out[name][c] = float(0.5 * (fisher / len(batches) * err).sum())
    return out
