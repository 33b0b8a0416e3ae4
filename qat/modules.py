"""Quantized layers: a torch layer plus its quantizers; each implements only its forward.

Every quantized layer fake-quantizes its weight (when it has one) and its *output*
(``output_quant``), so each tensor flowing between layers lives on one integer grid, as in the
integer runtimes. Grid-preserving ops between them (ReLU, max-pool, flatten, dropout in eval)
need no quantizer; ops that leave the grid (average pooling, residual add, concat, non-ReLU
activations) get one here.

``QConv2d`` / ``QLinear`` / ``QConvBn2d`` subclass their float layer, so parameter names and
``isinstance`` checks stay the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from qat.fold import bn_fold_factor, fold_bn_bias, fold_bn_params
from qat.ops import Add, Cat
from qat.quantizers import FakeQuantizer
from qat.spec import QuantSpec, default_activation_spec, default_weight_spec

_exact_accumulation = False


@contextmanager
def exact_accumulation(enabled: bool = True) -> Iterator[None]:
    """Sum conv / linear products in float64 in eval mode (the integer runtimes' exact sums).

    The integer kernels accumulate in int32, exactly; float32 accumulation of the same
    products rounds, and wherever a result lands next to a rounding boundary of the output
    grid the two pick different levels. Through a deep 8-bit network those one-level flips
    add up: a ResNet-20 W8A8 disagreed with its exported models on 0.18% of the test images
    in float32 and 0.04% with float64 sums. Layers whose input grid :func:`qat.export.snap_bias`
    pinned go further and requantize their integer sums as the runtimes do (see
    ``_quantized_output``). Used for the test metrics and the parity check (about 4x the
    float32 time); training is unaffected.
    """
    global _exact_accumulation
    old, _exact_accumulation = _exact_accumulation, enabled
    try:
        yield
    finally:
        _exact_accumulation = old


def _linear_op(
    module: nn.Module,
    op: Callable[..., torch.Tensor],
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
) -> torch.Tensor:
    if not (_exact_accumulation and not module.training and x.dtype == torch.float32):
        return op(x, w, b)
    return op(x.double(), w.double(), None if b is None else b.double()).float()


def _quantized_output(
    module: nn.Module,
    op: Callable[..., torch.Tensor],
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
) -> torch.Tensor:
    """``output_quant(op(x, w, b))``, requantized as the integer runtimes do when evaluating
    with :func:`exact_accumulation` a layer whose input grid :func:`qat.export.snap_bias` pinned.

    Both runtimes (ONNX Runtime's ``QLinearConv`` / ``QGemm``, fbgemm's requantization) compute
    ``round(float32(acc) · M) + z`` with the int32 sum ``acc`` (bias included) and the float32
    multiplier ``M = (s_in · s_w) / s_out``; quantizing the float sum instead,
    ``round(y · (1/s_out))``, rounds twice in float32. The two differ only within float32 error
    of a rounding boundary, but at 4 bits a depthwise conv's sums take a few small integer values,
    and when ``25 · M`` lands 2e-7 below x.5, every output with that sum flips: MobileNetV2 W4A4
    disagreed with both runtimes on 0.21% of the test images through one such channel.
    """
    oq: FakeQuantizer = module.output_quant
    snapped = grid_bias(module, b)
    if snapped is not None:
        # The grid's value with the latent bias's gradient (straight-through), exactly: a
        # ``b + (snapped − b)`` in float32 can land one ulp off the grid.
        b = snapped + (b - b.detach())
    codes = _pinned_input_codes(module, x)
    if codes is None:
        return oq(_linear_op(module, op, x, w, b), relu=module.relu)
    wq: FakeQuantizer = module.weight_quant
    s_w, _ = wq.qparams()
    shape = [-1] + [1] * (w.dim() - 1) if wq.per_channel else [1] * w.dim()
    levels = torch.round(w.double() / s_w.double().reshape(shape))
    acc = op(codes, levels, None)
    s_in = torch.tensor(module.runtime_input_scale, dtype=torch.float32, device=x.device)
    act_w = (s_in * s_w.float()).reshape(-1)  # float32, as both runtimes form it
    out_shape = [1, -1] + [1] * (acc.dim() - 2)
    if b is not None:
        # Not rounded here: after snap_bias it is the int32 bias to within float error (what
        # ONNX Runtime adds); otherwise it is fbgemm's float-bias epilogue, and ONNX's rounding
        # of it shows in the parity report rather than being hidden.
        acc = acc + (b.double() / act_w.double()).reshape(out_shape)
    s_out, _ = oq.qparams()
    multiplier = (act_w / s_out.float()).reshape(out_shape)
    levels_out = torch.round(acc.float() * multiplier)
    # The output quantizer takes these levels as they are (a value on its grid comes out
    # unchanged) and applies the ReLU and the clamp to its range; the hooks of
    # qat.export.convert that follow the grids see this layer's output there too.
    return oq(levels_out * s_out.float(), relu=module.relu)


#: Attribute of a quantized conv / linear holding the quantizer of its input, when it trains its
#: bias on the int32 grid (set by :func:`qat.bias_quant.link_bias_quantizers`).
BIAS_INPUT_QUANT = "bias_input_quant"


def grid_bias(module: nn.Module, b: torch.Tensor | None) -> torch.Tensor | None:
    """``b`` rounded onto the int32 grid ``s_in · s_w`` the integer runtimes add a bias on
    (detached), or None when the layer does not train its bias on that grid.

    It does once :func:`qat.bias_quant.link_bias_quantizers` linked the layer to the
    quantizer of its input (``bias_input_quant``) and both that and the weight quantizer are
    on. The scales are read live, so the grid follows learned and annealed ranges; the
    rounding is :func:`bias_levels`, the exporters' own, so after :func:`qat.export.snap_bias`
    the bias is unchanged by it.
    """
    quant: FakeQuantizer | None = module.__dict__.get(BIAS_INPUT_QUANT)
    if b is None or quant is None:
        return None
    wq: FakeQuantizer = module.weight_quant
    for q in (quant, wq):
        if not (q.enabled and q.fake_quant_enabled and q.is_initialized):
            return None
    s_in, _ = quant.qparams()
    s_w, _ = wq.qparams()
    levels, scale = bias_levels(b, s_in, s_w)
    return (levels * scale.double()).to(b.dtype)


def bias_levels(
    bias: torch.Tensor, s_in: torch.Tensor | float, s_w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``round(bias / (s_in · s_w))`` as float64 levels, and that per-channel scale in float32
    (as both runtimes form it); detached. The one rounding of the bias that the exporters'
    int32 bias (:func:`qat.export.convert.convert`) and bias-aware training share."""
    s_in32 = torch.as_tensor(s_in, dtype=torch.float32, device=s_w.device).reshape(())
    scale = (s_in32 * s_w.float().reshape(-1)).expand(bias.shape[0]).contiguous()
    return torch.round(bias.detach().double() / scale.double()), scale


def _pinned_input_codes(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``x`` as float64 integer codes (``q − z``) on the input grid snap_bias pinned, or None
    when the runtime requantization does not apply (not exact evaluation, nothing pinned, a
    quantizer off or PACT, or ``x`` off the pinned grid because ranges moved since)."""
    s_in = getattr(module, "runtime_input_scale", None)
    if not _exact_accumulation or module.training or s_in is None or x.dtype != torch.float32:
        return None
    oq: FakeQuantizer = module.output_quant
    wq: FakeQuantizer = module.weight_quant
    for quant in (oq, wq):
        if not (quant.enabled and quant.fake_quant_enabled and quant.is_initialized):
            return None
    if oq.learned == "pact":
        return None
    s_in32 = torch.tensor(s_in, dtype=torch.float32, device=x.device)
    codes = torch.round(x.double() / s_in32.double())
    return codes if torch.equal(codes.float() * s_in32, x) else None


def _weight_quantizer(spec: QuantSpec | None, channels: int, axis: int = 0) -> FakeQuantizer:
    return FakeQuantizer(spec or default_weight_spec(), role="weight", channels=channels, axis=axis)


def _output_quantizer(spec: QuantSpec | None) -> FakeQuantizer:
    return FakeQuantizer(spec or default_activation_spec(), role="activation")


def _conv_kwargs(conv: nn.Conv2d) -> dict:
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": conv.kernel_size,
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
        "groups": conv.groups,
        "bias": conv.bias is not None,
        "padding_mode": conv.padding_mode,
    }


def _like(new: nn.Module, ref: nn.Module) -> nn.Module:
    p = next(ref.parameters(), None)
    return new.to(device=p.device, dtype=p.dtype) if p is not None else new


def _copy_weight_bias(dst: nn.Module, src: nn.Module) -> nn.Module:
    """``dst`` (moved to ``src``'s device/dtype) holding ``src``'s weight and bias."""
    dst = _like(dst, src)
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        if src.bias is not None:
            dst.bias.copy_(src.bias)
    return dst


class QConv2d(nn.Conv2d):
    """``Conv2d`` (grouped / depthwise too) → optional ReLU → output quantizer.

    Weights are quantized per output channel (axis 0) when the spec is per-channel.
    """

    def __init__(
        self,
        *args,
        relu: bool = False,
        weight_spec: QuantSpec | None = None,
        activation_spec: QuantSpec | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.relu = relu
        self.weight_quant = _weight_quantizer(weight_spec, self.out_channels, axis=0)
        self.output_quant = _output_quantizer(activation_spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _quantized_output(
            self, self._conv_forward, x, self.weight_quant(self.weight), self.bias
        )

    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        weight_spec: QuantSpec | None = None,
        activation_spec: QuantSpec | None = None,
        relu: bool = False,
    ) -> QConv2d:
        q = cls(
            **_conv_kwargs(conv),
            relu=relu,
            weight_spec=weight_spec,
            activation_spec=activation_spec,
        )
        q = _copy_weight_bias(q, conv)
        return q

    def to_float(self) -> nn.Module:
        conv = _copy_weight_bias(nn.Conv2d(**_conv_kwargs(self)), self)
        return nn.Sequential(conv, nn.ReLU()) if self.relu else conv

    def extra_repr(self) -> str:
        return super().extra_repr() + (", relu=True" if self.relu else "")


class QLinear(nn.Linear):
    """``Linear`` → optional ReLU → output quantizer; weights per output row (axis 0)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        relu: bool = False,
        weight_spec: QuantSpec | None = None,
        activation_spec: QuantSpec | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.relu = relu
        self.weight_quant = _weight_quantizer(weight_spec, out_features, axis=0)
        self.output_quant = _output_quantizer(activation_spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _quantized_output(self, F.linear, x, self.weight_quant(self.weight), self.bias)

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        weight_spec: QuantSpec | None = None,
        activation_spec: QuantSpec | None = None,
        relu: bool = False,
    ) -> QLinear:
        q = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            relu=relu,
            weight_spec=weight_spec,
            activation_spec=activation_spec,
        )
        q = _copy_weight_bias(q, linear)
        return q

    def to_float(self) -> nn.Module:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin = _copy_weight_bias(lin, self)
        return nn.Sequential(lin, nn.ReLU()) if self.relu else lin

    def extra_repr(self) -> str:
        return super().extra_repr() + (", relu=True" if self.relu else "")


class QConvBn2d(nn.Conv2d):
    """Conv2d → BatchNorm2d (→ ReLU) with BN folding simulated during training.

    Training with live BN statistics follows Jacob et al. (2018) as torch.ao does: the weight
    is scaled by ``f = γ/σ_running`` before fake quantization, the result is scaled back by
    ``1/f`` and batch-normalised with the batch statistics (the batch-statistics correction),
    so the quantizer sees the folded weight the integer model will hold. The ``1/f`` is
    applied to the quantized weight, not to the conv output (the same by linearity, and much
    cheaper). In eval mode, and once
    :meth:`freeze_bn_stats` has been called, the forward *is* the folded integer graph:
    ``conv(x, fq(W·f)) + b_folded`` with the running statistics, computed by
    :func:`qat.fold.fold_bn_params` exactly as the exporters compute it.
    """

    def __init__(
        self,
        *args,
        relu: bool = False,
        bn_eps: float = 1e-5,
        bn_momentum: float | None = 0.1,
        weight_spec: QuantSpec | None = None,
        activation_spec: QuantSpec | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.relu = relu
        self.bn = nn.BatchNorm2d(self.out_channels, eps=bn_eps, momentum=bn_momentum)
        self.weight_quant = _weight_quantizer(weight_spec, self.out_channels, axis=0)
        self.output_quant = _output_quantizer(activation_spec)
        self.register_buffer("bn_frozen", torch.tensor(0, dtype=torch.uint8))

    # Channels whose γ/σ is ~0 would divide by zero in the training path's un-scaling.
    _MIN_FACTOR = 1e-6

    def freeze_bn_stats(self, frozen: bool = True) -> None:
        """Stop updating BN running statistics and train on the folded graph from now on."""
        self.bn_frozen.fill_(int(frozen))

    @property
    def is_bn_frozen(self) -> bool:
        return bool(self.bn_frozen)

    def folded_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact float ``(weight, bias)`` of conv+BN with running statistics."""
        return fold_bn_params(self.weight, self.bias, self.bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.bn_frozen:
            f = bn_fold_factor(self.bn)
            f = torch.where(f.abs() < self._MIN_FACTOR, torch.full_like(f, self._MIN_FACTOR), f)
            f = f.reshape(-1, 1, 1, 1)
            # conv(x, fq(W·f)) / f == conv(x, fq(W·f) / f): un-scale the (small) weight rather
            # than the activation, which saves a full pass over the output forward and backward.
            y = self.bn(self._conv_forward(x, self.weight_quant(self.weight * f) / f, self.bias))
            if self.__dict__.get(BIAS_INPUT_QUANT) is not None:
                with torch.no_grad():
                    folded_b = fold_bn_bias(self.bias, self.bn)
                snapped = grid_bias(self, folded_b)
                if snapped is not None:
                    # The folded integer layer adds ``snapped`` where the folded bias is (running
                    # statistics): train with the same per-channel shift on the BN output.
                    y = y + (snapped - folded_b).reshape(1, -1, 1, 1)
            return self.output_quant(y, relu=self.relu)
        w, b = self.folded_params()
        return _quantized_output(self, self._conv_forward, x, self.weight_quant(w), b)

    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        bn: nn.BatchNorm2d,
        weight_spec: QuantSpec | None = None,
        activation_spec: QuantSpec | None = None,
        relu: bool = False,
    ) -> QConvBn2d:
        if conv.out_channels != bn.num_features:
            raise ValueError(
                f"cannot fuse conv with {conv.out_channels} output channels and BatchNorm2d "
                f"with {bn.num_features} features"
            )
        if not bn.track_running_stats:
            raise ValueError("cannot fuse a BatchNorm2d without running statistics")
        q = cls(
            **_conv_kwargs(conv),
            relu=relu,
            bn_eps=bn.eps,
            bn_momentum=bn.momentum,
            weight_spec=weight_spec,
            activation_spec=activation_spec,
        )
        q = _copy_weight_bias(q, conv)
        q.bn.load_state_dict(bn.state_dict(), strict=bn.affine)
        if not bn.affine:
            with torch.no_grad():
                q.bn.weight.fill_(1.0)
                q.bn.bias.zero_()
            q.bn.weight.requires_grad_(False)
            q.bn.bias.requires_grad_(False)
        return q

    def to_float(self) -> nn.Sequential:
        conv = _copy_weight_bias(nn.Conv2d(**_conv_kwargs(self)), self)
        bn = _like(
            nn.BatchNorm2d(self.out_channels, eps=self.bn.eps, momentum=self.bn.momentum), self
        )
        bn.load_state_dict(self.bn.state_dict())
        layers: list[nn.Module] = [conv, bn] + ([nn.ReLU()] if self.relu else [])
        return nn.Sequential(*layers)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", relu=True" if self.relu else "")


class QAdd(nn.Module):
    """``a + b`` (→ ReLU) with its own output quantizer: requantize after add."""

    def __init__(self, relu: bool = False, activation_spec: QuantSpec | None = None) -> None:
        super().__init__()
        self.relu = relu
        self.output_quant = _output_quantizer(activation_spec)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        y = a + b
        return self.output_quant(y, relu=self.relu)

    @classmethod
    def from_float(cls, add: Add, activation_spec: QuantSpec | None = None) -> QAdd:
        return cls(relu=add.relu, activation_spec=activation_spec)

    def to_float(self) -> Add:
        return Add(relu=self.relu)

    def extra_repr(self) -> str:
        return f"relu={self.relu}"


class QCat(nn.Module):
    """``torch.cat`` with its own output quantizer (inputs on different grids are requantized)."""

    def __init__(self, dim: int = 1, activation_spec: QuantSpec | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.output_quant = _output_quantizer(activation_spec)

    def forward(self, tensors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.output_quant(torch.cat(list(tensors), dim=self.dim))

    @classmethod
    def from_float(cls, cat: Cat, activation_spec: QuantSpec | None = None) -> QCat:
        return cls(dim=cat.dim, activation_spec=activation_spec)

    def to_float(self) -> Cat:
        return Cat(dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class QAct(nn.Module):
    """Any activation / pooling module followed by an output quantizer.

    Used for ops whose output leaves the integer grid of their input (average pooling,
    sigmoid, hardswish, GELU, ...). ReLU and max-pool keep the grid and are left alone.
    """

    def __init__(self, act: nn.Module, activation_spec: QuantSpec | None = None) -> None:
        super().__init__()
        self.act = act
        self.output_quant = _output_quantizer(activation_spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_quant(self.act(x))

    @classmethod
    def from_float(cls, act: nn.Module, activation_spec: QuantSpec | None = None) -> QAct:
        return cls(act, activation_spec=activation_spec)

    def to_float(self) -> nn.Module:
        return self.act


class FloatLayer(nn.Module):
    """A layer left in float (an override with ``skip: true``) between quantized neighbours.

    It computes in float but re-quantizes its output, so the next quantized layer still reads
    a tensor on an integer grid; the exporters dequantize before it and quantize after it. Give
    the override ``activation: {bits: 32}`` to keep its output in float too (e.g. the logits).
    """

    def __init__(self, module: nn.Module, activation_spec: QuantSpec | None = None) -> None:
        super().__init__()
        self.module = module
        self.output_quant = _output_quantizer(activation_spec)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.output_quant(self.module(*args, **kwargs))

    def to_float(self) -> nn.Module:
        return self.module


#: Quantized layer types, for walkers that need to tell them apart from float ones.
QUANT_MODULES = (QConv2d, QLinear, QConvBn2d, QAdd, QCat, QAct, FloatLayer)
