"""Fake quantizers: observer + fake quantization with a straight-through estimator.

One :class:`FakeQuantizer` serves training and export. Its whole state (scale, zero point, bit
width, observer statistics, mode flags, learned range) is in its ``state_dict``, which
round-trips exactly, so the exporters read the very numbers training used. The bit width and
mode flags are Python attributes saved as tensors (:mod:`qat.quant.py_state`): the forward
branches on them without a graph break under ``torch.compile``.

Numerics (see DESIGN.md, "The numerics contract"): ``q = clamp(round(x * (1/s)) + z, qmin, qmax)``,
``x̂ = (q − z) · s``, round half to even. Like torch's kernels and its quantized CPU runtime, the
division is a multiplication by the float32 reciprocal ``1/s``; the two differ only at exact ties.
The hot path is :mod:`qat.fake_quant` (vectorized STE autograd functions, bitwise equal to
torch's fused fake-quant kernels and much faster on CPU), never per-element Python. Groups,
dynamic scales and GGUF grids: :mod:`qat.quant.blocks`, :mod:`qat.quant.dynamic`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qat.quant import fused_observer
from qat.quant.blocks import gguf_fake_quantize, gguf_scale, group_view, ungroup
from qat.quant.distributed import is_distributed, rank_phrase, reduce_across_ranks
from qat.quant.dynamic import dynamic_fake_quantize
from qat.quant.fake_quant import compiled_relu, fake_quantize
from qat.quant.kquants import KQUANT_GRIDS, kquant_fake_quantize
from qat.quant.lsq import lsq_fake_quantize
from qat.quant.py_state import PyStateDict
from qat.quant.qparams import SCALE_EPS, guard_scale, qparams_from_range, qrange
from qat.quant.ranges import (
    all_finite,
    cap_lsq_scale,
    finite_range,
    mse_range,
    percentile_range,
)
from qat.quant.spec import QuantSpec

ROLES = ("weight", "activation")
#: The integer codes of GGUF's block grids (signed, after Q4_0's offset of 8).
GGUF_RANGES = {"q8_0": (-127, 127), "q4_0": (-8, 7), "q4_k": (0, 15), "q6_k": (-32, 31)}


class NonFiniteError(FloatingPointError):
    """NaN or inf reached a quantizer: training has diverged at (or before) the named layer."""


class FakeQuantizer(PyStateDict, nn.Module):
    """Observer + fake quantizer for one tensor, configured by a :class:`QuantSpec`.

    Modes (two flags, Python bools): ``observer_enabled`` updates the range from data (in
    training mode only, so validation never moves a range);
    ``fake_quant_enabled`` quantizes the output. Both off is float; observe-only is
    calibration; both on is QAT with live ranges; quantize-only is QAT with frozen ranges. A
    quantizer that has never observed data (``initialized`` False) passes its input through.
    Set the flags with :meth:`enable_observer`, :meth:`enable_fake_quant` and :meth:`set_bits`.

    Learned ranges: ``lsq`` makes ``scale`` (and, when asymmetric, ``zero_point``) parameters
    trained with LSQ's gradient (scale gradient multiplied by ``1/sqrt(N·qmax)``); ``pact``
    learns a clip ``alpha`` (``[0, α]`` unsigned, ``[−α, α]`` signed) with scale ``α/qmax``.
    While the observer is on, learned ranges are (re)initialised from the observed range, so
    calibration sets their start value; switch observers off before training them. An LSQ
    scale is also re-initialised from data after :meth:`set_bits` lowers or raises its width,
    and in training it never exceeds the batch's min/max scale.

    Args:
        spec: what to quantize and how.
        role: ``"weight"`` (observer looks at the current tensor only) or ``"activation"``.
        channels: number of channels for per-channel specs (1 otherwise).
        axis: channel axis for per-channel specs.
        group_axis: with ``spec.group_size``, the axis of the 2-D weight the groups run
            along (its input dimension); ``channels`` is then the number of groups and the
            quantizer works per channel on :func:`~qat.quant.blocks.group_view`.
    """

    #: Saved under the keys and dtypes of the buffers these once were (old checkpoints load).
    PY_STATE = (
        ("bit_width", "_bits", torch.int64),
        ("observer_enabled", "observer_enabled", torch.uint8),
        ("fake_quant_enabled", "fake_quant_enabled", torch.uint8),
        ("initialized", "initialized", torch.uint8),
    )

    def __init__(
        self,
        spec: QuantSpec,
        role: str = "activation",
        channels: int = 1,
        axis: int = 0,
        group_axis: int = 1,
    ):
        super().__init__()
        if role not in ROLES:
            raise ValueError(f"FakeQuantizer role={role!r} is invalid: allowed: {', '.join(ROLES)}")
        if spec.per_channel and channels < 1:
            raise ValueError(f"FakeQuantizer channels={channels} is invalid: per-channel needs ≥ 1")
        self.spec = spec
        self.role = role
        # Groups are the channels (axis 0) of the grouped view.
        self.axis = 0 if spec.group_size else axis
        self.group_axis = group_axis
        #: Qualified name in the model, set by qat.prepare (for error messages; not state).
        self.name = ""
        n = channels if spec.per_channel else 1
        self._bits = int(spec.bits)
        self.observer_enabled = True
        self.fake_quant_enabled = True
        # No range to observe for dynamic specs: each call brings its own.
        self.initialized = spec.dynamic != "none"
        self.register_buffer("min_val", torch.zeros(n))
        self.register_buffer("max_val", torch.zeros(n))
        if spec.learned == "lsq":
            self.scale = nn.Parameter(torch.ones(n))
            if spec.symmetric:
                self.register_buffer("zero_point", torch.zeros(n, dtype=torch.int32))
            else:
                # LSQ+ style learned offset; rounded to an integer in the kernel and at export.
                self.zero_point = nn.Parameter(torch.zeros(n))
        else:
            self.register_buffer("scale", torch.ones(n))
            self.register_buffer("zero_point", torch.zeros(n, dtype=torch.int32))
        if spec.learned == "pact":
            self.alpha = nn.Parameter(torch.ones(1))
        # Set when the bit width of an initialised LSQ scale changes: the next training forward
        # re-initialises it from that batch (not state: a resume re-sets the bits anyway).
        self._reinit_pending = False

    # ------------------------------------------------------------------ introspection
    @property
    def bits(self) -> int:
        return self._bits

    @property
    def enabled(self) -> bool:
        """False while the bit width is a float width (16 / 32)."""
        return self.bits <= 8

    @property
    def signed(self) -> bool:
        return self.spec.signed

    @property
    def per_channel(self) -> bool:
        return self.spec.per_channel

    @property
    def learned(self) -> str:
        return self.spec.learned

    @property
    def quant_range(self) -> tuple[int, int]:
        if self.spec.grid != "affine":
            return GGUF_RANGES[self.spec.grid]
        return qrange(self.bits, self.spec.signed, self.spec.narrow_range, self.spec.reduce_range)

    @property
    def is_initialized(self) -> bool:
        return self.initialized

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact ``(scale float32, zero_point int32)`` the forward pass uses, detached."""
        with torch.no_grad():
            scale, zero_point = self._effective_qparams(self.bits)
            qmin, qmax = self.quant_range
            zp = torch.round(zero_point.float()).clamp(qmin, qmax).to(torch.int32)
            return scale.detach().clone(), zp

    def extra_repr(self) -> str:
        s = self.spec
        kind = "per-channel" if s.per_channel else "per-tensor"
        sign = "signed" if s.signed else "unsigned"
        sym = "symmetric" if s.symmetric else "asymmetric"
        return (
            f"{self.role}, bits={self.bits}, {sign}, {sym}, {kind}, "
            f"range={s.range_method}, learned={s.learned}"
            + (", reduce_range" if s.reduce_range and self.bits >= 8 else "")
        )

    # ------------------------------------------------------------------ mode switches
    def enable_observer(self, enabled: bool = True) -> FakeQuantizer:
        self.observer_enabled = bool(enabled)
        return self

    def enable_fake_quant(self, enabled: bool = True) -> FakeQuantizer:
        self.fake_quant_enabled = bool(enabled)
        return self

    def set_bits(self, bits: int) -> None:
        """Change the bit width in place, keeping every parameter object (and optimizer state).

        Observed ranges are re-expressed on the new grid; PACT's clip is bit-width free. A
        learned LSQ scale keeps its clip range (scale × old levels / new levels) until the next
        training forward, which re-initialises it from that batch with the spec's range method:
        the clip range that suits 8 bits rounds most values to zero at 2 or 3 bits (ResNet-20
        annealed 8 → 2 that way fell to chance accuracy).
        """
        if (
            isinstance(bits, bool)
            or not isinstance(bits, int)
            or not (2 <= bits <= 8 or bits in (16, 32))
        ):
            raise ValueError(f"bits={bits!r} is invalid: allowed: 2–8, or 16/32 for float")
        if self.spec.grid != "affine" and bits not in (self.spec.bits, 16, 32):
            raise ValueError(
                f"quantizer '{self.name}': the {self.spec.grid} grid has {self.spec.bits} bits, "
                "no annealing (set schedule.weight_anneal.epochs=0 / act_anneal.epochs=0)"
            )
        old = self.bits
        if bits == old:
            return
        self._bits = bits
        if bits > 8 or old > 8 or not self.is_initialized:
            # Back from float: observed ranges are re-expressed; learned ones are kept as trained.
            if bits <= 8 and self.is_initialized and self.learned == "none":
                self._update_qparams_from_stats()
            return
        with torch.no_grad():
            if self.learned == "lsq":
                oqmin, oqmax = qrange(
                    old, self.spec.signed, self.spec.narrow_range, self.spec.reduce_range
                )
                nqmin, nqmax = self.quant_range
                ratio = (oqmax - oqmin) / (nqmax - nqmin)
                self.scale.mul_(ratio)
                if isinstance(self.zero_point, nn.Parameter):
                    self.zero_point.sub_(oqmin).div_(ratio).add_(nqmin)
                self._reinit_pending = True
            elif self.learned == "none":
                self._update_qparams_from_stats()

    # ------------------------------------------------------------------ observation
    @torch.no_grad()
    def observe(self, x: torch.Tensor, relu: bool = False) -> None:
        """Update the range statistics from ``x`` (or ``relu(x)``); recompute scale / zero point."""
        x = x.detach()
        if relu and self.spec.range_method in ("percentile", "mse"):
            x = torch.relu(x)
        lo, hi = self._batch_range(x)
        # Inside a compiled graph nothing can raise on data without a graph break: there a
        # non-finite batch leaves the range as it was (below) and the loss check reports the
        # divergence. Under DDP the collective's flag needs the eager path (a graph break).
        traced = torch.compiler.is_compiling() and not is_distributed()
        ok = finite_range(lo, hi) if traced else None
        bad = False if traced else not all_finite(lo, hi)
        if ok is not None:
            lo, hi = torch.where(ok, lo, 0.0), torch.where(ok, hi, 0.0)
        elif bad:
            lo, hi = torch.zeros_like(lo), torch.zeros_like(hi)  # keep NaN out of the reduction
        if relu:
            # min/max of relu(x) are those of x clamped at 0: no pass over relu(x) needed.
            lo, hi = lo.clamp_min(0.0), hi.clamp_min(0.0)
        bad_rank = None if traced else reduce_across_ranks(lo, hi, bad)
        if bad_rank is not None:
            self._raise_non_finite(bad_rank)
        keep_history = self.role == "activation" and self.is_initialized
        if keep_history and self.spec.range_method == "minmax":
            lo, hi = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)
        elif keep_history:
            d = self.spec.ema_decay
            lo = self.min_val * d + lo * (1.0 - d)
            hi = self.max_val * d + hi * (1.0 - d)
        if ok is not None:
            lo, hi = torch.where(ok, lo, self.min_val), torch.where(ok, hi, self.max_val)
        self.min_val.copy_(lo)
        self.max_val.copy_(hi)
        self.initialized = True
        self._update_qparams_from_stats()

    def _raise_non_finite(self, rank: int) -> None:
        raise NonFiniteError(
            f"NaN or inf in the {self.role} observed by quantizer '{self.name or repr(self)}'"
            f"{rank_phrase(rank)}: training has diverged at or before this layer "
            "(lower the learning rate, check the input data, or resume from the last good "
            "checkpoint)"
        )

    def reset_observer(self) -> None:
        """Forget the observed range (the next observation starts afresh)."""
        self.initialized = False
        self.min_val.zero_()
        self.max_val.zero_()

    def _channels_first(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.per_channel:
            return x.transpose(0, self.axis).reshape(x.shape[self.axis], -1)
        return x.reshape(1, -1)

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        method = self.spec.range_method
        if method in ("minmax", "ema"):
            return self._minmax(x)
        flat = self._channels_first(x).float()
        if method == "percentile":
            return percentile_range(flat, self.spec.percentile)
        qmin, qmax = self.quant_range
        return mse_range(flat, qmin, qmax, self.spec.symmetric, self.spec.signed)

    def _minmax(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # amin + amax, not aminmax: two vectorized passes ran 1.6x faster than aminmax's one
        # over a tensor and 10x faster per row (torch 2.13, AVX-512 CPU); the values are equal.
        if not self.spec.per_channel:
            return torch.amin(x).float().reshape(1), torch.amax(x).float().reshape(1)
        flat = self._channels_first(x).float()
        return torch.amin(flat, dim=1), torch.amax(flat, dim=1)

    @torch.no_grad()
    def _update_qparams_from_stats(self) -> None:
        if not self.enabled or self.spec.grid != "affine":
            return  # a GGUF grid's d is set from the weights themselves (_gguf)
        qmin, qmax = self.quant_range
        scale, zp = qparams_from_range(
            self.min_val, self.max_val, qmin, qmax, self.spec.symmetric, self.spec.signed
        )
        if self.learned == "pact":
            amax = torch.maximum(-self.min_val, self.max_val) if self.spec.signed else self.max_val
            self.alpha.copy_(guard_scale(amax.max().reshape(1)))
            return
        self.scale.copy_(scale)
        if isinstance(self.zero_point, nn.Parameter):
            self.zero_point.copy_(zp.float())
        else:
            self.zero_point.copy_(zp)

    # ------------------------------------------------------------------ forward
    def _effective_qparams(self, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.learned == "pact":
            _, qmax = self.quant_range
            scale = guard_scale(self.alpha.detach() / qmax)
            return scale, torch.zeros(1, dtype=torch.int32, device=scale.device)
        if self.learned == "lsq":
            return self.scale.clamp_min(SCALE_EPS), self.zero_point
        return self.scale, self.zero_point

    def forward(self, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
        """Fake-quantize ``x`` (or ``relu(x)`` when ``relu``), observing it first if enabled.

        With ``relu`` and a zero point at ``qmin`` (any unsigned ReLU output), the clamp at
        ``qmin`` *is* the ReLU, so no separate pass runs; the STE then also passes gradients
        for ``x`` in ``(−s/2, 0]``, which round to the zero level.
        """
        if not self.enabled:
            return torch.relu(x) if relu else x
        if self.spec.dynamic != "none":
            x = torch.relu(x) if relu else x
            return dynamic_fake_quantize(x, self.spec) if self.fake_quant_enabled else x
        if self.spec.group_size:
            view = group_view(x, self.spec.group_size, self.group_axis)
            out = self._quantize(view, relu)
            if out is view:
                # x itself: under no_grad a reshaped parameter has requires_grad but no grad_fn,
                # which breaks Lightning's FLOP-counting model summary.
                return x
            return ungroup(out, x.shape, self.group_axis)
        return self._quantize(x, relu)

    def _quantize(self, x: torch.Tensor, relu: bool) -> torch.Tensor:
        if self.spec.grid != "affine":
            return self._gguf(x)
        if fused_observer.applies(self, x, relu):
            out, finite = fused_observer.observe_fake_quantize(self, x, relu)
            if not finite:
                self._raise_non_finite(0)
            return out
        # Ranges move only in training mode: evaluation and export see a fixed model.
        if self.training and (self.observer_enabled or self._reinit_pending):
            if not self.observer_enabled:
                # A learned scale after a bit-width change: start afresh from this batch, not
                # from statistics gathered on the wider grid.
                self.reset_observer()
            self.observe(x, relu=relu)
            self._reinit_pending = False
        if not self.fake_quant_enabled or not self.initialized:
            return torch.relu(x) if relu else x
        qmin, qmax = self.quant_range
        if relu:
            x = self._relu_unless_clamped(x, qmin)
        learned = self.spec.learned
        if learned == "lsq":
            if self.training:
                cap_lsq_scale(self, x, qmin, qmax, relu)
            return self._lsq(x, qmin, qmax)
        if learned == "pact":
            return self._pact(x, qmin, qmax)
        axis = self.axis if self.spec.per_channel else None
        return fake_quantize(x, self.scale, self.zero_point, qmin, qmax, axis)

    def _gguf(self, blocks: torch.Tensor) -> torch.Tensor:
        """GGUF grids: ``d`` follows the weights like an observed range (module docstring).
        K-quants derive all their scales from the weights at every call (kquants docstring)."""
        if self.spec.grid in KQUANT_GRIDS:
            if self.training and self.observer_enabled:
                self.initialized = True
            if not self.fake_quant_enabled or not self.initialized:
                return blocks
            return kquant_fake_quantize(blocks, self.spec.grid)
        if self.training and self.observer_enabled:
            with torch.no_grad():
                self.scale.copy_(gguf_scale(blocks, self.spec.grid))
                self.initialized = True
        if not self.fake_quant_enabled or not self.initialized:
            return blocks
        return gguf_fake_quantize(blocks, self.scale, self.spec.grid)

    def _relu_unless_clamped(self, x: torch.Tensor, qmin: int) -> torch.Tensor:
        """``relu(x)``, or ``x`` itself where quantizing clamps negative inputs to exactly 0
        (zero point == qmin): the clamp is then the ReLU (see :meth:`forward`)."""
        if self.spec.learned == "pact":
            return x if not self.spec.signed else torch.relu(x)
        if qmin != 0 and self.spec.symmetric:
            return torch.relu(x)
        zp = self.zero_point.detach()
        at_qmin = ((torch.round(zp) if zp.is_floating_point() else zp) == qmin).all()
        if torch.compiler.is_compiling():
            # The same values and gradients as the branch below, without reading the flag.
            return torch.where(at_qmin, x, compiled_relu(x))
        return x if bool(at_qmin) else torch.relu(x)

    def lsq_grad_factor(self, x: torch.Tensor) -> float:
        """LSQ's gradient scale ``1/sqrt(N·Qp)``, N the elements sharing one scale."""
        _, qmax = self.quant_range
        n = x.numel() // (x.shape[self.axis] if self.spec.per_channel else 1)
        return 1.0 / math.sqrt(max(n, 1) * qmax)

    def _lsq(self, x: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
        scale = self.scale.clamp_min(SCALE_EPS)
        axis = self.axis if self.spec.per_channel else None
        g = self.lsq_grad_factor(x)
        return lsq_fake_quantize(x, scale, self.zero_point, qmin, qmax, axis, g)

    def _pact(self, x: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
        alpha = self.alpha
        # torch.where gives PACT's ∂y/∂α = 1 exactly where x ≥ α (min/max would split ties).
        clipped = torch.where(x >= alpha, alpha, x)
        if self.spec.signed:
            clipped = torch.where(x <= -alpha, -alpha, clipped)
        else:
            clipped = clipped.clamp_min(0.0)
        scale = guard_scale(alpha.detach() / qmax)
        zero_point = torch.zeros(1, dtype=torch.int32, device=x.device)
        return fake_quantize(clipped, scale, zero_point, qmin, qmax)
