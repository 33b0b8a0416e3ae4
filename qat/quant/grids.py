"""Which integer grid each tensor of a forward pass lies on, without tracing the model's code.

A layer's weights and output grid are its own, but its *input* grid belongs to whichever
quantizer produced the tensor flowing into it, and a module-swapped model's ``forward`` is
arbitrary Python. So :func:`trace_grids` runs one example batch (eval mode, observers untouched)
with forward hooks:

1. every enabled activation quantizer records its output tensor as *produced on its grid*;
2. grid-preserving modules (ReLU, max-pool, flatten, identity, dropout, ...) pass the grid of
   their input on to their output;
3. a view of a recorded tensor (``x.view``, ``torch.flatten``, ``reshape`` written inline in the
   forward) shares its storage, so it is found by storage;
4. anything else (e.g. a functional ``F.relu`` / ``F.max_pool2d`` in the forward) is matched by
   value: the most recently produced grid on which every element of the tensor lies exactly.

Whatever way a grid was found, the tensor's values are checked to lie on it. The exporters read
each layer's input grid from here (:mod:`qat.export.convert`), and so do :func:`qat.snap_bias`
and :func:`qat.link_bias_quantizers`.

Activation grids in the unsigned 8-bit container
------------------------------------------------
Both integer runtimes take u8 activations (the fast x86 path). Any per-tensor grid
``[qmin, qmax]`` with zero point ``z`` (signed, unsigned, 2–8 bits) is represented there exactly
by shifting it to ``[0, qmax − qmin]`` with zero point ``z − qmin``: the real values
``(q − z) · s`` are unchanged. A grid narrower than u8 (sub-8-bit) needs an integer clamp to its
upper level after each requantization; :class:`ActGrid` carries that range.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qat.quant.control import INPUT_QUANT
from qat.quant.layers import QUANT_MODULES
from qat.quant.quantizer import FakeQuantizer

#: Modules whose output lies on the grid of their input (they select or move values only).
GRID_PRESERVING: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.ZeroPad2d,
)

# Values on a grid satisfy x·(1/s) + z ∈ ℤ up to float32 error (|q − z| ≤ 255 → ≲ 1e-4).
_ON_GRID_TOL = 1e-2


@dataclass(frozen=True)
class ActGrid:
    """A per-tensor activation grid, expressed in the unsigned 8-bit container.

    Real value of a stored ``q`` is ``(q − zero_point) · scale``. ``qmin``/``qmax`` are the
    container levels the grid may use (``0..255`` at 8 bits, ``0..15`` at 4 bits).

    Attributes:
        scale: the quantizer's float32 scale (as a Python float, exactly representable).
        zero_point: zero point in the container (``z − qmin`` of the original grid).
        qmin: lowest container level (always 0).
        qmax: highest container level (``2^bits − 1``).
        bits: bit width of the original grid.
        signed: whether the original grid was signed (shifted by ``2^(bits−1)`` here).
        source: name of the quantizer that defines the grid.
    """

    scale: float
    zero_point: int
    qmin: int
    qmax: int
    bits: int
    signed: bool
    source: str

    @property
    def full_range(self) -> bool:
        """True when the grid fills u8, so saturation alone is its clamp."""
        return self.qmin == 0 and self.qmax == 255

    def clamp_levels(self, relu: bool = False) -> tuple[int, int]:
        """Container levels ``(lo, hi)`` an output on this grid is clamped to.

        ``relu(y)`` quantized equals ``max(quantize(y), zero_point)`` (rounding is monotone and
        maps 0 to 0), so a fused ReLU is an integer clamp at the zero point.
        """
        lo = max(self.qmin, self.zero_point) if relu else self.qmin
        return lo, self.qmax

    def needs_clamp(self, relu: bool = False) -> bool:
        """True when ``clamp_levels`` is narrower than what u8 saturation already gives."""
        return self.clamp_levels(relu) != (0, 255)

    def real_range(self, relu: bool = False) -> tuple[float, float]:
        """``clamp_levels`` as real values (for runtimes that clamp quantized tensors by value)."""
        lo, hi = self.clamp_levels(relu)
        return (lo - self.zero_point) * self.scale, (hi - self.zero_point) * self.scale

    def quantize(self, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
        """Reference quantization to container levels (uint8), as the fake quantizer rounds."""
        inv = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(self.scale, dtype=torch.float32)
        lo, hi = self.clamp_levels(relu)
        q = torch.round(x.float() * inv) + self.zero_point
        return q.clamp_(lo, hi).to(torch.uint8)

    def contains(self, x: torch.Tensor) -> bool:
        """True when every element of ``x`` lies exactly on this grid."""
        if not x.is_floating_point() or x.numel() == 0:
            return False
        v = x.detach().float() * (1.0 / self.scale) + self.zero_point
        if not bool(torch.isfinite(v).all()):
            return False
        r = torch.round(v)
        if float((v - r).abs().max()) > _ON_GRID_TOL:
            return False
        return self.qmin <= float(r.min()) and float(r.max()) <= self.qmax


def act_grid(name: str, quant: FakeQuantizer) -> ActGrid:
    """The container grid of an enabled per-tensor activation quantizer."""
    scale, zp = quant.qparams()
    qmin, qmax = quant.quant_range
    if qmax - qmin > 255:  # pragma: no cover - bits ≤ 8 guarantees this
        raise ValueError(f"quantizer {name}: grid [{qmin}, {qmax}] does not fit 8 bits")
    return ActGrid(
        scale=float(scale.float().reshape(-1)[0]),
        zero_point=int(zp.reshape(-1)[0]) - qmin,
        qmin=0,
        qmax=qmax - qmin,
        bits=quant.bits,
        signed=quant.signed,
        source=name,
    )


class _GridTracker:
    """Which grid each tensor of one forward pass lies on (see the module docstring)."""

    def __init__(self) -> None:
        self.by_id: dict[int, tuple[torch.Tensor, ActGrid]] = {}
        self.by_storage: dict[int, ActGrid] = {}
        self.recent: list[ActGrid] = []

    def record(self, t: Any, grid: ActGrid) -> None:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return
        # Keeping the tensor alive keeps its id and storage from being reused in this pass.
        self.by_id[id(t)] = (t, grid)
        self.by_storage[t.untyped_storage().data_ptr()] = grid
        if not self.recent or self.recent[-1] != grid:
            self.recent.append(grid)

    def lookup(self, t: Any) -> ActGrid | None:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return None
        hit = self.by_id.get(id(t))
        grid = hit[1] if hit is not None and hit[0] is t else None
        if grid is None:
            grid = self.by_storage.get(t.untyped_storage().data_ptr())
        if grid is not None:
            return grid if grid.contains(t) else None
        seen: set[ActGrid] = set()
        for cand in reversed(self.recent):
            if cand in seen:
                continue
            seen.add(cand)
            if cand.contains(t):
                return cand
        return None


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, list | tuple):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the example run (no observer moves a range); restores each module's flag."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def run_model(model: nn.Module, example_input: Any) -> Any:
    """``model(*example_input)`` for a tuple, ``model(**example_input)`` for a dict."""
    if isinstance(example_input, tuple):
        return model(*example_input)
    if isinstance(example_input, dict):
        return model(**example_input)
    return model(example_input)


@torch.no_grad()
def trace_grids(
    model: nn.Module, example_input: Any
) -> tuple[
    dict[str, list[tuple[tuple[ActGrid | None, ...], tuple[tuple[int, ...], ...]]]],
    ActGrid | None,
    ActGrid | None,
    Any,
]:
    """Run ``model`` once and record the input grids of every quantized layer.

    Returns:
        ``(calls, input_grid, output_grid, output)``: for every quantized layer called, one
        ``(input grids, input shapes)`` entry per call, in call order (dict order); the grid of
        the model input and of its output; the model output.
    """
    tracker = _GridTracker()
    calls: dict[str, list[tuple[tuple[ActGrid | None, ...], tuple[tuple[int, ...], ...]]]] = {}
    handles = []

    input_calls = [0]

    def quant_hook(name: str) -> Callable:
        def hook(mod: FakeQuantizer, args: tuple, out: Any) -> None:
            if name == INPUT_QUANT:
                input_calls[0] += 1
            static = mod.spec.dynamic == "none"  # a dynamic grid is each call's own
            if static and mod.enabled and bool(mod.fake_quant_enabled) and mod.is_initialized:
                tracker.record(out, act_grid(name, mod))

        return hook

    def passthrough_hook(mod: nn.Module, args: tuple, out: Any) -> None:
        grid = tracker.lookup(args[0]) if args else None
        if grid is not None and isinstance(out, torch.Tensor) and grid.contains(out):
            tracker.record(out, grid)

    def layer_pre_hook(name: str) -> Callable:
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            tensors = _tensors(args) + _tensors(kwargs)
            grids = tuple(tracker.lookup(t) for t in tensors)
            shapes = tuple(tuple(t.shape) for t in tensors)
            calls.setdefault(name, []).append((grids, shapes))

        return hook

    input_grid: list[ActGrid | None] = [None]
    for name, mod in model.named_modules():
        if isinstance(mod, FakeQuantizer) and mod.role == "activation":
            handles.append(mod.register_forward_hook(quant_hook(name)))
            if name == INPUT_QUANT and mod.enabled:
                input_grid[0] = act_grid(name, mod)
        elif type(mod) in GRID_PRESERVING:
            handles.append(mod.register_forward_hook(passthrough_hook))
        elif isinstance(mod, QUANT_MODULES):
            handles.append(mod.register_forward_pre_hook(layer_pre_hook(name), with_kwargs=True))
    try:
        with _eval_mode(model):
            out = run_model(model, example_input)
        outs = _tensors(out)
        output_grid = tracker.lookup(outs[0]) if outs else None
    finally:
        for h in handles:
            h.remove()
    if input_calls[0] > 1:
        raise ValueError(
            f"the model calls its input quantizer '{INPUT_QUANT}' {input_calls[0]} times: on an "
            "nn.Sequential root, prepare() registers it as the last child, so it also "
            "re-quantizes the model output with the input's grid. Wrap the Sequential in a "
            "module with its own forward before qat.prepare"
        )
    return calls, input_grid[0], output_grid, out
