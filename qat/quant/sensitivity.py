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

Candidates are bit widths, or bit widths with a weight group size for linear weights
(:mod:`qat.quant.candidates`); a grouped candidate replaces the unit's weight quantizer by one
on that grid while it is measured.

Each unit also records its weight count, its number of weight scales at each candidate, and its
multiply-accumulates per sample (from one forward), which :mod:`qat.quant.bit_allocation`
turns into size and BOPs costs.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qat.quant.calibrate import _default_forward, _model_device, _to_device, calibrate
from qat.quant.candidates import (
    Candidate,
    candidate_key,
    check_candidates,
    check_groups,
    grouped_quantizer,
    parse_candidate,
    precision_rank,
    scale_count,
)
from qat.quant.control import is_prepared
from qat.quant.layer_macs import layer_macs
from qat.quant.quantizer import FakeQuantizer

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
                loss_delta={candidate_key(k): float(v) for k, v in row["loss_delta"].items()},
                acc_delta={
                    candidate_key(k): float(v) for k, v in (row.get("acc_delta") or {}).items()
                },
                scales={candidate_key(k): int(v) for k, v in (row.get("scales") or {}).items()},
            )
            for row in data["layers"]
        ]
        return cls(
            candidates=tuple(candidate_key(b) for b in data["candidates"]),
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
        wq = copy.deepcopy(base) if group is None else grouped_quantizer(base, weight, bits, group)
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
        _raise_others(work, units, precision_rank(cands[-1])[0])
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
    top = max(states, key=precision_rank)
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
